r"""Where the gradient is cut through time: the four truncation strategies of a job.

Backpropagation through time multiplies, for every step it goes back, by the
Jacobian ∂h_t/∂h_{t−1}; the strategies differ in which of those products they
keep (Dive into Deep Learning, "Backpropagation Through Time"):

fixed
    TBPTT(k, k) with k = num_steps, as d2l trains: the state is detached every
    k steps, so no gradient reaches further back than the start of its window.
full
    Nothing is cut. On a synthetic task (independent finite sequences) that is
    exact BPTT over each whole sequence; on a text it makes each of the
    batch_size rows of the training stream one window, trained end to end
    once per epoch (data.whole_rows; the trainer refuses rows longer than
    gradserve.spec.FULL_MAX_STEPS).
randomized
    Tallec & Ollivier's unbiased truncation. Between steps t−1 and t the
    gradient through the state is multiplied by a random ξ_t with

        P(ξ_t = 1/π) = π,    P(ξ_t = 0) = 1 − π,    π = truncation_keep,

    so E[ξ_t] = 1. The forward pass is untouched (ScaleGrad is the identity),
    and a path back over j steps survives with probability π^j and is then
    weighted by π^−j: in expectation every path counts exactly once, so the
    expected gradient is the full gradient over the window, while most samples
    stop after about 1/(1 − π) steps. ξ_t is drawn independently per step and
    per sequence of the batch (the sequences' losses are independent, so the
    estimate stays unbiased), one ξ_t for all layers and for both h and c of an
    LSTM. The window is num_steps on a text and the whole sequence on a
    synthetic task.
tbptt
    Williams & Peng's TBPTT(k1, k2): every k1 steps an update backpropagates
    through the last k2 steps (k2 ≥ k1). The loss covers the k1 new steps; the
    k2 − k1 before them only carry the gradient further back. TBPTT(k, k) is
    fixed truncation with window k.

On a text each window is one optimizer step (data.Window). On a synthetic task
one optimizer step trains a batch of whole sequences, and the strategy decides
which gradient paths of the sequence's loss survive: the sequence is walked
window by window exactly as a text stream would be (run_sequence), all the
windows' outputs go into one loss and one backward.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from gradserve.spec import resolved

from gradserve_worker.data import tbptt_bounds
from gradserve_worker.errors import CannotTrain


# -----------------------------------------------------------------------------
# the plan


@dataclass(frozen=True)
class Truncation:
    """How one job cuts gradients: windows of k1 new steps reaching back k2, and randomized's π."""

    k1: int
    k2: int
    keep: float | None = None  # randomized truncation's π; None: no random cuts inside a window

    @classmethod
    def of(cls, config, sequence_length: int | None = None) -> Truncation:
        """The plan for a config; `sequence_length` for a synthetic task's sequences (None on text)."""
        T = config.num_steps
        if config.truncation == "tbptt":
            k1, k2 = resolved(config, "tbptt_k1"), resolved(config, "tbptt_k2")
            if k2 < k1:
                raise CannotTrain(f"tbptt_k2 must be at least tbptt_k1 ({k1}), got {k2}")
            return cls(k1, k2)
        if config.truncation == "full":
            n = sequence_length or 0  # on text the rows' length is only known per epoch (data.whole_rows)
            return cls(n, n)
        if config.truncation == "randomized":
            n = sequence_length or T
            return cls(n, n, config.truncation_keep)
        return cls(T, T)


# -----------------------------------------------------------------------------
# randomized truncation


class ScaleGrad(torch.autograd.Function):
    """Identity forward; the backward multiplies the gradient of every tensor by ξ (broadcast)."""

    @staticmethod
    def forward(ctx, xi: torch.Tensor, *tensors: torch.Tensor):
        ctx.save_for_backward(xi)
        return tuple(t.view_as(t) for t in tensors)

    @staticmethod
    def backward(ctx, *grads):
        (xi,) = ctx.saved_tensors
        return (None, *(None if g is None else g * xi for g in grads))


def sample_xi(steps: int, batch_size: int, keep: float, device, dtype=torch.float32) -> torch.Tensor:
    """ξ for every step and sequence of a window, (steps, batch_size, 1): 1/keep with probability keep, else 0.

    Drawn from torch's global generator, which checkpoints save and restore.
    """
    return (torch.rand(steps, batch_size, 1, device=device) < keep).to(dtype) / keep


def randomized_cuts(xi: torch.Tensor):
    """The models' `between` hook that scales the gradient through the state entering step t by ξ_t."""

    def between(t: int, state: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
        return ScaleGrad.apply(xi[t], *state)

    return between


# -----------------------------------------------------------------------------
# running windows


def detach_state(state: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
    """The hidden state cut loose from the graph that computed it.

    The state carried into a window keeps its values but not its history:
    without the detach, backward of this window would run on through every
    earlier window back to the start of the corpus, and each step would cost
    more time and memory than the last. This is the "truncated" in truncated BPTT.
    """
    return tuple(s.detach() for s in state)


def run_window(model, X: torch.Tensor, state: tuple[torch.Tensor, ...], carry_at: int, keep: float | None = None,
               trace: list[list[torch.Tensor]] | None = None):
    """Forward one window from a detached `state`: (outputs, carried state, end state).

    The carried state is the state after carry_at steps, detached: where the
    next window starts. A window that is carried from its end (every one but
    TBPTT's with k2 > k1) is a single call of the model, so the fixed default
    takes the model's fast path.
    """
    between = randomized_cuts(sample_xi(len(X), X.shape[1], keep, X.device)) if keep is not None else None
    if carry_at >= len(X):
        outputs, end = model(X, state, between=between, trace=trace)
        return outputs, detach_state(end), end
    if carry_at == 0:
        outputs, end = model(X, state, between=between, trace=trace)
        return outputs, state, end
    # keep is None here: randomized windows are carried from their end.
    first, middle = model(X[:carry_at], state, trace=trace)
    rest, end = model(X[carry_at:], middle, trace=trace)
    return torch.cat([first, rest]), detach_state(middle), end


def run_sequence(model, X: torch.Tensor, plan: Truncation, state: tuple[torch.Tensor, ...],
                 trace_last: list[list[torch.Tensor]] | None = None) -> torch.Tensor:
    """The outputs for every step of a batch of whole sequences X (L, B, ...), cut as `plan` says.

    Each TBPTT window contributes the outputs of its new steps, so every step's
    output appears exactly once, in order; one loss over them and one backward
    give the truncated gradient of the whole sequence's loss. `trace_last`
    collects the hidden states of the last window (the gradient probe).
    """
    L, B = X.shape[0], X.shape[1]
    k1 = min(plan.k1, L)
    k2 = min(max(plan.k2, k1), L)
    num_windows = -(-L // k1)
    outputs = []
    for i in range(num_windows):
        start, end, context, carry_at = tbptt_bounds(i, k1, k2, L)
        trace = trace_last if i == num_windows - 1 else None
        out, state, _ = run_window(model, X[start:end], state, carry_at, plan.keep, trace)
        outputs.append(out[context * B :])
    return torch.cat(outputs) if len(outputs) > 1 else outputs[0]
