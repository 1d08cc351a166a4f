"""gradserve-worker: a Celery worker that trains gradserve jobs.

    gradserve-worker --redis-url redis://localhost:6379/0 --queues cpu
    gradserve-worker --redis-url redis://localhost:6379/0 --queues gpu
    gradserve-worker --redis-url redis://localhost:6379/0 --queues generate

Each job runs in a fresh prefork child (one task per child), so a job's memory,
threads and any CUDA context die with it. The parent process never touches
CUDA, because a CUDA context does not survive fork. With --concurrency N the
worker runs up to N jobs at once, each in its own child, sharing its memory
budget (capacity.py); a GPU worker's default N is what the GPU's memory holds. While it runs, the worker
advertises itself in Redis with a heartbeat; the server routes `device=auto`
jobs to the gpu queue only while a GPU worker is advertised.

SIGTERM (or Ctrl-C) stops a worker gracefully: the running job finishes its
step, writes a checkpoint and is handed back to the queue, where another
worker continues it from there; the worker exits within --shutdown-grace.

`--queues generate` makes a generate worker instead: it trains nothing and
answers `gradserve generate` requests from jobs' checkpoints, in one process
with Celery's solo pool (no fork, so torch is safe there and loaded models stay
loaded). It serves that queue alone, so a request never waits behind training.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import time

from celery import signals

from gradserve.cmdline import Parser, add_version
from gradserve_store.queue import GENERATE_QUEUE, QUEUES
from gradserve_store.store import HEARTBEAT_S, JobStore
from gradserve_store.settings import Shared
from gradserve_worker.app import DEFAULT_REDIS_RETRY_S, WorkerSettings, create_app
from gradserve_worker.capacity import MemoryLedger, default_concurrency

DEFAULT_SHUTDOWN_GRACE_S = 30.0
log = logging.getLogger("gradserve.worker")


class ShutdownForwarder:
    """Passes the worker's shutdown on to the pool children running jobs; kills those still running after `grace`.

    Celery's warm shutdown waits for running tasks, and a job may run for
    hours. A child's train task takes SIGTERM as "checkpoint and hand the job
    back" (app.py), so with this a shutdown costs a step and a checkpoint, not
    the rest of the job. A child that outlives the grace period (a step slower
    than that, Redis away) is killed, and its job comes back to the queue when
    its lease lapses.
    """

    def __init__(self, grace: float):
        self.grace = grace

    def __call__(self, **_) -> None:
        from celery.worker import state

        # The solo pool runs tasks in this very process, which is shutting down already.
        pids = {r.worker_pid for r in list(state.active_requests) if r.worker_pid not in (None, os.getpid())}
        for pid in pids:
            log.info("asking the job in pool process %d to checkpoint and hand itself back", pid)
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGTERM)
        if pids:
            timer = threading.Timer(self.grace, self._kill, args=(pids,))
            timer.daemon = True
            timer.start()

    def _kill(self, pids: set[int]) -> None:
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
                log.warning("pool process %d outlived the %.0f s grace period; killed it", pid, self.grace)


class Heartbeat:
    """Renews the worker's advertisement in Redis until stopped; it expires by itself if the worker dies."""

    def __init__(self, redis_url: str, name: str, advert: dict, ledger: MemoryLedger):
        self.store = JobStore.from_url(redis_url)
        self.name, self.advert, self.ledger = name, advert, ledger
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="gradserve-heartbeat", daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                # The ledger knows the running jobs even when a job's process died without saying so.
                running = self.ledger.running()
                self.store.heartbeat(self.name, {**self.advert, "memory_reserved": sum(n for _, n in running)},
                                     jobs=[job for job, _ in running])
            except Exception as e:  # Redis may be restarting; the next beat tries again.
                log.warning("heartbeat failed: %s", e)
            self._stop.wait(HEARTBEAT_S)

    def start(self, **_) -> None:
        self._thread.start()

    def stop(self, **_) -> None:
        self._stop.set()
        try:
            self.store.remove_worker(self.name)
        except Exception as e:
            log.warning("could not withdraw the advertisement: %s", e)


def probe_cuda() -> tuple[str, int]:
    """The first CUDA device's name and memory in bytes, or ("", 0).

    A child process asks, so that this one never initialises CUDA.
    """
    code = ("import torch\n"
            "if torch.cuda.is_available():\n"
            "    print(torch.cuda.get_device_properties(0).total_memory, torch.cuda.get_device_name(0))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    memory, _, name = out.stdout.strip().partition(" ")
    return (name, int(memory)) if name else ("", 0)


# The share of the machine's memory a CPU job may plan on; the rest is the
# operating system's, Redis's if it shares the host, and the worker's own.
CPU_MEMORY_SHARE = 0.8


def default_memory_budget(gpu_memory: int) -> int:
    if gpu_memory:
        return gpu_memory
    return int(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") * CPU_MEMORY_SHARE)


def warm_up_torch() -> None:
    """Pay torch's lazy imports once in the parent instead of in every job's fresh child.

    The first optimizer built in a process costs about a second of imports.
    Building one on a single element starts no thread pool, which would not
    survive the fork.
    """
    import torch

    torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.1)


def _env_int(name: str) -> int | None:
    value = os.environ.get(name)
    return int(value) if value else None


def main(argv: list[str] | None = None) -> None:
    p = Parser(prog="gradserve-worker", description=__doc__.split("\n\n")[0])
    add_version(p, "gradserve-worker")
    p.add_argument("--redis-url", default=os.environ.get("GRADSERVE_REDIS_URL"),
                   help="Redis shared with the server (env GRADSERVE_REDIS_URL)")
    p.add_argument("--queues", default=os.environ.get("GRADSERVE_QUEUES", "cpu"),
                   help="comma-separated queues to take jobs from: cpu, gpu; or generate alone, to serve text "
                   "generation (env GRADSERVE_QUEUES, default cpu)")
    p.add_argument("--name", default=os.environ.get("GRADSERVE_WORKER_NAME"),
                   help="node name, unique in the cluster (default QUEUES-PID@HOST)")
    p.add_argument("--memory-budget-mb", type=float, default=float(os.environ.get("GRADSERVE_MEMORY_BUDGET_MB", 0)),
                   help="memory one job may use here, in MiB; the server refuses jobs estimated above the smallest "
                   "budget of the workers on their queue (env GRADSERVE_MEMORY_BUDGET_MB; default: the GPU's memory, "
                   f"or {CPU_MEMORY_SHARE * 100:.0f}%% of this machine's)")
    p.add_argument("--concurrency", type=int, default=_env_int("GRADSERVE_CONCURRENCY"),
                   help="jobs run at once, each in a process of its own, sharing the memory budget (env "
                   "GRADSERVE_CONCURRENCY; default 1 on cpu; on gpu as many jobs with the spec's defaults as the "
                   "budget holds, at most 4 and one per core)")
    p.add_argument("--threads", type=int, default=_env_int("GRADSERVE_THREADS"),
                   help="torch threads per job (env GRADSERVE_THREADS, default: the cores divided among the "
                   "concurrent jobs); with several workers on one host, give each its share")
    p.add_argument("--shutdown-grace", type=float,
                   default=float(os.environ.get("GRADSERVE_SHUTDOWN_GRACE_S", DEFAULT_SHUTDOWN_GRACE_S)),
                   help="seconds a running job gets to checkpoint and hand itself back when the worker is asked to "
                   f"stop (SIGTERM), before it is killed (env GRADSERVE_SHUTDOWN_GRACE_S, default "
                   f"{DEFAULT_SHUTDOWN_GRACE_S:g})")
    p.add_argument("--redis-retry", type=float,
                   default=float(os.environ.get("GRADSERVE_REDIS_RETRY_S", DEFAULT_REDIS_RETRY_S)),
                   help="seconds a running job's writes keep retrying while Redis is unreachable, before its "
                   f"attempt gives up and the reaper queues it again (env GRADSERVE_REDIS_RETRY_S, default "
                   f"{DEFAULT_REDIS_RETRY_S:g})")
    p.add_argument("--log-level", default=os.environ.get("GRADSERVE_LOG_LEVEL", "INFO"))
    args = p.parse_args(argv)
    if not args.redis_url:
        p.error("--redis-url (or GRADSERVE_REDIS_URL) is required, e.g. redis://localhost:6379/0")
    if args.shutdown_grace <= 0:
        p.error(f"--shutdown-grace must be above 0, got {args.shutdown_grace}")
    if args.threads is not None and args.threads < 1:
        p.error(f"--threads must be at least 1, got {args.threads}")
    if args.concurrency is not None and args.concurrency < 1:
        p.error(f"--concurrency must be at least 1, got {args.concurrency}")
    if not args.redis_retry > 0:
        p.error(f"--redis-retry must be above 0, got {args.redis_retry}")
    try:
        shared = Shared.from_env(os.environ)
    except ValueError as e:
        p.error(str(e))
    queues = [q.strip() for q in args.queues.split(",") if q.strip()]
    unknown = sorted(set(queues) - {*QUEUES, GENERATE_QUEUE})
    if not queues or unknown:
        p.error(f"--queues must name some of {', '.join(QUEUES)}, or {GENERATE_QUEUE}; got {args.queues!r}")
    generates = GENERATE_QUEUE in queues
    if generates and len(queues) > 1:
        p.error(f"--queues {GENERATE_QUEUE} cannot share a worker with training queues (they need different "
                f"process pools); start one worker with --queues {GENERATE_QUEUE} and another for training")
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(name)s %(levelname)s %(message)s")

    device, gpu_memory = "cpu", 0
    if "gpu" in queues:
        device, gpu_memory = probe_cuda()
        if not device:
            sys.exit("gradserve-worker: --queues gpu needs a CUDA GPU, and torch sees none here; use --queues cpu")
    budget = int(args.memory_budget_mb * 2**20) if args.memory_budget_mb else default_memory_budget(gpu_memory)
    cores = os.cpu_count() or 1
    concurrency = 1 if generates else args.concurrency or default_concurrency("cuda" if gpu_memory else "cpu",
                                                                              budget, cores)
    threads = args.threads or max(1, cores // concurrency)
    # Made before Celery forks its pool, so that every job's process shares it.
    ledger = MemoryLedger(budget, concurrency)
    if not generates:
        warm_up_torch()

    name = args.name or f"{'-'.join(queues)}-{os.getpid()}@{socket.gethostname()}"
    heartbeat = Heartbeat(
        args.redis_url,
        name,
        {"name": name, "queues": ",".join(queues), "device": device, "hostname": socket.gethostname(),
         "pid": os.getpid(), "started": time.time(), "threads": threads, "memory_budget": budget,
         "heartbeat_interval_s": HEARTBEAT_S, "concurrency": concurrency},
        ledger,
    )
    signals.worker_ready.connect(heartbeat.start, weak=False)
    signals.worker_shutdown.connect(heartbeat.stop, weak=False)
    signals.worker_shutting_down.connect(ShutdownForwarder(args.shutdown_grace), weak=False)

    # Jobs and the heartbeat name the worker alike, whatever form the name
    # takes: Celery turns a name without "@" into "celery@NAME" for its node.
    app = create_app(WorkerSettings(args.redis_url, name, threads, shared, args.redis_retry, ledger,
                                    "cuda" if gpu_memory else "cpu"))
    # Training: `concurrency` jobs at a time, each in a fresh child process. Generation:
    # one request at a time in this process, which keeps its models loaded.
    pool = ["--pool", "solo"] if generates else ["--pool", "prefork", "--max-tasks-per-child", "1"]
    app.worker_main(
        [
            "worker", "--queues", ",".join(queues), "--hostname", name, "--loglevel", args.log_level.upper(),
            "--concurrency", str(concurrency), *pool,
            # Workers never talk to each other; skipping that makes start-up faster.
            "--without-gossip", "--without-mingle", "--without-heartbeat",
        ]
    )


if __name__ == "__main__":
    main()
