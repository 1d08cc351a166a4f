"""The dashboard: how fast a long job's page first renders, and what open pages cost the server.

    make bench                                                        # runs this last
    .venv/bin/python bench/dashboard.py --out /tmp/b.md
    .venv/bin/python bench/dashboard.py --screenshots bench/plots     # also the README's screenshots

Real processes on loopback: a redis-server and one `gradserve-server` with --http-listen. The long job is
written with the worker's own store calls (JobStore.claim, then JobStore.append_event for each report, as a
training worker makes them), so its size is exact and no core goes to training:

  first render   a job with 10,000 metrics events (10,000 points on each curve: train loss, perplexity,
                 grad norm, lr, tokens/s), 10,000 evaluations and 250 probes, opened in headless Chromium
                 (Debian's chromium, through selenium). Timed from the navigation's start to the first frame
                 drawn after the page has every event up to the one newest when it loaded (`gsJob.caughtUp`).
                 Cold: each load opens a copy of the job (Redis COPY of its record and events) that no page
                 has opened, so the server reads its whole history; warm: one copy opened again, its
                 history kept by the server. With the server's CPU for each load.
  open pages     100 job pages' event streams (Server-Sent Events, one per page, as the page opens it) on a
                 job that reports 20 events/s, held by a client process of its own: the server's CPU over
                 30 s, against the same 30 s with no page open. Then the CPU the server spends sending the
                 whole history of another copy of the 10,000-point job to 10 pages opened at once.

With --screenshots, a real worker trains three small jobs on The Time Machine and the same browser saves the
job page and the compare page as PNGs.

The machine's load (os.getloadavg) is recorded beside each figure.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from datetime import datetime, timezone
from pathlib import Path

from gradserve.v1 import jobs_pb2
from gradserve_server import corpus, dev
from gradserve_store import store

from sections import write_section

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests" / "harness"))
import browser  # noqa: E402

HEADING = "## The dashboard"
POINTS = 10_000
PROBES = 250
WINDOW = 35
PAGES = 100
# Pages opening the long job at once: each reads its whole history, so a few say what one costs.
HISTORY_PAGES = 10
RATE = 20
HOLD_S = 30.0


def _load() -> str:
    return " / ".join(f"{x:.2f}" for x in os.getloadavg())


def _cpu_s(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


class Stack:
    """redis-server and one gradserve-server with the dashboard, in a temporary folder."""

    def __init__(self):
        self.dir = Path(tempfile.mkdtemp(prefix="gradserve-bench-dashboard-"))
        port = dev.free_port()
        self.redis = dev.start_redis(port, self.dir)
        self.redis_url = f"redis://127.0.0.1:{port}/0"
        self.address, self.web = f"127.0.0.1:{dev.free_port()}", f"127.0.0.1:{dev.free_port()}"
        self.log = open(self.dir / "server.log", "wb")
        self.server = subprocess.Popen([sys.executable, "-m", "gradserve_server.main", "--redis-url", self.redis_url,
                                        "--listen", self.address, "--http-listen", self.web],
                                       stdout=self.log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 30
        while True:
            try:
                urllib.request.urlopen(f"http://{self.web}/healthz", timeout=1).read()
                break
            except OSError:
                if time.monotonic() > deadline or self.server.poll() is not None:
                    raise RuntimeError((self.dir / "server.log").read_text())
                time.sleep(0.2)
        self.store = store.JobStore.from_url(self.redis_url)
        self.workers: list[subprocess.Popen] = []
        # The server builds its first built-in corpus when it starts, on the cores the pages measured here use.
        first = next(iter(corpus.BUILTINS))
        while not self.store.builtin_dataset_id(first):
            if time.monotonic() > deadline + 120 or self.server.poll() is not None:
                raise RuntimeError(f"the server never built {first}:\n" + (self.dir / "server.log").read_text())
            time.sleep(0.2)

    def stop(self) -> None:
        for proc in self.workers:
            dev.stop_process(proc, 15)
        dev.stop_process(self.server)
        dev.stop_process(self.redis)
        self.store.close()


def write_long_job(job_store: store.JobStore, points: int = POINTS, probes: int = PROBES) -> tuple[str, store.Lease]:
    """A RUNNING job with `points` metrics events and evaluations and `probes` probes, as a worker writes them."""
    job_id = store.new_job_id()
    spec = jobs_pb2.JobSpec(dataset="builtin:timemachine", model="lstm", hidden_size=256, num_layers=1,
                            batch_size=32, num_steps=WINDOW, max_steps=2 * points, clip_norm=1.0, lr=1.0,
                            truncation="fixed", log_every=1, probe_every=points // probes)
    job_store.create_job(job_id, spec, "cpu")
    lease = job_store.claim(job_id, 1, "bench@dashboard", 3600)
    for step in range(1, points + 1):
        loss = 3.3 * (0.25 + 0.75 * 2.718 ** (-step / 2500)) + 0.03 * ((step * 7919) % 13) / 13
        gn = 0.4 + 1.6 * 2.718 ** (-step / 4000) + 0.5 * ((step * 104729) % 17) / 17
        event = jobs_pb2.Event(metrics=jobs_pb2.Metrics(
            step=step, loss=loss, perplexity=2.718 ** loss, tokens_per_sec=150_000 + (step % 50) * 300, lr=1.0,
            grad_norm=gn, clipped=gn > 1.0, tokens=step * 32 * WINDOW, seconds=step * 0.01))
        job_store.append_event(lease, event)
        val = jobs_pb2.Event(evaluation=jobs_pb2.Evaluation(
            step=step, loss=loss + 0.08, perplexity=2.718 ** (loss + 0.08)))
        job_store.append_event(lease, val)
        if step % (points // probes) == 0:
            profile = [10 ** (-3 * (1 - t / WINDOW) * (1 - step / (2 * points))) for t in range(WINDOW)]
            job_store.append_event(lease, jobs_pb2.Event(probe=jobs_pb2.Probe(step=step, grad_through_time=[
                                                             jobs_pb2.GradProfile(layer=0, norms=profile)])))
    return job_id, lease


def copy_job(job_store: store.JobStore, job_id: str) -> str:
    """A new job with `job_id`'s record and events: a job no page has opened yet, without writing it again."""
    copy = store.new_job_id()
    for key in (store.job_key, store.events_key):
        assert job_store.r.copy(key(job_id), key(copy))
    return copy


def first_render(stack: Stack, job_id: str, runs: int = 5) -> dict:
    driver = browser.chrome()
    try:
        def load(job: str) -> tuple[float, float]:
            driver.get("about:blank")
            cpu0 = _cpu_s(stack.server.pid)
            driver.get(f"http://{stack.web}/jobs/{job}")
            deadline = time.monotonic() + 60
            while not driver.execute_script("return !!(window.gsJob && window.gsJob.caughtUp)"):
                if time.monotonic() > deadline:
                    raise RuntimeError("the page never caught up")
                time.sleep(0.02)
            # The first frame after the last points were handed to the charts.
            ms = driver.execute_async_script(
                "const done = arguments[0]; requestAnimationFrame(() => done(performance.now()));")
            cpu = _cpu_s(stack.server.pid) - cpu0
            points = driver.execute_script("return window.gsJob.charts.loss[0].data[0].length")
            assert points == POINTS, points
            errors = browser.console_errors(driver)
            assert not errors, errors
            return ms, cpu

        load(copy_job(stack.store, job_id))  # warms the browser's cache of the scripts
        copies = [copy_job(stack.store, job_id) for _ in range(runs)]
        cold = [load(job) for job in copies]
        cold_load = _load()
        warm = [load(copies[0]) for _ in range(runs)]
        return {"runs": runs, "points": POINTS, "cold": _summary(cold, cold_load), "warm": _summary(warm, _load())}
    finally:
        driver.quit()


def _summary(loads: list[tuple[float, float]], load: str) -> dict:
    times = [ms for ms, _ in loads]
    return {"median_ms": round(statistics.median(times)), "min_ms": round(min(times)), "max_ms": round(max(times)),
            "cpu_s": round(statistics.median(cpu for _, cpu in loads), 3), "load": load}


# ------------------------------------------------------------ 100 pages, in a process of their own

async def _hold_pages(web: str, job_id: str, pages: int, seconds: float, want: int) -> dict:
    """Open `pages` event streams on the job, as that many job pages do: with `want`, from its start until each
    has `want` events; without, from its newest event on, for `seconds`."""
    import aiohttp

    events = 0
    opened = asyncio.Event()
    started = 0

    async def page(session, after: str):
        nonlocal events, started
        got = 0
        headers = {"Last-Event-ID": after} if after else {}
        try:
            async with session.get(f"http://{web}/api/jobs/{job_id}/events", headers=headers) as reply:
                started += 1
                if started == pages:
                    opened.set()
                async for line in reply.content:
                    if line.startswith(b"data: {"):
                        batch = json.loads(line[6:])
                        got += sum(len(batch.get(k, {}).get("cursor", ())) for k in ("metrics", "evaluation"))
                        got += len(batch.get("events", ()))
                        if want and got >= want:
                            return
        finally:
            events += got

    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=None)) as session:
        reply = await session.get(f"http://{web}/api/jobs/{job_id}")
        newest = json.loads(await reply.read())["newest_cursor"]
        tasks = [asyncio.create_task(page(session, "" if want else newest)) for _ in range(pages)]
        await opened.wait()
        print("open", flush=True)
        start = time.monotonic()
        if want:
            await asyncio.gather(*tasks)
        else:
            await asyncio.sleep(seconds)
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
        took = time.monotonic() - start
    return {"events": events, "seconds": took}


def hold_pages_main(argv: list[str]) -> None:
    web, job_id, pages, seconds, want = argv[0], argv[1], int(argv[2]), float(argv[3]), int(argv[4])
    print(json.dumps(asyncio.run(_hold_pages(web, job_id, pages, seconds, want))), flush=True)


def open_pages(stack: Stack, job_id: str, lease: store.Lease, long_job: str) -> dict:
    """`long_job`: a job with a long history that no page has opened."""
    stop = threading.Event()
    step = [POINTS]

    def report():
        # A job reporting RATE events a second, as a training job logging often does.
        while not stop.is_set():
            step[0] += 1
            stack.store.append_event(lease, jobs_pb2.Event(metrics=jobs_pb2.Metrics(step=step[0], loss=1.0)))
            time.sleep(1 / RATE)

    writer = threading.Thread(target=report, daemon=True)
    writer.start()
    try:
        cpu0 = _cpu_s(stack.server.pid)
        time.sleep(HOLD_S)
        idle_cpu = _cpu_s(stack.server.pid) - cpu0
        pages = subprocess.Popen([sys.executable, __file__, "--hold-pages", stack.web, job_id, str(PAGES),
                                  str(HOLD_S), "0"], stdout=subprocess.PIPE, text=True)
        assert pages.stdout.readline().strip() == "open"
        cpu0 = _cpu_s(stack.server.pid)
        held = json.loads(pages.stdout.readline())
        held_cpu = _cpu_s(stack.server.pid) - cpu0
        pages.wait()
    finally:
        stop.set()
        writer.join()
    stored = stack.store.r.xlen(store.events_key(long_job))
    loads = subprocess.Popen([sys.executable, __file__, "--hold-pages", stack.web, long_job, str(HISTORY_PAGES), "0",
                              str(stored)], stdout=subprocess.PIPE, text=True)
    cpu0 = _cpu_s(stack.server.pid)
    assert loads.stdout.readline().strip() == "open"
    loaded = json.loads(loads.stdout.readline())
    load_cpu = _cpu_s(stack.server.pid) - cpu0
    loads.wait()
    return {"pages": PAGES, "rate": RATE, "hold_s": HOLD_S, "idle_cpu_s": round(idle_cpu, 2),
            "held_cpu_s": round(held_cpu, 2), "held_events": held["events"],
            "history_events": loaded["events"], "history_s": round(loaded["seconds"], 2),
            "history_pages": HISTORY_PAGES, "history_cpu_s": round(load_cpu, 2), "load": _load()}


# ------------------------------------------------------------ screenshots

def screenshots(stack: Stack, out: Path) -> list[str]:
    import gradserve

    for i in range(2):
        with open(stack.dir / f"worker-{i}.log", "wb") as log:
            stack.workers.append(dev.start_worker(stack.redis_url, name=f"w{i}@bench", log_file=log))
    dev.wait_for_workers(stack.redis_url, 2, 90, stack.workers)
    common = dict(preprocess="d2l", model="gru", hidden_size=64, batch_size=32, num_steps=35, max_steps=600,
                  log_every=5, eval_every=50, probe_every=20, checkpoint_every=300, device="cpu")
    with gradserve.Client(stack.address) as c:
        dataset = c.upload_text(REPO / "tests" / "data" / "timemachine.txt")
        jobs = [c.submit(dataset=dataset, truncation=t, lr=lr, **common)
                for t, lr in (("fixed", 1.0), ("randomized", 1.0), ("fixed", 0.3))]
        for job in jobs:
            job.wait(timeout=600)
    driver = browser.chrome(1400, 1500)
    try:
        saved = []
        for name, path, ready in (
            ("dashboard-job.png", f"/jobs/{jobs[0].id}", "window.gsJob && window.gsJob.caughtUp"),
            ("dashboard-compare.png", f"/compare?jobs={','.join(j.id for j in jobs)}",
             "[...window.gsCompare.followed.values()].every((f) => f.stream === 'ended' && +f.canvas.dataset.columns > 0)"),
        ):
            driver.get(f"http://{stack.web}{path}")
            deadline = time.monotonic() + 30
            while not driver.execute_script(f"return !!({ready})"):
                assert time.monotonic() < deadline, f"{name}: the page never drew"
                time.sleep(0.1)
            time.sleep(0.5)
            height = driver.execute_script("return document.documentElement.scrollHeight")
            driver.set_window_size(1400, min(height + 20, 2600))
            driver.save_screenshot(str(out / name))
            saved.append(name)
            errors = browser.console_errors(driver)
            assert not errors, errors
        return saved
    finally:
        driver.quit()


def render(render_result: dict, pages: dict) -> str:
    r, p = render_result, pages
    cold, warm = r["cold"], r["warm"]
    when = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")

    def loads(x: dict) -> str:
        return (f"median **{x['median_ms']} ms** over {r['runs']} loads (min {x['min_ms']}, max {x['max_ms']} ms; "
                f"the server's CPU {1000 * x['cpu_s']:.0f} ms a load; load {x['load']})")

    return "\n".join([
        HEADING, "",
        f"`bench/dashboard.py`, {when}, {os.cpu_count()} cores shared with the browser, Redis and the page clients. "
        "Load is the 1/5/15-minute load average when each measurement ended.", "",
        f"**First render of a job page with {r['points']:,} points per curve** (train loss, perplexity, grad norm, "
        f"lr, tokens/s; {r['points']:,} validation points, {PROBES} heatmap columns), headless Chromium, from the "
        "navigation's start to the first frame after the page has every event:", "",
        f"- a job no page had opened on this server (it reads the whole history): {loads(cold)}: "
        f"{'within' if cold['median_ms'] < 1000 else 'over'} the goal of 1 s;",
        f"- a job opened before (its history kept by the server): {loads(warm)}.", "",
        f"**{p['pages']} open job pages** (one event stream each) on a job reporting {p['rate']} events/s, "
        f"held {p['hold_s']:.0f} s: the server spent {p['held_cpu_s']} CPU s "
        f"({100 * p['held_cpu_s'] / p['hold_s']:.1f} % of a core) against {p['idle_cpu_s']} s "
        f"({100 * p['idle_cpu_s'] / p['hold_s']:.1f} %) with none open; {p['held_events']:,} events delivered "
        f"(load {p['load']}).", "",
        f"**{p['history_pages']} pages opening the {r['points']:,}-point job at once**, no page having opened it "
        f"before: {p['history_events']:,} events sent in {p['history_s']} s, for {p['history_cpu_s']} CPU s of the "
        f"server ({1e6 * p['history_cpu_s'] / max(1, p['history_events']):.1f} us an event sent; the pages share one "
        "read of the history).", "",
        "Before, this page took 2.7 s (median, load 1.8; 2026-12-01). Timed in the browser at a load of about 2, "
        "the 2.7 s were: the page and its scripts about 0.2 s; the history 1.2 to 1.5 s, bound by the server "
        "(about 0.8 CPU s a page, most of it parsing Redis's reply entry by entry and building gRPC bytes the page "
        "never used); 0.6 s waiting out the page's 1 s gap between draws while catching up, after every event had "
        "come; 0.3 s drawing, 0.25 s of it a circle for each of the 10,000 validation points and clipped steps; "
        "and 0.3 s drawing every chart again for the job record the page fetched once caught up.", "",
        "Now pages get a job's stored history from the server's own read of it (`store.AsyncJobStore.read_history`: "
        "Redis packs 1,000 events into one string, and no gRPC bytes are built), 1,000 events a message, the "
        "full messages kept per job (`web.Histories`, up to 64 MiB) and one read shared by the pages opening a "
        "job at once; the relay takes over from the last of them. The page draws as soon as it has every event, "
        "marks at most one validation point or clipped step every few pixels, and redraws only its facts for the "
        "job record. Found while measuring: a page left for another kept its event stream open (Chromium keeps "
        "such a page whole, in its back/forward cache), so every seventh page opened in a row waited about a "
        "minute for one of the browser's six connections to the server; pages now close it when left.", "",
    ])


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--hold-pages"]:
        hold_pages_main(argv[1:])
        return
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, default=REPO / "BENCHMARKS.md", help="where to write the Markdown results")
    p.add_argument("--screenshots", type=Path, metavar="DIR", help="also save the README's screenshots here")
    args = p.parse_args(argv)
    why = browser.missing()
    if why:
        sys.exit(f"bench/dashboard.py: {why}")
    stack = Stack()
    try:
        long_job, _ = write_long_job(stack.store)
        rendered = first_render(stack, long_job)
        print(json.dumps(rendered), flush=True)
        live_job, lease = write_long_job(stack.store, points=10, probes=1)
        pages = open_pages(stack, live_job, lease, copy_job(stack.store, long_job))
        print(json.dumps(pages), flush=True)
        if args.screenshots:
            print(screenshots(stack, args.screenshots), flush=True)
    finally:
        stack.stop()
    write_section(args.out, HEADING, render(rendered, pages))


if __name__ == "__main__":
    main()
