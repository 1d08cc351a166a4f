"""Sweep benchmark: G members of a sweep trained as one group against the same members trained one after another.

    .venv/bin/python bench/sweep.py                                # writes its section of BENCHMARKS.md
    .venv/bin/python bench/sweep.py --models rnn_scratch --groups 8 --steps 40

The configuration is the textbook's (bench/run.py): The Time Machine, character
tokens after d2l preprocessing, batch 32, num_steps 35, SGD, clipping at norm
1; rnn_scratch with 512 hidden units, lstm with 256. A group of G members
differs only in lr (G values spread geometrically over 0.25 to 4).

Each measurement runs, each in a process of its own and interleaved, the
group (`gradserve_worker.group.train_group`; for lstm both its paths, the
stacked cells and the members' own fused layers in turn) and the same G
configs trained one after another by `gradserve_worker.trainer.train`. The
parties take turns through their should_stop hooks, which each trainer calls
once per step: TURN_STEPS group steps, then TURN_STEPS x G single steps, and
so on, so a burst of load from elsewhere lands on all of them alike. Each
party's steps are timed from one hook call to the next, so a step includes
everything its trainer does in a step. Left out: the first WARMUP steps of
every run (allocation, lazy initialisation, the first run's model build),
and the first step of each turn, which pays for the other party's run (its
data out of the caches), as neither would in a run of its own.

Reported: aggregate tokens/s (members × batch × num_steps per step, over the
timed steps), the ratio group / one after another (above 1: the group is
faster), the largest relative difference between a member's final loss in
the group and alone (float32: they do the same work, in another order of
summation), and the 1-minute load average when each measurement started and
ended: the machine is shared, and the figures are only as steady as it was.
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import platform
import queue
import statistics
import time
import traceback
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import torch

from gradserve_worker.group import train_group
from gradserve_worker.trainer import StepMetrics, TrainConfig, train
from sections import write_section

REPO = Path(__file__).resolve().parents[1]
CORPUS = REPO / "tests" / "data" / "timemachine.txt"
HEADING = "## Sweeps: members trained as one group"
MODELS = {"rnn_scratch": 512, "lstm": 256}  # model -> hidden units, as in d2l
BATCH_SIZE, NUM_STEPS, CLIP = 32, 35, 1.0
TOKENS_PER_STEP = BATCH_SIZE * NUM_STEPS
# 1, 8 and 32 for the headline; 2 and 4 find where the group starts to pay.
GROUPS = (1, 2, 4, 8, 32)
# Steps per run by group size: enough timed steps for a steady figure, few enough that G=32 one after
# another (32 runs) stays within a minute or two here.
STEPS = {1: 100, 2: 60, 4: 60, 8: 50, 32: 25}
WARMUP = 5
# Group steps per turn (and G times as many single steps). The first step of each turn is not timed: it pays
# for the other party's run (its data out of the caches), which neither would in a run of its own.
TURN_STEPS = 5


def member_configs(model: str, G: int, steps: int, device: str) -> list[TrainConfig]:
    lrs = [0.25 * 16 ** (i / (G - 1)) for i in range(G)] if G > 1 else [1.0]
    return [TrainConfig(dataset="bench", tokenization="char", preprocess="d2l", model=model,
                        hidden_size=MODELS[model], batch_size=BATCH_SIZE, num_steps=NUM_STEPS, optimizer="sgd",
                        lr=lr, clip_norm=CLIP, max_steps=steps, seed=0, device=device, log_every=steps,
                        val_fraction=0.0) for lr in lrs]


# -----------------------------------------------------------------------------
# taking turns


class Turns:
    """Processes that run one at a time, in rotation; one that has finished leaves the rotation.

    The parties are processes, not threads of one process: torch's CPU ops
    run on an OpenMP team per calling thread, and once a second thread of a
    process has used torch, every parallel region in the process was measured
    to run slower (a single member's step from 18.5 to 33.5 ms here), which
    the one-after-another runs, with their many small ops, paid more than the
    group. A party's process has one such thread.
    """

    def __init__(self, ctx, names: list[str]):
        self.names = list(names)
        self.alive = ctx.Array("b", [1] * len(names))
        self.current = ctx.Value("i", 0, lock=False)
        self.changed = ctx.Condition()

    def wait(self, name: str) -> None:
        me = self.names.index(name)
        with self.changed:
            self.changed.wait_for(lambda: self.current.value == me)

    def _next(self, me: int) -> int:
        for k in range(1, len(self.names) + 1):
            if self.alive[(me + k) % len(self.names)]:
                return (me + k) % len(self.names)
        return me

    def pass_on(self, name: str) -> None:
        with self.changed:
            self.current.value = self._next(self.names.index(name))
            self.changed.notify_all()

    def leave(self, name: str) -> None:
        me = self.names.index(name)
        with self.changed:
            self.alive[me] = 0
            if self.current.value == me:
                self.current.value = self._next(me)
            self.changed.notify_all()


@dataclass
class Party:
    """One way of training the G members: its timed steps and the members' final losses."""

    name: str
    members: int  # members per step: G for a group, 1 for one run of the trainer
    seconds: list[float] = field(default_factory=list)
    losses: dict[int, float] = field(default_factory=dict)
    error: str | None = None

    @property
    def tokens_per_sec(self) -> float:
        return self.members * TOKENS_PER_STEP * len(self.seconds) / sum(self.seconds)


class Clock:
    """Times a party's steps from hook call to hook call, less the time it waited for its turn."""

    def __init__(self, party: Party, turns: Turns, sync):
        self.party, self.turns, self.sync = party, turns, sync
        self.last = time.perf_counter()
        self.resumed = False  # whether the next step is the first of a turn

    def step(self, index: int, hand_over: bool) -> None:
        """Step `index` (1-based within its run) ended; hand_over passes the turn on after it."""
        self.sync()
        now = time.perf_counter()
        if index > WARMUP and not self.resumed:
            self.party.seconds.append(now - self.last)
        self.resumed = hand_over
        if hand_over:
            self.turns.pass_on(self.party.name)
            self.turns.wait(self.party.name)
        self.last = time.perf_counter()


def run_group(party: Party, turns: Turns, configs, text: str, batched: bool | None, sync) -> None:
    clock = Clock(party, turns, sync)
    steps = [0]

    def should_stop(i: int) -> bool:
        if i == 0:
            steps[0] += 1
            clock.step(steps[0], hand_over=steps[0] % TURN_STEPS == 0)
        return False

    def on_event(i: int, event) -> None:
        if isinstance(event, StepMetrics):
            party.losses[i] = event.loss

    train_group(configs, text, on_event, should_stop=should_stop, batched=batched)


def run_one_after_another(party: Party, turns: Turns, configs, text: str, sync) -> None:
    clock = Clock(party, turns, sync)
    done = [0]
    for i, config in enumerate(configs):
        steps = [0]

        def should_stop() -> bool:
            steps[0] += 1
            done[0] += 1
            # One group step costs about G single steps: hand over after every TURN_STEPS x G of them.
            clock.step(steps[0], hand_over=done[0] % (TURN_STEPS * len(configs)) == 0)
            return False

        def on_event(event, i=i) -> None:
            if isinstance(event, StepMetrics):
                party.losses[i] = event.loss

        train(config, text, on_event, should_stop=should_stop)


def _party(name: str, turns: Turns, ready, results, model: str, G: int, steps: int, device: str,
           threads: int) -> None:
    """One party's process: its runs, its turns, and its Party put on `results`."""
    torch.set_num_threads(threads)
    party = Party(name, 1 if name == "one after another" else G)
    configs = member_configs(model, G, steps, device)
    text = CORPUS.read_text(encoding="utf-8")
    sync = torch.cuda.synchronize if device == "cuda" else lambda: None
    ready.wait()  # every party has started (imported torch): none starts while another still loads
    turns.wait(name)
    try:
        if name == "one after another":
            run_one_after_another(party, turns, configs, text, sync)
        else:
            # The lstm group runs both its paths: stacked cells, and the members' own layers in turn.
            run_group(party, turns, configs, text, name != "group, own layers in turn", sync)
    except BaseException:  # reported by the parent
        party.error = traceback.format_exc()
    finally:
        turns.leave(name)
        results.put(party)


def measure(model: str, G: int, steps: int, device: str) -> list[dict]:
    """One row per group path: its throughput against the members one after another, measured together."""
    names = ["group"] if model != "lstm" else ["group, stacked cells", "group, own layers in turn"]
    names.append("one after another")
    ctx = multiprocessing.get_context("spawn")  # a fresh process each: none inherits a torch (or CUDA) state
    turns, ready, results = Turns(ctx, names), ctx.Barrier(len(names)), ctx.Queue()
    load_before = os.getloadavg()[0]
    procs = [ctx.Process(target=_party, args=(name, turns, ready, results, model, G, steps, device,
                                              torch.get_num_threads())) for name in names]
    for proc in procs:
        proc.start()
    parties: dict[str, Party] = {}
    while len(parties) < len(procs):
        try:
            party = results.get(timeout=5)
            parties[party.name] = party
        except queue.Empty:
            dead = [f"{name} (exit {proc.exitcode})" for name, proc in zip(names, procs)
                    if proc.exitcode and name not in parties]
            if dead:
                raise RuntimeError(f"died without a result: {', '.join(dead)}")
    for proc in procs:
        proc.join()
    load_after = os.getloadavg()[0]
    for p in parties.values():
        if p.error is not None:
            raise RuntimeError(f"{p.name} failed: {p.error}")
    alone = parties.pop("one after another")
    rows = []
    for p in parties.values():
        loss_diff = max(abs(p.losses[i] - alone.losses[i]) / abs(alone.losses[i]) for i in range(G))
        rows.append({"model": model, "H": MODELS[model], "device": device, "G": G, "path": p.name,
                     "steps": steps, "group": p.tokens_per_sec, "alone": alone.tokens_per_sec,
                     "ratio": p.tokens_per_sec / alone.tokens_per_sec, "loss_diff": loss_diff,
                     "load": (load_before, load_after)})
    return rows


# -----------------------------------------------------------------------------
# the report


def render(rows: list[dict], env: dict) -> str:
    lines = [
        HEADING,
        "",
        f"`bench/sweep.py` ({env['date']}; {env['cores']} cores, torch {env['torch']}, {env['threads']} torch "
        f"threads, Python {env['python']}; GPU: {env['gpu']}). The d2l configuration (batch 32, num_steps 35, SGD, "
        "clip 1; rnn_scratch H=512, lstm H=256); a group of G members differs only in lr. Group and the same "
        "members one after another by `train()` run interleaved, in a process each, taking turns of "
        f"{TURN_STEPS} group steps and {TURN_STEPS} x G single steps; aggregate tokens/s over each run's steps "
        f"after the first {WARMUP}, less the first step of each turn. Load: the 1-minute load average as each row's "
        "measurement started → ended (this machine is shared).",
        "",
        "| model | H | device | G | group path | steps | group tokens/s | one after another tokens/s | ratio "
        "| final loss, max rel. diff | load |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(f"| {r['model']} | {r['H']} | {r['device']} | {r['G']} | {r['path']} | {r['steps']} | "
                     f"{r['group'] / 1e3:.1f}k | {r['alone'] / 1e3:.1f}k | {r['ratio']:.2f} | {r['loss_diff']:.1e} | "
                     f"{r['load'][0]:.2f} → {r['load'][1]:.2f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", default=",".join(MODELS), help=f"comma-separated, from {', '.join(MODELS)}")
    p.add_argument("--groups", default=",".join(map(str, GROUPS)), help="comma-separated group sizes")
    p.add_argument("--steps", type=int, help="steps per run for every group size (default: " +
                   ", ".join(f"{s} at G={g}" for g, s in STEPS.items()) + ")")
    p.add_argument("--device", choices=("cpu", "cuda"), action="append",
                   help="repeat for several; default: cpu, and cuda when torch sees a GPU")
    p.add_argument("--threads", type=int, default=torch.get_num_threads(), help="torch threads")
    p.add_argument("--out", type=Path, default=REPO / "BENCHMARKS.md", help="where to write the section")
    args = p.parse_args(argv)
    models = [m for m in args.models.split(",") if m]
    if not models or set(models) - set(MODELS):
        p.error(f"--models must name some of {', '.join(MODELS)}")
    groups = [int(g) for g in args.groups.split(",") if g]
    if args.steps is not None and args.steps <= WARMUP:
        p.error(f"--steps must be above {WARMUP}")
    devices = args.device or (["cpu", "cuda"] if torch.cuda.is_available() else ["cpu"])
    if "cuda" in devices and not torch.cuda.is_available():
        p.error("--device cuda: torch sees no CUDA GPU here")
    torch.set_num_threads(args.threads)
    env = {
        "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "cores": os.cpu_count(),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none",
    }
    rows = []
    for device in devices:
        for model in models:
            for G in groups:
                steps = args.steps or STEPS.get(G, statistics.median(STEPS.values()))
                for row in measure(model, G, int(steps), device):
                    rows.append(row)
                    print(f"{model} G={G} {device} {row['path']}: {row['group'] / 1e3:.1f}k vs "
                          f"{row['alone'] / 1e3:.1f}k tokens/s, ratio {row['ratio']:.2f}, load "
                          f"{row['load'][0]:.2f} → {row['load'][1]:.2f}", flush=True)
    section = render(rows, env)
    write_section(args.out, HEADING, section + "\n")
    print(section)


if __name__ == "__main__":
    main()
