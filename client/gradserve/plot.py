"""A job's training run as one picture: loss, gradient norms, and gradients through time.

    gradserve plot JOB -o run.png

or from Python (matplotlib comes with the `plot` extra: pip install 'gradserve[plot]'):

    from gradserve.plot import plot_run
    events = list(job.events(follow=False))    # the history so far; the job may still be running
    plot_run(events, job.info).savefig("run.png")

Three panels, all against the training step:

  1. training loss (metrics events) and validation loss (evaluation events),
     with the perplexity, exp(loss), on the right-hand axis;
  2. the global gradient norm before clipping, the clip threshold, and the
     logged steps at which clipping fired;
  3. ||dL/dh_t|| across the positions t of one truncation window, from the
     gradient-through-time probes: a heatmap with a log colour scale, so a
     gradient that vanishes (or explodes) toward the window's start shows up
     as a fade (or a flare) toward the left, and training moves it up the rows;
     under it, the latest probe's advice on the window, in the CLI's words.

Figures are drawn with the Agg canvas, never a window, so this works on servers.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from types import SimpleNamespace

from gradserve import spec as specs
from gradserve.truncation import advice_line
from gradserve.v1 import jobs_pb2

INSTALL_HINT = "pip install 'gradserve[plot]'"
FIGURE_SIZE = (9.0, 11.0)
DPI = 120
# Layer whose gradient-through-time profile the heatmap shows: the first one,
# whose gradient has come back through every layer above it as well as through time.
PROFILE_LAYER = 0
TRAIN_COLOR, VAL_COLOR, CLIP_COLOR = "tab:blue", "tab:orange", "tab:red"


class MatplotlibMissing(ImportError):
    """Plotting was asked for, but matplotlib is not installed."""


def load_matplotlib() -> SimpleNamespace:
    """What the plot needs from matplotlib (and numpy, which it brings), imported on first use."""
    try:
        import matplotlib
    except ImportError as e:
        raise MatplotlibMissing(f"plotting needs matplotlib, which is not installed; {INSTALL_HINT}") from e
    import numpy
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.colors import LogNorm
    from matplotlib.figure import Figure

    return SimpleNamespace(np=numpy, Figure=Figure, FigureCanvasAgg=FigureCanvasAgg, LogNorm=LogNorm,
                           colormaps=matplotlib.colormaps)


@dataclass
class RunHistory:
    """The parts of a job's events that the plot draws, in step order."""

    metrics: list[jobs_pb2.Metrics] = field(default_factory=list)
    evaluations: list[jobs_pb2.Evaluation] = field(default_factory=list)
    probes: list[jobs_pb2.Probe] = field(default_factory=list)

    @classmethod
    def from_events(cls, events: Iterable[jobs_pb2.Event]) -> RunHistory:
        history = cls()
        for event in events:
            kind = event.WhichOneof("kind")
            if kind == "metrics":
                history.metrics.append(event.metrics)
            elif kind == "evaluation":
                history.evaluations.append(event.evaluation)
            elif kind == "probe":
                history.probes.append(event.probe)
        # A job resumed after a lost worker repeats the steps since its checkpoint: keep the latest report of each.
        history.metrics = _latest_per_step(history.metrics)
        history.evaluations = _latest_per_step(history.evaluations)
        history.probes = _latest_per_step(history.probes)
        return history


def _latest_per_step(items: list) -> list:
    return sorted({item.step: item for item in items}.values(), key=lambda item: item.step)


def profile_matrix(probes: list[jobs_pb2.Probe], layer: int = PROFILE_LAYER):
    """(steps, norms): the probe steps that profile `layer`, and their ||dL/dh_t|| as a steps × positions array.

    Windows of different lengths are padded with NaN on the right.
    """
    np = load_matplotlib().np
    rows, steps = [], []
    for probe in probes:
        profile = next((p for p in probe.grad_through_time if p.layer == layer), None)
        if profile is not None and len(profile.norms):
            rows.append(list(profile.norms))
            steps.append(probe.step)
    width = max((len(r) for r in rows), default=0)
    norms = np.full((len(rows), width), np.nan)
    for i, row in enumerate(rows):
        norms[i, : len(row)] = row
    return steps, norms


def plot_run(events: Iterable[jobs_pb2.Event], job: jobs_pb2.Job):
    """A matplotlib Figure with the three panels for `job`'s `events` (all of them, or the history so far)."""
    mpl = load_matplotlib()
    history = RunHistory.from_events(events)
    fig = mpl.Figure(figsize=FIGURE_SIZE, dpi=DPI, layout="constrained")
    mpl.FigureCanvasAgg(fig)
    loss_ax, grad_ax, heat_ax = fig.subplots(3, 1)
    state = jobs_pb2.JobState.Name(job.state)
    spec = job.spec
    fig.suptitle(
        f"{job.id}  ({state}, step {job.last_step}/{spec.max_steps})\n"
        f"{spec.model} hidden_size={spec.hidden_size} num_layers={spec.num_layers} "
        f"num_steps={spec.num_steps} {spec.optimizer} lr={spec.lr:g} clip_norm={spec.clip_norm:g}",
        fontsize="medium",
    )
    _loss_panel(mpl, loss_ax, history, language_model=spec.dataset not in specs.SYNTHETIC_TASKS)
    _grad_panel(loss_ax, grad_ax, history, spec.clip_norm)
    _profile_panel(mpl, fig, heat_ax, history, spec.probe_every)
    return fig


def empty(ax, message: str) -> None:
    ax.text(0.5, 0.5, message, ha="center", va="center", transform=ax.transAxes, wrap=True)
    ax.set_xticks([])
    ax.set_yticks([])


def _loss_panel(mpl, ax, history: RunHistory, *, language_model: bool) -> None:
    ax.set_title("loss (nats per token)", loc="left", fontsize="medium")
    if not history.metrics and not history.evaluations:
        empty(ax, "no metrics yet: the first come after log_every steps")
        return
    if history.metrics:
        ax.plot([m.step for m in history.metrics], [m.loss for m in history.metrics], color=TRAIN_COLOR,
                label="training (mean over each log interval)")
    if history.evaluations:
        ax.plot([e.step for e in history.evaluations], [e.loss for e in history.evaluations], "o-", color=VAL_COLOR,
                markersize=4, label="validation")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.grid(alpha=0.3)
    ax.legend(loc="best", fontsize="small")
    if language_model:
        # Perplexity is exp(loss): a second scale on the same curves, not more curves.
        np = mpl.np
        perplexity = ax.secondary_yaxis("right", functions=(np.exp, lambda p: np.log(np.maximum(p, 1e-300))))
        perplexity.set_ylabel("perplexity")


def _grad_panel(loss_ax, ax, history: RunHistory, clip_norm: float) -> None:
    ax.set_title("gradient norm before clipping (global L2, at each logged step)", loc="left", fontsize="medium")
    if not history.metrics:
        empty(ax, "no metrics yet")
        return
    ax.sharex(loss_ax)
    steps = [m.step for m in history.metrics]
    ax.plot(steps, [m.grad_norm for m in history.metrics], color=TRAIN_COLOR, label="grad norm")
    clipped = [m for m in history.metrics if m.clipped]
    if clipped:
        ax.plot([m.step for m in clipped], [m.grad_norm for m in clipped], "v", color=CLIP_COLOR, markersize=5,
                label=f"clipped ({len(clipped)} of {len(steps)} logged steps)")
    if clip_norm > 0:
        ax.axhline(clip_norm, color=CLIP_COLOR, linestyle="--", linewidth=1, label=f"clip_norm = {clip_norm:g}")
    if all(m.grad_norm > 0 for m in history.metrics):
        # Exploding and vanishing gradients span orders of magnitude.
        ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.set_ylabel("‖g‖")
    ax.grid(alpha=0.3)
    ax.legend(loc="best", fontsize="small")


def profile_mesh(mpl, ax, steps: list[int], norms, norm):
    """Draw profile_matrix's (steps, norms) on `ax` as a heatmap on colour scale `norm`; returns the mesh."""
    np = mpl.np
    # Cell edges halfway between the probe steps, so uneven spacing (a final probe, say) is drawn true to scale.
    s = np.asarray(steps, dtype=float)
    gap = np.diff(s).min() if len(s) > 1 else 1.0
    y_edges = np.concatenate([[s[0] - gap / 2], (s[:-1] + s[1:]) / 2, [s[-1] + gap / 2]])
    x_edges = np.arange(norms.shape[1] + 1) - 0.5
    masked = np.ma.masked_where(~(np.isfinite(norms) & (norms > 0)), norms)
    return ax.pcolormesh(x_edges, y_edges, masked, norm=norm,
                         cmap=mpl.colormaps["viridis"].with_extremes(bad="lightgrey"), shading="flat")


def _profile_panel(mpl, fig, ax, history: RunHistory, probe_every: int) -> None:
    ax.set_title(f"‖∂L/∂h_t‖ through the window (layer {PROFILE_LAYER})", loc="left", fontsize="medium")
    np = mpl.np
    steps, norms = profile_matrix(history.probes)
    finite = norms[np.isfinite(norms) & (norms > 0)]
    if not steps or not finite.size:
        empty(ax, f"no gradient-through-time probes yet: the trainer records one every {probe_every} steps")
        return
    mesh = profile_mesh(mpl, ax, steps, norms, mpl.LogNorm(vmin=finite.min(), vmax=finite.max()))
    colorbar = fig.colorbar(mesh, cax=ax.inset_axes([1.01, 0.0, 0.02, 1.0]))
    colorbar.set_label("‖∂L/∂h_t‖ (log scale)")
    advised = [p for p in history.probes if p.HasField("decay_rate")]
    advice = ""
    if advised:
        latest = advised[-1]
        advice = f"\nstep {latest.step}: " + advice_line(latest.half_life, latest.suggested_window,
                                                               latest.warning).replace("; ", "\n")
    ax.set_xlabel("position t in the truncation window (0 = oldest; the gradient flows right to left)" + advice)
    ax.set_ylabel("step")
