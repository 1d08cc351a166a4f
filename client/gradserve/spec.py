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



@dataclass(frozen=True)
class Model:
    """What the spec knows of a model: the shape of its weights and which fields apply to it."""

    # Weight blocks per layer: one per gate (an LSTM's i, f, g, o).
    gates: int
    # Bias vectors per block: torch's layers have b_ih and b_hh, rnn_scratch b_h alone.
    biases: int
    max_layers: int
    # Whether the nonlinearity field applies (GRU and LSTM gates fix their own).
    takes_nonlinearity: bool
    # Floats a training step holds at its peak per time step, sequence, hidden
    # unit and layer of the backward window (see memory_estimate_bytes).
    activation_floats: int


# Every model a job may name; the worker builds each (gradserve_worker.models).
# activation_floats: counted as the tensors autograd saves
# (tests/worker/test_memory_estimate.py), and fitted to the peaks
# bench/memory.py measures in a worker's forked child (BENCHMARKS.md), where
# the estimate with PROCESS_BYTES is 1.34x or more above each 10-step peak.
# The backward allocates gradient buffers besides the saved activations,
# gradient probes replay a window, and the allocator keeps freed blocks in a
# heap that fragments, so the peak creeps up over a long job: rnn and
# rnn_scratch rows 15-25% above their 10-step peaks after 300-500 steps, gru and
# lstm rows 2-4% after 60-80. The margin is sized to stay 1.2x above those
# (1.25x at the least).
MODELS = {
    "rnn_scratch": Model(gates=1, biases=1, max_layers=1, takes_nonlinearity=True, activation_floats=16),
    "rnn": Model(gates=1, biases=2, max_layers=8, takes_nonlinearity=True, activation_floats=11),
    "gru": Model(gates=3, biases=2, max_layers=8, takes_nonlinearity=False, activation_floats=21),
    "lstm": Model(gates=4, biases=2, max_layers=8, takes_nonlinearity=False, activation_floats=26),
}


@dataclass(frozen=True)
class Task:
    """A synthetic long-range task: generated on the worker from the spec (seq_len, seed); it has no text."""

    # Symbols in and out of its model: the adding problem reads (value, marker)
    # pairs; copy memory uses 8 symbols, a blank and a delimiter.
    symbols: int
    # Time steps a sequence has beyond seq_len: copy memory shows 10 symbols and recalls 10.
    extra_steps: int
    # Whether its inputs are real-valued features rather than symbols of a vocabulary.
    features: bool = False


# Every synthetic task; the worker generates each (gradserve_worker.tasks).
TASKS = {"builtin:adding": Task(symbols=2, extra_steps=0, features=True), "builtin:copy": Task(symbols=10, extra_steps=20)}
SYNTHETIC_TASKS = tuple(TASKS)
BUILTIN_DATASETS = ("builtin:pydocs", *TASKS)
DATASET_ID = re.compile(r"ds-[0-9a-f]{64}")

# Adam's step size is per-coordinate, so SGD's textbook lr of 1 would wreck it.
DEFAULT_LR = {"sgd": 1.0, "adam": 0.001, "adamw": 0.001}


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
        if isinstance(self.default, bool):
            return "true or false"
        if self.choices:
            return "one of " + ", ".join(self.choices)
        lo = "[" if self.low_inclusive else "("
        return f"in {lo}{_num(self.low)}, {_num(self.high)}]"

    def check(self, value) -> str | None:
        """The reason `value` is not allowed, or None."""
        if isinstance(self.default, bool):
            return None if isinstance(value, bool) else f"must be {self.allowed}, got {value!r}"
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
    Field("model", "lstm", "the recurrent network", choices=tuple(MODELS)),
    Field("hidden_size", 256, "hidden units per layer", low=1, high=4096),
    Field("num_layers", 1, "stacked recurrent layers (rnn_scratch has exactly 1)", low=1,
          high=max(m.max_layers for m in MODELS.values())),
    Field("batch_size", 32, "sequences per minibatch", low=1, high=4096),
    Field("num_steps", 35, "truncation window T, in tokens", low=1, high=10_000),
    Field(
        "partition",
        "sequential",
        "'sequential' carries the hidden state across minibatches, 'random' resets it",
        choices=("sequential", "random"),
    ),
    Field("max_steps", 1000, "optimizer steps to train for", low=1, high=10_000_000),
    Field("optimizer", "sgd", "the update rule", choices=("sgd", "adam", "adamw")),
    Field("lr", None, "learning rate (default 1 for sgd, 0.001 for adam and adamw)", low=0.0, high=100.0,
          low_inclusive=False),
    Field("clip_norm", 1.0, "clip gradients to this global L2 norm; 0 turns clipping off", low=0.0, high=1e6),
    Field("seed", 0, "seed for weights, partitioning and sampling", low=0, high=2**63 - 1),
    Field("device", "auto", "'auto' uses a GPU worker when one is alive", choices=("auto", "cpu", "cuda")),
    Field("log_every", 50, "steps between metrics events", low=1, high=1_000_000),
    Field("checkpoint_every", 500, "steps between checkpoints (one is always written at the end)", low=1, high=10_000_000),
    Field("min_freq", 1, "word tokens seen fewer times become <unk>", low=1, high=1_000_000),
    Field("nonlinearity", "tanh", "activation of rnn and rnn_scratch", choices=("tanh", "relu")),
    Field(
        "truncation",
        "fixed",
        "how gradients are cut through time: fixed windows, full sequences, randomized (unbiased), tbptt(k1, k2), "
        "or auto: fixed windows that move toward the probes' suggested length at checkpoint boundaries",
        choices=("fixed", "full", "randomized", "tbptt", "auto"),
    ),
    Field("tbptt_k1", None, "tbptt: steps between updates (default num_steps)", low=1, high=10_000),
    Field("tbptt_k2", None, "tbptt: steps each backward pass reaches back, at least k1 (default 2 x k1, at most "
          "10000)", low=1, high=10_000),
    Field("truncation_keep", 0.9, "randomized: chance that a gradient path goes one step further back",
          low=0.0, high=1.0, low_inclusive=False),
    Field("dropout", 0.0, "dropout on each recurrent layer's output", low=0.0, high=0.9),
    Field("embedding_size", 0, "learned input embedding size; 0 feeds one-hot tokens", low=0, high=4096),
    Field("val_fraction", 0.05, "share of the text held out, from its end, for validation", low=0.0, high=0.5),
    Field("eval_every", 500, "steps between validation passes (one always runs at the end)", low=1, high=10_000_000),
    Field("weight_decay", 0.0, "L2 penalty (decoupled for adamw)", low=0.0, high=1.0),
    Field("schedule", "constant", "learning-rate schedule; plateau decays lr after each evaluation whose held-out "
          "loss is not below the best so far", choices=("constant", "step", "cosine", "plateau")),
    Field("lr_step_every", 1000, "step schedule: steps between decays", low=1, high=10_000_000),
    Field("lr_gamma", 0.1, "step and plateau schedules: factor applied at each decay", low=0.0, high=1.0,
          low_inclusive=False),
    Field("probe_every", 200, "steps between gradient-through-time probes and spectral norms", low=1,
          high=10_000_000),
    Field("seq_len", 50, "length of each sequence of a synthetic task", low=2, high=10_000),
    Field("on_nonfinite", "fail", "a NaN or infinite loss or gradient fails the job, or skips the step",
          choices=("fail", "skip")),
    Field("eos", False, "a <eos> token at every line end (word); char keeps line ends as a newline token, "
          "even with preprocess d2l"),
    Field(
        "init",
        "default",
        "initial weights: torch's defaults; uniform: embedding and output weights in ±init_range, output bias 0; "
        "chrono: gru and lstm gate biases for dependencies up to max_dependency steps (Tallec & Ollivier 2018)",
        choices=("default", "uniform", "chrono"),
    ),
    Field("init_range", 0.1, "uniform init: the bound of the embedding and output weights", low=0.0, high=10.0,
          low_inclusive=False),
    Field("max_dependency", None, "chrono init: the longest dependency expected, in steps (default num_steps)",
          low=2, high=1_000_000),
    Field("embedding_dropout", 0.0, "dropout on the learned embedding's output", low=0.0, high=0.9),
    Field("tie_weights", False, "share one matrix between the embedding and the output layer (needs "
          "embedding_size = hidden_size)"),
    Field("min_lr", 0.0, "plateau schedule: the floor lr never drops below", low=0.0, high=100.0),
    Field("truncation_tolerance", 0.01, "share of the gradient mass a window may cut off before the probes "
          "suggest a longer one", low=0.0, high=0.5, low_inclusive=False),
    Field("min_num_steps", None, "auto truncation: the shortest window (default num_steps)", low=1, high=10_000),
    Field("max_num_steps", None, "auto truncation: the longest window (default 4 x num_steps, at most 10000)",
          low=1, high=10_000),
)
BY_NAME = {f.name: f for f in FIELDS}


# Defaults that depend on fields earlier in FIELDS, each given a way to read those fields.
_DERIVED = {
    # .get: complete() runs before validation, so the optimizer may still be an unknown name.
    "lr": lambda get: DEFAULT_LR.get(get("optimizer"), 1.0),
    "tbptt_k1": lambda get: get("num_steps"),
    # Capped at the field's own limit: a default must never be the value that makes a spec invalid.
    "tbptt_k2": lambda get: min(2 * get("tbptt_k1"), BY_NAME["tbptt_k2"].high),
    "max_dependency": lambda get: max(get("num_steps"), BY_NAME["max_dependency"].low),
    "min_num_steps": lambda get: get("num_steps"),
    "max_num_steps": lambda get: min(4 * get("num_steps"), BY_NAME["max_num_steps"].high),
}


def complete(spec: jobs_pb2.JobSpec) -> jobs_pb2.JobSpec:
    """A copy of `spec` with every unset field given its default."""
    full = jobs_pb2.JobSpec()
    full.CopyFrom(spec)
    for f in FIELDS:
        if f.choices:
            if not getattr(full, f.name):
                setattr(full, f.name, f.default)
        elif not full.HasField(f.name):
            default = _DERIVED[f.name](lambda name: getattr(full, name)) if f.name in _DERIVED else f.default
            setattr(full, f.name, default)
    return full


# What a job started from another job's checkpoint (InitFrom) must share with
# it: the shape of every weight, and the vocabulary the weights read and write.
INIT_MUST_MATCH = ("model", "hidden_size", "num_layers", "embedding_size", "tie_weights", "tokenization", "preprocess",
                   "min_freq", "eos")


def init_must_match(spec, *, optimizer: bool, state: bool) -> tuple[str, ...]:
    """The fields `spec` must share with the checkpoint it starts from, given what it takes from it."""
    names = INIT_MUST_MATCH
    if spec.dataset in TASKS:  # a task's symbols set the input and output sizes
        names += ("dataset",)
    if optimizer:
        names += ("optimizer",)
    if state:  # the carried state is (layers, batch_size, hidden_size)
        names += ("batch_size",)
    return names


def rederivable(spec: jobs_pb2.JobSpec) -> jobs_pb2.JobSpec:
    """A copy of a complete spec whose derived fields (_DERIVED: lr, tbptt_k1, ...) are unset where they hold the
    value derived from the others: submitted again with changes, they are derived again from the changed
    fields (a switch to adam gets adam's lr), while values someone chose stay."""
    out = jobs_pb2.JobSpec()
    out.CopyFrom(spec)
    for name, derive in _DERIVED.items():
        if out.HasField(name) and getattr(out, name) == derive(lambda other: getattr(spec, other)):
            out.ClearField(name)
    return out


def resolved(config, name: str):
    """Field `name` of `config` (an object whose None means "unset", like the worker's TrainConfig), with the
    default a complete spec would have given it; the same rule as `complete`."""
    value = getattr(config, name)
    if value is None and name in _DERIVED:
        return _DERIVED[name](lambda other: resolved(config, other))
    return value


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
    model = MODELS.get(spec.model)
    if model is not None and model.max_layers == 1 and spec.num_layers != 1:
        out.append(("num_layers", f"must be 1 for model {spec.model}, got {spec.num_layers}"))
    if model is not None and spec.nonlinearity != "tanh" and not model.takes_nonlinearity:
        takes = " and ".join(name for name, m in MODELS.items() if m.takes_nonlinearity)
        out.append(("nonlinearity", f"applies only to models {takes}, not {spec.model}; leave it tanh"))
    k1, k2 = spec.tbptt_k1, spec.tbptt_k2
    if spec.truncation == "tbptt" and k1 is not None and k2 is not None and k2 < k1:
        out.append(("tbptt_k2", f"must be at least tbptt_k1 ({k1}), got {k2}"))
    lo, hi = spec.min_num_steps, spec.max_num_steps
    if spec.truncation == "auto" and lo is not None and hi is not None and not lo <= spec.num_steps <= hi:
        out.append(("num_steps", f"must lie between min_num_steps ({lo}) and max_num_steps ({hi}) with truncation "
                                 f"auto, got {spec.num_steps}"))
    out += _recipe_violations(spec)
    return out


# Models whose gates chrono initialisation sets.
_GATED = ("gru", "lstm")


def _recipe_violations(spec) -> list[tuple[str, str]]:
    """The settings that only make sense together: init, embedding dropout, tied weights, plateau."""
    out = []
    if spec.init == "chrono" and spec.model in MODELS and spec.model not in _GATED:
        out.append(("init", f"chrono sets the gate biases of {' and '.join(_GATED)}, and {spec.model} has no gates; "
                            "use init default or uniform"))
    if spec.embedding_dropout and not spec.embedding_size:
        out.append(("embedding_dropout", f"drops the learned embedding's output, and embedding_size is 0 (one-hot "
                                         f"input); set embedding_size, or leave embedding_dropout 0, "
                                         f"got {_num(spec.embedding_dropout)}"))
    if spec.tie_weights:
        if spec.dataset in TASKS and TASKS[spec.dataset].features:
            out.append(("tie_weights", f"needs a vocabulary, and {spec.dataset} reads real-valued features"))
        elif spec.embedding_size != spec.hidden_size:
            out.append(("tie_weights", f"needs embedding_size equal to hidden_size, got embedding_size "
                                       f"{spec.embedding_size} and hidden_size {spec.hidden_size}"))
    if spec.schedule == "plateau" and spec.dataset not in TASKS and spec.val_fraction == 0:
        out.append(("schedule", "plateau decays lr after evaluations, and val_fraction 0 holds nothing out to "
                                "evaluate; set val_fraction above 0, or use another schedule"))
    return out


# What one Generate request may ask for; the server enforces these, and the CLI checks them first.
MAX_PREFIX_CHARS = 10_000
MAX_GENERATE_TOKENS = 10_000
MAX_TEMPERATURE = 100.0

# truncation="full" on text backpropagates through whole rows of the corpus;
# longer rows than this are refused rather than left to exhaust memory.
FULL_MAX_STEPS = 10_000


def text_violations(spec, tokens: int) -> list[tuple[str, str]]:
    """Why a text of `tokens` tokens cannot train `spec` (a complete spec), in (field, reason) pairs.

    The last val_fraction of the tokens is held out; validation walks it in
    windows of num_steps, and training needs one full minibatch of what is left.
    """
    out = []
    held_out = math.floor(tokens * spec.val_fraction)
    train = tokens - held_out
    if spec.val_fraction > 0 and held_out < spec.num_steps + 1:
        out.append(("val_fraction", f"holds out {held_out} tokens of {tokens}, fewer than num_steps + 1 = "
                                    f"{spec.num_steps + 1}; raise val_fraction, or set it to 0 for no validation"))
    if spec.truncation == "full":
        row = (train - 1) // spec.batch_size
        if row < 1 or row > FULL_MAX_STEPS:
            out.append(("truncation", f"full backpropagates through whole rows of the text, here {row} tokens "
                                      f"long (batch_size {spec.batch_size}); rows must be 1 to {FULL_MAX_STEPS} "
                                      "tokens: use truncation fixed, or a larger batch_size"))
        return out
    window = spec.num_steps
    if spec.truncation == "tbptt":
        window = resolved(spec, "tbptt_k1" if spec.partition == "sequential" else "tbptt_k2")
    elif spec.truncation == "auto":
        window = resolved(spec, "max_num_steps")
    need = min_tokens(spec.batch_size, window)
    if train < need:
        out.append(("dataset", f"has {train} {spec.tokenization} tokens to train on (preprocess {spec.preprocess}, "
                               f"after holding out {held_out} for validation), but batch_size {spec.batch_size} "
                               f"and a window of {window} need at least {need}; lower batch_size or num_steps, "
                               "or upload more text"))
    return out


def sequence_length(spec) -> int:
    """Time steps in one sequence of a synthetic task."""
    return spec.seq_len + TASKS[spec.dataset].extra_steps


def min_tokens(batch_size: int, num_steps: int) -> int:
    """Fewest tokens that give one full minibatch of `batch_size` windows of `num_steps`.

    Each epoch starts at a random offset below num_steps, and the targets are the
    inputs shifted by one token, so that much more is needed than batch × T.
    """
    return num_steps * (batch_size + 1)


# ----------------------------------------------------------------------------- memory

# What a job may use when no live worker advertises a budget of its own.
DEFAULT_MEMORY_BUDGET_BYTES = 4 * 2**30
_FLOAT_BYTES = 4
# The training process's own resident memory before a job's tensors: Python,
# torch (its libraries, thread pools and allocator) and the worker's modules,
# as a worker's prefork child holds them, the pages it shares with its parent
# included, since a budget counts them like any other. Measured as the whole
# peak (VmHWM) of such a child training a tiny model: 268 MiB in
# bench/memory.py's forked child (BENCHMARKS.md's first row), 283 MiB in a real
# worker's pool child over a 3,000-step job. Counted with a third to spare.
# (Two torch threads there; sixteen added about 1 MiB.)
PROCESS_BYTES = 384 * 2**20
# Floats a training step holds at its peak per time step and sequence of the
# backward window per vocabulary entry (one-hot input, logits, their softmax and
# gradients); per hidden unit, each model's activation_floats (MODELS).
_VOCAB_FLOATS = 6


def shared_process_bytes(estimates: list[int], process_bytes: int = PROCESS_BYTES) -> int:
    """The memory of jobs that train in one process (a sweep's group): each one's estimate, the process counted once."""
    return sum(max(e - process_bytes, 0) for e in estimates) + process_bytes


def parameter_count(spec, vocab_size: int) -> int:
    """Weights of the model that `spec` describes, for a vocabulary of `vocab_size`."""
    model = MODELS[spec.model]
    h, gates, biases = spec.hidden_size, model.gates, model.biases
    inputs = spec.embedding_size or vocab_size
    embedding = spec.embedding_size * vocab_size
    recurrent = gates * h * (inputs + h + biases) + (spec.num_layers - 1) * gates * h * (2 * h + biases)
    # Tied output weights are the embedding matrix itself.
    output = 0 if spec.tie_weights else h * vocab_size
    return embedding + recurrent + output + vocab_size


def backprop_window(spec, steps_per_sequence: int) -> int:
    """How many time steps of activations one backward pass holds.

    `steps_per_sequence` is the length a sequence can run to: seq_len for a
    synthetic task, the length of one of the batch_size rows for text.
    """
    if spec.truncation == "full":
        return steps_per_sequence
    window = {"tbptt": spec.tbptt_k2, "auto": spec.max_num_steps}.get(spec.truncation, spec.num_steps)
    return min(window, steps_per_sequence)


def memory_estimate_bytes(spec, vocab_size: int, window: int) -> int:
    """An estimate, on the generous side, of a job's memory at its peak.

    That is the training process's own (PROCESS_BYTES), then weights,
    gradients, optimizer state, a checkpoint's serialized copy (twice:
    torch.save's buffer and the bytes taken from it) and one backward window's
    activations.
    """
    optimizer_slots = 2 if spec.optimizer in ("adam", "adamw") else 0
    weights = parameter_count(spec, vocab_size) * (4 + optimizer_slots)
    per_step = (spec.num_layers * spec.hidden_size * MODELS[spec.model].activation_floats
                + _VOCAB_FLOATS * vocab_size + 2 * spec.embedding_size)
    return PROCESS_BYTES + _FLOAT_BYTES * (weights + spec.batch_size * window * per_step)
