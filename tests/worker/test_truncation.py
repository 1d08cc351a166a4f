"""Truncation strategies: randomized is unbiased, tbptt(k, k) is fixed(k), TBPTT(k1, k2), full, cuts in tasks."""

from __future__ import annotations

import io
import math

import pytest
import torch
import torch.nn.functional as F
from torch.nn.modules.module import register_module_forward_pre_hook

from gradserve_worker import truncation
from gradserve_worker.data import SequentialWindows, build_corpus, tbptt_bounds
from gradserve_worker.models import RNNScratch, TorchRNN, build_model
from gradserve_worker.tasks import AddingTask, task_generator
from gradserve_worker.trainer import CheckpointReady, Probe, StepMetrics, TrainConfig, train
from gradserve.spec import FULL_MAX_STEPS
from gradserve_worker.truncation import Truncation, run_sequence, run_window



def small(**overrides) -> TrainConfig:
    base = {"model": "lstm", "hidden_size": 16, "batch_size": 4, "num_steps": 8, "preprocess": "d2l", "max_steps": 10,
            "log_every": 1, "checkpoint_every": 1000, "device": "cpu", "val_fraction": 0.0, "probe_every": 10**6}
    return TrainConfig(**{**base, **overrides})


def run(config: TrainConfig, text: str):
    events = []
    result = train(config, text, events.append)
    metrics = [e for e in events if isinstance(e, StepMetrics)]
    return result, metrics, [e for e in events if isinstance(e, CheckpointReady)]


def window_inputs(config: TrainConfig, text: str) -> list[torch.Tensor]:
    """The inputs X of every model call a training run makes."""
    calls = []

    def record(module, args):
        if isinstance(module, (RNNScratch, TorchRNN)):
            calls.append((args[0].clone(), args[1]))

    handle = register_module_forward_pre_hook(record)
    try:
        run(config, text)
    finally:
        handle.remove()
    return calls

# -----------------------------------------------------------------------------
# randomized truncation


def randomized_gradients(model, X, Y, h0, keep, batches: int, copies: int = 25) -> torch.Tensor:
    """`batches` independent means of `copies` randomized-truncation gradients of one window, one row each.

    Each copy of the window is a column of one big batch with its own ξ draws, so a batch's gradient
    (of the mean loss over the copies) is the mean of `copies` independent estimates; the rows are
    independent draws of that mean, and their spread gives the standard error.
    """
    Xs, Ys = X.repeat(1, copies), Y.repeat(1, copies)
    # The batch is the state's second-to-last dimension: (B, H) for rnn_scratch, (layers, B, H) otherwise.
    state = tuple(s.repeat(*[1] * (s.dim() - 2), copies, 1) for s in h0)
    rows = []
    for _ in range(batches):
        model.zero_grad()
        outputs, _, _ = run_window(model, Xs, state, len(Xs), keep)
        F.cross_entropy(outputs, Ys.reshape(-1)).backward()
        rows.append(torch.cat([p.grad.reshape(-1) for p in model.parameters()]))
    return torch.stack(rows)


def mean_within_standard_errors(samples: torch.Tensor, target: torch.Tensor, z: float = 5.0) -> bool:
    """Whether every coordinate's sample mean is within z standard errors of the target."""
    mean = samples.mean(0)
    stderr = samples.std(0) / math.sqrt(len(samples))
    return bool(((mean - target).abs() <= z * stderr + 1e-12).all())


@pytest.mark.parametrize("kind", ["rnn_scratch", "lstm"])
def test_randomized_truncation_is_an_unbiased_estimate_of_the_full_window_gradient(kind, monkeypatch):
    torch.manual_seed(0)
    model = build_model(kind, 5, 4, 1).double()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.7)  # strong recurrence, so the far steps carry real gradient
    X, Y = torch.randint(0, 5, (2, 8, 2))
    h0 = tuple(s.normal_() for s in model.begin_state(2, "cpu"))
    [full] = randomized_gradients(model, X, Y, h0, None, batches=1, copies=1)
    keep = 0.6
    samples = randomized_gradients(model, X, Y, h0, keep, batches=120)

    assert not torch.allclose(samples[0], full)  # a draw is cut somewhere
    assert mean_within_standard_errors(samples, full)
    # The test has the power to see a bias: the same cuts without the 1/π reweighting
    # (ξ ∈ {0, 1}: truncated paths dropped, surviving ones not scaled up) fail it.
    real = truncation.sample_xi
    monkeypatch.setattr(truncation, "sample_xi", lambda *args, **kwargs: real(*args, **kwargs) * keep)
    assert not mean_within_standard_errors(randomized_gradients(model, X, Y, h0, keep, batches=40), full)


def test_randomized_truncation_leaves_the_forward_pass_alone():
    torch.manual_seed(0)
    model = build_model("gru", 5, 4, 2)
    X = torch.randint(0, 5, (6, 3))
    h0 = model.begin_state(3, "cpu")
    plain, _, end = run_window(model, X, h0, 6)
    cut, _, cut_end = run_window(model, X, h0, 6, keep=0.3)
    torch.testing.assert_close(cut, plain)
    torch.testing.assert_close(cut_end[0], end[0])


def test_randomized_cuts_stop_gradients_where_xi_is_zero():
    torch.manual_seed(0)
    model = build_model("rnn_scratch", 5, 4, 1)
    X = torch.randint(0, 5, (10, 1))
    with torch.no_grad():
        model.W_hh.normal_()
    profiles = []
    for _ in range(20):
        trace = [[]]
        outputs, _, _ = run_window(model, X, model.begin_state(1, "cpu"), 10, keep=0.5, trace=trace)
        loss = outputs[-1].square().sum()  # the last step only: every earlier h_t is reached through the chain
        profiles.append([g.norm().item() for g in torch.autograd.grad(loss, trace[0])])
    # Once a ξ is 0 the gradient is exactly 0 from there back; with keep 0.5 over 9 links that happens in most draws.
    assert sum(p[0] == 0.0 for p in profiles) > 10
    for p in profiles:
        first_nonzero = next(i for i, v in enumerate(p) if v != 0)
        assert all(v != 0 for v in p[first_nonzero:])


# -----------------------------------------------------------------------------
# TBPTT(k1, k2)


def final_parameters(config, text):
    _, _, checkpoints = run(config, text)
    return torch.load(io.BytesIO(checkpoints[-1].data), weights_only=True)["model"]


@pytest.mark.parametrize("partition", ["sequential", "random"])
def test_tbptt_k_k_is_fixed_truncation_with_window_k(timemachine, partition):
    text = timemachine[:2000]
    fixed = final_parameters(small(num_steps=6, max_steps=12, partition=partition), text)
    tbptt = final_parameters(
        small(num_steps=35, truncation="tbptt", tbptt_k1=6, tbptt_k2=6, max_steps=12, partition=partition), text
    )
    longer = final_parameters(
        small(num_steps=35, truncation="tbptt", tbptt_k1=6, tbptt_k2=9, max_steps=12, partition=partition), text
    )
    for name in fixed:
        assert torch.equal(fixed[name], tbptt[name]), name
    assert any(not torch.equal(fixed[name], longer[name]) for name in fixed)


def test_tbptt_bounds_walk_k1_new_steps_reaching_k2_back():
    k1, k2 = 3, 7
    seen_new = []
    for i in range(6):
        start, end, context, carry_at = tbptt_bounds(i, k1, k2, 100)
        assert end == (i + 1) * k1 and start == max(0, end - k2)
        assert end - (start + context) == k1  # the loss covers exactly the k1 new steps
        seen_new += range(start + context, end)
        next_start = tbptt_bounds(i + 1, k1, k2, 100)[0]
        assert start + carry_at == next_start
    assert seen_new == list(range(18))  # every step is new in exactly one window, in order


def test_a_tbptt_window_reaches_k2_steps_back_with_loss_on_its_last_k1(timemachine):
    k1, k2 = 3, 7
    config = small(truncation="tbptt", tbptt_k1=k1, tbptt_k2=k2, max_steps=4, model="gru")
    inputs = window_inputs(config, timemachine[:3000])
    # Window i spans [max(0, 3(i+1) − 7), 3(i+1)) and is split where window i+1 starts: window 0 is
    # [0, 3) whole (the next starts at 0 too), window 1 [0, 6) split at 2, windows 2 and 3 split 3 + 4.
    assert [len(X) for X, _ in inputs] == [3, 2, 4, 3, 4, 3, 4]
    assert [s.grad_fn is None for _, state in inputs for s in state] == [True, True, False, True, False, True, False]
    events = []
    train(small(**{**config.__dict__, "probe_every": 4}), timemachine[:3000], events.append)
    [probe] = [e for e in events if isinstance(e, Probe)]
    [profile] = probe.grad_through_time
    assert len(profile) == k2 and all(v > 0 for v in profile)


def test_tbptt_carries_the_state_a_straight_pass_has():
    torch.manual_seed(0)
    model = build_model("lstm", 7, 5, 2)
    corpus = torch.randint(0, 7, (200,))
    k1, k2, B = 3, 8, 2
    windows = SequentialWindows(corpus, B, k1, torch.Generator().manual_seed(1), k2=k2)
    with torch.no_grad():
        straight_states = []  # the state after each step of one uncut pass over the rows
        state = model.begin_state(B, "cpu")
        for t in range(len(windows.X)):
            _, state = model(windows.X[t : t + 1], state)
            straight_states.append(state)
        state = model.begin_state(B, "cpu")
        for i in range(6):
            w = windows[i]
            start, end, _, _ = tbptt_bounds(i, k1, k2, len(windows.X))
            if start:
                for s, ref in zip(state, straight_states[start - 1]):
                    torch.testing.assert_close(s, ref)
            assert torch.equal(w.X, windows.X[start:end])
            _, state, _ = run_window(model, w.X, state, w.carry_at)


# -----------------------------------------------------------------------------
# full truncation


def test_full_truncation_on_text_trains_each_row_end_to_end_once_per_epoch(timemachine):
    text = timemachine[:1000]
    config = small(truncation="full", batch_size=4, max_steps=3)
    inputs = window_inputs(config, text)
    _, metrics, _ = run(config, text)
    assert [m.epoch for m in metrics] == [0, 1, 2]  # one window per epoch
    _, corpus = build_corpus(text, "char", "d2l")
    row = (len(corpus) - 1) // 4  # each of the 4 rows whole, not num_steps (8) at a time
    assert row > 200 and [len(X) for X, _ in inputs] == [row] * 3
    assert all(not s.any() for _, state in inputs for s in state)


def test_full_truncation_refuses_rows_longer_than_its_limit():
    text = "ab" * (FULL_MAX_STEPS + 10)
    with pytest.raises(ValueError, match=r"truncation full backpropagates .* rows must be 1 to 10000 tokens"):
        train(small(truncation="full", batch_size=1), text, lambda e: None)


# -----------------------------------------------------------------------------
# inside a synthetic task's sequences


@pytest.mark.parametrize("truncation, reaches_back", [("fixed", 4), ("full", 12), ("tbptt", 7), ("randomized", 12)])
def test_a_tasks_truncation_decides_how_far_back_the_loss_reaches(truncation, reaches_back):
    # The adding problem's loss is at the last step only: the input gradient is non-zero exactly
    # for the steps that the last window backpropagates through.
    torch.manual_seed(0)
    config = TrainConfig(num_steps=4, truncation=truncation, tbptt_k1=2, tbptt_k2=7, truncation_keep=0.999999)
    model = build_model("gru", 0, 6, 1, features=2, output_size=1)
    task = AddingTask(12)
    X, Y = task.sample(3, task_generator(0, "test"))
    X.requires_grad_(True)
    outputs = run_sequence(model, X, Truncation.of(config, 12), model.begin_state(3, "cpu"))
    assert outputs.shape == (12 * 3, 1)
    task.loss(outputs, Y).backward()
    reached = X.grad.abs().sum(dim=(1, 2)) > 0
    assert reached.tolist() == [False] * (12 - reaches_back) + [True] * reaches_back


def test_a_tasks_outputs_do_not_depend_on_the_truncation():
    torch.manual_seed(0)
    model = build_model("lstm", 0, 6, 2, features=2, output_size=1)
    X, _ = AddingTask(11).sample(2, task_generator(0, "x"))
    outs = [
        run_sequence(model, X, plan, model.begin_state(2, "cpu"))
        for plan in (Truncation(3, 3), Truncation(11, 11), Truncation(2, 5), Truncation(4, 4, 0.5))
    ]
    for out in outs[1:]:
        torch.testing.assert_close(out, outs[0])


def test_the_probe_profile_covers_the_last_window_of_a_task():
    events = []
    config = TrainConfig(dataset="builtin:adding", model="rnn", hidden_size=8, batch_size=4, seq_len=10, num_steps=4,
                         max_steps=2, probe_every=1, log_every=1, device="cpu")
    train(config, "", events.append)
    probes = [e for e in events if isinstance(e, Probe)]
    assert [p.step for p in probes] == [1, 2]
    assert [len(layer) for layer in probes[0].grad_through_time] == [2]  # 10 = 4 + 4 + 2


def test_tbptt_k2_below_k1_is_refused():
    with pytest.raises(ValueError, match=r"tbptt_k2 must be at least tbptt_k1 \(35\), got 10"):
        Truncation.of(TrainConfig(truncation="tbptt", tbptt_k2=10))
