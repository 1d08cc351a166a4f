"""The recurrent models a job can train.

Every model has the same small interface, so the training loop never asks which
one it holds:

    outputs, state = model(X, state)   # X: (T, B) token ids, or (T, B, F) features
    state = model.begin_state(B, device)

`outputs` are time-major, (T*B, output_size): logits for a language model, one
prediction per step for a regression task. `state` is always a tuple of
tensors: (h,) for the plain RNNs and the GRU, (h, c) for the LSTM.

Two optional keywords open up the time steps, for the truncation strategies and
the gradient diagnostics that need them:

    model(X, state, between=f)   # before step t >= 1 the state becomes f(t, state)
    model(X, state, trace=hs)    # hs[l] collects the hidden state h_t of layer l, t = 1..T

Both make the model step through time in Python, one cell call per layer and
step, on the very Parameters of the fast path: torch's fused nn.RNN/GRU/LSTM
kernels expose neither the state between steps nor the hidden states of the
lower layers. Without them each model takes its fast path: ScratchRecurrence
for rnn_scratch, and for rnn on the CPU too; torch's fused layer otherwise.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from gradserve.spec import MODELS
from torch import nn

from gradserve_worker.errors import CannotTrain

Between = Callable[[int, tuple[torch.Tensor, ...]], tuple[torch.Tensor, ...]]

# -----------------------------------------------------------------------------
# from scratch


ACTIVATIONS = {"tanh": torch.tanh, "relu": torch.relu}


class ScratchRecurrence(torch.autograd.Function):
    r"""h_t = act(z_t), z_t = xw_t + h_{t-1} W_hh for t = 1..T, with the backward the BPTT chapter derives.

    Inputs: xw (T, B, H) = x_t W_xh + b_h for every step, h0 (B, H), W_hh (H, H),
    and the activation's name. Output: hs (T, B, H), the hidden states h_1..h_T.

    The backward walks the steps in reverse with the chapter's recursion

        ∂L/∂h_t = ∂ℓ/∂h_t + ∂L/∂z_{t+1} W_hh^T      (∂ℓ/∂h_t: through the output layer)
        ∂L/∂z_t = ∂L/∂h_t ⊙ act'(z_t)                (tanh: 1 − h_t², relu: [h_t > 0])

    and only then forms the weight gradient, as one matrix product over the
    whole window instead of a rank-B update per step:

        ∂L/∂W_hh = Σ_t h_{t−1}^T ∂L/∂z_t = [h_0; …; h_{T−1}]^T [∂L/∂z_1; …; ∂L/∂z_T]

    ∂L/∂xw_t is ∂L/∂z_t, so the input weights' and the bias's gradients are left
    to autograd (an embedding backward and a sum). Equality with autograd's own
    gradient of the step-by-step loop is a test (tests/worker/test_bptt_oracle.py).
    """

    @staticmethod
    def forward(ctx, xw: torch.Tensor, h0: torch.Tensor, W_hh: torch.Tensor, nonlinearity: str) -> torch.Tensor:
        hs = torch.empty_like(xw)
        h = h0
        activation_ = torch.tanh_ if nonlinearity == "tanh" else torch.relu_
        for t in range(len(xw)):
            torch.addmm(xw[t], h, W_hh, out=hs[t])
            h = activation_(hs[t])
        ctx.nonlinearity = nonlinearity
        ctx.save_for_backward(h0, W_hh, hs)
        return hs

    @staticmethod
    def backward(ctx, grad_hs: torch.Tensor):
        h0, W_hh, hs = ctx.saved_tensors
        T, B, H = hs.shape
        # ∂L/∂z_t = ∂L/∂h_t ⊙ act'(z_t), with act' written in terms of h_t = act(z_t), by aten's fused kernels.
        if ctx.nonlinearity == "tanh":
            def through_activation(grad_h, t):
                torch.ops.aten.tanh_backward.grad_input(grad_h, hs[t], grad_input=grad_z[t])
        else:
            def through_activation(grad_h, t):
                torch.ops.aten.threshold_backward.grad_input(grad_h, hs[t], 0, grad_input=grad_z[t])
        grad_z = torch.empty_like(hs)
        W_hh_T = W_hh.T
        grad_h = grad_hs[T - 1]
        for t in range(T - 1, 0, -1):
            through_activation(grad_h, t)
            grad_h = torch.addmm(grad_hs[t - 1], grad_z[t], W_hh_T)
        through_activation(grad_h, 0)
        grad_h0 = grad_z[0] @ W_hh_T if ctx.needs_input_grad[1] else None
        grad_W_hh = None
        if ctx.needs_input_grad[2]:
            # [h_1; …; h_{T−1}]^T [∂L/∂z_2; …; ∂L/∂z_T] + h_0^T ∂L/∂z_1, without copying the states into one tensor.
            grad_W_hh = torch.addmm(h0.T @ grad_z[0], hs[:-1].reshape(-1, H).T, grad_z[1:].reshape(-1, H))
        return grad_z, grad_h0, grad_W_hh, None


class RNNScratch(nn.Module):
    """d2l's RNN from scratch, one layer:

        h_t = tanh(x_t W_xh + h_{t-1} W_hh + b_h)
        o_t = h_t W_hq + b_q

    x_t is the one-hot of token t, so x_t W_xh is simply row `token` of W_xh;
    with embedding_size > 0 it is a learned embedding of the token, and for a
    task with `features` input channels it is the feature vector itself. With
    nonlinearity="relu" the recurrence is unbounded, which is what makes
    exploding gradients easy to see. `dropout` applies to h_t before the
    output layer, `embedding_dropout` to the embedding's output. With
    tie_weights the output layer has no W_hq: o_t = h_t E^T + b_q with E the
    embedding matrix (embedding_size = hidden_size).
    """

    def __init__(self, vocab_size: int, hidden_size: int, nonlinearity: str = "tanh", *, dropout: float = 0.0,
                 embedding_size: int = 0, features: int = 0, output_size: int = 0, embedding_dropout: float = 0.0,
                 tie_weights: bool = False):
        super().__init__()
        self.vocab_size, self.hidden_size, self.num_layers = vocab_size, hidden_size, 1
        self.nonlinearity, self.activation = nonlinearity, ACTIVATIONS[nonlinearity]
        self.features, self.dropout, self.embedding_dropout = features, dropout, embedding_dropout
        self.embedding = nn.Embedding(vocab_size, embedding_size) if embedding_size and not features else None
        input_size = features or embedding_size or vocab_size
        output_size = output_size or vocab_size
        self.W_xh = nn.Parameter(torch.randn(input_size, hidden_size) * 0.01)
        self.W_hh = nn.Parameter(torch.randn(hidden_size, hidden_size) * 0.01)
        self.b_h = nn.Parameter(torch.zeros(hidden_size))
        if tie_weights:
            _check_tieable(self.embedding, hidden_size, output_size)
            self.W_hq = None
        else:
            self.W_hq = nn.Parameter(torch.randn(hidden_size, output_size) * 0.01)
        self.b_q = nn.Parameter(torch.zeros(output_size))

    def begin_state(self, batch_size: int, device) -> tuple[torch.Tensor, ...]:
        return (torch.zeros(batch_size, self.hidden_size, device=device, dtype=self.W_hh.dtype),)

    def input_terms(self, X: torch.Tensor) -> torch.Tensor:
        """x_t W_xh + b_h for every step of X, (T, B, H): the part of z_t that needs no recurrence."""
        if self.features:
            return X @ self.W_xh + self.b_h
        if self.embedding is not None:
            return _dropped(self.embedding(X), self.embedding_dropout, self.training) @ self.W_xh + self.b_h
        # embedding(X, W_xh) == one_hot(X) @ W_xh, without building the one-hot.
        return F.embedding(X, self.W_xh) + self.b_h

    def forward(self, X: torch.Tensor, state: tuple[torch.Tensor, ...], *, between: Between | None = None,
                trace: list[list[torch.Tensor]] | None = None):
        (h,) = state
        xw = self.input_terms(X)
        if between is None and trace is None:
            hs = ScratchRecurrence.apply(xw, h, self.W_hh, self.nonlinearity)
            h = hs[-1]
        else:
            steps = []
            for t, xw_t in enumerate(xw):
                if between is not None and t:
                    (h,) = between(t, (h,))
                # addmm fuses h @ W_hh with the add; only this recurrence is inherently sequential.
                h = self.activation(torch.addmm(xw_t, h, self.W_hh))
                steps.append(h)
            if trace is not None:
                trace[0].extend(steps)
            hs = torch.stack(steps)
        hs = F.dropout(hs, self.dropout, self.training) if self.dropout else hs
        # The output layer has no recurrence, so it runs as one matmul over all T steps.
        if self.W_hq is None:
            return F.linear(hs.view(-1, self.hidden_size), self.embedding.weight, self.b_q), (h,)
        outputs = torch.addmm(self.b_q, hs.view(-1, self.hidden_size), self.W_hq)
        return outputs, (h,)

    def output_weights(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(weight, bias) of the output layer, the weight as (outputs, hidden) like nn.Linear's."""
        return (self.embedding.weight if self.W_hq is None else self.W_hq.T), self.b_q


# -----------------------------------------------------------------------------
# torch.nn layers


LAYERS = {"rnn": nn.RNN, "gru": nn.GRU, "lstm": nn.LSTM}
# The functional cell of each layer kind: the kernels nn.RNNCell, nn.GRUCell and nn.LSTMCell call.
CELLS = {"rnn_tanh": torch._VF.rnn_tanh_cell, "rnn_relu": torch._VF.rnn_relu_cell,
         "gru": torch._VF.gru_cell, "lstm": torch._VF.lstm_cell}
# How nn.GRU and nn.LSTM stack their gates' rows in weight_hh_l{k}.
GATES = {"rnn": ("",), "gru": ("r", "z", "n"), "lstm": ("i", "f", "g", "o")}


class TorchRNN(nn.Module):
    """d2l's RNNModel: an nn.RNN (tanh or relu), nn.GRU or nn.LSTM and a linear output layer.

    The input is the one-hot of each token (d2l), a learned embedding of it
    (embedding_size > 0), or a task's feature vector (features > 0). `dropout`
    applies between stacked layers (nn.RNN's own dropout) and to the last
    layer's output before the output layer, `embedding_dropout` to the
    embedding's output. With tie_weights the output layer's weight is the
    embedding's own Parameter (embedding_size = hidden_size), as in Press &
    Wolf 2017 and pytorch/examples' word_language_model --tied.
    """

    def __init__(self, kind: str, vocab_size: int, hidden_size: int, num_layers: int, nonlinearity: str = "tanh", *,
                 dropout: float = 0.0, embedding_size: int = 0, features: int = 0, output_size: int = 0,
                 embedding_dropout: float = 0.0, tie_weights: bool = False):
        super().__init__()
        self.kind, self.vocab_size, self.hidden_size, self.num_layers = kind, vocab_size, hidden_size, num_layers
        self.is_lstm = kind == "lstm"
        self.cell = CELLS[f"rnn_{nonlinearity}" if kind == "rnn" else kind]
        self.features, self.dropout, self.embedding_dropout = features, dropout, embedding_dropout
        self.embedding = nn.Embedding(vocab_size, embedding_size) if embedding_size and not features else None
        extra = {"nonlinearity": nonlinearity} if kind == "rnn" else {}
        # Between layers only: with one layer nn.RNN would warn that its dropout does nothing.
        between_layers = dropout if num_layers > 1 else 0.0
        input_size = features or embedding_size or vocab_size
        self.rnn = LAYERS[kind](input_size, hidden_size, num_layers=num_layers, dropout=between_layers, **extra)
        self.linear = nn.Linear(hidden_size, output_size or vocab_size)
        if tie_weights:
            _check_tieable(self.embedding, hidden_size, output_size or vocab_size)
            self.linear.weight = self.embedding.weight

    def begin_state(self, batch_size: int, device) -> tuple[torch.Tensor, ...]:
        h = torch.zeros(self.num_layers, batch_size, self.hidden_size, device=device, dtype=self.linear.weight.dtype)
        return (h, torch.zeros_like(h)) if self.is_lstm else (h,)

    def inputs(self, X: torch.Tensor) -> torch.Tensor:
        """The first layer's input at every step of X, (T, B, input_size)."""
        if self.features:
            return X
        if self.embedding is not None:
            return _dropped(self.embedding(X), self.embedding_dropout, self.training)
        # Not F.one_hot: it checks the ids' range on the host, a sync that a captured CUDA graph cannot contain.
        one_hot = torch.zeros(*X.shape, self.vocab_size, device=X.device, dtype=self.linear.weight.dtype)
        return one_hot.scatter_(-1, X.unsqueeze(-1), 1.0)

    def forward(self, X: torch.Tensor, state: tuple[torch.Tensor, ...], *, between: Between | None = None,
                trace: list[list[torch.Tensor]] | None = None):
        if between is not None or trace is not None:
            out, state = self._step_through(self.inputs(X), state, between, trace)
        elif self.kind == "rnn" and X.device.type == "cpu":
            out, state = self._rnn_windows(X, state)
        else:
            out, hx = self.rnn(self.inputs(X), state if self.is_lstm else state[0])
            state = hx if self.is_lstm else (hx,)
        out = F.dropout(out, self.dropout, self.training) if self.dropout else out
        return self.linear(out.reshape(-1, self.hidden_size)), state

    def output_weights(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(weight, bias) of the output layer."""
        return self.linear.weight, self.linear.bias

    def layer_weights(self, layer: int) -> tuple[torch.Tensor, ...]:
        """(w_ih, w_hh, b_ih, b_hh) of one layer: the fused module's own Parameters."""
        return tuple(getattr(self.rnn, f"{name}_l{layer}") for name in ("weight_ih", "weight_hh", "bias_ih", "bias_hh"))

    def _rnn_windows(self, X, state):
        """nn.RNN's computation, layer by layer through ScratchRecurrence, for the CPU.

        torch's CPU nn.RNN records every step's matmul and activation for
        autograd; ScratchRecurrence walks the window once each way and forms
        ∂W_hh as one product, and a one-hot input becomes a row lookup in
        W_ih^T. The two agree to float64 rounding (tests/worker/test_trainer_models.py).
        """
        (h0,) = state
        drop = self.rnn.dropout if self.training else 0.0
        one_hot = not self.features and self.embedding is None
        hs, last = None, []
        for layer in range(self.num_layers):
            w_ih, w_hh, b_ih, b_hh = self.layer_weights(layer)
            if layer == 0 and one_hot:
                xw = F.embedding(X, w_ih.T) + (b_ih + b_hh)
            else:
                x = self.inputs(X) if layer == 0 else F.dropout(hs, drop, True) if drop else hs
                xw = F.linear(x, w_ih, b_ih + b_hh)
            hs = ScratchRecurrence.apply(xw, h0[layer], w_hh.T, self.rnn.nonlinearity)
            last.append(hs[-1])
        return hs, (torch.stack(last),)

    def _step_through(self, x, state, between, trace):
        """The fused layer's computation, one cell call per layer and time step."""
        weights = [self.layer_weights(layer) for layer in range(self.num_layers)]
        # Per layer: (h,) or (h, c), each (B, H).
        layers = [tuple(s[layer] for s in state) for layer in range(self.num_layers)]
        drop = self.rnn.dropout if self.training else 0.0
        outputs = []
        for t, inp in enumerate(x):
            if between is not None and t:
                flat = between(t, tuple(s for layer in layers for s in layer))
                k = len(state)
                layers = [flat[i : i + k] for i in range(0, len(flat), k)]
            for layer, w in enumerate(weights):
                if layer and drop:
                    inp = F.dropout(inp, drop, True)
                new = self.cell(inp, layers[layer], *w) if self.is_lstm else (self.cell(inp, layers[layer][0], *w),)
                layers[layer] = tuple(new)
                inp = new[0]
                if trace is not None:
                    trace[layer].append(inp)
            outputs.append(inp)
        state = tuple(torch.stack([layer[i] for layer in layers]) for i in range(len(state)))
        return torch.stack(outputs), state


def _dropped(x: torch.Tensor, p: float, training: bool) -> torch.Tensor:
    # No dropout call at all when p is 0, so that a run without it draws nothing from the RNG.
    return F.dropout(x, p, training) if p else x


def _check_tieable(embedding: nn.Embedding | None, hidden_size: int, output_size: int) -> None:
    if embedding is None:
        raise CannotTrain("tie_weights needs a learned embedding: set embedding_size equal to hidden_size")
    if embedding.embedding_dim != hidden_size:
        raise CannotTrain(f"tie_weights needs embedding_size equal to hidden_size, got embedding_size "
                          f"{embedding.embedding_dim} and hidden_size {hidden_size}")
    if embedding.num_embeddings != output_size:
        raise CannotTrain(f"tie_weights needs as many outputs as tokens, got {output_size} outputs and "
                          f"{embedding.num_embeddings} tokens")


# -----------------------------------------------------------------------------
# building


def build_model(model: str, vocab_size: int, hidden_size: int, num_layers: int, nonlinearity: str = "tanh", *,
                dropout: float = 0.0, embedding_size: int = 0, features: int = 0, output_size: int = 0,
                embedding_dropout: float = 0.0, tie_weights: bool = False, init: str = "default",
                init_range: float = 0.1, max_dependency: int = 35) -> nn.Module:
    """The model a job names, with freshly initialised weights (from torch's global RNG).

    A language model reads token ids below vocab_size and predicts the next one
    (output_size 0 means vocab_size outputs). A task with real-valued inputs
    passes features, the number of input channels, instead of a vocabulary.
    `init` then redraws some of the weights (initialise).
    """
    extra = {"dropout": dropout, "embedding_size": embedding_size, "features": features, "output_size": output_size,
             "embedding_dropout": embedding_dropout, "tie_weights": tie_weights}
    if model == "rnn_scratch":
        if num_layers != 1:
            raise CannotTrain(f"num_layers must be 1 for model rnn_scratch, got {num_layers}")
        net = RNNScratch(vocab_size, hidden_size, nonlinearity, **extra)
    elif model in LAYERS:
        net = TorchRNN(model, vocab_size, hidden_size, num_layers, nonlinearity, **extra)
    else:
        raise CannotTrain(f"unknown model {model!r}; expected one of {', '.join(MODELS)}")
    initialise(net, init, init_range, max_dependency)
    return net


@torch.no_grad()
def initialise(model: nn.Module, init: str, init_range: float = 0.1, max_dependency: int = 35) -> None:
    """Redraw the weights that `init` names, from torch's global RNG; "default" keeps torch's (and draws nothing).

    uniform
        pytorch/examples' word_language_model: the embedding and the output
        weights uniform in [−init_range, init_range], the output bias 0. The
        recurrent layers keep torch's U(−1/√H, 1/√H). A tied matrix is drawn once.
    chrono
        Tallec & Ollivier 2018, "Can recurrent neural networks warp time?": a
        gate that keeps a fraction σ(b) of the state per step remembers for
        about 1/(1 − σ(b)) steps, so biases b = log(u), u ~ U[1, T_max − 1],
        spread the units' memory over 2 to T_max steps. LSTM: forget bias
        log(u) and input bias −log(u); GRU: the update gate z (the fraction of
        h_{t−1} kept) log(u). torch adds b_ih and b_hh, so the value goes to
        b_ih and that gate's b_hh is 0. T_max is max_dependency.
    """
    if init == "default":
        return
    if init == "uniform":
        weight, bias = model.output_weights()
        if model.embedding is not None and model.embedding.weight is not weight:
            model.embedding.weight.uniform_(-init_range, init_range)
        weight.uniform_(-init_range, init_range)
        bias.zero_()
        return
    if init != "chrono":
        raise CannotTrain(f"unknown init {init!r}; expected default, uniform or chrono")
    if getattr(model, "kind", None) not in ("gru", "lstm"):
        raise CannotTrain("init chrono sets the gate biases of gru and lstm models")
    H = model.hidden_size
    for layer in range(model.num_layers):
        _, _, b_ih, b_hh = model.layer_weights(layer)
        keep = torch.log(torch.empty(H).uniform_(1, max_dependency - 1)).to(b_ih)
        if model.is_lstm:  # gates i, f, g, o
            b_ih[:H], b_hh[:H] = -keep, 0.0
            b_ih[H : 2 * H], b_hh[H : 2 * H] = keep, 0.0
        else:  # gates r, z, n
            b_ih[H : 2 * H], b_hh[H : 2 * H] = keep, 0.0


def recurrent_matrices(model: nn.Module) -> list[tuple[str, str, torch.Tensor]]:
    """(parameter name, gate, matrix) for every hidden-to-hidden weight matrix, one per gate.

    For GRU the gates are r, z, n and for LSTM i, f, g, o, in the order torch
    stacks them; a plain RNN's single matrix has gate "".
    """
    if isinstance(model, RNNScratch):
        return [("W_hh", "", model.W_hh)]
    out = []
    for layer in range(model.num_layers):
        name = f"rnn.weight_hh_l{layer}"
        gates = GATES[model.kind]
        for gate, block in zip(gates, getattr(model.rnn, f"weight_hh_l{layer}").chunk(len(gates))):
            out.append((name, gate, block))
    return out
