"""Gradient diagnostics: the gradient-through-time probe, spectral norms, non-finite counts, skipped steps."""

from __future__ import annotations

import io
import math

import pytest
import torch
import torch.nn.functional as F
from torch.nn.modules.module import register_module_forward_hook
from torch.optim.optimizer import register_optimizer_step_pre_hook

from gradserve_worker.diagnostics import SpectralNorms, gradient_profile
from gradserve_worker.models import RNNScratch, TorchRNN, build_model, recurrent_matrices
from gradserve_worker.trainer import CheckpointReady, Probe, StepMetrics, TrainConfig, TrainingDiverged, train


def small(**overrides) -> TrainConfig:
    base = {"model": "lstm", "hidden_size": 16, "batch_size": 4, "num_steps": 8, "preprocess": "d2l", "max_steps": 10,
            "log_every": 1, "checkpoint_every": 1000, "device": "cpu", "val_fraction": 0.0, "probe_every": 10**6}
    return TrainConfig(**{**base, **overrides})


def events_of(config: TrainConfig, text: str) -> list:
    events = []
    train(config, text, events.append)
    return events


def window_loss(X, Y, state):
    def replay(model, trace):
        logits, _ = model(X, state, trace=trace)
        return F.cross_entropy(logits, Y.reshape(-1))

    return replay


# -----------------------------------------------------------------------------
# gradient through time


def test_the_nn_rnn_replay_gives_the_profile_of_rnn_scratch_with_the_same_weights():
    torch.manual_seed(0)
    V, H, T, B = 7, 6, 9, 3
    torch_rnn = build_model("rnn", V, H, 1).double()
    scratch = build_model("rnn_scratch", V, H, 1).double()
    with torch.no_grad():  # nn.RNN: h W_ih^T + b_ih + h W_hh^T + b_hh; rnn_scratch: x W_xh + h W_hh + b_h
        for p in torch_rnn.parameters():
            p.normal_(0, 0.5)
        w_ih, w_hh, b_ih, b_hh = torch_rnn.layer_weights(0)
        scratch.W_xh.copy_(w_ih.T)
        scratch.W_hh.copy_(w_hh.T)
        scratch.b_h.copy_(b_ih + b_hh)
        scratch.W_hq.copy_(torch_rnn.linear.weight.T)
        scratch.b_q.copy_(torch_rnn.linear.bias)
    X, Y = torch.randint(0, V, (2, T, B))
    h0 = torch.randn(B, H, dtype=torch.float64)
    [replayed] = gradient_profile(torch_rnn, window_loss(X, Y, (h0.unsqueeze(0),)))
    [own] = gradient_profile(scratch, window_loss(X, Y, (h0,)))
    assert len(replayed) == len(own) == T
    assert replayed == pytest.approx(own, rel=1e-10)
    assert min(own) > 0


@pytest.mark.parametrize("kind", ["rnn", "gru", "lstm"])
def test_the_cell_replay_computes_what_the_fused_layer_computes(kind):
    # Same outputs, same state, same parameter gradients and the same gradient on the incoming
    # state (∂L/∂h_0 of every layer): the replay is the fused module's function, step by step.
    torch.manual_seed(1)
    model = build_model(kind, 5, 4, 2, embedding_size=3).double()
    X, Y = torch.randint(0, 5, (2, 6, 3))
    results = []
    for trace in (None, [[], []]):
        state = tuple(s.normal_(generator=torch.Generator().manual_seed(2)).requires_grad_()
                      for s in model.begin_state(3, "cpu"))
        model.zero_grad()
        logits, end = model(X, state, trace=trace)
        loss = F.cross_entropy(logits, Y.reshape(-1)) + sum(s.sum() for s in end)
        loss.backward()
        results.append((logits, end, [p.grad.clone() for p in model.parameters()], [s.grad for s in state]))
    (a_logits, a_end, a_grads, a_h0), (b_logits, b_end, b_grads, b_h0) = results
    torch.testing.assert_close(b_logits, a_logits, rtol=1e-12, atol=1e-12)
    for x, y in zip(b_end + tuple(b_grads) + tuple(b_h0), a_end + tuple(a_grads) + tuple(a_h0)):
        torch.testing.assert_close(x, y, rtol=1e-10, atol=1e-12)


def test_probes_come_every_probe_every_steps_with_a_profile_per_layer_and_spectral_norms(timemachine):
    config = small(model="gru", num_layers=2, max_steps=6, probe_every=3, log_every=2)
    events = events_of(config, timemachine[:3000])
    probes = [e for e in events if isinstance(e, Probe)]
    assert [p.step for p in probes] == [3, 6]
    for p in probes:
        assert [len(layer) for layer in p.grad_through_time] == [8, 8]  # two layers × num_steps positions
        assert all(v > 0 for layer in p.grad_through_time for v in layer)
        assert [(name, gate) for name, gate, _ in p.spectral_norms] == [
            (f"rnn.weight_hh_l{layer}", gate) for layer in (0, 1) for gate in "rzn"
        ]
    # Reported right after the step's metrics, before its checkpoint.
    kinds = [type(e).__name__ for e in events if getattr(e, "step", None) == 6]
    assert kinds == ["StepMetrics", "Probe", "CheckpointReady"]


def test_the_probe_measures_the_gradient_of_the_steps_own_window_and_weights(timemachine, monkeypatch):
    # The probe runs before the optimizer step, on the step's window and starting state. Recompute
    # its profile independently: the textbook loop with retain_grad on every h_t, on the recorded inputs.
    seen = {}

    def record(module, args, output):
        if isinstance(module, RNNScratch) and not seen:
            seen.update(X=args[0].clone(), h0=args[1][0].clone(),
                        weights={n: p.detach().clone().requires_grad_() for n, p in module.named_parameters()})

    real = F.cross_entropy
    targets = []
    monkeypatch.setattr(torch.nn.functional, "cross_entropy", lambda o, y, **kw: targets.append(y) or real(o, y, **kw))
    handle = register_module_forward_hook(record)
    try:
        events = events_of(small(model="rnn_scratch", max_steps=1, probe_every=1), timemachine[:3000])
    finally:
        handle.remove()
    [probe] = [e for e in events if isinstance(e, Probe)]

    W = seen["weights"]
    hs, h = [], seen["h0"]
    for x in seen["X"]:
        h = torch.tanh(W["W_xh"][x] + h @ W["W_hh"] + W["b_h"])
        h.retain_grad()
        hs.append(h)
    logits = torch.stack(hs).view(-1, 16) @ W["W_hq"] + W["b_q"]
    real(logits, targets[0]).backward()
    assert probe.grad_through_time[0] == pytest.approx([h.grad.norm().item() for h in hs], rel=1e-4)


def test_probing_changes_nothing_in_the_training_run(timemachine):
    config = small(model="lstm", dropout=0.3, num_layers=2, max_steps=8, truncation="randomized")
    quiet = [e for e in events_of(config, timemachine[:3000]) if isinstance(e, (StepMetrics, CheckpointReady))]
    probed_events = events_of(small(**{**config.__dict__, "probe_every": 2}), timemachine[:3000])
    probed = [e for e in probed_events if isinstance(e, (StepMetrics, CheckpointReady))]
    assert sum(isinstance(e, Probe) for e in probed_events) == 4
    assert [(m.loss, m.grad_norm) for m in quiet if isinstance(m, StepMetrics)] == [
        (m.loss, m.grad_norm) for m in probed if isinstance(m, StepMetrics)
    ]
    a, b = (torch.load(io.BytesIO(e[-1].data), weights_only=True)["model"] for e in (quiet, probed))
    for name in a:
        assert torch.equal(a[name], b[name]), name


# -----------------------------------------------------------------------------
# spectral norms


def test_power_iteration_finds_the_largest_singular_value_and_keeps_improving():
    torch.manual_seed(0)
    model = build_model("lstm", 5, 32, 1)
    norms = SpectralNorms(seed=0)
    first = norms(model)
    assert [(name, gate) for name, gate, _ in first] == [("rnn.weight_hh_l0", g) for g in "ifgo"]
    exact = [torch.linalg.matrix_norm(W.detach(), ord=2).item() for _, _, W in recurrent_matrices(model)]
    for (_, _, sigma), true in zip(first, exact):
        assert sigma <= true * (1 + 1e-5)  # ‖W v‖ for a unit v never exceeds σ_max
        assert sigma == pytest.approx(true, rel=0.05)
    for _ in range(40):
        later = norms(model)
    for (_, _, sigma), true in zip(later, exact):
        assert sigma == pytest.approx(true, rel=2e-3)
    # The vectors persist: a fresh SpectralNorms from the saved vectors continues where this one stopped.
    resumed = SpectralNorms(seed=0, vectors=norms.state_dict())
    assert [s for _, _, s in resumed(model)] == pytest.approx([s for _, _, s in norms(model)], rel=1e-4)


def test_spectral_norm_of_rnn_scratch_is_that_of_w_hh():
    model = build_model("rnn_scratch", 5, 6, 1)
    with torch.no_grad():
        model.W_hh.copy_(torch.diag(torch.tensor([0.5, 3.0, 1.0, 2.0, 0.1, 0.2])))
    [(name, gate, sigma)] = SpectralNorms(seed=0)(model)
    assert (name, gate) == ("W_hh", "") and sigma == pytest.approx(3.0, rel=1e-4)


# -----------------------------------------------------------------------------
# non-finite gradients


def poison_gradient_at(calls_to_poison: set[int]):
    calls = []

    def hook(module, args, output):
        if isinstance(module, (RNNScratch, TorchRNN)):
            calls.append(1)
            if len(calls) in calls_to_poison:
                logits, state = output
                logits.register_hook(lambda g: g * math.nan)
        return output

    return register_module_forward_hook(hook)


def test_on_nonfinite_skip_drops_the_update_counts_it_and_trains_on(timemachine):
    updates = []
    step_hook = register_optimizer_step_pre_hook(lambda opt, args, kwargs: updates.append(1))
    handle = poison_gradient_at({3})
    try:
        events = events_of(small(max_steps=6, log_every=3, on_nonfinite="skip"), timemachine[:3000])
    finally:
        handle.remove()
        step_hook.remove()
    metrics = [e for e in events if isinstance(e, StepMetrics)]
    assert [m.step for m in metrics] == [3, 6]
    first, second = metrics
    assert first.skipped_steps == 1 and second.skipped_steps == 0
    # Every entry of every gradient is NaN: the count is the number of parameters' entries.
    weights = torch.load(io.BytesIO(events[-1].data), weights_only=True)["model"]
    assert first.nonfinite_grads == sum(w.numel() for w in weights.values())
    assert second.nonfinite_grads == 0
    assert math.isnan(first.grad_norm)  # the interval's last step was the poisoned one
    assert math.isfinite(first.loss) and math.isfinite(second.loss)  # the mean of the two trained steps
    assert len(updates) == 5


def test_on_nonfinite_fail_stops_with_the_step(timemachine):
    handle = poison_gradient_at({2})
    try:
        with pytest.raises(TrainingDiverged, match="gradient norm became nan at step 2; .* or on_nonfinite=skip"):
            events_of(small(max_steps=6), timemachine[:3000])
    finally:
        handle.remove()


def test_a_skipped_step_with_a_non_finite_state_restarts_the_carried_state_from_zeros(timemachine):
    states_in = []

    def hook(module, args, output):
        if isinstance(module, (RNNScratch, TorchRNN)):
            states_in.append(args[1])
            if len(states_in) == 2:
                logits, state = output
                return logits * math.inf, tuple(s * math.nan for s in state)
        return output

    handle = register_module_forward_hook(hook)
    try:
        events = events_of(small(max_steps=4, on_nonfinite="skip"), timemachine[:3000])
    finally:
        handle.remove()
    assert [e.skipped_steps for e in events if isinstance(e, StepMetrics)] == [0, 1, 0, 0]
    assert all(not s.any() for s in states_in[2])  # step 3 starts from zeros, not from NaN
    assert all(torch.isfinite(s).all() for s in states_in[3])
