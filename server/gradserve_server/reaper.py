"""The server's reaper: gives the jobs of dead workers to new attempts, and sends tasks nobody sent.

Every `interval` seconds it
- takes each RUNNING job whose lease expired (its worker stopped renewing it:
  killed, frozen, cut off) away from that attempt: queued again as the next
  attempt, which resumes from the checkpoint, or FAILED after `max_attempts`
  lost workers, or CANCELLED when a cancel was waiting for it;
- sends the train task of every job in the dispatch outbox that is due: just
  reaped, handed back by a worker whose own send failed, submitted by a
  server that died before it sent the task, or still QUEUED when Redis
  restarted (its task may have been lost with a worker's connection);
- with a retention period, deletes the jobs that ended longer ago than
  that: record, events and checkpoint, as DeleteJob does.

Any number of servers may run one: each job is taken by one atomic script, so
two reapers never both re-dispatch it.
"""

from __future__ import annotations

import asyncio
import logging
import time

import redis

from gradserve.v1 import jobs_pb2
from gradserve_store.queue import dispatch, make_celery
from gradserve_store.settings import Shared
from gradserve_store.store import JobStore, NotFound, Refused

log = logging.getLogger("gradserve.reaper")

DEFAULT_INTERVAL_S = 2.0
DEFAULT_MAX_ATTEMPTS = 3
# Jobs deleted for retention in one pass at most, so that a first pass over a
# long history does not hold up the reaping in the same loop.
RETENTION_BATCH = 1000


def reap(job_store: JobStore, job_id: str, max_attempts: int) -> tuple[int, str] | None:
    """Take a job away from an attempt whose lease expired (its worker is presumed dead).

    The job is queued again as the next attempt, to resume from its
    checkpoint; or it FAILS once `max_attempts` workers were lost running it;
    or it is CANCELLED when a cancel was waiting for the lost worker. Returns
    (new state, reason), or None when there was nothing to do: the lease was
    renewed meanwhile, or another server reaped it first.
    """
    lost = job_store.lost_attempt(job_id)
    if lost is None or lost.state != jobs_pb2.RUNNING:
        return None
    who, step, losses = lost.worker or "?", lost.last_step, lost.losses + 1
    if lost.cancel_requested:
        state, reason = jobs_pb2.CANCELLED, f"cancelled by request; its worker {who} was lost at step {step}"
    elif losses >= max_attempts:
        state, reason = jobs_pb2.FAILED, f"worker lost {losses} times; last at step {step}"
    else:
        resume = (f"resumes from step {lost.checkpoint_step}" if lost.checkpoint_step
                  else "starts over: there is no checkpoint")
        state = jobs_pb2.QUEUED
        reason = f"worker {who} lost at step {step} (its lease expired); attempt {lost.attempt + 1} {resume}"
    return (state, reason) if job_store.end_lost_attempt(lost, state, reason) else None


class Reaper:
    def __init__(self, redis_url: str, *, shared: Shared = Shared(), max_attempts: int = DEFAULT_MAX_ATTEMPTS,
                 interval: float = DEFAULT_INTERVAL_S, retain_s: float = 0.0):
        self.store = JobStore.from_url(redis_url)
        self.celery = make_celery(redis_url, shared.visibility_timeout_s)
        self.max_attempts = max_attempts
        self.interval = interval
        self.retain_s = retain_s  # 0: keep ended jobs for ever
        # After an outage, leases may have lapsed while no worker could renew them: give them one lease's length.
        self.outage_grace = shared.lease_ttl_s
        self._redis_run_id = ""
        self._lost_redis = False
        self._reap_after_ms = 0

    def close(self) -> None:
        self.store.close()

    def tick(self) -> None:
        """One pass: reap expired leases, then send the due tasks of the outbox."""
        run_id = self.store.run_id()
        restarted = self._redis_run_id not in ("", run_id)
        if self._lost_redis or restarted:
            # Redis was out of reach, or restarted between two passes: leases may
            # have lapsed while no worker could renew them, so give them a lease's length.
            log.warning("redis is back; reaping resumes in %.0f s", self.outage_grace)
            self._reap_after_ms = self.store.now_ms() + int(self.outage_grace * 1000)
        if restarted:
            resent = self.store.redispatch_queued()
            log.warning("redis restarted: sending the tasks of its %d queued jobs again", resent)
        self._redis_run_id, self._lost_redis = run_id, False
        if self.store.now_ms() >= self._reap_after_ms:
            for job_id in self.store.expired_leases():
                outcome = reap(self.store, job_id, self.max_attempts)
                if outcome:
                    state, reason = outcome
                    log.warning("job %s %s: %s", job_id, jobs_pb2.JobState.Name(state), reason)
        for job_id, attempt, queue in self.store.due_dispatches():
            log.info("sending job %s attempt %d to queue %s", job_id, attempt, queue)
            dispatch(self.celery, self.store, job_id, attempt, queue)
        if self.retain_s:
            self.delete_expired(time.time() - self.retain_s)

    def delete_expired(self, cutoff: float) -> int:
        """Delete the jobs that ended before `cutoff` (at most a pass's worth); returns how many went."""
        deleted = 0
        for job_id in self.store.ended_before(cutoff, RETENTION_BATCH):
            try:
                self.store.delete_job(job_id)
                deleted += 1
            except (NotFound, Refused):  # deleted by another server, or queued again meanwhile
                pass
        if deleted:
            log.info("deleted %d jobs that ended over %s ago (--retain-days)", deleted,
                     f"{self.retain_s / 86400:g} days")
        return deleted

    async def run(self) -> None:
        """Tick every `interval` seconds until cancelled; Redis being away only skips ticks."""
        while True:
            try:
                await asyncio.to_thread(self.tick)
            except (redis.ConnectionError, redis.TimeoutError) as e:
                if not self._lost_redis:
                    log.warning("reaper cannot reach redis (%s); retrying every %.1f s", e, self.interval)
                self._lost_redis = True
            except Exception:
                log.exception("reaper pass failed; retrying")
            await asyncio.sleep(self.interval)
