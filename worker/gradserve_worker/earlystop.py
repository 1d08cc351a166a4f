"""Early stopping for a sweep's members: each evaluation is compared with the other members' at the same point.

The members share nothing but Redis, so each records its held-out loss in
the sweep's hash for that step (median) or rung (halving) and reads the
others' there. A member is judged against those that got there before it,
as asynchronous successive halving does: members that run one after
another on a single worker are stopped by the ones that ran before them.
"""

from __future__ import annotations

import math

from gradserve import sweeps
from gradserve.v1 import jobs_pb2
from gradserve_store.store import JobStore


class EarlyStop:
    """Asked once per step like should_stop; says True once an evaluation put the member behind the others."""

    def __init__(self, job_store: JobStore, job_id: str, sweep_id: str, rule: jobs_pb2.EarlyStop,
                 spec: jobs_pb2.JobSpec):
        self.store, self.job_id, self.sweep_id, self.rule = job_store, job_id, sweep_id, rule
        self.first = rule.min_steps or spec.eval_every
        self.max_steps = spec.max_steps
        self.rungs = sweeps.rungs(rule, self.first, spec.max_steps) if rule.rule == "halving" else []
        self.reason = ""

    def __call__(self) -> bool:
        return bool(self.reason)

    def evaluated(self, step: int, loss: float, perplexity: float) -> None:
        """Judge the member by its evaluation at `step`; sets `reason` when it is to stop."""
        if self.reason or step < self.first or step >= self.max_steps or not math.isfinite(loss):
            return
        shown = _shown(loss, perplexity)
        if self.rule.rule == "median":
            others = self._others(str(step), loss, first=False)
            median = sweeps.median_verdict(loss, others, self.rule.min_peers or sweeps.DEFAULT_MIN_PEERS)
            if median is not None:
                self.reason = f"stopped early at step {step}: {shown}, median {_shown(median, perplexity, bare=True)}"
            return
        rung = max((r for r in self.rungs if r <= step), default=None)
        if rung is None:
            return
        eta = self.rule.eta or sweeps.DEFAULT_ETA
        others = self._others(f"rung{rung}", loss, first=True)
        cutoff = sweeps.halving_verdict(loss, others, eta)
        if cutoff is not None:
            self.reason = (f"stopped early at step {step}: {shown}, not among the best 1/{eta} of the "
                           f"{len(others) + 1} members at the step-{rung} rung (cutoff "
                           f"{_shown(cutoff, perplexity, bare=True)})")

    def _others(self, at: str, loss: float, *, first: bool) -> list[float]:
        losses = self.store.sweep_losses(self.sweep_id, at, self.job_id, loss, first=first)
        return [v for k, v in losses.items() if k != self.job_id and math.isfinite(v)]


def _shown(loss: float, perplexity: float, bare: bool = False) -> str:
    """A held-out loss as the member's own kind of number: perplexity for text, the task's loss otherwise."""
    if perplexity:
        return f"{math.exp(loss):.4g}" if bare else f"val ppl {perplexity:.4g}"
    return f"{loss:.4g}" if bare else f"val loss {loss:.4g}"
