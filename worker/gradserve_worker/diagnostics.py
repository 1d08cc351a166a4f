"""Gradient diagnostics beyond the per-step norms: what the probe reports.

Every probe_every steps the trainer reports

* the gradient-through-time profile: ‖∂L/∂h_t‖ for every position t of the
  step's last truncation window and every layer, where L is the step's loss
  (a mean over the batch) and h_t the (batch, hidden) state of the layer after
  step t, norm over all its entries. It is the total derivative: through the
  output at t and through every later step of the window. For an LSTM, h_t is
  the output state, not the cell c_t. It shows the vanishing or exploding
  gradients that the BPTT chapter derives: with Jacobians of norm ρ the
  profile grows or decays like ρ^(T−t);
* the largest singular value of every recurrent weight matrix (per gate for
  GRU and LSTM), whose size decides that growth or decay;
* the decay of the gradient back from the window's last step alone,
  ‖∂(v·h_T)/∂h_{T−k}‖ with v = ∂L/∂h_T, per layer: the total derivative above
  mixes in every later step's own loss, which hides the decay; this one is
  ρ^k for Jacobians of norm ρ, and gradserve.truncation fits and reads it.

The profile replays the step's window (tasks' `replay`): the same starting
state, the same cuts, the same weights (the probe runs before the optimizer
step), but with dropout off and without randomized truncation's ξ, so it
shows the gradient the truncation keeps in expectation and never draws from
the random generator (a run with probes stays bit-for-bit the run without).
For rnn_scratch the traced h_t are its own step-by-step hidden states; the
torch.nn models replay the fused layer with cells on its own Parameters
(models.TorchRNN).
"""

from __future__ import annotations

import torch
from torch import nn

from gradserve_worker.models import recurrent_matrices

# Power-iteration rounds: many the first time a matrix is seen, then a few per
# probe from where the last probe stopped, since weights move slowly between probes.
FIRST_ITERATIONS = 30
ITERATIONS = 4

# -----------------------------------------------------------------------------
# gradient through time


def gradient_profile(model: nn.Module, replay) -> list[list[float]]:
    """‖∂L/∂h_t‖ per layer and position of the window `replay(model, trace)` recomputes and returns the loss of."""
    return probe_gradients(model, replay)[0]


def probe_gradients(model: nn.Module, replay) -> tuple[list[list[float]], list[list[float]]]:
    """(profile, decay) of the window `replay(model, trace)` recomputes and returns the loss of.

    profile: ‖∂L/∂h_t‖ per layer for t = 1..T. decay: per layer,
    ‖∂(v·h_T)/∂h_{T−k}‖ for k = 0..T−1 (v = ∂L/∂h_T), 0 past a cut.
    """
    trace: list[list[torch.Tensor]] = [[] for _ in range(model.num_layers)]
    training = model.training
    model.eval()
    try:
        loss = replay(model, trace)
    finally:
        model.train(training)
    hidden = [h for layer in trace for h in layer]
    # Only these gradients: the parameters' .grad of the step itself stay untouched.
    grads = torch.autograd.grad(loss, hidden, allow_unused=True, retain_graph=True)
    zero = torch.zeros((), device=loss.device)
    norms = [torch.linalg.vector_norm(g) if g is not None else zero for g in grads]
    decays, i = [], 0
    for layer in trace:
        i += len(layer)
        v = grads[i - 1]
        if v is None or len(layer) < 2 or not layer[-1].requires_grad:
            decays.append([norms[i - 1]])
            continue
        back = torch.autograd.grad(layer[-1], layer[:-1], grad_outputs=v, allow_unused=True, retain_graph=True)
        decays.append([norms[i - 1]] + [torch.linalg.vector_norm(g) if g is not None else zero for g in back[::-1]])
    # One device sync for all the numbers.
    flat = torch.stack(norms + [d for decay in decays for d in decay]).tolist()
    profile, decay, i = [], [], 0
    for layer in trace:
        profile.append(flat[i : i + len(layer)])
        i += len(layer)
    for layer in decays:
        decay.append(flat[i : i + len(layer)])
        i += len(layer)
    return profile, decay


# -----------------------------------------------------------------------------
# spectral norms


class SpectralNorms:
    """The largest singular value of each recurrent matrix, by power iteration with a persistent vector per matrix.

    σ ≈ ‖W v‖ for the unit vector v that repeated v ← WᵀW v / ‖WᵀW v‖ converges
    to: the top right singular vector. Each call continues from the vectors of
    the last one, so the estimate (a lower bound) tightens across probes while
    each probe costs a few matrix-vector products per matrix.
    """

    def __init__(self, seed: int, vectors: dict[str, torch.Tensor] | None = None):
        # Its own generator: the starting vectors must not move torch's global one.
        self.gen = torch.Generator().manual_seed(seed)
        self.vectors = dict(vectors or {})

    @torch.no_grad()
    def __call__(self, model: nn.Module) -> list[tuple[str, str, float]]:
        out = []
        for name, gate, W in recurrent_matrices(model):
            key = f"{name}:{gate}"
            v = self.vectors.get(key)
            rounds = ITERATIONS
            if v is None:
                v = torch.randn(W.shape[1], generator=self.gen, dtype=torch.float64)
                rounds = FIRST_ITERATIONS
            v = v.to(W)
            for _ in range(rounds):
                v = W.T @ (W @ v)
                v = v / torch.linalg.vector_norm(v).clamp_min(1e-30)
            self.vectors[key] = v
            out.append((name, gate, torch.linalg.vector_norm(W @ v)))
        sigmas = torch.stack([s for _, _, s in out]).tolist() if out else []
        return [(name, gate, sigma) for (name, gate, _), sigma in zip(out, sigmas)]

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {k: v.detach().cpu() for k, v in self.vectors.items()}


# -----------------------------------------------------------------------------
# non-finite gradients


def count_nonfinite(grads) -> int:
    """Gradient entries that are NaN or ±inf; the trainer calls it only when the global norm is not finite."""
    return int(sum((~torch.isfinite(g)).sum() for g in grads if g is not None))
