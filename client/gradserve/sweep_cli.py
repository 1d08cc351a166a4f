"""The sweep commands: `gradserve sweep` submits one, `gradserve sweeps` lists them or shows one live.

A sweep's table has one row per member: its own values, state, step, the
latest training loss and perplexity, the latest held-out loss and
perplexity, grad norm and clip fraction. Rows are sorted by the held-out
loss, best first, members without one after them in the sweep's order.
"""

from __future__ import annotations

import argparse
import math
import time
from dataclasses import dataclass, field

from rich.console import Console
from rich.live import Live
from rich.text import Text

from gradserve import labels, sweeps
from gradserve.cliparts import (EXIT_BY_STATE, EXIT_FAILED, EXIT_INTERRUPTED, EXIT_OK, Context, _label, _plain,
                                _tag, add_spec_flags, fit_columns, print_error, print_json, resolve_dataset)
from gradserve.client import TERMINAL_STATES, Sweep, state_name
from gradserve.cmdline import command
from gradserve.errors import GradserveError
from gradserve.export import as_dict
from gradserve import spec as specs
from gradserve.v1 import jobs_pb2

SWEEP_COLUMNS = ("member", "state", "step", "train loss", "train ppl", "val loss", "val ppl", "val metric", "grad norm",
                 "clip %", "job")
SWEEPS_COLUMNS = ("id", "name", "members", "queued", "running", "succeeded", "failed", "cancelled", "best val loss",
                  "created")
# How often the live table is drawn again while events arrive.
LIVE_REFRESH_S = 0.5


@dataclass
class Row:
    """What the table shows of one member."""

    job_id: str
    values: dict[str, str]
    max_steps: int
    state: str = "QUEUED"
    step: int = 0
    train_loss: float | None = None
    train_ppl: float | None = None
    val_loss: float | None = None
    val_ppl: float | None = None
    val_metric: str = ""  # a synthetic task's own measure at that evaluation, e.g. "accuracy 0.93"
    grad_norm: float | None = None
    clip_fraction: float | None = None
    reason: str = ""

    @property
    def label(self) -> str:
        return " ".join(f"{k}={v}" for k, v in self.values.items())


@dataclass
class Board:
    """A sweep's members as the table shows them, kept up to date by its events."""

    sweep: jobs_pb2.Sweep
    rows: dict[str, Row] = field(default_factory=dict)

    @classmethod
    def of(cls, sweep: jobs_pb2.Sweep) -> Board:
        board = cls(sweep)
        for m in sweep.members:
            job, s = m.job, m.job.summary
            row = Row(m.job_id, sweeps.ordered(sweep.spec, m.values), job.spec.max_steps, state_name(job.state) if job.id else "-",
                      job.last_step, reason=job.reason)
            if s.step:
                row.train_loss, row.train_ppl, row.clip_fraction = s.train_loss, s.train_perplexity or None, s.clip_fraction
            if s.best_step:
                row.val_loss, row.val_ppl = s.best_val_loss, s.best_val_perplexity or None
                row.val_metric = _metric(s.metric, s.metric_value)
            board.rows[m.job_id] = row
        return board

    def saw(self, event: jobs_pb2.Event) -> Row | None:
        """Take one member's event in; returns its row when the event ended the member."""
        row = self.rows.get(event.job_id)
        if row is None:
            return None
        kind = event.WhichOneof("kind")
        if kind == "metrics":
            m = event.metrics
            row.step, row.train_loss, row.train_ppl = m.step, m.loss, m.perplexity or None
            row.grad_norm, row.clip_fraction = m.grad_norm, m.clip_fraction
        elif kind == "evaluation":
            e = event.evaluation
            row.val_loss, row.val_ppl, row.val_metric = e.loss, e.perplexity or None, _metric(e.metric, e.value)
        elif kind == "status":
            row.state, row.reason = state_name(event.status.state), event.status.reason
            row.step = max(row.step, event.status.step)
            if row.state in TERMINAL_STATES:
                return row
        return None

    def ranked(self) -> list[Row]:
        """Best held-out loss first; members without one after, in the sweep's order."""
        order = {job_id: i for i, job_id in enumerate(self.rows)}
        return sorted(self.rows.values(), key=lambda r: (r.val_loss is None or math.isnan(r.val_loss),
                                                         r.val_loss if r.val_loss is not None else 0.0,
                                                         order[r.job_id]))

    def lines(self, width: int) -> list[str]:
        cells = [{
            "member": r.label, "state": r.state, "step": f"{r.step}/{r.max_steps}",
            "train loss": _loss(r.train_loss), "train ppl": _num(r.train_ppl), "val loss": _loss(r.val_loss),
            "val ppl": _num(r.val_ppl), "val metric": r.val_metric or "-", "grad norm": _num(r.grad_norm),
            "clip %": "-" if r.clip_fraction is None else f"{100 * r.clip_fraction:.0f}", "job": r.job_id,
        } for r in self.ranked()]
        return fit_columns(cells, SWEEP_COLUMNS, width)

    def done(self) -> bool:
        return all(r.state in TERMINAL_STATES for r in self.rows.values())

    def best(self) -> Row | None:
        ranked = [r for r in self.ranked() if r.val_loss is not None and not math.isnan(r.val_loss)]
        return ranked[0] if ranked else None


def _metric(name: str, value: float) -> str:
    return f"{name} {value:.3g}" if name else ""


def _num(x: float | None) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "-"
    return f"{x:.4g}"


def _loss(x: float | None) -> str:
    # Nats to three places, as the metrics lines print them, so that a column of losses lines up digit by digit.
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "-"
    return f"{x:.3f}"


def render_board(console: Console, board: Board) -> None:
    header, *lines = board.lines(console.width)
    _plain(console, header, style="bold")
    for line in lines:
        _plain(console, line)


def _board_text(board: Board, width: int, title: str) -> Text:
    header, *lines = board.lines(width)
    text = Text(title + "\n")
    text.append(header + "\n", style="bold")
    text.append("\n".join(lines))
    return text


def follow_sweep(ctx: Context, sweep: Sweep) -> int:
    """Show the sweep's table as its members train, until every one has ended; the exit code says how they did."""
    board = Board.of(sweep.info)
    out, err = ctx.out, ctx.err
    try:
        if ctx.args.json:
            for event in sweep.events():
                print_json(out, as_dict(event))
        elif out.is_terminal:
            _live(out, sweep, board)
        else:
            for event in sweep.events():
                ended = board.saw(event)
                if ended is not None:
                    _plain(out, f"{ended.job_id} ({ended.label}) {ended.state} at step {ended.step}/{ended.max_steps}"
                                + (f": {ended.reason}" if ended.reason else ""))
    except KeyboardInterrupt:
        _plain(err, f"\nstopped watching; sweep {sweep.id} goes on.")
        _plain(err, f"resume:  {command('gradserve sweeps')} {sweep.id} --follow")
        _plain(err, f"cancel:  {command('gradserve cancel')} {sweep.id}")
        return EXIT_INTERRUPTED
    except GradserveError as e:
        print_error(err, e, ctx.args.server, [f"follow it again with `{command('gradserve sweeps')} {sweep.id} --follow`"])
        return EXIT_FAILED
    sweep.refresh()
    if not ctx.args.json:
        # The events' board keeps what the records lack (the last grad norm); the records have the last word on
        # the rest, which for a watch resumed after the end is all there is.
        final = Board.of(sweep.info)
        for job_id, row in final.rows.items():
            row.grad_norm = board.rows[job_id].grad_norm
        if not out.is_terminal:
            render_board(out, final)
        conclude(out, sweep.info, final)
    return exit_code(sweep.info)


def _live(out: Console, sweep: Sweep, board: Board) -> None:
    title = f"sweep {sweep.id}: {len(board.rows)} members"
    with Live(_board_text(board, out.width, title), console=out, auto_refresh=False) as live:
        drawn = 0.0
        for event in sweep.events():
            board.saw(event)
            if time.monotonic() - drawn >= LIVE_REFRESH_S:
                live.update(_board_text(board, out.width, title), refresh=True)
                drawn = time.monotonic()
        live.update(_board_text(board, out.width, title), refresh=True)


def conclude(out: Console, info: jobs_pb2.Sweep, board: Board) -> None:
    """The sweep's outcome in a line, its best member, and what to do next."""
    _plain(out, f"sweep {info.id}: {info.succeeded} succeeded, {info.failed} failed, {info.cancelled} cancelled"
                + (f", {info.queued} queued, {info.running} running" if info.queued or info.running else ""))
    if info.best_job_id:
        best = board.rows[info.best_job_id]
        ppl = f" (ppl {best.val_ppl:.4g})" if best.val_ppl else ""
        _plain(out, f"best: {info.best_job_id} ({best.label}), best val loss {info.best_val_loss:.4g}{ppl}")
        _plain(out, f"compare: {command('gradserve compare')} --sweep {info.id} -o compare.png")


def exit_code(info: jobs_pb2.Sweep) -> int:
    if info.failed:
        return EXIT_BY_STATE["FAILED"]
    if info.cancelled:
        return EXIT_BY_STATE["CANCELLED"]
    return EXIT_OK


def cmd_sweep(ctx: Context) -> int:
    a = ctx.args
    base = {f.name: getattr(a, f.name) for f in specs.FIELDS if getattr(a, f.name) is not None}
    with ctx.client() as client:
        base["dataset"] = resolve_dataset(ctx, client, a.dataset)
        sweep = client.submit_sweep(base=base, grid=dict(a.grid), members=a.member, early_stop=a.early_stop or "",
                                    min_steps=a.min_steps, min_peers=a.min_peers, eta=a.eta, name=a.name,
                                    tags=dict(a.tag), note=a.note)
        if a.json:
            print_json(ctx.out, as_dict(sweep.info))
        else:
            _plain(ctx.out, sweep.id)
            _plain(ctx.out, f"  {len(sweep.info.members)} members, QUEUED")
            for job, values in zip(sweep.jobs, sweep.values):
                _plain(ctx.out, f"  {job.id}  " + " ".join(f"{k}={v}" for k, v in values.items()))
            waiting = next((j.info.waiting for j in sweep.jobs if j.info.waiting), "")
            if waiting:
                _plain(ctx.err, f"warning: the members are QUEUED and waiting: {waiting}", style="yellow")
        if not a.follow:
            if not a.json:
                _plain(ctx.out, f"follow: {command('gradserve sweeps')} {sweep.id} --follow")
            return EXIT_OK
        return follow_sweep(ctx, sweep)


def cmd_sweeps(ctx: Context) -> int:
    a = ctx.args
    with ctx.client() as client:
        if a.sweep:
            sweep = client.get_sweep(a.sweep)
            if a.follow:
                return follow_sweep(ctx, sweep)
            if a.json:
                print_json(ctx.out, as_dict(sweep.info))
                return EXIT_OK
            board = Board.of(sweep.info)
            render_board(ctx.out, board)
            conclude(ctx.out, sweep.info, board)
            return EXIT_OK
        page = client.list_sweeps(limit=a.limit, page_token=a.page_token)
    if a.json:
        print_json(ctx.out, [as_dict(s) for s in page])
    elif not page:
        _plain(ctx.out, f"no sweeps; start one with `{command('gradserve sweep')} --dataset D --grid lr=0.5,1,2`")
    else:
        rows = [{
            "id": s.id, "name": s.name or "-", "members": str(len(s.members)), "queued": str(s.queued),
            "running": str(s.running), "succeeded": str(s.succeeded), "failed": str(s.failed),
            "cancelled": str(s.cancelled), "best val loss": f"{s.best_val_loss:.4g}" if s.best_job_id else "-",
            "created": time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(s.created_at.seconds)),
        } for s in page]
        header, *lines = fit_columns(rows, SWEEPS_COLUMNS, ctx.out.width)
        _plain(ctx.out, header, style="bold")
        for line in lines:
            _plain(ctx.out, line)
    if page.next_page_token:
        _plain(ctx.err, f"more: {command('gradserve sweeps')} --page-token {page.next_page_token}", style="dim")
    return EXIT_OK


def _axis(text: str) -> tuple[str, list[str]]:
    """FIELD=V1,V2,... as (field, values), each value checked as the field's."""
    name, eq, values = text.partition("=")
    name = name.strip().replace("-", "_")
    if not eq or not values:
        raise argparse.ArgumentTypeError(f"must be FIELD=VALUE,VALUE,..., like lr=0.5,1,2; got {text!r}")
    items = [v.strip() for v in values.split(",")]
    for v in items:
        try:
            sweeps.parse(name, v)
        except ValueError as e:
            raise argparse.ArgumentTypeError(f"{name} value {v!r}: {e}") from None
    return name, items


def _member(text: str) -> dict[str, str]:
    """FIELD=VALUE,FIELD=VALUE as the fields one explicit member sets."""
    values = {}
    for part in text.split(","):
        name, eq, value = part.partition("=")
        name = name.strip().replace("-", "_")
        if not eq:
            raise argparse.ArgumentTypeError(f"must be FIELD=VALUE,FIELD=VALUE, like lr=3,num_steps=10; got {text!r}")
        try:
            sweeps.parse(name, value.strip())
        except ValueError as e:
            raise argparse.ArgumentTypeError(f"{name} value {value.strip()!r}: {e}") from None
        values[name] = value.strip()
    return values


def add_commands(subcommand) -> None:
    p = subcommand("sweep", cmd_sweep, "submit a sweep: one job per combination of the grid's values",
                   epilog="Each --grid FIELD=V1,V2,... is an axis; the members are every combination (the last axis\n"
                          "varies fastest), then each --member. The spec flags set what all members share. At most\n"
                          f"{sweeps.MAX_MEMBERS} members. With --follow, a table of the members updates as they train,\n"
                          "sorted by held-out loss, and the best is named at the end.\n\n"
                          "example: gradserve sweep --dataset builtin:pydocs --model rnn_scratch --hidden-size 128 \\\n"
                          "           --grid lr=0.5,1,2 --grid num_steps=5,35 --follow")
    p.add_argument("--dataset", required=True,
                   help="an id from `gradserve upload`, a local text file (uploaded first), or "
                        + ", ".join(specs.BUILTIN_DATASETS))
    p.add_argument("--grid", action="append", default=[], type=_axis, metavar="FIELD=V1,V2,...",
                   help="an axis of the grid; repeat for more")
    p.add_argument("--member", action="append", default=[], type=_member, metavar="FIELD=V,FIELD=V",
                   help="one more member, with these fields set; repeat for more")
    p.add_argument("--early-stop", choices=sweeps.RULES,
                   help="median: stop a member whose held-out loss is worse than the others' median at the same "
                        "step; halving: successive halving at steps min-steps x eta^k")
    p.add_argument("--min-steps", type=int, default=0, metavar="N",
                   help="no member is stopped early before step N (default: eval-every)")
    p.add_argument("--min-peers", type=int, default=0, metavar="N",
                   help=f"median: other members needed at a step (default {sweeps.DEFAULT_MIN_PEERS})")
    p.add_argument("--eta", type=int, default=0, metavar="N",
                   help=f"halving: keep the best 1/N at each rung (default {sweeps.DEFAULT_ETA})")
    p.add_argument("--follow", action="store_true", help="then show the members' table until all have ended")
    p.add_argument("--name", default="", type=_label(labels.name_violations),
                   help="the sweep's name; each member is named after it and its own values")
    p.add_argument("--tag", action="append", default=[], type=_tag, metavar="KEY=VALUE",
                   help="a tag for the sweep and every member; repeat for more")
    p.add_argument("--note", default="", type=_label(labels.note_violations), help="free text kept with the sweep")
    add_spec_flags(p, changes=True)

    p = subcommand("sweeps", cmd_sweeps, "list your sweeps, or show one sweep's members",
                   epilog="With a SWEEP: its table, sorted by held-out loss, best first; --follow updates it live.\n"
                          "Members are jobs: `gradserve list --sweep SWEEP`, `watch`, `plot` and `download` work on them.")
    p.add_argument("sweep", nargs="?", default="", metavar="SWEEP")
    p.add_argument("--follow", action="store_true", help="with SWEEP: update the table until every member has ended")
    p.add_argument("--limit", type=int, default=50, help="without SWEEP: at most this many (default 50)")
    p.add_argument("--page-token", default="", metavar="TOKEN", help="the next page, as printed below a full page")
