"""`gradserve`: submit, follow and manage training jobs on a gradserve server from a shell.

    gradserve upload book.txt                          # prints the dataset id
    gradserve submit --dataset builtin:pydocs --model gru --hidden-size 128 --follow
    gradserve watch JOB [--cursor C]                   # live progress until the job ends
    gradserve status JOB
    gradserve list [--state RUNNING] [--limit 20]
    gradserve cancel JOB
    gradserve delete JOB [JOB ...]                     # ended jobs: record, events and checkpoint
    gradserve download JOB -o model.pt
    gradserve generate JOB --prefix "time traveller" [--num-tokens 100] [--temperature 0] [--seed 0]
    gradserve plot JOB -o run.png                      # needs the plot extra: pip install 'gradserve[plot]'
    gradserve workers
    gradserve sweep --dataset D --grid lr=0.5,1,2 --grid num_steps=5,35 --follow   # one job per combination
    gradserve sweeps [SWEEP] [--follow]                # your sweeps, or one sweep's members by held-out loss
    gradserve cancel SWEEP                             # every member still queued or running
    gradserve compare JOB [JOB ...] | --sweep SWEEP -o compare.png

Global options go before or after the command: --server HOST:PORT (env
GRADSERVE_SERVER, default 127.0.0.1:50051) and --json, which prints JSON
instead of text: one object per line for event streams, otherwise one object
or array.

On a terminal `watch` draws a live progress bar; piped, it prints one plain
line per event, with every number labelled.
"""

from __future__ import annotations

import argparse
import errno
import os
import re
import shlex
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn
from rich.text import Text

from gradserve import compare, export, labels, sweep_cli
from gradserve.export import as_dict
from gradserve import spec as specs
from gradserve.client import DEFAULT_GENERATE_TOKENS, TERMINAL_STATES, Client, state_name
from gradserve.cliparts import (EXIT_BY_STATE, EXIT_CANCELLED, EXIT_FAILED, EXIT_INTERRUPTED, EXIT_OK, EXIT_USAGE,
                                ClientFactory, Context, _label, _plain, _tag, add_spec_flags, fit_columns,
                                human_bytes, print_error, print_json, resolve_dataset)
from gradserve.cmdline import Parser, add_version, command
from gradserve.errors import FailedPrecondition, GradserveError
from gradserve.settings import DEFAULT_SERVER, ClientSettings
from gradserve.truncation import advice_line
from gradserve.v1 import jobs_pb2


EXIT_CODES_HELP = f"""\
  {EXIT_OK}    done; for watch and submit --follow: the job SUCCEEDED
  {EXIT_FAILED}    the job FAILED, or an error (spec refused by the server, unknown job, server unreachable)
  {EXIT_USAGE}    the command line itself is wrong (unknown flag, value out of range)
  {EXIT_CANCELLED}    the job was CANCELLED
  {EXIT_INTERRUPTED}  Ctrl-C: stopped watching; the job itself goes on
"""

# Piped output goes to files and grep, not a screen: rich's 80 columns would truncate tables.
PIPED_WIDTH = 200
DEFAULT_LIST_LIMIT = 50
LIVE_BAR_WIDTH = 24
DEFAULT_CHECKPOINT_FILE = "model.pt"
# Enough of a content-hash id to tell datasets apart in a table.
DATASET_ID_SHOWN = 11
# The list drops its least needed columns, last first, to fit the screen.
LIST_COLUMNS = ("id", "state", "name", "model", "step/max", "created", "train", "best val", "dataset", "worker")
DATASET_COLUMNS = ("id", "name", "size", "chars", "words", "uploaded")
WORKER_COLUMNS = ("name", "queues", "current job", "last seen", "device", "memory budget", "host", "pid")
_TIME_FORMAT = "%Y-%m-%d %H:%M:%S"



# ------------------------------------------------------------------ formatting




def human_count(x: float) -> str:
    """41234.5 -> "41.2k": a rate readable at a glance."""
    for limit, suffix in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(x) >= limit:
            return f"{x / limit:.1f}{suffix}"
    return f"{x:.1f}" if x < 100 else f"{x:.0f}"




def human_duration(seconds: float) -> str:
    """75 -> "1m15s", 7300 -> "2h01m": precise where it matters, short where it does not."""
    seconds = max(0, int(seconds))
    if seconds < 60:
        return f"{seconds}s"
    minutes, seconds = divmod(seconds, 60)
    if minutes < 60:
        return f"{minutes}m{seconds:02d}s"
    hours, minutes = divmod(minutes, 60)
    if hours < 24:
        return f"{hours}h{minutes:02d}m"
    days, hours = divmod(hours, 24)
    return f"{days}d{hours:02d}h"


def _seconds(ts) -> float:
    return ts.seconds + ts.nanos / 1e9


def _local_time(ts) -> str:
    return datetime.fromtimestamp(_seconds(ts), timezone.utc).astimezone().strftime(_TIME_FORMAT)


def metrics_stats(m: jobs_pb2.Metrics, *, detailed: bool = True) -> str:
    """The numbers of one metrics event after its step, each with its unit or label.

    The live bar leaves out the clip fraction and lr to fit on one line.
    """
    grad = f"grad_norm {m.grad_norm:.3g}"
    if m.clipped:
        grad += " (clipped)"
    if m.perplexity:
        ppl = f"{m.perplexity:.2f}" if m.perplexity < 1e4 else f"{m.perplexity:.3g}"
        parts = [f"loss {m.loss:.3f} nats", f"ppl {ppl}", grad]
    else:  # a synthetic task: its loss is the task's own (MSE, or cross-entropy on the recalled symbols)
        parts = [f"loss {m.loss:.4g}", grad]
    if detailed:
        if m.clip_fraction:
            parts.append(f"clipped {m.clip_fraction:.0%} of steps")
        if m.skipped_steps:
            parts.append(f"skipped {m.skipped_steps} non-finite steps")
        parts.append(f"lr {m.lr:g}")
    parts.append(f"tokens/s {human_count(m.tokens_per_sec)}")
    return "  ".join(parts)


def metrics_line(m: jobs_pb2.Metrics, max_steps: int) -> str:
    return f"step {m.step}/{max_steps}  epoch {m.epoch}  {metrics_stats(m)}"


def status_line(s: jobs_pb2.StatusChange) -> str:
    parts = [f"status {state_name(s.state)}"]
    if s.worker:
        parts.append(f"worker {s.worker}")
    if s.step:
        parts.append(f"step {s.step}")
    if s.reason:
        parts.append(f"reason: {s.reason}")
    return "  ".join(parts)


def checkpoint_line(c: jobs_pb2.CheckpointSaved) -> str:
    kept = "  (latest, and the best so far)" if c.also_latest else "  (best so far)" if c.best else ""
    return f"checkpoint  step {c.step}  size {human_bytes(c.size_bytes)}{kept}"


def evaluation_line(e: jobs_pb2.Evaluation) -> str:
    if e.metric:
        return (f"eval  step {e.step}  held-out {e.metric} {e.value:.4g} (trivial baseline {e.baseline:.4g})  "
                f"loss {e.loss:.4g}")
    return f"eval  step {e.step}  val loss {e.loss:.3f} nats  val ppl {e.perplexity:.2f}"


def probe_line(p: jobs_pb2.Probe) -> str:
    """The gradient-through-time profile at its two ends, the largest singular value found, and the window advice."""
    parts = [f"probe  step {p.step}"]
    for profile in p.grad_through_time:
        if profile.norms:
            first, last = profile.norms[0], profile.norms[-1]
            parts.append(f"layer {profile.layer} |dL/dh_t| {first:.2e} at t=1 .. {last:.2e} at t={len(profile.norms)}")
    if p.spectral_norms:
        top = max(p.spectral_norms, key=lambda n: n.sigma)
        gate = f"[{top.gate}]" if top.gate else ""
        parts.append(f"largest singular value {top.sigma:.3g} ({top.name}{gate})")
    if p.HasField("decay_rate"):
        parts.append(advice_line(p.half_life, p.suggested_window, p.warning))
    return "  ".join(parts)


def window_change_line(c: jobs_pb2.WindowChange) -> str:
    return (f"window  step {c.step}  num_steps {c.from_window} -> {c.to_window} steps "
            f"(the probes since the last checkpoint suggest {c.suggested})")


def event_line(event: jobs_pb2.Event, max_steps: int) -> str:
    kind = event.WhichOneof("kind")
    if kind == "metrics":
        return metrics_line(event.metrics, max_steps)
    if kind == "status":
        return status_line(event.status)
    if kind == "checkpoint":
        return checkpoint_line(event.checkpoint)
    if kind == "evaluation":
        return evaluation_line(event.evaluation)
    if kind == "probe":
        return probe_line(event.probe)
    if kind == "window_change":
        return window_change_line(event.window_change)
    return f"event of an unknown kind (cursor {event.cursor}); upgrade gradserve to see it"


def spec_summary(spec: jobs_pb2.JobSpec) -> str:
    """The effective spec as `key=value` pairs, in the order of `spec.FIELDS`."""
    pairs = [f"dataset={spec.dataset}"]
    for f in specs.FIELDS:
        value = getattr(spec, f.name)
        pairs.append(f"{f.name}={value:g}" if isinstance(value, float) else f"{f.name}={value}")
    return " ".join(pairs)


def short_dataset(dataset: str) -> str:
    """A content-hash id cut short; built-in names stay whole."""
    return dataset[:DATASET_ID_SHOWN] + "…" if specs.DATASET_ID.fullmatch(dataset) else dataset


def _age(ts, now: float) -> str:
    return f"{human_duration(now - _seconds(ts))} ago"


def _step_of(job: jobs_pb2.Job) -> str:
    return f"{job.last_step}/{job.spec.max_steps}"


def _train_result(summary: jobs_pb2.JobSummary) -> str:
    """The latest training figure: perplexity for text, a task's own loss otherwise; "-" before the first."""
    if not summary.step:
        return "-"
    return f"ppl {summary.train_perplexity:.2f}" if summary.train_perplexity else f"loss {summary.train_loss:.4g}"


def _best_result(summary: jobs_pb2.JobSummary) -> str:
    """The best evaluation's figure: held-out perplexity for text, a task's metric otherwise."""
    if not summary.best_step:
        return "-"
    if summary.metric:
        return f"{summary.metric} {summary.metric_value:.4g}"
    return f"ppl {summary.best_val_perplexity:.2f}"


def results_line(summary: jobs_pb2.JobSummary) -> str:
    """A job's results in one line: the latest training figure, the best evaluation, tokens and speed."""
    parts = [f"train {_train_result(summary)}"]
    if summary.best_step:
        parts.append(f"best val {_best_result(summary)} at step {summary.best_step}")
    parts.append(f"{summary.tokens:,} tokens in {human_duration(summary.train_seconds)} "
                 f"({summary.tokens_per_sec:,.0f} tokens/s)")
    return "; ".join(parts)




def render_job(console: Console, job: jobs_pb2.Job, now: float | None = None) -> None:
    """The job record, one `key  value` line each, times with their durations."""
    now = time.time() if now is None else now
    rows: list[tuple[str, str]] = [("id", job.id)]
    if job.name:
        rows.append(("name", job.name))
    if job.tags:
        rows.append(("tags", " ".join(f"{k}={v}" for k, v in sorted(job.tags.items()))))
    rows.append(("state", state_name(job.state)))
    if job.reason:
        rows.append(("reason", job.reason))
    if job.waiting:
        rows.append(("waiting", job.waiting))
    rows += [("model", job.spec.model), ("dataset", job.spec.dataset), ("queue", job.queue or "-"),
             ("worker", job.worker or "-")]
    percent = job.last_step / job.spec.max_steps if job.spec.max_steps else 0.0
    rows.append(("step", f"{_step_of(job)} ({percent:.0%})"))
    checkpoints = f"step {job.checkpoint_step}" if job.checkpoint_step else "none yet"
    if job.best_checkpoint_step:
        checkpoints += f"; best at step {job.best_checkpoint_step}"
    rows.append(("checkpoint", checkpoints))
    if job.HasField("init_from"):
        taken = "weights" + (", optimizer state" if job.init_from.optimizer else "") + (
            ", hidden state" if job.init_from.state else "")
        rows.append(("started from", f"{job.init_from.job_id} at step {job.init_from.step} ({taken})"))
    summary = job.summary
    if summary.step and summary.train_perplexity:
        rows.append(("train", f"{_train_result(summary)}, loss {summary.train_loss:.4f} nats/token "
                              f"at step {summary.step}"))
    elif summary.step:  # a synthetic task: its own loss (MSE, or cross-entropy over the recalled symbols)
        rows.append(("train", f"{_train_result(summary)} at step {summary.step}"))
    if summary.best_step:
        rows.append(("best val", f"{_best_result(summary)}, loss {summary.best_val_loss:.4f} "
                                 f"at step {summary.best_step}"))
    if summary.tokens:
        rows.append(("trained", f"{summary.tokens:,} tokens in {human_duration(summary.train_seconds)} of steps "
                                f"({summary.tokens_per_sec:,.0f} tokens/s); clipped at {summary.clipped_steps:,} "
                                f"of {summary.step:,} steps ({summary.clip_fraction:.0%})"))
    if job.attempt > 1:
        rows.append(("attempt", str(job.attempt)))
    if job.HasField("created_at"):
        rows.append(("created", f"{_local_time(job.created_at)} ({_age(job.created_at, now)})"))
    if job.HasField("started_at"):
        waited = _seconds(job.started_at) - _seconds(job.created_at)
        rows.append(("started", f"{_local_time(job.started_at)} (queued for {human_duration(waited)})"))
        if job.HasField("finished_at"):
            ran = _seconds(job.finished_at) - _seconds(job.started_at)
            rows.append(("finished", f"{_local_time(job.finished_at)} (ran for {human_duration(ran)})"))
        else:
            rows.append(("running for", human_duration(now - _seconds(job.started_at))))
    elif job.HasField("finished_at"):
        rows.append(("finished", f"{_local_time(job.finished_at)} (never started)"))
    rows.append(("spec", spec_summary(job.spec)))
    if job.note:
        rows.append(("note", job.note))
    # Plain lines rather than a table: piped output carries no padding, and long values wrap on a screen.
    width = max(len(key) for key, _ in rows)
    for key, value in rows:
        console.print(Text.assemble((key.ljust(width), "bold"), "  ", value), soft_wrap=True)




def render_jobs(console: Console, jobs: Sequence[jobs_pb2.Job], now: float | None = None) -> None:
    """A table of jobs that fits the console; QUEUED jobs that wait for a worker are starred, with the reason below."""
    if not jobs:
        console.print("no jobs")
        return
    now = time.time() if now is None else now
    rows = [
        {
            "id": job.id,
            "state": state_name(job.state) + ("*" if job.waiting else ""),
            "name": job.name or "-",
            "model": job.spec.model,
            "step/max": _step_of(job),
            "train": _train_result(job.summary),
            "best val": _best_result(job.summary),
            "created": _age(job.created_at, now) if job.HasField("created_at") else "-",
            "dataset": short_dataset(job.spec.dataset),
            "worker": job.worker or "-",
        }
        for job in jobs
    ]
    # Only a list where some job has a name gives the column room.
    columns = [c for c in LIST_COLUMNS if c != "name" or any(job.name for job in jobs)]
    header, *lines = fit_columns(rows, columns, console.width)
    _plain(console, header, style="bold")
    for line in lines:
        _plain(console, line)
    waits: dict[str, int] = {}
    for job in jobs:
        if job.waiting:
            waits[job.waiting] = waits.get(job.waiting, 0) + 1
    for reason, count in waits.items():
        _plain(console, f"* {count} QUEUED job{'s' if count > 1 else ''} waiting: {reason}", style="dim")


# A worker's heartbeat interval, for servers too old to report it.
DEFAULT_HEARTBEAT_S = 5.0


def last_seen(worker: jobs_pb2.Worker, now: float) -> str:
    """How long ago the worker renewed its advertisement; one more than two beats late is marked overdue."""
    if not worker.HasField("last_seen"):
        return "-"
    ago = now - _seconds(worker.last_seen)
    overdue = ago > 2 * (worker.heartbeat_interval_s or DEFAULT_HEARTBEAT_S)
    return f"{ago:.1f}s ago" + (" (overdue: likely dead)" if overdue else "")


def running_jobs(worker: jobs_pb2.Worker) -> str:
    """The jobs a worker runs: "idle", a job id, or "2/4: ID, ID" for one that runs several at once."""
    jobs = list(worker.job_ids) or ([worker.job_id] if worker.job_id else [])
    if worker.concurrency > 1:
        return f"{len(jobs)}/{worker.concurrency}" + (": " + ", ".join(jobs) if jobs else " idle")
    return ", ".join(jobs) or "idle"


def render_workers(console: Console, workers: Sequence[jobs_pb2.Worker], now: float | None = None) -> None:
    if not workers:
        _plain(console, f"no worker is alive; start one with `{command('gradserve-worker')} --redis-url URL "
                        "--queues cpu`")
        return
    now = time.time() if now is None else now
    rows = [
        {
            "name": w.name,
            "queues": ",".join(w.queues),
            "current job": running_jobs(w),
            "last seen": last_seen(w, now),
            "device": w.device,
            "memory budget": human_bytes(w.memory_budget_bytes) if w.memory_budget_bytes else "-",
            "host": w.hostname,
            "pid": str(w.pid),
        }
        for w in workers
    ]
    header, *lines = fit_columns(rows, WORKER_COLUMNS, console.width)
    _plain(console, header, style="bold")
    for line in lines:
        _plain(console, line)




# ------------------------------------------------------------------- watching


@dataclass
class WatchState:
    """What a watch has seen so far: enough to resume it, and how the job ended."""

    job_id: str
    cursor: str = ""
    final: jobs_pb2.StatusChange | None = None

    def saw(self, event: jobs_pb2.Event) -> None:
        self.cursor = event.cursor
        if event.WhichOneof("kind") == "status" and state_name(event.status.state) in TERMINAL_STATES:
            self.final = event.status

    def resume_command(self) -> str:
        return command(f"gradserve watch {self.job_id}") + (f" --cursor {self.cursor}" if self.cursor else "")


def stream_events(console: Console, events: Iterable[jobs_pb2.Event], state: WatchState, max_steps: int,
                  *, json_mode: bool) -> None:
    """Print events as they come, updating `state` after each one so an interrupt knows where it was."""
    if json_mode or not console.is_terminal:
        for event in events:
            if json_mode:
                print_json(console, as_dict(event))
            else:
                _plain(console, event_line(event, max_steps))
            state.saw(event)
        return
    _stream_live(console, events, state, max_steps)


def _stream_live(console: Console, events: Iterable[jobs_pb2.Event], state: WatchState, max_steps: int) -> None:
    progress = Progress(
        BarColumn(bar_width=LIVE_BAR_WIDTH),
        TextColumn("step {task.completed:.0f}/{task.total:.0f}  {task.fields[stats]}"),
        TextColumn("eta"),
        TimeRemainingColumn(),
        console=console,
    )
    _plain(console, f"watching {state.job_id}")
    with progress:
        task = progress.add_task(state.job_id, total=max_steps, stats="waiting for the first metrics")
        for event in events:
            kind = event.WhichOneof("kind")
            if kind == "metrics":
                m = event.metrics
                stats = f"epoch {m.epoch}  {metrics_stats(m, detailed=False)}"
                progress.update(task, completed=m.step, stats=escape(stats))
            else:
                progress.console.print(Text(event_line(event, max_steps)), soft_wrap=True)
                if kind == "status" and event.status.step:
                    progress.update(task, completed=event.status.step)
            state.saw(event)


def follow(console: Console, err: Console, job, cursor: str, *, json_mode: bool, server: str) -> int:
    """Watch `job` to its end; the exit code says how it ended."""
    state = WatchState(job.id, cursor)
    try:
        stream_events(console, job.events(cursor or None), state, job.info.spec.max_steps, json_mode=json_mode)
    except KeyboardInterrupt:
        _plain(err, f"\nstopped watching; job {job.id} goes on.")
        _plain(err, f"resume:  {state.resume_command()}")
        _plain(err, f"cancel:  {command('gradserve cancel')} {job.id}")
        return EXIT_INTERRUPTED
    except GradserveError as e:
        print_error(err, e, server, [f"resume with `{state.resume_command()}`"])
        return EXIT_FAILED
    if state.final is not None:
        final_state, reason, step = state_name(state.final.state), state.final.reason, state.final.step
    else:
        # The cursor was past the end already, so the stream held no terminal event.
        info = job.refresh()
        final_state, reason, step = state_name(info.state), info.reason, info.last_step
    if not json_mode:
        _plain(console, f"job {job.id} {final_state} at step {step}/{job.info.spec.max_steps}")
        if reason:
            _plain(console, f"reason: {reason}")
        try:
            summary = job.refresh().summary
        except GradserveError:
            summary = None  # the results are a courtesy: the outcome above is what counts
        if summary is not None and summary.step:
            _plain(console, "results: " + results_line(summary))
        if final_state == "SUCCEEDED":
            _plain(console, f"get the model: {command('gradserve download')} {job.id} -o {DEFAULT_CHECKPOINT_FILE}")
    return EXIT_BY_STATE.get(final_state, EXIT_FAILED)


# ------------------------------------------------------------------- commands






def cmd_upload(ctx: Context) -> int:
    with ctx.client() as client:
        dataset_id = client.upload_text(ctx.args.file, ctx.args.name)
    if ctx.args.json:
        print_json(ctx.out, {"id": dataset_id})
    else:
        _plain(ctx.out, dataset_id)
    return EXIT_OK


def cmd_submit(ctx: Context) -> int:
    fields = {f.name: getattr(ctx.args, f.name) for f in specs.FIELDS}
    with ctx.client() as client:
        dataset = resolve_dataset(ctx, client, ctx.args.dataset)
        job = client.submit(dataset=dataset, name=ctx.args.name, tags=dict(ctx.args.tag), note=ctx.args.note,
                            init_from=ctx.args.init_from, init_optimizer=ctx.args.init_optimizer,
                            init_state=ctx.args.init_state, **fields)
        if ctx.args.json:
            print_json(ctx.out, as_dict(job.info))
        else:
            _plain(ctx.out, job.id)
            _plain(ctx.out, f"  {state_name(job.info.state)} on queue {job.info.queue}: {spec_summary(job.info.spec)}")
        warn_waiting(ctx.err, job.info)
        if not ctx.args.follow:
            return EXIT_OK
        return follow(ctx.out, ctx.err, job, "", json_mode=ctx.args.json, server=ctx.args.server)


def cmd_resubmit(ctx: Context) -> int:
    a = ctx.args
    changes = {f.name: getattr(a, f.name) for f in specs.FIELDS if getattr(a, f.name) is not None}
    with ctx.client() as client:
        original = client.get_job(a.job)
        if a.dataset is not None:
            changes["dataset"] = resolve_dataset(ctx, client, a.dataset)
        job = original.resubmit(name=a.name, tags=dict(a.tag), note=a.note, **changes)
        if a.json:
            print_json(ctx.out, as_dict(job.info))
        else:
            _plain(ctx.out, job.id)
            changed = ", ".join(f"{k}={v}" for k, v in changes.items()) or "no changes"
            _plain(ctx.out, f"  {state_name(job.info.state)} on queue {job.info.queue}: {original.id} again with "
                            f"{changed}")
        warn_waiting(ctx.err, job.info)
        if not a.follow:
            return EXIT_OK
        return follow(ctx.out, ctx.err, job, "", json_mode=a.json, server=a.server)


def warn_waiting(err: Console, info: jobs_pb2.Job) -> None:
    if info.waiting:
        _plain(err, f"warning: {info.id} is QUEUED and waiting: {info.waiting}", style="yellow")


def cmd_watch(ctx: Context) -> int:
    with ctx.client() as client:
        job = client.get_job(ctx.args.job)
        warn_waiting(ctx.err, job.info)
        return follow(ctx.out, ctx.err, job, ctx.args.cursor, json_mode=ctx.args.json, server=ctx.args.server)


def cmd_status(ctx: Context) -> int:
    with ctx.client() as client:
        info = client.get_job(ctx.args.job).info
    if ctx.args.json:
        print_json(ctx.out, as_dict(info))
    else:
        render_job(ctx.out, info)
    return EXIT_OK


def cmd_list(ctx: Context) -> int:
    a = ctx.args
    with ctx.client() as client:
        page = client.list_jobs(limit=a.limit, state=a.state, name=a.name, tags=dict(a.tag), model=a.model or "",
                                dataset=a.dataset, created_after=a.after, created_before=a.before,
                                order_by=a.sort, reverse=a.reverse, page_token=a.page_token, sweep=a.sweep)
    jobs = [j.info for j in page]
    if a.json:
        print_json(ctx.out, [as_dict(j) for j in jobs])
    else:
        render_jobs(ctx.out, jobs)
    if page.next_page_token:  # on stderr, so that --json output stays one list
        # The same command without its page token ("--page-token X" or "--page-token=X"), then the new one.
        again = [arg for i, arg in enumerate(ctx.argv)
                 if not arg.startswith("--page-token") and (i == 0 or ctx.argv[i - 1] != "--page-token")]
        _plain(ctx.err, "more: " + shlex.join(["gradserve", *again, "--page-token", page.next_page_token]),
               style="dim")
    return EXIT_OK


def log_line(line: jobs_pb2.LogLine) -> str:
    return f"{_local_time(line.time)} attempt {line.attempt} {line.level} {line.logger}: {line.message}"


def cmd_logs(ctx: Context) -> int:
    with ctx.client() as client:
        job = client.get_job(ctx.args.job)
        try:
            for line in job.logs(follow=ctx.args.follow):
                if ctx.args.json:
                    print_json(ctx.out, as_dict(line))
                else:
                    _plain(ctx.out, log_line(line))
        except KeyboardInterrupt:
            _plain(ctx.err, f"\nstopped following; the job goes on (gradserve logs {job.id} -f follows it again)")
            return EXIT_INTERRUPTED
    return EXIT_OK


def cmd_cancel(ctx: Context) -> int:
    # One rule: exit 0 whenever the job ends up not running, whether this
    # cancelled it, asked it to stop, or it had already ended by itself.
    if ctx.args.job.startswith("sweep-"):
        return cancel_sweep(ctx)
    with ctx.client() as client:
        job = client.get_job(ctx.args.job)
        if job.state not in TERMINAL_STATES or job.state == "CANCELLED":
            try:
                job.cancel()
            except FailedPrecondition:
                job.refresh()  # it ended between the two calls
    info = job.info
    if ctx.args.json:
        print_json(ctx.out, as_dict(info))
    elif job.state == "RUNNING":
        _plain(ctx.out, f"{info.id} RUNNING: cancel requested; the job stops at its next step")
    elif job.state in ("SUCCEEDED", "FAILED"):
        _plain(ctx.out, f"{info.id} had already ended {job.state}; nothing to cancel")
    else:
        _plain(ctx.out, f"{info.id} {job.state}" + (f": {info.reason}" if info.reason else ""))
    return EXIT_OK


def cancel_sweep(ctx: Context) -> int:
    with ctx.client() as client:
        sweep = client.get_sweep(ctx.args.job).cancel()
    info = sweep.info
    if ctx.args.json:
        print_json(ctx.out, as_dict(info))
        return EXIT_OK
    stopping = sum(1 for m in info.members if m.job.state == jobs_pb2.RUNNING)
    ended = info.succeeded + info.failed
    _plain(ctx.out, f"{info.id}: {info.cancelled} member{'' if info.cancelled == 1 else 's'} cancelled" +
           (f", {stopping} {'stops' if stopping == 1 else 'stop'} at the next step" if stopping else "") +
           (f"; {ended} had already ended" if ended else ""))
    return EXIT_OK


def delete_each(ctx: Context, ids: Sequence[str], delete: Callable, said: Callable[[object], str]) -> int:
    """delete(client, id) for each id, printing what went (`said`) and why any did not; exit 0 only if all went."""
    deleted, code = [], EXIT_OK
    with ctx.client() as client:
        for item in ids:
            try:
                deleted.append(delete(client, item))
            except GradserveError as e:
                print_error(ctx.err, e, ctx.args.server)
                code = EXIT_FAILED
    if ctx.args.json:
        print_json(ctx.out, [as_dict(record) for record in deleted])
    else:
        for record in deleted:
            _plain(ctx.out, said(record))
    return code


def cmd_delete(ctx: Context) -> int:
    return delete_each(ctx, ctx.args.jobs, _delete_job_or_sweep, _deleted)


def _delete_job_or_sweep(client: Client, item: str) -> jobs_pb2.Job | jobs_pb2.Sweep:
    if item.startswith("sweep-"):
        return client.get_sweep(item).delete().info
    return client.get_job(item).delete().info


def _deleted(record: jobs_pb2.Job | jobs_pb2.Sweep) -> str:
    if isinstance(record, jobs_pb2.Sweep):
        members = [m.job_id for m in record.members]
        named = ", ".join(members[:5]) + (f" and {len(members) - 5} more" if len(members) > 5 else "")
        return (f"deleted {record.id} and its {len(members)} member(s), {named}: their records, events, "
                "checkpoints and logs are gone")
    return (f"deleted {record.id} ({state_name(record.state)} at step {record.last_step}): its record, events, "
            "checkpoints and log are gone")


def render_datasets(console: Console, datasets: Sequence[jobs_pb2.Dataset], now: float | None = None) -> None:
    if not datasets:
        _plain(console, f"no datasets; upload one with `{command('gradserve upload')} FILE`")
        return
    now = time.time() if now is None else now
    rows = [
        {
            "id": d.id,
            "name": d.name or "-",
            "size": human_bytes(d.size_bytes),
            "chars": human_count(d.num_chars),
            "words": human_count(d.num_words) if d.num_words else "-",
            "uploaded": _age(d.uploaded_at, now) if d.HasField("uploaded_at") else "-",
        }
        for d in datasets
    ]
    header, *lines = fit_columns(rows, DATASET_COLUMNS, console.width)
    _plain(console, header, style="bold")
    for line in lines:
        _plain(console, line)


def show_listing(ctx: Context, fetch: Callable[[Client], Sequence], render: Callable[[Console, Sequence], None]) -> int:
    """Fetch a list of records and print it: one JSON array with --json, a table otherwise."""
    with ctx.client() as client:
        records = fetch(client)
    if ctx.args.json:
        print_json(ctx.out, [as_dict(r) for r in records])
    else:
        render(ctx.out, records)
    return EXIT_OK


def cmd_datasets(ctx: Context) -> int:
    return show_listing(ctx, lambda client: client.list_datasets(), render_datasets)


def cmd_delete_dataset(ctx: Context) -> int:
    return delete_each(ctx, ctx.args.datasets, lambda client, dataset_id: client.delete_dataset(dataset_id),
                       lambda d: f"deleted {d.id} ({d.name or 'no name'}, {human_bytes(d.size_bytes)}); jobs that "
                                 "trained on it keep their records and checkpoints")


def cmd_download(ctx: Context) -> int:
    folder = ctx.args.output.parent
    if not folder.is_dir():
        # Checked up front: otherwise the error would name the client's temporary file.
        raise FileNotFoundError(errno.ENOENT, "no such directory", str(folder))
    with ctx.client() as client:
        step = client.get_job(ctx.args.job).download_checkpoint(ctx.args.output, ctx.args.checkpoint)
    size = os.path.getsize(ctx.args.output)
    if ctx.args.json:
        print_json(ctx.out, {"path": str(ctx.args.output), "size_bytes": size, "step": step})
    else:
        _plain(ctx.out, f"wrote {ctx.args.output} ({size} bytes, step {step})")
    return EXIT_OK


def cmd_generate(ctx: Context) -> int:
    args = ctx.args
    with ctx.client() as client:
        reply = client.get_job(args.job).generate(args.prefix, args.num_tokens, temperature=args.temperature,
                                                  seed=args.seed, checkpoint=args.checkpoint)
    if args.json:
        print_json(ctx.out, {"job_id": args.job, **as_dict(reply)})
    else:
        # The text alone on stdout, so it can be piped; where it came from goes to stderr.
        ctx.out.out(reply.text, highlight=False)
        _plain(ctx.err, f"from {args.job}'s checkpoint at step {reply.step}", style="dim")
    return EXIT_OK


def cmd_plot(ctx: Context) -> int:
    from gradserve import plot

    try:
        plot.load_matplotlib()
    except plot.MatplotlibMissing as e:
        # Said before anything else happens, rather than after fetching the whole history.
        _plain(ctx.err, f"error: {e}")
        return EXIT_FAILED
    folder = ctx.args.output.parent
    if not folder.is_dir():
        raise FileNotFoundError(errno.ENOENT, "no such directory", str(folder))
    with ctx.client() as client:
        job = client.get_job(ctx.args.job)
        # The history so far: a running job is plotted as it stands, without waiting for it to end.
        events = list(job.events(follow=False))
    history = plot.RunHistory.from_events(events)
    plot.plot_run(events, job.info).savefig(ctx.args.output)
    if ctx.args.json:
        print_json(ctx.out, {"path": str(ctx.args.output), "events": len(events)})
    else:
        _plain(
            ctx.out,
            f"wrote {ctx.args.output}: {len(history.metrics)} metrics, {len(history.evaluations)} evaluations, "
            f"{len(history.probes)} probes; {job.id} {state_name(job.info.state)} at step {job.info.last_step}",
        )
    return EXIT_OK


def cmd_export(ctx: Context) -> int:
    if ctx.args.format == "tensorboard":
        try:
            export.load_tensorboard()
        except export.ExportMissing as e:
            # Said before anything else happens, rather than after fetching the whole history.
            _plain(ctx.err, f"error: {e}")
            return EXIT_FAILED
    with ctx.client() as client:
        job = client.get_job(ctx.args.job)
        events = list(job.events(follow=False))
    written = export.export(events, job.info, ctx.args.format, ctx.args.output)
    if ctx.args.json:
        print_json(ctx.out, {"folder": str(ctx.args.output), "written": written})
    else:
        what = ", ".join(f"{name} ({count:,})" for name, count in written.items())
        _plain(ctx.out, f"wrote {ctx.args.output}: {what}; {job.id} {state_name(job.info.state)} at step "
                        f"{job.info.last_step}")
    return EXIT_OK


def cmd_workers(ctx: Context) -> int:
    return show_listing(ctx, lambda client: client.workers(), render_workers)


# --------------------------------------------------------------------- parser










def _add_global_options(parser: argparse.ArgumentParser, *, suppress: bool) -> None:
    # Subcommands accept the global options too, but must not reset what was
    # given before the subcommand, hence SUPPRESS there.
    server_default = argparse.SUPPRESS if suppress else ClientSettings.from_env().server
    parser.add_argument(
        "--server", default=server_default, metavar="HOST:PORT",
        help=f"the gradserve server (env GRADSERVE_SERVER, default {DEFAULT_SERVER})",
    )
    parser.add_argument(
        "--json", action="store_true", default=argparse.SUPPRESS if suppress else False,
        help="print JSON: one object per line for event streams, otherwise one object or array",
    )
    unset = argparse.SUPPRESS if suppress else None
    parser.add_argument("--token", default=unset, help="bearer token for a server with authentication "
                        "(env GRADSERVE_TOKEN; prefer the variable: flags show up in process lists)")
    parser.add_argument("--tls", action="store_const", const=True, default=unset,
                        help="connect with TLS, trusting the system's roots unless --ca-file is given (env GRADSERVE_TLS=1)")
    parser.add_argument("--ca-file", default=unset, metavar="PEM",
                        help="CA certificate to trust; implies --tls (env GRADSERVE_CA_FILE)")
    parser.add_argument("--cert-file", default=unset, metavar="PEM", help="client certificate, for mutual TLS")
    parser.add_argument("--key-file", default=unset, metavar="PEM", help="client private key, for mutual TLS")


def _int_at_least(low: int, high: int | None = None) -> Callable[[str], int]:
    """An argparse type: an integer no smaller than `low` (and, given `high`, no larger)."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}")
        if high is not None and not low <= value <= high:
            raise argparse.ArgumentTypeError(f"must be in [{low}, {high}], got {value}")
        if value < low:
            raise argparse.ArgumentTypeError(f"must be at least {low}, got {value}")
        return value

    return parse


def _temperature(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}")
    if not 0 <= value <= specs.MAX_TEMPERATURE:  # also refuses nan
        raise argparse.ArgumentTypeError(f"must be in [0, {specs.MAX_TEMPERATURE:g}], got {text}")
    return value


_JOB_STATES = tuple(n for n in jobs_pb2.JobState.keys() if n != "JOB_STATE_UNSPECIFIED")
# ListJobsRequest.order_by's values, and the most jobs one page may hold.
SORT_ORDERS = ("created", "train_loss", "val_loss", "tokens_per_sec")
LIST_LIMIT_MAX = 1000
_AGE = re.compile(r"(\d+(?:\.\d+)?)([mhd])")
_AGE_SECONDS = {"m": 60, "h": 3600, "d": 86400}


CHECKPOINT_HELP = ("latest (the default), best (kept for the best evaluation so far), or the step of one of those "
                   "two")


def _checkpoint_arg(text: str) -> str:
    if text in ("latest", "best") or text.isdigit():
        return text
    raise argparse.ArgumentTypeError(f"must be latest, best or a step number, got {text!r}")


def _choice(choices: tuple[str, ...]) -> Callable[[str], str]:
    def parse(text: str) -> str:
        if text not in choices:
            raise argparse.ArgumentTypeError(f"must be one of {', '.join(choices)}, got {text!r}")
        return text

    return parse






def _time_arg(text: str, now: float | None = None) -> float:
    """A Unix time from a local date or time, or from an age such as 90m, 6h or 2d (that long before now)."""
    if m := _AGE.fullmatch(text):
        return (time.time() if now is None else now) - float(m[1]) * _AGE_SECONDS[m[2]]
    try:
        return datetime.fromisoformat(text).timestamp()
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"must be a date or time like 2026-11-30 or 2026-11-30T14:00, or an age like 90m, 6h or 2d; got {text!r}"
        ) from None


def _job_state(text: str) -> str:
    name = text.upper()
    if name not in _JOB_STATES:
        raise argparse.ArgumentTypeError(f"must be one of {', '.join(_JOB_STATES)}, got {text!r}")
    return name


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(
        prog="gradserve",
        description="Train recurrent language models (RNN/GRU/LSTM) on a gradserve server.",
        epilog="exit codes:\n" + EXIT_CODES_HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_version(parser, "gradserve")
    _add_global_options(parser, suppress=False)
    globals_ = argparse.ArgumentParser(add_help=False)
    _add_global_options(globals_, suppress=True)
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def subcommand(name: str, handler, help: str, epilog: str | None = None) -> argparse.ArgumentParser:
        sub = commands.add_parser(name, parents=[globals_], help=help, description=help, epilog=epilog,
                                  formatter_class=argparse.RawDescriptionHelpFormatter)
        sub.set_defaults(handler=handler)
        return sub

    p = subcommand("upload", cmd_upload, "upload a UTF-8 text file; prints its dataset id")
    p.add_argument("file", type=Path, metavar="FILE")
    p.add_argument("--name", help="a label for people (default: the file's name)")

    p = subcommand("submit", cmd_submit, "submit a training job; prints its id and effective spec",
                epilog="exit codes (with --follow, as for watch):\n" + EXIT_CODES_HELP)
    p.add_argument(
        "--dataset", required=True,
        help="an id from `gradserve upload`, a local text file (uploaded first), or "
             + ", ".join(specs.BUILTIN_DATASETS),
    )
    p.add_argument("--follow", action="store_true", help="then watch the job until it ends, as `gradserve watch` does")
    p.add_argument("--name", default="", type=_label(labels.name_violations),
                   help=f"a label to find the job by (`list --name`), at most {labels.MAX_NAME_CHARS} characters")
    p.add_argument("--tag", action="append", default=[], type=_tag, metavar="KEY=VALUE",
                   help="a tag to filter by (`list --tag`); repeat for more")
    p.add_argument("--note", default="", type=_label(labels.note_violations),
                   help=f"free text kept with the job, at most {labels.MAX_NOTE_CHARS} characters")
    p.add_argument("--init-from", default="", metavar="JOB[@CHECKPOINT]",
                   help="start from another job's weights: its latest checkpoint, or JOB@best, or JOB@STEP; "
                        "model, sizes and vocabulary must match")
    p.add_argument("--init-optimizer", action="store_true", help="with --init-from: its optimizer state too")
    p.add_argument("--init-state", action="store_true",
                   help="with --init-from: its carried hidden state too (same batch size, partition sequential)")
    add_spec_flags(p)

    p = subcommand("resubmit", cmd_resubmit, "submit a job's spec again as a new job, with changes",
                   epilog="Only the flags given change; the name and note carry over unless given, and --tag adds\n"
                          "to the job's tags. Settings whose defaults derive from others (lr from the optimizer;\n"
                          "tbptt-k1, tbptt-k2 and auto's bounds from num-steps), when the job had those defaults,\n"
                          "are derived again from the changed spec (a switch to adam gets adam's lr).")
    p.add_argument("job", metavar="JOB")
    p.add_argument("--dataset", help="train on this instead: an id, a local text file (uploaded first), or a built-in")
    p.add_argument("--follow", action="store_true", help="then watch the new job until it ends")
    p.add_argument("--name", type=_label(labels.name_violations), help="a new name")
    p.add_argument("--tag", action="append", default=[], type=_tag, metavar="KEY=VALUE", help="a tag to add")
    p.add_argument("--note", type=_label(labels.note_violations), help="a new note")
    add_spec_flags(p, changes=True)

    p = subcommand("watch", cmd_watch, "follow a job's progress until it ends",
                epilog="with --json: one event object per line, the last being the job's final status.\n\n"
                       "exit codes:\n" + EXIT_CODES_HELP)
    p.add_argument("job", metavar="JOB")
    p.add_argument("--cursor", default="", help="resume after this event (Ctrl-C prints the cursor to use)")

    p = subcommand("status", cmd_status, "show a job's record and effective spec")
    p.add_argument("job", metavar="JOB")

    p = subcommand("list", cmd_list, "list jobs, newest first; filters combine",
                   epilog="TIME is a date or time (2026-11-30, 2026-11-30T14:00, local time) or an age: 90m, 6h, 2d\n"
                          "(that long ago). When there are more, the last line prints the command for the next page.")
    p.add_argument("--state", type=_job_state, metavar="STATE",
                   help="only jobs in this state: " + ", ".join(_JOB_STATES))
    p.add_argument("--name", default="", type=_label(labels.name_violations),
                   help="only jobs whose name contains this, ignoring case")
    p.add_argument("--tag", action="append", default=[], type=_tag, metavar="KEY=VALUE",
                   help="only jobs with this tag; repeat for jobs with all of them")
    p.add_argument("--model", type=_choice(tuple(specs.MODELS)), metavar="MODEL",
                   help="only jobs of this model: " + ", ".join(specs.MODELS))
    p.add_argument("--dataset", default="", help="only jobs on this dataset (an id or built-in name)")
    p.add_argument("--sweep", default="", help="only the members of this sweep")
    p.add_argument("--after", type=_time_arg, metavar="TIME", help="only jobs created at or after TIME")
    p.add_argument("--before", type=_time_arg, metavar="TIME", help="only jobs created before TIME")
    p.add_argument("--sort", default="created", type=_choice(SORT_ORDERS), metavar="ORDER",
                   help="created (newest first, the default), train_loss or val_loss (lowest first), "
                        "tokens_per_sec (highest first)")
    p.add_argument("--reverse", action="store_true", help="the opposite order")
    p.add_argument("--limit", type=_int_at_least(1, LIST_LIMIT_MAX), default=DEFAULT_LIST_LIMIT,
                   help=f"at most this many, 1 to {LIST_LIMIT_MAX} (default {DEFAULT_LIST_LIMIT})")
    p.add_argument("--page-token", default="", metavar="TOKEN", help="the next page, as printed below a full page")

    p = subcommand("logs", cmd_logs, "print what the workers logged while they ran a job",
                   epilog="A job keeps its newest 1,000 lines: warnings, each attempt's start and end, and a crash's\n"
                          "traceback. With -f, new lines follow until the job ends.")
    p.add_argument("job", metavar="JOB")
    p.add_argument("-f", "--follow", action="store_true", help="keep printing new lines until the job ends")

    p = subcommand("cancel", cmd_cancel, "cancel a job, or every member of a sweep: at once if queued, at the "
                                         "next step if running",
                epilog="exits 0 once the job is cancelled, asked to stop, or had already ended (the output says\n"
                       "which); 1 when it cannot be reached or found.")
    p.add_argument("job", metavar="JOB|SWEEP")

    p = subcommand("delete", cmd_delete, "remove ended jobs, or sweeps with all their members: their records, "
                                         "events and checkpoints",
                epilog="A QUEUED or RUNNING job is refused, and so is a sweep with such a member: cancel it first.\n"
                       "Exits 0 when everything given was deleted, 1 when anything was not (each one's reason is\n"
                       "printed).")
    p.add_argument("jobs", nargs="+", metavar="JOB|SWEEP")

    p = subcommand("download", cmd_download, "write a job's latest checkpoint to a file")
    p.add_argument("job", metavar="JOB")
    p.add_argument("-o", "--output", type=Path, required=True, metavar="FILE", help="where to write it")
    p.add_argument("--checkpoint", default="latest", type=_checkpoint_arg, metavar="WHICH",
                   help=CHECKPOINT_HELP)

    p = subcommand("generate", cmd_generate, "generate text from a job's latest checkpoint (running or finished)",
                epilog="The model reads the prefix (preprocessed and split like the job's text; unknown tokens\n"
                       "become <unk>), then adds --num-tokens tokens: characters for char jobs, words for\n"
                       "word jobs. A worker started with `gradserve-worker --queues generate` does the work.")
    p.add_argument("job", metavar="JOB")
    p.add_argument("--prefix", default="", help="text to start from (default: none)")
    p.add_argument("--num-tokens", type=_int_at_least(1, specs.MAX_GENERATE_TOKENS), default=DEFAULT_GENERATE_TOKENS,
                   metavar="N", help=f"tokens to add, 1 to {specs.MAX_GENERATE_TOKENS} (default {DEFAULT_GENERATE_TOKENS})")
    p.add_argument("--temperature", type=_temperature, default=0.0, metavar="T",
                   help="0 (default) always takes the likeliest token; above 0 samples from softmax(logits / T)")
    p.add_argument("--seed", type=_int_at_least(0), default=0, metavar="S",
                   help="seed for sampling: the same seed gives the same text (default 0)")
    p.add_argument("--checkpoint", default="latest", type=_checkpoint_arg, metavar="WHICH", help=CHECKPOINT_HELP)

    p = subcommand("plot", cmd_plot, "draw a job's loss, gradient norms and gradients through time to an image",
                epilog="Works on a running job too: it plots the history so far. Needs matplotlib:\n"
                       "pip install 'gradserve[plot]'.")
    p.add_argument("job", metavar="JOB")
    p.add_argument("-o", "--output", type=Path, required=True, metavar="FILE",
                   help="where to write it; the extension picks the format (.png, .svg, .pdf)")

    p = subcommand("export", cmd_export, "write a job's history to files: CSV tables, JSON lines or TensorBoard",
                   epilog="csv: metrics.csv, evaluations.csv, probes.csv, spectral_norms.csv, status.csv\n"
                          "jsonl: job.json and events.jsonl (one event a line)\n"
                          "tensorboard: an event file (scalars, and each probe's gradient-through-time profile as\n"
                          "an image); needs pip install 'gradserve[export]'. Works on a running job: the history so far.")
    p.add_argument("job", metavar="JOB")
    p.add_argument("--format", required=True, type=_choice(export.FORMATS), metavar="FORMAT",
                   help="csv, jsonl or tensorboard")
    p.add_argument("-o", "--output", type=Path, required=True, metavar="DIR", help="folder to write into (made if missing)")

    subcommand("datasets", cmd_datasets, "list your datasets, newest upload first")

    p = subcommand("delete-dataset", cmd_delete_dataset, "forget datasets you uploaded",
                   epilog="A dataset a QUEUED or RUNNING job of yours trains on is refused. The text is removed\n"
                          "once no one else has uploaded it. Exits 0 when every dataset given was deleted.")
    p.add_argument("datasets", nargs="+", metavar="DATASET")

    subcommand("workers", cmd_workers, "list the workers that are alive")

    sweep_cli.add_commands(subcommand)
    compare.add_command(subcommand)
    return parser


def main(argv: Sequence[str] | None = None, client_factory: ClientFactory = Client) -> int:
    """Run one command and return its exit code (the console script exits with it).

    `client_factory` turns the --server address into a client; tests pass a fake.
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    out = Console()
    if not out.is_terminal and "COLUMNS" not in os.environ:
        out = Console(width=PIPED_WIDTH)
    ctx = Context(args, client_factory, out, Console(stderr=True), argv)
    try:
        code = args.handler(ctx)
    except GradserveError as e:
        print_error(ctx.err, e, args.server)
        code = EXIT_FAILED
    except OSError as e:
        # A local file that cannot be read or written, not the server's doing.
        _plain(ctx.err, f"error: {e.strerror or e}" + (f": {e.filename}" if e.filename else ""))
        code = EXIT_FAILED
    except KeyboardInterrupt:
        _plain(ctx.err, "\ninterrupted")
        code = EXIT_INTERRUPTED
    return code

