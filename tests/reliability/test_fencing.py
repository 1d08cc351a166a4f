"""Attempts, leases and fencing in the job store, against a real redis-server (no server or worker processes).

These pin down the rules the fault tests rely on: one delivery claims an
attempt, a lapsed lease moves the job to the next attempt exactly once, and
whatever the earlier attempt still writes is refused. Last, how the fenced
checkpoint writes keep the latest and the best checkpoint.
"""

from __future__ import annotations

import time

import pytest

from gradserve.v1 import jobs_pb2
from gradserve_store import store
from gradserve_server.reaper import reap

LEASE_S = 0.3


@pytest.fixture(scope="module")
def redis_url(make_stack) -> str:
    s = make_stack("fencing")
    s.start_redis()
    return s.redis_url


@pytest.fixture
def job_store(redis_url):
    s = store.JobStore.from_url(redis_url)
    yield s
    s.r.close()


def new_job(job_store: store.JobStore) -> str:
    job_id = store.new_job_id()
    job_store.create_job(job_id, jobs_pb2.JobSpec(dataset="ds-x"), "cpu")
    return job_id


def metrics(step: int) -> jobs_pb2.Event:
    return jobs_pb2.Event(metrics=jobs_pb2.Metrics(step=step))


def lapse(job_store: store.JobStore, job_id: str) -> None:
    deadline = time.monotonic() + 10
    while job_id not in job_store.expired_leases():
        assert time.monotonic() < deadline, "the lease never lapsed"
        time.sleep(0.05)


def statuses(job_store: store.JobStore, job_id: str) -> list[jobs_pb2.StatusChange]:
    return [e.status for e in job_store.events_after(job_id) if e.WhichOneof("kind") == "status"]


def test_one_delivery_claims_an_attempt_and_a_duplicate_is_refused(job_store):
    job_id = new_job(job_store)
    lease = job_store.claim(job_id, 1, "w1", LEASE_S)
    assert (lease.attempt, lease.checkpoint_step) == (1, 0)
    with pytest.raises(store.Refused):
        job_store.claim(job_id, 1, "w2", LEASE_S)
    with pytest.raises(store.Refused):
        job_store.claim(job_id, 0, "w2", LEASE_S)  # a task sent by name without an attempt
    job = job_store.get_job(job_id)
    assert (job.state, job.attempt, job.worker) == (jobs_pb2.RUNNING, 1, "w1")
    assert [s.state for s in statuses(job_store, job_id)] == [jobs_pb2.QUEUED, jobs_pb2.RUNNING]


def test_a_lapsed_lease_moves_the_job_to_the_next_attempt_and_fences_off_the_old_one(job_store):
    job_id = new_job(job_store)
    old = job_store.claim(job_id, 1, "w1", LEASE_S)
    assert job_store.append_event(old, metrics(10))
    assert job_store.put_checkpoint(old, 10, b"ten")
    assert job_store.append_event(old, metrics(20))
    lapse(job_store, job_id)

    assert reap(job_store, job_id, max_attempts=3) == (
        jobs_pb2.QUEUED, "worker w1 lost at step 20 (its lease expired); attempt 2 resumes from step 10"
    )
    assert reap(job_store, job_id, max_attempts=3) is None, "reaped twice"
    with pytest.raises(store.Fenced):
        job_store.claim(job_id, 1, "w2", LEASE_S)  # the task of attempt 1, delivered again
    new = job_store.claim(job_id, 2, "w2", LEASE_S * 10)
    assert (new.attempt, new.checkpoint_step) == (2, 10)

    for write in (lambda: job_store.append_event(old, metrics(30)), lambda: job_store.put_checkpoint(old, 30, b"x"),
                  lambda: job_store.finish(old, jobs_pb2.SUCCEEDED), lambda: job_store.hand_back(old, 30, "bye")):
        with pytest.raises(store.Fenced):
            write()
    assert not job_store.renew(old, LEASE_S)
    assert job_store.get_checkpoint(job_id) == (10, b"ten")

    running = statuses(job_store, job_id)[-1]
    assert (running.state, running.attempt, running.resumed_from_step) == (jobs_pb2.RUNNING, 2, 10)
    assert running.reason == "attempt 2, resumed from step 10"


def test_a_resumed_attempt_does_not_repeat_the_steps_its_predecessor_reported(job_store):
    job_id = new_job(job_store)
    old = job_store.claim(job_id, 1, "w1", LEASE_S)
    job_store.put_checkpoint(old, 10, b"ten")
    for step in (10, 20, 30):
        job_store.append_event(old, metrics(step))
    lapse(job_store, job_id)
    reap(job_store, job_id, max_attempts=3)
    new = job_store.claim(job_id, 2, "w2", 10)

    reported = [step for step in (20, 30, 40) if job_store.append_event(new, metrics(step))]
    assert not job_store.put_checkpoint(new, 10, b"ten again")

    assert reported == [40]
    steps = [e.metrics.step for e in job_store.events_after(job_id) if e.WhichOneof("kind") == "metrics"]
    assert steps == [10, 20, 30, 40]
    assert job_store.get_job(job_id).last_step == 40


def test_a_renewed_lease_does_not_lapse(job_store):
    job_id = new_job(job_store)
    lease = job_store.claim(job_id, 1, "w1", LEASE_S)
    for _ in range(4):
        time.sleep(LEASE_S / 3)
        assert job_store.renew(lease, LEASE_S)
    assert job_id not in job_store.expired_leases()


def test_of_two_reapers_exactly_one_takes_the_job(job_store, redis_url):
    others = [store.JobStore.from_url(redis_url) for _ in range(3)]
    job_id = new_job(job_store)
    job_store.claim(job_id, 1, "w1", LEASE_S)
    lapse(job_store, job_id)
    outcomes = [reap(s, job_id, max_attempts=3) for s in [job_store, *others]]
    assert sum(o is not None for o in outcomes) == 1
    assert job_store.get_job(job_id).attempt == 2
    for s in others:
        s.r.close()


def test_a_job_fails_once_max_attempts_workers_were_lost(job_store):
    job_id = new_job(job_store)
    for attempt in (1, 2):
        lease = job_store.claim(job_id, attempt, f"w{attempt}", LEASE_S)
        job_store.append_event(lease, metrics(10 * attempt))
        lapse(job_store, job_id)
        outcome = reap(job_store, job_id, max_attempts=2)
    assert outcome == (jobs_pb2.FAILED, "worker lost 2 times; last at step 20")
    job = job_store.get_job(job_id)
    assert (job.state, job.reason, job.attempt) == (jobs_pb2.FAILED, "worker lost 2 times; last at step 20", 2)
    assert job_id not in job_store.expired_leases()


def test_a_cancel_waiting_for_a_lost_worker_ends_the_job_cancelled(job_store):
    job_id = new_job(job_store)
    job_store.claim(job_id, 1, "w1", LEASE_S)
    assert job_store.request_cancel(job_id).state == jobs_pb2.RUNNING
    lapse(job_store, job_id)
    state, reason = reap(job_store, job_id, max_attempts=3)
    assert state == jobs_pb2.CANCELLED and "lost" in reason


def test_a_handed_back_job_is_the_next_attempt_unless_a_cancel_came_first(job_store):
    job_id = new_job(job_store)
    lease = job_store.claim(job_id, 1, "w1", 10)
    job_store.put_checkpoint(lease, 7, b"seven")
    assert job_store.hand_back(lease, 7, "shutting down") == 2
    handed = statuses(job_store, job_id)[-1]
    assert (handed.state, handed.attempt, handed.step) == (jobs_pb2.QUEUED, 2, 7)
    assert job_id not in job_store.expired_leases()

    lease = job_store.claim(job_id, 2, "w2", 10)
    assert lease.checkpoint_step == 7
    job_store.request_cancel(job_id)
    assert job_store.hand_back(lease, 8, "shutting down") == 0
    job_store.finish(lease, jobs_pb2.CANCELLED, reason="cancelled by request at step 8", step=8)
    job_store.finish(lease, jobs_pb2.CANCELLED, reason="cancelled by request at step 8", step=8)  # a retry is a no-op
    assert job_store.get_job(job_id).state == jobs_pb2.CANCELLED


def test_the_dispatch_outbox_resends_only_what_nobody_confirmed_and_to_one_caller(job_store, redis_url):
    sent = new_job(job_store)
    job_store.dispatched(sent, 1)
    unsent = new_job(job_store)
    assert sent not in [d[0] for d in job_store.due_dispatches()]
    assert unsent not in [d[0] for d in job_store.due_dispatches()], "due before its sender had time to send it"

    # A server that died between recording the job and sending its task: the entry comes due.
    job_store.r.zadd(store.DISPATCH_KEY, {unsent: 0})
    other = store.JobStore.from_url(redis_url)
    first, second = job_store.due_dispatches(), other.due_dispatches()
    other.r.close()
    assert (unsent, 1, "cpu") in first and unsent not in [d[0] for d in second]

    lease = job_store.claim(unsent, 1, "w1", 10)
    job_store.hand_back(lease, 0, "shutting down")
    job_store.dispatched(unsent, 1)  # a late confirmation for the earlier attempt leaves the new one in
    assert job_store.r.zscore(store.DISPATCH_KEY, unsent) is not None


def test_a_claim_that_redis_forgot_is_recognised(job_store):
    job_id = new_job(job_store)
    lease = job_store.claim(job_id, 1, "w1", 10)
    assert not job_store.unclaimed(lease)
    # What a Redis restarted from an AOF cut off before the claim holds.
    job_store.r.hset(store.job_key(job_id), "state", jobs_pb2.QUEUED)
    assert job_store.unclaimed(lease)
    with pytest.raises(store.Fenced):
        job_store.append_event(lease, metrics(10))
    job_store.claim(job_id, 1, "w2", 10)
    assert not job_store.unclaimed(lease)


# ------------------------------------------------------------ the latest and best checkpoints

def running_job(job_store: store.JobStore) -> tuple[str, store.Lease]:
    job_id = new_job(job_store)
    return job_id, job_store.claim(job_id, 1, "w@test", 60)


def saved(job_store: store.JobStore, job_id: str) -> list[tuple[int, bool, bool]]:
    return [(e.checkpoint.step, e.checkpoint.best, e.checkpoint.also_latest)
            for e in job_store.events_after(job_id) if e.HasField("checkpoint")]


def test_a_save_that_is_latest_and_best_is_stored_once_with_one_event(job_store):
    job_id, lease = running_job(job_store)
    assert job_store.put_latest_and_best_checkpoint(lease, 100, 2.0, b"hundred")
    assert saved(job_store, job_id) == [(100, True, True)]
    assert job_store.get_checkpoint(job_id, "latest") == job_store.get_checkpoint(job_id, "best") == (100, b"hundred")
    assert job_store.get_checkpoint(job_id, "100") == (100, b"hundred")
    assert job_store.r.hget(store.best_checkpoint_key(job_id), "data") is None, "the bytes are stored twice"

    # A newer latest checkpoint leaves the best one its bytes.
    assert job_store.put_checkpoint(lease, 200, b"two hundred")
    assert job_store.get_checkpoint(job_id, "best") == (100, b"hundred")
    assert job_store.get_checkpoint(job_id, "latest") == (200, b"two hundred")
    assert job_store.put_checkpoint(lease, 300, b"three hundred")
    assert job_store.get_checkpoint(job_id, "best") == (100, b"hundred")
    assert saved(job_store, job_id) == [(100, True, True), (200, False, False), (300, False, False)]


def test_each_part_of_a_latest_and_best_save_is_kept_only_when_it_is_new(job_store):
    job_id, lease = running_job(job_store)
    job_store.put_latest_and_best_checkpoint(lease, 100, 2.0, b"hundred")
    job_store.put_checkpoint(lease, 200, b"two hundred")
    # Saved again (a resumed attempt): nothing is new, nothing changes.
    assert not job_store.put_latest_and_best_checkpoint(lease, 100, 2.0, b"hundred again")
    # Not newer than the latest, but better than the best: the best alone, with its own bytes.
    assert job_store.put_latest_and_best_checkpoint(lease, 150, 1.0, b"one fifty")
    assert job_store.get_checkpoint(job_id, "best") == (150, b"one fifty")
    assert job_store.get_checkpoint(job_id, "latest") == (200, b"two hundred")
    # Newer than the latest, not better than the best: the latest alone.
    assert job_store.put_latest_and_best_checkpoint(lease, 300, 1.5, b"three hundred")
    assert job_store.get_checkpoint(job_id, "best") == (150, b"one fifty")
    assert job_store.get_checkpoint(job_id, "latest") == (300, b"three hundred")
    assert saved(job_store, job_id) == [(100, True, True), (200, False, False), (150, True, False), (300, False, False)]


def test_a_best_checkpoint_alone_replaces_a_shared_one(job_store):
    job_id, lease = running_job(job_store)
    job_store.put_latest_and_best_checkpoint(lease, 100, 2.0, b"hundred")
    assert job_store.put_best_checkpoint(lease, 150, 1.0, b"one fifty")
    assert job_store.get_checkpoint(job_id, "best") == (150, b"one fifty")
    assert job_store.get_checkpoint(job_id, "latest") == (100, b"hundred")
    job_store.put_checkpoint(lease, 200, b"two hundred")
    assert job_store.get_checkpoint(job_id, "best") == (150, b"one fifty")


def test_a_delivery_that_cannot_claim_takes_back_its_advertisement_unless_the_job_runs_on_its_worker(job_store):
    from gradserve_worker.runner import _advertise, _withdraw_unclaimed

    job_id, _ = running_job(job_store)  # RUNNING on w@test
    advertised = lambda name: {k.decode() for k in job_store.r.hkeys(store.worker_key(name))}
    for name in ("w@test", "other@test"):
        _advertise(job_store, name, [job_id])
        # A second delivery of the task, refused: on the worker running the job, and on another.
        with pytest.raises(store.Refused):
            job_store.claim(job_id, 1, name, 60)
        _withdraw_unclaimed(job_store, name, job_id)
    assert advertised("w@test") == {store._JOB_FIELD + job_id}
    assert advertised("other@test") == set()
