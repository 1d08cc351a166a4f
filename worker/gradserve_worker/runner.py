"""One attempt of a job on a worker: the glue between the job store and the trainer.

The Celery task calls `run_job`; the trainer never sees Redis. The runner
claims the attempt the task was sent for, holds the job's lease from a thread
that renews it, resumes from the checkpoint an earlier attempt left, and turns
the trainer's reports into fenced writes: events in the job's stream,
checkpoints. `should_stop` stops the trainer for a cancel, for the worker's
shutdown (the job is then handed back to the queue, to continue elsewhere from
the checkpoint written as it stopped), or when the lease is lost to a later
attempt. Writes retry through a Redis outage for a bounded time rather than
fail the job.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import threading
import time
from collections.abc import Callable

import redis

from gradserve.spec import SYNTHETIC_TASKS
from gradserve.summary import add as add_to_summary
from gradserve.v1 import jobs_pb2
from gradserve_store.store import Fenced, JobStore, Lease, NotFound, Refused
from gradserve_worker import hooks
from gradserve_worker.earlystop import EarlyStop
from gradserve_worker.errors import CannotTrain
from gradserve_worker.events import to_event
from gradserve_worker.joblog import job_log
from gradserve_worker.trainer import (CheckpointReady, Evaluation, StepMetrics, TrainConfig, TrainingDiverged,
                                      TrainResult, train)

log = logging.getLogger("gradserve.worker")

# How often a running job asks Redis whether it was cancelled: often enough
# that a cancel lands within about a second, rarely enough to cost nothing.
CANCEL_POLL_S = 0.5
_UNREACHABLE = (redis.ConnectionError, redis.TimeoutError)


def _retrying(retry_s: float, call, *args, **kwargs):
    """call(*args, **kwargs), tried again while Redis is unreachable, for up to `retry_s` seconds.

    The store's writes are idempotent (a step already in the stream is
    skipped; a finish finds its own work done), so a write whose reply was
    lost can be sent again.
    """
    deadline = time.monotonic() + retry_s
    delay = 0.2
    while True:
        try:
            return call(*args, **kwargs)
        except _UNREACHABLE as e:
            if time.monotonic() + delay > deadline:
                raise
            log.warning("redis unreachable (%s); trying again in %.1f s", e, delay)
            time.sleep(delay)
            delay = min(delay * 2, 2.0)


class _CancelPoll:
    def __init__(self, job_store: JobStore, job_id: str):
        self.store, self.job_id, self.next_check = job_store, job_id, 0.0
        self.requested = False

    def __call__(self) -> bool:
        now = time.monotonic()
        if self.requested or now < self.next_check:
            return self.requested
        self.next_check = now + CANCEL_POLL_S
        try:
            self.requested = self.store.cancel_requested(self.job_id)
        except _UNREACHABLE:
            pass  # Redis is away; ask again at the next poll
        return self.requested


class LeaseKeeper:
    """Renews a running attempt's lease from a thread of its own, so that a slow step cannot let it lapse.

    `lost` is set once the attempt no longer owns the job (the lease lapsed
    and the job went to a later attempt); the trainer then stops at its next
    step, and every write it tries meanwhile is fenced off anyway.
    """

    def __init__(self, job_store: JobStore, lease: Lease, ttl_s: float):
        self.store, self.lease, self.ttl_s = job_store, lease, ttl_s
        self.lost = threading.Event()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"lease-{lease.job_id}", daemon=True)

    def start(self) -> "LeaseKeeper":
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=self.ttl_s)

    def _run(self) -> None:
        while not self._stop.wait(self.ttl_s / 3):
            try:
                if not self.store.renew(self.lease, self.ttl_s):
                    log.warning("job %s: attempt %d lost its lease; stopping", self.lease.job_id, self.lease.attempt)
                    self.lost.set()
                    return
            except _UNREACHABLE as e:
                # Keep trying: if Redis is back before the lease lapses, nothing was lost.
                log.warning("job %s: cannot renew the lease (%s)", self.lease.job_id, e)


def run_job(job_store: JobStore, job_id: str, worker: str, *, attempt: int = 0,
            shutdown: threading.Event | None = None,
            requeue: Callable[[str, int, str], None] | None = None,
            lease_ttl_s: float, redis_retry_s: float) -> None:
    """Run `attempt` of `job_id` (0: the current one) until the job ends, is handed back, or is lost.

    A delivery for a job that is not QUEUED at that attempt is dropped: a
    duplicate, a task requeued after its worker died, a cancelled job.
    `shutdown`, once set, makes the attempt checkpoint and hand the job back;
    `requeue(job_id, attempt, queue)` then sends the next attempt's task (if
    it fails, or is not given, a server's reaper sends it from the outbox).
    `lease_ttl_s` must be the servers' too (settings.Shared); writes retry
    through a Redis outage for up to `redis_retry_s`.
    """
    retrying = functools.partial(_retrying, redis_retry_s)
    _advertise(job_store, worker, [job_id])
    try:
        lease = retrying(job_store.claim, job_id, attempt, worker, lease_ttl_s)
    except (NotFound, Refused, Fenced) as e:
        log.info("dropping this delivery of %s: %s", job_id, e)
        _withdraw_unclaimed(job_store, worker, job_id)
        return
    keeper = LeaseKeeper(job_store, lease, lease_ttl_s).start()
    fenced = False
    try:
        with job_log(job_store, lease):
            if lease.attempt > 1:
                log.info("job %s: attempt %d on worker %s, resuming from step %d", job_id, lease.attempt, worker,
                         lease.checkpoint_step)
            else:
                log.info("job %s: attempt 1 on worker %s", job_id, worker)
            _run_attempt(job_store, lease, keeper, shutdown or threading.Event(), requeue, retrying)
    except Fenced as e:
        log.warning("stopping: %s", e)
        fenced = True
    except _UNREACHABLE as e:
        log.error("job %s: redis unreachable for too long (%s); its lease will lapse and the reaper will queue "
                  "it again", job_id, e)
    finally:
        keeper.stop()
        _advertise(job_store, worker, [job_id], running=False)
    if (fenced or keeper.lost.is_set()) and requeue is not None:
        _requeue_if_unclaimed(job_store, lease, requeue)


def _requeue_if_unclaimed(job_store: JobStore, lease: Lease, requeue: Callable[[str, int, str], None]) -> None:
    """Send the attempt's task again when Redis forgot the claim, so that the job cannot be stranded.

    A Redis restarted from an AOF that ends between this attempt's delivery
    and its claim holds the job QUEUED at this very attempt, with its task
    consumed: nothing would ever start it again.
    """
    try:
        if job_store.unclaimed(lease):
            log.warning("job %s: redis lost the claim of attempt %d; sending it again", lease.job_id, lease.attempt)
            requeue(lease.job_id, lease.attempt, lease.queue)
    except Exception as e:
        log.warning("job %s: could not check or send attempt %d again (%s)", lease.job_id, lease.attempt, e)


class Attempt:
    """One claimed attempt's glue: its reports turned into fenced writes, its reasons to stop, and its end.

    `on_event` and `should_stop` go to the trainer; `prepare` reads what it
    trains on, then `finished` or `failed` records how the attempt ended.
    """

    def __init__(self, job_store: JobStore, lease: Lease, keeper: LeaseKeeper, shutdown: threading.Event,
                 retrying: Callable):
        self.store, self.lease, self.keeper, self.shutdown, self.retrying = (job_store, lease, keeper, shutdown,
                                                                             retrying)
        self.job_id = lease.job_id
        self.cancel = _CancelPoll(job_store, self.job_id)
        self.last_step = lease.checkpoint_step
        # Carried over from earlier attempts: what they trained counts too.
        self.summary = retrying(job_store.summary, self.job_id)
        self.early: EarlyStop | None = None
        self.spec: jobs_pb2.JobSpec | None = None

    def should_stop(self) -> bool:
        return (self.keeper.lost.is_set() or self.shutdown.is_set() or self.cancel()
                or (self.early is not None and self.early()))

    def on_event(self, report) -> None:
        for hook in hooks.report_hooks:
            hook(report)
        # The store skips what the stream already has, which is how a resumed
        # attempt recomputing steps up to where its predecessor died stays silent.
        if isinstance(report, CheckpointReady):
            if report.best_loss is None:
                self.retrying(self.store.put_checkpoint, self.lease, report.step, report.data)
            elif report.latest:
                self.retrying(self.store.put_latest_and_best_checkpoint, self.lease, report.step, report.best_loss,
                              report.data)
            else:
                self.retrying(self.store.put_best_checkpoint, self.lease, report.step, report.best_loss, report.data)
            return
        if isinstance(report, StepMetrics):
            self.last_step = report.step
        if isinstance(report, Evaluation) and self.early is not None:
            self.retrying(self.early.evaluated, report.step, report.loss, report.perplexity)
        event = to_event(report)
        changed = add_to_summary(self.summary, event)
        self.retrying(self.store.append_event, self.lease, event, self.summary if changed else None)

    def end(self, state: int, reason: str = "", step: int | None = None) -> None:
        step = self.last_step if step is None else step
        log.log(logging.INFO if state == jobs_pb2.SUCCEEDED else logging.WARNING, "job %s: %s at step %d%s",
                self.job_id, jobs_pb2.JobState.Name(state), step, f": {reason}" if reason else "")
        self.retrying(self.store.finish, self.lease, state, reason=reason, step=step)

    def prepare(self, texts: dict[str, str] | None = None) -> tuple[TrainConfig, str, dict]:
        """(config, text, train's keywords: resume, or init and its options) for this attempt.

        `texts`, by dataset id, holds texts already read (a group's members share one).
        """
        retrying, job_id = self.retrying, self.job_id
        texts = {} if texts is None else texts
        self.spec = spec = retrying(self.store.spec, job_id)
        config = TrainConfig.from_spec(spec)
        if sweep := retrying(self.store.early_stop_of, job_id):
            self.early = EarlyStop(self.store, job_id, *sweep, spec)
        if spec.dataset in SYNTHETIC_TASKS:
            text = ""  # the trainer generates these sequences from the seed
        else:
            dataset_id = retrying(self.store.resolve_dataset, spec.dataset)
            if dataset_id not in texts:
                texts[dataset_id] = retrying(self.store.dataset_text, dataset_id)
            text = texts[dataset_id]
        if self.lease.checkpoint_step:
            return config, text, {"resume": retrying(self.store.get_checkpoint, job_id)[1]}
        start_from = retrying(self.store.get_init, job_id)
        if start_from is None:
            return config, text, {}
        asked, data = start_from
        log.info("job %s: starting from step %d of job %s (weights%s%s)", job_id, asked.step, asked.job_id,
                 ", optimizer state" if asked.optimizer else "", ", hidden state" if asked.state else "")
        return config, text, {"init": data, "init_optimizer": asked.optimizer, "init_state": asked.state}

    def failed(self, e: Exception) -> None:
        """Record the attempt's end by an exception from prepare or the trainer; re-raises what is not the job's."""
        if isinstance(e, (Fenced, *_UNREACHABLE)):
            raise e
        if isinstance(e, TrainingDiverged):
            # The step it diverged at, which its reason names too; no metrics event may have reported it yet.
            self.end(jobs_pb2.FAILED, str(e), step=e.step)
        elif isinstance(e, CannotTrain):
            self.end(jobs_pb2.FAILED, str(e))  # written for the job's owner: too little text, no GPU, ...
        elif isinstance(e, NotFound):
            self.end(jobs_pb2.FAILED, f"dataset {e.args[0]} is gone from the store")
        else:
            log.error("job %s crashed", self.job_id, exc_info=e)
            self.end(jobs_pb2.FAILED, f"the worker hit an internal error: {type(e).__name__}: {e}")

    def finished(self, result: TrainResult, requeue: Callable[[str, int, str], None] | None) -> None:
        """Record how a run that returned ended: done, cancelled, stopped early, lost, or handed back."""
        if not result.stopped:
            self.end(jobs_pb2.SUCCEEDED)
        elif self.cancel.requested:
            self.end(jobs_pb2.CANCELLED, f"cancelled by request at step {result.steps}")
        elif self.early is not None and self.early.reason:
            # It trained as asked up to here, and keeps its checkpoint: a result, just a shorter one.
            self.end(jobs_pb2.SUCCEEDED, self.early.reason)
        elif self.keeper.lost.is_set():
            log.warning("job %s: stopped at step %d without its lease", self.job_id, result.steps)
        else:
            _hand_back(self.store, self.lease, result.steps, requeue, self.end, self.retrying)


def _run_attempt(job_store: JobStore, lease: Lease, keeper: LeaseKeeper, shutdown: threading.Event,
                 requeue: Callable[[str, int, str], None] | None, retrying: Callable) -> None:
    attempt = Attempt(job_store, lease, keeper, shutdown, retrying)
    try:
        config, text, start = attempt.prepare()
        result = train(config, text, attempt.on_event, should_stop=attempt.should_stop, **start)
    except Exception as e:
        attempt.failed(e)
    else:
        attempt.finished(result, requeue)


def run_group(job_store: JobStore, job_ids: list[str], worker: str, *, shutdown: threading.Event | None = None,
              requeue: Callable[[str, int, str], None] | None = None, lease_ttl_s: float,
              redis_retry_s: float) -> None:
    """Run the first attempts of a sweep's members that share shapes and data as one batched model (group.py).

    Each member is claimed, leased, fenced, logged and ended as run_job does
    for a job; a member that cannot be claimed (cancelled, or taken by another
    delivery) is left out. A member that starts from another job's checkpoint,
    or a group the trainer refuses (group.train_group's CannotTrain), trains
    alone, one after another. After a worker's death each member resumes on
    its own, as a job, from its own checkpoint.
    """
    from gradserve_worker.group import train_group  # torch, which the prefork parent never imports

    retrying = functools.partial(_retrying, redis_retry_s)
    shutdown = shutdown or threading.Event()
    leases = []
    _advertise(job_store, worker, job_ids)
    for job_id in job_ids:
        try:
            leases.append(retrying(job_store.claim, job_id, 1, worker, lease_ttl_s))
        except (NotFound, Refused, Fenced) as e:
            log.info("leaving %s out of its group: %s", job_id, e)
            _withdraw_unclaimed(job_store, worker, job_id)
    keepers = [LeaseKeeper(job_store, lease, lease_ttl_s).start() for lease in leases]
    try:
        with contextlib.ExitStack() as logs:
            for lease in leases:
                logs.enter_context(job_log(job_store, lease))
            attempts = [Attempt(job_store, lease, keeper, shutdown, retrying) for lease, keeper in zip(leases, keepers)]
            _run_group(attempts, train_group, requeue)
    except _UNREACHABLE as e:
        log.error("group %s: redis unreachable for too long (%s); their leases will lapse and the reaper will queue "
                  "each again", " ".join(job_ids), e)
    finally:
        for keeper in keepers:
            keeper.stop()
        _advertise(job_store, worker, [lease.job_id for lease in leases], running=False)
    if requeue is not None:
        for lease, keeper in zip(leases, keepers):
            if keeper.lost.is_set():
                _requeue_if_unclaimed(job_store, lease, requeue)


def _advertise(job_store: JobStore, worker: str, job_ids: list[str], running: bool = True) -> None:
    """Say in the worker's advertisement that it runs these jobs, or no longer does; a Redis outage only skips it
    (the heartbeat says it again from the memory ledger).

    A worker advertises a job before it claims it, so that nobody sees the job
    RUNNING on a worker that does not list it yet; a claim that fails takes it
    back (_withdraw_unclaimed).
    """
    for job_id in job_ids:
        with contextlib.suppress(redis.RedisError):
            job_store.set_worker_job(worker, job_id, running)


def _withdraw_unclaimed(job_store: JobStore, worker: str, job_id: str) -> None:
    """Take back the advertisement of a job this delivery could not claim, unless the job runs on this worker
    all the same (a second delivery of its task reached the worker running it)."""
    with contextlib.suppress(redis.RedisError, NotFound):
        job = job_store.get_job(job_id)
        if job.state == jobs_pb2.RUNNING and job.worker == worker:
            return
    _advertise(job_store, worker, [job_id], running=False)


def _run_group(attempts: list[Attempt], train_group: Callable, requeue: Callable | None) -> None:
    texts: dict[str, str] = {}
    ready = []
    for attempt in attempts:
        try:
            ready.append((attempt, *attempt.prepare(texts)))
        except Fenced as e:
            log.warning("job %s: %s", attempt.job_id, e)
        except Exception as e:
            attempt.failed(e)
    together = [r for r in ready if "init" not in r[3]]
    resumes = [r[3].get("resume") for r in together]
    if None in resumes and any(resumes):
        together = []  # only some have checkpoints to resume from: each goes on alone
    if len(together) > 1:
        log.info("training %d members as one group: %s", len(together), " ".join(r[0].job_id for r in together))
        members = [r[0] for r in together]

        def on_event(i: int, report) -> None:
            try:
                members[i].on_event(report)
            except Fenced as e:
                # This member is another attempt's now; the rest of the group goes on without it.
                log.warning("job %s: %s", members[i].job_id, e)
                members[i].keeper.lost.set()

        try:
            outcomes = train_group([r[1] for r in together], together[0][2], on_event,
                                   should_stop=lambda i: members[i].should_stop(),
                                   resume=resumes if all(resumes) else None)
        except CannotTrain as e:
            log.warning("cannot train these members as one group (%s); training each alone", e)
        else:
            for attempt, outcome in zip(members, outcomes):
                try:
                    if outcome.diverged is not None:
                        attempt.failed(outcome.diverged)
                    else:
                        attempt.finished(outcome.result, requeue)
                except Fenced as e:
                    log.warning("job %s: %s", attempt.job_id, e)
            ready = [r for r in ready if r[0] not in members]
    for attempt, config, text, start in ready:
        try:
            result = train(config, text, attempt.on_event, should_stop=attempt.should_stop, **start)
        except Fenced as e:
            log.warning("job %s: %s", attempt.job_id, e)
        except Exception as e:
            attempt.failed(e)
        else:
            attempt.finished(result, requeue)


def _hand_back(job_store: JobStore, lease: Lease, step: int, requeue: Callable[[str, int, str], None] | None,
               end: Callable[..., None], retrying: Callable) -> None:
    """The worker is shutting down: queue the job again, to resume from the checkpoint just written at `step`."""
    reason = f"worker {lease.worker} is shutting down: handed back at step {step}, to resume from its checkpoint there"
    after = retrying(job_store.hand_back, lease, step, reason)
    if not after:
        end(jobs_pb2.CANCELLED, f"cancelled by request at step {step}")
        return
    log.info("job %s: handed back at step %d as attempt %d", lease.job_id, step, after)
    if requeue is None:
        return
    try:
        requeue(lease.job_id, after, lease.queue)
    except Exception as e:
        log.warning("job %s: could not send attempt %d (%s); a server's reaper will", lease.job_id, after, e)
