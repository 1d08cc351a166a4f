"""The group trainer: a member trained in a group equals the same config trained alone by train().

Every comparison runs both in float64 and holds the weights to a relative
error of 1e-10: the group's batched products sum in another order than the
single model's, so bit equality is not expected, but any difference in what
is computed (a missed clip, a shared random draw, a wrong window) is far
larger than rounding after a few steps.
"""

from __future__ import annotations

import io
import math
from dataclasses import replace

import pytest
import torch

from gradserve import spec as specs
from gradserve import sweeps
from gradserve.v1 import jobs_pb2
from gradserve_worker import group, trainer
from gradserve_worker.errors import CannotTrain
from gradserve_worker.group import MEMBER_VALUES, group_key, train_group
from gradserve_worker.trainer import (
    CheckpointReady,
    Evaluation,
    Probe,
    StepMetrics,
    TrainConfig,
    TrainingDiverged,
    load_checkpoint,
    train,
)

MODELS = ("rnn_scratch", "rnn", "gru", "lstm")
TRUNCATIONS = {"fixed": {}, "randomized": {"truncation_keep": 0.7}, "tbptt": {"tbptt_k1": 3, "tbptt_k2": 5}}
TOLERANCE = 1e-10
# The lr that marks the member whose gradient turns NaN (see poisoned).
POISONED_LR = 0.3


@pytest.fixture(autouse=True)
def float64():
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(torch.float32)


@pytest.fixture(scope="module")
def text(timemachine) -> str:
    return timemachine[:6000]


def small(**overrides) -> TrainConfig:
    base = {"model": "lstm", "hidden_size": 8, "batch_size": 4, "num_steps": 6, "preprocess": "d2l", "max_steps": 6,
            "log_every": 1, "checkpoint_every": 1000, "device": "cpu", "val_fraction": 0.0, "probe_every": 10**6}
    return TrainConfig(**{**base, **overrides})


def alone(config: TrainConfig, text: str, **kwargs) -> tuple[list, TrainingDiverged | None]:
    events = []
    try:
        train(config, text, events.append, **kwargs)
    except TrainingDiverged as e:
        return events, e
    return events, None


def together(configs, text, **kwargs) -> tuple[list[list], list]:
    events = [[] for _ in configs]
    outcomes = train_group(configs, text, lambda i, e: events[i].append(e), **kwargs)
    return events, outcomes


def weights(event: CheckpointReady) -> dict[str, torch.Tensor]:
    return torch.load(io.BytesIO(event.data), weights_only=True)["model"]


def last_checkpoint(events) -> CheckpointReady:
    return [e for e in events if isinstance(e, CheckpointReady)][-1]


def assert_close_weights(mine: dict, theirs: dict) -> None:
    assert mine.keys() == theirs.keys()
    for name, w in theirs.items():
        error = ((mine[name] - w).abs().max() / w.abs().max()).item()
        assert error <= TOLERANCE, f"{name}: relative error {error:.2e}"


def assert_same_events(mine: list, theirs: list) -> None:
    """Same kinds at the same steps, the same numbers to the tolerance (timings and the step path aside)."""
    assert [(type(e).__name__, e.step) for e in mine] == [(type(e).__name__, e.step) for e in theirs]
    for a, b in zip(mine, theirs):
        if isinstance(a, StepMetrics):
            assert a.loss == pytest.approx(b.loss, rel=TOLERANCE, nan_ok=True)
            assert a.grad_norm == pytest.approx(b.grad_norm, rel=TOLERANCE, nan_ok=True)
            assert (a.clipped, a.clip_fraction, a.lr, a.epoch, a.tokens) == (b.clipped, b.clip_fraction, b.lr, b.epoch,
                                                                             b.tokens)
            assert (a.skipped_steps, a.nonfinite_grads) == (b.skipped_steps, b.nonfinite_grads)
            assert a.param_grad_norms == pytest.approx(b.param_grad_norms, rel=TOLERANCE, nan_ok=True)
        elif isinstance(a, Evaluation):
            assert a.loss == pytest.approx(b.loss, rel=TOLERANCE)
        elif isinstance(a, Probe):
            assert sum(a.grad_through_time, []) == pytest.approx(sum(b.grad_through_time, []), rel=1e-8)
            assert [s[:2] for s in a.spectral_norms] == [s[:2] for s in b.spectral_norms]
        elif isinstance(a, CheckpointReady):
            assert (a.best_loss is None) == (b.best_loss is None)
            if a.best_loss is not None:
                assert a.best_loss == pytest.approx(b.best_loss, rel=TOLERANCE)
            assert_close_weights(weights(a), weights(b))


@pytest.fixture
def poisoned(monkeypatch):
    """The member with lr POISONED_LR gets a NaN gradient at its third backward, alone or in a group.

    The hook sits on one of the model's own Parameters, so it fires wherever
    that Parameter's gradient is accumulated: in train()'s backward, and in the
    group's, through the stack.
    """
    build = trainer.model_for

    def model_for(config, sizes):
        model = build(config, sizes)
        if config.lr == POISONED_LR:
            backwards = []

            def poison(grad):
                backwards.append(1)
                return grad * math.nan if len(backwards) == 3 else grad

            next(model.parameters()).register_hook(poison)
        return model

    monkeypatch.setattr(trainer, "model_for", model_for)
    monkeypatch.setattr(group, "model_for", model_for)


# -----------------------------------------------------------------------------
# equality with train()


@pytest.mark.parametrize("batched", [True, False], ids=["batched", "looped"])
@pytest.mark.parametrize("truncation", TRUNCATIONS)
@pytest.mark.parametrize("model", MODELS)
def test_each_member_equals_its_own_run_while_one_clips_one_does_not_and_one_diverges(text, poisoned, model,
                                                                                      truncation, batched):
    shared = {"model": model, "truncation": truncation, **TRUNCATIONS[truncation]}
    configs = [
        small(**shared, lr=1.0, clip_norm=0.05),  # clips at every step
        small(**shared, lr=2.0, clip_norm=0.0),  # never clips
        small(**shared, lr=POISONED_LR, clip_norm=1.0),  # diverges at step 3
        small(**{**shared, "truncation_keep": 0.9}, lr=0.5, clip_norm=1.0) if truncation == "randomized"
        else small(**shared, lr=0.5, clip_norm=1.0, weight_decay=0.01),
    ]
    events, outcomes = together(configs, text, batched=batched)

    assert [o.status for o in outcomes] == ["finished", "finished", "diverged", "finished"]
    for config, mine, outcome in zip(configs, events, outcomes):
        theirs, diverged = alone(config, text)
        assert_same_events(mine, theirs)
        if diverged is not None:
            assert outcome.diverged.step == diverged.step == 3
            assert outcome.reason == str(diverged)
            assert outcome.result.steps == 2
        else:
            assert outcome.result.steps == 6 and not outcome.result.stopped
            assert outcome.result.loss == pytest.approx([e for e in theirs if isinstance(e, StepMetrics)][-1].loss,
                                                        rel=TOLERANCE)
    clipped = [[e.clipped for e in member if isinstance(e, StepMetrics)] for member in events]
    assert all(clipped[0]) and not any(clipped[1])


@pytest.mark.parametrize("batched", [True, False], ids=["batched", "looped"])
@pytest.mark.parametrize("truncation", ["randomized", "tbptt"])
@pytest.mark.parametrize("model", MODELS)
def test_dropout_embeddings_and_layers_draw_what_each_member_draws_alone(text, model, truncation, batched):
    """Members with different dropout p draw their masks (and ξ) from their own generators, in their own order.

    Randomized truncation steps through time, and draws a mask per step and layer; tbptt runs whole layers
    (the models' fast paths), and draws one mask per layer.
    """
    layers = 1 if model == "rnn_scratch" else 2
    shared = {"model": model, "num_layers": layers, "embedding_size": 5, "truncation": truncation,
              **TRUNCATIONS["tbptt"]}
    configs = [
        small(**shared, lr=1.0, dropout=0.3, embedding_dropout=0.0, truncation_keep=0.5),
        small(**shared, lr=0.5, dropout=0.0, embedding_dropout=0.2, truncation_keep=0.8),
        small(**shared, lr=2.0, dropout=0.5, embedding_dropout=0.1, truncation_keep=0.9),
    ]
    events, _ = together(configs, text, batched=batched)
    for config, mine in zip(configs, events):
        assert_same_events(mine, alone(config, text)[0])


def test_members_may_differ_in_optimizer_schedule_init_and_length(text):
    configs = [
        small(optimizer="adam", lr=0.01, weight_decay=0.1, schedule="cosine", max_steps=5),
        small(optimizer="adamw", lr=0.02, weight_decay=0.1, init="uniform", init_range=0.2, max_steps=8),
        small(optimizer="sgd", lr=1.0, schedule="step", lr_step_every=2, lr_gamma=0.5, init="chrono", max_steps=7),
        small(optimizer="sgd", lr=1.0, schedule="plateau", lr_gamma=0.5, eval_every=2, log_every=3,
              checkpoint_every=3, max_steps=8),
    ]
    # The held-out split is shared; each member evaluates its own model on it.
    configs = [replace(c, val_fraction=0.1) for c in configs]
    events, outcomes = together(configs, text)
    assert [o.result.steps for o in outcomes] == [5, 8, 7, 8]
    for config, mine in zip(configs, events):
        assert_same_events(mine, alone(config, text)[0])


def test_evaluations_probes_and_best_checkpoints_are_each_members_own(text):
    configs = [small(model=m, lr=lr, val_fraction=0.1, eval_every=2, probe_every=3, checkpoint_every=4)
               for m, lr in (("gru", 1.0), ("gru", 0.1))]
    events, _ = together(configs, text)
    for config, mine in zip(configs, events):
        assert any(isinstance(e, Probe) for e in mine)
        assert any(isinstance(e, CheckpointReady) and e.best_loss is not None for e in mine)
        assert_same_events(mine, alone(config, text)[0])


@pytest.mark.parametrize("model", ["rnn_scratch", "lstm"])
def test_a_member_that_skips_a_non_finite_step_goes_on_as_it_does_alone(text, poisoned, model):
    configs = [small(model=model, lr=POISONED_LR, on_nonfinite="skip"), small(model=model, lr=1.0)]
    events, outcomes = together(configs, text)
    assert [o.status for o in outcomes] == ["finished", "finished"]
    assert sum(e.skipped_steps for e in events[0] if isinstance(e, StepMetrics)) == 1
    for config, mine in zip(configs, events):
        assert_same_events(mine, alone(config, text)[0])


def asked_three_times():
    """A should_stop that says True the third time it is asked: once per step, so at step 3."""
    asked = []

    def should_stop(*_) -> bool:
        asked.append(1)
        return len(asked) == 3

    return should_stop


def test_a_stopped_member_ends_with_its_checkpoint_while_the_others_go_on(text):
    configs = [small(model="rnn", lr=lr) for lr in (1.0, 0.5, 0.25)]
    second = asked_three_times()
    events, outcomes = together(configs, text, should_stop=lambda i: i == 1 and second())
    assert [o.status for o in outcomes] == ["finished", "stopped", "finished"]
    assert outcomes[1].result.steps == 3 and outcomes[1].result.stopped
    assert_same_events(events[1], alone(configs[1], text, should_stop=asked_three_times())[0])
    for config, mine in zip(configs[::2], events[::2]):
        assert_same_events(mine, alone(config, text)[0])


# -----------------------------------------------------------------------------
# checkpoints and resume


@pytest.mark.parametrize("model, partition", [("rnn_scratch", "sequential"), ("lstm", "random"), ("gru", "sequential")])
def test_a_group_resumed_from_its_members_checkpoints_continues_as_if_never_stopped(text, model, partition):
    configs = [small(model=model, partition=partition, lr=lr, clip_norm=clip, checkpoint_every=3, max_steps=7,
                     embedding_size=4, dropout=p)
               for lr, clip, p in ((1.0, 0.05, 0.2), (0.5, 0.0, 0.0))]
    whole, _ = together(configs, text)
    at_3 = [next(e for e in member if isinstance(e, CheckpointReady) and e.step == 3) for member in whole]
    later, outcomes = together(configs, text, resume=[c.data for c in at_3])

    assert [o.result.steps for o in outcomes] == [7, 7]
    for mine, uninterrupted in zip(later, whole):
        assert_same_events(mine, [e for e in uninterrupted if e.step > 3])


def test_a_members_checkpoint_is_a_single_jobs_checkpoint(text):
    configs = [small(model="gru", lr=lr, checkpoint_every=3, max_steps=6, dropout=0.2, num_layers=2)
               for lr in (1.0, 0.5)]
    events, _ = together(configs, text)
    at_3 = next(e for e in events[1] if isinstance(e, CheckpointReady) and e.step == 3)

    model, vocab, config, state = load_checkpoint(at_3.data)
    assert config == configs[1] and len(vocab) == 28
    assert [s.shape for s in state] == [torch.Size([2, 4, 8])]  # the member's own state, not the group's
    # Resumed alone, it goes on as it did in the group.
    resumed, _ = alone(configs[1], text, resume=at_3.data)
    assert_same_events(resumed, [e for e in events[1] if e.step > 3])


def test_members_resuming_from_different_steps_are_refused(text):
    configs = [small(lr=lr, checkpoint_every=2, max_steps=4) for lr in (1.0, 0.5)]
    events, _ = together(configs, text)
    data = [[e.data for e in member if isinstance(e, CheckpointReady)] for member in events]
    with pytest.raises(CannotTrain, match="different steps"):
        train_group(configs, text, lambda i, e: None, resume=[data[0][0], data[1][1]])
    with pytest.raises(CannotTrain, match="every member"):
        train_group(configs, text, lambda i, e: None, resume=[data[0][0], None])


# -----------------------------------------------------------------------------
# the grouping key


def test_configs_that_differ_only_in_member_values_share_a_key():
    base = small(model="gru", seed=3)
    variants = [small(model="gru", seed=3, lr=0.1, clip_norm=0.0, weight_decay=0.5, optimizer="adam",
                      schedule="cosine", dropout=0.4, truncation_keep=0.5, max_steps=99, log_every=7, init="chrono",
                      on_nonfinite="skip")]
    assert {group_key(c) for c in [base, *variants]} == {group_key(base)}


@pytest.mark.parametrize("change", [
    {"seed": 4},  # the data order (and the weights) come from the seed
    {"hidden_size": 16}, {"num_layers": 2}, {"embedding_size": 4}, {"batch_size": 8}, {"num_steps": 7},
    {"model": "lstm"}, {"partition": "random"}, {"truncation": "tbptt"}, {"dataset": "other"},
    {"tokenization": "word"}, {"preprocess": "none"}, {"val_fraction": 0.1}, {"device": "auto"},
])
def test_a_setting_that_decides_shapes_or_data_splits_groups(change):
    assert group_key(small(**{"model": "gru", **change})) != group_key(small(model="gru"))


def test_derived_defaults_group_with_their_explicit_values():
    unset = small(truncation="tbptt", num_steps=5)
    explicit = small(truncation="tbptt", num_steps=5, tbptt_k1=5, tbptt_k2=10)
    assert group_key(unset) == group_key(explicit)
    assert group_key(small(truncation="tbptt", num_steps=5, tbptt_k2=7)) != group_key(unset)


def test_auto_truncation_and_synthetic_tasks_train_alone():
    assert group_key(small(truncation="auto")) is None
    assert group_key(small(dataset="builtin:copy")) is None


@pytest.mark.parametrize("change", [{}, {"lr": 0.5, "dropout": 0.2}, {"seed": 4}, {"hidden_size": 16},
                                    {"truncation": "tbptt"}, {"tbptt_k2": 70}, {"device": "auto"}])
def test_the_server_forms_the_groups_the_worker_trains(change):
    # The server groups a sweep's members from their specs without torch; the worker checks with its own key.
    def spec(**fields):
        return specs.complete(jobs_pb2.JobSpec(dataset="ds-x", model="gru", **fields))

    a, b = spec(), spec(**change)
    assert (sweeps.group_key(a) == sweeps.group_key(b)) == (
        group_key(TrainConfig.from_spec(a)) == group_key(TrainConfig.from_spec(b)))


def test_member_values_are_config_fields():
    assert MEMBER_VALUES <= set(TrainConfig.__dataclass_fields__)


def test_configs_of_different_groups_are_refused(text):
    with pytest.raises(CannotTrain, match="must share"):
        train_group([small(), small(hidden_size=16)], text, lambda i, e: None)
