"""Several jobs on one worker: the shared memory ledger across real processes, and a real worker at --concurrency 2."""

from __future__ import annotations

import multiprocessing
import os
import signal
import threading
import time

from gradserve import spec as specs
from gradserve.v1 import jobs_pb2

from gradserve_store import store
from gradserve_worker.capacity import CUDA_PROCESS_BYTES, MemoryLedger, default_concurrency, job_bytes, stored_job_bytes

FORK = multiprocessing.get_context("fork")
SMALL = dict(model="rnn", hidden_size=16, batch_size=8, num_steps=10, preprocess="d2l", val_fraction=0.0,
             device="cpu", log_every=50)


def _hold(ledger: MemoryLedger, job: str, nbytes: int, reserved, release) -> None:
    """A pool process's part: reserve, say so, hold until told, release."""
    assert ledger.reserve(job, nbytes, threading.Event())
    reserved.set()
    release.wait(30)
    ledger.release()


def _process(ledger, job, nbytes):
    reserved, release = FORK.Event(), FORK.Event()
    proc = FORK.Process(target=_hold, args=(ledger, job, nbytes, reserved, release))
    proc.start()
    return proc, reserved, release


def test_processes_share_the_budget_and_one_waits_until_another_releases():
    ledger = MemoryLedger(budget=100, slots=3)
    a, a_reserved, a_release = _process(ledger, "job-a", 70)
    assert a_reserved.wait(10)
    b, b_reserved, b_release = _process(ledger, "job-b", 50)
    assert not b_reserved.wait(0.5)  # 70 + 50 is over the budget of 100
    assert ledger.running() == [("job-a", 70)]
    a_release.set()
    assert b_reserved.wait(10)
    assert ledger.running() == [("job-b", 50)]
    b_release.set()
    for p in (a, b):
        p.join(10)
    assert ledger.running() == []


def test_a_job_alone_may_take_more_than_the_budget_and_slots_bound_the_jobs():
    ledger = MemoryLedger(budget=100, slots=2)
    assert ledger.try_reserve("big", 150, pid=os.getpid())
    assert not ledger.try_reserve("small", 1, pid=os.getppid())  # the big one leaves nothing
    ledger.release(os.getpid())
    assert ledger.try_reserve("a", 10, pid=os.getpid()) and ledger.try_reserve("b", 10, pid=os.getppid())
    assert not ledger.try_reserve("c", 10, pid=os.getpid())  # both slots taken


def test_a_killed_process_reservation_is_freed():
    ledger = MemoryLedger(budget=100, slots=2)
    proc, reserved, _ = _process(ledger, "killed", 90)
    assert reserved.wait(10)
    assert not ledger.try_reserve("next", 50)
    os.kill(proc.pid, signal.SIGKILL)
    proc.join(10)
    assert ledger.try_reserve("next", 50)
    assert ledger.running() == [("next", 50)]


def test_waiting_for_memory_ends_when_the_worker_stops():
    ledger = MemoryLedger(budget=100, slots=2)
    assert ledger.try_reserve("holder", 100, pid=os.getppid())
    stop = threading.Event()
    threading.Timer(0.3, stop.set).start()
    assert not ledger.reserve("waiting", 10, stop)


def test_the_default_concurrency_is_one_on_cpu_and_what_the_gpu_holds_up_to_a_cap():
    default_job = job_bytes(specs.complete(jobs_pb2.JobSpec()), 28, 2800, "cuda")
    assert default_job > CUDA_PROCESS_BYTES
    assert default_concurrency("cpu", 2**40, 16) == 1
    assert default_concurrency("cuda", 2 * default_job + 1, 16) == 2
    assert default_concurrency("cuda", default_job // 2, 16) == 1
    assert default_concurrency("cuda", 2**40, 16) == 4
    assert default_concurrency("cuda", 2**40, 2) == 2


def test_a_worker_runs_two_jobs_at_once_and_a_third_waits_for_the_budget(make_stack, timemachine):
    s = make_stack("concurrency")
    s.start_redis()
    s.start_server()
    small_job = job_bytes(specs.complete(jobs_pb2.JobSpec(**SMALL)), 28, len(timemachine) // 8, "cpu")
    # Two of these jobs fit the budget, three do not.
    budget_mib = 2.5 * small_job / 2**20
    s.start_worker("pair", env={"GRADSERVE_CONCURRENCY": "3", "GRADSERVE_MEMORY_BUDGET_MB": f"{budget_mib:.1f}"})
    with s.client() as c:
        dataset = c.upload_bytes(timemachine)
        jobs = [c.submit(dataset=dataset, max_steps=1_000_000, **SMALL) for _ in range(3)]
        deadline = time.monotonic() + 60
        while sorted(j.status() for j in jobs) != ["QUEUED", "RUNNING", "RUNNING"]:
            assert time.monotonic() < deadline, s.logs()
            time.sleep(0.2)
        running = [j for j in jobs if j.status() == "RUNNING"]
        [waiting] = [j for j in jobs if j not in running]
        deadline = time.monotonic() + 10
        while True:  # the heartbeat adds the reservations within a beat
            [worker] = c.workers()
            if worker.memory_reserved_bytes:
                break
            assert time.monotonic() < deadline
            time.sleep(0.2)
        assert sorted(worker.job_ids) == sorted(j.id for j in running) and worker.concurrency == 3
        job_store = store.JobStore.from_url(s.redis_url)
        assert worker.memory_reserved_bytes == sum(stored_job_bytes(job_store, j.id, "cpu") for j in running)
        job_store.r.close()
        assert waiting.status() == "QUEUED"  # a pool process is free, the budget is not
        running[0].cancel()
        assert running[0].wait(timeout=60).state == "CANCELLED"
        deadline = time.monotonic() + 30
        while waiting.status() != "RUNNING":
            assert time.monotonic() < deadline, s.logs()
            time.sleep(0.2)
        for j in (running[1], waiting):
            j.cancel()
        for j in (running[1], waiting):
            assert j.wait(timeout=60).state == "CANCELLED"
