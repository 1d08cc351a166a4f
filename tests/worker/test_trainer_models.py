"""The models: the from-scratch RNN computes d2l's equations; all share one interface."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from gradserve_worker.models import RNNScratch, build_model

V, H, T, B = 11, 6, 5, 3


def test_rnn_scratch_is_the_textbook_recurrence():
    torch.manual_seed(0)
    model = RNNScratch(V, H)
    with torch.no_grad():  # d2l's init leaves the biases at 0, which would hide them
        model.b_h.normal_()
        model.b_q.normal_()
    X = torch.randint(0, V, (T, B))
    h0 = torch.randn(B, H)
    logits, (h_T,) = model(X, (h0,))

    # d2l's rnn(): one-hot inputs, one output matmul per step.
    h, outputs = h0, []
    for x in F.one_hot(X, V).float():
        h = torch.tanh(x @ model.W_xh + h @ model.W_hh + model.b_h)
        outputs.append(h @ model.W_hq + model.b_q)
    assert logits.shape == (T * B, V)
    torch.testing.assert_close(logits, torch.cat(outputs))
    torch.testing.assert_close(h_T, h)


def test_rnn_scratch_starts_like_d2l():
    model = RNNScratch(V, 256)
    assert {n for n, _ in model.named_parameters()} == {"W_xh", "W_hh", "b_h", "W_hq", "b_q"}
    assert model.W_hh.std().item() == pytest.approx(0.01, rel=0.1)
    assert not model.b_h.any() and not model.b_q.any()


@pytest.mark.parametrize("kind, state_len", [("rnn_scratch", 1), ("rnn", 1), ("gru", 1), ("lstm", 2)])
def test_every_model_maps_a_window_to_time_major_logits_and_a_state(kind, state_len):
    layers = 1 if kind == "rnn_scratch" else 2
    model = build_model(kind, V, H, layers)
    state = model.begin_state(B, "cpu")
    assert len(state) == state_len and all(not s.any() for s in state)
    X = torch.randint(0, V, (T, B))
    logits, new_state = model(X, state)
    assert logits.shape == (T * B, V)
    assert [s.shape for s in new_state] == [s.shape for s in state]
    # Time-major: the first B rows of the logits depend on the first step's tokens only.
    X2 = X.clone()
    X2[1:] = (X2[1:] + 1) % V
    torch.testing.assert_close(model(X2, state)[0][:B], logits[:B])


def test_rnn_scratch_refuses_more_than_one_layer():
    with pytest.raises(ValueError, match="num_layers must be 1"):
        build_model("rnn_scratch", V, H, 2)


# -----------------------------------------------------------------------------
# embedding, dropout, task inputs


@pytest.mark.parametrize("kind", ["rnn_scratch", "lstm"])
def test_embedding_size_puts_a_learned_embedding_before_the_recurrence(kind):
    model = build_model(kind, V, H, 1, embedding_size=4)
    params = dict(model.named_parameters())
    assert params["embedding.weight"].shape == (V, 4)
    first_layer = params["W_xh"] if kind == "rnn_scratch" else params["rnn.weight_ih_l0"]
    assert 4 in first_layer.shape and V not in first_layer.shape
    logits, _ = model(torch.randint(0, V, (T, B)), model.begin_state(B, "cpu"))
    logits.sum().backward()
    assert params["embedding.weight"].grad.abs().sum() > 0


@pytest.mark.parametrize("kind, layers", [("rnn_scratch", 1), ("rnn", 2), ("lstm", 2), ("gru", 2)])
def test_dropout_is_random_in_training_and_off_in_eval(kind, layers):
    torch.manual_seed(0)
    model = build_model(kind, V, H, layers, dropout=0.5)
    X = torch.randint(0, V, (T, B))
    state = model.begin_state(B, "cpu")
    a, b = model(X, state)[0], model(X, state)[0]
    assert not torch.equal(a, b)
    model.eval()
    reference = build_model(kind, V, H, layers)
    reference.load_state_dict(model.state_dict())
    torch.testing.assert_close(model(X, state)[0], reference(X, state)[0])
    if layers > 1:
        assert model.rnn.dropout == 0.5  # between the stacked layers too


def test_a_task_with_features_reads_vectors_and_predicts_output_size_values():
    for kind in ("rnn_scratch", "gru"):
        model = build_model(kind, 0, H, 1, features=2, output_size=1)
        out, _ = model(torch.rand(T, B, 2), model.begin_state(B, "cpu"))
        assert out.shape == (T * B, 1)


# -----------------------------------------------------------------------------
# rnn's CPU fast path against torch's own nn.RNN


@pytest.mark.parametrize("nonlinearity", ["tanh", "relu"])
@pytest.mark.parametrize("layers, inputs", [(1, "one_hot"), (2, "one_hot"), (2, "embedding"), (1, "features")])
def test_rnn_on_the_cpu_computes_what_torchs_nn_rnn_does(nonlinearity, layers, inputs):
    """The rnn model's CPU path (ScratchRecurrence per layer) against nn.RNN itself, in float64.

    Outputs, final state, and the gradient of every parameter and of the initial
    state (which TBPTT's k2 > k1 windows backpropagate into) must agree.
    """
    torch.manual_seed(1)
    extra = {"one_hot": {}, "embedding": {"embedding_size": 4}, "features": {"features": 3, "output_size": 2}}[inputs]
    model = build_model("rnn", 0 if inputs == "features" else V, H, layers, nonlinearity, **extra).double()
    with torch.no_grad():  # nn.RNN's uniform init is small; larger weights make every step matter
        for p in model.parameters():
            p.normal_(0, 0.5)
    X = torch.randn(T, B, 3, dtype=torch.float64) if inputs == "features" else torch.randint(0, V, (T, B))
    h0 = torch.randn(layers, B, H, dtype=torch.float64, requires_grad=True)
    weights = torch.randn(T * B, model.linear.out_features, dtype=torch.float64)
    state_weights = torch.randn(layers, B, H, dtype=torch.float64)

    def run(fast: bool):
        if fast:
            out, (h_T,) = model(X, (h0,))
        else:  # nn.RNN's own kernels
            seq, h_T = model.rnn(model.inputs(X), h0)
            out = model.linear(seq.reshape(-1, H))
        loss = (out * weights).sum() + (h_T * state_weights).sum()
        return (out, h_T), torch.autograd.grad(loss, [*model.parameters(), h0])

    (out, h_T), grads = run(fast=True)
    (out_ref, h_T_ref), grads_ref = run(fast=False)
    torch.testing.assert_close(out, out_ref, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(h_T, h_T_ref, rtol=1e-10, atol=1e-12)
    names = [n for n, _ in model.named_parameters()] + ["h0"]
    for name, g, g_ref in zip(names, grads, grads_ref, strict=True):
        torch.testing.assert_close(g, g_ref, rtol=1e-10, atol=1e-12, msg=lambda m, name=name: f"{name}: {m}")
