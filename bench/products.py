"""What batching a sweep's members can gain on this CPU: the recurrent product, alone, batched, and at full size.

    .venv/bin/python bench/products.py        # writes its section of BENCHMARKS.md

A sweep group (bench/sweep.py) replaces each member's recurrent product,
(batch × H)·(H × H) per time step, with one batched product over the G
members. Each member has its own W_hh, so the batch cannot become one larger
product: it stays G products of the member's shape. Whether the group can be
much faster than its members one after another therefore comes down to how
much faster torch runs G products of one shape in one `bmm` call than one at a
time, against how fast this CPU multiplies at all (one product G times taller,
which a shared weight would allow). All three run here, interleaved, in
float32 at the textbook's shape (batch 32, H 512), and the section says what
rate each reaches.

It also times one member's whole training step (`gradserve_worker.trainer`,
rnn_scratch H=512, bench/sweep.py's configuration) and works out how much of
it those products take, alone and at the batched rates: the bound on what a
group can gain while the rest of the step stays as it is.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import statistics
import time
from datetime import datetime, timezone
from pathlib import Path

import torch

from gradserve_worker.trainer import StepMetrics, train
from sections import write_section
from sweep import BATCH_SIZE, CORPUS, MODELS, NUM_STEPS, member_configs

REPO = Path(__file__).resolve().parents[1]
HEADING = "## Sweeps: what batching can gain on this CPU"
H = MODELS["rnn_scratch"]
GROUPS = (8, 32)
ROUNDS = 7
# The products of one member's step: the recurrence's (B × H)·(H × H) at each time step, and the weight
# gradient's (H × T·B)·(T·B × H) over the window.
STEP_FLOP = 2.0 * BATCH_SIZE * H * H
WINDOW_FLOP = 2.0 * NUM_STEPS * BATCH_SIZE * H * H


def gflops(fn, flop: float, seconds: float = 0.3) -> float:
    """fn's rate in GFLOP/s: calls repeated for about `seconds`, after two to warm up."""
    fn(), fn()
    calls, started = 0, time.perf_counter()
    while (elapsed := time.perf_counter() - started) < seconds:
        fn()
        calls += 1
    return flop * calls / elapsed / 1e9


def products(G: int) -> dict[str, float]:
    """GFLOP/s of the member's products: alone, G of them one at a time and in one batched call; and one G times taller.

    "step" is the recurrent product of one time step, (B × H)·(H × H);
    "window" the weight gradient's product over a window, (H × T·B)·(T·B × H).
    """
    a, w = torch.randn(G, BATCH_SIZE, H), torch.randn(G, H, H)
    hs, grads = torch.randn(G, H, NUM_STEPS * BATCH_SIZE), torch.randn(G, NUM_STEPS * BATCH_SIZE, H)
    tall = a.reshape(G * BATCH_SIZE, H)
    return {
        "step": gflops(lambda: torch.mm(a[0], w[0]), STEP_FLOP),
        "step_loop": gflops(lambda: [torch.mm(a[i], w[i]) for i in range(G)], G * STEP_FLOP),
        "step_bmm": gflops(lambda: torch.bmm(a, w), G * STEP_FLOP),
        "step_tall": gflops(lambda: torch.mm(tall, w[0]), G * STEP_FLOP),
        "window": gflops(lambda: torch.mm(hs[0], grads[0]), WINDOW_FLOP),
        "window_bmm": gflops(lambda: torch.bmm(hs, grads), G * WINDOW_FLOP),
    }


def member_step_seconds(steps: int) -> float:
    """The median wall seconds of one rnn_scratch member's d2l training step, over `steps` steps."""
    [config] = member_configs("rnn_scratch", 1, steps, "cpu")
    config = dataclasses.replace(config, log_every=1)
    seconds: list[float] = []

    def on_event(event) -> None:
        if isinstance(event, StepMetrics):
            seconds.append(event.seconds)

    train(config, CORPUS.read_text(encoding="utf-8"), on_event=on_event)
    return statistics.median(seconds[5:])


def product_seconds(r: dict[str, float], batched: bool) -> float:
    """Seconds one member's recurrent products take per training step at the rates `r`, alone or batched.

    A step runs 2T step products (the recurrence forward, and the gradient
    through it) and one window product (∂W_hh). The output layer's products,
    with a 28-character vocabulary, are under 6% of the arithmetic and left out.
    """
    suffix = "_bmm" if batched else ""
    return (2 * NUM_STEPS * STEP_FLOP / r["step" + suffix] + WINDOW_FLOP / r["window" + suffix]) / 1e9


def render(rows: dict[int, dict[str, float]], member_s: float, env: dict) -> str:
    lines = [
        HEADING, "",
        f"`bench/products.py`, {env['date']}; {env['cores']} cores, torch {env['torch']}, {env['threads']} torch "
        f"threads; float32, B={BATCH_SIZE}, H={H}, T={NUM_STEPS}; the median of {ROUNDS} interleaved rounds. Load "
        f"(1-minute average): {env['load'][0]:.2f} at the start, {env['load'][1]:.2f} at the end.", "",
        "GFLOP/s of one member's recurrent product for a time step, (B×H)·(H×H), and of its weight gradient's product "
        "over a window, (H×T·B)·(T·B×H):", "",
        "| G | step product alone | G of them one at a time | G in one bmm | one G times taller (a shared weight) "
        "| window product alone | G in one bmm |",
        "|---|---|---|---|---|---|---|",
    ]
    for G, r in rows.items():
        lines.append(f"| {G} | {r['step']:.1f} | {r['step_loop']:.1f} | {r['step_bmm']:.1f} | {r['step_tall']:.1f} | "
                     f"{r['window']:.1f} | {r['window_bmm']:.1f} |")
    alone = product_seconds(next(iter(rows.values())), batched=False)
    lines += [
        "",
        f"One rnn_scratch member's training step (the d2l configuration) took {member_s * 1e3:.1f} ms here, "
        f"{alone * 1e3:.1f} ms of it its recurrent products at the rates above. What a group of G such members "
        "could gain per member step, with its products at the batched rates:", "",
        "| G | products per member, alone → batched | products alone faster by | step faster by, the rest unchanged "
        "| step faster by, the rest gone |",
        "|---|---|---|---|---|",
    ]
    for G, r in rows.items():
        mine, batched = product_seconds(r, batched=False), product_seconds(r, batched=True)
        rest = member_s - mine
        lines.append(f"| {G} | {mine * 1e3:.1f} → {batched * 1e3:.1f} ms | {mine / batched:.2f}× | "
                     f"{member_s / (rest + batched):.2f}× | {member_s / batched:.2f}× |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    p.add_argument("--threads", type=int, default=torch.get_num_threads(), help="torch threads")
    p.add_argument("--member-steps", type=int, default=40, help="steps of the member's own run (default 40)")
    p.add_argument("--out", type=Path, default=REPO / "BENCHMARKS.md", help="where to write the section")
    args = p.parse_args(argv)
    if args.member_steps <= 10:
        p.error("--member-steps must be above 10")
    torch.set_num_threads(args.threads)
    load_start = os.getloadavg()[0]
    samples: dict[int, list[dict[str, float]]] = {G: [] for G in GROUPS}
    for _ in range(ROUNDS):
        for G in GROUPS:
            samples[G].append(products(G))
    rows = {G: {k: statistics.median(s[k] for s in runs) for k in runs[0]} for G, runs in samples.items()}
    member_s = member_step_seconds(args.member_steps)
    env = {
        "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "cores": os.cpu_count(),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "load": (load_start, os.getloadavg()[0]),
    }
    section = render(rows, member_s, env)
    write_section(args.out, HEADING, section + "\n")
    print(section)


if __name__ == "__main__":
    main()
