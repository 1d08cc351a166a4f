"""Several jobs' training runs in one picture, to see what a change of setting did.

    gradserve compare JOB JOB ... -o compare.png
    gradserve compare --sweep SWEEP -o compare.png

or from Python (matplotlib comes with the `plot` extra: pip install 'gradserve[plot]'):

    from gradserve.compare import compare_runs, fetch_runs
    runs = fetch_runs(client, sweep_id=sweep.id)     # or job_ids=[...]; each job's history so far
    compare_runs(runs).savefig("compare.png")

One colour per job throughout, and each job named by its sweep values
(`lr=0.5 num_steps=5`) when it is a sweep member, else by its name or id:

  1. training loss and validation loss against the step, side by side;
  2. the gradient norm before clipping, each job's clip_norm as a dashed line
     and the logged steps at which clipping fired as triangles;
  3. each job's ||dL/dh_t|| heatmap (window position against the step, as
     `gradserve plot` draws it), all on ONE log colour scale, so a fainter
     heatmap is a smaller gradient and not an artefact of its own scale;
  4. a table of where each job ended: its state and step, final training loss,
     best validation loss and its step (and a synthetic task's measure there),
     the share of steps clipped, and tokens/s.

A running job is drawn as it stands: its history so far. Figures are drawn
with the Agg canvas, never a window.
"""

from __future__ import annotations

import errno
import math
import textwrap
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from gradserve import plot
from gradserve.cliparts import EXIT_FAILED, EXIT_OK, Context, _plain, print_json
from gradserve.client import Job, state_name
from gradserve.sweeps import ordered
from gradserve.v1 import jobs_pb2

# More than this and the legend, the colours and the row of heatmaps stop being readable.
MAX_JOBS = 12
HEATMAP_COLUMNS = 4
FIGURE_WIDTH = 14.0
DPI = 100
# Inches of figure height per part: curves, one row of heatmaps, one table row.
CURVES_HEIGHT, HEATMAP_ROW_HEIGHT, TABLE_ROW_HEIGHT = 3.6, 3.0, 0.3
# Longer labels wrap, so that neighbouring heatmaps' titles do not run into each other.
HEATMAP_TITLE_CHARS = 34
TABLE_COLUMNS = ("job", "state", "step", "final train loss", "best val loss", "at step", "clip %", "tokens/s")


@dataclass
class Run:
    """One job as the comparison draws it: its record, its events so far, and the name its legend entry shows."""

    job: jobs_pb2.Job
    history: plot.RunHistory
    label: str
    events: int = 0

    @classmethod
    def of(cls, job: jobs_pb2.Job | Job, events: Iterable[jobs_pb2.Event],
           values: Mapping[str, str] | None = None) -> Run:
        """`job` (a record or a handle) with its events; `values`, a sweep member's own fields in the sweep's
        order (`Sweep.values`, `sweeps.ordered`), name it."""
        info = job.info if hasattr(job, "info") else job
        events = list(events)
        return cls(info, plot.RunHistory.from_events(events), member_label(info, values), len(events))


def member_label(job: jobs_pb2.Job, values: Mapping[str, str] | None = None) -> str:
    """What tells this job apart: a member's sweep values, else the name it was given, else its id."""
    if values:
        return " ".join(f"{name}={value}" for name, value in values.items())
    return job.name or job.id


def distinct_labels(runs: Sequence[Run]) -> None:
    """Labels that two jobs share get each job's id appended, so the legend never names two jobs alike."""
    counts: dict[str, int] = {}
    for run in runs:
        counts[run.label] = counts.get(run.label, 0) + 1
    for run in runs:
        if counts[run.label] > 1 and run.label != run.job.id:
            run.label = f"{run.label} ({run.job.id})"


# ------------------------------------------------------------------ the table


def table_rows(runs: Sequence[Run]) -> list[dict[str, str]]:
    """One row per job, in TABLE_COLUMNS (and the task's measure, where a job has one), from its record's summary."""
    metric = next((r.job.summary.metric for r in runs if r.job.summary.metric), "")
    rows = []
    for run in runs:
        job, s = run.job, run.job.summary
        row = {
            "job": run.label, "state": state_name(job.state), "step": f"{job.last_step}/{job.spec.max_steps}",
            "final train loss": _num(s.train_loss) if s.step else "-",
            "best val loss": _num(s.best_val_loss) if s.best_step else "-",
            "at step": str(s.best_step) if s.best_step else "-",
        }
        if metric:
            row[f"val {metric}"] = _num(s.metric_value) if s.best_step and s.metric == metric else "-"
        row["clip %"] = f"{100 * s.clip_fraction:.0f}" if s.step else "-"
        row["tokens/s"] = f"{s.tokens_per_sec:,.0f}" if s.tokens_per_sec else "-"
        rows.append(row)
    return rows


def _num(x: float) -> str:
    return "-" if math.isnan(x) else f"{x:.4g}"


# ------------------------------------------------------------------ the figure


def compare_runs(runs: Sequence[Run], title: str = ""):
    """A matplotlib Figure comparing `runs` (see the module docstring); their labels are made distinct first."""
    if not runs:
        raise ValueError("nothing to compare: give at least one job")
    mpl = plot.load_matplotlib()
    distinct_labels(runs)
    colours = job_colours(mpl, len(runs))
    heat_rows = math.ceil(len(runs) / HEATMAP_COLUMNS)
    table_height = TABLE_ROW_HEIGHT * (len(runs) + 2)
    heights = [CURVES_HEIGHT, CURVES_HEIGHT, HEATMAP_ROW_HEIGHT * heat_rows, table_height]
    fig = mpl.Figure(figsize=(FIGURE_WIDTH, sum(heights)), dpi=DPI, layout="constrained")
    mpl.FigureCanvasAgg(fig)
    fig.suptitle(title or f"{len(runs)} jobs compared", fontsize="large")
    loss_fig, grad_fig, heat_fig, table_fig = fig.subfigures(4, 1, height_ratios=heights)
    train_ax, val_ax = loss_fig.subplots(1, 2, sharex=True)
    _loss_panels(train_ax, val_ax, runs, colours)
    _legend(loss_fig, runs, colours)
    _grad_panel(grad_fig.subplots(), runs, colours)
    _heatmaps(mpl, heat_fig, runs, colours)
    _table(table_fig.subplots(), runs, colours)
    return fig


def job_colours(mpl, n: int) -> list:
    """n colours that tell jobs apart: tab10's while they last, tab20's beyond."""
    cmap = mpl.colormaps["tab10" if n <= 10 else "tab20"]
    return [cmap(i % cmap.N) for i in range(n)]


def _loss_panels(train_ax, val_ax, runs: Sequence[Run], colours) -> None:
    train_ax.set_title("training loss (mean over each log interval)", loc="left", fontsize="medium")
    val_ax.set_title("validation loss", loc="left", fontsize="medium")
    for run, colour in zip(runs, colours):
        h = run.history
        if h.metrics:
            train_ax.plot([m.step for m in h.metrics], [m.loss for m in h.metrics], color=colour, label=run.label)
        if h.evaluations:
            val_ax.plot([e.step for e in h.evaluations], [e.loss for e in h.evaluations], "o-", color=colour,
                        markersize=3, label=run.label)
    for ax, what in ((train_ax, "metrics"), (val_ax, "evaluations")):
        if not ax.get_lines():
            plot.empty(ax, f"no {what} yet")
            continue
        ax.set_xlabel("step")
        ax.set_ylabel("loss")
        ax.grid(alpha=0.3)


def _legend(subfig, runs: Sequence[Run], colours) -> None:
    """One legend beside the loss panels serves the whole figure (the colours are the same throughout), and names
    every job, those with nothing drawn yet too."""
    from matplotlib.lines import Line2D

    handles = [Line2D([], [], color=colour, label=run.label) for run, colour in zip(runs, colours)]
    subfig.legend(handles=handles, loc="outside right upper", fontsize="small")


def _grad_panel(ax, runs: Sequence[Run], colours) -> None:
    ax.set_title("gradient norm before clipping (dashed: clip_norm; ▼: logged steps at which clipping fired)",
                 loc="left", fontsize="medium")
    drawn = [(run, colour) for run, colour in zip(runs, colours) if run.history.metrics]
    if not drawn:
        plot.empty(ax, "no metrics yet")
        return
    # The curves go unlabelled: the loss panel's legend names the colours; this one names the thresholds.
    for run, colour in drawn:
        metrics = run.history.metrics
        ax.plot([m.step for m in metrics], [m.grad_norm for m in metrics], color=colour, linewidth=1)
        clipped = [m for m in metrics if m.clipped]
        if clipped:
            ax.plot([m.step for m in clipped], [m.grad_norm for m in clipped], "v", color=colour, markersize=4)
    clip_norms = {run.job.spec.clip_norm for run, _ in drawn}
    if len(clip_norms) == 1:
        # One threshold for all: one grey line, not one per job, each hidden under the next.
        clip_norm = clip_norms.pop()
        if clip_norm > 0:
            ax.axhline(clip_norm, color="grey", linestyle="--", linewidth=1,
                       label=f"clip_norm = {clip_norm:g} (all jobs)")
    else:
        for run, colour in drawn:
            if run.job.spec.clip_norm > 0:
                ax.axhline(run.job.spec.clip_norm, color=colour, linestyle="--", linewidth=1,
                           label=f"clip_norm = {run.job.spec.clip_norm:g}")
    if all(m.grad_norm > 0 for run, _ in drawn for m in run.history.metrics):
        # Exploding and vanishing gradients span orders of magnitude.
        ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.set_ylabel("‖g‖")
    ax.grid(alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(loc="best", fontsize="small")


def shared_norm(mpl, matrices):
    """One LogNorm spanning every heatmap's positive finite norms, or None when there are none."""
    np = mpl.np
    values = [m[np.isfinite(m) & (m > 0)] for m in matrices]
    values = [v for v in values if v.size]
    if not values:
        return None
    return mpl.LogNorm(vmin=min(v.min() for v in values), vmax=max(v.max() for v in values))


def _heatmaps(mpl, subfig, runs: Sequence[Run], colours) -> None:
    profiles = [plot.profile_matrix(run.history.probes) for run in runs]
    norm = shared_norm(mpl, [norms for _, norms in profiles])
    columns = min(len(runs), HEATMAP_COLUMNS)
    axes = subfig.subplots(math.ceil(len(runs) / columns), columns, squeeze=False).ravel()
    subfig.suptitle(f"‖∂L/∂h_t‖ through the window (layer {plot.PROFILE_LAYER}), one colour scale for all; "
                    "x: position t in the window (0 = oldest), y: step", fontsize="medium")
    mesh = None
    for ax, run, colour, (steps, norms) in zip(axes, runs, colours, profiles):
        ax.set_title(textwrap.fill(run.label, HEATMAP_TITLE_CHARS), fontsize="small", color=colour)
        if norm is None or not steps:
            plot.empty(ax, "no probes yet")
            continue
        mesh = plot.profile_mesh(mpl, ax, steps, norms, norm)
    for ax in axes[len(runs):]:
        ax.set_axis_off()
    if mesh is not None:
        subfig.colorbar(mesh, ax=list(axes), label="‖∂L/∂h_t‖ (log scale)", shrink=0.9)


def _table(ax, runs: Sequence[Run], colours) -> None:
    ax.set_axis_off()
    rows = table_rows(runs)
    columns = list(rows[0])
    table = ax.table(cellText=[[row[c] for c in columns] for row in rows], colLabels=columns, loc="center",
                     cellLoc="right", colLoc="right")
    table.auto_set_font_size(False)
    table.set_fontsize(9)
    for i, colour in enumerate(colours, start=1):
        # The job's name in its colour ties the row to its curves.
        table[i, 0].get_text().set_color(colour)
        table[i, 0].set_text_props(ha="left")
    table.auto_set_column_width(list(range(len(columns))))


# ------------------------------------------------------------------ the command


class TooManyJobs(ValueError):
    """More jobs were asked for than one figure can tell apart."""


def fetch_runs(client, job_ids: Sequence[str] = (), sweep_id: str = "", max_jobs: int = MAX_JOBS) -> list[Run]:
    """The runs to draw: a sweep's members in its order, or the jobs given (a member named by its sweep values).

    More than `max_jobs` raises TooManyJobs before any history is fetched.
    """
    if sweep_id:
        sweep = client.get_sweep(sweep_id)
        if len(sweep.info.members) > max_jobs:
            raise TooManyJobs(f"sweep {sweep_id} has {len(sweep.info.members)} members; compare draws at most "
                              f"{max_jobs}: name the jobs to draw (JOB JOB ...)")
        return [Run.of(job, job.events(follow=False), values) for job, values in zip(sweep.jobs, sweep.values)]
    job_ids = list(dict.fromkeys(job_ids))
    if len(job_ids) > max_jobs:
        raise TooManyJobs(f"{len(job_ids)} jobs were given; compare draws at most {max_jobs}")
    runs, sweeps = [], {}
    for job_id in job_ids:
        job = client.get_job(job_id)
        values = None
        if job.info.sweep:
            if job.info.sweep not in sweeps:
                sweeps[job.info.sweep] = client.get_sweep(job.info.sweep).info
            sweep = sweeps[job.info.sweep]
            values = next((ordered(sweep.spec, m.values) for m in sweep.members if m.job_id == job.id), None)
        # The history so far: a running job is drawn as it stands, without waiting for it to end.
        runs.append(Run.of(job, job.events(follow=False), values))
    return runs


def cmd_compare(ctx: Context) -> int:
    a = ctx.args
    try:
        plot.load_matplotlib()
    except plot.MatplotlibMissing as e:
        # Said before anything else happens, rather than after fetching every job's history.
        _plain(ctx.err, f"error: {e}")
        return EXIT_FAILED
    folder = a.output.parent
    if not folder.is_dir():
        raise FileNotFoundError(errno.ENOENT, "no such directory", str(folder))
    try:
        with ctx.client() as client:
            runs = fetch_runs(client, a.jobs, a.sweep)
    except TooManyJobs as e:
        _plain(ctx.err, f"error: {e}")
        return EXIT_FAILED
    compare_runs(runs, f"sweep {a.sweep}: {len(runs)} members" if a.sweep else "").savefig(a.output)
    if a.json:
        print_json(ctx.out, {"path": str(a.output), "jobs": [
            {"id": r.job.id, "label": r.label, "state": state_name(r.job.state), "events": r.events} for r in runs]})
        return EXIT_OK
    h = [r.history for r in runs]
    _plain(ctx.out, f"wrote {a.output}: {len(runs)} jobs, {sum(len(x.metrics) for x in h)} metrics, "
                    f"{sum(len(x.evaluations) for x in h)} evaluations, {sum(len(x.probes) for x in h)} probes")
    for r in runs:
        _plain(ctx.out, f"  {r.job.id}  {r.label}: {state_name(r.job.state)} at step {r.job.last_step}, "
                        f"{len(r.history.metrics)} metrics, {len(r.history.evaluations)} evaluations, "
                        f"{len(r.history.probes)} probes")
    return EXIT_OK


def add_command(subcommand) -> None:
    p = subcommand("compare", cmd_compare, "draw several jobs' curves in one image: a sweep's members, or jobs named",
                   epilog="Training and validation loss, gradient norms with each job's clip line, and the\n"
                          "gradient-through-time heatmaps side by side on one colour scale, with a table of final\n"
                          "numbers. Works on running jobs too: their history so far. Needs matplotlib:\n"
                          "pip install 'gradserve[plot]'.\n\n"
                          "examples: gradserve compare --sweep SWEEP -o compare.png\n"
                          "          gradserve compare JOB JOB -o compare.png")
    which = p.add_mutually_exclusive_group(required=True)
    which.add_argument("jobs", nargs="*", default=[], metavar="JOB", help="jobs to draw, in this order")
    which.add_argument("--sweep", default="", metavar="SWEEP", help="draw every member of this sweep")
    p.add_argument("-o", "--output", type=Path, required=True, metavar="FILE",
                   help="where to write it; the extension picks the format (.png, .svg, .pdf)")

