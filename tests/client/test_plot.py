"""`gradserve.plot` draws a run from its events, and `gradserve plot` writes it to a file.

The events are built by hand, so every number in the picture is known.
"""

from __future__ import annotations

import math
import sys
from pathlib import Path

import pytest

pytest.importorskip("matplotlib", reason="the plot extra is not installed: pip install './client[plot]'")

from gradserve import cli, plot, truncation  # noqa: E402
from gradserve.v1 import jobs_pb2  # noqa: E402
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "harness"))
from fakes import FakeClient, FakeJob  # noqa: E402

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
CLIP_NORM = 0.5
WINDOW = 12
PROBE_STEPS = [100, 200, 300, 400]


def job_record(state=jobs_pb2.RUNNING, last_step=400) -> jobs_pb2.Job:
    spec = jobs_pb2.JobSpec(dataset="builtin:pydocs", model="rnn", hidden_size=64, num_layers=2, num_steps=WINDOW,
                            max_steps=1000, optimizer="sgd", lr=1.0, clip_norm=CLIP_NORM, probe_every=100)
    return jobs_pb2.Job(id="job-0123456789abcdef0123", spec=spec, state=state, last_step=last_step)


def metrics(step: int) -> jobs_pb2.Event:
    loss = 3.3 * math.exp(-step / 300) + 1.5
    grad = 0.2 + (1.0 if step % 100 == 0 else 0.0)  # every hundredth step spikes above the threshold
    return jobs_pb2.Event(metrics=jobs_pb2.Metrics(step=step, loss=loss, perplexity=math.exp(loss), grad_norm=grad,
                                                   clipped=grad > CLIP_NORM))


def evaluation(step: int) -> jobs_pb2.Event:
    loss = 3.3 * math.exp(-step / 300) + 1.7
    return jobs_pb2.Event(evaluation=jobs_pb2.Evaluation(step=step, loss=loss, perplexity=math.exp(loss)))


def probe(step: int) -> jobs_pb2.Event:
    # A gradient that vanishes toward the window's start, less so as training goes on; layer 1 is there too.
    decay = 0.5 + step / 1000
    layer0 = [decay ** (WINDOW - 1 - t) for t in range(WINDOW)]
    return jobs_pb2.Event(probe=jobs_pb2.Probe(step=step, grad_through_time=[
        jobs_pb2.GradProfile(layer=1, norms=[1.0] * WINDOW),
        jobs_pb2.GradProfile(layer=0, norms=layer0),
    ]))


def run_events(with_probes: bool = True) -> list[jobs_pb2.Event]:
    events = [jobs_pb2.Event(status=jobs_pb2.StatusChange(state=jobs_pb2.RUNNING))]
    for step in range(50, 401, 50):
        events.append(metrics(step))
        if step in PROBE_STEPS:
            events.append(evaluation(step))
            if with_probes:
                events.append(probe(step))
    return events


def heatmap(ax):
    (mesh,) = ax.collections
    return mesh


def test_the_figure_has_three_panels_and_saves_as_a_png(tmp_path):
    fig = plot.plot_run(run_events(), job_record())
    path = tmp_path / "run.png"
    fig.savefig(path)

    assert path.read_bytes()[:8] == PNG_MAGIC
    assert len(fig.axes) == 3


def test_loss_panel_draws_training_and_validation_loss():
    loss_ax = plot.plot_run(run_events(), job_record()).axes[0]

    train, validation = loss_ax.get_lines()
    assert list(train.get_xdata()) == list(range(50, 401, 50))
    assert list(validation.get_xdata()) == PROBE_STEPS
    assert validation.get_ydata()[0] == pytest.approx(3.3 * math.exp(-1 / 3) + 1.7)
    assert [a.get_ylabel() for a in loss_ax.child_axes] == ["perplexity"]


def test_grad_panel_marks_the_clip_threshold_and_the_clipped_steps():
    grad_ax = plot.plot_run(run_events(), job_record()).axes[1]

    lines = {line.get_label(): line for line in grad_ax.get_lines()}
    threshold = lines[f"clip_norm = {CLIP_NORM:g}"]
    assert list(threshold.get_ydata()) == [CLIP_NORM, CLIP_NORM]
    clipped = next(line for label, line in lines.items() if label.startswith("clipped"))
    assert list(clipped.get_xdata()) == PROBE_STEPS


def test_heatmap_is_probe_steps_by_window_positions_on_a_log_scale():
    heat_ax = plot.plot_run(run_events(), job_record()).axes[2]

    mesh = heatmap(heat_ax)
    data = mesh.get_array()
    assert data.shape == (len(PROBE_STEPS), WINDOW)
    assert type(mesh.norm).__name__ == "LogNorm"
    # Row 0 is the first probe, layer 0: the last position has norm 1, the first 0.6 ** 11.
    assert data[0, -1] == pytest.approx(1.0)
    assert data[0, 0] == pytest.approx(0.6 ** (WINDOW - 1))
    assert heat_ax.get_ylim()[0] < PROBE_STEPS[0] < PROBE_STEPS[-1] < heat_ax.get_ylim()[1]


def test_windows_of_different_lengths_are_padded_not_dropped():
    short = jobs_pb2.Event(probe=jobs_pb2.Probe(step=500, grad_through_time=[
        jobs_pb2.GradProfile(layer=0, norms=[0.5, 1.0])]))
    steps, norms = plot.profile_matrix(plot.RunHistory.from_events([*run_events(), short]).probes)

    assert steps == [*PROBE_STEPS, 500]
    assert norms.shape == (5, WINDOW)
    assert list(norms[-1, :2]) == [0.5, 1.0] and all(math.isnan(x) for x in norms[-1, 2:])


def test_a_run_without_probes_says_so_instead_of_drawing_a_heatmap():
    heat_ax = plot.plot_run(run_events(with_probes=False), job_record()).axes[2]

    assert not heat_ax.collections
    assert "no gradient-through-time probes yet" in " ".join(t.get_text() for t in heat_ax.texts)


def test_a_job_with_no_events_yet_still_plots(tmp_path):
    fig = plot.plot_run([], job_record(state=jobs_pb2.QUEUED, last_step=0))
    fig.savefig(tmp_path / "empty.png")
    assert "no metrics yet" in " ".join(t.get_text() for t in fig.axes[0].texts)


def test_a_resumed_run_keeps_the_latest_report_of_each_step():
    repeated = metrics(400)
    repeated.metrics.loss = 9.0
    history = plot.RunHistory.from_events([*run_events(), repeated])
    assert [m.step for m in history.metrics] == list(range(50, 401, 50))
    assert history.metrics[-1].loss == 9.0


def test_the_plot_command_reads_the_history_without_following_and_writes_the_file(tmp_path, capsys):
    job = FakeJob(job_record(), run_events())
    out = tmp_path / "run.png"

    code = cli.main(["plot", job.id, "-o", str(out)], client_factory=lambda server, **connection: FakeClient([job]))

    assert code == cli.EXIT_OK
    assert job.follow is False, "plot must read the history so far, not wait for a running job to end"
    assert out.read_bytes()[:8] == PNG_MAGIC
    assert str(out) in capsys.readouterr().out


def test_the_plot_command_without_matplotlib_says_what_to_install(tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # what `import matplotlib` meets when it is not installed
    job = FakeJob(job_record(), run_events())

    code = cli.main(["plot", job.id, "-o", str(tmp_path / "run.png")], client_factory=lambda server, **connection: FakeClient([job]))

    assert code == cli.EXIT_FAILED
    assert "pip install 'gradserve[plot]'" in capsys.readouterr().err
    assert not (tmp_path / "run.png").exists()


def test_the_heatmap_shows_the_latest_probes_window_advice_in_the_clis_words():
    advice = truncation.advise(math.log(0.9), WINDOW, 0.01)
    advised = jobs_pb2.Event(probe=jobs_pb2.Probe(
        step=500, grad_through_time=[jobs_pb2.GradProfile(layer=0, norms=[0.9 ** (WINDOW - 1 - t) for t in range(WINDOW)])],
        decay_rate=advice.rate, half_life=advice.half_life, suggested_window=advice.suggested,
        start_fraction=advice.start_fraction, warning=advice.warning))
    heat_ax = plot.plot_run([*run_events(), advised], job_record()).axes[2]
    label = heat_ax.get_xlabel()
    assert advice.suggested == 44 and advice.warning  # 0.9^43 > 1% ≥ 0.9^44, and a window of 12 is shorter
    assert "step 500: gradient half-life 6.58 steps, suggested window 44 steps\n" in label
    assert label.endswith("\n" + advice.warning)
    assert cli.probe_line(advised.probe).endswith(truncation.advice_line(advice.half_life, 44, advice.warning))
