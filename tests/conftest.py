"""Fixtures shared by the whole suite: the corpus, and a real running stack.

`stack` starts a real redis-server, the real gRPC server and real Celery worker
processes on free loopback ports, once per test session, and stops them by PID
at the end. Nothing is mocked.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

import gradserve
from gradserve_server import dev
from gradserve_store import store

REPO = Path(__file__).resolve().parents[1]
# The Time Machine (public domain): the suite and the benchmarks read it from the repository itself.
CORPUS = REPO / "tests" / "data" / "timemachine.txt"
HARNESS = REPO / "tests" / "harness"
# The CLI sizes its tables to COLUMNS when it is set, as it is in pytest-xdist's workers: the tests
# read the piped output, which has room for every column, unless a test sets a width itself.
os.environ.pop("COLUMNS", None)


@pytest.fixture(scope="session")
def timemachine() -> str:
    assert CORPUS.exists(), f"the test corpus is missing: {CORPUS}"
    return CORPUS.read_text(encoding="utf-8")


def wait_serving(address: str, timeout: float = 20.0, proc: subprocess.Popen | None = None) -> None:
    deadline = time.monotonic() + timeout
    with grpc.insecure_channel(address) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        while True:
            try:
                reply = stub.Check(health_pb2.HealthCheckRequest(service=""), timeout=1)
                if reply.status == health_pb2.HealthCheckResponse.SERVING:
                    return
            except grpc.RpcError:
                pass
            if (proc is not None and proc.poll() is not None) or time.monotonic() > deadline:
                raise RuntimeError(f"server at {address} did not become healthy")
            time.sleep(0.1)


@dataclass
class Stack:
    """A running gradserve: Redis, one server, workers. Each process's output goes to a log file in `dir`.

    `env` is added to the environment of every server and worker it starts.
    """

    dir: Path
    redis_port: int = 0
    server_port: int = 0
    redis: subprocess.Popen | None = None
    server: subprocess.Popen | None = None
    # Server processes beyond the first, on the same Redis (start_another_server).
    other_servers: list[subprocess.Popen] = field(default_factory=list)
    workers: list[subprocess.Popen] = field(default_factory=list)
    env: dict[str, str] = field(default_factory=dict)
    # Each worker by its node name ("w1@test"), as jobs name the worker that runs them.
    named: dict[str, subprocess.Popen] = field(default_factory=dict)
    server_args: tuple[str, ...] = ()
    # Credentials Redis demands (an ACL user when redis_user is set); empty: none.
    redis_user: str = ""
    redis_password: str = ""

    @property
    def redis_url(self) -> str:
        login = f"{self.redis_user}:{self.redis_password}@" if self.redis_password else ""
        return f"redis://{login}127.0.0.1:{self.redis_port}/0"

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.server_port}"

    def _log(self, name: str):
        return open(self.dir / f"{name}.log", "ab")

    def start_redis(self, appendonly: bool = False) -> None:
        """Start redis-server on this stack's port (the same one again after a kill) with its files in `dir`."""
        self.redis_port = self.redis_port or dev.free_port()
        with self._log("redis") as log:
            self.redis = dev.start_redis(self.redis_port, self.dir, appendonly=appendonly, log_file=log,
                                         user=self.redis_user, password=self.redis_password)

    def start_server(self, *extra: str) -> None:
        """Start the server on this stack's address; `extra` flags are kept for the next start too."""
        self.server_args = extra or self.server_args
        self.server_port = self.server_port or dev.free_port()
        args = [sys.executable, "-m", "gradserve_server.main", "--redis-url", self.redis_url,
                "--listen", self.address, *self.server_args]
        with self._log("server") as log:
            self.server = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, env={**os.environ, **self.env})
        wait_serving(self.address, proc=self.server)

    def start_another_server(self) -> str:
        """Start one more server process on the same Redis, on a port of its own; returns its address."""
        address = f"127.0.0.1:{dev.free_port()}"
        args = [sys.executable, "-m", "gradserve_server.main", "--redis-url", self.redis_url, "--listen", address,
                *self.server_args]
        with self._log(f"server-{address.rpartition(':')[2]}") as log:
            proc = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, env={**os.environ, **self.env})
        self.other_servers.append(proc)
        wait_serving(address, proc=proc)
        return address

    def start_worker(self, name: str, queues: str = "cpu", env: dict[str, str] | None = None,
                     node: str | None = None, crash_at_step: int = 0, raise_at_step: int = 0) -> subprocess.Popen:
        """Start worker `name`@test (or named `node` exactly) and wait until it advertises itself.

        With `crash_at_step`, each of its jobs' processes dies at that step; with `raise_at_step`, the
        trainer's report there warns and raises (tests/harness/faulty_worker.py).
        """
        node = node or f"{name}@test"
        program = ("-m", "gradserve_worker.main")
        if crash_at_step:
            program = (str(HARNESS / "faulty_worker.py"), "--crash-at-step", str(crash_at_step))
        elif raise_at_step:
            program = (str(HARNESS / "faulty_worker.py"), "--raise-at-step", str(raise_at_step))
        with self._log(f"worker-{name}") as log:
            proc = dev.start_worker(self.redis_url, queues=queues, name=node, log_file=log,
                                    extra_env={**self.env, **(env or {})}, program=program)
        self.workers.append(proc)
        self.named[node] = proc
        deadline = time.monotonic() + 60
        job_store = store.JobStore.from_url(self.redis_url)
        try:
            # By name: a worker killed a moment ago is still advertised until its heartbeat expires.
            while node not in {w.name for w in job_store.workers()}:
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"worker {name} did not come up:\n{self.logs()}")
                time.sleep(0.2)
        finally:
            job_store.r.close()
        return proc

    def kill_group(self, proc: subprocess.Popen, sig: int = signal.SIGKILL) -> None:
        """Signal a process and its whole session (a worker's Celery pool children too), and reap it."""
        os.killpg(proc.pid, sig)
        proc.wait(30)

    def client(self, **kwargs) -> gradserve.Client:
        return gradserve.Client(self.address, **kwargs)

    def logs(self) -> str:
        return "\n".join(f"--- {p.name}\n{p.read_text(errors='replace')[-3000:]}" for p in sorted(self.dir.glob("*.log")))

    def stop(self) -> None:
        for proc in self.workers:
            dev.stop_process(proc, 10)
        for proc in [self.server, *self.other_servers]:
            if proc is not None:
                dev.stop_process(proc)
        if self.redis is not None:
            dev.stop_process(self.redis)


@pytest.fixture(scope="session")
def stack(tmp_path_factory) -> Stack:
    s = Stack(tmp_path_factory.mktemp("stack"))
    try:
        s.start_redis()
        s.start_server("--max-dataset-mb", "1")
        s.start_worker("w1")
        s.start_worker("g1", queues="generate")  # serves Generate (tests/e2e/test_generate.py)
        yield s
    finally:
        s.stop()


@pytest.fixture
def client(stack):
    with stack.client() as c:
        yield c


@pytest.fixture(scope="module")
def idle_stack(tmp_path_factory) -> Stack:
    """Redis and a server with no worker: accepted jobs stay QUEUED, so tests can submit freely."""
    s = Stack(tmp_path_factory.mktemp("idle-stack"))
    try:
        s.start_redis()
        s.start_server()
        yield s
    finally:
        s.stop()


@pytest.fixture(scope="module")
def make_stack(tmp_path_factory):
    """Makes Stacks for one test module to start and break as it likes; stops what is left of them after it."""
    made: list[Stack] = []

    def make(name: str = "stack", env: dict[str, str] | None = None) -> Stack:
        s = Stack(tmp_path_factory.mktemp(name), env=dict(env or {}))
        made.append(s)
        return s

    yield make
    for s in made:
        s.stop()


# The tenants of `web_stack`, and their tokens.
ALICE, BOB = "alice-token-0123456789abcdef", "bob-token-0123456789abcdef"


@pytest.fixture(scope="session")
def web_stack(tmp_path_factory) -> Stack:
    """Redis, a server with tokens for alice and bob and the dashboard on `web_stack.web` (--http-listen), and one
    worker: what the dashboard's HTTP and browser tests share."""
    from gradserve_server import auth

    s = Stack(tmp_path_factory.mktemp("web-stack"),
              env={"GRADSERVE_TOKENS": f"alice {auth.hash_token(ALICE)},bob {auth.hash_token(BOB)}"})
    s.web = f"http://127.0.0.1:{dev.free_port()}"
    try:
        s.start_redis()
        s.start_server("--http-listen", s.web.removeprefix("http://"))
        s.start_worker("w1")
        yield s
    finally:
        s.stop()
