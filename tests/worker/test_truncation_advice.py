"""The suggested truncation window: the gradient's decay back through the window, fitted from the probe."""

from __future__ import annotations

import math

import pytest
import torch
from gradserve.truncation import advice_line, decay_rate
from torch import nn

from gradserve_worker.diagnostics import probe_gradients
from gradserve_worker.events import to_event
from gradserve_worker.trainer import Probe, TrainConfig, train


class LinearRNN(nn.Module):
    """h_t = W h_{t−1} + x_t, one layer: its Jacobian ∂h_t/∂h_{t−1} is W at every step."""

    num_layers = 1

    def __init__(self, W: torch.Tensor):
        super().__init__()
        self.W = nn.Parameter(W)


def window_replay(X: torch.Tensor, targets: torch.Tensor):
    """A replay with a loss at every step, as a language model has."""

    def replay(model, trace):
        h = torch.zeros_like(X[0])
        loss = 0
        for x, y in zip(X, targets):
            h = h @ model.W.T + x
            trace[0].append(h)
            loss = loss + ((h - y) ** 2).mean()
        return loss

    return replay


@pytest.mark.parametrize("rho", [0.5, 0.8, 0.95])
def test_on_a_linear_rnn_with_w_rho_q_the_fitted_rate_is_log_rho(rho):
    gen = torch.Generator().manual_seed(0)
    H, B, T = 32, 4, 40
    Q, _ = torch.linalg.qr(torch.randn(H, H, generator=gen, dtype=torch.float64))
    model = LinearRNN(rho * Q)
    X = torch.randn(T, B, H, generator=gen, dtype=torch.float64)
    profile, [decay] = probe_gradients(model, window_replay(X, torch.randn(T, B, H, generator=gen, dtype=torch.float64)))
    assert len(decay) == T and len(profile[0]) == T
    assert decay_rate(decay) == pytest.approx(math.log(rho), rel=0.01)


def test_the_fit_shrugs_off_a_few_odd_steps():
    rate = math.log(0.9)
    norms = [math.exp(rate * k) for k in range(30)]
    norms[0] *= 20  # the output layer's own kick at the last step
    norms[7] *= 1e3
    norms[19] /= 1e3
    assert decay_rate(norms) == pytest.approx(rate, rel=0.01)
    # Past a cut the gradient is exactly 0: only the run before it counts.
    assert decay_rate(norms[:10] + [0.0] * 5) == pytest.approx(rate, rel=0.01)
    assert decay_rate([1.0]) is None and decay_rate([0.0, 0.0]) is None


@pytest.mark.parametrize("num_steps", [5, 50])
def test_a_probe_warns_when_its_window_is_shorter_than_the_suggested_one_in_the_words_the_cli_shows(num_steps):
    # builtin:copy with seq_len 30 is 50 steps a sequence: windows of 5, or one window of all 50.
    config = TrainConfig(dataset="builtin:copy", seq_len=30, model="gru", hidden_size=16, batch_size=8,
                         num_steps=num_steps, max_steps=2, probe_every=2, log_every=2, device="cpu",
                         checkpoint_every=1000)
    events = []
    train(config, "", events.append)
    [probe] = [e for e in events if isinstance(e, Probe)]
    advice = probe.advice
    assert advice.rate < 0 and advice.half_life == pytest.approx(math.log(0.5) / advice.rate)
    assert advice.start_fraction == pytest.approx(math.exp(advice.rate * (num_steps - 1)))
    # The suggestion is the shortest window that cuts off at most 1% of the gradient mass.
    assert math.exp(advice.rate * advice.suggested) <= 0.01 < math.exp(advice.rate * (advice.suggested - 1))
    assert 5 < advice.suggested < 50
    if num_steps == 5:
        assert advice.warning == (f"the gradient at the window's start is still {advice.start_fraction:.0%} of its "
                                  "end: a longer num_steps may learn longer dependencies")
    else:
        assert advice.warning == ""
    message = to_event(probe).probe
    assert (message.decay_rate, message.half_life, message.suggested_window, message.warning) == (
        advice.rate, advice.half_life, advice.suggested, advice.warning)
    from gradserve.cli import probe_line  # the CLI's extra (rich) is a client dependency, not the worker's

    assert probe_line(message).endswith(advice_line(advice.half_life, advice.suggested, advice.warning))
