"""A job's log: what its worker logged while it ran, read back through the real server (`gradserve logs`)."""

from __future__ import annotations

import threading

import pytest

from gradserve_store import store

TINY = dict(dataset="builtin:adding", model="rnn", hidden_size=8, batch_size=8, seq_len=10, log_every=10)
RAISE_AT = 30


@pytest.fixture(scope="module")
def faulty(make_stack):
    """A worker whose trainer warns and then raises at step RAISE_AT of every job."""
    s = make_stack("logs")
    s.start_redis()
    s.start_server()
    s.start_worker("w1", raise_at_step=RAISE_AT)
    return s


def test_a_job_that_ends_well_logs_its_attempt_and_its_end(faulty):
    with faulty.client() as c:
        job = c.submit(**TINY, max_steps=RAISE_AT - 10).wait(timeout=120)
        lines = list(job.logs())
        after_first = [line.cursor for line in job.logs(cursor=lines[0].cursor)]
    assert job.state == "SUCCEEDED"
    assert [(line.level, line.logger, line.attempt) for line in lines] == [
        ("INFO", "gradserve.worker", 1), ("INFO", "gradserve.worker", 1)]
    assert lines[0].message == f"job {job.id}: attempt 1 on worker w1@test"
    assert lines[1].message == f"job {job.id}: SUCCEEDED at step {RAISE_AT - 10}"
    assert after_first == [lines[1].cursor]


def test_a_crash_leaves_its_warning_and_traceback_in_the_log_and_a_follower_sees_the_end(faulty):
    with faulty.client() as c:
        job = c.submit(**TINY, max_steps=1000)
        followed: list = []
        follower = threading.Thread(target=lambda: followed.extend(job.logs(follow=True)), daemon=True)
        follower.start()
        job.wait(timeout=120)
        follower.join(30)
        lines = list(job.logs())
    assert not follower.is_alive(), "following must end when the job has ended"
    assert [line.cursor for line in followed] == [line.cursor for line in lines]
    assert job.state == "FAILED" and job.reason == (
        f"the worker hit an internal error: RuntimeError: fault injected at step {RAISE_AT}")
    warning = next(line for line in lines if line.level == "WARNING" and line.logger == "py.warnings")
    assert f"RuntimeWarning: fault injected: a warning at step {RAISE_AT}" in warning.message
    crash = next(line for line in lines if line.level == "ERROR")
    assert crash.message.startswith(f"job {job.id} crashed\nTraceback (most recent call last):")
    assert crash.message.endswith(f"RuntimeError: fault injected at step {RAISE_AT}")
    assert lines[-1].message == f"job {job.id}: FAILED at step {RAISE_AT - 10}: {job.reason}"


def test_a_log_keeps_its_newest_lines_and_goes_with_its_job(faulty):
    job_store = store.JobStore.from_url(faulty.redis_url)
    with faulty.client() as c:
        job = c.submit(**TINY, max_steps=10).wait(timeout=120)
        for i in range(3 * store.LOG_LINES):
            job_store.append_log(job.id, 1, 0.0, "INFO", "flood", f"line {i} " + "x" * (i % 2) * store.LOG_LINE_CHARS)
        kept = [line.message for line in job.logs() if line.logger == "flood"]
        assert store.LOG_LINES <= len(kept) < 1.2 * store.LOG_LINES
        last = f"line {3 * store.LOG_LINES - 1} "
        assert kept[-1] == (last + "x" * store.LOG_LINE_CHARS)[:store.LOG_LINE_CHARS] + f" [... {len(last)} more characters]"
        job.delete()
    assert not job_store.r.exists(store.logs_key(job.id))
    job_store.close()
