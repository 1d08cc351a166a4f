"""Sweep benchmark: G members of a sweep trained as one group against the same members trained one after another.

    .venv/bin/python bench/sweep.py                                # writes its section of BENCHMARKS.md
    .venv/bin/python bench/sweep.py --models rnn_scratch --groups 8 --steps 40

The configuration is the textbook's (bench/run.py): The Time Machine, character
tokens after d2l preprocessing, batch 32, num_steps 35, SGD, clipping at norm
1; rnn_scratch with 512 hidden units, lstm with 256. A group of G members
differs only in lr (G values spread geometrically over 0.25 to 4).

Each measurement runs, in one process and interleaved step by step, the
group (`gradserve_worker.group.train_group`; for lstm both its paths, the
stacked cells and the members' own fused layers in turn) and the same G
configs trained one after another by `gradserve_worker.trainer.train`. The
parties take turns through their should_stop hooks, which each trainer calls
once per step: one group step, then G single steps, and so on, so a burst of
load from elsewhere lands on all of them alike. Each party's steps are timed
from its previous hook call (or from getting its turn back) to its next one,
so a step includes everything its trainer does in a step. The first WARMUP
steps of every run (allocation, lazy initialisation, the first run's model
build) are left out.

Reported: aggregate tokens/s (members × batch × num_steps per step, over the
timed steps), the ratio group / one after another (above 1: the group is
faster), the largest relative difference between a member's final loss in
the group and alone (float32: they do the same work, in another order of
summation), and the 1-minute load average when each measurement started and
ended: the machine is shared, and the figures are only as steady as it was.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import threading
import time
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


def member_configs(model: str, G: int, steps: int, device: str) -> list[TrainConfig]:
    lrs = [0.25 * 16 ** (i / (G - 1)) for i in range(G)] if G > 1 else [1.0]
    return [TrainConfig(dataset="bench", tokenization="char", preprocess="d2l", model=model,
                        hidden_size=MODELS[model], batch_size=BATCH_SIZE, num_steps=NUM_STEPS, optimizer="sgd",
                        lr=lr, clip_norm=CLIP, max_steps=steps, seed=0, device=device, log_every=steps,
                        val_fraction=0.0) for lr in lrs]


# -----------------------------------------------------------------------------
# taking turns


class Turns:
    """Parties that run one at a time, in rotation; a party that has finished leaves the rotation."""

    def __init__(self, names: list[str]):
        self.order, self.current = list(names), names[0]
        self.changed = threading.Condition()

    def wait(self, name: str) -> None:
        with self.changed:
            self.changed.wait_for(lambda: self.current == name)

    def pass_on(self, name: str) -> None:
        with self.changed:
            self.current = self.order[(self.order.index(name) + 1) % len(self.order)]
            self.changed.notify_all()

    def leave(self, name: str) -> None:
        with self.changed:
            if len(self.order) > 1 and self.current == name:
                self.current = self.order[(self.order.index(name) + 1) % len(self.order)]
            self.order.remove(name)
            self.changed.notify_all()


@dataclass
class Party:
    """One way of training the G members: its timed steps and the members' final losses."""

    name: str
    members: int  # members per step: G for a group, 1 for one run of the trainer
    seconds: list[float] = field(default_factory=list)
    losses: dict[int, float] = field(default_factory=dict)
    error: BaseException | None = None

    @property
    def tokens_per_sec(self) -> float:
        return self.members * TOKENS_PER_STEP * len(self.seconds) / sum(self.seconds)


class Clock:
    """Times a party's steps from hook call to hook call, less the time it waited for its turn."""

    def __init__(self, party: Party, turns: Turns, sync):
        self.party, self.turns, self.sync = party, turns, sync
        self.last = time.perf_counter()

    def step(self, index: int, hand_over: bool) -> None:
        """Step `index` (1-based within its run) ended; hand_over passes the turn on after it."""
        self.sync()
        now = time.perf_counter()
        if index > WARMUP:
            self.party.seconds.append(now - self.last)
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
            clock.step(steps[0], hand_over=True)
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
            # One group step costs about G single steps: hand over after every G of them.
            clock.step(steps[0], hand_over=done[0] % len(configs) == 0)
            return False

        def on_event(event, i=i) -> None:
            if isinstance(event, StepMetrics):
                party.losses[i] = event.loss

        train(config, text, on_event, should_stop=should_stop)


def measure(model: str, G: int, steps: int, device: str, text: str) -> list[dict]:
    """One row per group path: its throughput against the members one after another, measured together."""
    configs = member_configs(model, G, steps, device)
    sync = torch.cuda.synchronize if device == "cuda" else lambda: None
    parties = {"group": Party("group", G)} if model != "lstm" else {
        "group, stacked cells": Party("group, stacked cells", G),
        "group, own layers in turn": Party("group, own layers in turn", G),
    }
    parties["one after another"] = Party("one after another", 1)
    turns = Turns(list(parties))
    targets = {
        "group": lambda p: run_group(p, turns, configs, text, True, sync),
        "group, stacked cells": lambda p: run_group(p, turns, configs, text, True, sync),
        "group, own layers in turn": lambda p: run_group(p, turns, configs, text, False, sync),
        "one after another": lambda p: run_one_after_another(p, turns, configs, text, sync),
    }

    def body(party: Party) -> None:
        turns.wait(party.name)
        try:
            targets[party.name](party)
        except BaseException as e:  # reported by the main thread
            party.error = e
        finally:
            turns.leave(party.name)

    load_before = os.getloadavg()[0]
    threads = [threading.Thread(target=body, args=(p,)) for p in parties.values()]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    load_after = os.getloadavg()[0]
    for p in parties.values():
        if p.error is not None:
            raise RuntimeError(f"{p.name} failed") from p.error
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
        "members one after another by `train()` run interleaved step by step in one process; aggregate tokens/s "
        f"over each run's steps after the first {WARMUP}. Load: the 1-minute load average as each row's "
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
    text = CORPUS.read_text(encoding="utf-8")
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
                for row in measure(model, G, int(steps), device, text):
                    rows.append(row)
                    print(f"{model} G={G} {device} {row['path']}: {row['group'] / 1e3:.1f}k vs "
                          f"{row['alone'] / 1e3:.1f}k tokens/s, ratio {row['ratio']:.2f}, load "
                          f"{row['load'][0]:.2f} → {row['load'][1]:.2f}", flush=True)
    section = render(rows, env)
    write_section(args.out, HEADING, section + "\n")
    print(section)


if __name__ == "__main__":
    main()
