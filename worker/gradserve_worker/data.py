"""From text to minibatches: the vocabulary, the corpus tensor and the two ways
of cutting it into truncated-BPTT windows (d2l.ai chapter 9).

Every window is time-major: X and Y are (num_steps, batch_size) LongTensors and
Y is X shifted one token ahead in the corpus, so ``Y.reshape(-1)`` lines up with
the (num_steps * batch_size, vocab) logits the models return.
"""

from __future__ import annotations

import hashlib
from collections import Counter

import torch
from gradserve.text import preprocess, tokenize

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


def build_corpus(text: str, tokenization: str, mode: str, min_freq: int = 1) -> tuple[Vocab, torch.Tensor]:
    """The vocabulary of `text` and the whole text as one 1-D LongTensor of indices.

    Tokenising goes through gradserve.text so the server's token counts agree
    with what the worker trains on.
    """
    tokens = tokenize(preprocess(text, mode), tokenization)
    vocab = Vocab(tokens, min_freq)
    return vocab, torch.tensor(vocab.encode(tokens), dtype=torch.long)


# -----------------------------------------------------------------------------
# partitioning


def epoch_generator(seed: int, epoch: int) -> torch.Generator:
    """A generator seeded from (seed, epoch) alone, so any epoch's windows can be
    rebuilt on resume without replaying the epochs before it."""
    digest = hashlib.blake2b(f"{seed}:{epoch}".encode(), digest_size=8).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest, "little") >> 1)


def _random_offset(num_steps: int, gen: torch.Generator) -> int:
    # Where the first window starts, in [0, num_steps): a different cut each epoch, like d2l.
    return int(torch.randint(0, num_steps, (1,), generator=gen))


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
    """

    carries_state = True

    def __init__(self, corpus: torch.Tensor, batch_size: int, num_steps: int, gen: torch.Generator):
        offset = _random_offset(num_steps, gen)
        row_len = (len(corpus) - offset - 1) // batch_size
        self.num_steps = num_steps
        self.num_windows = row_len // num_steps
        n = batch_size * row_len
        # Stored time-major and contiguous once per epoch, so each window is a free slice.
        self.X = corpus[offset : offset + n].view(batch_size, row_len).T.contiguous()
        self.Y = corpus[offset + 1 : offset + 1 + n].view(batch_size, row_len).T.contiguous()

    def __len__(self) -> int:
        return self.num_windows

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        cols = slice(i * self.num_steps, (i + 1) * self.num_steps)
        return self.X[cols], self.Y[cols]


class RandomWindows:
    """d2l's seq_data_iter_random: independent windows in shuffled order.

    After a random offset the corpus is cut into non-overlapping subsequences
    of num_steps tokens; a minibatch is batch_size of them, drawn in a shuffled
    order. Column b of one minibatch does not continue column b of the one
    before, so the hidden state starts from zeros for every minibatch.
    """

    carries_state = False

    def __init__(self, corpus: torch.Tensor, batch_size: int, num_steps: int, gen: torch.Generator):
        offset = _random_offset(num_steps, gen)
        num_subseqs = (len(corpus) - offset - 1) // num_steps
        self.num_windows = num_subseqs // batch_size
        starts = offset + num_steps * torch.randperm(num_subseqs, generator=gen)
        self.corpus = corpus
        self.starts = starts[: self.num_windows * batch_size].view(self.num_windows, batch_size).to(corpus.device)
        self.steps = torch.arange(num_steps, device=corpus.device).unsqueeze(1)

    def __len__(self) -> int:
        return self.num_windows

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        idx = self.starts[i] + self.steps  # (T, batch_size) positions in the corpus
        return self.corpus[idx], self.corpus[idx + 1]


PARTITIONS = {"sequential": SequentialWindows, "random": RandomWindows}


def epoch_windows(corpus: torch.Tensor, partition: str, batch_size: int, num_steps: int, seed: int, epoch: int):
    """The windows of one epoch: a sequence of (X, Y) pairs with a `carries_state` flag."""
    return PARTITIONS[partition](corpus, batch_size, num_steps, epoch_generator(seed, epoch))
