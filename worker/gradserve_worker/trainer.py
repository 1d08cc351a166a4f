"""The training engine: truncated backpropagation through time on a recurrent
model, as in d2l.ai chapter 9 (train_epoch_ch8) and its "Backpropagation
Through Time" section, for one job.

    result = train(TrainConfig(model="gru", max_steps=2000), text, on_event)

`train` runs optimizer steps until config.max_steps (or until should_stop()
says so), reporting through `on_event`: a StepMetrics every log_every steps, a
Probe every probe_every steps, an Evaluation every eval_every steps and at the
end (when there is held-out data), and a CheckpointReady every
checkpoint_every steps and at the end. It knows nothing about Celery, Redis or
gRPC; the worker's task wraps it.

The pieces live one concern per module: what a step trains on (tasks, data),
where gradients are cut (truncation), the models, the update rule and schedule
(optim), the probe's diagnostics (diagnostics), the step as a captured CUDA
graph (graphstep).
"""

from __future__ import annotations

import io
import math
import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, make_dataclass, replace
from typing import NamedTuple

import torch
from google.protobuf.descriptor import FieldDescriptor
from gradserve.spec import BY_NAME, FIELDS, init_must_match, resolved, violations
from gradserve.truncation import Advice, advise, decay_rate
from gradserve.v1 import jobs_pb2
from torch import nn

from gradserve_worker.diagnostics import SpectralNorms, count_nonfinite, probe_gradients
from gradserve_worker.errors import CannotTrain
from gradserve_worker.graphstep import StaticStep, unsupported
from gradserve_worker.models import build_model
from gradserve_worker.optim import Plateau, make_optimizer, scheduled_lr
from gradserve_worker.tasks import SYNTHETIC, make_stream, perplexity

# -----------------------------------------------------------------------------
# configuration


class _ConfigMethods:
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
        return resolved(self, "lr")

    def validate(self) -> None:
        """Raise ValueError naming every field outside gradserve.spec's allowed values."""
        problems = [f"{name} {reason}" for name, reason in violations(self) if name != "dataset"]
        if problems:
            raise CannotTrain("invalid training config: " + "; ".join(problems))


_PYTHON_TYPES = {FieldDescriptor.CPPTYPE_STRING: str, FieldDescriptor.CPPTYPE_DOUBLE: float,
                 FieldDescriptor.CPPTYPE_FLOAT: float, FieldDescriptor.CPPTYPE_BOOL: bool}


def _attribute(f) -> tuple:
    """A dataclass field for spec field `f`: its Python type (None allowed where the default is derived)."""
    kind = _PYTHON_TYPES.get(jobs_pb2.JobSpec.DESCRIPTOR.fields_by_name[f.name].cpp_type, int)
    return f.name, kind if f.default is not None else kind | None, field(default=f.default)


# One job's settings: gradserve.v1.JobSpec field for field, in its order, each
# defaulting as gradserve.spec's table says (None where the default derives
# from other fields: gradserve.spec.resolved gives it). Built from that table,
# so a field added to the proto and the table reaches the trainer by itself.
TrainConfig = make_dataclass(
    "TrainConfig",
    [("dataset", str, field(default=""))]
    + [_attribute(BY_NAME[d.name]) for d in jobs_pb2.JobSpec.DESCRIPTOR.fields if d.name != "dataset"],
    bases=(_ConfigMethods,),
)
TrainConfig.__module__ = __name__
TrainConfig.__doc__ = "One job's settings: mirrors gradserve.v1.JobSpec field for field; defaults come from gradserve.spec."


# Settings that may differ between a checkpoint and the job resuming from it;
# any other change would make the resumed run a different run. (Evaluations and
# probes only read the model.)
RESUMABLE_CHANGES = frozenset({"max_steps", "log_every", "checkpoint_every", "device", "eval_every", "probe_every"})

# -----------------------------------------------------------------------------
# what train reports


@dataclass
class StepMetrics:
    """Training progress over the steps since the previous StepMetrics."""

    step: int  # optimizer steps done so far (1-based), skipped ones included
    epoch: int  # 0-based pass over the corpus that the step belongs to (always 0 for synthetic tasks)
    # Mean loss over the interval's trained steps: cross-entropy per token in nats (a task's own loss);
    # nan when every step of the interval was skipped.
    loss: float
    perplexity: float  # exp(loss) for text; 0 for synthetic tasks
    tokens_per_sec: float  # time steps × batch trained in the interval / wall seconds of its steps (reporting left out)
    lr: float  # the learning rate of the interval's last step
    grad_norm: float  # global L2 norm of the gradient at the interval's last step, before clipping
    clipped: bool  # clipping fired at that step
    clip_fraction: float  # fraction of the interval's steps at which clipping fired
    param_grad_norms: dict[str, float]  # per named parameter, before clipping, at the interval's last step
    nonfinite_grads: int = 0  # NaN or infinite gradient entries summed over the interval's steps
    skipped_steps: int = 0  # steps of the interval whose update was dropped (on_nonfinite="skip")
    tokens: int = 0  # time steps × batch the interval's steps took
    seconds: float = 0.0  # wall seconds of the interval's steps: tokens_per_sec is tokens / seconds
    # How the steps ran: "captured" (graphstep's static step, one CUDA graph replay each), "eager", or "static"
    # (graphstep's step run uncaptured: off CUDA when asked for, or after a capture failed); and why not captured.
    step_path: str = ""
    step_path_reason: str = ""


@dataclass
class Evaluation:
    """The model after `step` steps on held-out data: the text's last val_fraction, or a task's held-out sequences."""

    step: int
    loss: float  # mean cross-entropy per held-out token; a task's own loss
    perplexity: float  # exp(loss) for text; 0 for synthetic tasks
    metric: str = ""  # a task's measure: "mse" (adding) or "accuracy" (copy); "" for text
    value: float = 0.0  # the model's score on it
    baseline: float = 0.0  # what a trivial predictor scores on it


@dataclass
class Probe:
    """Gradient diagnostics at `step` (see gradserve_worker.diagnostics)."""

    step: int
    grad_through_time: list[list[float]]  # per layer: ‖∂L/∂h_t‖ for t = 1..window length
    spectral_norms: list[tuple[str, str, float]]  # (parameter name, gate, largest singular value)
    # The window's gradient decay and what it suggests (gradserve.truncation); None for a one-step window.
    advice: Advice | None = None


@dataclass
class WindowChange:
    """truncation auto moved the window after `step`: windows are to_window steps from the next step on."""

    step: int
    from_window: int
    to_window: int
    suggested: int  # the median suggestion of the probes since the last checkpoint boundary


@dataclass
class CheckpointReady:
    """A checkpoint of the run after `step` steps; `data` is what load_checkpoint and resume take.

    `latest`: it is the regular checkpoint (every checkpoint_every steps and
    at the end). With `best_loss`, it is the best so far: its step's
    evaluation had the lowest held-out loss yet. One save can be both.
    """

    step: int
    data: bytes
    best_loss: float | None = None
    latest: bool = True


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
# the training loop


def resolve_device(name: str) -> torch.device:
    """The torch device a config's `device` names; "auto" prefers CUDA."""
    has_cuda = torch.cuda.is_available()
    if name == "auto":
        return torch.device("cuda" if has_cuda else "cpu")
    if name == "cuda" and not has_cuda:
        raise CannotTrain("device 'cuda' was requested but this worker has no CUDA GPU; submit with device=auto or cpu")
    return torch.device(name)


def model_for(config: TrainConfig, sizes: dict) -> nn.Module:
    """A fresh model for `config` with the stream's input and output sizes."""
    return build_model(config.model, hidden_size=config.hidden_size, num_layers=config.num_layers,
                       nonlinearity=config.nonlinearity, dropout=config.dropout,
                       embedding_size=config.embedding_size, embedding_dropout=config.embedding_dropout,
                       tie_weights=config.tie_weights, init=config.init, init_range=config.init_range,
                       max_dependency=resolved(config, "max_dependency"), **sizes)


@dataclass
class _Interval:
    """Running totals over the steps since the last StepMetrics."""

    steps: int = 0
    trained: int = 0  # steps whose update was applied
    loss_sum: float = 0.0
    clipped: int = 0
    tokens: int = 0
    seconds: float = 0.0  # time in the steps themselves: reporting, evaluation and checkpointing are left out
    nonfinite: int = 0
    skipped: int = 0

    def add(self, loss: float, clipped: bool, tokens: int, seconds: float) -> None:
        self.steps, self.trained = self.steps + 1, self.trained + 1
        self.loss_sum += loss
        self.clipped += clipped
        self.tokens += tokens
        self.seconds += seconds

    def skip(self, nonfinite: int, tokens: int, seconds: float) -> None:
        self.steps, self.skipped = self.steps + 1, self.skipped + 1
        self.nonfinite += nonfinite
        self.tokens += tokens
        self.seconds += seconds

    def metrics(self, step, epoch, lr, grad_norm, clipped, param_grad_norms, has_perplexity) -> StepMetrics:
        # Every step's loss is a mean over the same number of targets, so the mean of the means is the mean per target.
        loss = self.loss_sum / self.trained if self.trained else math.nan
        return StepMetrics(
            step=step,
            epoch=epoch,
            loss=loss,
            perplexity=perplexity(loss) if has_perplexity else 0.0,
            tokens_per_sec=self.tokens / self.seconds,
            lr=lr,
            grad_norm=grad_norm,
            clipped=clipped,
            clip_fraction=self.clipped / self.steps,
            param_grad_norms=param_grad_norms,
            nonfinite_grads=self.nonfinite,
            skipped_steps=self.skipped,
            tokens=self.tokens,
            seconds=self.seconds,
        )


def train(
    config: TrainConfig,
    text: str,
    on_event: Callable[[object], None],
    *,
    should_stop: Callable[[], bool] = lambda: False,
    resume: bytes | None = None,
    init: bytes | None = None,
    init_optimizer: bool = False,
    init_state: bool = False,
    step_path: str = "auto",
) -> TrainResult:
    """Train a fresh model (or the one in `resume`) for config.max_steps steps in total.

    On a text each step is one window (num_steps tokens of each of batch_size
    rows for fixed truncation): forward from the carried (sequential) or zero
    (random) state, mean cross-entropy, backward, clip to clip_norm, optimizer
    step. On a synthetic task (config.dataset in tasks.SYNTHETIC; `text` is
    ignored) each step is a batch of fresh sequences. should_stop() is asked
    once per step; when it says True the step finishes, its metrics, an
    evaluation and a checkpoint are reported and the run returns with
    stopped=True.

    `init`, for a run that does not resume, is another run's checkpoint to
    start from at step 0: its weights, and with init_optimizer its optimizer
    state (under this config's lr and weight decay), with init_state its
    carried hidden state. The settings gradserve.spec.INIT_MUST_MATCH names
    must agree, or CannotTrain names each that does not.

    After an evaluation with the lowest held-out loss so far, a CheckpointReady
    with `best_loss` set reports the model as it is then; when that step's
    regular checkpoint is due too, the one report is both (`latest`).

    On CUDA the step runs as a captured graph (graphstep) when it can serve
    the job, the eager step otherwise; every StepMetrics says which ran and
    why. `step_path` "eager" insists on the eager step, "static" runs
    graphstep's step even off CUDA (uncaptured there; tests compare the two).

    Raises ValueError for a config or text this cannot train on, and
    TrainingDiverged when the loss or gradient norm is no longer finite and
    on_nonfinite is "fail" (with "skip" such a step's update is dropped).
    """
    config.validate()
    device = resolve_device(config.device)
    stream = make_stream(config, text, device)
    ckpt = _read_checkpoint(resume) if resume is not None else None
    if ckpt is not None:
        _check_resumable(ckpt, config, stream.vocab)
    start_from = _read_checkpoint(init) if init is not None and ckpt is None else None
    if start_from is not None:
        _check_init(start_from, config, stream.vocab, init_optimizer, init_state)

    torch.manual_seed(config.seed)
    model = model_for(config, stream.sizes).to(device)
    lr = scheduled_lr(config, 1)
    optimizer = make_optimizer(config.optimizer, model.parameters(), lr, config.weight_decay)
    names, params = zip(*model.named_parameters())
    spectral = SpectralNorms(config.seed)
    plateau = Plateau.of(config) if config.schedule == "plateau" else None
    auto = AutoWindow.of(config, ckpt["auto"] if ckpt is not None else None) if config.truncation == "auto" else None
    if auto is not None:
        stream.set_window(auto.window, restart=False)
    step = 0
    best = _Best(math.inf)
    if start_from is not None:
        model.load_state_dict(start_from["model"])
        if init_optimizer:
            optimizer.load_state_dict(start_from["optimizer"])
            for group in optimizer.param_groups:  # the state carries over; the settings are this job's own
                group["lr"], group["weight_decay"] = lr, config.weight_decay
        state = tuple(s.to(device) for s in start_from["state"]) if init_state else ()
        stream.start(model, state=state or None)
    elif ckpt is None:
        stream.start(model)
    else:
        model.load_state_dict(ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])
        step = ckpt["step"]
        state = tuple(s.to(device) for s in ckpt["state"]) or None
        stream.start(model, ckpt["epoch"], ckpt["position"], state)
        spectral = SpectralNorms(config.seed, ckpt.get("spectral"))
        best = _Best(ckpt.get("best_loss", math.inf))
        if plateau is not None:
            # The optimizer's state already holds the lr; this is what the next evaluation compares against.
            plateau = Plateau.of(config, ckpt["plateau"])
            lr = plateau.lr
        _set_rng_state(ckpt["rng"], device)

    path, why = _choose_step_path(step_path, config, device)
    if path != "eager":
        return _train_static(config, stream, model, optimizer, names, spectral, step, device, on_event, should_stop,
                             best)
    on_event = _labelled(on_event, path, why)

    # The plateau schedule changes lr after evaluations, not before steps.
    scheduled = config.schedule not in ("constant", "plateau")
    skip_nonfinite = config.on_nonfinite == "skip"
    interval = _Interval()
    result = TrainResult(steps=step, loss=math.nan, perplexity=math.nan, stopped=False)

    while step < config.max_steps:
        t_step = time.perf_counter()
        loss, tokens = stream.next_loss(model)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        step += 1

        stopped = should_stop() and step < config.max_steps
        last = stopped or step == config.max_steps
        log = last or step % config.log_every == 0
        if log:  # a kernel per parameter, so only at the steps that report them
            param_norms = torch.stack([torch.linalg.vector_norm(p.grad) for p in params])
        grad_norm = nn.utils.get_total_norm([p.grad for p in params])
        # One device sync per step, for both numbers the loop has to look at.
        loss_val, norm_val = torch.stack([loss.detach(), grad_norm]).tolist()
        probe = None
        if math.isfinite(loss_val) and math.isfinite(norm_val):
            if step % config.probe_every == 0:  # before the update: the weights the step's gradient was taken at
                probe = _probe(config, model, stream, spectral, step)
            clipped = 0 < config.clip_norm < norm_val
            if clipped:
                # clip_grad_norm_'s second half: the norm is known already, and below the
                # threshold clip_grad_norm_ would rescale every gradient by exactly 1.
                nn.utils.clip_grads_with_norm_(params, config.clip_norm, grad_norm)
            if scheduled:
                lr = scheduled_lr(config, step)
                for group in optimizer.param_groups:
                    group["lr"] = lr
            optimizer.step()
            interval.add(loss_val, clipped, tokens, time.perf_counter() - t_step)
        elif skip_nonfinite:
            clipped = False
            nonfinite = count_nonfinite(p.grad for p in params) if not math.isfinite(norm_val) else 0
            stream.sanitize_state()
            interval.skip(nonfinite, tokens, time.perf_counter() - t_step)
        else:
            _raise_diverged(loss_val, norm_val, step, config.clip_norm)

        if log:
            norms = dict(zip(names, param_norms.tolist()))
            metrics = interval.metrics(step, stream.epoch, lr, norm_val, clipped, norms, stream.perplexity)
            on_event(metrics)
            result = TrainResult(steps=step, loss=metrics.loss, perplexity=metrics.perplexity, stopped=stopped)
            interval = _Interval()
        if probe is not None:
            on_event(probe)
            if auto is not None and probe.advice is not None:
                auto.suggestions.append(probe.advice.suggested)
        evaluation = None
        if stream.has_heldout and (last or step % config.eval_every == 0):
            evaluation = _evaluate(stream, model, step)
            on_event(evaluation)
            if plateau is not None and plateau.observe(evaluation.loss):
                lr = plateau.lr
                for group in optimizer.param_groups:
                    group["lr"] = lr
        if auto is not None and step % config.checkpoint_every == 0:
            change = auto.adjust(step)
            if change is not None:
                stream.set_window(change.to_window)
                on_event(change)
        _checkpoints(config, stream, model, optimizer, spectral, plateau, auto, step, device, on_event, best,
                     evaluation, regular=last or step % config.checkpoint_every == 0)
        if stopped:
            break
    return result


@dataclass
class _Best:
    """The lowest held-out loss of the run so far (resumed runs included)."""

    loss: float


def _checkpoints(config, stream, model, optimizer, spectral, plateau, auto, step, device, on_event, best: _Best,
                 evaluation: Evaluation | None, *, regular: bool) -> None:
    """A step's checkpoints: the regular one, and the best one when the step's evaluation is the best yet."""
    improved = evaluation is not None and evaluation.loss < best.loss
    if improved:
        best.loss = evaluation.loss
    if regular or improved:
        data = _checkpoint_bytes(config, stream, model, optimizer, spectral, plateau, auto, step, device, best.loss)
        on_event(CheckpointReady(step=step, data=data, best_loss=evaluation.loss if improved else None,
                                 latest=regular))


@dataclass
class AutoWindow:
    """truncation auto: the window, and the probes' suggestions since the last checkpoint boundary.

    At each boundary the window moves toward the median suggestion, by at
    most a factor of 2 (one probe's fit on a young model should not swing it
    far), and within [min_num_steps, max_num_steps]. Moving only at
    boundaries keeps each checkpoint's window the one its next step uses.
    """

    window: int
    low: int
    high: int
    suggestions: list[int] = field(default_factory=list)

    @classmethod
    def of(cls, config, state: dict | None) -> AutoWindow:
        auto = cls(config.num_steps, resolved(config, "min_num_steps"), resolved(config, "max_num_steps"))
        if state is not None:
            auto.window, auto.suggestions = state["window"], list(state["suggestions"])
        return auto

    def adjust(self, step: int) -> WindowChange | None:
        """The change at the boundary after `step`, or None; the suggestions start over either way."""
        if not self.suggestions:
            return None
        target = statistics.median_low(self.suggestions)
        self.suggestions = []
        new = min(max(target, -(-self.window // 2)), 2 * self.window)
        new = min(max(new, self.low), self.high)
        if new == self.window:
            return None
        change = WindowChange(step, self.window, new, target)
        self.window = new
        return change

    def state_dict(self) -> dict:
        return {"window": self.window, "suggestions": list(self.suggestions)}


def _probe(config, model, stream, spectral, step: int) -> Probe:
    profile, decay = probe_gradients(model, stream.replay)
    fits = [(rate, layer) for layer in decay if (rate := decay_rate(layer)) is not None]
    if not fits:
        return Probe(step, profile, spectral(model))
    # The slowest decay decides how far back the window has to reach.
    rate, layer = max(fits, key=lambda fit: fit[0])
    reach = sum(1 for n in layer if n > 0)
    field = "tbptt_k2" if config.truncation == "tbptt" else "num_steps"
    advice = advise(rate, reach, config.truncation_tolerance, field)
    if config.truncation == "full":  # it cuts nothing, so no window is too short
        advice = replace(advice, warning="")
    return Probe(step, profile, spectral(model), advice)


STEP_PATHS = ("auto", "eager", "static")


def _choose_step_path(asked: str, config: TrainConfig, device: torch.device) -> tuple[str, str]:
    """("captured" | "static" | "eager", why not captured) for train's `step_path`."""
    if asked not in STEP_PATHS:
        raise ValueError(f"step_path must be one of {', '.join(STEP_PATHS)}, got {asked!r}")
    if asked == "eager":
        return "eager", "the eager step was asked for"
    reason = unsupported(config)
    if reason:
        return "eager", reason
    if device.type == "cuda":
        return "captured", ""
    if asked == "static":
        return "static", "graphs are captured on CUDA only"
    return "eager", "graphs are captured on CUDA only"


def _labelled(on_event: Callable[[object], None], path: str, why: str) -> Callable[[object], None]:
    def report(event) -> None:
        if isinstance(event, StepMetrics):
            event.step_path, event.step_path_reason = path, why
        on_event(event)

    return report


def _train_static(config, stream, model, optimizer, names, spectral, step, device, on_event,
                  should_stop, best: _Best) -> TrainResult:
    """train's loop around graphstep.StaticStep: the same steps and reports, and no host sync between reports."""
    program = StaticStep(model, optimizer, stream, config, device, capture=device.type == "cuda", step=step)
    lr = scheduled_lr(config, 1)
    scheduled = config.schedule != "constant"
    result = TrainResult(steps=step, loss=math.nan, perplexity=math.nan, stopped=False)
    steps = tokens = 0
    # Wall time of the steps: from the interval's start to the sync that ends it, less probes, evaluations, checkpoints.
    started, aside = time.perf_counter(), 0.0

    while step < config.max_steps:
        batch, fresh = stream.next_batch()
        step += 1
        if scheduled:
            lr = scheduled_lr(config, step)
        program.load(batch, fresh, lr)
        probe = None
        if step % config.probe_every == 0:  # before the update: the weights the step's gradient is taken at
            t = time.perf_counter()
            probe = _probe(config, model, stream, spectral, step)
            aside += time.perf_counter() - t
        program.run()
        steps, tokens = steps + 1, tokens + stream.tokens(batch)

        stopped = should_stop() and step < config.max_steps
        last = stopped or step == config.max_steps
        log = last or step % config.log_every == 0
        evaluate = stream.has_heldout and (last or step % config.eval_every == 0)
        checkpoint = last or step % config.checkpoint_every == 0
        if not (log or probe or evaluate or checkpoint):
            continue
        totals = program.read()
        reported = time.perf_counter()
        if totals.first_bad:
            _raise_diverged(totals.bad_loss, totals.bad_norm, totals.first_bad, config.clip_norm)
        if log:
            interval = _Interval(steps=steps, trained=steps, loss_sum=totals.loss_sum, clipped=totals.clipped,
                                 tokens=tokens, seconds=reported - started - aside)
            norms = dict(zip(names, totals.param_norms))
            metrics = interval.metrics(step, stream.epoch, lr, totals.grad_norm, totals.last_clipped, norms,
                                       stream.perplexity)
            metrics.step_path, metrics.step_path_reason = program.path
            on_event(metrics)
            result = TrainResult(steps=step, loss=metrics.loss, perplexity=metrics.perplexity, stopped=stopped)
            program.reset_interval()
            steps = tokens = 0
        if probe is not None:
            on_event(probe)
        evaluation = _evaluate(stream, model, step) if evaluate else None
        if evaluation is not None:
            on_event(evaluation)
        # graphstep.unsupported sends plateau and auto jobs to the eager step, so there is no state of theirs here.
        _checkpoints(config, stream, model, program.portable, spectral, None, None, step, device, on_event, best,
                     evaluation, regular=checkpoint)
        if stopped:
            break
        if log:
            started, aside = time.perf_counter(), 0.0
        else:
            aside += time.perf_counter() - reported
    return result


def _raise_diverged(loss: float, grad_norm: float, step: int, clip_norm: float) -> None:
    hint = "try a lower lr or a smaller clip_norm" if clip_norm > 0 else "try a lower lr or clip_norm=1"
    if not math.isfinite(loss):
        raise TrainingDiverged(step, f"loss became {loss} at step {step}; {hint}, or on_nonfinite=skip")
    raise TrainingDiverged(step, f"gradient norm became {grad_norm} at step {step}; {hint}, or on_nonfinite=skip")


def _evaluate(stream, model, step: int) -> Evaluation:
    """The held-out pass: eval mode (no dropout, no random draws) and no gradient."""
    model.eval()
    try:
        with torch.no_grad():
            loss, value = stream.evaluate(model)
    finally:
        model.train()
    return Evaluation(step=step, loss=loss, perplexity=perplexity(loss) if stream.perplexity else 0.0,
                      metric=stream.metric, value=value, baseline=stream.baseline)


# -----------------------------------------------------------------------------
# checkpoints

CHECKPOINT_FORMAT = 1


def _checkpoint_bytes(config, stream, model, optimizer, spectral, plateau, auto, step, device,
                     best_loss: float) -> bytes:
    """Everything needed to continue the run bit for bit, or to sample from the model."""
    payload = {
        "format": CHECKPOINT_FORMAT,
        "model": model.state_dict(),
        "optimizer": optimizer.state_dict(),
        "step": step,
        # epoch, position (windows of `epoch` already trained on; a task's batches drawn), state (carried)
        **stream.position(),
        "rng": {
            "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if device.type == "cuda" else [],
        },
        "spectral": spectral.state_dict(),
        "plateau": plateau.state_dict() if plateau is not None else None,
        "auto": auto.state_dict() if auto is not None else None,
        "best_loss": best_loss,  # the lowest held-out loss so far, for a resumed run's best checkpoints
        "config": asdict(config),
        "vocab": stream.vocab,
    }
    buf = io.BytesIO()
    torch.save(payload, buf)
    return buf.getvalue()


def _read_checkpoint(data: bytes) -> dict:
    try:
        # weights_only: a checkpoint may come from a user, and this refuses to run pickled code.
        ckpt = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises several kinds for bytes that are not a checkpoint
        raise CannotTrain(f"not a readable checkpoint: {e}") from e
    if not isinstance(ckpt, dict) or ckpt.get("format") != CHECKPOINT_FORMAT:
        raise CannotTrain("not a gradserve checkpoint (or one from an incompatible version)")
    return ckpt


def _saved_config(ckpt: dict) -> dict:
    # A checkpoint written before a setting existed was trained with that setting's default.
    return {**asdict(TrainConfig()), **ckpt["config"]}


def _check_resumable(ckpt: dict, config: TrainConfig, vocab: list[str]) -> None:
    saved = _saved_config(ckpt)
    for name, value in asdict(config).items():
        if name not in RESUMABLE_CHANGES and saved.get(name) != value:
            raise CannotTrain(
                f"cannot resume: the checkpoint was trained with {name}={saved.get(name)!r} but this job has "
                f"{name}={value!r}; only {', '.join(sorted(RESUMABLE_CHANGES))} may change on resume"
            )
    if ckpt["vocab"] != vocab:
        raise CannotTrain("cannot resume: the checkpoint's vocabulary differs from this text's")


def _check_init(ckpt: dict, config: TrainConfig, vocab: list[str], optimizer: bool, state: bool) -> None:
    """Refuse a checkpoint to start from whose model, vocabulary or (as asked) optimizer or batch differs."""
    saved = _saved_config(ckpt)
    mine = asdict(config)
    problems = [f"{name} {saved.get(name)!r} there, {mine[name]!r} here"
                for name in init_must_match(config, optimizer=optimizer, state=state) if saved.get(name) != mine[name]]
    if ckpt["vocab"] != vocab:
        problems.append(f"its vocabulary of {len(ckpt['vocab'])} tokens differs from this text's {len(vocab)}")
    if problems:
        raise CannotTrain("cannot start from that checkpoint: " + "; ".join(problems))


def _set_rng_state(rng: dict, device: torch.device) -> None:
    torch.set_rng_state(rng["torch"])
    if device.type == "cuda" and len(rng["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(rng["cuda"])


class Checkpoint(NamedTuple):
    """A checkpoint opened for inference."""

    model: nn.Module  # in eval mode, on the requested device
    vocab: list[str]  # index -> token; index 0 is "<unk>" (a synthetic task's symbols; none for adding)
    config: TrainConfig  # the config the model was trained with
    state: tuple[torch.Tensor, ...]  # the hidden state after the checkpoint's last window; () for synthetic tasks


def load_checkpoint(data: bytes, device="cpu") -> Checkpoint:
    """Open checkpoint bytes (a CheckpointReady's data) for text generation.

    Returns Checkpoint(model, vocab, config, state), a NamedTuple, so
    ``model, vocab, config, state = load_checkpoint(data)`` works. Start
    generation from model.begin_state(1, device) rather than `state`, whose
    batch is the training batch.
    """
    ckpt = _read_checkpoint(data)
    config = TrainConfig(**_saved_config(ckpt))
    task = SYNTHETIC.get(config.dataset)
    model = model_for(config, task.sizes if task else {"vocab_size": len(ckpt["vocab"])})
    model.load_state_dict(ckpt["model"])
    model.to(device).eval()
    state = tuple(s.to(device) for s in ckpt["state"])
    return Checkpoint(model, list(ckpt["vocab"]), config, state)
