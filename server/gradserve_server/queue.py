"""The Celery application as both sides configure it.

The server only enqueues, by task name, so it never imports the worker's code
(or torch). The worker imports this module and registers the task under the
same name.
"""

from __future__ import annotations

import os

from celery import Celery

TRAIN_TASK = "gradserve.train"
QUEUES = ("cpu", "gpu")

# Redis hands an unacknowledged task to another worker once this many seconds
# have passed since delivery. A job must never outlive it, or it would run
# twice, so the default is far above any job we expect (one week).
DEFAULT_VISIBILITY_TIMEOUT_S = 7 * 24 * 3600


def make_celery(redis_url: str) -> Celery:
    app = Celery("gradserve", broker=redis_url)
    visibility = int(os.environ.get("GRADSERVE_VISIBILITY_TIMEOUT_S", DEFAULT_VISIBILITY_TIMEOUT_S))
    app.conf.update(
        task_serializer="json",
        accept_content=["json"],
        result_serializer="json",
        task_ignore_result=True,
        # A task is acknowledged only when it finishes, and a worker holds one
        # task at a time, so a worker that dies loses no queued work.
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        worker_prefetch_multiplier=1,
        broker_transport_options={"visibility_timeout": visibility},
        broker_connection_retry_on_startup=True,
        task_default_queue="cpu",
        worker_hijack_root_logger=False,
    )
    return app
