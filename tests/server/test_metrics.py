"""What a /metrics scrape reads of the jobs in Redis (a real redis-server; the relay's counters stand still)."""

from __future__ import annotations

import re
from types import SimpleNamespace

from gradserve.v1 import jobs_pb2
from gradserve_server import metrics
from gradserve_store import store


def job_counts(m: metrics.Metrics) -> dict[tuple[str, str], float]:
    m.refresh()
    text = m.exposition().decode()
    return {(state, queue): float(n) for queue, state, n in
            re.findall(r'^gradserve_jobs\{queue="([^"]*)",state="([^"]*)"\} (\S+)$', text, re.M)}


def test_a_scrape_reads_an_ended_job_once_and_forgets_it_when_it_is_deleted(make_stack):
    s = make_stack("metrics")
    s.start_redis()
    job_store = store.JobStore.from_url(s.redis_url)
    try:
        spec = jobs_pb2.JobSpec(dataset="builtin:copy", model="rnn", max_steps=10)
        waiting, leaving, ended = (store.new_job_id() for _ in range(3))
        for job_id in (waiting, leaving, ended):
            job_store.create_job(job_id, spec, "cpu", tenant="alice")
        job_store.request_cancel(ended)
        m = metrics.Metrics()
        m.watch(job_store, SimpleNamespace(relayed=0, watchers=0, redis_errors=0))
        assert job_counts(m) == {("QUEUED", "cpu"): 2, ("CANCELLED", "cpu"): 1}

        # An ended job's record is not read again: a change to it (none happens in service) goes unseen...
        job_store.r.hset(store.job_key(ended), "queue", "gpu")
        # ...while a job still active is read at every scrape.
        job_store.request_cancel(leaving)
        assert job_counts(m) == {("QUEUED", "cpu"): 1, ("CANCELLED", "cpu"): 2}

        job_store.delete_job(ended)
        assert job_counts(m) == {("QUEUED", "cpu"): 1, ("CANCELLED", "cpu"): 1}
    finally:
        job_store.close()
