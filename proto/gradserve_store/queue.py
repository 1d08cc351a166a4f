"""The Celery application as both sides configure it.

The server only enqueues, by task name, so it never imports the worker's code
(or torch). The worker imports this module and registers the task under the
same name.

A train task names the job and the attempt it was sent for. Deliveries are
at-least-once (a requeued task, a server that died before recording that it
sent one), and the job store's atomic claim makes the extra ones harmless: a
delivery for a job that is not QUEUED at that attempt is dropped.
"""

from __future__ import annotations

from celery import Celery

from gradserve_store.settings import DEFAULT_VISIBILITY_TIMEOUT_S
from gradserve_store.store import JobStore

TRAIN_TASK = "gradserve.train"
# The first attempts of a sweep's members that train as one batched model, on one worker.
TRAIN_GROUP_TASK = "gradserve.train_group"
# Training queues: a job's device picks one (SubmitJob), and every job record names its own.
CPU_QUEUE, GPU_QUEUE = "cpu", "gpu"
QUEUES = (CPU_QUEUE, GPU_QUEUE)
# Generation has a queue of its own, served by a worker that runs no training:
# a request must never wait behind a training job that takes hours.
GENERATE_TASK = "gradserve.generate"
GENERATE_QUEUE = "generate"



def make_celery(redis_url: str, visibility_timeout_s: int = DEFAULT_VISIBILITY_TIMEOUT_S) -> Celery:
    """The app; Redis hands a task unacknowledged for `visibility_timeout_s` to another worker (settings.Shared)."""
    app = Celery("gradserve", broker=redis_url)
    app.conf.update(
        task_serializer="json",
        accept_content=["json"],
        result_serializer="json",
        task_ignore_result=True,
        # A task is acknowledged only when it finishes, and a worker holds one
        # task at a time, so a worker that dies loses no queued work.
        task_acks_late=True,
        # A pool child that dies puts its task back at once; the delivery that
        # follows is dropped while the job's lease stands, and the reaper
        # queues the next attempt once it lapses.
        task_reject_on_worker_lost=True,
        # A broker connection lost and regained says nothing about the job:
        # its lease in Redis decides whether it lives on, so the task runs on.
        worker_cancel_long_running_tasks_on_connection_loss=False,
        worker_prefetch_multiplier=1,
        broker_transport_options={"visibility_timeout": visibility_timeout_s},
        broker_connection_retry_on_startup=True,
        task_default_queue=CPU_QUEUE,
        worker_hijack_root_logger=False,
    )
    return app


def dispatch(celery: Celery, job_store: JobStore, job_id: str, attempt: int, queue: str) -> None:
    """Send the train task for this attempt of the job, then take the job out of the dispatch outbox."""
    celery.send_task(TRAIN_TASK, args=[job_id], kwargs={"attempt": attempt}, queue=queue)
    job_store.dispatched(job_id, attempt)


def dispatch_group(celery: Celery, job_store: JobStore, job_ids: list[str], queue: str) -> None:
    """Send one task for the first attempts of several jobs that train together, then take each out of the outbox.

    Until then each is in the outbox as a job of its own: if this send is lost, a
    server's reaper sends each its own train task, and they train apart.
    """
    celery.send_task(TRAIN_GROUP_TASK, args=[job_ids], queue=queue)
    for job_id in job_ids:
        job_store.dispatched(job_id, 1)
