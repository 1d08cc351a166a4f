"""`gradserve.compare` draws several jobs in one figure, and `gradserve compare` writes it to a file.

The events and records are built by hand, so every number in the picture is known.
"""

from __future__ import annotations

import math
import sys
from pathlib import Path

import pytest

pytest.importorskip("matplotlib", reason="the plot extra is not installed: pip install './client[plot]'")

from gradserve import cli, compare  # noqa: E402
from gradserve.v1 import jobs_pb2  # noqa: E402
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "harness"))
from fakes import FakeClient, FakeJob  # noqa: E402

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
STEPS = range(50, 401, 50)
PROBE_STEPS = [200, 400]
SWEEP_ID = "sweep-0123456789abcdef"


def job_record(suffix: str, *, num_steps: int, clip_norm: float = 1.0, name: str = "", sweep: str = "",
               dataset: str = "builtin:copy", state=jobs_pb2.SUCCEEDED) -> jobs_pb2.Job:
    spec = jobs_pb2.JobSpec(dataset=dataset, model="gru", hidden_size=16, num_steps=num_steps, max_steps=400,
                            clip_norm=clip_norm, probe_every=200)
    summary = jobs_pb2.JobSummary(step=400, train_loss=1.25, best_step=300, best_val_loss=1.5, clip_fraction=0.25,
                                  tokens_per_sec=12345.6, metric="accuracy" if dataset == "builtin:copy" else "",
                                  metric_value=0.875)
    return jobs_pb2.Job(id=f"job-{suffix:0>20}", spec=spec, state=state, last_step=400, name=name, sweep=sweep,
                        summary=summary)


def run_events(window: int, scale: float, clipped_every: int = 100) -> list[jobs_pb2.Event]:
    """Metrics every 50 steps (clipped every `clipped_every`), probes whose norms are scale x 2^-(steps back)."""
    events = []
    for step in STEPS:
        events.append(jobs_pb2.Event(metrics=jobs_pb2.Metrics(step=step, loss=2.0 - step / 400, grad_norm=0.5 * scale,
                                                              clipped=step % clipped_every == 0)))
        if step in PROBE_STEPS:
            events.append(jobs_pb2.Event(evaluation=jobs_pb2.Evaluation(step=step, loss=2.1 - step / 400)))
            events.append(jobs_pb2.Event(probe=jobs_pb2.Probe(step=step, grad_through_time=[
                jobs_pb2.GradProfile(layer=0, norms=[scale * 2.0 ** -(window - 1 - t) for t in range(window)])])))
    return events


def two_runs() -> list[compare.Run]:
    """A short window whose gradients are large and a long one whose gradients are small."""
    short = compare.Run.of(job_record("a", num_steps=4, sweep=SWEEP_ID), run_events(4, 10.0),
                           {"num_steps": "4", "lr": "0.5"})
    long = compare.Run.of(job_record("b", num_steps=16, sweep=SWEEP_ID), run_events(16, 0.01, clipped_every=200),
                          {"num_steps": "16", "lr": "0.5"})
    return [short, long]


COLORBAR_LABEL = "‖∂L/∂h_t‖ (log scale)"


def heatmap_axes(fig) -> list:
    # The colour bar is drawn as a mesh too; its label tells it apart.
    return [ax for ax in fig.axes
            if any(type(c).__name__ == "QuadMesh" for c in ax.collections) and ax.get_ylabel() != COLORBAR_LABEL]


def test_the_heatmaps_share_one_log_colour_scale_spanning_every_job():
    fig = compare.compare_runs(two_runs())

    meshes = [ax.collections[0] for ax in heatmap_axes(fig)]
    assert len(meshes) == 2
    assert meshes[0].norm is meshes[1].norm
    assert type(meshes[0].norm).__name__ == "LogNorm"
    # The largest norm is the short window's last position; the smallest the long window's first.
    assert meshes[0].norm.vmax == pytest.approx(10.0)
    assert meshes[0].norm.vmin == pytest.approx(0.01 * 2.0 ** -15)
    assert [m.get_array().shape for m in meshes] == [(2, 4), (2, 16)]
    colorbars = [ax for ax in fig.axes if ax.get_ylabel() == COLORBAR_LABEL]
    assert len(colorbars) == 1, "one colour scale, so one colour bar"


def test_the_legend_names_members_by_their_sweep_values_and_other_jobs_by_name_or_id():
    named = compare.Run.of(job_record("c", num_steps=8, name="baseline"), run_events(8, 1.0))
    unnamed = compare.Run.of(job_record("d", num_steps=8), run_events(8, 1.0))
    fig = compare.compare_runs([*two_runs(), named, unnamed])

    (legend,) = [legend for sub in fig.subfigs for legend in sub.legends]
    labels = [t.get_text() for t in legend.get_texts()]
    assert labels == ["num_steps=4 lr=0.5", "num_steps=16 lr=0.5", "baseline", unnamed.job.id]
    assert [ax.get_title() for ax in heatmap_axes(fig)] == labels
    # Each job has one colour: its legend entry, training curve and validation curve.
    train_ax, val_ax = fig.axes[:2]
    colours = [line.get_color() for line in legend.get_lines()]
    assert [line.get_color() for line in train_ax.get_lines()] == colours
    assert [line.get_color() for line in val_ax.get_lines()] == colours
    assert len(set(colours)) == 4


def test_a_job_with_nothing_drawn_yet_is_still_in_the_legend():
    queued = compare.Run.of(job_record("q", num_steps=8, name="waiting", state=jobs_pb2.QUEUED), [])
    fig = compare.compare_runs([*two_runs(), queued])
    (legend,) = [legend for sub in fig.subfigs for legend in sub.legends]
    assert [t.get_text() for t in legend.get_texts()][-1] == "waiting"


def test_two_jobs_with_the_same_name_are_told_apart_by_their_ids():
    runs = [compare.Run.of(job_record(s, num_steps=8, name="same"), run_events(8, 1.0)) for s in "ef"]
    compare.compare_runs(runs)
    assert [r.label for r in runs] == [f"same ({runs[0].job.id})", f"same ({runs[1].job.id})"]


def test_the_grad_panel_marks_clipped_steps_and_draws_a_shared_clip_norm_once():
    fig = compare.compare_runs(two_runs())
    grad_ax = fig.axes[2]

    lines = grad_ax.get_lines()
    thresholds = [line for line in lines if line.get_label().startswith("clip_norm")]
    assert [t.get_label() for t in thresholds] == ["clip_norm = 1 (all jobs)"]
    markers = [line for line in lines if line.get_marker() == "v"]
    assert [list(m.get_xdata()) for m in markers] == [[100, 200, 300, 400], [200, 400]]


def test_different_clip_norms_get_a_line_each_in_the_jobs_colour():
    runs = [compare.Run.of(job_record("g", num_steps=4, clip_norm=0.5), run_events(4, 1.0)),
            compare.Run.of(job_record("h", num_steps=4, clip_norm=5.0), run_events(4, 1.0))]
    grad_ax = compare.compare_runs(runs).axes[2]

    thresholds = [line for line in grad_ax.get_lines() if line.get_label().startswith("clip_norm")]
    assert [list(t.get_ydata()) for t in thresholds] == [[0.5, 0.5], [5.0, 5.0]]
    curves = [line for line in grad_ax.get_lines() if line.get_marker() == "None" and line not in thresholds]
    assert [t.get_color() for t in thresholds] == [c.get_color() for c in curves]


def test_the_table_has_one_row_per_job_with_its_final_numbers():
    runs = two_runs()
    runs[1].job.state = jobs_pb2.RUNNING
    runs[1].job.summary.best_step = 0

    rows = compare.table_rows(runs)
    assert rows[0] == {"job": "num_steps=4 lr=0.5", "state": "SUCCEEDED", "step": "400/400",
                       "final train loss": "1.25", "best val loss": "1.5", "at step": "300", "val accuracy": "0.875",
                       "clip %": "25", "tokens/s": "12,346"}
    assert (rows[1]["state"], rows[1]["best val loss"], rows[1]["at step"], rows[1]["val accuracy"]) == \
        ("RUNNING", "-", "-", "-")


def test_the_table_has_no_measure_column_for_language_models():
    run = compare.Run.of(job_record("i", num_steps=8, dataset="builtin:pydocs"), run_events(8, 1.0))
    assert list(compare.table_rows([run])[0]) == list(compare.TABLE_COLUMNS)


def test_jobs_without_events_yet_still_draw():
    queued = compare.Run.of(job_record("j", num_steps=8, state=jobs_pb2.QUEUED), [])
    fig = compare.compare_runs([queued])
    assert not heatmap_axes(fig)
    assert "no probes yet" in " ".join(t.get_text() for ax in fig.axes for t in ax.texts)


# ------------------------------------------------------------------ the command


class FakeSweep:
    def __init__(self, jobs, values, axes=()):
        self.jobs, self.values = jobs, values
        spec = jobs_pb2.SweepSpec(axes=[jobs_pb2.SweepAxis(field=f) for f in axes])
        self.info = jobs_pb2.Sweep(id=SWEEP_ID, spec=spec,
                                   members=[jobs_pb2.Sweep.Member(job_id=j.id, values=v) for j, v in zip(jobs, values)])


def fake_stack():
    jobs = [FakeJob(job_record(s, num_steps=n, sweep=SWEEP_ID, state=jobs_pb2.RUNNING), run_events(n, 1.0))
            for s, n in (("a", 4), ("b", 16))]
    return jobs, FakeSweep(jobs, [{"seed": "1", "num_steps": "4"}, {"seed": "1", "num_steps": "16"}],
                           axes=["seed", "num_steps"])


def main(client, *argv: str) -> int:
    return cli.main(list(argv), client_factory=lambda server, **connection: client)


def test_compare_sweep_reads_each_members_history_without_following_and_says_what_it_wrote(tmp_path, capsys):
    jobs, sweep = fake_stack()
    out = tmp_path / "compare.png"

    assert main(FakeClient(jobs, sweep), "compare", "--sweep", SWEEP_ID, "-o", str(out)) == cli.EXIT_OK

    assert [j.follow for j in jobs] == [False, False], "running members are drawn as they stand, not waited for"
    assert out.read_bytes()[:8] == PNG_MAGIC
    printed = capsys.readouterr().out
    assert f"wrote {out}: 2 jobs, 16 metrics, 4 evaluations, 4 probes" in printed
    assert f"{jobs[1].id}  seed=1 num_steps=16: RUNNING at step 400, 8 metrics, 2 evaluations, 2 probes" in printed


def test_a_sweep_member_named_alone_is_labelled_by_its_sweep_values_in_the_axes_order(tmp_path, capsys):
    jobs, sweep = fake_stack()
    loner = FakeJob(job_record("c", num_steps=8, name="alone"), run_events(8, 1.0))
    out = tmp_path / "compare.png"

    code = main(FakeClient([*jobs, loner], sweep), "--json", "compare", jobs[1].id, loner.id, "-o", str(out))

    assert code == cli.EXIT_OK
    printed = capsys.readouterr().out
    assert '"label": "seed=1 num_steps=16"' in printed and '"label": "alone"' in printed


@pytest.mark.parametrize("argv, words", [
    (["compare", "-o", "x.png"], "one of the arguments JOB --sweep is required"),
    (["compare", "job-00000000000000000000", "--sweep", SWEEP_ID, "-o", "x.png"],
     "argument --sweep: not allowed with argument JOB"),
])
def test_a_command_line_that_names_no_jobs_or_both_kinds_is_refused(argv, words, capsys):
    with pytest.raises(SystemExit) as e:
        main(FakeClient([]), *argv)
    assert e.value.code == cli.EXIT_USAGE
    assert words in capsys.readouterr().err


def test_an_unknown_job_is_named_and_nothing_is_written(tmp_path, capsys):
    jobs, sweep = fake_stack()
    out = tmp_path / "compare.png"

    code = main(FakeClient(jobs, sweep), "compare", jobs[0].id, "job-ffffffffffffffffffff", "-o", str(out))

    assert code == cli.EXIT_FAILED
    assert "job-ffffffffffffffffffff not found" in capsys.readouterr().err
    assert not out.exists()


def test_an_output_folder_that_does_not_exist_is_named_before_anything_is_fetched(tmp_path, capsys):
    client = FakeClient([])  # any fetch would fail its assertion or raise NotFound
    code = main(client, "compare", "--sweep", SWEEP_ID, "-o", str(tmp_path / "missing" / "compare.png"))

    assert code == cli.EXIT_FAILED
    assert f"no such directory: {tmp_path / 'missing'}" in capsys.readouterr().err


def test_more_jobs_than_a_figure_can_tell_apart_is_refused_before_any_history_is_read(tmp_path, capsys):
    jobs = [FakeJob(job_record(f"k{i}", num_steps=4), run_events(4, 1.0)) for i in range(compare.MAX_JOBS + 1)]
    sweep = FakeSweep(jobs, [{"seed": str(i)} for i in range(len(jobs))])

    for argv in ([j.id for j in jobs], ["--sweep", SWEEP_ID]):
        code = main(FakeClient(jobs, sweep), "compare", *argv, "-o", str(tmp_path / "c.png"))
        assert code == cli.EXIT_FAILED
        assert f"compare draws at most {compare.MAX_JOBS}" in capsys.readouterr().err
    assert not (tmp_path / "c.png").exists()
    assert all(j.follow is None for j in jobs), "no job's events were read"


def test_compare_without_matplotlib_says_what_to_install(tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # what `import matplotlib` meets when it is not installed
    jobs, sweep = fake_stack()

    code = main(FakeClient(jobs, sweep), "compare", "--sweep", SWEEP_ID, "-o", str(tmp_path / "c.png"))

    assert code == cli.EXIT_FAILED
    assert "pip install 'gradserve[plot]'" in capsys.readouterr().err
    assert not (tmp_path / "c.png").exists()


def test_heatmap_norm_ignores_missing_and_zero_cells():
    mpl = compare.plot.load_matplotlib()
    np = mpl.np
    norm = compare.shared_norm(mpl, [np.array([[np.nan, 0.0, 2.0]]), np.array([[0.5, math.inf]])])
    assert (norm.vmin, norm.vmax) == (0.5, 2.0)
    assert compare.shared_norm(mpl, [np.full((1, 2), np.nan)]) is None
