"""What the event relay delivers: latency with many watchers, Redis connections, and saturation.

    make bench                           # runs this after bench/upload.py
    .venv/bin/python bench/fanout.py --out BENCHMARKS.md
    .venv/bin/python bench/fanout.py --cases one-job --out /tmp/b.md

Real processes on loopback: a redis-server, one or two `gradserve-server`
processes, and the watchers in a process of their own (this file run with
--watch), which open real StreamEvents calls over gRPC, a few hundred to a
TCP connection. Jobs are submitted through the gRPC API and never reach a
worker: this process claims them with the worker's own store calls
(JobStore.claim) and appends metrics events at a set pace with
JobStore.append_event, the call a training worker makes. So the two cores
go to the relay instead of to training, and the pace is exact.

Each event's latency runs from its own time (set by append_event, before the
write to Redis) to its receipt by a watcher. Every watcher checks that it got
every step exactly once, in order, and that its stream ended with the job's
terminal status; a watcher asked to resume (a notice) reconnects with its
cursor like the client does, and is counted.

Cases:
  one-job      1000 watchers on one job emitting 20 events/s
  floor        the same watchers and events served by grpc.aio alone (this
               file run with --floor: no Redis, no relay, the same bytes
               queued for every stream), which sets how close one Python
               server process can come to the latency goals here
  many-jobs    100 jobs x 10 watchers, each job emitting 20 events/s
  queued       5000 watchers on 50 queued jobs, over 4 server processes (one
               serves at most 1,500 streams): the Redis connections held;
               then one more watcher on a running job, and its latency
  saturation   watchers on one job whose events are written as fast as
               Redis takes them: events/s delivered, and the server's CPU
               per 1000 delivered events, with 1 and with 2 server processes

The machine's load (os.getloadavg) and core count are recorded beside each
figure: on a shared 2-core machine the watchers, the writer and Redis run on
the same cores as the server.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from datetime import datetime, timezone
from pathlib import Path

import grpc
import redis
from grpc_health.v1 import health_pb2, health_pb2_grpc

import gradserve
from gradserve.v1 import jobs_pb2, jobs_pb2_grpc
from gradserve_server import dev, serving
from gradserve_store import store
from sections import write_section

HEADING = "## Event relay: watchers, latency and saturation"
CASES = ("one-job", "floor", "many-jobs", "queued", "saturation")
# Watchers that share one TCP connection (HTTP/2 streams on one channel).
WATCHERS_PER_CHANNEL = 250
# How long the watchers wait for every stream to begin, and then for those that began late.
START_WAIT_S = 60.0
RATE = 20.0  # events per second per job, as the figures ask
LEASE_S = 3600.0
CLK_TCK = os.sysconf("SC_CLK_TCK")


# ------------------------------------------------------------ the stack

class Stack:
    """redis-server and `servers` gRPC server processes on free loopback ports; no worker."""

    def __init__(self, servers: int):
        self.dir = Path(tempfile.mkdtemp(prefix="gradserve-bench-fanout-"))
        redis_port = dev.free_port()
        self.redis_url = f"redis://127.0.0.1:{redis_port}/0"
        with open(self.dir / "redis.log", "ab") as log:
            self.redis = dev.start_redis(redis_port, self.dir, log_file=log)
        self.addresses, self.procs = [], []
        try:
            for i in range(servers):
                address = f"127.0.0.1:{dev.free_port()}"
                with open(self.dir / f"server{i}.log", "ab") as log:
                    self.procs.append(subprocess.Popen(
                        [sys.executable, "-m", "gradserve_server.main", "--redis-url", self.redis_url,
                         "--listen", address, "--log-level", "WARNING"], stdout=log, stderr=subprocess.STDOUT))
                self.addresses.append(address)
            for address, proc in zip(self.addresses, self.procs):
                _wait_serving(address, proc, self.dir)
            self.store = store.JobStore.from_url(self.redis_url)
            self.redis_client = redis.Redis.from_url(self.redis_url)
        except BaseException:
            self.stop()
            raise

    def cpu_s(self) -> list[float]:
        """Each server process's CPU seconds so far (user + system)."""
        return [_cpu_s(proc.pid) for proc in self.procs]

    def redis_cpu_s(self) -> float:
        info = self.redis_client.info("cpu")
        return float(info["used_cpu_user"]) + float(info["used_cpu_sys"])

    def redis_clients(self) -> int:
        """Connections Redis has open, less the two this process holds (its store and this check)."""
        return int(self.redis_client.info("clients")["connected_clients"]) - 2

    def submit(self, count: int) -> list[str]:
        with gradserve.Client(self.addresses[0]) as c:
            return [c.submit(dataset="builtin:pydocs", model="rnn", hidden_size=16, max_steps=1_000_000).id
                    for _ in range(count)]

    def stop(self) -> None:
        for proc in self.procs:
            proc.terminate()
        for proc in self.procs:
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                proc.kill()
        self.redis.terminate()
        self.redis.wait(timeout=15)


def _cpu_s(pid: int) -> float:
    """A process's CPU seconds so far (user + system)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def _wait_serving(address: str, proc: subprocess.Popen, folder: Path) -> None:
    deadline = time.monotonic() + 90
    with grpc.insecure_channel(address) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        while True:
            try:
                if stub.Check(health_pb2.HealthCheckRequest(), timeout=1).status == \
                        health_pb2.HealthCheckResponse.SERVING:
                    return
            except grpc.RpcError:
                pass
            if proc.poll() is not None or time.monotonic() > deadline:
                logs = "\n".join(p.read_text()[-2000:] for p in folder.glob("server*.log"))
                raise RuntimeError(f"a server did not come up:\n{logs}")
            time.sleep(0.2)


# -------------------------------------------------------- the writer side

class Writer:
    """Claims jobs as a worker would, then appends metrics events to each at `rate` per second."""

    def __init__(self, job_store: store.JobStore, job_ids: list[str]):
        self.store = job_store
        self.leases = [job_store.claim(job_id, 1, "bench-writer", LEASE_S) for job_id in job_ids]

    def paced(self, events: int, rate: float) -> float:
        """`events` metrics events per job, the jobs interleaved, each job at `rate`; the seconds it took."""
        start = time.monotonic()
        for step in range(1, events + 1):
            for lease in self.leases:
                self.store.append_event(lease, _metrics(step))
            pause = start + step / rate - time.monotonic()
            if pause > 0:
                time.sleep(pause)
        return time.monotonic() - start

    def burst(self, events: int) -> float:
        """`events` metrics events per job as fast as Redis takes them; the seconds it took."""
        start = time.monotonic()
        for step in range(1, events + 1):
            for lease in self.leases:
                self.store.append_event(lease, _metrics(step))
        return time.monotonic() - start

    def finish(self) -> None:
        for lease in self.leases:
            self.store.finish(lease, jobs_pb2.SUCCEEDED, step=0)


def _metrics(step: int) -> jobs_pb2.Event:
    return jobs_pb2.Event(metrics=jobs_pb2.Metrics(step=step, loss=2.0, perplexity=7.39, tokens_per_sec=50_000.0,
                                                   lr=1.0, grad_norm=0.5))


# ------------------------------------------------------- the watcher side

class _Record:
    __slots__ = ("steps", "latencies", "resumes", "started", "ended", "error")

    def __init__(self):
        self.started = False
        self.steps: list[int] = []
        self.latencies: list[float] = []
        self.resumes = 0
        self.ended = False
        self.error = ""


async def _watch(stub, job_id: str, record: _Record, first: asyncio.Event, count: list[int], total: int) -> None:
    cursor = ""
    while not record.ended:
        resume = False
        try:
            async for batch in stub.StreamEventBatches(jobs_pb2.StreamEventsRequest(job_id=job_id, cursor=cursor)):
                now = time.time()
                if not record.started:
                    record.started = True
                    count[0] += 1
                    if count[0] == total:
                        first.set()
                for event in batch.events:
                    kind = event.WhichOneof("kind")
                    if kind == "notice":
                        resume = True  # asked to reconnect: its cursor is that of the last event given
                        break
                    cursor = event.cursor
                    if kind == "metrics":
                        record.steps.append(event.metrics.step)
                        record.latencies.append(now - event.time.ToNanoseconds() / 1e9)
                    elif store.is_terminal(event):
                        record.ended = True
                if resume:
                    record.resumes += 1
                    break
        except grpc.aio.AioRpcError as e:
            record.error = f"{e.code().name}: {e.details()}"
            return
        if not resume and not record.ended:
            record.error = "the stream ended before the job did"
            return


async def _watch_all(plan: dict) -> dict:
    """Open plan["watchers"] = [[target, job_id, n], ...] streams; say "ready" once each has its first event."""
    total = sum(n for _, _, n in plan["watchers"])
    first, count = asyncio.Event(), [0]
    channels, tasks, records = [], [], []
    for target, job_id, n in plan["watchers"]:
        for i in range(n):
            if i % WATCHERS_PER_CHANNEL == 0:
                # A channel argument of its own keeps each channel on its own connection.
                channel = grpc.aio.insecure_channel(target, options=[("grpc.use_local_subchannel_pool", 1),
                                                                     ("bench.channel", len(channels))])
                channels.append(channel)
                stub = jobs_pb2_grpc.JobServiceStub(channel)
            record = _Record()
            records.append((job_id, record))
            tasks.append(asyncio.create_task(_watch(stub, job_id, record, first, count, total)))
    # Past a few thousand open streams gRPC may leave a call unstarted, without an error: those are
    # counted, not waited for.
    try:
        await asyncio.wait_for(first.wait(), START_WAIT_S)
    except TimeoutError:
        pass
    print("ready", flush=True)
    cpu0 = time.process_time()
    running = [task for task, (_, record) in zip(tasks, records) if record.started]
    await asyncio.gather(*running)
    late = [task for task in tasks if not task.done()]
    if late:
        await asyncio.wait(late, timeout=START_WAIT_S)
        for task in late:
            task.cancel()
        await asyncio.gather(*late, return_exceptions=True)
    cpu = time.process_time() - cpu0
    for channel in channels:
        await channel.close()
    by_job: dict[str, list[_Record]] = {}
    for job_id, record in records:
        by_job.setdefault(job_id, []).append(record)
    return {"watchers": len(records), "cpu_s": round(cpu, 2), "never_started": sum(not r.started for _, r in records),
            "errors": sorted({r.error for _, r in records if r.error and r.started}),
            "resumes": sum(r.resumes for _, r in records),
            "ended": sum(r.ended for _, r in records),
            "exact": sum(r.steps == list(range(1, plan["events"] + 1)) for _, r in records),
            "latencies_ms": [round(1000 * x, 3) for _, r in records for x in r.latencies]}


def watch_main(plan_json: str) -> None:
    # This process stands for a thousand separate clients, yet it keeps every latency it measures: its
    # collector's runs would stall all of them at once and be counted as the relay's latency.
    gc.disable()
    print(json.dumps(asyncio.run(_watch_all(json.loads(plan_json)))), flush=True)


class Watchers:
    """A watcher process (this file with --watch) following `plan`; start() returns once every stream has begun."""

    def __init__(self, watchers: list[tuple[str, str, int]], events: int):
        plan = json.dumps({"watchers": watchers, "events": events})
        self.proc = subprocess.Popen([sys.executable, __file__, "--watch", plan], stdout=subprocess.PIPE, text=True)

    def started(self, timeout: float = 300) -> None:
        line = _readline(self.proc, timeout)
        if line.strip() != "ready":
            raise RuntimeError(f"the watchers did not start: {line!r}")

    def result(self, timeout: float = 600) -> dict:
        return json.loads(_readline(self.proc, timeout))


def _readline(proc: subprocess.Popen, timeout: float) -> str:
    box: list[str] = []
    reader = threading.Thread(target=lambda: box.append(proc.stdout.readline()), daemon=True)
    reader.start()
    reader.join(timeout)
    if not box or not box[0]:
        proc.kill()
        raise RuntimeError(f"the watcher process said nothing within {timeout:.0f} s (exit {proc.poll()})")
    return box[0]


# ------------------------------------------------ the floor: grpc.aio alone

FLOOR_JOB = "job-floor"


def _floor_batch(event: jobs_pb2.Event) -> bytes:
    return jobs_pb2.EventBatch(events=[event]).SerializeToString()


async def _floor_serve(port: int) -> None:
    """StreamEventBatches and nothing behind it: no Redis, no relay, no interceptors.

    Each stream gets a queued status event at once, then every event a pacer
    puts in its queue, the same bytes for all. It paces `N` events at RATE
    when a line "N" comes on stdin, then a terminal status event, and says
    "done".
    """
    queues: set[asyncio.Queue] = set()
    first = _floor_batch(jobs_pb2.Event(cursor="1-0", job_id=FLOOR_JOB, time=store.timestamp(time.time()),
                                        status=jobs_pb2.StatusChange(state=jobs_pb2.QUEUED)))

    async def stream(request, context):
        queue: asyncio.Queue = asyncio.Queue()
        queues.add(queue)
        try:
            yield first
            while (wire := await queue.get()) is not None:
                yield wire
        finally:
            queues.discard(queue)

    server = grpc.aio.server(options=[("grpc.so_reuseport", 0)])
    server.add_generic_rpc_handlers([grpc.method_handlers_generic_handler(
        "gradserve.v1.JobService", {"StreamEventBatches": grpc.unary_stream_rpc_method_handler(stream)})])
    server.add_insecure_port(f"127.0.0.1:{port}")
    # The collector as gradserve-server sets it, so that the two differ only in what stands behind the streams.
    serving.tune_collector()
    await server.start()
    print("serving", flush=True)
    loop = asyncio.get_running_loop()
    events = int(await loop.run_in_executor(None, sys.stdin.readline))
    start = loop.time()
    for step in range(1, events + 2):
        event = _metrics(step) if step <= events else jobs_pb2.Event(
            status=jobs_pb2.StatusChange(state=jobs_pb2.SUCCEEDED))
        event.cursor, event.job_id = f"{step + 1}-0", FLOOR_JOB
        event.time.CopyFrom(store.timestamp(time.time()))
        wire = _floor_batch(event)
        for queue in list(queues):
            queue.put_nowait(wire)
        await asyncio.sleep(max(0.0, start + step / RATE - loop.time()))
    for queue in list(queues):
        queue.put_nowait(None)
    print("done", flush=True)
    await loop.run_in_executor(None, sys.stdin.readline)
    await server.stop(None)


class Floor:
    """A process serving _floor_serve on a free loopback port."""

    def __init__(self):
        self.address = f"127.0.0.1:{dev.free_port()}"
        self.proc = subprocess.Popen([sys.executable, __file__, "--floor", self.address.rsplit(":", 1)[1]],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        if _readline(self.proc, 60).strip() != "serving":
            raise RuntimeError("the bare grpc.aio server did not start")

    def cpu_s(self) -> float:
        return _cpu_s(self.proc.pid)

    def paced(self, events: int) -> float:
        start = time.monotonic()
        self.proc.stdin.write(f"{events}\n")
        self.proc.stdin.flush()
        if _readline(self.proc, events / RATE + 60).strip() != "done":
            raise RuntimeError("the bare grpc.aio server did not finish")
        return time.monotonic() - start

    def stop(self) -> None:
        self.proc.stdin.close()
        try:
            self.proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            self.proc.kill()


# ------------------------------------------------------------ the cases

def _load() -> str:
    one, five, fifteen = os.getloadavg()
    return f"{one:.2f} / {five:.2f} / {fifteen:.2f}"


def _percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] if ordered else float("nan")


def _summary(name: str, result: dict, jobs: int, events: int, seconds: float, cpu: float, others: dict) -> dict:
    lat = result["latencies_ms"]
    delivered = len(lat)
    return {"case": name, "watchers": result["watchers"], "never_started": result["never_started"], "jobs": jobs, "events_per_job": events,
            "exact": result["exact"], "ended": result["ended"], "resumes": result["resumes"],
            "errors": result["errors"], "delivered": delivered, "seconds": round(seconds, 2),
            "p50_ms": round(_percentile(lat, 0.5), 1), "p99_ms": round(_percentile(lat, 0.99), 1),
            "max_ms": round(max(lat), 1) if lat else None,
            "events_per_s": round(delivered / seconds) if seconds else None,
            "server_cpu_s": round(cpu, 2), "watchers_cpu_s": result["cpu_s"],
            "redis_cpu_s": round(others.get("redis", 0.0), 2), "writer_cpu_s": round(others.get("writer", 0.0), 2),
            "cpu_ms_per_1k": round(1000 * cpu / delivered * 1000, 1) if delivered >= 1000 else None,
            "cores_busy": round((cpu + result["cpu_s"] + others.get("redis", 0.0) + others.get("writer", 0.0))
                                / seconds, 2) if seconds else None,
            "load": _load()}


def paced_case(name: str, jobs: int, per_job: int, seconds: float) -> dict:
    stack = Stack(servers=1)
    try:
        job_ids = stack.submit(jobs)
        events = int(seconds * RATE)
        watchers = Watchers([(stack.addresses[0], job_id, per_job) for job_id in job_ids], events)
        watchers.started()
        writer = Writer(stack.store, job_ids)
        cpu0, redis0, writer0 = sum(stack.cpu_s()), stack.redis_cpu_s(), time.process_time()
        took = writer.paced(events, RATE)
        writer.finish()
        result = watchers.result()
        cpu = sum(stack.cpu_s()) - cpu0
        others = {"redis": stack.redis_cpu_s() - redis0, "writer": time.process_time() - writer0}
        return _summary(name, result, jobs, events, took, cpu, others)
    finally:
        stack.stop()


def queued_case(watchers_n: int = 5000, jobs: int = 50, servers: int = 4) -> dict:
    # One server process serves at most DEFAULT_MAX_WATCHERS (1,500) streams, so 5,000 take four.
    stack = Stack(servers=servers)
    try:
        idle = stack.redis_clients()
        job_ids = stack.submit(jobs + 1)
        queued, running = job_ids[:jobs], job_ids[jobs]
        waiting = Watchers([(stack.addresses[i % servers], job_id, watchers_n // jobs)
                            for i, job_id in enumerate(queued)], 0)
        waiting.started()
        time.sleep(2)  # let the history reads the watchers started finish, so only what stays open is counted
        held = stack.redis_clients()
        events = int(10 * RATE)
        live = Watchers([(stack.addresses[0], running, 1)], events)
        live.started()
        writer = Writer(stack.store, [running])
        cpu0, redis0, writer0 = sum(stack.cpu_s()), stack.redis_cpu_s(), time.process_time()
        took = writer.paced(events, RATE)
        with_live = stack.redis_clients()
        writer.finish()
        live_result = live.result()
        cpu = sum(stack.cpu_s()) - cpu0
        others = {"redis": stack.redis_cpu_s() - redis0, "writer": time.process_time() - writer0}
        Writer(stack.store, queued).finish()
        waiting_result = waiting.result()
        out = _summary(f"1 watcher on a running job, {watchers_n:,} on {jobs} queued jobs", live_result, 1, events,
                       took, cpu, others)
        out.update({"queued_watchers": waiting_result["watchers"], "queued_never_started": waiting_result["never_started"], "queued_jobs": jobs, "queued_servers": servers,
                    "queued_ended": waiting_result["ended"], "queued_errors": waiting_result["errors"],
                    "redis_clients_idle": idle, "redis_clients_held": held, "redis_clients_with_live": with_live})
        return out
    finally:
        stack.stop()


def saturation_case(servers: int, watchers_n: int, events: int) -> dict:
    stack = Stack(servers=servers)
    try:
        [job_id] = stack.submit(1)
        # The watchers split evenly over the server processes, as a client target list would spread them.
        share = [watchers_n // servers + (i < watchers_n % servers) for i in range(servers)]
        watchers = Watchers([(address, job_id, n) for address, n in zip(stack.addresses, share)], events)
        watchers.started()
        writer = Writer(stack.store, [job_id])
        cpu0, redis0, writer0 = stack.cpu_s(), stack.redis_cpu_s(), time.process_time()
        start = time.monotonic()
        writer.burst(events)
        writer.finish()
        result = watchers.result()
        took = time.monotonic() - start
        cpu = [b - a for a, b in zip(cpu0, stack.cpu_s())]
        others = {"redis": stack.redis_cpu_s() - redis0, "writer": time.process_time() - writer0}
        out = _summary(f"saturation, {servers} server process{'es' if servers > 1 else ''}", result, 1, events,
                       took, sum(cpu), others)
        out["servers"] = servers
        out["server_cpu_each_s"] = [round(c, 2) for c in cpu]
        return out
    finally:
        stack.stop()


def floor_case(seconds: float) -> dict:
    """1000 watchers on one job, served by grpc.aio alone: what the relay's figures compare with."""
    floor = Floor()
    try:
        events = int(seconds * RATE)
        watchers = Watchers([(floor.address, FLOOR_JOB, 1000)], events)
        watchers.started()
        cpu0 = floor.cpu_s()
        took = floor.paced(events)
        result = watchers.result()
        return _summary("1 job x 1000 watchers, bare grpc.aio (no Redis, no gradserve)", result, 1, events, took,
                        floor.cpu_s() - cpu0, {})
    finally:
        floor.stop()


# ----------------------------------------------------------- the report

def render(results: list[dict]) -> str:
    when = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    lines = [HEADING, "",
             f"`bench/fanout.py`, {when}, {os.cpu_count()} cores. Real redis-server, `gradserve-server` and "
             "StreamEvents calls over loopback TCP; the watchers run in their own process. Events are appended "
             "with the worker's own store call (`JobStore.append_event`) by a paced writer instead of a "
             "training worker, so the cores go to the relay. Latency runs from the event's own time (set before "
             "it is written to Redis) to its receipt by a watcher. *exactly once* counts the watchers that got "
             "every step once, in order, and then the job's end. *Cores busy* is the CPU time of every process "
             "in the case over its seconds: as it nears the machine's cores, events wait for a core and latency "
             "is queueing. Load is the 1/5/15-minute load average when the case ended. The watchers' process runs "
             "without its garbage collector: it keeps every latency it measures, and its collections would stall "
             "a thousand watchers at once. The *bare grpc.aio* row serves the same watchers the same events from "
             "a grpc.aio process with nothing behind the streams (no Redis, no relay, one queue a stream), as "
             "`gradserve-server` sets up its collector: about the least a relay in one grpc.aio server process "
             "could cost here.", "",
             "| case | watchers | events | exactly once | latency p50 / p99 / max | delivered | server CPU "
             "per 1k events | CPU s: server / watchers / redis / writer | cores busy | load |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        lines.append(
            f"| {r['case']} | {r['watchers']:,} on {r['jobs']} job{'s' if r['jobs'] > 1 else ''} | "
            f"{r['events_per_job']:,} per job | {r['exact']:,} of {r['watchers']:,}"
            f"{'; ' + str(r['resumes']) + ' resumed' if r['resumes'] else ''}"
            f"{'; errors: ' + ', '.join(r['errors']) if r['errors'] else ''}"
            f"{'; ' + str(r['never_started']) + ' never started' if r['never_started'] else ''} | "
            f"{r['p50_ms']} / {r['p99_ms']} / {r['max_ms']} ms | {r['delivered']:,} in {r['seconds']} s "
            f"({r['events_per_s']:,}/s) | {str(r['cpu_ms_per_1k']) + ' ms' if r['cpu_ms_per_1k'] is not None else '-'} | "
            f"{r['server_cpu_s']} / {r['watchers_cpu_s']} / {r['redis_cpu_s']} / {r['writer_cpu_s']} | "
            f"{r['cores_busy']} of {os.cpu_count()} | {r['load']} |")
    for r in results:
        if "queued_watchers" in r:
            lines += ["", f"**Watchers on queued jobs.** {r['queued_watchers']:,} watchers on {r['queued_jobs']} "
                      f"queued jobs, spread over {r['queued_servers']} server processes (one serves at most "
                      f"1,500 streams: `--max-watchers`), held {r['redis_clients_held']} Redis connections "
                      f"({r['redis_clients_idle']} before any watcher; with one more watcher on a running job, "
                      f"{r['redis_clients_with_live']}). The bound per server process is constant: the relay's "
                      "one reader, its 8 short history reads, and the server's thread pool for other calls "
                      "(min(32, cores + 4)), however many watchers and jobs. All "
                      f"{r['queued_ended']:,} that began ended with their jobs"
                      f"{f'; {n} calls never began (gRPC left them waiting without an error)' if (n := r['queued_never_started']) else ''}"
                      f"{'; errors: ' + ', '.join(r['queued_errors']) if r['queued_errors'] else ''}."]
    sat = {r["servers"]: r for r in results if "servers" in r}
    if sat:
        lines += ["", "**Saturation.** One job, its events written as fast as Redis takes them, every watcher "
                  "following it live. *Server CPU per 1k events* is the server processes' user + system time "
                  "over the events delivered; 1000 divided by it is what one fully busy core would deliver."]
        for n, r in sorted(sat.items()):
            capacity = round(1e6 / r["cpu_ms_per_1k"]) if r["cpu_ms_per_1k"] else 0
            lines.append(f"- {n} server process{'es' if n > 1 else ''}: {r['events_per_s']:,} events/s delivered, "
                         f"server CPU {', '.join(f'{c} s' for c in r['server_cpu_each_s'])} over {r['seconds']} s; "
                         f"{capacity:,} events per server CPU-second.")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=Path(__file__).resolve().parents[1] / "BENCHMARKS.md")
    p.add_argument("--json", type=Path, help="also write the raw figures here")
    p.add_argument("--cases", default=",".join(CASES), help=f"a comma-separated subset of {', '.join(CASES)}")
    p.add_argument("--seconds", type=float, default=15.0, help="how long each paced case writes (default 15)")
    p.add_argument("--watch", help=argparse.SUPPRESS)
    p.add_argument("--floor", type=int, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.watch:
        watch_main(args.watch)
        return
    if args.floor:
        asyncio.run(_floor_serve(args.floor))
        return
    cases = [c.strip() for c in args.cases.split(",") if c.strip()]
    unknown = sorted(set(cases) - set(CASES))
    if unknown:
        p.error(f"--cases: unknown {', '.join(unknown)}; choose from {', '.join(CASES)}")
    results = []
    for case in cases:
        print(f"fanout: {case} ...", flush=True)
        if case == "one-job":
            results.append(paced_case("1 job x 1000 watchers", 1, 1000, args.seconds))
        elif case == "floor":
            results.append(floor_case(args.seconds))
        elif case == "many-jobs":
            results.append(paced_case("100 jobs x 10 watchers", 100, 10, args.seconds))
        elif case == "queued":
            results.append(queued_case())
        else:
            results.append(saturation_case(1, 200, 2000))
            results.append(saturation_case(2, 200, 2000))
        print(json.dumps(results[-1], indent=None), flush=True)
    write_section(args.out, HEADING, render(results))
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))
    print(f"fanout: wrote {args.out}")


if __name__ == "__main__":
    sys.exit(main())
