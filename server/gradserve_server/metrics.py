"""Prometheus metrics of one server process, served at /metrics on --http-listen (see `web`).

What the process sees as it happens is counted as it happens (submit
latency, Redis errors, events handed to watchers); what lives in Redis (jobs
by state, queue depths, workers, each running job's tokens/s) is read once per
scrape, by `Metrics.refresh`, so a scrape costs a few pipelined reads
whatever the traffic, and reads the records of active jobs only (the facts
of ended ones are kept).

    gradserve_jobs{state,queue}                  jobs recorded, by state and queue
    gradserve_queue_depth{queue}                 tasks waiting in the broker's queue
    gradserve_queue_wait_seconds                 QUEUED -> RUNNING, for jobs started since this process began
    gradserve_workers_alive{queue,device}        advertised workers
    gradserve_submit_seconds                     SubmitJob's latency, as this server served it
    gradserve_events_relayed_total               events handed to watchers, history replays included (rate(): events/s)
    gradserve_watchers                           event streams open now (gRPC and the dashboard's)
    gradserve_redis_errors_total                 calls and reads that found Redis unreachable
    gradserve_job_tokens_per_second{job_id}      each RUNNING job's latest throughput
"""

from __future__ import annotations

import collections
import time
from typing import NamedTuple

import grpc
import prometheus_client
import redis
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from gradserve.v1 import jobs_pb2
from gradserve_server import errors
from gradserve_store import store
from gradserve_store.queue import GENERATE_QUEUE, QUEUES

CONTENT_TYPE = prometheus_client.CONTENT_TYPE_LATEST
_STATES = {v: k for k, v in jobs_pb2.JobState.items() if v}
# Seconds, from a job that starts at once to one that waited for a worker for an hour.
_WAIT_BUCKETS = (0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300, 900, 3600)
_SUBMIT_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5)
_SUBMIT_METHOD = "/gradserve.v1.JobService/SubmitJob"


class Metrics:
    """This process's registry. `watch` gives it the job store and event relay it reads at each scrape."""

    def __init__(self):
        self.store: store.JobStore | None = None
        self.relay = None
        self.registry = prometheus_client.CollectorRegistry()
        self.started = time.time()
        self.submit_seconds = prometheus_client.Histogram(
            "gradserve_submit_seconds", "SubmitJob latency as this server served it, in seconds",
            buckets=_SUBMIT_BUCKETS, registry=self.registry)
        self.queue_wait = prometheus_client.Histogram(
            "gradserve_queue_wait_seconds", "Seconds from QUEUED to RUNNING, for jobs started since this process "
            "began (observed at the first scrape that sees them running)", buckets=_WAIT_BUCKETS,
            registry=self.registry)
        self.refresh_failures = 0
        self._waits_seen: set[tuple[str, int]] = set()
        self._ended: dict[str, _JobFacts] = {}  # the facts of jobs that have ended, which never change
        self._snapshot: list = []
        self.registry.register(_Snapshot(self))

    def watch(self, job_store: store.JobStore, relay) -> None:
        self.store, self.relay = job_store, relay

    def refresh(self) -> None:
        """Read what lives in Redis for the next exposition; from a thread, since it blocks."""
        try:
            jobs = _all_jobs(self.store, self._ended)
            with self.store.r.pipeline(transaction=False) as p:
                for queue in (*QUEUES, GENERATE_QUEUE):
                    p.llen(queue)
                depths = dict(zip((*QUEUES, GENERATE_QUEUE), p.execute()))
            workers = self.store.workers()
        except (redis.ConnectionError, redis.TimeoutError):
            self.refresh_failures += 1
            raise
        for job in jobs:
            key = (job.id, job.attempt)
            if job.started >= self.started and key not in self._waits_seen:
                self._waits_seen.add(key)
                self.queue_wait.observe(max(0.0, job.started - job.created))
        self._snapshot = [jobs, depths, workers]

    def exposition(self) -> bytes:
        return prometheus_client.generate_latest(self.registry)

    def interceptor(self) -> grpc.aio.ServerInterceptor:
        return _SubmitTimer(self.submit_seconds)


class _JobFacts(NamedTuple):
    """What the metrics read of a job record."""

    id: str
    state: int
    queue: str
    attempt: int
    created: float
    started: float  # 0 until it first runs
    tokens_per_sec: float


_FIELDS = ("state", "queue", "attempt", "created", "started", "summary")
# Job records read in one pipelined round trip.
_READ_BATCH = 1000


def _all_jobs(job_store: store.JobStore, ended: dict[str, _JobFacts]) -> list[_JobFacts]:
    """Every recorded job's facts, tenant by tenant, read straight from the job records' fields.

    A job that has ended never changes again, so `ended` keeps its facts and
    only the other jobs' records are read: a scrape reads the index and the
    active jobs, not every job ever kept. Jobs gone from the index (deleted,
    or past retention) leave `ended` too.
    """
    jobs: list[_JobFacts] = []
    for key in job_store.r.scan_iter(match=store.tenant_jobs_key("*"), count=500):
        ids = [i.decode() for i in job_store.r.zrange(key, 0, -1)]
        jobs.extend(ended[i] for i in ids if i in ended)
        unknown = [i for i in ids if i not in ended]
        for start in range(0, len(unknown), _READ_BATCH):
            chunk = unknown[start:start + _READ_BATCH]
            with job_store.r.pipeline(transaction=False) as p:
                for job_id in chunk:
                    p.hmget(store.job_key(job_id), *_FIELDS)
                rows = p.execute()
            for job_id, (state, queue, attempt, created, started, summary) in zip(chunk, rows):
                if state is None:
                    continue  # deleted since the index was read
                job = _JobFacts(job_id, int(state), (queue or b"").decode(), int(attempt or 1), float(created or 0),
                                float(started or 0), jobs_pb2.JobSummary.FromString(summary or b"").tokens_per_sec)
                jobs.append(job)
                if job.state in store.TERMINAL:
                    ended[job_id] = job
    kept = {job.id for job in jobs}
    for job_id in [i for i in ended if i not in kept]:
        del ended[job_id]
    return jobs


class _Snapshot:
    """The gauges read from Redis by the last refresh, and the relay's counters as they stand."""

    def __init__(self, metrics: Metrics):
        self.metrics = metrics

    def collect(self):
        m = self.metrics
        if m.relay is None:
            return
        relayed = CounterMetricFamily("gradserve_events_relayed",
                                      "Events this process handed to watchers, replayed history included")
        relayed.add_metric([], m.relay.relayed)
        yield relayed
        watchers = GaugeMetricFamily("gradserve_watchers", "Event streams this process serves now")
        watchers.add_metric([], m.relay.watchers)
        yield watchers
        failures = CounterMetricFamily("gradserve_redis_errors", "Calls, event reads and scrapes of this process "
                                       "that found Redis unreachable")
        failures.add_metric([], errors.redis_failures + m.relay.redis_errors + m.refresh_failures)
        yield failures
        if not m._snapshot:
            return
        jobs, depths, workers = m._snapshot
        by_state = GaugeMetricFamily("gradserve_jobs", "Jobs recorded, by state and queue", labels=["state", "queue"])
        counts = collections.Counter((_STATES.get(j.state, str(j.state)), j.queue) for j in jobs)
        for (state, queue), n in sorted(counts.items()):
            by_state.add_metric([state, queue], n)
        yield by_state
        depth = GaugeMetricFamily("gradserve_queue_depth", "Tasks waiting in the broker's queue", labels=["queue"])
        for queue, n in depths.items():
            depth.add_metric([queue], n)
        yield depth
        alive = GaugeMetricFamily("gradserve_workers_alive", "Advertised workers, by queue and device",
                                  labels=["queue", "device"])
        per = collections.Counter((q, w.device) for w in workers for q in w.queues)
        for (queue, device), n in sorted(per.items()):
            alive.add_metric([queue, device], n)
        yield alive
        speed = GaugeMetricFamily("gradserve_job_tokens_per_second", "Each RUNNING job's latest training "
                                  "throughput, in tokens per second", labels=["job_id"])
        for job in jobs:
            if job.state == jobs_pb2.RUNNING:
                speed.add_metric([job.id], job.tokens_per_sec)
        yield speed


class _SubmitTimer(grpc.aio.ServerInterceptor):
    """Times SubmitJob from the handler's start to its answer, whatever the answer."""

    def __init__(self, histogram: prometheus_client.Histogram):
        self.histogram = histogram

    async def intercept_service(self, continuation, handler_call_details):
        handler = await continuation(handler_call_details)
        if handler is None or handler_call_details.method != _SUBMIT_METHOD:
            return handler
        behavior, histogram = handler.unary_unary, self.histogram

        async def timed(request, context):
            start = time.perf_counter()
            try:
                return await behavior(request, context)
            finally:
                histogram.observe(time.perf_counter() - start)

        return grpc.unary_unary_rpc_method_handler(timed, request_deserializer=handler.request_deserializer,
                                                   response_serializer=handler.response_serializer)
