"""Fault tests: kill, stop and restart the real processes of a running stack, and check that nothing is lost.

One stack serves the module: redis-server with AOF (appendfsync everysec), the
server (reaping every 0.5 s) and two workers, with 4 s leases so that a lost
worker is noticed in seconds. Each test breaks something while a job trains,
then checks what a watcher saw, through the public client, against what the
job should have produced. Every test prints what it measured (steps
recomputed, seconds to recover); RELIABILITY.md collects those numbers.
"""

from __future__ import annotations

import re
import signal
import threading
import time

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

import gradserve
from gradserve.v1 import jobs_pb2, jobs_pb2_grpc
from gradserve_store import store
from gradserve_store.queue import TRAIN_TASK, make_celery
from gradserve_server import dev
from gradserve_worker import hooks

LEASE_TTL_S = 4
WORKER_GRACE_S = 20
SERVER_GRACE_S = 5  # gradserve_server.serving.STOP_GRACE_S
ENV = {"GRADSERVE_LEASE_TTL_S": str(LEASE_TTL_S), "GRADSERVE_SHUTDOWN_GRACE_S": str(WORKER_GRACE_S)}
SERVER_FLAGS = ("--reap-interval", "0.5")
LOG_EVERY, CHECKPOINT_EVERY = 10, 100
# A few hundred steps a second on a loaded 2-core machine: a job of a few
# thousand steps runs long enough to break something in the middle of it.
JOB = dict(model="lstm", hidden_size=32, batch_size=16, num_steps=20, preprocess="d2l", log_every=LOG_EVERY,
           checkpoint_every=CHECKPOINT_EVERY)


def measured(test: str, **numbers) -> None:
    print(f"\nMEASURED {test}: " + ", ".join(f"{k}={v}" for k, v in numbers.items()))


def kind(event: jobs_pb2.Event) -> str:
    return event.WhichOneof("kind")


def statuses(events) -> list[jobs_pb2.StatusChange]:
    return [e.status for e in events if kind(e) == "status"]


def state(s: jobs_pb2.StatusChange) -> str:
    return gradserve.state_name(s.state)


def cursor_key(cursor: str) -> tuple[int, int]:
    ms, seq = cursor.split("-")
    return int(ms), int(seq)


def check_stream(events, max_steps: int, *, gaps_allowed: bool = False) -> list[int]:
    """What every watcher must see: ordered unique cursors, steps that only go forward, one terminal event last.

    Returns the metrics steps. Unless `gaps_allowed`, every multiple of log_every must be among them.
    """
    cursors = [cursor_key(e.cursor) for e in events]
    assert cursors == sorted(set(cursors)), "an event came twice or out of order"
    assert all(kind(e) != "notice" for e in events), "the client passed a notice on"
    # The latest checkpoints, and the best ones, are each kept by steps that only go forward.
    for k, best in (("metrics", False), ("checkpoint", False), ("checkpoint", True)):
        steps = [getattr(e, k).step for e in events if kind(e) == k and (k != "checkpoint" or e.checkpoint.best == best)]
        assert steps == sorted(set(steps)), f"{k} steps repeat or go back: {steps}"
    steps = [e.metrics.step for e in events if kind(e) == "metrics"]
    if not gaps_allowed:
        missing = sorted(set(range(LOG_EVERY, max_steps + 1, LOG_EVERY)) - set(steps))
        assert not missing, f"metrics missing for steps {missing}"
    assert steps[-1] == max_steps
    assert [state(s) for s in statuses(events)][-1] == "SUCCEEDED"
    assert store.is_terminal(events[-1])
    return steps


class Watcher:
    """Follows a job's events through the public client from a thread of its own, as a user would."""

    def __init__(self, stack, job_id: str, target: str | None = None):
        self.client = gradserve.Client(target, reconnect_timeout=120) if target else stack.client(reconnect_timeout=120)
        self.events: list[jobs_pb2.Event] = []
        self.arrived: list[float] = []
        self.error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, args=(self.client.get_job(job_id),), daemon=True)
        self._thread.start()

    def _run(self, job: gradserve.Job) -> None:
        try:
            for event in job.events():
                self.events.append(event)
                self.arrived.append(time.time())
        except BaseException as e:
            self.error = e

    def wait_for(self, predicate, timeout: float = 120) -> jobs_pb2.Event:
        deadline = time.monotonic() + timeout
        while True:
            for event in list(self.events):
                if predicate(event):
                    return event
            assert self.error is None, f"the watcher failed: {self.error!r}"
            assert self._thread.is_alive(), "the stream ended before the awaited event"
            assert time.monotonic() < deadline, "the awaited event never came"
            time.sleep(0.02)

    def join(self, timeout: float = 180) -> list[jobs_pb2.Event]:
        self._thread.join(timeout)
        self.client.close()
        assert not self._thread.is_alive(), "the watcher never saw the job end"
        if self.error is not None:
            raise self.error
        return self.events


def longest_silence(watch: Watcher) -> float:
    """The longest the watcher went without an event: how long the fault kept the stream away from it."""
    return round(max(b - a for a, b in zip(watch.arrived, watch.arrived[1:])), 2)


def checkpoint_at_least(step: int):
    return lambda e: kind(e) == "checkpoint" and e.checkpoint.step >= step


def metrics_at_least(step: int):
    return lambda e: kind(e) == "metrics" and e.metrics.step >= step


@pytest.fixture(scope="module")
def rstack(make_stack):
    s = make_stack("faults", env=ENV)
    s.start_redis(appendonly=True)
    s.start_server(*SERVER_FLAGS)
    s.start_worker("w1")
    s.start_worker("w2")
    return s


@pytest.fixture(scope="module")
def corpus_id(rstack, timemachine) -> str:
    with rstack.client() as c:
        return c.upload_bytes(timemachine, name="timemachine.txt")


_names = iter(f"w{i}" for i in range(3, 100))


@pytest.fixture(autouse=True)
def whole_stack(rstack, corpus_id):
    """Each test starts with Redis, the server and two idle workers, whatever the test before it broke."""
    if rstack.redis.poll() is not None:
        rstack.start_redis(appendonly=True)
    if rstack.server.poll() is not None:
        rstack.start_server()
    for _ in range(2 - sum(p.poll() is None for p in rstack.named.values())):
        rstack.start_worker(next(_names))
    with rstack.client() as c:
        deadline = time.monotonic() + 120
        while c.list_jobs(state="RUNNING") or c.list_jobs(state="QUEUED"):
            assert time.monotonic() < deadline, "jobs of an earlier test are still going"
            time.sleep(0.2)
    yield rstack


def test_sigkill_of_the_training_worker_costs_at_most_one_checkpoint_interval(rstack, corpus_id):
    max_steps = 1000
    with rstack.client() as c:
        job = c.submit(dataset=corpus_id, max_steps=max_steps, **JOB)
        watch = Watcher(rstack, job.id)
        watch.wait_for(metrics_at_least(250))  # halfway between two checkpoints
        victim = job.refresh().worker
        killed = time.time()
        rstack.kill_group(rstack.named[victim])  # the Celery parent and its pool child, at once
        final = job.wait(timeout=180)
    events = watch.join()

    assert final.state == "SUCCEEDED", rstack.logs()
    assert final.attempt == 2 and final.worker != victim
    check_stream(events, max_steps)
    s = statuses(events)
    assert [(state(x), x.attempt) for x in s] == [
        ("QUEUED", 1), ("RUNNING", 1), ("QUEUED", 2), ("RUNNING", 2), ("SUCCEEDED", 2)]
    lost, resumed = s[2], s[3]
    assert f"worker {victim} lost at step {lost.step}" in lost.reason
    assert resumed.resumed_from_step > 0 and resumed.resumed_from_step % CHECKPOINT_EVERY == 0
    assert resumed.reason == f"attempt 2, resumed from step {resumed.resumed_from_step}"
    recomputed = lost.step - resumed.resumed_from_step
    assert 0 <= recomputed <= CHECKPOINT_EVERY
    resumed_at = next(e.time for e in events if kind(e) == "status" and e.status == resumed).ToNanoseconds() / 1e9
    measured("sigkill-worker", last_reported_step=lost.step, resumed_from_step=resumed.resumed_from_step,
             steps_recomputed=recomputed, lease_ttl_s=LEASE_TTL_S, seconds_to_resume=round(resumed_at - killed, 2))


def test_sigkill_of_a_sweep_groups_worker_resumes_every_member_from_its_checkpoint(rstack, corpus_id):
    max_steps = 600
    with rstack.client() as c:
        # Six members over the workers' slots (two, or more while a killed worker's advertisement lasts): groups
        # of two or three members each.
        sweep = c.submit_sweep(base=dict(dataset=corpus_id, max_steps=max_steps, **{**JOB, "model": "rnn_scratch"}),
                               grid={"lr": [0.25, 0.5, 1, 1.5, 2, 3]})
        jobs = sweep.jobs
        watches = [Watcher(rstack, job.id) for job in jobs]
        watches[0].wait_for(metrics_at_least(250))
        victim = jobs[0].refresh().worker
        together = [j for j in jobs if j.refresh().worker == victim]
        assert len(together) >= 2, [j.info.worker for j in jobs]
        rstack.kill_group(rstack.named[victim])
        sweep.wait(timeout=300)
        for job in jobs:
            job.refresh()
    for job, watch in zip(jobs, watches):
        events = watch.join()
        assert job.state == "SUCCEEDED", rstack.logs()
        check_stream(events, max_steps)
        if job in together:
            assert job.attempt == 2 and job.info.worker != victim
            resumed = statuses(events)[3]
            assert resumed.resumed_from_step > 0 and resumed.resumed_from_step % CHECKPOINT_EVERY == 0


def test_sigkill_of_the_server_mid_stream_and_a_restart_lose_no_event(rstack, corpus_id):
    max_steps = 2000
    job_store = store.JobStore.from_url(rstack.redis_url)
    with rstack.client() as c:
        job = c.submit(dataset=corpus_id, max_steps=max_steps, **JOB)
        watch = Watcher(rstack, job.id)
        watch.wait_for(metrics_at_least(100))
        rstack.server.kill()
        rstack.server.wait()
        killed, step_at_kill = time.time(), job_store.get_job(job.id).last_step
        time.sleep(2)
        step_while_down = job_store.get_job(job.id).last_step
        rstack.start_server()
        restarted = time.time()
        events = watch.join()
        final = job.wait(timeout=60)
        history = list(job.events())
    job_store.r.close()

    assert final.state == "SUCCEEDED"
    assert step_while_down > step_at_kill, "the job stopped while the server was down"
    check_stream(events, max_steps)
    assert [e.cursor for e in events] == [e.cursor for e in history], "the watcher's stream differs from the record"
    measured("sigkill-server", steps_trained_while_server_down=step_while_down - step_at_kill,
             server_down_s=round(restarted - killed, 2), watcher_silent_s=longest_silence(watch),
             events_lost=0, events_duplicated=0)


def test_a_redis_restart_mid_job_with_jobs_queued_loses_no_job(rstack, corpus_id):
    with rstack.client() as c:
        long_job = c.submit(dataset=corpus_id, max_steps=1500, **JOB)
        other = c.submit(dataset=corpus_id, max_steps=1500, **JOB)  # keeps the second worker busy
        queued = [c.submit(dataset=corpus_id, max_steps=300, **JOB) for _ in range(2)]
        watch = Watcher(rstack, long_job.id)
        watch.wait_for(checkpoint_at_least(200))
        assert {q.status() for q in queued} == {"QUEUED"}, "both workers should be busy"
        # A killed redis-server loses nothing it wrote; a host that crashes
        # loses what AOF everysec had not fsynced yet, up to a second of
        # writes. Cutting the file back to its size of 0.8 s ago plays the latter.
        aof = rstack.dir / "appendonly.aof"
        synced = aof.stat().st_size
        time.sleep(0.8)
        rstack.redis.kill()
        rstack.redis.wait()
        killed = time.time()
        with open(aof, "r+b") as f:
            f.truncate(synced)
        time.sleep(0.5)
        rstack.start_redis(appendonly=True)
        restarted = time.time()
        finals = [j.wait(timeout=240) for j in (long_job, other, *queued)]
        events = watch.join()
        history = list(c.get_job(long_job.id).events())

    assert [f.state for f in finals] == ["SUCCEEDED"] * 4, rstack.logs()
    seen = check_stream(events, 1500, gaps_allowed=True)
    stored = check_stream(history, 1500, gaps_allowed=True)
    expected = set(range(LOG_EVERY, 1501, LOG_EVERY))
    measured("redis-restart", attempts=finals[0].attempt, redis_down_s=round(restarted - killed, 2),
             metrics_events_missed_by_live_watcher=len(expected - set(seen)),
             metrics_events_lost_from_the_record=len(expected - set(stored)), watcher_silent_s=longest_silence(watch))


def test_a_task_delivered_twice_trains_once(rstack, corpus_id):
    with rstack.client() as c:
        job = c.submit(dataset=corpus_id, max_steps=600, **JOB)
        celery = make_celery(rstack.redis_url)
        celery.send_task(TRAIN_TASK, args=[job.id], queue="cpu")  # by name, as the server does; any attempt
        celery.send_task(TRAIN_TASK, args=[job.id], kwargs={"attempt": 1}, queue="cpu")
        celery.close()
        final = job.wait(timeout=120)
        events = list(job.events())
    assert final.state == "SUCCEEDED"
    assert [(state(s), s.attempt) for s in statuses(events)] == [("QUEUED", 1), ("RUNNING", 1), ("SUCCEEDED", 1)]
    check_stream(events, 600)
    deadline = time.monotonic() + 60
    while (drops := sum(len(re.findall(f"dropping this delivery of {job.id}", log.read_text(errors="replace")))
                        for log in rstack.dir.glob("worker-*.log"))) < 2:
        assert time.monotonic() < deadline, rstack.logs()
        time.sleep(0.2)
    measured("duplicate-delivery", deliveries=3, trained=1, dropped=drops)


def test_sigterm_of_a_worker_hands_its_job_to_another_that_continues_it(rstack, corpus_id):
    max_steps = 1200
    with rstack.client() as c:
        job = c.submit(dataset=corpus_id, max_steps=max_steps, **{**JOB, "checkpoint_every": 1000})
        watch = Watcher(rstack, job.id)
        watch.wait_for(metrics_at_least(200))
        victim = job.refresh().worker
        proc = rstack.named[victim]
        asked, asked_at = time.monotonic(), time.time()
        proc.send_signal(signal.SIGTERM)  # the main process only, as `docker stop` does
        proc.wait(WORKER_GRACE_S + 10)
        exited_s = time.monotonic() - asked
        final = job.wait(timeout=180)
    events = watch.join()

    assert proc.returncode == 0
    assert exited_s < WORKER_GRACE_S
    assert final.state == "SUCCEEDED" and final.worker != victim and final.attempt == 2
    steps = check_stream(events, max_steps)
    s = statuses(events)
    assert [(state(x), x.attempt) for x in s] == [
        ("QUEUED", 1), ("RUNNING", 1), ("QUEUED", 2), ("RUNNING", 2), ("SUCCEEDED", 2)]
    handed, resumed = s[2], s[3]
    assert f"worker {victim} is shutting down: handed back at step {handed.step}" in handed.reason
    assert resumed.resumed_from_step == handed.step
    # The step it stopped at was reported and checkpointed, off the regular intervals.
    assert handed.step in steps
    assert handed.step in [e.checkpoint.step for e in events if kind(e) == "checkpoint"]
    resumed_at = next(e.time for e in events if kind(e) == "status" and e.status == resumed).ToNanoseconds() / 1e9
    measured("sigterm-worker", handed_back_at_step=handed.step, steps_recomputed=0,
             seconds_to_resume=round(resumed_at - asked_at, 2), worker_exit_s=round(exited_s, 2))


def test_sigterm_of_the_server_ends_streams_with_a_notice_and_the_client_resumes(rstack, corpus_id):
    max_steps = 1500
    with rstack.client() as c:
        job = c.submit(dataset=corpus_id, max_steps=max_steps, **JOB)
        watch = Watcher(rstack, job.id)
        raw, health = [], []
        channel = grpc.insecure_channel(rstack.address)
        events_call = jobs_pb2_grpc.JobServiceStub(channel).StreamEvents(jobs_pb2.StreamEventsRequest(job_id=job.id))
        health_stub = health_pb2_grpc.HealthStub(channel)

        def read_events():
            raw.extend(events_call)

        def poll_health():
            # Until the server stops answering: it says NOT_SERVING for a while before it does.
            while True:
                try:
                    health.append(health_stub.Check(health_pb2.HealthCheckRequest(service=""), timeout=2).status)
                except grpc.RpcError:
                    return
                time.sleep(0.02)

        readers = [threading.Thread(target=f, daemon=True) for f in (read_events, poll_health)]
        for t in readers:
            t.start()
        watch.wait_for(metrics_at_least(100))
        server, asked = rstack.server, time.monotonic()
        server.send_signal(signal.SIGTERM)
        server.wait(SERVER_GRACE_S + 10)
        exited_s = time.monotonic() - asked
        for t in readers:
            t.join(10)
        channel.close()
        rstack.start_server()
        # The watcher reconnects by itself; calls made before it has may still
        # meet the channel's reconnect backoff (Unavailable), so wait for it first.
        events = watch.join()
        final = job.refresh()

    assert server.returncode == 0 and exited_s < SERVER_GRACE_S
    assert health[:1] == [health_pb2.HealthCheckResponse.SERVING]
    assert health[-1] == health_pb2.HealthCheckResponse.NOT_SERVING
    notice = raw[-1]
    assert kind(notice) == "notice" and notice.notice.code == "SERVER_SHUTTING_DOWN"
    assert notice.cursor == raw[-2].cursor, "a notice must resume right after the last event sent"
    assert final.state == jobs_pb2.SUCCEEDED
    check_stream(events, max_steps)
    measured("sigterm-server", server_exit_s=round(exited_s, 2), events_before_notice=len(raw) - 1,
             watcher_silent_s=longest_silence(watch), events_lost=0, events_duplicated=0)


def test_two_server_processes_relay_on_their_own_and_a_watcher_moves_between_them(rstack, corpus_id):
    # Long enough to outlast the first process's drain: on a quiet machine a
    # thousand steps can finish within it, and the second would have nothing to send.
    max_steps = 5000
    second = rstack.start_another_server()
    first = rstack.server
    try:
        with rstack.client() as c:
            job = c.submit(dataset=corpus_id, max_steps=max_steps, **JOB)
            # A target list: the channel uses the first address while it answers, then the next.
            moving = Watcher(rstack, job.id, target=f"ipv4:{rstack.address},{second}")
            # One plain call on the second process, which must not notice the first one going away.
            with grpc.insecure_channel(second) as channel:
                call = jobs_pb2_grpc.JobServiceStub(channel).StreamEvents(
                    jobs_pb2.StreamEventsRequest(job_id=job.id), timeout=240)
                staying: list[jobs_pb2.Event] = []
                reader = threading.Thread(target=lambda: staying.extend(call), daemon=True)
                reader.start()
                moving.wait_for(metrics_at_least(100))
                first.send_signal(signal.SIGTERM)
                first.wait(SERVER_GRACE_S + 10)
                seen_from_the_first = len(moving.events)
                events = moving.join()
                reader.join(120)
        with gradserve.Client(second) as c:
            final = c.get_job(job.id)
    finally:
        for proc in rstack.other_servers:
            dev.stop_process(proc)
        rstack.other_servers.clear()

    assert final.state == "SUCCEEDED"
    # The moving watcher resumed on the second process with its cursor (the first had exited, so everything
    # after seen_from_the_first came from the second): nothing missed, nothing twice.
    check_stream(events, max_steps)
    assert len(events) > seen_from_the_first
    # The second process's own watcher streamed the whole job in one call, with no notice.
    assert not reader.is_alive()
    check_stream(staying, max_steps)
    assert [e.cursor for e in staying] == [e.cursor for e in events]


def test_a_job_whose_worker_dies_every_time_fails_after_max_attempts(make_stack, timemachine):
    s = make_stack("max-attempts", env=ENV)
    s.start_redis()
    s.start_server(*SERVER_FLAGS, "--max-attempts", "2")
    # The fault-injection hook: each attempt's pool process dies at step 150, before reporting it.
    s.start_worker("crashy", crash_at_step=150)
    with s.client() as c:
        job = c.submit(dataset=c.upload_bytes(timemachine), max_steps=1000, **{**JOB, "checkpoint_every": 50})
        started = time.monotonic()
        final = job.wait(timeout=120)
        took = time.monotonic() - started
        events = list(job.events())

    assert final.state == "FAILED", s.logs()
    assert final.reason == "worker lost 2 times; last at step 140"
    assert final.attempt == 2
    st = statuses(events)
    assert [(state(x), x.attempt) for x in st] == [
        ("QUEUED", 1), ("RUNNING", 1), ("QUEUED", 2), ("RUNNING", 2), ("FAILED", 2)]
    assert st[3].resumed_from_step == 100
    steps = [e.metrics.step for e in events if kind(e) == "metrics"]
    assert steps == list(range(10, 141, 10)), "the second attempt repeated steps"
    assert not hooks.report_hooks, "the hook leaked into the test process"
    measured("max-attempts", attempts=final.attempt, seconds_to_fail=round(took, 1))
