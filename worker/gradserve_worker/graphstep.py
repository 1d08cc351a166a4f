"""The training step with static buffers, captured once per window shape as a CUDA graph and replayed.

At a batch of 32 a recurrent model's step on a GPU is bound by kernel launches
and host syncs, not by arithmetic: the forward over a window, its backward and
the update launch hundreds of small kernels, and the eager loop reads the loss
and the gradient norm back at every step to decide about clipping. StaticStep
runs the eager step's own code (the stream's batch_loss, torch's optimizer)
with nothing the host has to wait for:

* the window's inputs and targets and the carried state live in buffers that
  never move; a step copies its window in, and zeroes the state where the
  stream says it restarts;
* clipping multiplies every gradient by clip_grads_with_norm_'s own
  coefficient where the norm is above clip_norm and by 1 elsewhere, decided
  on the device;
* the loss sum, the clip count, the last step's norms and the first step
  whose loss or norm was not finite accumulate in device tensors that the
  trainer reads only when it reports (read());
* the optimizer keeps its step count on the device (Adam and AdamW with
  capturable=True) and, with a schedule, reads the learning rate from a device
  tensor (SGD then uses its fused kernel, the one that takes lr as a tensor).

On CUDA every window shape first runs WARMUP_STEPS times uncaptured on a side
stream, where cuBLAS and cuDNN set up their workspaces and the optimizer its
state (these steps train like any other); then its step is captured with
torch.cuda.graph and replayed for every later window of that shape. Dropout and
randomized truncation's ξ draw from torch's CUDA generator, whose draws inside
a graph advance it at each replay exactly as eager draws do. Off CUDA the same
body runs uncaptured, and a test holds it to the eager step bit for bit.

Probes, evaluations and checkpoints stay outside the graph: the trainer runs
them between replays. unsupported() names what this step cannot serve; the
trainer runs the eager step for those jobs and says why in their metrics.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import NamedTuple

import torch
from torch import nn

from gradserve_worker.data import Window

# Uncaptured runs of a window shape before its capture: the first allocates the
# optimizer's state and the libraries' workspaces, which a capture must find in place.
WARMUP_STEPS = 3
# Graphs per job. Fixed truncation has one window shape, TBPTT(k1, k2) on a text
# about k2/k1 (the first windows of each epoch reach back less far); shapes
# beyond this many run uncaptured rather than each holding a memory pool.
MAX_GRAPHS = 8


def unsupported(config) -> str:
    """Why the static step cannot serve a job, or "" when it can."""
    if config.on_nonfinite == "skip":
        return "on_nonfinite=skip decides on the host, at every step, whether to apply the update"
    if config.schedule == "plateau":
        return "schedule=plateau sets lr from the evaluations, which the eager step's loop follows"
    if config.truncation == "auto":
        return "truncation=auto changes the window at checkpoint boundaries, which the eager step's loop follows"
    if config.dropout and config.num_layers > 1 and config.model != "rnn_scratch" and config.truncation != "randomized":
        return ("cuDNN draws the dropout between stacked layers from a random state of its own, outside torch's "
                "generator, and its capture is unverified")
    return ""


class Totals(NamedTuple):
    """What the device accumulated, read in one transfer."""

    loss_sum: float  # summed step losses since the last reset_interval()
    clipped: int  # steps since then at which clipping fired
    grad_norm: float  # the last step's global gradient norm, before clipping
    last_clipped: bool
    param_norms: list[float]  # the last step's per-parameter gradient norms, before clipping
    first_bad: int  # the first step whose loss or gradient norm was not finite; 0: none
    bad_loss: float  # that step's loss and norm
    bad_norm: float


@dataclass
class _Shape:
    window: Window  # the static inputs and targets of every window of this shape
    runs: int = 0  # uncaptured runs so far
    graph: torch.cuda.CUDAGraph | None = None


class StaticStep:
    """One job's training step over static buffers; see the module docstring.

        step = StaticStep(model, optimizer, stream, config, device, capture=True, step=0)
        step.load(batch, fresh, lr)   # the stream's next_batch(), this step's learning rate
        step.run()                    # forward, backward, clip, update: replayed once captured
        totals = step.read()          # a host sync: only where the trainer reports
    """

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer, stream, config, device: torch.device, *,
                 capture: bool, step: int):
        self.model, self.optimizer, self.stream = model, optimizer, stream
        self.params = list(model.parameters())
        self.clip = config.clip_norm
        self.capture = capture
        self.scheduled = config.schedule != "constant"
        self.portable = PortableOptimizer(optimizer)
        self.lr = None
        if capture:
            self.lr = _make_capturable(optimizer, device, tensor_lr=self.scheduled)

        def zero(dtype=torch.float32):
            return torch.zeros((), device=device, dtype=dtype)

        self.step_count = torch.tensor(step, device=device)
        self.loss_sum, self.clipped = zero(torch.float64), zero(torch.int64)
        self.grad_norm, self.last_clipped = zero(), zero(torch.bool)
        self.param_norms = torch.zeros(len(self.params), device=device)
        self.first_bad, self.bad_values = zero(torch.int64), torch.zeros(2, device=device)
        start = getattr(stream, "state", None) or stream.zero_state
        self.state = tuple(s.detach().clone() for s in start)
        if hasattr(stream, "state"):
            stream.state = self.state  # what the stream's checkpoint position reports from now on
        self.shapes: dict[tuple, _Shape] = {}
        self.current: _Shape | None = None
        self.side_stream = torch.cuda.Stream(device) if capture else None
        self.capture_failed = ""  # why a capture failed; the step then runs uncaptured for the rest of the job

    @property
    def path(self) -> tuple[str, str]:
        """How the steps run now, for the metrics: ("captured" | "static", why not captured)."""
        if not self.capture:
            return "static", "graphs are captured on CUDA only"
        if self.capture_failed:
            return "static", f"the capture failed, so the same step runs uncaptured: {self.capture_failed}"
        return "captured", ""

    # ------------------------------------------------------------------ per step

    def load(self, batch: Window, fresh: bool, lr: float) -> None:
        """Put the step's window into its shape's buffers; `fresh`: the state restarts from zeros."""
        key = (tuple(batch.X.shape), tuple(batch.Y.shape), batch.context, batch.carry_at)
        shape = self.shapes.get(key)
        if shape is None:
            shape = self.shapes[key] = _Shape(Window(batch.X.clone(), batch.Y.clone(), batch.context, batch.carry_at))
        else:
            shape.window.X.copy_(batch.X)
            shape.window.Y.copy_(batch.Y)
        if fresh:
            for s in self.state:
                s.zero_()
        if self.scheduled:
            if self.lr is not None:
                self.lr.fill_(lr)
            else:
                for group in self.optimizer.param_groups:
                    group["lr"] = lr
        self.stream.keep_for_replay(shape.window, self.state)
        self.current = shape

    def run(self) -> None:
        """The loaded step: replayed when its shape is captured, otherwise run (and captured once warm)."""
        shape = self.current
        if shape.graph is not None:
            shape.graph.replay()
            return
        if not self.capture:
            self._body(shape.window)
            return
        captured = sum(s.graph is not None for s in self.shapes.values())
        if shape.runs >= WARMUP_STEPS and captured < MAX_GRAPHS and not self.capture_failed:
            try:
                shape.graph = self._capture(shape.window)
            except RuntimeError as e:  # nothing ran during the capture: the step is still to be taken
                self.capture_failed = str(e).splitlines()[0]
            else:
                shape.graph.replay()
                return
        self.side_stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(self.side_stream), warnings.catch_warnings():
            # Adam's notice that a capturable optimizer is running uncaptured: these are the warm-up steps.
            warnings.filterwarnings("ignore", "This instance was constructed with capturable=True")
            self._body(shape.window)
        torch.cuda.current_stream().wait_stream(self.side_stream)
        shape.runs += 1

    def _capture(self, window: Window) -> torch.cuda.CUDAGraph:
        # The backward inside the capture must allocate the gradients from the graph's pool, not add to old ones.
        self.optimizer.zero_grad(set_to_none=True)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            self._body(window)
        return graph

    def _body(self, window: Window) -> None:
        """The eager step's arithmetic, with every decision and every total kept on the device."""
        self.optimizer.zero_grad(set_to_none=True)
        loss, carried = self.stream.batch_loss(self.model, window, self.state)
        loss.backward()
        loss = loss.detach()
        grads = [p.grad for p in self.params]
        norm = nn.utils.get_total_norm(grads)
        self.param_norms.copy_(torch.stack(torch._foreach_norm(grads)))
        self.step_count += 1
        self.loss_sum += loss.double()
        self.grad_norm.copy_(norm)
        first = ~(torch.isfinite(loss) & torch.isfinite(norm)) & (self.first_bad == 0)
        self.first_bad.copy_(torch.where(first, self.step_count, self.first_bad))
        self.bad_values.copy_(torch.where(first, torch.stack([loss, norm]), self.bad_values))
        if self.clip > 0:
            clipped = norm > self.clip
            # clip_grads_with_norm_'s coefficient, applied only where the eager step would apply it.
            coef = torch.where(clipped, torch.clamp(self.clip / (norm + 1e-6), max=1.0), 1.0)
            torch._foreach_mul_(grads, coef)
            self.clipped += clipped
            self.last_clipped.copy_(clipped)
        self.optimizer.step()
        for s, c in zip(self.state, carried):
            if c is not s:
                s.copy_(c)

    # ------------------------------------------------------------------ reading

    def read(self) -> Totals:
        """The accumulated totals: one transfer, which waits for every step launched so far."""
        packed = torch.cat([
            torch.stack([self.loss_sum, self.clipped.double(), self.grad_norm.double(), self.last_clipped.double(),
                         self.first_bad.double()]),
            self.bad_values.double(), self.param_norms.double(),
        ]).tolist()
        loss_sum, clipped, grad_norm, last_clipped, first_bad, bad_loss, bad_norm, *param_norms = packed
        return Totals(loss_sum, int(clipped), grad_norm, bool(last_clipped), param_norms, int(first_bad),
                      bad_loss, bad_norm)

    def reset_interval(self) -> None:
        self.loss_sum.zero_()
        self.clipped.zero_()


def _make_capturable(optimizer: torch.optim.Optimizer, device: torch.device, *, tensor_lr: bool):
    """Turn torch's optimizer into one whose step a graph can hold; returns the device lr tensor (or None)."""
    lr = torch.tensor(float(optimizer.param_groups[0]["lr"]), device=device) if tensor_lr else None
    for group in optimizer.param_groups:
        if "capturable" in group:  # Adam, AdamW: bias corrections from a device-side step count
            group["capturable"] = True
        if lr is not None:
            group["lr"] = lr
            if isinstance(optimizer, torch.optim.SGD):
                group["fused"] = True  # the SGD kernel that reads lr from a tensor; the foreach one calls .item()
    for state in optimizer.state.values():
        if "step" in state:
            state["step"] = state["step"].to(device=device, dtype=torch.float32)
    return lr


class PortableOptimizer:
    """The optimizer as a checkpoint keeps it: its state_dict with the settings the eager step builds it with.

    So a checkpoint written by a captured run resumes on any worker, captured
    or eager, CPU or GPU.
    """

    def __init__(self, optimizer: torch.optim.Optimizer):
        self.optimizer = optimizer
        keys = ("capturable", "fused")
        self.original = [{k: group[k] for k in keys if k in group} for group in optimizer.param_groups]

    def state_dict(self) -> dict:
        state = self.optimizer.state_dict()
        for group, original in zip(state["param_groups"], self.original):
            group.update(original)
            if isinstance(group["lr"], torch.Tensor):
                group["lr"] = group["lr"].item()
        return state
