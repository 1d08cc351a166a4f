"""The worker's Celery application and its one task.

The task is thin on purpose: it opens the job store and hands over to
`runner.run_job`, which is plain code that tests can call without Celery.
"""

from __future__ import annotations

from celery import Celery

from gradserve_server.queue import TRAIN_TASK, make_celery
from gradserve_server.store import JobStore


def create_app(redis_url: str, threads: int) -> Celery:
    app = make_celery(redis_url)

    @app.task(name=TRAIN_TASK, bind=True)
    def train_job(self, job_id: str) -> None:
        import torch

        # Imported here so that the prefork parent never runs the trainer's module-level torch code.
        from gradserve_worker.runner import run_job

        # Two workers' thread pools on the same cores spin against each other
        # and can run a hundred times slower than either alone.
        torch.set_num_threads(threads)
        job_store = JobStore.from_url(redis_url)
        try:
            run_job(job_store, job_id, worker=self.request.hostname)
        finally:
            job_store.r.close()

    return app
