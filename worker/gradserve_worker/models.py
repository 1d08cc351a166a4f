"""The recurrent language models a job can train.

Every model has the same small interface, so the training loop never asks which
one it holds:

    logits, state = model(X, state)   # X: (T, B) token ids; logits: (T*B, vocab), time-major
    state = model.begin_state(B, device)

`state` is always a tuple of tensors: (h,) for the tanh RNNs and the GRU,
(h, c) for the LSTM.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

# -----------------------------------------------------------------------------
# from scratch


ACTIVATIONS = {"tanh": torch.tanh, "relu": torch.relu}


class RNNScratch(nn.Module):
    """d2l's RNN from scratch, one layer:

        h_t = tanh(x_t W_xh + h_{t-1} W_hh + b_h)
        o_t = h_t W_hq + b_q

    x_t is the one-hot of token t, so x_t W_xh is simply row `token` of W_xh.
    With nonlinearity="relu" the recurrence is unbounded, which is what makes
    exploding gradients easy to see.
    """

    def __init__(self, vocab_size: int, hidden_size: int, nonlinearity: str = "tanh"):
        super().__init__()
        self.vocab_size, self.hidden_size = vocab_size, hidden_size
        self.activation = ACTIVATIONS[nonlinearity]
        self.W_xh = nn.Parameter(torch.randn(vocab_size, hidden_size) * 0.01)
        self.W_hh = nn.Parameter(torch.randn(hidden_size, hidden_size) * 0.01)
        self.b_h = nn.Parameter(torch.zeros(hidden_size))
        self.W_hq = nn.Parameter(torch.randn(hidden_size, vocab_size) * 0.01)
        self.b_q = nn.Parameter(torch.zeros(vocab_size))

    def begin_state(self, batch_size: int, device) -> tuple[torch.Tensor, ...]:
        return (torch.zeros(batch_size, self.hidden_size, device=device),)

    def forward(self, X: torch.Tensor, state: tuple[torch.Tensor, ...]):
        (h,) = state
        # The input term of every step in one lookup: embedding(X, W_xh) == one_hot(X) @ W_xh.
        xw = F.embedding(X, self.W_xh) + self.b_h
        hs = []
        for xw_t in xw:
            # addmm fuses h @ W_hh with the add; only this recurrence is inherently sequential.
            h = self.activation(torch.addmm(xw_t, h, self.W_hh))
            hs.append(h)
        # The output layer has no recurrence, so it runs as one matmul over all T steps.
        logits = torch.addmm(self.b_q, torch.stack(hs).view(-1, self.hidden_size), self.W_hq)
        return logits, (h,)


# -----------------------------------------------------------------------------
# torch.nn layers


LAYERS = {"rnn": nn.RNN, "gru": nn.GRU, "lstm": nn.LSTM}


class TorchRNN(nn.Module):
    """d2l's RNNModel: an nn.RNN (tanh or relu), nn.GRU or nn.LSTM fed one-hot tokens, and a linear output layer."""

    def __init__(self, kind: str, vocab_size: int, hidden_size: int, num_layers: int, nonlinearity: str = "tanh"):
        super().__init__()
        self.vocab_size, self.hidden_size, self.num_layers = vocab_size, hidden_size, num_layers
        self.is_lstm = kind == "lstm"
        extra = {"nonlinearity": nonlinearity} if kind == "rnn" else {}
        self.rnn = LAYERS[kind](vocab_size, hidden_size, num_layers=num_layers, **extra)
        self.linear = nn.Linear(hidden_size, vocab_size)

    def begin_state(self, batch_size: int, device) -> tuple[torch.Tensor, ...]:
        h = torch.zeros(self.num_layers, batch_size, self.hidden_size, device=device)
        return (h, torch.zeros_like(h)) if self.is_lstm else (h,)

    def forward(self, X: torch.Tensor, state: tuple[torch.Tensor, ...]):
        x = F.one_hot(X, self.vocab_size).float()
        out, hx = self.rnn(x, state if self.is_lstm else state[0])
        logits = self.linear(out.view(-1, self.hidden_size))
        return logits, (hx if self.is_lstm else (hx,))


def build_model(model: str, vocab_size: int, hidden_size: int, num_layers: int,
                nonlinearity: str = "tanh") -> nn.Module:
    """The model a job names, with freshly initialised weights (from torch's global RNG)."""
    if model == "rnn_scratch":
        if num_layers != 1:
            raise ValueError(f"num_layers must be 1 for model rnn_scratch, got {num_layers}")
        return RNNScratch(vocab_size, hidden_size, nonlinearity)
    if model in LAYERS:
        return TorchRNN(model, vocab_size, hidden_size, num_layers, nonlinearity)
    raise ValueError(f"unknown model {model!r}; expected rnn_scratch, rnn, gru or lstm")
