"""truncation=auto: the window follows the probes' suggestion at checkpoint boundaries, within its bounds.

How much it helps learning is a benchmark (bench/auto_truncation.py, BENCHMARKS.md): here, the mechanism.
"""

from __future__ import annotations

import io
from dataclasses import asdict, astuple

import pytest
import torch
from gradserve import spec as specs

from gradserve_worker.events import to_event
from gradserve_worker.trainer import (AutoWindow, CheckpointReady, Evaluation, Probe, StepMetrics, TrainConfig,
                                      WindowChange, train)


def copy_config(**overrides) -> TrainConfig:
    # Copy memory with seq_len 20: each symbol is recalled 30 steps after it was shown, 40 steps a sequence.
    # Chrono gates remember for up to 40 steps from the start, so the probes ask for long windows at once.
    base = dict(dataset="builtin:copy", seq_len=20, model="gru", hidden_size=16, batch_size=8, truncation="auto",
                num_steps=5, min_num_steps=5, max_num_steps=30, init="chrono", max_dependency=40, max_steps=12,
                probe_every=2, checkpoint_every=3, eval_every=1000, log_every=1, device="cpu")
    return TrainConfig(**{**base, **overrides})


def run(config: TrainConfig, **kwargs) -> list:
    events = []
    train(config, "", events.append, **kwargs)
    return events


def test_auto_grows_a_short_window_at_checkpoint_boundaries_up_to_its_bound():
    events = run(copy_config())
    changes = [e for e in events if isinstance(e, WindowChange)]
    # At most doubling per boundary, and never past max_num_steps.
    assert [(c.step, c.from_window, c.to_window) for c in changes] == [(3, 5, 10), (6, 10, 20), (9, 20, 30)]
    assert all(c.suggested > 30 for c in changes)
    # Each probe measured a window of the length then in force: the last window of each 40-step sequence.
    window = {1: 5, 4: 10, 7: 20, 10: 30}
    for probe in (e for e in events if isinstance(e, Probe)):
        in_force = window[max(s for s in window if s <= probe.step)]
        assert len(probe.grad_through_time[0]) == (40 - 1) % in_force + 1, probe.step
    assert to_event(changes[0]).window_change.to_window == 10


def test_auto_keeps_the_window_when_the_suggestion_is_inside_the_bounds_already():
    auto = AutoWindow(window=20, low=5, high=40)
    auto.suggestions = [19, 21, 20]
    assert auto.adjust(step=100) is None and auto.window == 20 and auto.suggestions == []
    auto.suggestions = [3, 2, 100]
    assert astuple(auto.adjust(step=200)) == (200, 20, 10, 3)  # toward 3, halving at most, so 10
    auto.suggestions = [7]
    assert astuple(auto.adjust(step=300)) == (300, 10, 7, 7)
    auto.suggestions = [2]
    assert astuple(auto.adjust(step=400)) == (400, 7, 5, 2)  # min_num_steps
    assert auto.adjust(step=500) is None  # no probes since the last boundary: no change


@pytest.mark.parametrize("extra", [{}, {"dataset": "", "model": "lstm", "preprocess": "d2l", "val_fraction": 0.1,
                                         "eval_every": 4, "init": "default", "max_num_steps": 16}],
                         ids=["copy-task", "text"])
def test_resume_after_a_window_change_continues_bit_for_bit(timemachine, extra):
    config = copy_config(**extra)
    text = timemachine[:2000] if extra else ""

    def go(c, **kwargs):
        events = []
        train(c, text, events.append, **kwargs)
        return events

    straight = go(config)
    first = go(TrainConfig(**{**asdict(config), "max_steps": 7}))
    [*_, half] = [e for e in first if isinstance(e, CheckpointReady) and e.latest]
    assert half.step == 7 and torch.load(io.BytesIO(half.data), weights_only=True)["auto"]["window"] > 5
    rest = go(config, resume=half.data)

    def reports(events):
        return [(type(e).__name__, *((e.step, e.loss, e.grad_norm) if isinstance(e, StepMetrics) else astuple(e)))
                for e in events if isinstance(e, (StepMetrics, WindowChange, Probe, Evaluation))]

    got = [r for r in reports(first) + reports(rest) if r[:2] != ("Evaluation", 7)]
    assert [e for e in straight if isinstance(e, WindowChange)]
    assert got == reports(straight)


def test_auto_bounds_are_checked_and_sized_for_memory():
    assert ("num_steps", "must lie between min_num_steps (10) and max_num_steps (40) with truncation auto, got 5") \
        in specs.violations(copy_config(min_num_steps=10, max_num_steps=40))
    spec = specs.complete(specs.jobs_pb2.JobSpec(dataset="builtin:pydocs", truncation="auto", num_steps=50))
    assert (spec.min_num_steps, spec.max_num_steps) == (50, 200)
    assert specs.backprop_window(spec, 10**6) == 200


def test_on_copy_with_a_dependency_of_30_steps_auto_from_5_learns_what_fixed_5_cannot():
    # 80 Adam steps of a small GRU: fixed windows of 5 never connect a symbol to its recall 30 steps later and stay
    # at the memoryless baseline (1/8); auto grows the window to the whole sequence by step 30 and starts to copy.
    def accuracy(truncation):
        config = copy_config(truncation=truncation, hidden_size=32, batch_size=16, max_num_steps=40, max_steps=80,
                             probe_every=5, checkpoint_every=10, log_every=1000, optimizer="adam", lr=0.02, seed=1)
        events = run(config)
        [evaluation] = [e for e in events if isinstance(e, Evaluation)]
        return evaluation.value, [(c.step, c.to_window) for c in events if isinstance(c, WindowChange)]

    auto, changes = accuracy("auto")
    fixed, none = accuracy("fixed")
    assert changes == [(10, 10), (20, 20), (30, 40)] and none == []
    assert fixed < 0.15
    assert auto > fixed + 0.1
