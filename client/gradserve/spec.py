"""The job spec's defaults and allowed values, in one table.

The server validates every SubmitJob against this table, the worker's
``TrainConfig`` takes its defaults from it, and the CLI builds its ``submit``
flags and their help from it. Adding a field to ``JobSpec`` in the proto means
adding one row here.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

from gradserve.v1 import jobs_pb2

BUILTIN_DATASETS = ("builtin:pydocs",)
DATASET_ID = re.compile(r"ds-[0-9a-f]{64}")

# Adam's step size is per-coordinate, so SGD's textbook lr of 1 would wreck it.
DEFAULT_LR = {"sgd": 1.0, "adam": 0.001}


@dataclass(frozen=True)
class Field:
    name: str
    default: object
    help: str
    choices: tuple[str, ...] = ()
    low: float | None = None
    high: float | None = None
    low_inclusive: bool = True

    @property
    def allowed(self) -> str:
        if self.choices:
            return "one of " + ", ".join(self.choices)
        lo = "[" if self.low_inclusive else "("
        return f"in {lo}{_num(self.low)}, {_num(self.high)}]"

    def check(self, value) -> str | None:
        """The reason `value` is not allowed, or None."""
        if self.choices:
            return None if value in self.choices else f"must be {self.allowed}, got {value!r}"
        if isinstance(value, float) and not math.isfinite(value):
            return f"must be a finite number {self.allowed}, got {value}"
        below = value < self.low if self.low_inclusive else value <= self.low
        if below or value > self.high:
            return f"must be {self.allowed}, got {_num(value)}"
        return None


def _num(x) -> str:
    return f"{x:g}" if isinstance(x, float) else str(x)


FIELDS: tuple[Field, ...] = (
    Field("tokenization", "char", "split the text into characters or words", choices=("char", "word")),
    Field(
        "preprocess",
        "none",
        "'d2l' lowercases and turns each run of non-letters into one space",
        choices=("none", "d2l"),
    ),
    Field("model", "lstm", "the recurrent network", choices=("rnn_scratch", "rnn", "gru", "lstm")),
    Field("hidden_size", 256, "hidden units per layer", low=1, high=4096),
    Field("num_layers", 1, "stacked recurrent layers (rnn_scratch has exactly 1)", low=1, high=8),
    Field("batch_size", 32, "sequences per minibatch", low=1, high=4096),
    Field("num_steps", 35, "truncation window T, in tokens", low=1, high=10_000),
    Field(
        "partition",
        "sequential",
        "'sequential' carries the hidden state across minibatches, 'random' resets it",
        choices=("sequential", "random"),
    ),
    Field("max_steps", 1000, "optimizer steps to train for", low=1, high=10_000_000),
    Field("optimizer", "sgd", "the update rule", choices=("sgd", "adam")),
    Field("lr", None, "learning rate (default 1 for sgd, 0.001 for adam)", low=0.0, high=100.0, low_inclusive=False),
    Field("clip_norm", 1.0, "clip gradients to this global L2 norm; 0 turns clipping off", low=0.0, high=1e6),
    Field("seed", 0, "seed for weights, partitioning and sampling", low=0, high=2**63 - 1),
    Field("device", "auto", "'auto' uses a GPU worker when one is alive", choices=("auto", "cpu", "cuda")),
    Field("log_every", 50, "steps between metrics events", low=1, high=1_000_000),
    Field("checkpoint_every", 500, "steps between checkpoints (one is always written at the end)", low=1, high=10_000_000),
    Field("min_freq", 1, "word tokens seen fewer times become <unk>", low=1, high=1_000_000),
    Field("nonlinearity", "tanh", "activation of rnn and rnn_scratch", choices=("tanh", "relu")),
)
BY_NAME = {f.name: f for f in FIELDS}


def complete(spec: jobs_pb2.JobSpec) -> jobs_pb2.JobSpec:
    """A copy of `spec` with every unset field given its default."""
    full = jobs_pb2.JobSpec()
    full.CopyFrom(spec)
    for f in FIELDS:
        if f.choices:
            if not getattr(full, f.name):
                setattr(full, f.name, f.default)
        elif not full.HasField(f.name):
            default = DEFAULT_LR.get(full.optimizer or "sgd", 1.0) if f.name == "lr" else f.default
            setattr(full, f.name, default)
    return full


def violations(spec) -> list[tuple[str, str]]:
    """Every (field, reason) that makes a complete spec invalid, in field order.

    `spec` is a JobSpec or anything with the same attributes (the worker's
    TrainConfig); a None value means "use the default". The dataset's length is
    not checked here: that needs the dataset itself.
    """
    out = []
    if not spec.dataset:
        out.append(("dataset", "is required: an id from UploadDataset (ds-...) or one of " + ", ".join(BUILTIN_DATASETS)))
    elif spec.dataset not in BUILTIN_DATASETS and not DATASET_ID.fullmatch(spec.dataset):
        out.append(
            (
                "dataset",
                f"must be an id from UploadDataset (ds- and 64 hex digits) or one of "
                f"{', '.join(BUILTIN_DATASETS)}, got {spec.dataset!r}",
            )
        )
    for f in FIELDS:
        value = getattr(spec, f.name)
        reason = None if value is None else f.check(value)
        if reason:
            out.append((f.name, reason))
    if spec.model == "rnn_scratch" and spec.num_layers != 1:
        out.append(("num_layers", f"must be 1 for model rnn_scratch, got {spec.num_layers}"))
    if spec.nonlinearity != "tanh" and spec.model not in ("rnn", "rnn_scratch"):
        out.append(("nonlinearity", f"applies only to models rnn and rnn_scratch, not {spec.model}; leave it tanh"))
    return out


def min_tokens(batch_size: int, num_steps: int) -> int:
    """Fewest tokens that give one full minibatch of `batch_size` windows of `num_steps`.

    Each epoch starts at a random offset below num_steps, and the targets are the
    inputs shifted by one token, so that much more is needed than batch × T.
    """
    return num_steps * (batch_size + 1)
