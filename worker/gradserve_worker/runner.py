"""One job from start to end on a worker: the glue between the job store and the trainer.

The Celery task calls `run_job`; the trainer never sees Redis. Its events
become protobuf events in the job's stream, its checkpoints replace the job's
checkpoint, and a cancel request reaches it through `should_stop`.
"""

from __future__ import annotations

import logging
import time

from gradserve.v1 import jobs_pb2
from gradserve_server.store import JobStore, NotFound, Refused
from gradserve_worker.trainer import CheckpointReady, StepMetrics, TrainConfig, TrainingDiverged, train

log = logging.getLogger("gradserve.worker")

# How often a running job asks Redis whether it was cancelled: often enough
# that a cancel lands within about a second, rarely enough to cost nothing.
CANCEL_POLL_S = 0.5


def metrics_message(m: StepMetrics) -> jobs_pb2.Metrics:
    return jobs_pb2.Metrics(
        step=m.step,
        epoch=m.epoch,
        loss=m.loss,
        perplexity=m.perplexity,
        tokens_per_sec=m.tokens_per_sec,
        lr=m.lr,
        grad_norm=m.grad_norm,
        clipped=m.clipped,
        clip_fraction=m.clip_fraction,
        param_grad_norms=[jobs_pb2.ParamGradNorm(name=k, norm=v) for k, v in m.param_grad_norms.items()],
    )


class _CancelPoll:
    def __init__(self, job_store: JobStore, job_id: str):
        self.store, self.job_id, self.next_check = job_store, job_id, 0.0

    def __call__(self) -> bool:
        now = time.monotonic()
        if now < self.next_check:
            return False
        self.next_check = now + CANCEL_POLL_S
        return self.store.cancel_requested(self.job_id)


def run_job(job_store: JobStore, job_id: str, worker: str) -> None:
    """Train `job_id` to its end state. A job that is no longer QUEUED (cancelled, say) is dropped."""
    try:
        spec = job_store.spec(job_id)
        job_store.transition(job_id, {jobs_pb2.QUEUED}, jobs_pb2.RUNNING, worker=worker)
    except (NotFound, Refused) as e:
        log.info("dropping %s: %s", job_id, e)
        return
    job_store.set_worker_job(worker, job_id)
    last_step = 0

    def on_event(event) -> None:
        nonlocal last_step
        if isinstance(event, StepMetrics):
            last_step = event.step
            job_store.append_metrics(job_id, metrics_message(event))
        elif isinstance(event, CheckpointReady):
            job_store.put_checkpoint(job_id, event.step, event.data)

    def end(state: int, reason: str = "") -> None:
        job_store.transition(job_id, {jobs_pb2.RUNNING}, state, reason=reason, worker=worker, step=last_step)

    try:
        config = TrainConfig.from_spec(spec)
        text = job_store.dataset_text(job_store.resolve_dataset(spec.dataset))
        result = train(config, text, on_event, should_stop=_CancelPoll(job_store, job_id))
    except TrainingDiverged as e:
        end(jobs_pb2.FAILED, str(e))
    except (ValueError, NotFound) as e:
        # The trainer's ValueErrors are written for the user (too little data, no GPU, ...).
        end(jobs_pb2.FAILED, str(e) if isinstance(e, ValueError) else f"dataset {e.args[0]} is gone from the store")
    except Exception as e:
        log.exception("job %s crashed", job_id)
        end(jobs_pb2.FAILED, f"the worker hit an internal error: {type(e).__name__}: {e}")
    else:
        if result.stopped:
            end(jobs_pb2.CANCELLED, f"cancelled by request at step {result.steps}")
        else:
            end(jobs_pb2.SUCCEEDED)
    finally:
        job_store.set_worker_job(worker, "")
