"""The update rule and the learning-rate schedule of a job.

The step and cosine schedules are pure functions of the step, so a resumed run
needs no scheduler state to continue bit for bit: the trainer sets each step's
lr before the optimizer step. The plateau schedule depends on the evaluations
so far; its state (Plateau.state_dict) goes into the checkpoint.
"""

from __future__ import annotations

import math

import torch

from gradserve_worker.errors import CannotTrain


def make_optimizer(name: str, params, lr: float, weight_decay: float = 0.0) -> torch.optim.Optimizer:
    """sgd and adam add weight_decay × w to the gradient (an L2 penalty); adamw decays the weights directly."""
    if name == "sgd":
        return torch.optim.SGD(params, lr=lr, weight_decay=weight_decay)
    if name == "adam":
        return torch.optim.Adam(params, lr=lr, weight_decay=weight_decay)
    if name == "adamw":
        return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    raise CannotTrain(f"unknown optimizer {name!r}; expected sgd, adam or adamw")


def scheduled_lr(config, step: int) -> float:
    """The learning rate of optimizer step `step` (1-based).

    constant: lr. step: lr × lr_gamma^⌊(step − 1) / lr_step_every⌋, so the
    first lr_step_every steps use lr itself. cosine: lr × (1 + cos(π (step − 1) / max_steps)) / 2,
    from lr at the first step towards 0 after the last (the job's max_steps at
    the time of the step: extending max_steps on resume stretches what is left).
    """
    lr = config.effective_lr
    if config.schedule == "step":
        return lr * config.lr_gamma ** ((step - 1) // config.lr_step_every)
    if config.schedule == "cosine":
        return lr * 0.5 * (1 + math.cos(math.pi * (step - 1) / config.max_steps))
    return lr


class Plateau:
    """schedule=plateau, as pytorch/examples' word_language_model anneals.

    After every evaluation whose held-out loss is not strictly below the best
    so far, lr becomes lr × lr_gamma, but never less than min_lr (an lr that
    starts below min_lr stays where it is). The first evaluation always
    improves on the best, which starts at +inf.
    """

    def __init__(self, lr: float, gamma: float, floor: float, best: float = math.inf):
        self.lr, self.gamma, self.floor, self.best = lr, gamma, floor, best

    @classmethod
    def of(cls, config, state: dict | None = None) -> Plateau:
        """The schedule of a config, fresh or at a checkpoint's `state`."""
        plateau = cls(config.effective_lr, config.lr_gamma, config.min_lr)
        if state is not None:
            plateau.lr, plateau.best = state["lr"], state["best"]
        return plateau

    def observe(self, loss: float) -> bool:
        """Take an evaluation's held-out loss; True when it lowered lr."""
        if loss < self.best:
            self.best = loss
            return False
        self.lr = max(self.lr * self.gamma, min(self.floor, self.lr))
        return True

    def state_dict(self) -> dict:
        return {"lr": self.lr, "best": self.best}
