"""The captured training step (graphstep): its code equals the eager step's, and on CUDA its replays do too.

On the CPU graphstep's step runs uncaptured (train(step_path="static")), which
must reproduce the eager step bit for bit: the same losses, norms and clip
decisions at every step, the same weights, optimizer state and carried state
after. The tests marked cuda hold the captured replays to the eager step
within float32 rounding; they run only where torch sees a GPU (make gpu-check).
"""

from __future__ import annotations

import io
import math
from dataclasses import astuple

import pytest
import torch
from torch.nn.modules.module import register_module_forward_hook

from gradserve_worker.graphstep import WARMUP_STEPS
from gradserve_worker.models import RNNScratch, TorchRNN
from gradserve_worker.trainer import CheckpointReady, StepMetrics, TrainConfig, TrainingDiverged, train

BASE = {"hidden_size": 8, "batch_size": 4, "num_steps": 6, "preprocess": "d2l", "log_every": 1, "val_fraction": 0.0,
        "probe_every": 10**6, "clip_norm": 0.5}
MODELS = ["rnn_scratch", "rnn", "gru", "lstm"]
TRUNCATIONS = {
    "fixed": {},
    "full": {"truncation": "full"},
    "randomized": {"truncation": "randomized", "truncation_keep": 0.6},
    "tbptt": {"truncation": "tbptt", "tbptt_k1": 3, "tbptt_k2": 7},
}
OPTIMIZERS = {
    "sgd": {"optimizer": "sgd", "lr": 1.0},
    "adam": {"optimizer": "adam", "lr": 0.01, "weight_decay": 0.01, "schedule": "step", "lr_step_every": 3},
    "adamw": {"optimizer": "adamw", "lr": 0.01, "weight_decay": 0.1, "schedule": "cosine"},
}


def config(device: str = "cpu", **overrides) -> TrainConfig:
    return TrainConfig(**{**BASE, "device": device, **overrides})


def trained(config: TrainConfig, text: str, step_path: str) -> tuple[list, dict]:
    """(every report but checkpoints, the last checkpoint's contents) of a run."""
    events = []
    train(config, text, events.append, step_path=step_path)
    [*_, last] = [e for e in events if isinstance(e, CheckpointReady)]
    reports = [e for e in events if not isinstance(e, CheckpointReady)]
    return reports, torch.load(io.BytesIO(last.data), weights_only=True)


def numbers(report) -> tuple:
    if isinstance(report, StepMetrics):
        return (report.step, report.epoch, report.loss, report.grad_norm, report.clipped, report.clip_fraction,
                report.lr, report.param_grad_norms, report.tokens)
    return astuple(report)


def assert_same_tensors(a, b, path="") -> None:
    """Exactly equal nested checkpoint contents: tensors bit for bit, everything else by ==."""
    if isinstance(a, torch.Tensor):
        assert torch.equal(a, b), path
    elif isinstance(a, dict):
        assert a.keys() == b.keys(), path
        for k in a:
            assert_same_tensors(a[k], b[k], f"{path}/{k}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), path
        for i, (x, y) in enumerate(zip(a, b)):
            assert_same_tensors(x, y, f"{path}/{i}")
    else:
        assert a == b, path


def assert_static_equals_eager(cfg: TrainConfig, text: str) -> None:
    eager_reports, eager_end = trained(cfg, text, "eager")
    static_reports, static_end = trained(cfg, text, "static")
    assert [numbers(r) for r in static_reports] == [numbers(r) for r in eager_reports]
    assert_same_tensors(static_end["model"], eager_end["model"], "model")
    assert_same_tensors(static_end["optimizer"], eager_end["optimizer"], "optimizer")
    assert_same_tensors(static_end["state"], eager_end["state"], "state")
    assert static_end["rng"]["torch"].equal(eager_end["rng"]["torch"])
    assert {r.step_path for r in static_reports if isinstance(r, StepMetrics)} == {"static"}


# -----------------------------------------------------------------------------
# on the CPU: the static formulation is the eager step


@pytest.mark.parametrize("truncation", TRUNCATIONS)
@pytest.mark.parametrize("model", MODELS)
def test_the_static_step_equals_the_eager_step_for_every_model_and_truncation(timemachine, model, truncation):
    # Each optimizer (and its schedule) meets every model and every truncation.
    optimizer = list(OPTIMIZERS)[(MODELS.index(model) + list(TRUNCATIONS).index(truncation)) % len(OPTIMIZERS)]
    cfg = config(model=model, num_layers=2 if model in ("gru", "lstm") else 1, max_steps=10,
                 **TRUNCATIONS[truncation], **OPTIMIZERS[optimizer])
    assert_static_equals_eager(cfg, timemachine[:200])  # 8 windows an epoch: the state restarts in between


@pytest.mark.parametrize("extra", [
    # Dropout draws from the RNG inside the step; the random partition resets the state at every window;
    # probes and held-out passes run between steps; a synthetic task feeds fresh sequences.
    {"model": "rnn_scratch", "dropout": 0.3, "partition": "random", "probe_every": 3, "val_fraction": 0.1,
     "eval_every": 4},
    {"model": "gru", "dropout": 0.2, "embedding_size": 5, "log_every": 4, "clip_norm": 0.05},
    {"model": "lstm", "dataset": "builtin:adding", "seq_len": 8, "truncation": "randomized", "eval_every": 5},
    {"model": "rnn", "dataset": "builtin:copy", "seq_len": 5, "truncation": "tbptt", "tbptt_k1": 4, "tbptt_k2": 6,
     "num_layers": 2, "clip_norm": 0.0},
    # pytorch/examples' recipe: tied weights (one Parameter in two modules), embedding dropout's draws.
    {"model": "lstm", "embedding_size": 16, "hidden_size": 16, "tie_weights": True, "init": "uniform",
     "embedding_dropout": 0.2, "probe_every": 3},
], ids=["dropout-random-probes-eval", "intervals-embedding", "adding", "copy-tbptt-no-clip", "tied-recipe"])
def test_the_static_step_equals_the_eager_step_with_dropout_probes_evaluations_and_tasks(timemachine, extra):
    assert_static_equals_eager(config(max_steps=8, **extra), timemachine[:400])


def test_a_static_run_resumes_eagerly_and_an_eager_one_statically(timemachine):
    text, cfg = timemachine[:400], config(model="gru", optimizer="adam", lr=0.01, max_steps=12)
    straight, end = trained(cfg, text, "eager")
    for first, second in (("static", "eager"), ("eager", "static")):
        events = []
        train(config(**{**BASE, "model": "gru", "optimizer": "adam", "lr": 0.01, "max_steps": 6}), text,
              events.append, step_path=first)
        [half] = [e for e in events if isinstance(e, CheckpointReady) and e.latest]
        rest = []
        train(cfg, text, rest.append, resume=half.data, step_path=second)
        assert [numbers(r) for r in events + rest if isinstance(r, StepMetrics)] == [numbers(r) for r in straight]
        resumed_end = torch.load(io.BytesIO(rest[-1].data), weights_only=True)
        assert_same_tensors(resumed_end["model"], end["model"], "model")
        assert_same_tensors(resumed_end["optimizer"], end["optimizer"], "optimizer")


def test_a_non_finite_loss_fails_the_static_run_naming_its_step(timemachine):
    calls = []

    def poison_third_window(module, args, output):
        if isinstance(module, (RNNScratch, TorchRNN)):
            calls.append(1)
            if len(calls) == 3:
                return output[0] * math.inf, output[1]
        return None

    handle = register_module_forward_hook(poison_third_window)
    events = []
    try:
        with pytest.raises(TrainingDiverged) as err:
            train(config(model="lstm", max_steps=10, log_every=5, checkpoint_every=2), timemachine[:2000],
                  events.append, step_path="static")
    finally:
        handle.remove()
    # The static step finds out at the next report (the checkpoint due at step 4), and reports nothing from there.
    assert err.value.step == 3 and "loss became nan at step 3" in str(err.value)
    assert [e.step for e in events] == [2]


def test_metrics_say_which_step_ran_and_why(timemachine):
    for step_path, extra, path, why in [
        ("auto", {}, "eager", "graphs are captured on CUDA only"),
        ("static", {"on_nonfinite": "skip"}, "eager", "on_nonfinite=skip decides on the host"),
        ("static", {"model": "lstm", "num_layers": 2, "dropout": 0.1}, "eager", "cuDNN draws the dropout"),
        ("static", {"schedule": "plateau", "val_fraction": 0.1}, "eager", "schedule=plateau sets lr"),
        ("static", {"truncation": "auto"}, "eager", "truncation=auto changes the window"),
        ("static", {"model": "lstm", "num_layers": 2, "dropout": 0.1, "truncation": "randomized"}, "static",
         "graphs are captured on CUDA only"),
    ]:
        events = []
        train(config(max_steps=2, **extra), timemachine[:2000], events.append, step_path=step_path)
        metrics = [e for e in events if isinstance(e, StepMetrics)]
        assert {m.step_path for m in metrics} == {path}, extra
        assert all(m.step_path_reason.startswith(why) for m in metrics), (extra, metrics[0].step_path_reason)


def test_an_unknown_step_path_is_refused(timemachine):
    with pytest.raises(ValueError, match="step_path must be one of auto, eager, static, got 'graph'"):
        train(config(max_steps=1), timemachine[:2000], lambda e: None, step_path="graph")


# -----------------------------------------------------------------------------
# on CUDA: the captured replays are the eager step

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="torch sees no CUDA GPU")
CUDA_STEPS = 50


def assert_captured_close_to_eager(cfg: TrainConfig, text: str) -> None:
    eager_reports, eager_end = trained(cfg, text, "eager")
    captured_reports, captured_end = trained(cfg, text, "auto")
    metrics = [r for r in captured_reports if isinstance(r, StepMetrics)]
    assert {m.step_path for m in metrics} == {"captured"}
    eager_metrics = [r for r in eager_reports if isinstance(r, StepMetrics)]
    assert [m.step for m in metrics] == [m.step for m in eager_metrics]
    for m, e in zip(metrics, eager_metrics):
        assert m.loss == pytest.approx(e.loss, rel=1e-4, abs=1e-5), m.step
        assert m.grad_norm == pytest.approx(e.grad_norm, rel=1e-3, abs=1e-5), m.step
    for name, weights in eager_end["model"].items():
        torch.testing.assert_close(captured_end["model"][name], weights, rtol=1e-4, atol=1e-5, msg=name)
    for s, t in zip(captured_end["state"], eager_end["state"]):
        torch.testing.assert_close(s, t, rtol=1e-4, atol=1e-5)


@pytest.mark.cuda
@cuda
@pytest.mark.parametrize("optimizer", OPTIMIZERS)
@pytest.mark.parametrize("truncation", TRUNCATIONS)
@pytest.mark.parametrize("model", MODELS)
def test_the_captured_step_equals_the_eager_step_on_cuda(timemachine, model, truncation, optimizer):
    cfg = config("cuda", model=model, hidden_size=32, batch_size=8, num_steps=10, max_steps=CUDA_STEPS,
                 num_layers=1 if model == "rnn_scratch" else 2, **TRUNCATIONS[truncation], **OPTIMIZERS[optimizer])
    assert_captured_close_to_eager(cfg, timemachine[:2000])  # 25 windows an epoch; full truncation's rows: 250 steps


@pytest.mark.cuda
@cuda
@pytest.mark.parametrize("extra", [
    {"model": "rnn_scratch", "dropout": 0.3, "probe_every": 7, "val_fraction": 0.1, "eval_every": 10},
    {"model": "lstm", "dataset": "builtin:adding", "seq_len": 12, "truncation": "randomized", "optimizer": "adam",
     "lr": 0.01},
    {"model": "gru", "dataset": "builtin:copy", "seq_len": 6, "partition": "random", "embedding_size": 8},
], ids=["dropout-probes-eval", "adding-randomized", "copy"])
def test_the_captured_step_equals_the_eager_step_on_cuda_with_dropout_probes_and_tasks(timemachine, extra):
    cfg = config("cuda", hidden_size=32, batch_size=8, num_steps=10, max_steps=CUDA_STEPS, **extra)
    assert_captured_close_to_eager(cfg, timemachine[:2000])


@pytest.mark.cuda
@cuda
def test_steps_between_reports_never_wait_for_the_gpu(timemachine):
    """Once a shape is captured, a step that reports nothing launches its graph and moves on."""
    max_steps = 30
    cfg = config("cuda", model="lstm", hidden_size=32, max_steps=max_steps, log_every=max_steps,
                 checkpoint_every=max_steps)
    steps = []

    def should_stop() -> bool:  # asked after each step's launch
        steps.append(1)
        # From the step after the capture to the last but one, any host sync raises.
        torch.cuda.set_sync_debug_mode("error" if WARMUP_STEPS + 1 < len(steps) < max_steps - 1 else "default")
        return False

    events = []
    try:
        train(cfg, timemachine[:20000], events.append, should_stop=should_stop)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert [(e.step, e.step_path) for e in events if isinstance(e, StepMetrics)] == [(max_steps, "captured")]
