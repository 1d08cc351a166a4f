"""How many jobs one worker runs at once, and the memory budget they share.

A GPU runs one small recurrent job far below its capacity (at a batch of 32
the step is bound by kernel launches), so a GPU worker runs several jobs at
once, each in a pool process of its own (`gradserve-worker --concurrency N`).
Their memory comes from one budget, the worker's --memory-budget-mb: before a
job is claimed its process reserves the job's estimate in a MemoryLedger, and
waits while the running jobs' reservations leave too little of the budget. A
job alone always runs: the server admitted it against the whole budget.

The ledger lives in shared memory that the worker's parent process creates
before Celery forks the pool, so every pool process, including the fresh one
each job gets, sees the same slots. A slot names its process; a process that
died without releasing (SIGKILL, out of memory) has its slot freed by the next
reservation, and by the heartbeat, which reads the ledger to advertise the
running jobs.
"""

from __future__ import annotations

import contextlib
import ctypes
import multiprocessing
import os
import threading

from gradserve import spec as specs
from gradserve.v1 import jobs_pb2

# A CUDA process's own device memory before its first tensor: the CUDA context
# (runtime, kernels of torch's libraries) and cuDNN/cuBLAS workspaces. Not yet
# measured on the GPU: `make gpu-check` prints the calibration to set it from.
CUDA_PROCESS_BYTES = 1024 * 2**20
# A GPU worker's default --concurrency is what its memory holds of the default
# job, but no more than this: on an H200, 8 lstm jobs at once trained slower
# in aggregate than 4 (BENCHMARKS.md); each job's process needs a core to launch kernels.
MAX_DEFAULT_GPU_CONCURRENCY = 4
JOB_ID_BYTES = 64
# The vocabulary the default job is sized with: d2l's character vocabulary.
DEFAULT_VOCAB = 28
# How often a job waiting for memory looks again.
WAIT_POLL_S = 0.2


def job_bytes(spec, vocab_size: int, steps_per_sequence: int, device: str) -> int:
    """The memory a job needs on `device` ("cpu" or "cuda"): gradserve.spec's estimate, plus a CUDA process's own."""
    estimate = specs.memory_estimate_bytes(spec, vocab_size, specs.backprop_window(spec, steps_per_sequence))
    return estimate + (CUDA_PROCESS_BYTES if device == "cuda" else 0)


def group_bytes(per_job: list[int], device: str) -> int:
    """The memory of jobs (each one's job_bytes) that train together in one process, whose own is counted once."""
    return specs.shared_process_bytes(per_job, specs.PROCESS_BYTES + (CUDA_PROCESS_BYTES if device == "cuda" else 0))


def stored_job_bytes(job_store, job_id: str, device: str) -> int:
    """job_bytes of a stored job, sized as the server sized it at submission (gradserve_server.service.SubmitJob)."""
    spec = job_store.spec(job_id)
    if spec.dataset in specs.SYNTHETIC_TASKS:
        return job_bytes(spec, specs.TASKS[spec.dataset].symbols, specs.sequence_length(spec), device)
    tokens, vocab_size = job_store.dataset_tokens(job_store.resolve_dataset(spec.dataset), spec.tokenization,
                                                  spec.preprocess)
    return job_bytes(spec, vocab_size, tokens // spec.batch_size, device)


def default_concurrency(device: str, budget: int, cores: int) -> int:
    """--concurrency's default: 1 on a CPU (a job's threads use every core); on a GPU what the budget holds
    of jobs with the spec's defaults, at most MAX_DEFAULT_GPU_CONCURRENCY and one per core."""
    if device == "cpu":
        return 1
    default_job = job_bytes(specs.complete(jobs_pb2.JobSpec()), DEFAULT_VOCAB, DEFAULT_VOCAB * 100, "cuda")
    return max(1, min(budget // default_job, MAX_DEFAULT_GPU_CONCURRENCY, cores))


class _Slot(ctypes.Structure):
    _fields_ = [("pid", ctypes.c_int64), ("nbytes", ctypes.c_int64), ("job_id", ctypes.c_char * JOB_ID_BYTES)]


class MemoryLedger:
    """The worker's budget and the reservations of its running jobs, one slot per pool process."""

    def __init__(self, budget: int, slots: int):
        self.budget = budget
        self._slots = multiprocessing.get_context("fork").Array(_Slot, slots)

    def try_reserve(self, job_id: str, nbytes: int, pid: int | None = None) -> bool:
        """Reserve `nbytes` for `job_id` in process `pid` (this one) if the budget has room; True when done."""
        with self._slots.get_lock():
            self._free_the_dead()
            taken = [s for s in self._slots if s.pid]
            free = [s for s in self._slots if not s.pid]
            used = sum(s.nbytes for s in taken)
            if not free or (taken and used + nbytes > self.budget):
                return False
            slot = free[0]
            slot.pid, slot.nbytes, slot.job_id = pid or os.getpid(), nbytes, job_id.encode()[:JOB_ID_BYTES]
            return True

    def reserve(self, job_id: str, nbytes: int, stop: threading.Event) -> bool:
        """Wait until `nbytes` fit beside the running jobs and reserve them; False when `stop` came first."""
        while not self.try_reserve(job_id, nbytes):
            if stop.wait(WAIT_POLL_S):
                return False
        return True

    def release(self, pid: int | None = None) -> None:
        pid = pid or os.getpid()
        with self._slots.get_lock():
            for s in self._slots:
                if s.pid == pid:
                    s.pid, s.nbytes, s.job_id = 0, 0, b""

    def running(self) -> list[tuple[str, int]]:
        """(job id, reserved bytes) of every job holding a reservation now."""
        with self._slots.get_lock():
            self._free_the_dead()
            return [(s.job_id.decode(), s.nbytes) for s in self._slots if s.pid]

    def _free_the_dead(self) -> None:
        for s in self._slots:
            if s.pid and not _alive(s.pid):
                s.pid, s.nbytes, s.job_id = 0, 0, b""


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # A child that exited but is not yet reaped still answers; its status says it is a zombie.
    with contextlib.suppress(OSError):
        with open(f"/proc/{pid}/stat", "rb") as f:
            return f.read().rpartition(b")")[2].split()[0] != b"Z"
    return True
