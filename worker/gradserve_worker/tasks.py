"""What a job trains on: a text (language modelling) or a synthetic long-range task.

Both are a stream of optimizer steps with the same interface, so the training
loop never asks which one it has:

    stream.sizes, stream.vocab              # build_model's size keywords; what a checkpoint keeps as vocabulary
    stream.start(model, epoch, pos, state)  # from the beginning, or from a checkpoint's stream.position()
    loss, n = stream.next_loss(model)       # forward of the next step's data (n time steps × sequences)
    batch, fresh = stream.next_batch()      # the same in parts, for a step that keeps its own buffers
    loss, state = stream.batch_loss(model, batch, state)  # (graphstep): fresh says the state restarts from zeros
    loss = stream.replay(model, trace)      # that step's forward again, deterministic, tracing every h_t
    loss, value = stream.evaluate(model)    # on held-out data (when stream.has_heldout), under no_grad
    stream.sanitize_state()                 # after a skipped step

Text: the token stream is split into a training part and the held-out last
val_fraction; an epoch walks the training part in windows (data.Window), each
one step, the hidden state carried between them (sequential partition) or
reset (random). Loss and metric are the mean cross-entropy per token.

Synthetic tasks have no text: every step is a batch of fresh sequences drawn
from (seed, step), the state starts from zeros for each, and the truncation
strategy cuts gradients inside them (truncation.run_sequence). Evaluation runs
on HELDOUT_SEQUENCES sequences drawn once from the seed; val_fraction and
partition do not apply.

builtin:adding (Hochreiter & Schmidhuber's adding problem)
    seq_len steps of two channels: a value uniform in [0, 1) and a marker, 1 at
    two positions (one in each half of the sequence) and 0 elsewhere. The
    target is the sum of the two marked values, predicted at the last step.
    Loss and metric: mean squared error. Baseline: always predicting 1.0, the
    target's mean, scores the target's variance, 2/12 ≈ 0.167.
builtin:copy (copy memory, as in Arjovsky et al.)
    10 symbols drawn from an alphabet of 8, then seq_len steps of blanks whose
    last one is the delimiter, then 10 more blanks during which the model must
    output the 10 symbols in order: seq_len + 20 steps in all. Loss: mean
    cross-entropy over the 10 recall positions; metric: accuracy there.
    Baseline: 1/8, what a memoryless model scores at best (each symbol is
    uniform and independent of everything it saw after the first 10 steps).
The metrics' perplexity is 0 for the synthetic tasks: their losses are not
per-token language-model cross-entropies.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from gradserve.spec import TASKS, text_violations

from gradserve_worker.data import (Window, build_corpus, epoch_windows, heldout_windows, seeded_generator,
                                   split_heldout, whole_rows)
from gradserve_worker.errors import CannotTrain
from gradserve_worker.truncation import Truncation, run_sequence, run_window

HELDOUT_SEQUENCES = 512

# -----------------------------------------------------------------------------
# text


class TextStream:
    """A text as a stream of TBPTT windows; see the module docstring."""

    metric, baseline, perplexity = "", 0.0, True

    def __init__(self, config, text: str, device: torch.device):
        self.config, self.device = config, device
        B = config.batch_size
        vocab, corpus = build_corpus(text, config.tokenization, config.preprocess, config.min_freq,
                                     config.eos)
        train_part, heldout = split_heldout(corpus, config.val_fraction)
        self.plan = Truncation.of(config)
        _check_text_size(config, len(corpus))
        self.vocab = vocab.tokens
        self.sizes = {"vocab_size": len(vocab)}
        self.corpus = train_part.to(device)
        self.heldout = heldout_windows(heldout.to(device), B, config.num_steps) if len(heldout) else []
        self.epoch, self.pos, self.state, self.zero_state = 0, 0, None, None
        self._warm = False
        self.windows = None
        self._last = None

    def start(self, model, epoch: int = 0, pos: int = 0, state: tuple[torch.Tensor, ...] | None = None) -> None:
        """Position the stream at window `pos` of `epoch` with the carried `state` (a checkpoint's, or none).

        A `state` given at the very start (epoch 0, window 0: another run's,
        to start from) is the first window's, where zeros would be otherwise.
        """
        self.zero_state = model.begin_state(self.config.batch_size, self.device)
        self.epoch, self.pos, self.state = epoch, pos, state
        self._warm = state is not None and epoch == 0 and pos == 0
        self.windows = self._epoch_windows(epoch)

    def _epoch_windows(self, epoch: int):
        c = self.config
        if c.truncation == "full":
            return whole_rows(self.corpus, c.batch_size)
        k2 = self.plan.k2 if self.plan.k2 != self.plan.k1 else None
        return epoch_windows(self.corpus, c.partition, c.batch_size, self.plan.k1, c.seed, epoch, k2)

    def set_window(self, n: int, *, restart: bool = True) -> None:
        """truncation auto: windows of n tokens from now on.

        The current pass was cut into windows of the old length, so a new pass
        starts (at its own random offset, the state from zeros) and what was
        left of the old one is skipped; restart=False only sets the length,
        for a stream about to be positioned from a checkpoint.
        """
        self.plan = Truncation(n, n)
        if restart and self.windows is not None:
            self.epoch, self.pos = (self.epoch + 1, 0) if self.pos else (self.epoch, 0)
            self.windows = self._epoch_windows(self.epoch)

    def next_loss(self, model) -> tuple[torch.Tensor, int]:
        """(loss, tokens) of the next window: mean cross-entropy over its new tokens, and their count."""
        window, fresh = self.next_batch()
        if fresh:
            self.state = self.zero_state
        self.keep_for_replay(window, self.state)
        loss, self.state = self.batch_loss(model, window, self.state)
        return loss, self.tokens(window)

    def next_batch(self) -> tuple[Window, bool]:
        """The next window, and whether its state starts from zeros rather than where the last one left it."""
        if self.pos == len(self.windows):
            self.epoch, self.pos = self.epoch + 1, 0
            self.windows = self._epoch_windows(self.epoch)
        fresh = (self.pos == 0 and not self._warm) or not self.windows.carries_state
        self._warm = False
        window = self.windows[self.pos]
        self.pos += 1
        return window, fresh

    def batch_loss(self, model, window: Window, state: tuple[torch.Tensor, ...]):
        """(loss, carried state) of a window run from `state`."""
        outputs, carried, _ = run_window(model, window.X, state, window.carry_at, self.plan.keep)
        return self._loss(outputs, window), carried

    def keep_for_replay(self, window: Window, state: tuple[torch.Tensor, ...]) -> None:
        self._last = (window, state)

    @staticmethod
    def tokens(window: Window) -> int:
        return window.Y.numel() - window.context * window.Y.shape[1]

    @staticmethod
    def _loss(outputs: torch.Tensor, window) -> torch.Tensor:
        if window.context:  # TBPTT's context steps are only there for the gradient to flow through
            new = window.context * window.Y.shape[1]
            return F.cross_entropy(outputs[new:], window.Y[window.context :].reshape(-1))
        return F.cross_entropy(outputs, window.Y.reshape(-1))

    def replay(self, model, trace: list[list[torch.Tensor]]) -> torch.Tensor:
        """The last window's loss again from the same starting state, tracing the hidden states; no ξ cuts."""
        window, state = self._last
        outputs, _, _ = run_window(model, window.X, state, window.carry_at, None, trace)
        return self._loss(outputs, window)

    def sanitize_state(self) -> None:
        """After a skipped step: a carried state that is no longer finite restarts from zeros."""
        if not all(torch.isfinite(s).all() for s in self.state):
            self.state = self.zero_state

    def evaluate(self, model) -> tuple[float, float]:
        """(mean cross-entropy per held-out token, 0: text has no task metric): sequential windows, state carried."""
        total = torch.zeros((), device=self.device, dtype=torch.float64)
        count = 0
        state = model.begin_state(self.heldout[0][0].shape[1], self.device)
        for X, Y in self.heldout:
            outputs, state = model(X, state)
            total += F.cross_entropy(outputs, Y.reshape(-1), reduction="sum").double()
            count += Y.numel()
        return total.item() / count, 0.0

    @property
    def has_heldout(self) -> bool:
        return bool(self.heldout)

    def position(self) -> dict:
        return {"epoch": self.epoch, "position": self.pos, "state": [s.detach() for s in self.state or ()]}


def _check_text_size(config, tokens: int) -> None:
    """Refuse, with the numbers, a text too short for one training step or one held-out window.

    The rule is the server's (gradserve.spec.text_violations), so a job it
    accepted passes here; direct callers of the trainer get the same answer.
    """
    problems = text_violations(config, tokens)
    if problems:
        raise CannotTrain("; ".join(f"{field} {reason}" for field, reason in problems))


# -----------------------------------------------------------------------------
# synthetic tasks


def task_generator(seed: int, purpose: str, index: int = 0) -> torch.Generator:
    """A generator seeded from (seed, purpose, index) alone: step i's batch is the same on every run and resume."""
    return seeded_generator(seed, purpose, index)


class AddingTask:
    """The adding problem; see the module docstring."""

    name = "builtin:adding"
    metric = "mse"
    sizes = {"vocab_size": 0, "features": TASKS[name].symbols, "output_size": 1}
    vocab: list[str] = []

    def __init__(self, seq_len: int):
        self.seq_len = seq_len
        self.length = seq_len + TASKS[self.name].extra_steps

    def sample(self, n: int, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """n sequences: X (seq_len, n, 2) and the targets (n,)."""
        L, half = self.seq_len, self.seq_len // 2
        values = torch.rand(L, n, generator=gen)
        first = torch.randint(0, half, (n,), generator=gen)
        second = torch.randint(half, L, (n,), generator=gen)
        markers = torch.zeros(L, n)
        cols = torch.arange(n)
        markers[first, cols] = 1.0
        markers[second, cols] = 1.0
        return torch.stack([values, markers], dim=-1), values[first, cols] + values[second, cols]

    def loss(self, outputs: torch.Tensor, Y: torch.Tensor) -> torch.Tensor:
        return F.mse_loss(outputs[-len(Y) :, 0], Y)

    def score(self, outputs: torch.Tensor, Y: torch.Tensor) -> tuple[float, float]:
        """(summed loss, summed metric) over the sequences of one batch."""
        sq = F.mse_loss(outputs[-len(Y) :, 0], Y, reduction="sum").item()
        return sq, sq

    def baseline(self, Y: torch.Tensor) -> float:
        return F.mse_loss(torch.ones_like(Y), Y).item()


class CopyTask:
    """Copy memory; see the module docstring."""

    name = "builtin:copy"
    metric = "accuracy"
    # SYMBOLS shown, then recalled, which is the task's extra steps (gradserve.spec.TASKS).
    SYMBOLS, ALPHABET, BLANK, DELIMITER = TASKS[name].extra_steps // 2, 8, 0, 9  # symbols are 1..8
    vocab = ["<blank>", *"abcdefgh", "<delimiter>"]
    sizes = {"vocab_size": len(vocab)}

    def __init__(self, seq_len: int):
        self.seq_len = seq_len
        self.length = seq_len + TASKS[self.name].extra_steps

    def sample(self, n: int, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """n sequences: X (seq_len + 20, n) symbol ids and the symbols to recall (10, n)."""
        symbols = torch.randint(1, self.ALPHABET + 1, (self.SYMBOLS, n), generator=gen)
        X = torch.full((self.length, n), self.BLANK, dtype=torch.long)
        X[: self.SYMBOLS] = symbols
        X[self.SYMBOLS + self.seq_len - 1] = self.DELIMITER
        return X, symbols

    def loss(self, outputs: torch.Tensor, Y: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(outputs[-Y.numel() :], Y.reshape(-1))

    def score(self, outputs: torch.Tensor, Y: torch.Tensor) -> tuple[float, float]:
        recall = outputs[-Y.numel() :]
        ce = F.cross_entropy(recall, Y.reshape(-1), reduction="sum").item() / self.SYMBOLS
        hits = (recall.argmax(-1) == Y.reshape(-1)).sum().item() / self.SYMBOLS
        return ce, hits

    def baseline(self, Y: torch.Tensor) -> float:
        return 1 / self.ALPHABET


SYNTHETIC = {task.name: task for task in (AddingTask, CopyTask)}


class SyntheticStream:
    """A synthetic task as a stream of steps, each a batch of fresh sequences; see the module docstring."""

    perplexity = False
    has_heldout = True

    def __init__(self, config, device: torch.device):
        self.config, self.device = config, device
        self.task = SYNTHETIC[config.dataset](config.seq_len)
        self.metric, self.sizes, self.vocab = self.task.metric, self.task.sizes, self.task.vocab
        self.plan = Truncation.of(config, self.task.length)
        self.tokens_per_step = config.batch_size * self.task.length
        self.heldout = self.task.sample(HELDOUT_SEQUENCES, task_generator(config.seed, "heldout"))
        self.baseline = self.task.baseline(self.heldout[1])
        self.step, self.zero_state, self._last = 0, None, None

    def start(self, model, epoch: int = 0, pos: int = 0, state=None) -> None:
        self.zero_state = model.begin_state(self.config.batch_size, self.device)
        self.step = pos

    @property
    def epoch(self) -> int:
        return 0  # the data never repeats

    def next_loss(self, model) -> tuple[torch.Tensor, int]:
        batch, _ = self.next_batch()
        self.keep_for_replay(batch, self.zero_state)
        loss, _ = self.batch_loss(model, batch, self.zero_state)
        return loss, self.tokens(batch)

    def next_batch(self) -> tuple[Window, bool]:
        """The next step's sequences as a Window, and True: every step starts its sequences from zeros."""
        X, Y = self.task.sample(self.config.batch_size, task_generator(self.config.seed, "train", self.step))
        self.step += 1
        return Window(self._to_device(X), self._to_device(Y), 0, len(X)), True

    def _to_device(self, t: torch.Tensor) -> torch.Tensor:
        # From pinned memory the copy is asynchronous: the host does not wait for the GPU to drain first.
        return t.pin_memory().to(self.device, non_blocking=True) if self.device.type == "cuda" else t

    def batch_loss(self, model, batch: Window, state: tuple[torch.Tensor, ...]):
        """(loss, state): the task's loss over the sequences, each cut as the plan says; the state is not carried."""
        return self.task.loss(run_sequence(model, batch.X, self.plan, state), batch.Y), state

    def keep_for_replay(self, batch: Window, state: tuple[torch.Tensor, ...]) -> None:
        self._last = (batch.X, batch.Y)

    def tokens(self, batch: Window) -> int:
        return self.tokens_per_step

    def set_window(self, n: int, *, restart: bool = True) -> None:
        """truncation auto: cut each sequence into windows of n steps from the next step on."""
        self.plan = Truncation(n, n)

    def replay(self, model, trace: list[list[torch.Tensor]]) -> torch.Tensor:
        X, Y = self._last
        plan = Truncation(self.plan.k1, self.plan.k2)  # the expected gradient: no ξ cuts
        return self.task.loss(run_sequence(model, X, plan, self.zero_state, trace_last=trace), Y)

    def sanitize_state(self) -> None:
        """Nothing to do: every step starts its sequences from zeros."""

    def evaluate(self, model) -> tuple[float, float]:
        """(mean loss, mean metric) over the held-out sequences, batch_size at a time."""
        X, Y = self.heldout
        n, B = Y.shape[-1], self.config.batch_size
        loss = value = 0.0
        for i in range(0, n, B):
            x, y = X[:, i : i + B].to(self.device), Y[..., i : i + B].to(self.device)
            outputs, _ = model(x, model.begin_state(y.shape[-1], self.device))
            batch_loss, batch_value = self.task.score(outputs, y)
            loss, value = loss + batch_loss, value + batch_value
        return loss / n, value / n

    def position(self) -> dict:
        return {"epoch": 0, "position": self.step, "state": []}


# -----------------------------------------------------------------------------


def make_stream(config, text: str, device: torch.device):
    """The stream a config trains on: its synthetic task, or `text`."""
    if config.dataset in SYNTHETIC:
        return SyntheticStream(config, device)
    return TextStream(config, text, device)


def perplexity(loss: float) -> float:
    try:
        return math.exp(loss)
    except OverflowError:
        return math.inf
