"""What an upload costs the server: its peak resident memory and the seconds it takes.

    make bench                         # runs this after bench/memory.py
    .venv/bin/python bench/upload.py --out BENCHMARKS.md
    .venv/bin/python bench/upload.py --cases words-16,4x-words-16 --out /tmp/b.md --json /tmp/b.json

A real gRPC server process (with its own redis-server, as tests/conftest.py's
Stack starts them, `--max-dataset-mb 64` and otherwise the defaults, so
`--max-uploads 2`) takes uploads from gradserve.Client.upload_bytes in this
process. Before each case the server's resident high-water mark is reset
(/proc/PID/clear_refs "5") and its resident size read; after it, the
high-water mark (VmHWM): the rise is what the case cost the server, and the
peak is the server's whole footprint then, Python and gRPC included.

The texts are deterministic. "words": English-ish text, words drawn by a
seeded random with Zipf frequencies from 4,000 synthetic words and some
variants (capitalised, with a comma or a full stop), line breaks now and then:
a few thousand distinct words, like prose. "distinct": 7-letter words of
random letters, nearly all distinct (8.4 million in 64 MiB), the adversarial
case for counting distinct words. "4x-..." sends four such uploads at once
from four threads; the server receives two at a time and makes the others
wait (up to 10 s; one refused as busy is retried after a second, as a client
should, and counted). The machine's load (os.getloadavg) and core count are
recorded beside the figures: on a shared machine, seconds move with the load.

The results replace the section "Upload memory in the server" of --out (or
are appended). --baseline FILE (this script's --json output from an earlier
run, e.g. of older code) adds its figures beside the new ones.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import tempfile
import threading
import time
from datetime import datetime, timezone
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

import gradserve
from gradserve_server import corpus, dev
from gradserve_store import store
from sections import write_section

REPO = Path(__file__).resolve().parents[1]
HEADING = "## Upload memory in the server"
MIB = 2**20
MAX_DATASET_MB = 64
SEED = 0
DEFAULT_CASES = ("words-1", "words-16", "words-64", "distinct-64", "4x-words-16", "4x-words-64")


# ------------------------------------------------------------------ texts

def words_text(size: int, seed: int = SEED) -> bytes:
    """`size` bytes of English-ish text: Zipf-distributed draws from a fixed synthetic vocabulary."""
    rng = random.Random(seed)
    letters = "etaoinshrdlcumwfgypbvkjxqz"
    letter_weights = [12.7, 9.1, 8.2, 7.5, 7.0, 6.7, 6.3, 6.1, 6.0, 4.3, 4.0, 2.8, 2.8, 2.4, 2.4, 2.2, 2.0, 2.0,
                      1.9, 1.5, 1.0, 0.8, 0.2, 0.2, 0.1, 0.1]
    base = sorted({"".join(rng.choices(letters, letter_weights, k=rng.choice((1, 2, 2, 3, 3, 4, 4, 5, 5, 6, 7, 8,
                                                                                  9, 10, 12))))
                   for _ in range(4_500)}, key=lambda w: rng.random())[:4_000]
    vocab = base + [w.capitalize() for w in base[:600]] + [w + "," for w in base[:600]] + [w + "." for w in base[:300]]
    vocab.insert(40, "\n")
    weights = [1 / (rank + 1) for rank in range(len(vocab))]
    cum = [0.0]
    for w in weights:
        cum.append(cum[-1] + w)
    cum = cum[1:]
    parts, total = [], 0
    while total < size:
        piece = " ".join(rng.choices(vocab, cum_weights=cum, k=200_000)).encode() + b" "
        parts.append(piece)
        total += len(piece)
    return b"".join(parts)[:size]


def distinct_text(size: int, seed: int = SEED) -> bytes:
    """`size` bytes of 7-letter random words of both cases and a space: all but a handful distinct."""
    table = bytes(97 + b % 26 if b < 130 else 65 + b % 26 for b in range(256))
    text = bytearray(random.Random(seed).randbytes(size).translate(table))
    text[7::8] = b" " * len(range(7, size, 8))
    return bytes(text)


# ------------------------------------------------------------- the server

def _status_bytes(pid: int, field: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024  # kB
    raise RuntimeError(f"/proc/{pid}/status has no {field}")


class Server:
    """redis-server and `python -m gradserve_server.main` on free loopback ports, output in a temporary folder."""

    def __init__(self, extra_args: list[str]):
        self.dir = Path(tempfile.mkdtemp(prefix="gradserve-bench-upload-"))
        redis_port, port = dev.free_port(), dev.free_port()
        self.redis_url, self.address = f"redis://127.0.0.1:{redis_port}/0", f"127.0.0.1:{port}"
        with open(self.dir / "redis.log", "ab") as log:
            self.redis = dev.start_redis(redis_port, self.dir, log_file=log)
        args = [sys.executable, "-m", "gradserve_server.main", "--redis-url", self.redis_url, "--listen", self.address,
                "--max-dataset-mb", str(MAX_DATASET_MB), *extra_args]
        with open(self.dir / "server.log", "ab") as log:
            self.proc = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT)
        try:
            self._wait_ready()
        except BaseException:
            self.stop()
            raise

    def _wait_ready(self) -> None:
        deadline = time.monotonic() + 60
        with grpc.insecure_channel(self.address) as channel:
            stub = health_pb2_grpc.HealthStub(channel)
            while True:
                try:
                    reply = stub.Check(health_pb2.HealthCheckRequest(), timeout=1)
                    if reply.status == health_pb2.HealthCheckResponse.SERVING:
                        break
                except grpc.RpcError:
                    pass
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"the server did not come up:\n{(self.dir / 'server.log').read_text()[-3000:]}")
                time.sleep(0.1)
        # It builds the built-in corpus as it starts: let that finish, so no case pays for it.
        job_store = store.JobStore.from_url(self.redis_url)
        try:
            while not job_store.builtin_dataset_id(next(iter(corpus.BUILTINS))):
                if time.monotonic() > deadline:
                    raise RuntimeError("the server never finished building the built-in corpus")
                time.sleep(0.2)
        finally:
            job_store.close()

    @property
    def pid(self) -> int:
        return self.proc.pid

    def stop(self) -> None:
        dev.stop_process(self.proc)
        dev.stop_process(self.redis)


# ------------------------------------------------------------------ cases

def upload(address: str, data: bytes, name: str) -> tuple[float, int]:
    """Upload once, retrying while the server says it is busy; (seconds, refusals)."""
    refused = 0
    started = time.perf_counter()
    with gradserve.Client(address, timeout=600) as client:
        while True:
            try:
                client.upload_bytes(data, name=name)
                return time.perf_counter() - started, refused
            except gradserve.GradserveError as e:
                if e.code != grpc.StatusCode.RESOURCE_EXHAUSTED:
                    raise
                refused += 1
                time.sleep(1.0)


def run_case(server: Server, case: str, texts: dict[str, bytes]) -> dict:
    count, kind, mib = (4, *case.split("-")[1:]) if case.startswith("4x-") else (1, *case.split("-"))
    mib = int(mib)
    # Each upload differs (a serial number up front), so the server cannot answer from an earlier one.
    heads = [f"{case} {i} {time.time_ns()}\n".encode() for i in range(count)]
    data = [head + texts[kind][: mib * MIB - len(head)] for head in heads]
    before = _status_bytes(server.pid, "VmRSS")
    load_before = os.getloadavg()[0]
    Path(f"/proc/{server.pid}/clear_refs").write_text("5")  # 5: reset the peak RSS to the current RSS
    results: list = [None] * count

    def one(i: int) -> None:
        try:
            results[i] = upload(server.address, data[i], f"{case}-{i}")
        except Exception as e:  # reported in the table, not raised from a thread
            results[i] = e

    started = time.perf_counter()
    threads = [threading.Thread(target=one, args=(i,)) for i in range(count)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    seconds = time.perf_counter() - started
    peak = _status_bytes(server.pid, "VmHWM")
    errors = [repr(r) for r in results if isinstance(r, Exception)]
    return {
        "case": case, "uploads": count, "mib": mib, "kind": kind, "seconds": seconds,
        "each_seconds": [r[0] for r in results if isinstance(r, tuple)],
        "refused": sum(r[1] for r in results if isinstance(r, tuple)), "errors": errors,
        "rss_before_mib": before / MIB, "rise_mib": (peak - before) / MIB, "peak_mib": peak / MIB,
        "load_before": load_before, "load_after": os.getloadavg()[0],
    }


# ----------------------------------------------------------------- report

def cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()


def _cell(row: dict | None, key: str, fmt: str) -> str:
    if row is None:
        return "–"
    if row["errors"]:
        return "failed"
    return format(row[key], fmt)


def render(rows: list[dict], meta: dict, baseline: dict | None) -> str:
    base_rows = {r["case"]: r for r in baseline["rows"]} if baseline else {}
    lines = [
        HEADING,
        "",
        "`bench/upload.py`: one real server process (`--max-dataset-mb 64`, default `--max-uploads 2`) takes",
        "uploads from `gradserve.Client.upload_bytes`; its resident high-water mark (VmHWM) is reset before",
        "each case. Rise: peak minus the resident size before the case, i.e. what the case cost the server;",
        "peak: the server's whole footprint at that moment. \"words\": English-ish text of a few thousand",
        "distinct words; \"distinct\": 7-letter random words, nearly all distinct (the adversarial case for",
        "the vocabulary count). \"4 x\": four uploads at once, from four threads; the server receives two at",
        "a time, and one that waited 10 s for a slot is refused as busy and retried a second later by the",
        "benchmark (busy retries). An upload in progress holds its bytes once (in a memory map, given back",
        "whole at the end) and some tens of MiB for counting its words, so at the defaults uploads add at",
        "most about 2 x (64 MiB + 60 MiB) = 248 MiB to the server's idle footprint.",
        "",
        f"- date: {meta['date']}; {meta['cores']} cores; load average (1 min) {meta['load_start']:.2f} at the "
        f"start, {meta['load_end']:.2f} at the end (other work shared the machine: seconds move with it)",
        f"- server baseline before the first case: {meta['rss_start_mib']:.0f} MiB resident",
    ]
    if baseline:
        lines.append(f"- before: {baseline['meta']['label']} ({baseline['meta']['date']}, load "
                     f"{baseline['meta']['load_start']:.2f} -> {baseline['meta']['load_end']:.2f})")
    lines.append("")
    head = ("| case | uploads x MiB | rise MiB | rise / bytes | peak MiB | seconds | busy retries "
            "| load before / after |")
    sep = "|---|---|---|---|---|---|---|---|"
    if baseline:
        head = ("| case | uploads x MiB | rise MiB before | rise MiB now | peak MiB before | peak MiB now "
                "| seconds before | seconds now | busy retries | load before / after (now) |")
        sep = "|---|---|---|---|---|---|---|---|---|---|"
    lines += [head, sep]
    for r in rows:
        size = f"{r['uploads']} x {r['mib']}"
        load = f"{r['load_before']:.2f} / {r['load_after']:.2f}"
        if baseline:
            b = base_rows.get(r["case"])
            lines.append(f"| {r['kind']} | {size} | {_cell(b, 'rise_mib', '.0f')} | {_cell(r, 'rise_mib', '.0f')} "
                         f"| {_cell(b, 'peak_mib', '.0f')} | {_cell(r, 'peak_mib', '.0f')} "
                         f"| {_cell(b, 'seconds', '.1f')} | {_cell(r, 'seconds', '.1f')} | {r['refused']} | {load} |")
        else:
            ratio = "failed" if r["errors"] else f"{r['rise_mib'] / (r['uploads'] * r['mib']):.2f}"
            lines.append(f"| {r['kind']} | {size} | {_cell(r, 'rise_mib', '.0f')} | {ratio} "
                         f"| {_cell(r, 'peak_mib', '.0f')} | {_cell(r, 'seconds', '.1f')} | {r['refused']} | {load} |")
    for r in rows:
        for e in r["errors"]:
            lines.append(f"\n{r['case']} failed: {e}")
    lines.append("")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, default=REPO / "BENCHMARKS.md",
                   help="the Markdown file whose section to replace")
    p.add_argument("--cases", default=",".join(DEFAULT_CASES),
                   help="comma-separated: KIND-MIB or 4x-KIND-MIB, KIND words or distinct "
                   f"(default {','.join(DEFAULT_CASES)})")
    p.add_argument("--server-arg", action="append", default=[], help="one more flag for the server (repeatable)")
    p.add_argument("--json", type=Path, help="also write the figures here, for a later --baseline")
    p.add_argument("--baseline", type=Path, help="figures (--json) of an earlier run to show beside these")
    p.add_argument("--label", default="this code", help="what was measured, for the --json file")
    args = p.parse_args(argv)
    if not Path("/proc/self/clear_refs").exists():
        sys.exit("bench/upload.py needs Linux's /proc/PID/clear_refs to reset the server's peak RSS")
    cases = [c.strip() for c in args.cases.split(",") if c.strip()]
    biggest = {kind: max(int(c.rsplit("-", 1)[1]) for c in cases if f"{kind}-" in c) for kind in ("words", "distinct")
               if any(f"{kind}-" in c for c in cases)}
    print(f"making texts: {biggest} MiB", flush=True)
    texts = {"words": words_text(biggest["words"] * MIB) if "words" in biggest else b"",
             "distinct": distinct_text(biggest["distinct"] * MIB) if "distinct" in biggest else b""}
    meta = {"date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"), "cores": cores(),
            "load_start": os.getloadavg()[0], "label": args.label}
    server = Server(args.server_arg)
    try:
        upload(server.address, words_text(MIB, seed=SEED + 1), "warm-up")  # first-call set-up is no case's
        meta["rss_start_mib"] = _status_bytes(server.pid, "VmRSS") / MIB
        rows = []
        for case in cases:
            row = run_case(server, case, texts)
            print(f"  {case}: rise {row['rise_mib']:.0f} MiB, peak {row['peak_mib']:.0f} MiB, {row['seconds']:.1f} s, "
                  f"{row['refused']} busy retries, load {row['load_before']:.2f} -> {row['load_after']:.2f}"
                  + (f", errors {row['errors']}" if row["errors"] else ""), flush=True)
            rows.append(row)
    finally:
        server.stop()
    meta["load_end"] = os.getloadavg()[0]
    if args.json:
        args.json.write_text(json.dumps({"meta": meta, "rows": rows}, indent=1), encoding="utf-8")
    baseline = json.loads(args.baseline.read_text(encoding="utf-8")) if args.baseline else None
    section = render(rows, meta, baseline)
    write_section(args.out, HEADING, section)
    print(section)


if __name__ == "__main__":
    main()
