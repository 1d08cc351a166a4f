"""Defects a new user met under load and with hostile input, each against the real server over TCP.

Worker names with and without "@", malformed worker entries, cursors past a
stream's end or out of range, a port already taken, a job no worker can run,
and a window longer than half the allowed range.
"""

from __future__ import annotations

import subprocess
import sys
import threading
import time

import grpc
import pytest
import redis

import gradserve
from gradserve.v1 import jobs_pb2, jobs_pb2_grpc
from gradserve_store import store

SMALL = dict(model="rnn", hidden_size=16, batch_size=8, num_steps=10, preprocess="d2l", val_fraction=0.0)


@pytest.fixture(scope="module")
def idle_corpus(idle_stack, timemachine) -> str:
    with idle_stack.client() as c:
        return c.upload_bytes(timemachine, name="timemachine.txt")


def _redis(stack) -> redis.Redis:
    return redis.Redis.from_url(stack.redis_url)


# ---------------------------------------------------------------- worker entries


def test_a_worker_named_without_at_keeps_one_expiring_entry_and_every_call_works(make_stack, timemachine):
    s = make_stack("plain-names")
    s.start_redis()
    s.start_server()
    s.start_worker("plain", node="plain")
    s.start_worker("full", node="full@test")
    r = _redis(s)
    with s.client() as c:
        dataset = c.upload_bytes(timemachine)
        jobs = [c.submit(dataset=dataset, max_steps=1_000_000, log_every=50, device="cpu", **SMALL) for _ in range(2)]
        deadline = time.monotonic() + 60
        while {j.status() for j in jobs} != {"RUNNING"}:
            assert time.monotonic() < deadline, s.logs()
            time.sleep(0.2)
        # While both run: the calls that read the worker entries, for everyone.
        workers = {w.name: w for w in c.workers()}
        assert set(workers) == {"plain", "full@test"}
        assert {w.job_id for w in workers.values()} == {j.id for j in jobs}
        assert {j.refresh().worker for j in jobs} == {"plain", "full@test"}
        extra = c.submit(dataset=dataset, max_steps=5, device="cpu", **SMALL)
        assert extra.state == "QUEUED"
        keys = sorted(k.decode() for k in r.scan_iter(match=store.worker_key("*")))
        assert keys == [store.worker_key("full@test"), store.worker_key("plain")]
        assert all(0 < r.ttl(k) <= store.WORKER_TTL_S for k in keys)
        for j in (*jobs, extra):
            j.cancel()
        for j in (*jobs, extra):
            assert j.wait(timeout=60).state == "CANCELLED"
    r.close()


def test_malformed_worker_entries_never_fail_submit_or_list_workers(idle_stack, idle_corpus):
    r = _redis(idle_stack)
    try:
        r.hset(store.worker_key("celery@stray"), "job_id", "job-00000000000000000000")  # a name-less leftover
        r.hset(store.worker_key("garbled"), mapping={"name": "garbled", "last_seen": "yesterday", "pid": "x"})
        r.sadd(store.WORKERS_KEY, "celery@stray", "garbled")  # listed where the workers' names are
        with idle_stack.client() as c:
            assert [w.name for w in c.workers()] == []
            assert c.submit(dataset=idle_corpus, max_steps=5, **SMALL).state == "QUEUED"
    finally:
        r.delete(store.worker_key("celery@stray"), store.worker_key("garbled"))
        r.srem(store.WORKERS_KEY, "celery@stray", "garbled")
        r.close()


# ------------------------------------------------------------------------- cursors


def _stream(stack, job_id: str, cursor: str) -> list[jobs_pb2.Event]:
    with grpc.insecure_channel(stack.address) as channel:
        stub = jobs_pb2_grpc.JobServiceStub(channel)
        return list(stub.StreamEvents(jobs_pb2.StreamEventsRequest(job_id=job_id, cursor=cursor), timeout=20))


def test_a_cursor_out_of_a_stream_ids_range_is_invalid_argument(idle_stack, idle_corpus):
    with idle_stack.client() as c:
        job = c.submit(dataset=idle_corpus, max_steps=5, **SMALL)
        for cursor in ("99999999999999999999-0", "1-18446744073709551616"):
            with pytest.raises(grpc.RpcError) as caught:
                _stream(idle_stack, job.id, cursor)
            assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert "cursor" in caught.value.details() and cursor in caught.value.details()
        job.cancel()


@pytest.mark.parametrize("ended", [True, False])
def test_a_cursor_past_the_last_event_ends_the_call_and_says_so(idle_stack, idle_corpus, ended):
    with idle_stack.client() as c:
        job = c.submit(dataset=idle_corpus, max_steps=5, **SMALL)
        if ended:
            job.cancel()
        last = list(job.events(follow=False))[-1].cursor
        started = time.monotonic()
        with pytest.raises(grpc.RpcError) as caught:
            _stream(idle_stack, job.id, "9999999999999-0")
        assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "past the last event" in caught.value.details() and last in caught.value.details()
        assert time.monotonic() - started < 10, "it must end, not wait for the deadline"
        # The client's events(), which sets no deadline, ends the same way.
        with pytest.raises(gradserve.InvalidArgument, match="past the last event"):
            list(job.events(cursor="9999999999999-0"))
        # The newest cursor itself is fine: nothing after it yet.
        if ended:
            assert _stream(idle_stack, job.id, last) == []
        else:
            job.cancel()


# --------------------------------------------------------------------------- ports


def test_a_second_server_on_a_taken_port_fails_at_start_and_names_the_port(idle_stack):
    port = idle_stack.address.rsplit(":", 1)[1]
    for argv in (["--redis-url", idle_stack.redis_url, "--listen", idle_stack.address],
                 ["dev", "--listen", idle_stack.address]):
        done = subprocess.run([sys.executable, "-m", "gradserve_server.main", *argv], capture_output=True, text=True,
                              timeout=60)
        assert done.returncode != 0, done.stderr
        assert f"cannot listen on {idle_stack.address}" in done.stderr and port in done.stderr
        assert "in use" in done.stderr
    # The first server still has the port, and answers.
    assert idle_stack.server.poll() is None
    with idle_stack.client() as c:
        assert c.workers() == []


# ---------------------------------------------------------------- a job that waits


def test_a_job_no_live_worker_can_run_is_accepted_and_says_why_it_waits(idle_stack, idle_corpus):
    with idle_stack.client() as c:
        job = c.submit(dataset=idle_corpus, max_steps=5, device="cuda", **SMALL)
        assert job.state == "QUEUED" and job.info.queue == "gpu"
        assert "no live worker serves the gpu queue" in job.waiting
        assert "gradserve-worker --redis-url URL --queues gpu" in job.waiting
        assert "no live worker serves the gpu queue" in c.get_job(job.id).waiting
        listed = {j.id: j for j in c.list_jobs()}
        assert "no live worker" in listed[job.id].waiting
        cpu_job = c.submit(dataset=idle_corpus, max_steps=5, device="cpu", **SMALL)
        assert "no live worker serves the cpu queue" in cpu_job.waiting
        for j in (job, cpu_job):
            j.cancel()
            assert j.refresh().waiting == "", "only QUEUED jobs wait"


def test_a_busy_queue_is_the_reason_while_its_workers_run_other_jobs(make_stack, timemachine):
    s = make_stack("busy")
    s.start_redis()
    s.start_server()
    s.start_worker("only")
    with s.client() as c:
        dataset = c.upload_bytes(timemachine)
        running = c.submit(dataset=dataset, max_steps=1_000_000, device="cpu", **SMALL)
        deadline = time.monotonic() + 60
        while running.status() != "RUNNING":
            assert time.monotonic() < deadline, s.logs()
            time.sleep(0.2)
        behind = c.submit(dataset=dataset, max_steps=5, device="cpu", **SMALL)
        assert "the one worker of the cpu queue is busy" in behind.waiting
        running.cancel()
        assert behind.wait(timeout=60).state == "SUCCEEDED"


# -------------------------------------------------------------------- the window


def test_a_window_above_half_the_range_is_accepted_under_every_truncation(idle_stack, idle_corpus):
    with idle_stack.client() as c:
        for truncation in ("fixed", "randomized", "tbptt"):
            job = c.submit(dataset=idle_corpus, max_steps=5, model="rnn", hidden_size=8, batch_size=1,
                           num_steps=6000, truncation=truncation, val_fraction=0.0)
            assert job.spec.num_steps == 6000
            job.cancel()


def test_client_state_names_come_from_the_handle(idle_stack, idle_corpus):
    with idle_stack.client() as c:
        job = c.submit(dataset=idle_corpus, max_steps=5, **SMALL)
        done = threading.Event()
        finished = []

        def wait():
            finished.append(job.wait(timeout=30))
            done.set()

        threading.Thread(target=wait, daemon=True).start()
        assert job.cancel() is job and job.state == "CANCELLED"
        assert done.wait(30) and finished[0].state == "CANCELLED" and "cancelled" in finished[0].reason
