"""From text to minibatches: the vocabulary, the corpus tensor, the held-out
split, and the two ways of cutting the training part into truncated-BPTT
windows (d2l.ai chapter 9).

Every window is time-major: X and Y are (length, batch_size) LongTensors and
Y is X shifted one token ahead in the corpus, so ``Y.reshape(-1)`` lines up with
the (length * batch_size, vocab) logits the models return.

A window is what one optimizer step trains on. With fixed truncation it is
num_steps tokens, all of them in the loss. With Williams & Peng's TBPTT(k1, k2)
it reaches k2 tokens back but only its last k1 tokens are new and in the loss;
the first k2 − k1 (its `context`) were already trained on by earlier windows
and are there so that the gradient flows back through them. TBPTT(k, k) is the
fixed window of k tokens.
"""

from __future__ import annotations

import hashlib
from collections import Counter
from typing import NamedTuple

import torch
from gradserve.text import text_tokens

UNK = "<unk>"

# -----------------------------------------------------------------------------
# vocabulary and corpus


class Vocab:
    """Token <-> index, like d2l's Vocab.

    Index 0 is ``<unk>``; the other tokens follow by descending frequency, ties
    broken by the token string so that the same text always gives the same
    indices. Tokens seen fewer than `min_freq` times map to ``<unk>``.
    """

    def __init__(self, tokens: list[str], min_freq: int = 1):
        counts = Counter(tokens)
        ranked = sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))
        self.tokens = [UNK] + [tok for tok, n in ranked if n >= min_freq and tok != UNK]
        self.index = {tok: i for i, tok in enumerate(self.tokens)}

    def __len__(self) -> int:
        return len(self.tokens)

    def encode(self, tokens: list[str]) -> list[int]:
        return [self.index.get(tok, 0) for tok in tokens]


def build_corpus(text: str, tokenization: str, mode: str, min_freq: int = 1,
                 eos: bool = False) -> tuple[Vocab, torch.Tensor]:
    """The vocabulary of `text` and the whole text as one 1-D LongTensor of indices.

    Tokenising goes through gradserve.text so the server's token counts agree
    with what the worker trains on.
    """
    tokens = text_tokens(text, tokenization, mode, eos)
    vocab = Vocab(tokens, min_freq)
    return vocab, torch.tensor(vocab.encode(tokens), dtype=torch.long)


# -----------------------------------------------------------------------------
# held-out split


def split_heldout(corpus: torch.Tensor, val_fraction: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(training part, held-out part): the held-out part is the last floor(len × val_fraction) tokens."""
    n_val = int(len(corpus) * val_fraction)
    return corpus[: len(corpus) - n_val], corpus[len(corpus) - n_val :]


def heldout_windows(corpus: torch.Tensor, batch_size: int, num_steps: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The held-out stream as sequential windows that cover all of it (but for fewer than `rows` tokens).

    Like SequentialWindows with no offset: `rows` = min(batch_size, (n − 1) // num_steps)
    equal rows walked num_steps at a time, the last window shorter when the
    row length is not a multiple of num_steps. Needs n ≥ num_steps + 1.
    """
    rows = min(batch_size, (len(corpus) - 1) // num_steps)
    row_len = (len(corpus) - 1) // rows
    n = rows * row_len
    X = corpus[:n].view(rows, row_len).T
    Y = corpus[1 : n + 1].view(rows, row_len).T
    return [(X[i : i + num_steps], Y[i : i + num_steps]) for i in range(0, row_len, num_steps)]


# -----------------------------------------------------------------------------
# partitioning


class Window(NamedTuple):
    """What one optimizer step trains on (see the module docstring)."""

    X: torch.Tensor  # (length, batch_size) inputs
    Y: torch.Tensor  # (length, batch_size) next tokens
    context: int  # leading steps that are not in the loss (TBPTT's k2 − k1; 0 for fixed windows)
    carry_at: int  # the state after this many steps starts the next window; len(X) when it continues past the end


def seeded_generator(*key) -> torch.Generator:
    """A generator seeded from `key` alone (like (seed, epoch)), so that any epoch's
    windows or any step's batch can be rebuilt on resume without replaying the ones before it."""
    digest = hashlib.blake2b(":".join(map(str, key)).encode(), digest_size=8).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest, "little") >> 1)


def _random_offset(num_steps: int, gen: torch.Generator) -> int:
    # Where the first window starts, in [0, num_steps): a different cut each epoch, like d2l.
    return int(torch.randint(0, num_steps, (1,), generator=gen))


def tbptt_bounds(i: int, k1: int, k2: int, length: int) -> tuple[int, int, int, int]:
    """(start, end, context, carry_at) of window i of TBPTT(k1, k2) over a stream of `length` steps.

    Window i's new steps are [i·k1, (i+1)·k1) (the last one cut at `length`); it
    reaches back to (i+1)·k1 − k2, or to the stream's start. Window i+1 starts
    k1 steps later, which is inside window i because k2 ≥ k1, so its starting
    state is window i's state after carry_at steps.
    """
    start = max(0, (i + 1) * k1 - k2)
    end = min(length, (i + 1) * k1)
    next_start = max(0, (i + 2) * k1 - k2)
    return start, end, i * k1 - start, min(next_start, end) - start


class SequentialWindows:
    r"""d2l's seq_data_iter_sequential: windows that continue each other.

    After a random offset the corpus is cut into batch_size equal rows, one per
    sequence in the batch, and the rows are walked left to right num_steps
    tokens at a time, so column b of window i+1 starts where column b of window
    i ended: that is what lets the hidden state carry over. With batch_size 3,
    num_steps 4 and offset 1 (the tail that fills no row is dropped):

        corpus:  x a b c d e f g h i j k l m n o p q r s t u v w x y z
                   \_____________/ \_____________/ \_____________/
                        row 0           row 1           row 2

                   window 0   window 1
                 +----------+----------+
          row 0  | a b c d  | e f g h  |
          row 1  | i j k l  | m n o p  |      X of window i: columns [i*T, (i+1)*T)
          row 2  | q r s t  | u v w x  |      of the rows, transposed to (T, batch_size)
                 +----------+----------+

    Y is the same cut one token further along (window 0, row 0: b c d e).

    With TBPTT(k1, k2) the walk advances k1 tokens per window and each window
    reaches k2 tokens back (tbptt_bounds); num_steps is k1 = k2. `offset` None
    draws the random offset from `gen`.
    """

    carries_state = True

    def __init__(self, corpus: torch.Tensor, batch_size: int, num_steps: int, gen: torch.Generator,
                 k2: int | None = None, offset: int | None = None):
        offset = _random_offset(num_steps, gen) if offset is None else offset
        row_len = (len(corpus) - offset - 1) // batch_size
        self.k1, self.k2 = num_steps, k2 or num_steps
        self.num_windows = row_len // num_steps
        n = batch_size * row_len
        # Stored time-major and contiguous once per epoch, so each window is a free slice.
        self.X = corpus[offset : offset + n].view(batch_size, row_len).T.contiguous()
        self.Y = corpus[offset + 1 : offset + 1 + n].view(batch_size, row_len).T.contiguous()

    def __len__(self) -> int:
        return self.num_windows

    def __getitem__(self, i: int) -> Window:
        start, end, context, carry_at = tbptt_bounds(i, self.k1, self.k2, len(self.X))
        return Window(self.X[start:end], self.Y[start:end], context, carry_at)


class RandomWindows:
    """d2l's seq_data_iter_random: independent windows in shuffled order.

    After a random offset the corpus is cut into non-overlapping subsequences
    of num_steps tokens; a minibatch is batch_size of them, drawn in a shuffled
    order. Column b of one minibatch does not continue column b of the one
    before, so the hidden state starts from zeros for every minibatch.

    With TBPTT(k1, k2) the subsequences are k2 tokens long and only their last
    k1 are in the loss: the first k2 − k1 warm the state up, and the gradient
    reaches back through them.
    """

    carries_state = False

    def __init__(self, corpus: torch.Tensor, batch_size: int, num_steps: int, gen: torch.Generator,
                 k2: int | None = None):
        length = k2 or num_steps
        offset = _random_offset(length, gen)
        num_subseqs = (len(corpus) - offset - 1) // length
        self.num_windows = num_subseqs // batch_size
        self.context = length - num_steps
        starts = offset + length * torch.randperm(num_subseqs, generator=gen)
        self.corpus = corpus
        self.starts = starts[: self.num_windows * batch_size].view(self.num_windows, batch_size).to(corpus.device)
        self.steps = torch.arange(length, device=corpus.device).unsqueeze(1)

    def __len__(self) -> int:
        return self.num_windows

    def __getitem__(self, i: int) -> Window:
        idx = self.starts[i] + self.steps  # (length, batch_size) positions in the corpus
        return Window(self.corpus[idx], self.corpus[idx + 1], self.context, len(self.steps))


PARTITIONS = {"sequential": SequentialWindows, "random": RandomWindows}


def epoch_windows(corpus: torch.Tensor, partition: str, batch_size: int, num_steps: int, seed: int, epoch: int,
                  k2: int | None = None):
    """The windows of one epoch: a sequence of Windows with a `carries_state` flag.

    num_steps is the window (TBPTT's k1); k2, when given, how far each window reaches back.
    """
    return PARTITIONS[partition](corpus, batch_size, num_steps, seeded_generator(seed, epoch), k2)


def whole_rows(corpus: torch.Tensor, batch_size: int) -> SequentialWindows:
    """Full BPTT on a text: one window per epoch, each of the batch_size rows backpropagated end to end."""
    row_len = (len(corpus) - 1) // batch_size
    return SequentialWindows(corpus, batch_size, row_len, torch.Generator(), offset=0)
