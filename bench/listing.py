"""Finding jobs in a long history, and keeping Redis bounded: ListJobs over 10,000 jobs, then retention.

    python bench/listing.py [--jobs 10000] [--out BENCHMARKS.md]

A private redis-server and one real server process (bench/fanout.py's Stack)
hold `--jobs` jobs written with the calls the server and a worker make
(JobStore.create_job, claim, append_event with a summary, finish), so no
training is needed: 1% stay QUEUED, 1% FAILED, the rest SUCCEEDED, each with
ten metrics events and a summary; names, tags and models vary so that each
filter below matches a known share. Every query then runs `--repeat` times
through the Python client over gRPC, and its latency is the client's: the
goal is a page of 50 in under 50 ms, filtered or not.

Retention: Redis's used_memory with the jobs in place, then after the
reaper's deletion (Reaper.delete_expired, as --retain-days runs it) of every
job that ended, then with no job at all (a fresh Redis holds this much).
The machine's load is printed with the figures.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import gradserve
from gradserve.v1 import jobs_pb2
from gradserve_server.reaper import Reaper
from gradserve_store import store

from fanout import Stack, _load, _percentile
from sections import write_section

HEADING = "## Finding jobs and retention: ListJobs over 10,000 jobs, and Redis memory"
STUDIES = "abcdefghij"  # tag study=<letter>: each letter on a tenth of the jobs
MODELS = ("rnn_scratch", "rnn", "gru", "lstm")


def populate(job_store: store.JobStore, count: int) -> None:
    """`count` jobs as a long-lived server would hold them; every 100th QUEUED, every 100th (offset 50) FAILED."""
    for i in range(count):
        job_id = store.new_job_id()
        spec = jobs_pb2.JobSpec(dataset="builtin:pydocs", model=MODELS[i % 4], max_steps=100)
        labels = store.Labels(name=f"run-{i}", tags={"study": STUDIES[i % 10], "lr": f"{0.1 * (1 + i % 5):g}"})
        job_store.create_job(job_id, spec, "cpu", "", labels)
        job_store.dispatched(job_id, 1)
        if i % 100 == 0:
            continue
        lease = job_store.claim(job_id, 1, "w@bench", 60)
        summary = jobs_pb2.JobSummary()
        for step in range(10, 101, 10):
            loss = 3.0 - step / 100 + (i % 97) / 100
            summary.step, summary.train_loss, summary.tokens_per_sec = step, loss, 1000.0 + i % 300
            if step % 50 == 0:
                summary.best_step, summary.best_val_loss = step, loss + 0.1
            event = jobs_pb2.Event(metrics=jobs_pb2.Metrics(step=step, loss=loss))
            job_store.append_event(lease, event, summary)
        job_store.finish(lease, jobs_pb2.FAILED if i % 100 == 50 else jobs_pb2.SUCCEEDED, step=100)


def time_query(client: gradserve.Client, repeat: int, **query) -> dict:
    pages = query.pop("pages", 1)
    latencies, got = [], 0
    for _ in range(repeat):
        token = ""
        # Walk to the page asked for untimed, then time that page alone.
        for _ in range(pages - 1):
            token = client.list_jobs(**query, page_token=token).next_page_token
        started = time.perf_counter()
        page = client.list_jobs(**query, page_token=token)
        latencies.append((time.perf_counter() - started) * 1000)
        got = len(page)
    return {"p50_ms": round(_percentile(latencies, 0.5), 2), "p99_ms": round(_percentile(latencies, 0.99), 2),
            "jobs_returned": got}


QUERIES = {
    "newest 50, no filter": {},
    "state QUEUED (1% of jobs)": {"state": "QUEUED"},
    "state FAILED and name contains \"run-1\"": {"state": "FAILED", "name": "run-1"},
    "tag study=c (10%)": {"tags": {"study": "c"}},
    "tag that no job has": {"tags": {"study": "z"}},
    "model gru, tag lr=0.3 (5%)": {"model": "gru", "tags": {"lr": "0.3"}},
    "20th page of 50, no filter": {"pages": 20},
    "sorted by val_loss": {"order_by": "val_loss"},
    "sorted by val_loss, 2nd page": {"order_by": "val_loss", "pages": 2},
    "sorted by train_loss, state SUCCEEDED": {"order_by": "train_loss", "state": "SUCCEEDED"},
    "sorted by val_loss, state QUEUED (none has one)": {"order_by": "val_loss", "state": "QUEUED"},
    "name contains \"run-\" (every job)": {"name": "run-"},
    "name contains \"run-99\" (1% of jobs, the newest among them)": {"name": "run-99"},
    "name contains \"run-5000\" (one job)": {"name": "run-5000"},
    "name contains \"run-5000\", sorted by val_loss": {"name": "run-5000", "order_by": "val_loss"},
}


def run(count: int, repeat: int) -> dict:
    stack = Stack(servers=1)
    try:
        job_store = stack.store
        memory_empty = stack.redis_client.info("memory")["used_memory"]
        started = time.perf_counter()
        populate(job_store, count)
        populated_s = time.perf_counter() - started
        memory_full = stack.redis_client.info("memory")["used_memory"]
        result = {"jobs": count, "populate_s": round(populated_s, 1), "load_before": _load(), "queries": {}}
        with gradserve.Client(stack.addresses[0]) as client:
            for name, query in QUERIES.items():
                result["queries"][name] = time_query(client, repeat, limit=50, **query)
                print(f"listing: {name}: {result['queries'][name]}", flush=True)
        result["load_after"] = _load()
        reaper = Reaper(stack.redis_url, retain_s=1.0)
        deleted, started = 0, time.perf_counter()
        while batch := reaper.delete_expired(time.time()):
            deleted += batch
        result["retention"] = {
            "deleted": deleted, "seconds": round(time.perf_counter() - started, 2),
            "left": len(job_store.r.zrange(store.tenant_jobs_key(""), 0, -1)),
            "used_memory_empty": memory_empty, "used_memory_full": memory_full,
            "used_memory_after": stack.redis_client.info("memory")["used_memory"],
        }
        reaper.close()
        return result
    finally:
        stack.stop()


def render(r: dict) -> str:
    lines = [HEADING, "",
             f"`python bench/listing.py` on {os.cpu_count()} cores, load {r['load_before']} before and "
             f"{r['load_after']} after the queries (1, 5 and 15 minutes). {r['jobs']:,} jobs in one tenant "
             "(1% QUEUED, 1% FAILED, the rest SUCCEEDED with a summary), one server process; each query asks for "
             "a page of 50 through the Python client over gRPC on loopback, and the latency is the client's. "
             "Goal: under 50 ms for a page of 50, filtered or not.", "",
             "| query | p50 | p99 | jobs on the page |", "|---|---|---|---|"]
    for name, q in r["queries"].items():
        lines.append(f"| {name} | {q['p50_ms']} ms | {q['p99_ms']} ms | {q['jobs_returned']} |")
    t = r["retention"]
    mib = 2**20
    lines += ["", "The filters run inside Redis: one Lua script walks the smallest index zset that applies "
              "(state, model, dataset, tag; the tenant's jobs when none does) and checks each slice of it against "
              "the others, stopping at a full page, so only the page crosses the network. A name substring is "
              "checked as the walk goes; one that has not filled the page after a few thousand jobs is rare, "
              "and Redis itself finds its jobs (a ZSCAN with MATCH over the tenant's named jobs), which then "
              "drive the page. An order by a metric walks that metric's zset, or, when a filter's zset is far smaller, sorts that "
              "filter's jobs whole. Most "
              "of each figure is the 50 job records themselves: reading, decoding and sending them.", "",
              f"**Retention.** Redis's `used_memory`: {t['used_memory_empty'] / mib:.1f} MiB before any job, "
              f"{t['used_memory_full'] / mib:.1f} MiB with the {r['jobs']:,} jobs (each a record, a summary and "
              f"twelve events), and {t['used_memory_after'] / mib:.1f} MiB after the reaper deleted the "
              f"{t['deleted']:,} that had ended, in {t['seconds']} s ({t['left']} QUEUED jobs left). "
              "So the store stays bounded by what `--retain-days` keeps."]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=Path(__file__).resolve().parents[1] / "BENCHMARKS.md")
    p.add_argument("--json", type=Path, help="also write the raw figures here")
    p.add_argument("--jobs", type=int, default=10_000, help="jobs in the store (default 10000)")
    p.add_argument("--repeat", type=int, default=50, help="times each query runs (default 50)")
    args = p.parse_args(argv)
    result = run(args.jobs, args.repeat)
    print(json.dumps(result, indent=2), flush=True)
    write_section(args.out, HEADING, render(result))
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))
    print(f"listing: wrote {args.out}")


if __name__ == "__main__":
    sys.exit(main())
