"""The BPTT chapter's equations as a test oracle for rnn_scratch's gradients.

Dive into Deep Learning derives, for h_t = f(x_t, h_{t−1}) with an output
o_t = W_qh h_t at every step and L = (1/T) Σ_t ℓ(o_t, y_t),

    ∂L/∂h_t  = Σ_{i=t}^{T} (W_hh^T)^{i−t} W_qh^T ∂L/∂o_i
    ∂L/∂W_hh = Σ_t ∂L/∂h_t h_t^T ,

for a linear recurrence. With the two corrections from the chapter's reader
discussion, for h_t = tanh(z_t), z_t = W_hx x_t + W_hh h_{t−1} + b_h:

* each step back contributes a factor diag(1 − h_j²) from tanh:
      ∂L/∂h_t = Σ_{i=t}^{T} [Π_{j=t+1}^{i} W_hh^T diag(1 − h_j²)] W_qh^T ∂L/∂o_i
* the weight gradient sums with h_{t−1}, the state W_hh multiplied:
      ∂L/∂W_hh = Σ_t diag(1 − h_t²) ∂L/∂h_t h_{t−1}^T,   ∂L/∂W_hx = Σ_t diag(1 − h_t²) ∂L/∂h_t x_t^T.

The oracle below evaluates exactly these sums of products, per sequence, in
float64 with no autograd, and the tests compare them with autograd through
the real RNNScratch (whose default path has its own hand-written backward).
The model is row-major, h_t = tanh(x_t W_xh + h_{t−1} W_hh + b_h), so its
W_hh is the chapter's W_hh^T and so on.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from gradserve_worker.diagnostics import gradient_profile
from gradserve_worker.models import RNNScratch

V, H, B = 6, 5, 3
REL = 1e-10


def relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


def chapter_gradients(model: RNNScratch, X: torch.Tensor, Y: torch.Tensor, h0: torch.Tensor):
    """(∂L/∂h_t for t = 1..T, ∂L/∂W_hh, ∂L/∂W_xh) of L = mean cross-entropy, from the chapter's sums."""
    W_xh, W_hh, b_h, W_hq, b_q = (p.detach() for p in (model.W_xh, model.W_hh, model.b_h, model.W_hq, model.b_q))
    T = len(X)
    act = torch.tanh if model.nonlinearity == "tanh" else torch.relu
    # Forward, column vectors: h_t = act(W_hx x_t + W_hh h_{t−1} + b_h), with W_hx = W_xh^T and W_hh(chapter) = W_hh^T.
    x = F.one_hot(X, V).double()  # (T, B, V)
    hs = [h0]
    for t in range(T):
        hs.append(act(x[t] @ W_xh + hs[-1] @ W_hh + b_h))
    h = torch.stack(hs)  # (T + 1, B, H): h[0] is h_0
    # The activation's derivative at each step, as the vector on diag(·): 1 − h_j² for tanh.
    slope = 1 - h**2 if model.nonlinearity == "tanh" else (h > 0).double()
    o = h[1:] @ W_hq + b_q
    # ∂L/∂o_i for the mean over T·B cross-entropies: (softmax(o_i) − onehot(y_i)) / (T·B).
    dL_do = (torch.softmax(o, -1) - F.one_hot(Y, V).double()) / (T * B)
    direct = dL_do @ W_hq.T  # W_qh^T ∂L/∂o_i, per sequence (row b)

    dL_dh = torch.zeros(T + 1, B, H, dtype=torch.float64)
    for b in range(B):
        for t in range(1, T + 1):
            total = torch.zeros(H, dtype=torch.float64)
            for i in range(t, T + 1):
                product = torch.eye(H, dtype=torch.float64)
                for j in range(t + 1, i + 1):  # Π_{j=t+1}^{i} W_hh^T diag(1 − h_j²), chapter's W_hh
                    product = product @ (W_hh @ torch.diag(slope[j, b]))
                total += product @ direct[i - 1, b]
            dL_dh[t, b] = total
    dW_hh = torch.zeros(H, H, dtype=torch.float64)
    dW_xh = torch.zeros(V, H, dtype=torch.float64)
    for t in range(1, T + 1):
        delta = slope[t] * dL_dh[t]  # diag(1 − h_t²) ∂L/∂h_t, one row per sequence
        dW_hh += h[t - 1].T @ delta  # with h_{t−1}, not h_t
        dW_xh += x[t - 1].T @ delta
    return dL_dh[1:], dW_hh, dW_xh


def model_and_window(nonlinearity: str, T: int, seed: int = 0):
    torch.manual_seed(seed)
    model = RNNScratch(V, H, nonlinearity).double()
    with torch.no_grad():  # weights large enough that every step's factor matters
        model.W_hh.normal_(0, 0.6)
        model.W_xh.normal_(0, 0.8)
        model.b_h.normal_(0, 0.3)
        model.W_hq.normal_(0, 0.8)
    X, Y = torch.randint(0, V, (2, T, B))
    return model, X, Y


def autograd_gradients(model: RNNScratch, X, Y, h0, *, step_by_step: bool):
    """Autograd through the real model: its fast path (hand-written backward) or its step-by-step path (tracing h_t)."""
    model.zero_grad()
    trace = [[]] if step_by_step else None
    logits, _ = model(X, (h0,), trace=trace)
    loss = F.cross_entropy(logits, Y.reshape(-1))
    for h in trace[0] if trace else ():
        h.retain_grad()
    loss.backward()
    dL_dh = torch.stack([h.grad for h in trace[0]]) if trace else None
    return dL_dh, model.W_hh.grad.clone(), model.W_xh.grad.clone()


@pytest.mark.parametrize("nonlinearity", ["tanh", "relu"])
@pytest.mark.parametrize("step_by_step", [False, True], ids=["fast-path", "step-by-step"])
def test_full_window_gradients_are_the_chapters(nonlinearity, step_by_step):
    model, X, Y = model_and_window(nonlinearity, T=7)
    h0 = torch.zeros(B, H, dtype=torch.float64)
    dL_dh, dW_hh, dW_xh = chapter_gradients(model, X, Y, h0)
    got_dh, got_W_hh, got_W_xh = autograd_gradients(model, X, Y, h0, step_by_step=step_by_step)
    assert relative_error(got_W_hh, dW_hh) <= REL
    assert relative_error(got_W_xh, dW_xh) <= REL
    if step_by_step:
        assert relative_error(got_dh, dL_dh) <= REL
        for t in range(7):
            assert relative_error(got_dh[t], dL_dh[t]) <= REL, t
    # Gradients of this size are far from zero: a wrong factor could not pass by being negligible.
    assert dW_hh.norm() > 1e-3 and dL_dh[0].norm() > 1e-4


@pytest.mark.parametrize("step_by_step", [False, True], ids=["fast-path", "step-by-step"])
def test_a_truncated_windows_gradients_are_the_chapters_from_its_detached_start(step_by_step):
    # Two windows of a stream, the state detached between them: the second window's gradient is
    # the chapter's formula over that window alone, starting from the (constant) carried state.
    model, X, Y = model_and_window("tanh", T=9, seed=1)
    first, second = slice(0, 4), slice(4, 9)
    with torch.no_grad():
        _, (carried,) = model(X[first], (torch.zeros(B, H, dtype=torch.float64),))
    assert carried.abs().sum() > 0.1  # a non-trivial h_0 for the window
    dL_dh, dW_hh, dW_xh = chapter_gradients(model, X[second], Y[second], carried)
    got_dh, got_W_hh, got_W_xh = autograd_gradients(model, X[second], Y[second], carried, step_by_step=step_by_step)
    assert relative_error(got_W_hh, dW_hh) <= REL
    assert relative_error(got_W_xh, dW_xh) <= REL
    if step_by_step:
        assert relative_error(got_dh, dL_dh) <= REL
    # The truncated gradient is not the full one: the untruncated run's weight gradient differs.
    full_dh, full_W_hh, _ = chapter_gradients(model, X, Y, torch.zeros(B, H, dtype=torch.float64))
    assert relative_error(dW_hh, full_W_hh) > 1e-3


def test_the_oracle_detects_the_uncorrected_equations():
    # The chapter's formulas as first printed (no tanh factor; h_t instead of h_{t−1}) give other numbers,
    # so the agreement above is not an accident of the test data.
    model, X, Y = model_and_window("tanh", T=6)
    h0 = torch.zeros(B, H, dtype=torch.float64)
    dL_dh, dW_hh, _ = chapter_gradients(model, X, Y, h0)
    _, got_W_hh, _ = autograd_gradients(model, X, Y, h0, step_by_step=False)
    with torch.no_grad():
        x = F.one_hot(X, V).double()
        hs, h = [], h0
        for t in range(6):
            h = torch.tanh(x[t] @ model.W_xh + h @ model.W_hh + model.b_h)
            hs.append(h)
        h = torch.stack(hs)
        with_h_t = sum(h[t].T @ ((1 - h[t] ** 2) * dL_dh[t]) for t in range(6))
    assert relative_error(with_h_t, got_W_hh) > 1e-2


# -----------------------------------------------------------------------------
# vanishing and exploding: ‖∂L/∂h_t‖ ∝ ρ^(T−t)


@pytest.mark.parametrize("rho", [0.7, 1.3])
def test_gradient_norms_through_time_scale_as_rho_to_the_distance(rho):
    # Identity activation and W_hh = ρQ with Q orthogonal: every step back multiplies the gradient
    # by ρQ^T, which scales its norm by exactly ρ. The loss reads the last step only.
    T = 12
    torch.manual_seed(3)
    model = RNNScratch(V, 8).double()
    model.activation = lambda z: z  # what the chapter's linear derivation assumes
    Q, _ = torch.linalg.qr(torch.randn(8, 8, dtype=torch.float64))
    with torch.no_grad():
        model.W_hh.copy_(rho * Q)
        model.W_hq.normal_()
    X = torch.randint(0, V, (T, B))

    def last_step_loss(m, trace):
        logits, _ = m(X, m.begin_state(B, "cpu"), trace=trace)
        return logits[-B:].square().sum()

    [norms] = gradient_profile(model, last_step_loss)
    assert len(norms) == T
    for t in range(T):
        assert norms[t] == pytest.approx(norms[-1] * rho ** (T - 1 - t), rel=1e-9)
    assert (norms[0] < norms[-1]) == (rho < 1)
