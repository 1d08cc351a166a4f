"""The worker's Celery application and its tasks.

The tasks are thin on purpose: training opens the job store and hands over to
`runner.run_job` (a sweep's group: `runner.run_group`), generation to
`generate.Generator`, all plain code that tests can call without Celery.
"""

from __future__ import annotations

import signal
import threading
from dataclasses import dataclass

import redis
from celery import Celery
from celery.exceptions import Reject

from gradserve_store.queue import GENERATE_TASK, TRAIN_GROUP_TASK, TRAIN_TASK, dispatch, make_celery
from gradserve_store.settings import Shared
from gradserve_store.store import JobStore, NotFound
from gradserve_worker.capacity import MemoryLedger, group_bytes, stored_job_bytes

# How long a job's writes keep retrying while Redis is unreachable (restarting,
# say) before the attempt gives up and leaves the job to the reaper.
DEFAULT_REDIS_RETRY_S = 60.0


@dataclass(frozen=True)
class WorkerSettings:
    """What the tasks need to know of their worker, as its entry point read and checked it."""

    redis_url: str
    # The name the worker advertises, which jobs record as their worker.
    name: str
    # torch threads per job.
    threads: int
    shared: Shared
    # How long a job's writes retry while Redis is unreachable.
    redis_retry_s: float = DEFAULT_REDIS_RETRY_S
    # The memory budget the worker's concurrent jobs share, and the device it is on ("cpu" or "cuda").
    ledger: MemoryLedger | None = None
    device: str = "cpu"


def create_app(settings: WorkerSettings) -> Celery:
    redis_url, threads = settings.redis_url, settings.threads
    app = make_celery(redis_url, settings.shared.visibility_timeout_s)

    @app.task(name=TRAIN_TASK, bind=True)
    def train_job(self, job_id: str, attempt: int = 0) -> None:
        # Imported here so that the prefork parent never runs the trainer's module-level torch code.
        from gradserve_worker.runner import run_job

        def run(job_store: JobStore, shutdown: threading.Event) -> None:
            run_job(job_store, job_id, worker=settings.name, attempt=attempt, shutdown=shutdown,
                    requeue=lambda job, number, queue: dispatch(self.app, job_store, job, number, queue),
                    lease_ttl_s=settings.shared.lease_ttl_s, redis_retry_s=settings.redis_retry_s)

        _train([job_id], run)

    @app.task(name=TRAIN_GROUP_TASK, bind=True)
    def train_group(self, job_ids: list[str]) -> None:
        from gradserve_worker.runner import run_group

        def run(job_store: JobStore, shutdown: threading.Event) -> None:
            run_group(job_store, job_ids, worker=settings.name, shutdown=shutdown,
                      requeue=lambda job, number, queue: dispatch(self.app, job_store, job, number, queue),
                      lease_ttl_s=settings.shared.lease_ttl_s, redis_retry_s=settings.redis_retry_s)

        _train(job_ids, run)

    def _train(job_ids: list[str], run) -> None:
        """run(job_store, shutdown) with torch's threads set, the jobs' memory reserved and SIGTERM caught."""
        import torch

        # Two workers' thread pools on the same cores spin against each other
        # and can run a hundred times slower than either alone.
        torch.set_num_threads(threads)
        job_store = JobStore.from_url(redis_url)
        # SIGTERM, from a supervisor or forwarded by this worker's parent as it
        # shuts down, must not kill the job mid-step: it asks it to checkpoint
        # and hand itself back to the queue.
        shutdown = threading.Event()
        previous = signal.signal(signal.SIGTERM, lambda *_: shutdown.set())
        reserved = False
        try:
            if settings.ledger is not None:
                # Before the claim: jobs that wait here for memory stay QUEUED, free for another worker.
                nbytes = group_bytes([_job_bytes(job_store, job_id) for job_id in job_ids], settings.device)
                reserved = settings.ledger.reserve(job_ids[0], nbytes, shutdown)
                if not reserved:
                    raise Reject("the worker is shutting down", requeue=True)
            run(job_store, shutdown)
        except (redis.ConnectionError, redis.TimeoutError) as e:
            # Redis stayed away before the jobs could be claimed: keep the task for when it is back.
            raise Reject(e, requeue=True) from e
        finally:
            if reserved:
                settings.ledger.release()
            signal.signal(signal.SIGTERM, previous)
            job_store.close()

    def _job_bytes(job_store: JobStore, job_id: str) -> int:
        try:
            return stored_job_bytes(job_store, job_id, settings.device)
        except NotFound:
            return 0  # the job is gone; run_job drops the delivery

    generator = None

    # Only a generate worker (solo pool: no fork, so torch is safe in its one
    # process) takes this task. Its Generator lives as long as the process, to
    # keep recently used models loaded. A reply nobody waits for any more is
    # worthless, so the task is acknowledged on receipt and never redelivered.
    @app.task(name=GENERATE_TASK, acks_late=False)
    def generate(request_id: str, **request) -> None:
        nonlocal generator
        import torch

        from gradserve_worker.generate import Generator

        if generator is None:
            torch.set_num_threads(threads)
            generator = Generator(JobStore.from_url(redis_url))
        generator.serve(request_id, **request)

    return app
