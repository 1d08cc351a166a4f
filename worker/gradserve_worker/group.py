"""Several jobs of a sweep trained as one: one data stream and one step for members that differ only in values.

    key = group_key(config)          # None: this config trains alone, with trainer.train
    outcomes = train_group(configs, text, on_event, should_stop=..., resume=[...])

Members whose configs have the same group_key share everything that decides a
tensor's shape or the data a step trains on. Each member is still an ordinary
model of its own, built exactly as trainer.train builds it, with its own
optimizer. A step runs the window through all of them in one of two ways:

batched (rnn_scratch and rnn by default)
    Their parameters are stacked along a leading dimension G (torch.stack,
    whose backward hands each member its own slice of the gradient) and one
    stacked model runs them all: torch.bmm/baddbmm products for the
    recurrence and the output layer, and for rnn_scratch, rnn and lstm a
    hand-written BPTT backward with a batch of weight matrices
    (StackedRecurrence, StackedLSTM); gru cells and any layer stepped through
    time (randomized truncation) go through autograd. One backward of the
    members' summed losses gives each member the gradient of its own loss.
looped (gru and lstm by default)
    Each member's own model runs the window in turn, forward and backward:
    train()'s own step with torch's fused layers. The group shares the data
    stream, the loop and the process. The stacked gru and lstm layers measured
    slower than this on the CPU (BENCHMARKS.md).

Everything after the backward is per member and is trainer.train's own
code: the global norm over the member's parameters, its clipping, its lr and
schedule, its optimizer step, its events, its checkpoints. So a member
trained in a group computes what train() computes for it alone, up to
floating-point rounding (tests/worker/test_group.py holds them to 1e-10 in float64).

What members may differ in (MEMBER_VALUES): lr, clip_norm, weight_decay,
optimizer and schedule settings, dropout p, truncation_keep, the init scheme,
on_nonfinite, and the step counts (max_steps and the every-N settings):
a member with fewer max_steps ends sooner and the rest go on. Everything else
is in the key, and in particular:

- `seed`. One seed decides a job's initial weights, its data order (each
  epoch's random offset, and the random partition's shuffle,
  data.seeded_generator(seed, epoch)) and its random draws (dropout masks,
  randomized truncation's ξ). Members of one group see the same windows, so
  they must share the data seed, and since a member must equal the job run
  alone under the same config, that is the one `seed`: a group's members start
  from the same weights (unless their `init` differs), and a sweep over seeds
  forms one group per seed.
- Random draws stay per member even so: each member keeps its own copy of
  torch's generator state (what the global generator would hold in its own
  run, seeded by its seed at the start, restored from its checkpoint on
  resume), and every dropout mask and ξ of a member is drawn from that state,
  in the order its own run draws them. Members with different dropout p or
  truncation_keep therefore draw exactly what their own runs draw.

Not grouped (group_key gives None; train them with trainer.train):
truncation "auto", whose window moves with each member's own probes, and the
synthetic tasks.

Ending one member: a member whose loss or gradient norm stops being finite
(on_nonfinite "fail") gets outcome `diverged`, with the TrainingDiverged that
train() would have raised, and leaves the group: from the next step on the
stack is formed without it. should_stop(i) ends member i as train()'s
should_stop ends a job (final metrics, evaluation and checkpoint, then
stopped=True), and reaching its own max_steps finishes it.

Events: on_event(i, event) gets member i's events, the dataclasses of
trainer.py in the order train() reports them. A StepMetrics' seconds are the
group's shared forward and backward plus the member's own update, so its
tokens_per_sec is the member's own rate inside the group; the group's
throughput is about the sum over its members. CheckpointReady carries
bytes in trainer's checkpoint format: load_checkpoint, generation and a
single job's resume all take a member's checkpoint, and train_group's
`resume` stacks members' checkpoints (all at the same step) back into a group.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field

import torch
import torch.nn.functional as F
from gradserve import sweeps
from gradserve.spec import BY_NAME, resolved
from torch import nn

from gradserve_worker.diagnostics import SpectralNorms, count_nonfinite
from gradserve_worker.errors import CannotTrain
from gradserve_worker.models import RNNScratch
from gradserve_worker.optim import Plateau, make_optimizer, scheduled_lr
from gradserve_worker.tasks import SYNTHETIC, TextStream
from gradserve_worker.trainer import (
    TrainConfig,
    TrainingDiverged,
    TrainResult,
    _Best,
    _check_resumable,
    _checkpoints,
    _evaluate,
    _Interval,
    _labelled,
    _probe,
    _raise_diverged,
    _read_checkpoint,
    model_for,
    resolve_device,
)
from gradserve_worker.truncation import ScaleGrad, detach_state, run_window, sample_xi

# -----------------------------------------------------------------------------
# which configs train together

# Settings that change only values, never a tensor's shape or the data a step sees: the server groups a sweep's
# members by the same rule (gradserve.sweeps.group_key), so that the groups it sends are the groups trained here.
MEMBER_VALUES = sweeps.MEMBER_VALUES


def group_key(config: TrainConfig) -> tuple | None:
    """What members of one group must share: every setting outside MEMBER_VALUES, as (name, value) pairs.

    Settings whose default derives from others (tbptt_k1, tbptt_k2, ...) enter
    with their resolved value, so an explicit default and an unset field group
    together. None for a config that trains alone (see the module docstring).
    """
    if config.truncation == "auto" or config.dataset in SYNTHETIC:
        return None
    key = []
    for name, value in asdict(config).items():
        if name in MEMBER_VALUES:
            continue
        if name in BY_NAME and BY_NAME[name].default is None:
            value = resolved(config, name)
        key.append((name, value))
    return tuple(key)


# The models whose batched step measured faster on the CPU than their members' own models run in turn
# (bench/sweep.py, BENCHMARKS.md): rnn_scratch and rnn replace per-step products by batched ones and keep their
# hand-written backward; the stacked lstm and gru layers lose to torch's fused kernels. No GPU has measured it
# yet, so CUDA follows the CPU.
BATCHED_BY_DEFAULT = frozenset({"rnn_scratch", "rnn"})

# -----------------------------------------------------------------------------
# what train_group reports


@dataclass
class MemberOutcome:
    """How one member ended: what train() would have returned, or the TrainingDiverged it would have raised."""

    result: TrainResult  # for a diverged member, as of its last StepMetrics
    diverged: TrainingDiverged | None = None

    @property
    def status(self) -> str:
        """"diverged", "stopped" (should_stop ended it) or "finished" (it reached its max_steps)."""
        if self.diverged is not None:
            return "diverged"
        return "stopped" if self.result.stopped else "finished"

    @property
    def reason(self) -> str:
        return str(self.diverged) if self.diverged is not None else ""


# -----------------------------------------------------------------------------
# one member


@dataclass
class _Member:
    index: int
    config: TrainConfig
    model: nn.Module
    optimizer: torch.optim.Optimizer
    on_event: Callable[[object], None]
    rng: dict  # torch's generator states as this member's own run would hold them: "cpu", and "cuda" on a GPU
    lr: float
    spectral: SpectralNorms
    plateau: Plateau | None
    best: _Best
    result: TrainResult
    names: tuple[str, ...] = ()
    params: tuple[torch.Tensor, ...] = ()
    interval: _Interval = field(default_factory=_Interval)
    outcome: MemberOutcome | None = None

    def __post_init__(self):
        self.names, self.params = zip(*self.model.named_parameters())


def _generator_states(device: torch.device) -> dict:
    states = {"cpu": torch.get_rng_state()}
    if device.type == "cuda":
        states["cuda"] = torch.cuda.get_rng_state(device)
    return states


def _set_generator_states(states: dict, device: torch.device) -> None:
    torch.set_rng_state(states["cpu"])
    if "cuda" in states:
        torch.cuda.set_rng_state(states["cuda"], device)


@contextmanager
def _own_random(member: _Member, device: torch.device):
    """Torch's global generator as `member`'s own run would have it, for the draws inside; kept for its next ones."""
    outside = _generator_states(device)
    _set_generator_states(member.rng, device)
    try:
        yield
    finally:
        member.rng = _generator_states(device)
        _set_generator_states(outside, device)


# -----------------------------------------------------------------------------
# the batched model


ACTIVATIONS_ = {"tanh": torch.tanh_, "relu": torch.relu_}


class StackedRecurrence(torch.autograd.Function):
    r"""models.ScratchRecurrence for G weight matrices at once: h_t = act(xw_t + h_{t−1} W_hh), per member.

    Inputs: xw (G, T, B, H), h0 (G, B, H), W_hh (G, H, H), the activation's
    name. Output: hs (G, T, B, H). The backward is the same recursion with
    batched products; ∂W_hh is one batched product over the window,
    [h_0; …; h_{T−1}]^T [∂L/∂z_1; …; ∂L/∂z_T] per member. Step t of every
    member is a strided slice, which the batched products read: the layout is
    the output layer's and the input lookup's, so no window-sized tensor is
    ever transposed.
    """

    @staticmethod
    def forward(ctx, xw: torch.Tensor, h0: torch.Tensor, W_hh: torch.Tensor, nonlinearity: str) -> torch.Tensor:
        hs = torch.empty_like(xw)
        # Each step's product goes to a contiguous buffer of two, then into its strided slice of hs: a product
        # written in place into the slice runs as G separate ones, measured 12-18 % slower over a window.
        buffers = tuple(torch.empty_like(h0, memory_format=torch.contiguous_format) for _ in range(2))
        h = h0
        activation_ = ACTIVATIONS_[nonlinearity]
        for t in range(xw.shape[1]):
            h = activation_(torch.baddbmm(xw[:, t], h, W_hh, out=buffers[t % 2]))
            hs[:, t].copy_(h)
        ctx.nonlinearity = nonlinearity
        ctx.save_for_backward(h0, W_hh, hs)
        return hs

    @staticmethod
    def backward(ctx, grad_hs: torch.Tensor):
        h0, W_hh, hs = ctx.saved_tensors
        G, T, B, H = hs.shape
        grad_z = torch.empty_like(hs)
        if ctx.nonlinearity == "tanh":
            def through_activation(grad_h, t):
                torch.ops.aten.tanh_backward.grad_input(grad_h, hs[:, t], grad_input=grad_z[:, t])
        else:
            def through_activation(grad_h, t):
                torch.ops.aten.threshold_backward.grad_input(grad_h, hs[:, t], 0, grad_input=grad_z[:, t])
        W_hh_T = W_hh.transpose(1, 2)
        grad_h = grad_hs[:, T - 1]
        buffers = (torch.empty_like(h0), torch.empty_like(h0))  # ∂L/∂h_t of two steps: no allocation per step
        for t in range(T - 1, 0, -1):
            through_activation(grad_h, t)
            grad_h = torch.baddbmm(grad_hs[:, t - 1], grad_z[:, t], W_hh_T, out=buffers[t % 2])
        through_activation(grad_h, 0)
        grad_h0 = torch.bmm(grad_z[:, 0], W_hh_T) if ctx.needs_input_grad[1] else None
        grad_W_hh = None
        if ctx.needs_input_grad[2]:
            # Steps and sequences of one member are contiguous, so these are views.
            before = hs[:, :-1].reshape(G, (T - 1) * B, H).transpose(1, 2)
            after = grad_z[:, 1:].reshape(G, (T - 1) * B, H)
            grad_W_hh = torch.baddbmm(torch.bmm(h0.transpose(1, 2), grad_z[:, 0]), before, after)
        return grad_z, grad_h0, grad_W_hh, None


class StackedLSTM(torch.autograd.Function):
    r"""One LSTM layer over a window for G members: nn.LSTM's cell, with the backward written out.

    Inputs: xw (G, T, B, 4H) = x_t W_ih^T + b_ih + b_hh for every step, h0 and
    c0 (G, B, H), W_hh^T (G, H, 4H). Outputs: hs (G, T, B, H) and c_T (G, B, H).
    With gates i, f, g, o (torch's order) after their activations,

        c_t = f ⊙ c_{t−1} + i ⊙ g,    h_t = o ⊙ tanh(c_t)

    and the backward walks the steps in reverse with

        ∂c_t += ∂h_t ⊙ o ⊙ (1 − tanh²c_t),   ∂c_{t−1} = ∂c_t ⊙ f,   ∂h_{t−1} = ∂z_t W_hh
        ∂z_t = [∂c_t ⊙ g ⊙ i(1−i), ∂c_t ⊙ c_{t−1} ⊙ f(1−f), ∂c_t ⊙ i ⊙ (1−g²), ∂h_t ⊙ tanh c_t ⊙ o(1−o)]

    forming ∂W_hh once, as one product over the window, as StackedRecurrence does:
    autograd through the cell would add a (G, H, 4H) product into it at every step.
    """

    @staticmethod
    def forward(ctx, xw: torch.Tensor, h0: torch.Tensor, c0: torch.Tensor, W_hh: torch.Tensor):
        G, T, B, H4 = xw.shape
        H = H4 // 4
        gates = xw.clone()  # each step's product accumulates into its slice, then its activations replace it
        hs, cs = xw.new_empty(G, T, B, H), xw.new_empty(G, T, B, H)
        h, c = h0, c0
        for t in range(T):
            z = gates[:, t].baddbmm_(h, W_hh)
            z[..., : 2 * H].sigmoid_()
            z[..., 2 * H : 3 * H].tanh_()
            z[..., 3 * H :].sigmoid_()
            i, f, g, o = z.split(H, -1)
            c = torch.mul(f, c, out=cs[:, t]).addcmul_(i, g)
            h = torch.mul(o, torch.tanh(c), out=hs[:, t])
        ctx.save_for_backward(h0, c0, W_hh, gates, hs, cs)
        return hs, cs[:, -1].clone()

    @staticmethod
    def backward(ctx, grad_hs: torch.Tensor, grad_c: torch.Tensor | None):
        h0, c0, W_hh, gates, hs, cs = ctx.saved_tensors
        G, T, B, H = hs.shape
        grad_z = torch.empty_like(gates)
        W_hh_T = W_hh.transpose(1, 2)
        grad_h = grad_hs[:, T - 1]
        grad_c = torch.zeros_like(c0) if grad_c is None else grad_c.clone()
        for t in range(T - 1, -1, -1):
            i, f, g, o = gates[:, t].split(H, -1)
            d_i, d_f, d_g, d_o = grad_z[:, t].split(H, -1)
            tanh_c = torch.tanh(cs[:, t])
            torch.mul(grad_h, tanh_c, out=d_o).mul_(o * (1 - o))
            grad_c.addcmul_(grad_h * o, 1 - tanh_c * tanh_c)
            torch.mul(grad_c, g, out=d_i).mul_(i * (1 - i))
            torch.mul(grad_c, cs[:, t - 1] if t else c0, out=d_f).mul_(f * (1 - f))
            torch.mul(grad_c, i, out=d_g).mul_(1 - g * g)
            grad_c = grad_c.mul_(f)
            if t:
                grad_h = torch.baddbmm(grad_hs[:, t - 1], grad_z[:, t], W_hh_T)
        grad_h0 = torch.bmm(grad_z[:, 0], W_hh_T)
        before = hs[:, :-1].reshape(G, (T - 1) * B, H).transpose(1, 2)
        after = grad_z[:, 1:].reshape(G, (T - 1) * B, 4 * H)
        grad_W_hh = torch.baddbmm(torch.bmm(h0.transpose(1, 2), grad_z[:, 0]), before, after)
        return grad_z, grad_h0, grad_c, grad_W_hh


def _lookup(table: torch.Tensor, X: torch.Tensor) -> torch.Tensor:
    """Row X[t, b] of each member's table (G, N, D): (G, T, B, D).

    One embedding over the members' tables laid end to end: its backward is
    the embedding's, a row accumulation, far cheaper than indexing's.
    """
    G, N, D = table.shape
    offsets = torch.arange(G, device=X.device).view(G, 1, 1) * N
    return F.embedding(X.unsqueeze(0) + offsets, table.reshape(G * N, D))


class _Stack:
    """The members' models as one: forward(w, X, state, xi) runs all of them on one window.

    `state` is each member's state stacked on a leading G dimension: (h,)
    with h (G, B, H) for rnn_scratch; (h,) or (h, c) with (G, L, B, H) for the
    torch layers. Activations are (G, T, B, ...), so member g's outputs,
    (G, T*B, V), are ordered as its own model orders them.
    """

    def __init__(self, members: list[_Member], device: torch.device):
        self.members, self.device = members, device
        first = members[0].model
        self.scratch = isinstance(first, RNNScratch)
        self.kind = "rnn" if self.scratch else first.kind
        self.nonlinearity = first.nonlinearity if self.scratch else first.rnn.nonlinearity if self.kind == "rnn" else ""
        self.num_layers, self.hidden_size = first.num_layers, first.hidden_size
        self.embedded = first.embedding is not None
        self.out_dropout = [m.model.dropout for m in members]
        self.emb_dropout = [m.model.embedding_dropout if self.embedded else 0.0 for m in members]
        # Between stacked layers: nn.RNN's own dropout (rnn_scratch has one layer).
        self.layer_dropout = [0.0 if self.scratch else m.model.rnn.dropout for m in members]

    # -- weights, stacked once per step ---------------------------------------

    def stack_weights(self) -> dict:
        """Every member's parameters stacked, (G, ...) each; the products' operands oriented as x @ W."""
        models = [m.model for m in self.members]

        def stack(get):
            return torch.stack([get(m) for m in models])

        w = {"emb": stack(lambda m: m.embedding.weight) if self.embedded else None}
        if self.scratch:
            w["layers"] = [(stack(lambda m: m.W_xh), stack(lambda m: m.W_hh), stack(lambda m: m.b_h), None)]
            tied = models[0].W_hq is None
            w["out"] = (w["emb"].transpose(1, 2) if tied else stack(lambda m: m.W_hq), stack(lambda m: m.b_q))
            return w
        w["layers"] = []
        for layer in range(self.num_layers):
            w_ih, w_hh, b_ih, b_hh = (stack(lambda m, name=name: getattr(m.rnn, f"{name}_l{layer}"))
                                      for name in ("weight_ih", "weight_hh", "bias_ih", "bias_hh"))
            w["layers"].append((w_ih.transpose(1, 2), w_hh.transpose(1, 2), b_ih, b_hh))
        w["out"] = (stack(lambda m: m.linear.weight).transpose(1, 2), stack(lambda m: m.linear.bias))
        return w

    # -- each member's own random draws -----------------------------------------

    def masks(self, ps: list[float], shape: tuple[int, ...], dtype) -> torch.Tensor | None:
        """Dropout multipliers (G, *shape): F.dropout's draw for each member with p > 0, from its own generator.

        F.dropout(x) is x times exactly this multiplier on the CPU, and a member
        with p = 0 draws nothing, as its own run does not (models._dropped).
        """
        if not any(ps):
            return None
        out = []
        for member, p in zip(self.members, ps):
            ones = torch.ones(shape, dtype=dtype, device=self.device)
            if p:
                with _own_random(member, self.device):
                    ones = F.dropout(ones, p, True)
            out.append(ones)
        return torch.stack(out)

    def xi(self, steps: int, batch_size: int) -> torch.Tensor:
        """Randomized truncation's ξ of every member for a window, (G, T, B, 1), each from its own generator."""
        draws = []
        for member in self.members:
            with _own_random(member, self.device):
                draws.append(sample_xi(steps, batch_size, member.config.truncation_keep, self.device))
        return torch.stack(draws)

    # -- the forward ----------------------------------------------------------

    def forward(self, w: dict, X: torch.Tensor, state: tuple[torch.Tensor, ...], xi: torch.Tensor | None = None):
        """(outputs (G, T*B, V), end state) of every member on window X (T, B) from `state`."""
        T, B = X.shape
        G = len(self.members)
        dtype = w["out"][1].dtype
        # The draws in the order a member's own forward makes them: embedding, between layers, output.
        if self.embedded:
            x = _lookup(w["emb"], X)  # (G, T, B, E)
            m = self.masks(self.emb_dropout, (T, B, x.shape[-1]), dtype)
            x = x * m if m is not None else x
        else:
            x = None
        if xi is None:
            between = [self.masks(self.layer_dropout, (T, B, self.hidden_size), dtype)
                       for _ in range(self.num_layers - 1)]
        else:  # stepping through time, the models draw a mask per step and layer, step by step
            per_step = [[self.masks(self.layer_dropout, (B, self.hidden_size), dtype)
                         for _ in range(self.num_layers - 1)] for _ in range(T)]
            between = [None if per_step[0][i] is None else torch.stack([s[i] for s in per_step], dim=1)
                       for i in range(self.num_layers - 1)]
        states = [s.unsqueeze(1) for s in state] if self.scratch else list(state)  # (G, L, B, H) each
        ends = [[] for _ in state]
        for layer, (w_ih, w_hh, b_ih, b_hh) in enumerate(w["layers"]):
            if layer:
                drop = between[layer - 1]
                x = x * drop if drop is not None else x
            xw = self._input_terms(x, X, w_ih, b_ih, b_hh)  # (G, T, B, gates·H)
            x, end = self._layer(xw, tuple(s[:, layer] for s in states), w_hh, b_hh, xi)
            for i, e in enumerate(end):
                ends[i].append(e)
        m = self.masks(self.out_dropout, (T, B, self.hidden_size), dtype)
        x = x * m if m is not None else x
        W_out, b_out = w["out"]
        outputs = torch.baddbmm(b_out.unsqueeze(1), x.reshape(G, T * B, self.hidden_size), W_out)
        end_state = tuple(e[0] if self.scratch else torch.stack(e, dim=1) for e in ends)
        return outputs, end_state

    def _input_terms(self, x, X, w_ih, b_ih, b_hh) -> torch.Tensor:
        """x_t W_ih^T + the biases that add to it, for every step: (G, T, B, gates·H).

        b_ih and b_hh are added one after the other, not as (b_ih + b_hh): the
        sum's backward hands both the same gradient tensor, and its per-member
        slices would then be one buffer that clipping scales twice in place.
        The GRU's b_hh stays inside r ⊙ (h W_hn^T + b_hn) instead.
        """
        folds_b_hh = b_hh is not None and self.kind != "gru"
        if x is None:
            # One-hot input: a row lookup in W_ih^T, whose rows take the biases first (V rows, not T·B of them).
            table = w_ih + b_ih.unsqueeze(1)
            return _lookup(table + b_hh.unsqueeze(1) if folds_b_hh else table, X)
        G, T, B, _ = x.shape
        xw = torch.baddbmm(b_ih.unsqueeze(1), x.reshape(G, T * B, -1), w_ih).view(G, T, B, -1)
        return xw + b_hh[:, None, None] if folds_b_hh else xw

    def _layer(self, xw, state, w_hh, b_hh, xi):
        """One layer over the window: (hs (G, T, B, H), end state of the layer)."""
        if self.kind == "rnn" and xi is None:
            hs = StackedRecurrence.apply(xw, state[0], w_hh, self.nonlinearity)
            return hs, (hs[:, -1],)
        if self.kind == "lstm" and xi is None:
            hs, c = StackedLSTM.apply(xw, state[0], state[1], w_hh)
            return hs, (hs[:, -1], c)
        steps = []
        # unbind, not xw[:, t]: one backward that stacks the steps' gradients, where a select per step would
        # each fill a window-sized gradient with zeros.
        for t, xw_t in enumerate(xw.unbind(1)):
            if xi is not None and t:
                state = ScaleGrad.apply(xi[:, t], *state)
            state = self._cell(xw_t, state, w_hh, b_hh)
            steps.append(state[0])
        return torch.stack(steps, dim=1), state

    def _cell(self, xw_t, state, w_hh, b_hh):
        if self.kind == "rnn":
            h = torch.baddbmm(xw_t, state[0], w_hh)
            return (torch.tanh(h) if self.nonlinearity == "tanh" else torch.relu(h),)
        if self.kind == "lstm":  # gates i, f, g, o, as torch stacks them
            h, c = state
            i, f, g, o = torch.baddbmm(xw_t, h, w_hh).chunk(4, -1)
            c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
            return torch.sigmoid(o) * torch.tanh(c), c
        (h,) = state  # gru: gates r, z, n
        i_r, i_z, i_n = xw_t.chunk(3, -1)
        h_r, h_z, h_n = torch.baddbmm(b_hh.unsqueeze(1), h, w_hh).chunk(3, -1)
        r = torch.sigmoid(i_r + h_r)
        z = torch.sigmoid(i_z + h_z)
        n = torch.tanh(i_n + r * h_n)
        return (n + z * (h - n),)


def _run_window(stack: _Stack, w: dict, window, state, keep: bool):
    """truncation.run_window for the stack: (outputs, carried state), the carried state detached."""
    X, carry_at = window.X, window.carry_at
    xi = stack.xi(len(X), X.shape[1]) if keep else None
    if carry_at >= len(X):
        outputs, end = stack.forward(w, X, state, xi)
        return outputs, detach_state(end)
    if carry_at == 0:
        outputs, _ = stack.forward(w, X, state, xi)
        return outputs, state
    first, middle = stack.forward(w, X[:carry_at], state)
    rest, _ = stack.forward(w, X[carry_at:], middle)
    return torch.cat([first, rest], dim=1), detach_state(middle)


def _losses(outputs: torch.Tensor, window) -> torch.Tensor:
    """Each member's mean cross-entropy over the window's new tokens, (G,)."""
    G, _, V = outputs.shape
    new = window.context * window.Y.shape[1]
    targets = window.Y[window.context :].reshape(-1)
    per_token = F.cross_entropy(outputs[:, new:].reshape(-1, V), targets.repeat(G), reduction="none")
    return per_token.view(G, -1).mean(1)


def _looped(members: list[_Member], window, state, keep: bool, device) -> tuple[torch.Tensor, tuple]:
    """Each member's own model on the window, forward then backward, one member after another.

    This is train()'s own step (truncation.run_window, the torch layers'
    fused kernels), each member drawing from its own generator. Each member's
    backward follows its forward, while its activations are still in cache:
    all forwards before one backward measured slower than the members' own runs.
    Returns (losses (G,), carried state stacked).
    """
    losses, carried = [], []
    for g, m in enumerate(members):
        with _own_random(m, device):
            keep_g = m.config.truncation_keep if keep else None
            outputs, carried_g, _ = run_window(m.model, window.X, _member_state(state, g), window.carry_at, keep_g)
        loss = TextStream._loss(outputs, window)
        m.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        losses.append(loss.detach())
        carried.append(carried_g)
    return torch.stack(losses), tuple(torch.stack(parts) for parts in zip(*carried))


def _forward_backward(stack: _Stack, window, state, keep: bool, batched: bool, device) -> tuple[torch.Tensor, tuple]:
    """Every member's gradient of its own loss on the window, by the batched model or member by member.

    Returns the losses (G,) and the carried state. One backward of the summed
    losses serves the batched model: each member's parameters reach only its own loss.
    """
    if not batched:
        return _looped(stack.members, window, state, keep, device)
    outputs, carried = _run_window(stack, stack.stack_weights(), window, state, keep)
    losses = _losses(outputs, window)
    for m in stack.members:
        m.optimizer.zero_grad(set_to_none=True)
    losses.sum().backward()
    return losses.detach(), carried


# -----------------------------------------------------------------------------
# what a member's checkpoint and probe see of the shared stream


class _MemberView:
    """The stream as one member's own run would hold it: its carried state, the shared position and vocabulary."""

    def __init__(self, stream: TextStream, state: tuple[torch.Tensor, ...], window=None,
                 start: tuple[torch.Tensor, ...] = ()):
        self.stream, self.state, self.window, self.start = stream, state, window, start
        self.vocab = stream.vocab

    def position(self) -> dict:
        # Cloned: a view would take the whole group's state tensor into the checkpoint.
        return {"epoch": self.stream.epoch, "position": self.stream.pos,
                "state": [s.detach().clone() for s in self.state]}

    def replay(self, model, trace):
        """The window's loss again from the member's starting state, tracing the hidden states (the probe)."""
        outputs, _, _ = run_window(model, self.window.X, self.start, self.window.carry_at, None, trace)
        return TextStream._loss(outputs, self.window)


def _member_state(state: tuple[torch.Tensor, ...], g: int) -> tuple[torch.Tensor, ...]:
    return tuple(s[g] for s in state)


# -----------------------------------------------------------------------------
# the training loop


def train_group(
    configs: Sequence[TrainConfig],
    text: str,
    on_event: Callable[[int, object], None],
    *,
    should_stop: Callable[[int], bool] = lambda i: False,
    resume: Sequence[bytes | None] | None = None,
    batched: bool | None = None,
) -> list[MemberOutcome]:
    """Train configs[i] for every i as train(configs[i], text, ...) would, all in one batched step.

    on_event(i, event) receives member i's events; should_stop(i) is asked
    once per step for each member still training. `resume`, one entry per
    member, holds the checkpoints to continue from (a CheckpointReady's data,
    trainer format): all members resume, from checkpoints of the same step, or
    none does. Returns one MemberOutcome per config, in order.

    `batched` chooses the forward: True runs the members as one stacked model
    (batched products), False runs each member's own model in turn (torch's
    fused layers) and shares only the backward and the loop. None takes
    whichever BENCHMARKS.md measured faster for the model on this device
    (BATCHED_BY_DEFAULT).

    Raises CannotTrain when the configs do not share a group_key (or one has
    none), when a config or the text is invalid, or when the checkpoints do not
    fit the configs or each other.
    """
    if not configs:
        return []
    for config in configs:
        config.validate()
    keys = {group_key(c) for c in configs}
    if None in keys:
        raise CannotTrain("a config with truncation auto or a synthetic task cannot train in a group")
    if len(keys) > 1:
        raise CannotTrain("the configs differ in settings that members of a group must share (see group_key)")
    resume = list(resume) if resume is not None else [None] * len(configs)
    if len(resume) != len(configs):
        raise CannotTrain(f"resume has {len(resume)} entries for {len(configs)} members")
    if any(r is None for r in resume) and any(r is not None for r in resume):
        raise CannotTrain("either every member of a group resumes or none does")

    device = resolve_device(configs[0].device)
    stream = TextStream(configs[0], text, device)
    ckpts = [_read_checkpoint(r) if r is not None else None for r in resume]
    positions = {(c["step"], c["epoch"], c["position"]) for c in ckpts if c is not None}
    if len(positions) > 1:
        raise CannotTrain("the members' checkpoints are at different steps or places in the data: "
                          + ", ".join(f"step {s} (epoch {e}, window {p})" for s, e, p in sorted(positions)))

    if batched is None:
        batched = configs[0].model in BATCHED_BY_DEFAULT
    why = (f"trained in a group of {len(configs)}: one stacked model for all its members" if batched else
           f"trained in a group of {len(configs)}: each member's own layers in turn, one loop for all")
    members = [_member(i, config, ckpt, stream, device, on_event, why)
               for i, (config, ckpt) in enumerate(zip(configs, ckpts))]
    step, epoch, pos = positions.pop() if positions else (0, 0, 0)
    # The shared stream walks the windows; each member's carried state lives in the stacked `state`.
    stream.start(members[0].model, epoch, pos)
    active = [m for m in members if step < m.config.max_steps]
    for m in members:
        if m not in active:  # resumed at or past its own end: nothing left to do, as train() would do nothing
            m.outcome = MemberOutcome(m.result)
    state = None
    if active and ckpts[0] is not None and ckpts[0]["state"]:
        state = tuple(torch.stack(s).to(device) for s in zip(*(ckpts[m.index]["state"] for m in active)))
    keep = configs[0].truncation == "randomized"
    zero_state = None

    while active:
        stack = _Stack(active, device)
        if zero_state is None or len(zero_state[0]) != len(active):
            zero_state = tuple(torch.stack(s) for s in zip(*(m.model.begin_state(configs[0].batch_size, device)
                                                             for m in active)))
        t_step = time.perf_counter()
        window, fresh = stream.next_batch()
        if fresh or state is None:
            state = zero_state
        start = state
        losses, carried = _forward_backward(stack, window, state, keep, batched, device)
        step += 1
        tokens = stream.tokens(window)

        norms = torch.stack([nn.utils.get_total_norm([p.grad for p in m.params]) for m in active])
        # One device sync per step for every member's two numbers.
        loss_vals, norm_vals = torch.stack([losses, norms]).tolist()
        shared = time.perf_counter() - t_step
        state = carried
        ended = []
        for g, m in enumerate(active):
            finite = math.isfinite(loss_vals[g]) and math.isfinite(norm_vals[g])
            if not finite and m.config.on_nonfinite == "skip":
                state = _sanitized(state, zero_state, g)
            if _member_step(m, g, step, loss_vals[g], norms[g], norm_vals[g], tokens, shared, window, start, state,
                            stream, should_stop, device):
                ended.append(g)
        if ended:
            survivors = [g for g in range(len(active)) if g not in ended]
            active = [active[g] for g in survivors]
            index = torch.tensor(survivors, dtype=torch.long, device=device)
            state = tuple(s.index_select(0, index) for s in state)
    return [m.outcome for m in members]


def _member(i: int, config: TrainConfig, ckpt: dict | None, stream: TextStream, device: torch.device,
            on_event: Callable[[int, object], None], why: str) -> _Member:
    """Member i's model, optimizer and schedule, built (or restored) exactly as train() builds its own."""
    if ckpt is not None:
        _check_resumable(ckpt, config, stream.vocab)
    outside = _generator_states(device)
    torch.manual_seed(config.seed)
    model = model_for(config, stream.sizes).to(device)
    rng = _generator_states(device)
    _set_generator_states(outside, device)
    lr = scheduled_lr(config, 1)
    optimizer = make_optimizer(config.optimizer, model.parameters(), lr, config.weight_decay)
    plateau = Plateau.of(config) if config.schedule == "plateau" else None
    spectral = SpectralNorms(config.seed)
    best = _Best(math.inf)
    step = 0
    if ckpt is not None:
        model.load_state_dict(ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])
        step = ckpt["step"]
        spectral = SpectralNorms(config.seed, ckpt.get("spectral"))
        best = _Best(ckpt.get("best_loss", math.inf))
        if plateau is not None:
            plateau = Plateau.of(config, ckpt["plateau"])
            lr = plateau.lr
        rng = {"cpu": ckpt["rng"]["torch"]}
        if device.type == "cuda":
            saved = ckpt["rng"]["cuda"]
            rng["cuda"] = saved[device.index or 0] if saved else torch.cuda.get_rng_state(device)
    report = _labelled(lambda event: on_event(i, event), "eager", why)
    return _Member(index=i, config=config, model=model, optimizer=optimizer, on_event=report, rng=rng, lr=lr,
                   spectral=spectral, plateau=plateau, best=best,
                   result=TrainResult(steps=step, loss=math.nan, perplexity=math.nan, stopped=False))


def _sanitized(state, zero_state, g: int):
    """After member g skipped a step: its carried state restarts from zeros when it is no longer finite."""
    if all(torch.isfinite(s[g]).all() for s in state):
        return state
    fixed = tuple(s.clone() for s in state)
    for s, z in zip(fixed, zero_state):
        s[g] = z[g]
    return fixed


def _member_step(m: _Member, g: int, step: int, loss_val: float, grad_norm: torch.Tensor, norm_val: float,
                 tokens: int, shared: float, window, start, state, stream: TextStream, should_stop, device) -> bool:
    """Member m's part of the step after the shared backward, as train()'s loop does it; True when m has ended.

    The step's seconds are the shared forward and backward's (`shared`) and the member's own update's.
    """
    t_own = time.perf_counter()
    config = m.config
    stopped = should_stop(m.index) and step < config.max_steps
    last = stopped or step == config.max_steps
    log = last or step % config.log_every == 0
    if log:
        param_norms = torch.stack([torch.linalg.vector_norm(p.grad) for p in m.params])
    probe = None
    if math.isfinite(loss_val) and math.isfinite(norm_val):
        if step % config.probe_every == 0:  # before the update: the weights the step's gradient was taken at
            view = _MemberView(stream, _member_state(state, g), window, _member_state(start, g))
            with _own_random(m, device):
                probe = _probe(config, m.model, view, m.spectral, step)
        clipped = 0 < config.clip_norm < norm_val
        if clipped:
            nn.utils.clip_grads_with_norm_(m.params, config.clip_norm, grad_norm)
        if config.schedule not in ("constant", "plateau"):
            m.lr = scheduled_lr(config, step)
            for group in m.optimizer.param_groups:
                group["lr"] = m.lr
        m.optimizer.step()
        m.interval.add(loss_val, clipped, tokens, shared + time.perf_counter() - t_own)
    elif config.on_nonfinite == "skip":
        clipped = False
        nonfinite = count_nonfinite(p.grad for p in m.params) if not math.isfinite(norm_val) else 0
        m.interval.skip(nonfinite, tokens, shared + time.perf_counter() - t_own)
    else:
        try:
            _raise_diverged(loss_val, norm_val, step, config.clip_norm)
        except TrainingDiverged as e:
            m.outcome = MemberOutcome(m.result, e)
        return True

    if log:
        norms = dict(zip(m.names, param_norms.tolist()))
        metrics = m.interval.metrics(step, stream.epoch, m.lr, norm_val, clipped, norms, stream.perplexity)
        m.on_event(metrics)
        m.result = TrainResult(steps=step, loss=metrics.loss, perplexity=metrics.perplexity, stopped=stopped)
        m.interval = _Interval()
    if probe is not None:
        m.on_event(probe)
    evaluation = None
    if stream.has_heldout and (last or step % config.eval_every == 0):
        evaluation = _evaluate(stream, m.model, step)
        m.on_event(evaluation)
        if m.plateau is not None and m.plateau.observe(evaluation.loss):
            m.lr = m.plateau.lr
            for group in m.optimizer.param_groups:
                group["lr"] = m.lr
    # The checkpoint keeps torch's generator state, which for a member is its own.
    with _own_random(m, device):
        _checkpoints(config, _MemberView(stream, _member_state(state, g)), m.model, m.optimizer, m.spectral,
                     m.plateau, None, step, device, m.on_event, m.best, evaluation,
                     regular=last or step % config.checkpoint_every == 0)
    if last:
        m.outcome = MemberOutcome(m.result)
    return last


