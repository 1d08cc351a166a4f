"""The training engine: truncated backpropagation through time on a recurrent
language model, as in d2l.ai chapter 9 (train_epoch_ch8), for one job.

    result = train(TrainConfig(model="gru", max_steps=2000), text, on_event)

`train` runs optimizer steps until config.max_steps (or until should_stop()
says so), reporting through `on_event`: a StepMetrics every log_every steps and
a CheckpointReady every checkpoint_every steps and at the end. It knows nothing
about Celery, Redis or gRPC; the worker's task wraps it.
"""

from __future__ import annotations

import io
import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import NamedTuple

import torch
import torch.nn.functional as F
from gradserve.spec import BY_NAME, DEFAULT_LR, FIELDS, min_tokens, violations
from torch import nn

from gradserve_worker.data import Vocab, build_corpus, epoch_windows
from gradserve_worker.models import build_model

# -----------------------------------------------------------------------------
# configuration


def _default(name: str):
    # Every default lives in gradserve.spec, so the server, the CLI and the worker agree.
    return BY_NAME[name].default


@dataclass
class TrainConfig:
    """One job's settings: mirrors gradserve.v1.JobSpec field for field; defaults come from gradserve.spec."""

    dataset: str = ""
    tokenization: str = _default("tokenization")  # "char" | "word"
    preprocess: str = _default("preprocess")  # "none" | "d2l"
    model: str = _default("model")  # "rnn_scratch" | "rnn" | "gru" | "lstm"
    hidden_size: int = _default("hidden_size")
    num_layers: int = _default("num_layers")
    batch_size: int = _default("batch_size")
    num_steps: int = _default("num_steps")  # the truncation window T
    partition: str = _default("partition")  # "sequential" | "random"
    max_steps: int = _default("max_steps")
    optimizer: str = _default("optimizer")  # "sgd" | "adam"
    lr: float | None = _default("lr")  # None: gradserve.spec.DEFAULT_LR[optimizer]
    clip_norm: float = _default("clip_norm")  # 0 turns clipping off
    seed: int = _default("seed")
    device: str = _default("device")  # "auto" | "cpu" | "cuda"
    log_every: int = _default("log_every")
    checkpoint_every: int = _default("checkpoint_every")
    min_freq: int = _default("min_freq")
    nonlinearity: str = _default("nonlinearity")  # "tanh" | "relu", for rnn and rnn_scratch

    @classmethod
    def from_spec(cls, spec) -> TrainConfig:
        """The config of a gradserve.v1.JobSpec; fields the spec leaves unset take their defaults."""
        values = {"dataset": spec.dataset}
        for f in FIELDS:
            if f.choices:  # proto3 strings have no presence: "" means unset
                values[f.name] = getattr(spec, f.name) or f.default
            else:
                values[f.name] = getattr(spec, f.name) if spec.HasField(f.name) else f.default
        return cls(**values)

    @property
    def effective_lr(self) -> float:
        return self.lr if self.lr is not None else DEFAULT_LR[self.optimizer]

    def validate(self) -> None:
        """Raise ValueError naming every field outside gradserve.spec's allowed values."""
        problems = [f"{name} {reason}" for name, reason in violations(self) if name != "dataset"]
        if problems:
            raise ValueError("invalid training config: " + "; ".join(problems))


# Settings that may differ between a checkpoint and the job resuming from it;
# any other change would make the resumed run a different run.
RESUMABLE_CHANGES = frozenset({"max_steps", "log_every", "checkpoint_every", "device"})

# -----------------------------------------------------------------------------
# what train reports


@dataclass
class StepMetrics:
    """Training progress over the steps since the previous StepMetrics."""

    step: int  # optimizer steps done so far (1-based)
    epoch: int  # 0-based pass over the corpus that the step belongs to
    loss: float  # mean cross-entropy per token over the interval, nats
    perplexity: float  # exp(loss)
    tokens_per_sec: float  # tokens trained in the interval / wall seconds of its steps (reporting left out)
    lr: float
    grad_norm: float  # global L2 norm of the gradient at the interval's last step, before clipping
    clipped: bool  # clipping fired at that step
    clip_fraction: float  # fraction of the interval's steps at which clipping fired
    param_grad_norms: dict[str, float]  # per named parameter, before clipping, at the interval's last step


@dataclass
class CheckpointReady:
    """A checkpoint of the run after `step` steps; `data` is what load_checkpoint and resume take."""

    step: int
    data: bytes


@dataclass
class TrainResult:
    steps: int  # optimizer steps done in total, resumed ones included
    loss: float  # the last interval's loss; nan when this call took no step
    perplexity: float
    stopped: bool  # should_stop() ended the run before max_steps


class TrainingDiverged(Exception):
    """The loss or the gradient norm stopped being a finite number."""

    def __init__(self, step: int, message: str):
        super().__init__(message)
        self.step = step


# -----------------------------------------------------------------------------
# truncated BPTT


def detach_state(state: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
    """The hidden state cut loose from the graph that computed it.

    The state carried into a window keeps its values but not its history:
    without the detach, backward of this window would run on through every
    earlier window back to the start of the corpus, and each step would cost
    more time and memory than the last. This is the "truncated" in truncated BPTT.
    """
    return tuple(s.detach() for s in state)


def resolve_device(name: str) -> torch.device:
    """The torch device a config's `device` names; "auto" prefers CUDA."""
    has_cuda = torch.cuda.is_available()
    if name == "auto":
        return torch.device("cuda" if has_cuda else "cpu")
    if name == "cuda" and not has_cuda:
        raise ValueError("device 'cuda' was requested but this worker has no CUDA GPU; submit with device=auto or cpu")
    return torch.device(name)


def make_optimizer(name: str, params, lr: float) -> torch.optim.Optimizer:
    if name == "sgd":
        return torch.optim.SGD(params, lr=lr)
    if name == "adam":
        return torch.optim.Adam(params, lr=lr)
    raise ValueError(f"unknown optimizer {name!r}; expected sgd or adam")


@dataclass
class _Interval:
    """Running totals over the steps since the last StepMetrics."""

    steps: int = 0
    loss_sum: float = 0.0
    clipped: int = 0
    seconds: float = 0.0  # time in the steps themselves: reporting and checkpointing are left out

    def add(self, loss: float, clipped: bool, seconds: float) -> None:
        self.steps += 1
        self.loss_sum += loss
        self.clipped += clipped
        self.seconds += seconds

    @property
    def mean_loss(self) -> float:
        # Every window has B*T tokens, so the mean of the steps' means is the mean per token.
        return self.loss_sum / self.steps

    def metrics(self, step, epoch, tokens_per_step, lr, grad_norm, clipped, param_grad_norms) -> StepMetrics:
        return StepMetrics(
            step=step,
            epoch=epoch,
            loss=self.mean_loss,
            perplexity=_perplexity(self.mean_loss),
            tokens_per_sec=self.steps * tokens_per_step / self.seconds,
            lr=lr,
            grad_norm=grad_norm,
            clipped=clipped,
            clip_fraction=self.clipped / self.steps,
            param_grad_norms=param_grad_norms,
        )


def _perplexity(loss: float) -> float:
    try:
        return math.exp(loss)
    except OverflowError:
        return math.inf


def train(
    config: TrainConfig,
    text: str,
    on_event: Callable[[object], None],
    *,
    should_stop: Callable[[], bool] = lambda: False,
    resume: bytes | None = None,
) -> TrainResult:
    """Train a fresh model (or the one in `resume`) on `text` for config.max_steps steps in total.

    Each step is one window of batch_size × num_steps tokens: forward from the
    carried (sequential) or zero (random) state, mean cross-entropy, backward,
    clip to clip_norm, optimizer step. should_stop() is asked once per step; when
    it says True the step finishes, its metrics and a checkpoint are reported and
    the run returns with stopped=True.

    Raises ValueError for a config or text this cannot train on, and
    TrainingDiverged when the loss or gradient norm is no longer finite.
    """
    config.validate()
    device = resolve_device(config.device)
    B, T = config.batch_size, config.num_steps
    vocab, corpus = build_corpus(text, config.tokenization, config.preprocess, config.min_freq)
    if len(corpus) < min_tokens(B, T):
        raise ValueError(
            f"the text has {len(corpus)} tokens ({config.tokenization} tokens after preprocess "
            f"{config.preprocess!r}) but batch_size × num_steps = {B} × {T} needs at least "
            f"{min_tokens(B, T)}; use a longer text or a smaller batch_size or num_steps"
        )
    ckpt = _read_checkpoint(resume) if resume is not None else None
    if ckpt is not None:
        _check_resumable(ckpt, config, vocab)

    torch.manual_seed(config.seed)
    model = build_model(config.model, len(vocab), config.hidden_size, config.num_layers, config.nonlinearity).to(device)
    lr = config.effective_lr
    optimizer = make_optimizer(config.optimizer, model.parameters(), lr)
    names, params = zip(*model.named_parameters())
    step, epoch, pos, state = 0, 0, 0, None
    if ckpt is not None:
        model.load_state_dict(ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])
        step, epoch, pos = ckpt["step"], ckpt["epoch"], ckpt["position"]
        state = tuple(s.to(device) for s in ckpt["state"])
        _set_rng_state(ckpt["rng"], device)

    corpus = corpus.to(device)
    windows = epoch_windows(corpus, config.partition, B, T, config.seed, epoch)
    zero_state = model.begin_state(B, device)
    interval = _Interval()
    result = TrainResult(steps=step, loss=math.nan, perplexity=math.nan, stopped=False)

    while step < config.max_steps:
        t_step = time.perf_counter()
        if pos == len(windows):
            epoch, pos = epoch + 1, 0
            windows = epoch_windows(corpus, config.partition, B, T, config.seed, epoch)
        if pos == 0 or not windows.carries_state:
            state = zero_state
        X, Y = windows[pos]

        state = detach_state(state)
        logits, state = model(X, state)
        loss = F.cross_entropy(logits, Y.reshape(-1))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        step, pos = step + 1, pos + 1

        stopped = should_stop() and step < config.max_steps
        last = stopped or step == config.max_steps
        log = last or step % config.log_every == 0
        if log:  # a kernel per parameter, so only at the steps that report them
            param_norms = torch.stack([torch.linalg.vector_norm(p.grad) for p in params])
        grad_norm = nn.utils.get_total_norm([p.grad for p in params])
        # One device sync per step, for both numbers the loop has to look at.
        loss_val, norm_val = torch.stack([loss.detach(), grad_norm]).tolist()
        _check_finite(loss_val, norm_val, step, config.clip_norm)
        clipped = 0 < config.clip_norm < norm_val
        if clipped:
            # clip_grad_norm_'s second half: the norm is known already, and below the
            # threshold clip_grad_norm_ would rescale every gradient by exactly 1.
            nn.utils.clip_grads_with_norm_(params, config.clip_norm, grad_norm)
        optimizer.step()
        interval.add(loss_val, clipped, time.perf_counter() - t_step)

        if log:
            norms = dict(zip(names, param_norms.tolist()))
            metrics = interval.metrics(step, epoch, B * T, lr, norm_val, clipped, norms)
            on_event(metrics)
            result = TrainResult(steps=step, loss=metrics.loss, perplexity=metrics.perplexity, stopped=stopped)
            interval = _Interval()
        if last or step % config.checkpoint_every == 0:
            data = _checkpoint_bytes(config, vocab, model, optimizer, state, step, epoch, pos, device)
            on_event(CheckpointReady(step=step, data=data))
        if stopped:
            break
    return result


def _check_finite(loss: float, grad_norm: float, step: int, clip_norm: float) -> None:
    hint = "try a lower lr or a smaller clip_norm" if clip_norm > 0 else "try a lower lr or clip_norm=1"
    if not math.isfinite(loss):
        raise TrainingDiverged(step, f"loss became {loss} at step {step}; {hint}")
    if not math.isfinite(grad_norm):
        raise TrainingDiverged(step, f"gradient norm became {grad_norm} at step {step}; {hint}")


# -----------------------------------------------------------------------------
# checkpoints

CHECKPOINT_FORMAT = 1


def _checkpoint_bytes(config, vocab, model, optimizer, state, step, epoch, pos, device) -> bytes:
    """Everything needed to continue the run bit for bit, or to sample from the model."""
    payload = {
        "format": CHECKPOINT_FORMAT,
        "model": model.state_dict(),
        "optimizer": optimizer.state_dict(),
        "state": [s.detach() for s in state],
        "step": step,
        "epoch": epoch,
        "position": pos,  # windows of `epoch` already trained on
        "rng": {
            "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if device.type == "cuda" else [],
        },
        "config": asdict(config),
        "vocab": vocab.tokens,
    }
    buf = io.BytesIO()
    torch.save(payload, buf)
    return buf.getvalue()


def _read_checkpoint(data: bytes) -> dict:
    try:
        # weights_only: a checkpoint may come from a user, and this refuses to run pickled code.
        ckpt = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises several kinds for bytes that are not a checkpoint
        raise ValueError(f"not a readable checkpoint: {e}") from e
    if not isinstance(ckpt, dict) or ckpt.get("format") != CHECKPOINT_FORMAT:
        raise ValueError("not a gradserve checkpoint (or one from an incompatible version)")
    return ckpt


def _check_resumable(ckpt: dict, config: TrainConfig, vocab: Vocab) -> None:
    saved = ckpt["config"]
    for name, value in asdict(config).items():
        if name not in RESUMABLE_CHANGES and saved.get(name) != value:
            raise ValueError(
                f"cannot resume: the checkpoint was trained with {name}={saved.get(name)!r} but this job has "
                f"{name}={value!r}; only {', '.join(sorted(RESUMABLE_CHANGES))} may change on resume"
            )
    if ckpt["vocab"] != vocab.tokens:
        raise ValueError("cannot resume: the checkpoint's vocabulary differs from this text's")


def _set_rng_state(rng: dict, device: torch.device) -> None:
    torch.set_rng_state(rng["torch"])
    if device.type == "cuda" and len(rng["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(rng["cuda"])


class Checkpoint(NamedTuple):
    """A checkpoint opened for inference."""

    model: nn.Module  # in eval mode, on the requested device
    vocab: list[str]  # index -> token; index 0 is "<unk>"
    config: TrainConfig  # the config the model was trained with
    state: tuple[torch.Tensor, ...]  # the hidden state after the checkpoint's last window


def load_checkpoint(data: bytes, device="cpu") -> Checkpoint:
    """Open checkpoint bytes (a CheckpointReady's data) for text generation.

    Returns Checkpoint(model, vocab, config, state), a NamedTuple, so
    ``model, vocab, config, state = load_checkpoint(data)`` works. Start
    generation from model.begin_state(1, device) rather than `state`, whose
    batch is the training batch.
    """
    ckpt = _read_checkpoint(data)
    config = TrainConfig(**ckpt["config"])
    model = build_model(config.model, len(ckpt["vocab"]), config.hidden_size, config.num_layers, config.nonlinearity)
    model.load_state_dict(ckpt["model"])
    model.to(device).eval()
    state = tuple(s.to(device) for s in ckpt["state"])
    return Checkpoint(model, list(ckpt["vocab"]), config, state)
