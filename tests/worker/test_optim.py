"""Update rules, weight decay and learning-rate schedules, as the trainer applies them."""

from __future__ import annotations

import math

import pytest
import torch
from torch.optim.optimizer import register_optimizer_step_pre_hook

from gradserve_worker.optim import make_optimizer, scheduled_lr
from gradserve_worker.trainer import StepMetrics, TrainConfig, train


def lrs_of_a_run(config: TrainConfig, text: str) -> tuple[list[float], list[StepMetrics], list]:
    """The lr each optimizer step used, the metrics, and the optimizers seen."""
    used, optimizers = [], []

    def before_step(optimizer, args, kwargs):
        used.append(optimizer.param_groups[0]["lr"])
        optimizers.append(optimizer)

    handle = register_optimizer_step_pre_hook(before_step)
    events = []
    try:
        train(config, text, events.append)
    finally:
        handle.remove()
    return used, [e for e in events if isinstance(e, StepMetrics)], optimizers


def config(**overrides) -> TrainConfig:
    base = {"model": "gru", "hidden_size": 8, "batch_size": 4, "num_steps": 8, "preprocess": "d2l", "max_steps": 10,
            "log_every": 1, "device": "cpu", "val_fraction": 0.0, "probe_every": 10**6}
    return TrainConfig(**{**base, **overrides})


def test_step_schedule_multiplies_by_gamma_every_lr_step_every_steps(timemachine):
    used, metrics, _ = lrs_of_a_run(config(schedule="step", lr=0.8, lr_step_every=3, lr_gamma=0.5), timemachine[:3000])
    assert used == pytest.approx([0.8] * 3 + [0.4] * 3 + [0.2] * 3 + [0.1])
    assert [m.lr for m in metrics] == pytest.approx(used)  # Metrics.lr is the lr of the step it reports


def test_cosine_schedule_anneals_from_lr_towards_0_at_max_steps(timemachine):
    used, _, _ = lrs_of_a_run(config(schedule="cosine", lr=2.0, max_steps=10), timemachine[:3000])
    assert used == pytest.approx([1.0 + math.cos(math.pi * i / 10) for i in range(10)])
    assert used[0] == 2.0 and used[-1] < 0.05 and used == sorted(used, reverse=True)


def test_constant_schedule_keeps_the_optimizers_default_lr(timemachine):
    used, metrics, _ = lrs_of_a_run(config(optimizer="adamw", lr=None), timemachine[:3000])
    assert used == [0.001] * 10 and all(m.lr == 0.001 for m in metrics)


@pytest.mark.parametrize("name, kind", [("sgd", torch.optim.SGD), ("adam", torch.optim.Adam),
                                        ("adamw", torch.optim.AdamW)])
def test_each_optimizer_is_the_torch_one_with_the_jobs_weight_decay(timemachine, name, kind):
    _, _, optimizers = lrs_of_a_run(config(optimizer=name, weight_decay=0.05, max_steps=1), timemachine[:3000])
    [optimizer] = optimizers
    assert type(optimizer) is kind and optimizer.param_groups[0]["weight_decay"] == 0.05


def test_adamw_decays_weights_even_where_the_gradient_is_zero():
    # Decoupled decay: a parameter with zero gradient still shrinks by lr × weight_decay per step.
    w = torch.nn.Parameter(torch.ones(3))
    opt = make_optimizer("adamw", [w], lr=0.1, weight_decay=0.5)
    w.grad = torch.zeros(3)
    opt.step()
    torch.testing.assert_close(w.detach(), torch.full((3,), 1 - 0.1 * 0.5))


def test_scheduled_lr_is_a_function_of_the_step_alone():
    c = config(schedule="step", lr=1.0, lr_step_every=2, lr_gamma=0.1)
    assert [scheduled_lr(c, s) for s in range(1, 6)] == pytest.approx([1, 1, 0.1, 0.1, 0.01])
