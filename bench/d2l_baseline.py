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


class Loop:
    """train_epoch_ch8 one optimizer step at a time, so that a benchmark can interleave it with another loop.

    Building it seeds torch and draws the weights; step() then trains one
    minibatch, over as many epochs as it takes, and returns its mean loss.
    """

    def __init__(self, model: str, corpus: torch.Tensor, vocab_size: int, *, hidden_size: int, batch_size: int,
                 num_steps: int, lr: float, clip: float, seed: int, device: torch.device):
        torch.manual_seed(seed)
        self.net = build(model, vocab_size, hidden_size, device)
        self.scratch = isinstance(self.net, RNNModelScratch)
        self.optimizer = None if self.scratch else torch.optim.SGD(self.net.parameters(), lr)
        self.loss_fn = nn.CrossEntropyLoss()
        self.corpus, self.rng = corpus.to(device), random.Random(seed)
        self.batch_size, self.num_steps, self.lr, self.clip, self.device = batch_size, num_steps, lr, clip, device
        self.batches = iter(())
        self.state = None

    def _next_batch(self):
        batch = next(self.batches, None)
        if batch is None:  # a new epoch: a new random offset, and the state starts again from zeros
            self.batches = seq_data_iter_sequential(self.corpus, self.batch_size, self.num_steps, self.rng)
            self.state = None
            batch = next(self.batches)
        return batch

    def step(self) -> float:
        X, Y = self._next_batch()
        if self.state is None:
            self.state = self.net.begin_state(self.batch_size, self.device)
        elif isinstance(self.state, tuple):
            for s in self.state:
                s.detach_()
        else:
            self.state.detach_()
        y = Y.T.reshape(-1)
        y_hat, self.state = self.net(X, self.state)
        loss = self.loss_fn(y_hat, y.long()).mean()
        if self.scratch:
            loss.backward()
            grad_clipping(self.net, self.clip)
            sgd(self.net.params, self.lr, batch_size=1)  # the loss is a mean already
        else:
            self.optimizer.zero_grad()
            loss.backward()
            grad_clipping(self.net, self.clip)
            self.optimizer.step()
        return float(loss.detach())  # d2l's Accumulator reads it back every step


def perplexity(losses: list[float]) -> float:
    return math.exp(sum(losses) / len(losses))
