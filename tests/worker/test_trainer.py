"""The training loop: truncated BPTT, clipping, metrics, divergence, checkpoints and resume.

Most tests watch a real train() call from outside, through torch's global
module and optimizer hooks, so what they check is the code path jobs run.
"""

from __future__ import annotations

import io
import math
from contextlib import contextmanager
from dataclasses import asdict, astuple, fields

import pytest
import torch
import torch.nn.functional as F
from gradserve import spec as specs
from gradserve.v1 import jobs_pb2
from torch.nn.modules.module import register_module_forward_hook, register_module_forward_pre_hook
from torch.optim.optimizer import register_optimizer_step_pre_hook

from gradserve_worker.models import RNNScratch, TorchRNN, build_model
from gradserve_worker.trainer import (
    CheckpointReady,
    Evaluation,
    Probe,
    StepMetrics,
    TrainConfig,
    TrainingDiverged,
    TrainResult,
    load_checkpoint,
    train,
)
from gradserve_worker.truncation import detach_state

MODELS = (RNNScratch, TorchRNN)


def small(**overrides) -> TrainConfig:
    """A config that trains in milliseconds per step, with no held-out pass unless asked for."""
    base = {"model": "lstm", "hidden_size": 16, "batch_size": 4, "num_steps": 8, "preprocess": "d2l", "max_steps": 10}
    quiet = {"val_fraction": 0.0, "probe_every": 10**6}
    return TrainConfig(**{**base, "log_every": 1, "checkpoint_every": 1000, "device": "cpu", **quiet, **overrides})


def run(config: TrainConfig, text: str, **kwargs) -> tuple[TrainResult, list[StepMetrics], list[CheckpointReady]]:
    events = []
    result = train(config, text, events.append, **kwargs)
    assert all(isinstance(e, (StepMetrics, CheckpointReady, Evaluation, Probe)) for e in events)
    return (
        result,
        [e for e in events if isinstance(e, StepMetrics)],
        [e for e in events if isinstance(e, CheckpointReady)],
    )


@contextmanager
def watching_windows():
    """Record (model, X, state in, state out) for every window the trainer's model runs on."""
    calls = []

    def before(module, args):
        if isinstance(module, MODELS):
            X, state = args
            calls.append({"model": module, "X": X.clone(), "state_in": state})

    def after(module, args, output):
        if isinstance(module, MODELS):
            calls[-1]["state_out"] = output[1]

    handles = [register_module_forward_pre_hook(before), register_module_forward_hook(after)]
    try:
        yield calls
    finally:
        for h in handles:
            h.remove()


def unique_words(n: int) -> tuple[str, dict[int, int]]:
    """A text of n distinct words, and token id -> position in the text.

    Every word occurs once, so the vocabulary orders them by spelling and each
    token id names exactly one place in the corpus.
    """
    words = [f"w{i:05d}" for i in range(n)]
    return " ".join(words), {1 + i: i for i in range(n)}


# -----------------------------------------------------------------------------
# truncated BPTT


@pytest.mark.parametrize("kind", ["rnn_scratch", "lstm"])
def test_no_gradient_crosses_a_window_boundary(kind):
    torch.manual_seed(0)
    model = build_model(kind, 10, 8, 1)
    X1, X2 = torch.randint(0, 10, (2, 6, 3))

    def window_2_reaches_window_1(detach):
        state = detach_state(model.begin_state(3, "cpu"))
        _, state = model(X1, state)
        reached = []
        for s in state:  # a hook on window 1's outgoing state fires iff backprop reaches it
            s.register_hook(lambda g: reached.append(g))
        state_in = detach_state(state) if detach else state
        logits, _ = model(X2, state_in)
        F.cross_entropy(logits, X2.reshape(-1)).backward()
        return state_in, reached

    state_in, reached = window_2_reaches_window_1(detach=True)
    assert reached == []
    assert all(s.grad_fn is None and not s.requires_grad for s in state_in)
    # The same without the detach does backprop into window 1: the check above can fail.
    assert window_2_reaches_window_1(detach=False)[1]


def test_sequential_partition_carries_the_state_and_random_resets_it():
    text, position = unique_words(600)
    B, T = 4, 6

    with watching_windows() as calls:
        _, metrics, _ = run(
            small(partition="sequential", tokenization="word", preprocess="none", batch_size=B, num_steps=T), text
        )
    assert all(m.epoch == 0 for m in metrics)  # 600 words hold ~24 windows: no epoch boundary here
    places = [call["X"].apply_(position.get) for call in calls]
    for i in range(1, len(calls)):
        for s_in, s_out in zip(calls[i]["state_in"], calls[i - 1]["state_out"]):
            assert torch.equal(s_in, s_out)  # the state leaving window i-1 enters window i ...
            assert s_in.grad_fn is None and not s_in.requires_grad  # ... detached
        assert torch.equal(places[i][0], places[i - 1][-1] + 1)  # and window i is the text right after window i-1
    assert all(not s.any() for s in calls[0]["state_in"])

    with watching_windows() as calls:
        run(small(partition="random", tokenization="word", preprocess="none", batch_size=B, num_steps=T), text)
    assert len(calls) == 10
    for call in calls:
        assert all(not s.any() for s in call["state_in"])  # zeros for every minibatch
        assert any(s.any() for s in call["state_out"])


def test_sequential_partition_restarts_from_zeros_at_each_epoch():
    text, _ = unique_words(200)  # 200 words, batch 4 × 6: 8 windows an epoch
    with watching_windows() as calls:
        _, metrics, _ = run(
            small(tokenization="word", preprocess="none", batch_size=4, num_steps=6, max_steps=20), text
        )
    epochs = [m.epoch for m in metrics]
    assert epochs[0] == 0 and epochs[-1] >= 2
    for i, m in enumerate(metrics):
        starts_epoch = i == 0 or metrics[i - 1].epoch != m.epoch
        assert all(not s.any() for s in calls[i]["state_in"]) == starts_epoch


# -----------------------------------------------------------------------------
# gradients and clipping


def test_clipping_bounds_the_update_and_metrics_report_the_norm_before_it(timemachine):
    clip = 0.02  # well below this model's gradient norms, so clipping fires at every step
    post_clip = []

    def before_step(optimizer, args, kwargs):
        grads = [p.grad for group in optimizer.param_groups for p in group["params"]]
        post_clip.append((torch.linalg.vector_norm(torch.stack([g.norm() for g in grads])).item(), grads))

    handle = register_optimizer_step_pre_hook(before_step)
    try:
        with watching_windows() as calls:
            _, metrics, _ = run(small(clip_norm=clip, max_steps=6), timemachine[:5000])
    finally:
        handle.remove()

    names = [n for n, _ in calls[0]["model"].named_parameters()]
    assert len(post_clip) == len(metrics) == 6
    for m, (norm_after, grads) in zip(metrics, post_clip):
        assert m.grad_norm > clip and m.clipped  # pre-clip: above the threshold ...
        assert norm_after <= clip * (1 + 1e-5)  # ... while the step used clipped gradients
        assert norm_after == pytest.approx(clip, rel=1e-4)
        assert list(m.param_grad_norms) == names
        assert math.sqrt(sum(v * v for v in m.param_grad_norms.values())) == pytest.approx(m.grad_norm, rel=1e-5)
        scale = norm_after / m.grad_norm  # clipping scales every gradient by the same factor
        for name, g in zip(names, grads):
            assert g.norm().item() == pytest.approx(m.param_grad_norms[name] * scale, rel=1e-4, abs=1e-12)
    assert all(m.clip_fraction == 1.0 for m in metrics)


def test_clip_norm_0_leaves_gradients_alone_but_still_reports_their_norm(timemachine):
    post_clip = []

    def before_step(optimizer, args, kwargs):
        grads = [p.grad for group in optimizer.param_groups for p in group["params"]]
        post_clip.append(torch.linalg.vector_norm(torch.stack([g.norm() for g in grads])).item())

    handle = register_optimizer_step_pre_hook(before_step)
    try:
        _, metrics, _ = run(small(clip_norm=0.0, max_steps=4), timemachine[:5000])
    finally:
        handle.remove()
    for m, norm_after in zip(metrics, post_clip):
        assert m.grad_norm > 0 and not m.clipped and m.clip_fraction == 0.0
        assert norm_after == pytest.approx(m.grad_norm, rel=1e-5)


def test_clip_fraction_counts_the_steps_of_the_interval_that_clipped(timemachine):
    # This model's gradient norms wander around 0.22-0.36, so a threshold in between clips some steps only.
    config = small(max_steps=12, clip_norm=0.27)
    _, per_step, _ = run(config, timemachine[:5000])
    _, per_4, _ = run(small(**{**asdict(config), "log_every": 4}), timemachine[:5000])
    assert any(0 < m.clip_fraction < 1 for m in per_4)
    for i, m in enumerate(per_4):
        interval = per_step[4 * i : 4 * i + 4]
        assert m.clip_fraction == sum(s.clipped for s in interval) / 4
        assert m.clipped == interval[-1].clipped and m.grad_norm == interval[-1].grad_norm
        assert [s.clipped for s in interval] == [s.grad_norm > 0.27 for s in interval]


# -----------------------------------------------------------------------------
# metrics


def test_perplexity_is_exp_of_the_intervals_mean_cross_entropy(timemachine, monkeypatch):
    seen = []
    real = F.cross_entropy

    def recording(logits, target, *args, **kwargs):
        seen.append((logits.detach().clone(), target.clone()))
        return real(logits, target, *args, **kwargs)

    monkeypatch.setattr(torch.nn.functional, "cross_entropy", recording)
    _, metrics, _ = run(small(max_steps=10, log_every=4), timemachine[:5000])

    assert [m.step for m in metrics] == [4, 8, 10]  # every log_every steps, and at the last step
    token_ce = [  # per-token cross-entropy, recomputed in float64 from the logits and targets
        -torch.log_softmax(logits.double(), -1).gather(1, target.unsqueeze(1)).squeeze(1) for logits, target in seen
    ]
    for m, (lo, hi) in zip(metrics, [(0, 4), (4, 8), (8, 10)]):
        expected = torch.cat(token_ce[lo:hi]).mean().item()
        assert m.loss == pytest.approx(expected, rel=1e-6)
        assert m.perplexity == pytest.approx(math.exp(expected), rel=1e-6)
        assert m.tokens_per_sec > 0 and m.lr == 1.0


def test_a_small_model_learns_the_time_machine(timemachine):
    config = TrainConfig(
        model="rnn_scratch",
        hidden_size=64,
        preprocess="d2l",
        batch_size=32,
        num_steps=35,
        max_steps=200,
        log_every=20,
        optimizer="sgd",
        lr=1.0,
        clip_norm=1.0,
        device="cpu",
    )
    result, metrics, _ = run(config, timemachine)
    first_step = train(TrainConfig(**{**asdict(config), "max_steps": 1}), timemachine, lambda e: None)
    assert first_step.perplexity == pytest.approx(28, rel=0.02)  # a fresh model guesses uniformly over 28 tokens
    assert metrics[-1].perplexity < 12  # and 200 steps teach it letter frequencies and common pairs
    assert [m.perplexity for m in metrics[-3:]] < [metrics[0].perplexity] * 3
    assert result.steps == 200 and not result.stopped and result.perplexity == metrics[-1].perplexity


# -----------------------------------------------------------------------------
# failures


@pytest.mark.parametrize("where, what", [("logits", "loss"), ("gradient", "gradient norm")])
def test_a_non_finite_loss_or_gradient_stops_training_naming_the_step(timemachine, where, what):
    calls = []

    def poison_third_window(module, args, output):
        if isinstance(module, MODELS):
            calls.append(1)
            logits, state = output
            if len(calls) == 3:
                if where == "logits":
                    return logits * math.inf, state
                logits.register_hook(lambda g: g * math.nan)
            return output

    handle = register_module_forward_hook(poison_third_window)
    events = []
    try:
        with pytest.raises(TrainingDiverged) as err:
            train(small(max_steps=10, checkpoint_every=1), timemachine[:5000], events.append)
    finally:
        handle.remove()
    assert err.value.step == 3
    assert f"{what} became nan at step 3; try a lower lr" in str(err.value)
    assert [e.step for e in events if isinstance(e, StepMetrics)] == [1, 2]  # nothing reported for step 3


def test_text_too_short_for_one_minibatch_is_refused_with_the_numbers():
    with pytest.raises(ValueError, match=r"has 30 char tokens to train on .* batch_size 32 and a window of 35 need at least 1155"):
        train(TrainConfig(device="cpu", val_fraction=0), "abc" * 10, lambda e: None)


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_cuda_on_a_machine_without_it_is_refused():
    with pytest.raises(ValueError, match="device 'cuda' was requested but this worker has no CUDA GPU"):
        train(TrainConfig(device="cuda"), "abc" * 1000, lambda e: None)


def test_a_config_outside_the_spec_is_refused():
    with pytest.raises(ValueError, match=r"batch_size must be in \[1, 4096\], got 0"):
        train(TrainConfig(batch_size=0, device="cpu"), "abc" * 1000, lambda e: None)


# -----------------------------------------------------------------------------
# stopping, checkpoints and resume


def test_should_stop_ends_the_run_early_with_a_final_checkpoint(timemachine):
    asked = []

    def should_stop():
        asked.append(1)
        return len(asked) >= 7

    result, metrics, checkpoints = run(
        small(max_steps=100, log_every=5, checkpoint_every=5), timemachine[:5000], should_stop=should_stop
    )
    assert result.stopped and result.steps == 7 and len(asked) == 7  # asked once per step
    assert [m.step for m in metrics] == [5, 7]
    assert [c.step for c in checkpoints] == [5, 7]
    assert result.loss == metrics[-1].loss
    resumed, more, _ = run(small(max_steps=9), timemachine[:5000], resume=checkpoints[-1].data)
    assert [m.step for m in more] == [8, 9] and resumed.steps == 9 and not resumed.stopped


def test_checkpoints_come_every_checkpoint_every_steps_and_at_the_end(timemachine):
    _, _, checkpoints = run(small(max_steps=11, checkpoint_every=4), timemachine[:5000])
    assert [c.step for c in checkpoints] == [4, 8, 11]
    payload = torch.load(io.BytesIO(checkpoints[-1].data), weights_only=True)
    assert {"model", "optimizer", "state", "step", "epoch", "position", "rng", "config", "vocab"} <= set(payload)
    assert payload["step"] == 11 and payload["config"]["max_steps"] == 11


@pytest.mark.parametrize(
    "model, optimizer, partition, extra",
    [
        ("lstm", "sgd", "sequential", {}),
        ("gru", "adam", "random", {}),
        ("rnn_scratch", "adam", "sequential", {}),
        # The lr schedule, randomized truncation's and dropout's draws from the RNG, the held-out
        # passes and the probes (whose power-iteration vectors the checkpoint keeps) must all continue exactly.
        ("lstm", "adamw", "sequential", {"schedule": "step", "lr_step_every": 7, "weight_decay": 0.01,
                                         "truncation": "randomized", "truncation_keep": 0.7, "dropout": 0.3,
                                         "num_layers": 2, "val_fraction": 0.1, "eval_every": 3, "probe_every": 4}),
        ("rnn", "sgd", "sequential", {"truncation": "tbptt", "tbptt_k1": 5, "tbptt_k2": 9, "embedding_size": 6}),
        ("gru", "adam", "random", {"dataset": "builtin:copy", "seq_len": 6, "eval_every": 5, "dropout": 0.2}),
        # pytorch/examples' recipe: its initialisation, embedding dropout's draws, tied weights, lr cut on a plateau.
        ("lstm", "sgd", "sequential", {"init": "uniform", "embedding_size": 16, "tie_weights": True,
                                       "embedding_dropout": 0.2, "dropout": 0.2, "schedule": "plateau", "lr": 5.0,
                                       "lr_gamma": 0.5, "val_fraction": 0.1, "eval_every": 1}),
    ],
    ids=["lstm", "gru", "rnn_scratch", "schedule-randomized-dropout-validation-probes", "tbptt", "copy-task",
         "word-language-model-recipe"],
)
def test_resuming_from_a_checkpoint_continues_bit_for_bit(timemachine, model, optimizer, partition, extra):
    text = timemachine[:300]  # 8 windows an epoch: the checkpoint is mid-epoch, the rest crosses epochs
    config = small(model=model, optimizer=optimizer, partition=partition, max_steps=20, log_every=1, **extra)

    def reports(events):
        return [(type(e).__name__, *((e.step, e.epoch, e.loss, e.grad_norm, e.lr) if isinstance(e, StepMetrics)
                                      else astuple(e))) for e in events if not isinstance(e, CheckpointReady)]

    straight, first, rest = [], [], []
    train(config, text, straight.append)
    train(small(**{**asdict(config), "max_steps": 10, "checkpoint_every": 10}), text, first.append)
    [half] = [e for e in first if isinstance(e, CheckpointReady) and e.latest]
    train(config, text, rest.append, resume=half.data)
    end, resumed_end = ([e for e in events if isinstance(e, CheckpointReady)][-1] for events in (straight, rest))

    assert half.step == 10 and resumed_end.step == end.step == 20
    if "dataset" not in extra:
        assert len({e.epoch for e in straight[10:] if isinstance(e, StepMetrics)}) > 1
    got, expected = reports(first) + reports(rest), reports(straight)
    if ("Evaluation", 10) not in [r[:2] for r in expected]:
        # The first run ends at step 10, so it evaluates there whether or not eval_every says so.
        got = [r for r in got if r[:2] != ("Evaluation", 10)]
    assert got == expected
    a, b = (torch.load(io.BytesIO(c.data), weights_only=True) for c in (end, resumed_end))
    assert a["model"].keys() == b["model"].keys()
    for name in a["model"]:
        assert torch.equal(a["model"][name], b["model"][name]), name
    for s, t in zip(a["state"], b["state"]):
        assert torch.equal(s, t)


def test_resume_refuses_a_checkpoint_of_a_different_model(timemachine):
    _, _, [ckpt] = run(small(max_steps=2), timemachine[:5000])
    with pytest.raises(ValueError, match="hidden_size=16 but this job has hidden_size=32"):
        train(small(hidden_size=32), timemachine[:5000], lambda e: None, resume=ckpt.data)


def test_bytes_that_are_not_a_checkpoint_are_refused(timemachine):
    with pytest.raises(ValueError, match="not a readable checkpoint"):
        train(small(), timemachine[:5000], lambda e: None, resume=b"certainly not a zip file")
    with pytest.raises(ValueError, match="not a readable checkpoint"):
        load_checkpoint(b"")


def test_load_checkpoint_gives_the_trained_model_its_vocabulary_and_config(timemachine):
    config = small(max_steps=3)
    with watching_windows() as calls:
        _, _, [ckpt] = run(config, timemachine[:5000])
    model, vocab, loaded_config, state = load_checkpoint(ckpt.data)
    assert loaded_config == config
    assert vocab[0] == "<unk>" and len(vocab) == 28
    assert not model.training
    trained = dict(calls[-1]["model"].named_parameters())
    for name, p in model.named_parameters():
        assert torch.equal(p, trained[name]), name
    assert [s.shape for s in state] == [(1, 4, 16)] * 2


# -----------------------------------------------------------------------------
# configuration


def test_config_defaults_are_the_specs():
    config = TrainConfig()
    for f in specs.FIELDS:
        assert getattr(config, f.name) == f.default, f.name


def test_config_from_a_complete_spec_carries_every_field():
    spec = specs.complete(jobs_pb2.JobSpec(dataset="builtin:pydocs"))
    config = TrainConfig.from_spec(spec)
    proto_fields = [f.name for f in jobs_pb2.JobSpec.DESCRIPTOR.fields]
    assert [f.name for f in fields(TrainConfig)] == proto_fields
    for name in proto_fields:
        assert getattr(config, name) == getattr(spec, name), name
    assert config.lr == specs.DEFAULT_LR["sgd"]


def test_config_from_spec_keeps_values_that_are_not_defaults():
    spec = jobs_pb2.JobSpec(
        dataset="ds-" + "0" * 64,
        tokenization="word",
        preprocess="d2l",
        model="gru",
        hidden_size=7,
        num_layers=3,
        batch_size=5,
        num_steps=9,
        partition="random",
        max_steps=123,
        optimizer="adam",
        lr=0.25,
        clip_norm=0.0,
        seed=99,
        device="cpu",
        log_every=3,
        checkpoint_every=4,
        min_freq=2,
        nonlinearity="relu",
        truncation="tbptt",
        tbptt_k1=4,
        tbptt_k2=11,
        truncation_keep=0.5,
        dropout=0.25,
        embedding_size=12,
        val_fraction=0.2,
        eval_every=7,
        weight_decay=0.01,
        schedule="cosine",
        lr_step_every=6,
        lr_gamma=0.5,
        probe_every=8,
        seq_len=17,
        on_nonfinite="skip",
        eos=True,
        init="chrono",
        init_range=0.3,
        max_dependency=40,
        embedding_dropout=0.1,
        tie_weights=True,
        min_lr=0.01,
        truncation_tolerance=0.05,
        min_num_steps=3,
        max_num_steps=30,
    )
    config = TrainConfig.from_spec(spec)
    for f in jobs_pb2.JobSpec.DESCRIPTOR.fields:
        assert getattr(config, f.name) == getattr(spec, f.name), f.name
    assert config.clip_norm == 0.0  # set to 0, not unset: clipping off
    assert TrainConfig.from_spec(jobs_pb2.JobSpec()).lr is None  # unset: the optimizer's default applies
