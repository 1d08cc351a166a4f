"""The baseline `bench/run.py` measures gradserve's trainer against: a plain
training loop written the way d2l.ai chapter 9 writes it (train_epoch_ch8).

That means: batch-major (batch_size, num_steps) minibatches from a sequential
iterator with a random offset per epoch; one-hot inputs (F.one_hot); for
rnn_scratch, the textbook's RNN from scratch, a Python loop over time steps of
one_hot @ W_xh + H @ W_hh, with the output layer applied at every step; for
rnn/gru/lstm, an nn.RNN/GRU/LSTM and a linear head; the state detached between
minibatches; mean cross-entropy; backward; clipping by global gradient norm
(computed as a Python-level sum, compared on the host); an SGD step (the
textbook's own in-place update for the scratch model, torch.optim.SGD for the
others); and the loss read back after every step to accumulate perplexity.

Weights are drawn in the same order and shapes as gradserve's models, so with
the same seed both start from the same parameters.
"""

from __future__ import annotations

import math
import random
import time
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

# d2l's scale for the scratch model's random weights.
INIT_SCALE = 0.01


def seq_data_iter_sequential(corpus: torch.Tensor, batch_size: int, num_steps: int, rng: random.Random):
    """Minibatches whose rows continue each other from one minibatch to the next (d2l's sequential sampler)."""
    offset = rng.randint(0, num_steps)
    num_tokens = ((len(corpus) - offset - 1) // batch_size) * batch_size
    xs = corpus[offset : offset + num_tokens].reshape(batch_size, -1)
    ys = corpus[offset + 1 : offset + 1 + num_tokens].reshape(batch_size, -1)
    for i in range(0, (xs.shape[1] // num_steps) * num_steps, num_steps):
        yield xs[:, i : i + num_steps], ys[:, i : i + num_steps]


class RNNModelScratch:
    """d2l's RNN from scratch: parameters in a list, a forward function, and one-hot inputs."""

    def __init__(self, vocab_size: int, num_hiddens: int, device: torch.device):
        self.vocab_size, self.num_hiddens = vocab_size, num_hiddens

        def normal(*shape):
            return torch.randn(size=shape, device=device) * INIT_SCALE

        self.params = [
            normal(vocab_size, num_hiddens),  # W_xh
            normal(num_hiddens, num_hiddens),  # W_hh
            torch.zeros(num_hiddens, device=device),  # b_h
            normal(num_hiddens, vocab_size),  # W_hq
            torch.zeros(vocab_size, device=device),  # b_q
        ]
        for p in self.params:
            p.requires_grad_(True)

    def parameters(self):
        return self.params

    def begin_state(self, batch_size: int, device: torch.device):
        return (torch.zeros((batch_size, self.num_hiddens), device=device),)

    def __call__(self, X: torch.Tensor, state):
        inputs = F.one_hot(X.T, self.vocab_size).type(torch.float32)
        W_xh, W_hh, b_h, W_hq, b_q = self.params
        (H,) = state
        outputs = []
        for x in inputs:
            H = torch.tanh(torch.mm(x, W_xh) + torch.mm(H, W_hh) + b_h)
            outputs.append(torch.mm(H, W_hq) + b_q)
        return torch.cat(outputs, dim=0), (H,)


class RNNModel(nn.Module):
    """d2l's RNNModel: a torch recurrent layer fed one-hot tokens, and a linear output layer."""

    def __init__(self, rnn_layer: nn.Module, vocab_size: int):
        super().__init__()
        self.rnn, self.vocab_size = rnn_layer, vocab_size
        self.num_hiddens = rnn_layer.hidden_size
        self.linear = nn.Linear(self.num_hiddens, vocab_size)

    def forward(self, inputs: torch.Tensor, state):
        X = F.one_hot(inputs.T.long(), self.vocab_size).to(torch.float32)
        Y, state = self.rnn(X, state)
        return self.linear(Y.reshape((-1, Y.shape[-1]))), state

    def begin_state(self, batch_size: int, device: torch.device):
        shape = (self.rnn.num_layers, batch_size, self.num_hiddens)
        if isinstance(self.rnn, nn.LSTM):
            return (torch.zeros(shape, device=device), torch.zeros(shape, device=device))
        return torch.zeros(shape, device=device)


def build(model: str, vocab_size: int, hidden_size: int, device: torch.device):
    if model == "rnn_scratch":
        return RNNModelScratch(vocab_size, hidden_size, device)
    layer = {"rnn": nn.RNN, "gru": nn.GRU, "lstm": nn.LSTM}[model](vocab_size, hidden_size)
    return RNNModel(layer, vocab_size).to(device)


def grad_clipping(net, theta: float) -> None:
    """d2l's clipping: the global norm as a sum over parameters, compared on the host."""
    params = [p for p in net.parameters() if p.requires_grad]
    norm = torch.sqrt(sum(torch.sum(p.grad**2) for p in params))
    if norm > theta:
        for p in params:
            p.grad[:] *= theta / norm


def sgd(params, lr: float, batch_size: int) -> None:
    """d2l's minibatch SGD, in place."""
    with torch.no_grad():
        for p in params:
            p -= lr * p.grad / batch_size
            p.grad.zero_()


@dataclass
class Run:
    losses: list[float] = field(default_factory=list)  # mean cross-entropy of each step
    ends: list[float] = field(default_factory=list)  # perf_counter() at the end of each step


def train(model: str, corpus: torch.Tensor, vocab_size: int, *, hidden_size: int, batch_size: int, num_steps: int,
          lr: float, clip: float, steps: int, seed: int, device: torch.device) -> Run:
    """`steps` optimizer steps of train_epoch_ch8 over as many epochs as that takes."""
    torch.manual_seed(seed)
    net = build(model, vocab_size, hidden_size, device)
    scratch = isinstance(net, RNNModelScratch)
    optimizer = None if scratch else torch.optim.SGD(net.parameters(), lr)
    loss_fn = nn.CrossEntropyLoss()
    rng = random.Random(seed)
    corpus = corpus.to(device)
    run = Run()
    while len(run.losses) < steps:
        state = None
        for X, Y in seq_data_iter_sequential(corpus, batch_size, num_steps, rng):
            if state is None:
                state = net.begin_state(batch_size, device)
            elif isinstance(state, tuple):
                for s in state:
                    s.detach_()
            else:
                state.detach_()
            y = Y.T.reshape(-1)
            y_hat, state = net(X, state)
            loss = loss_fn(y_hat, y.long()).mean()
            if scratch:
                loss.backward()
                grad_clipping(net, clip)
                sgd(net.params, lr, batch_size=1)  # the loss is a mean already
            else:
                optimizer.zero_grad()
                loss.backward()
                grad_clipping(net, clip)
                optimizer.step()
            run.losses.append(float(loss.detach()))  # d2l's Accumulator reads it back every step
            run.ends.append(time.perf_counter())
            if len(run.losses) == steps:
                break
    return run


def perplexity(losses: list[float]) -> float:
    return math.exp(sum(losses) / len(losses))
