"""Throughput benchmark: gradserve's trainer against a plain d2l.ai training loop.

    make bench                                   # = .venv/bin/python bench/run.py
    .venv/bin/python bench/run.py --steps 300 --reps 5 --models rnn_scratch,lstm --device cpu --out BENCHMARKS.md

The configuration is the textbook's (d2l.ai chapter 9): The Time Machine
(tests/data/timemachine.txt, public domain; the product's packages ship no corpus),
character tokens after d2l preprocessing (vocabulary 28), batch 32, num_steps
35, SGD with lr 1, clipping at norm 1; rnn_scratch with 512 hidden units,
rnn, gru and lstm with 256.

For each model and device, `gradserve_worker.trainer.train` (every diagnostic at
its default; validation off, val_fraction=0, so both loops train on the same
tokens) and `d2l_baseline.Loop` run in this one process on the same tokens
from the same seed, interleaved step by step: the trainer's should_stop hook,
which it calls once per step, runs one d2l step. A burst of load from elsewhere
then lands on both loops alike instead of on whichever ran at the time (whole
runs one after the other spread by ±10% here). Each of our steps is timed from
the end of the d2l step before it to the start of the d2l step after it, so
it includes everything the trainer does in a step, reporting, probes and
checkpoints included. Reported per model:

  - tokens/s: the median over repetitions of steady-state throughput, from the
    end of step LOG_EVERY (allocator and lazy initialisation done) to the end
    of the last step, in batch_size × num_steps tokens per step;
  - the ratio of the two (above 1: the trainer is faster);
  - training perplexity over the last LOG_EVERY steps, for both: the two runs
    start from the same weights, so this checks they do the same work;
  - peak memory of a fresh process per configuration that trains `--memory-steps`
    steps: on CPU the process's resident high-water mark (VmHWM, or ru_maxrss
    where there is no /proc), which includes Python and torch themselves (a
    process that trains nothing is measured too, for reference); on CUDA
    torch.cuda.max_memory_allocated.

Results go to --out (default BENCHMARKS.md) as Markdown with the environment:
CPU, cores, torch threads, load average before and after, GPU name. No test
ever asserts a time; this is the only place speed is measured.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import torch

import d2l_baseline
from gradserve_worker.data import build_corpus
from gradserve_worker.trainer import StepMetrics, TrainConfig, train

REPO = Path(__file__).resolve().parents[1]
CORPUS = REPO / "tests" / "data" / "timemachine.txt"
MODELS = {"rnn_scratch": 512, "rnn": 256, "gru": 256, "lstm": 256}  # model -> hidden units, as in d2l
BATCH_SIZE, NUM_STEPS, LR, CLIP = 32, 35, 1.0, 1.0
TOKENS_PER_STEP = BATCH_SIZE * NUM_STEPS
SEED = 0
DEFAULT_STEPS = 300
DEFAULT_REPS = 3
DEFAULT_MEMORY_STEPS = 100
# Steps left out of the throughput at the start, and averaged for the perplexity at the end.
LOG_EVERY = 50
# The two loops start from the same weights and see the same tokens; their
# perplexities may differ by the window offsets only.
PPL_TOLERANCE = 0.03
IMPLS = ("gradserve", "d2l")


def load_corpus() -> tuple[str, torch.Tensor, int]:
    if not CORPUS.exists():
        sys.exit(f"bench: the corpus is missing: {CORPUS}; it is part of the repository, so restore it from git")
    text = CORPUS.read_text(encoding="utf-8")
    vocab, corpus = build_corpus(text, "char", "d2l")
    return text, corpus, len(vocab)


@dataclass
class Timing:
    tokens_per_sec: float
    perplexity: float  # over the last LOG_EVERY steps


def gradserve_config(model: str, steps: int, device: str) -> TrainConfig:
    return TrainConfig(
        dataset="bench", tokenization="char", preprocess="d2l", model=model, hidden_size=MODELS[model],
        batch_size=BATCH_SIZE, num_steps=NUM_STEPS, optimizer="sgd", lr=LR, clip_norm=CLIP, max_steps=steps,
        seed=SEED, device=device, log_every=LOG_EVERY, val_fraction=0.0,
    )


def d2l_loop(model: str, corpus: torch.Tensor, vocab_size: int, device: str) -> d2l_baseline.Loop:
    return d2l_baseline.Loop(model, corpus, vocab_size, hidden_size=MODELS[model], batch_size=BATCH_SIZE,
                             num_steps=NUM_STEPS, lr=LR, clip=CLIP, seed=SEED, device=torch.device(device))


def run_pair(model: str, text: str, corpus: torch.Tensor, vocab_size: int, steps: int,
             device: str) -> tuple[Timing, Timing]:
    """(ours, d2l): both loops trained `steps` steps, one step of each in turn."""
    # Built first: it seeds torch itself, and train() then seeds it again for the same initial weights.
    d2l = d2l_loop(model, corpus, vocab_size, device)
    sync = torch.cuda.synchronize if device == "cuda" else lambda: None
    ours_seconds, d2l_seconds, d2l_losses, ours_losses = [], [], [], []
    previous_end = [0.0]

    def one_d2l_step() -> bool:
        sync()
        start = time.perf_counter()
        d2l_losses.append(d2l.step())
        sync()
        end = time.perf_counter()
        ours_seconds.append(start - previous_end[0])
        d2l_seconds.append(end - start)
        previous_end[0] = end
        return False

    def on_event(report) -> None:
        if isinstance(report, StepMetrics):
            ours_losses.append(report.loss)

    previous_end[0] = time.perf_counter()
    train(gradserve_config(model, steps, device), text, on_event, should_stop=one_d2l_step)
    # Entry k is the k+1-th step of each loop; the first LOG_EVERY are warm-up.
    timed = steps - LOG_EVERY
    ours = Timing(timed * TOKENS_PER_STEP / sum(ours_seconds[LOG_EVERY:]), math.exp(ours_losses[-1]))
    theirs = Timing(timed * TOKENS_PER_STEP / sum(d2l_seconds[LOG_EVERY:]),
                    d2l_baseline.perplexity(d2l_losses[-LOG_EVERY:]))
    return ours, theirs


def peak_memory_mib(impl: str, model: str, device: str, steps: int) -> float:
    """Peak memory of a fresh process that trains `steps` steps.

    impl "none" only loads torch and the corpus; "optim" also builds a torch.optim optimizer, whose import is
    a large share of a small run's memory (the d2l scratch loop updates its weights by hand and never imports it).
    """
    out = subprocess.run(
        [sys.executable, __file__, "--threads", str(torch.get_num_threads()), "--measure-memory", impl, model, device,
         str(steps)],
        capture_output=True, text=True, check=True,
    )
    return json.loads(out.stdout.strip().splitlines()[-1])["peak_mib"]


def _measure_memory(impl: str, model: str, device: str, steps: int) -> None:
    """The child side of peak_memory_mib: train, then print the peak as JSON on the last line."""
    text, corpus, vocab_size = load_corpus()
    if impl == "gradserve":
        train(gradserve_config(model, steps, device), text, lambda report: None)
    elif impl == "d2l":
        loop = d2l_loop(model, corpus, vocab_size, device)
        for _ in range(steps):
            loop.step()
    elif impl == "optim":
        torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=LR)
    peak = torch.cuda.max_memory_allocated() / 2**20 if device == "cuda" else peak_rss_mib()
    print(json.dumps({"peak_mib": peak}))


def peak_rss_mib() -> float:
    """This process's resident high-water mark.

    Linux's ru_maxrss survives exec: a child started from this (large)
    benchmark process would report at least the parent's size. VmHWM belongs
    to the child's own address space, so it is read first.
    """
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024  # kB
    except OSError:
        pass
    maxrss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return maxrss / 2**20 if sys.platform == "darwin" else maxrss / 1024  # bytes on macOS, KiB elsewhere


@dataclass
class Result:
    model: str
    device: str
    ours: list[Timing]
    d2l: list[Timing]
    memory: dict[str, float]

    def median(self, impl: str) -> float:
        return statistics.median(t.tokens_per_sec for t in getattr(self, impl))

    @property
    def ratio(self) -> float:
        return self.median("ours") / self.median("d2l")

    def perplexities(self) -> tuple[float, float]:
        # Every repetition trains the same steps from the same seed; the last one stands for all.
        return self.ours[-1].perplexity, self.d2l[-1].perplexity


def bench_model(model: str, device: str, text: str, corpus, vocab_size: int, args) -> Result:
    ours, d2l = [], []
    for rep in range(args.reps):
        o, d = run_pair(model, text, corpus, vocab_size, args.steps, device)
        ours.append(o)
        d2l.append(d)
        print(f"  {model:<11} {device}  rep {rep + 1}/{args.reps}: gradserve {o.tokens_per_sec / 1e3:.1f}k, "
              f"d2l {d.tokens_per_sec / 1e3:.1f}k tokens/s", flush=True)
    memory = {impl: peak_memory_mib(impl, model, device, args.memory_steps) for impl in IMPLS}
    return Result(model, device, ours, d2l, memory)


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def render(results: list[Result], baseline_mib: dict[str, float], env: dict, args) -> str:
    lines = ["# Benchmarks", ""]
    if args.note:
        lines += [f"> {args.note}", ""]
    lines += [
        "gradserve's trainer (`gradserve_worker.trainer.train`) against a plain d2l.ai-style loop",
        "(`bench/d2l_baseline.py`, train_epoch_ch8 as the textbook writes it), on the textbook's",
        "configuration: The Time Machine, character tokens after d2l preprocessing (vocabulary",
        f"{env['vocab_size']}), batch {BATCH_SIZE}, num_steps {NUM_STEPS}, SGD lr {LR:g}, clipping at norm {CLIP:g}.",
        "Our trainer runs with every diagnostic at its default (per-parameter gradient norms every",
        "log_every steps, probes, checkpoints) and validation off (val_fraction=0), so that both",
        "loops train on the same tokens.",
        "",
        "Reproduce: `make bench` (or `.venv/bin/python bench/run.py --help` for the options).",
        "",
        "## Environment",
        "",
        f"- date: {env['date']}",
        f"- CPU: {env['cpu']}, {env['cores']} cores visible; torch threads: {env['threads']}",
        f"- GPU: {env['gpu']}",
        f"- torch {env['torch']}, Python {env['python']}, {env['platform']}",
        f"- load average (1 min) before / after: {env['load_before']:.2f} / {env['load_after']:.2f}",
        f"- {args.steps} steps per run, {args.reps} repetitions (median), the two loops interleaved step by step; "
        f"throughput measured after step {LOG_EVERY}",
        "",
        "## Results",
        "",
        "| model | H | device | gradserve tokens/s | d2l tokens/s | ratio | ppl gradserve | ppl d2l | ppl diff "
        "| peak MiB gradserve | peak MiB d2l |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        ppl_ours, ppl_d2l = r.perplexities()
        diff = ppl_ours / ppl_d2l - 1
        flag = "" if abs(diff) <= PPL_TOLERANCE else f" (over {PPL_TOLERANCE:.0%})"
        lines.append(
            f"| {r.model} | {MODELS[r.model]} | {r.device} | {r.median('ours') / 1e3:.1f}k "
            f"| {r.median('d2l') / 1e3:.1f}k | {r.ratio:.2f} | {ppl_ours:.2f} | {ppl_d2l:.2f} | {diff:+.1%}{flag} "
            f"| {r.memory['gradserve']:.0f} | {r.memory['d2l']:.0f} |"
        )
    lines += ["", "Every repetition (tokens/s, gradserve / d2l):", ""]
    for r in results:
        pairs = ", ".join(f"{o.tokens_per_sec / 1e3:.1f}k / {d.tokens_per_sec / 1e3:.1f}k"
                          for o, d in zip(r.ours, r.d2l, strict=True))
        lines.append(f"- {r.model} on {r.device}: {pairs}")
    memory = (f"Peak memory is per configuration, from a fresh process that trains {args.memory_steps} steps. "
              "On CPU it is the resident high-water mark (VmHWM), which includes Python, torch and the corpus")
    if baseline_mib:
        memory += (f": a process that loads those and trains nothing peaks at {baseline_mib['none']:.0f} MiB, "
                   f"{baseline_mib['optim']:.0f} MiB once it has built one torch.optim optimizer (the import is "
                   "most of that; the d2l scratch loop updates its weights by hand and never imports it)")
    lines += ["", memory + ". On CUDA it is torch.cuda.max_memory_allocated.", ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=DEFAULT_STEPS,
                   help=f"optimizer steps per run (default {DEFAULT_STEPS})")
    p.add_argument("--reps", type=int, default=DEFAULT_REPS, help=f"repetitions per model (default {DEFAULT_REPS})")
    p.add_argument("--models", default=",".join(MODELS), help=f"comma-separated, from {', '.join(MODELS)}")
    p.add_argument("--device", choices=("cpu", "cuda"), action="append",
                   help="repeat for several; default: cpu, and cuda when torch sees a GPU")
    p.add_argument("--memory-steps", type=int, default=DEFAULT_MEMORY_STEPS,
                   help=f"steps of the peak-memory runs (default {DEFAULT_MEMORY_STEPS})")
    p.add_argument("--out", type=Path, default=REPO / "BENCHMARKS.md", help="where to write the Markdown results")
    p.add_argument("--threads", type=int, default=torch.get_num_threads(),
                   help=f"torch threads (default {torch.get_num_threads()}: torch's own choice); on a loaded machine "
                   "1 avoids threads spinning against other processes")
    p.add_argument("--note", default="", help="a line to put at the top of the results, e.g. about machine load")
    p.add_argument("--measure-memory", nargs=4, metavar=("IMPL", "MODEL", "DEVICE", "STEPS"), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.threads < 1:
        p.error("--threads must be at least 1")
    torch.set_num_threads(args.threads)
    if args.measure_memory:
        impl, model, device, steps = args.measure_memory
        _measure_memory(impl, model, device, int(steps))
        return
    models = [m.strip() for m in args.models.split(",") if m.strip()]
    unknown = sorted(set(models) - set(MODELS))
    if unknown or not models:
        p.error(f"--models must name some of {', '.join(MODELS)}; got {args.models!r}")
    if args.steps <= LOG_EVERY:
        p.error(f"--steps must be above {LOG_EVERY}: throughput is measured after step {LOG_EVERY}")
    if args.reps < 1 or args.memory_steps < 1:
        p.error("--reps and --memory-steps must be at least 1")
    devices = args.device or (["cpu", "cuda"] if torch.cuda.is_available() else ["cpu"])
    if "cuda" in devices and not torch.cuda.is_available():
        p.error("--device cuda: torch sees no CUDA GPU here")

    text, corpus, vocab_size = load_corpus()
    env = {
        "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "cpu": cpu_name(),
        "cores": os.cpu_count(),
        "threads": torch.get_num_threads(),
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none (torch sees no CUDA device)",
        "torch": torch.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "load_before": os.getloadavg()[0],
        "vocab_size": vocab_size,
    }
    print(f"bench: {', '.join(models)} on {', '.join(devices)}; {args.steps} steps x {args.reps} reps", flush=True)
    baseline = {}
    if "cpu" in devices:
        baseline = {impl: peak_memory_mib(impl, models[0], "cpu", 0) for impl in ("none", "optim")}
    results = [bench_model(m, d, text, corpus, vocab_size, args) for d in devices for m in models]
    env["load_after"] = os.getloadavg()[0]
    report = render(results, baseline, env, args)
    args.out.write_text(report, encoding="utf-8")
    print(report)


if __name__ == "__main__":
    main()
