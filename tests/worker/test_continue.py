"""Continuing from checkpoints: the best one kept beside the latest, and a new run started from another's."""

from __future__ import annotations

import io

import pytest
import torch

from gradserve_worker.errors import CannotTrain
from gradserve_worker.trainer import CheckpointReady, Evaluation, StepMetrics, TrainConfig, train


def small(**overrides) -> TrainConfig:
    base = {"model": "lstm", "hidden_size": 16, "batch_size": 4, "num_steps": 8, "preprocess": "d2l",
            "max_steps": 12, "log_every": 1, "checkpoint_every": 1000, "device": "cpu", "probe_every": 10**6,
            "val_fraction": 0.1, "eval_every": 2}
    return TrainConfig(**{**base, **overrides})


def events_of(config: TrainConfig, text: str, **kwargs) -> list:
    events = []
    train(config, text, events.append, **kwargs)
    return events


def weights(data: bytes) -> dict[str, torch.Tensor]:
    return torch.load(io.BytesIO(data), weights_only=True)["model"]


def test_an_evaluation_better_than_every_earlier_one_comes_with_a_best_checkpoint(timemachine):
    events = events_of(small(lr=2.0), timemachine)
    losses = {e.step: e.loss for e in events if isinstance(e, Evaluation)}
    best = [e for e in events if isinstance(e, CheckpointReady) and e.best_loss is not None]
    record, expected = float("inf"), []
    for step, loss in sorted(losses.items()):
        if loss < record:
            record = loss
            expected.append((step, loss))
    assert [(c.step, c.best_loss) for c in best] == expected and len(expected) >= 2
    latest = [c for c in events if isinstance(c, CheckpointReady) and c.latest]
    assert [c.step for c in latest] == [12]
    # A step whose checkpoint is both the latest and the best is one report, one save.
    steps = [c.step for c in events if isinstance(c, CheckpointReady)]
    assert len(steps) == len(set(steps))
    assert (best[-1] is latest[-1]) == (best[-1].step == 12)


def test_a_resumed_run_knows_the_best_loss_so_far(timemachine):
    first = events_of(small(max_steps=6, checkpoint_every=6), timemachine)
    checkpoint = next(e for e in first if isinstance(e, CheckpointReady) and e.latest)
    resumed = events_of(small(), timemachine, resume=checkpoint.data)
    whole = events_of(small(), timemachine)
    bests = lambda events: [(c.step, c.best_loss) for c in events if isinstance(c, CheckpointReady) and c.best_loss]
    assert bests(resumed) == [b for b in bests(whole) if b[0] > 6]


def test_a_run_started_from_another_takes_its_weights(timemachine):
    source = events_of(small(), timemachine)[-1]
    assert isinstance(source, CheckpointReady)
    # A learning rate too small to move a weight: the new run's weights stay the ones it started from.
    started = events_of(small(lr=1e-30, max_steps=1, seed=7), timemachine, init=source.data)
    mine = next(e for e in started if isinstance(e, CheckpointReady) and e.latest)
    assert all(torch.equal(weights(mine.data)[k], v) for k, v in weights(source.data).items())
    assert next(e for e in started if isinstance(e, StepMetrics)).step == 1, "it counts its own steps from 0"
    fresh = events_of(small(lr=1e-30, max_steps=1, seed=7), timemachine)[-1]
    assert not torch.equal(weights(fresh.data)["linear.weight"], weights(source.data)["linear.weight"])


def test_the_optimizer_state_comes_along_when_asked_under_the_new_lr(timemachine):
    source = events_of(small(optimizer="adam"), timemachine)[-1]
    taken = events_of(small(optimizer="adam", lr=0.01, max_steps=3), timemachine, init=source.data,
                      init_optimizer=True)[-1]
    left = events_of(small(optimizer="adam", lr=0.01, max_steps=3), timemachine, init=source.data)[-1]
    state = lambda c: torch.load(io.BytesIO(c.data), weights_only=True)["optimizer"]
    assert [s["step"].item() for s in state(taken)["state"].values()] == [15.0] * len(state(taken)["state"])
    assert [s["step"].item() for s in state(left)["state"].values()] == [3.0] * len(state(left)["state"])
    assert all(g["lr"] == 0.01 for g in state(taken)["param_groups"])


def test_the_carried_state_comes_along_when_asked(timemachine):
    source = events_of(small(max_steps=5), timemachine)[-1]
    first_loss = lambda **kw: next(e.loss for e in events_of(small(max_steps=1), timemachine, init=source.data, **kw)
                                   if isinstance(e, StepMetrics))
    assert first_loss(init_state=True) != first_loss(), "the first window starts from the source's state"


@pytest.mark.parametrize("change, words", [
    (dict(hidden_size=32), "hidden_size 16 there, 32 here"),
    (dict(model="gru"), "model 'lstm' there, 'gru' here"),
    (dict(preprocess="none"), "preprocess 'd2l' there, 'none' here"),
])
def test_a_run_that_does_not_match_its_source_is_refused_naming_each_difference(timemachine, change, words):
    source = events_of(small(max_steps=2), timemachine)[-1]
    with pytest.raises(CannotTrain, match="cannot start from that checkpoint") as err:
        events_of(small(**change), timemachine, init=source.data)
    assert words in str(err.value)


def test_taking_the_optimizer_needs_the_same_optimizer(timemachine):
    source = events_of(small(max_steps=2), timemachine)[-1]
    with pytest.raises(CannotTrain, match="optimizer 'sgd' there, 'adam' here"):
        events_of(small(optimizer="adam"), timemachine, init=source.data, init_optimizer=True)
    events_of(small(optimizer="adam", max_steps=1), timemachine, init=source.data)
