"""What a job trains on: the held-out split of a text and its evaluation, and the synthetic tasks."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from gradserve.spec import min_tokens
from torch.nn.modules.module import register_module_forward_pre_hook

from gradserve_worker.data import build_corpus, heldout_windows, split_heldout
from gradserve_worker.models import RNNScratch, TorchRNN
from gradserve_worker.tasks import AddingTask, CopyTask, task_generator
from gradserve_worker.trainer import CheckpointReady, Evaluation, StepMetrics, TrainConfig, load_checkpoint, train


def small(**overrides) -> TrainConfig:
    base = {"model": "lstm", "hidden_size": 16, "batch_size": 4, "num_steps": 8, "preprocess": "d2l", "max_steps": 10,
            "log_every": 1, "checkpoint_every": 1000, "device": "cpu", "probe_every": 10**6}
    return TrainConfig(**{**base, **overrides})


def events_of(config: TrainConfig, text: str = "") -> list:
    events = []
    train(config, text, events.append)
    return events


# -----------------------------------------------------------------------------
# held-out text


def test_the_heldout_part_is_the_last_val_fraction_of_the_tokens():
    corpus = torch.arange(1000)
    train_part, heldout = split_heldout(corpus, 0.05)
    assert torch.equal(train_part, corpus[:950]) and torch.equal(heldout, corpus[950:])
    assert len(split_heldout(corpus, 0.0)[1]) == 0


def test_heldout_windows_cover_the_stream_in_order_with_the_state_carried():
    stream = torch.arange(100)
    windows = heldout_windows(stream, 4, 7)  # 4 rows of 24 tokens: windows of 7, 7, 7, 3
    assert [len(X) for X, _ in windows] == [7, 7, 7, 3]
    X = torch.cat([X for X, _ in windows])
    Y = torch.cat([Y for _, Y in windows])
    assert torch.equal(Y, X + 1)
    assert sorted(X.reshape(-1).tolist()) == list(range(96))  # every token but the tail that fills no row
    assert torch.equal(X[:, 1], X[:, 0] + 24)  # row b continues row b-1's text
    # A stream too short for batch_size rows of a window still gets one row.
    assert [X.shape for X, _ in heldout_windows(torch.arange(9), 32, 8)] == [(8, 1)]


def test_evaluation_is_the_mean_cross_entropy_over_the_heldout_tokens(timemachine, monkeypatch):
    text = timemachine[:4000]
    config = small(max_steps=4, val_fraction=0.1, eval_every=2)
    events = events_of(config, text)
    evaluations = [e for e in events if isinstance(e, Evaluation)]
    assert [e.step for e in evaluations] == [2, 4]
    _, corpus = build_corpus(text, "char", "d2l")
    _, heldout = split_heldout(corpus, 0.1)

    # Recompute the last evaluation with the checkpointed model: one sequential pass, state carried.
    [ckpt] = [e for e in events if isinstance(e, CheckpointReady) and e.latest]
    model = load_checkpoint(ckpt.data).model
    rows = min(4, (len(heldout) - 1) // 8)
    row_len = (len(heldout) - 1) // rows
    X = heldout[: rows * row_len].view(rows, row_len).T
    Y = heldout[1 : rows * row_len + 1].view(rows, row_len).T
    with torch.no_grad():
        logits, _ = model(X, model.begin_state(rows, "cpu"))
    expected = F.cross_entropy(logits, Y.reshape(-1)).item()
    last = evaluations[-1]
    assert last.loss == pytest.approx(expected, rel=1e-5)
    assert last.perplexity == pytest.approx(math.exp(expected), rel=1e-5)
    assert (last.metric, last.value, last.baseline) == ("", 0.0, 0.0)


def test_training_never_reads_the_heldout_tokens():
    # 1000 distinct words: word i has token id i + 1, so an input's id says where in the text it is.
    text = " ".join(f"w{i:05d}" for i in range(1000))
    trained_on = []

    def record(module, args):
        if isinstance(module, (RNNScratch, TorchRNN)) and module.training:
            trained_on.append(args[0].clone())

    handle = register_module_forward_pre_hook(record)
    try:
        events_of(small(tokenization="word", preprocess="none", val_fraction=0.1, max_steps=60, batch_size=2), text)
    finally:
        handle.remove()
    seen = torch.cat([X.reshape(-1) for X in trained_on])
    assert int(seen.max()) <= 900 - 1  # inputs come from words 0..898; word 899 is only ever a target
    assert int(seen.max()) > 800  # and the training part is used to its end


def test_val_fraction_0_runs_no_evaluation(timemachine):
    events = events_of(small(max_steps=3, val_fraction=0.0, eval_every=1), timemachine[:3000])
    assert not any(isinstance(e, Evaluation) for e in events)


def test_a_heldout_part_shorter_than_one_window_is_refused_with_the_rule(timemachine):
    # 3000 chars of d2l text hold out 5%, about 150 tokens: fine for num_steps 8, not for 200.
    text = timemachine[:3000]
    with pytest.raises(ValueError, match=r"val_fraction holds out \d+ tokens of \d+, fewer than num_steps \+ 1 = 201"):
        train(small(num_steps=200, batch_size=1, val_fraction=0.05), text, lambda e: None)


def test_the_training_part_must_hold_min_tokens(timemachine):
    # min_tokens counts the training part: the held-out tokens do not help.
    _, corpus = build_corpus(timemachine[:2000], "char", "d2l")
    B, T = 4, 300
    assert len(corpus) >= min_tokens(B, T) > len(split_heldout(corpus, 0.5)[0])
    refused = rf"after holding out \d+ for validation\), but batch_size 4 and a window of 300 need at least {min_tokens(B, T)}"
    with pytest.raises(ValueError, match=refused):
        train(small(batch_size=B, num_steps=T, val_fraction=0.5), timemachine[:2000], lambda e: None)


# -----------------------------------------------------------------------------
# synthetic tasks


def test_the_adding_problem_marks_one_value_in_each_half_and_sums_them():
    X, Y = AddingTask(20).sample(500, task_generator(0, "t"))
    assert X.shape == (20, 500, 2) and Y.shape == (500,)
    values, markers = X[..., 0], X[..., 1]
    assert ((values >= 0) & (values < 1)).all()
    assert (markers.sum(0) == 2).all()
    assert (markers[:10].sum(0) == 1).all() and (markers[10:].sum(0) == 1).all()
    torch.testing.assert_close(Y, (values * markers).sum(0))
    # Predicting 1.0 scores the variance of a sum of two uniforms: 1/6.
    assert AddingTask(20).baseline(Y) == pytest.approx(1 / 6, abs=0.02)


def test_copy_memory_shows_ten_symbols_waits_and_asks_for_them_back():
    task = CopyTask(15)
    X, Y = task.sample(300, task_generator(0, "t"))
    assert X.shape == (15 + 20, 300) and Y.shape == (10, 300)
    assert torch.equal(X[:10], Y) and ((Y >= 1) & (Y <= 8)).all()
    assert (X[10:24] == 0).all() and (X[24] == 9).all() and (X[25:] == 0).all()
    assert task.baseline(Y) == 1 / 8
    assert len(task.vocab) == 10


def test_task_batches_depend_only_on_seed_and_step():
    task = AddingTask(10)
    a = task.sample(4, task_generator(7, "train", 3))
    assert torch.equal(a[0], task.sample(4, task_generator(7, "train", 3))[0])
    assert not torch.equal(a[0], task.sample(4, task_generator(7, "train", 4))[0])
    assert not torch.equal(a[0], task.sample(4, task_generator(8, "train", 3))[0])


@pytest.mark.parametrize("dataset, metric", [("builtin:adding", "mse"), ("builtin:copy", "accuracy")])
def test_a_task_reports_its_loss_metric_and_baseline(dataset, metric):
    config = small(dataset=dataset, seq_len=12, num_steps=5, max_steps=4, eval_every=2, log_every=2)
    events = events_of(config, "")
    metrics = [e for e in events if isinstance(e, StepMetrics)]
    evaluations = [e for e in events if isinstance(e, Evaluation)]
    assert [e.step for e in evaluations] == [2, 4]
    for m in metrics:
        assert m.epoch == 0 and m.perplexity == 0.0 and m.loss > 0
        assert m.tokens_per_sec > 0
    for e in evaluations:
        assert e.metric == metric and e.perplexity == 0.0
        if metric == "mse":
            assert e.value == pytest.approx(e.loss) and e.baseline == pytest.approx(1 / 6, abs=0.03)
        else:
            assert 0 <= e.value <= 1 and e.baseline == 1 / 8
            assert e.loss == pytest.approx(math.log(8), rel=0.3)  # an untrained model is near uniform


def test_a_task_sees_fresh_sequences_every_step_starting_from_zeros():
    states, inputs = [], []

    def record(module, args):
        if isinstance(module, (RNNScratch, TorchRNN)) and module.training:
            inputs.append(args[0].clone())
            states.append(args[1])

    handle = register_module_forward_pre_hook(record)
    try:
        events_of(small(dataset="builtin:adding", seq_len=6, num_steps=6, max_steps=3, val_fraction=0.0))
    finally:
        handle.remove()
    assert len(inputs) == 3
    assert all(not s.any() for state in states for s in state)
    assert not torch.equal(inputs[0], inputs[1])


def test_full_truncation_learns_the_adding_problem_below_its_baseline():
    config = TrainConfig(dataset="builtin:adding", model="gru", hidden_size=32, batch_size=32, seq_len=10,
                         truncation="full", optimizer="adam", lr=0.01, max_steps=300, log_every=50, eval_every=300,
                         probe_every=10**6, device="cpu")
    [final] = [e for e in events_of(config) if isinstance(e, Evaluation)]
    assert final.value < 0.2 * final.baseline


def test_a_task_checkpoint_opens_with_the_tasks_model():
    events = events_of(small(dataset="builtin:adding", seq_len=6, max_steps=2))
    [ckpt] = [e for e in events if isinstance(e, CheckpointReady) and e.latest]
    model, vocab, config, state = load_checkpoint(ckpt.data)
    assert vocab == [] and state == () and config.dataset == "builtin:adding"
    out, _ = model(torch.rand(6, 3, 2), model.begin_state(3, "cpu"))
    assert out.shape == (18, 1)


def test_every_model_and_task_the_spec_names_is_built_here_as_the_spec_describes_it():
    from gradserve import spec

    from gradserve_worker.models import build_model
    from gradserve_worker.tasks import SYNTHETIC

    for name, facts in spec.MODELS.items():
        model = build_model(name, vocab_size=5, hidden_size=4, num_layers=1)
        weights = sum(p.numel() for p in model.parameters())
        described = spec.complete(spec.jobs_pb2.JobSpec(dataset="builtin:pydocs", model=name, hidden_size=4))
        assert weights == spec.parameter_count(described, 5), name
    assert set(SYNTHETIC) == set(spec.TASKS)
    for name, facts in spec.TASKS.items():
        task = SYNTHETIC[name](seq_len=30)
        assert task.length == 30 + facts.extra_steps, name
        assert (len(task.vocab) or task.sizes["features"]) == facts.symbols, name
