"""The memory estimate that submission checks against a worker's budget, against measured peaks.

    make bench                         # runs this after bench/run.py
    .venv/bin/python bench/memory.py --out BENCHMARKS.md

gradserve.spec.memory_estimate_bytes is what the server compares with the
smallest memory budget among the live workers of a job's queue, so it must
not fall below what a job really takes where it runs: in a Celery prefork
child (one task per child) of a worker whose parent has imported torch and the
worker's modules and built one optimizer (gradserve_worker.main.warm_up_torch).
So that is where this measures. A parent process does what the worker's parent
does before its pool forks (it imports gradserve_worker.main and runs
warm_up_torch; it never imports the trainer), then forks one child per
configuration, as the pool does per job. Each child imports the runner and sets
torch's threads as the train task does, trains STEPS steps with the trainer (a
gradient probe and a checkpoint at the last one, as a job has every
probe_every and checkpoint_every steps) and reports its resident high-water
mark, VmHWM, not reset: all the child held at its peak, the pages it shares
with its parent and torch's per-process runtime, thread pools and allocator
included, because that is what an operator's budget has to hold.

The first row trains a tiny model, so its peak is the process's own fixed
cost, which the estimate counts as gradserve.spec.PROCESS_BYTES. The peak
keeps creeping up over a long job (the allocator's heap fragments; see
BENCHMARKS.md), which the estimate's margin over these short runs pays for.

The grid keeps batch × window × hidden units about equal, so the rows compare
the models at the same activation size, and adds a word-level row per model,
where the vocabulary (7,636 words) dominates. The results replace the section
"Memory estimate against measured peaks" at the end of --out.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

# Nothing else at module level: the measuring parent must import what a worker's
# parent imports and no more (no trainer, no torch code of its own), or its
# children would inherit more than a worker's do.

HEADING = "## Memory estimate against measured peaks"
STEPS = 10
# A model too small to matter: its peak is the training process's own.
TINY = ("rnn", 8, 1, 2, 3, "char")

# (model, hidden_size, num_layers, batch_size, num_steps, tokenization)
GRID = [
    (model, *shape)
    for model in ("rnn_scratch", "rnn", "gru", "lstm")
    for shape in ((256, 1, 64, 400, "char"), (512, 1, 64, 200, "char"), (512, 2, 32, 200, "char"),
                  (1024, 1, 32, 200, "char"), (128, 1, 32, 200, "word"))
    if not (model == "rnn_scratch" and shape[1] > 1)
]


def config_for(model: str, hidden: int, layers: int, batch: int, window: int, tokenization: str, steps: int = STEPS):
    from gradserve_worker.trainer import TrainConfig

    return TrainConfig(dataset="bench", tokenization=tokenization, model=model, hidden_size=hidden, num_layers=layers,
                       batch_size=batch, num_steps=window, max_steps=steps, log_every=1, val_fraction=0.0,
                       checkpoint_every=steps, probe_every=steps)


def estimate_mib(config, text: str) -> float:
    """What the server would estimate for this job: its vocabulary and backward window as the server derives them."""
    from gradserve import spec as specs
    from gradserve_worker.data import build_corpus

    vocab, corpus = build_corpus(text, config.tokenization, config.preprocess)
    window = specs.backprop_window(config, len(corpus) // config.batch_size)
    return specs.memory_estimate_bytes(config, len(vocab), window) / 2**20


def _status_mib(field: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024  # kB
    raise RuntimeError(f"/proc/self/status has no {field}")


def _child(row: list, corpus: Path, threads: int, steps: int, out: int) -> None:
    """A forked child, as a prefork pool's for one job: train `row`, write its whole peak to `out` as JSON."""
    import torch

    from gradserve_worker.runner import run_job  # noqa: F401  (what the train task imports before it trains)

    torch.set_num_threads(threads)  # as the train task does, in the child
    from gradserve_worker.trainer import train

    text = corpus.read_text(encoding="utf-8")  # a job's child reads its text (from Redis) too
    train(config_for(*row, steps=steps), text, lambda event: None)
    os.write(out, json.dumps({"peak_mib": _status_mib("VmHWM")}).encode())


def _parent(rows: list, corpus: Path, threads: int, steps: int) -> None:
    """A worker's parent: warm torch up as it does, then fork a child per row; print each child's peak as JSON."""
    from gradserve_worker.main import warm_up_torch

    warm_up_torch()
    for row in rows:
        read, write = os.pipe()
        pid = os.fork()
        if pid == 0:  # the child: never returns into the parent's loop
            code = 1
            try:
                os.close(read)
                _child(row, corpus, threads, steps, write)
                code = 0
            except BaseException:
                import traceback

                traceback.print_exc()
            finally:
                os._exit(code)
        os.close(write)
        with os.fdopen(read, "rb") as f:
            reply = f.read()
        _, status = os.waitpid(pid, 0)
        if os.waitstatus_to_exitcode(status) != 0 or not reply:
            sys.exit(f"bench/memory.py: the child measuring {row} failed (exit status {status})")
        print(json.dumps({"row": row, **json.loads(reply)}), flush=True)


def measure(rows: list[tuple], corpus: Path, threads: int, steps: int):
    """Each row's peak resident MiB, as a fresh worker-like parent's forked children measure them, as they come."""
    cmd = [sys.executable, __file__, "--threads", str(threads), "--steps", str(steps), "--parent", str(corpus),
           json.dumps(rows)]
    with subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True) as proc:
        for line in proc.stdout:
            yield json.loads(line)["peak_mib"]
    if proc.returncode:
        sys.exit(f"bench/memory.py: the measuring parent failed (exit status {proc.returncode})")


def render(rows: list[tuple[tuple, float, float]], steps: int, threads: int) -> str:
    (_, tiny_est, tiny_peak), *_ = rows
    lines = [
        HEADING,
        "",
        "`bench/memory.py`: the estimate submission checks against a worker's memory budget",
        "(`gradserve.spec.memory_estimate_bytes`), against the peak resident memory (VmHWM) of",
        "the process that trains the job, measured where a worker trains it: in a child forked,",
        "as Celery's prefork pool forks one per job, from a parent that imported the worker and",
        "warmed torch up as a worker's parent does. The peak is the child's whole resident set,",
        "the pages it shares with its parent included, because that is what a budget has to",
        f"hold. {steps} training steps, a gradient probe and a checkpoint at the last; SGD, The",
        f"Time Machine, {threads} torch threads. The first row's model is tiny: its peak,",
        f"{tiny_peak:.0f} MiB, is the training process's own cost, which the estimate counts as a",
        "constant. The estimate has to stay above the measurement: a job it underestimates can",
        "take a worker past its budget. Over a long job the peak creeps further up (the",
        "allocator's heap fragments), which the margin has to pay for too.",
        "",
        "| model | H | layers | batch | window | tokens | estimate MiB | peak MiB | estimate / peak |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for (model, hidden, layers, batch, window, tokenization), est, measured in rows:
        lines.append(f"| {model} | {hidden} | {layers} | {batch} | {window} | {tokenization} | {est:.0f} "
                     f"| {measured:.0f} | {est / measured:.2f} |")
    low = min(est / measured for _, est, measured in rows)
    lines += ["", f"Lowest estimate / peak: {low:.2f}.", ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, default=Path(__file__).resolve().parents[1] / "BENCHMARKS.md",
                   help="the Markdown file whose section to replace")
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1,
                   help="torch threads per job, as a worker's --threads (default: all cores, as a worker's)")
    p.add_argument("--steps", type=int, default=STEPS, help=f"training steps per configuration (default {STEPS})")
    p.add_argument("--parent", nargs=2, help=argparse.SUPPRESS)  # CORPUS ROWS_JSON: be the worker-like parent
    args = p.parse_args(argv)
    if args.steps < 1 or args.threads < 1:
        p.error("--steps and --threads must be at least 1")
    if args.parent:
        corpus, rows = args.parent
        _parent([tuple(row) for row in json.loads(rows)], Path(corpus), args.threads, args.steps)
        return
    if not Path("/proc/self/status").exists():
        sys.exit("bench/memory.py reads the resident high-water mark from Linux's /proc/self/status")
    from run import CORPUS, load_corpus

    text, _, _ = load_corpus()
    grid = [TINY, *GRID]
    rows = []
    for row, measured in zip(grid, measure(grid, CORPUS, args.threads, args.steps), strict=True):
        est = estimate_mib(config_for(*row, steps=args.steps), text)
        print(f"  {' '.join(map(str, row))}: estimate {est:.0f} MiB, peak {measured:.0f} MiB", flush=True)
        rows.append((row, est, measured))
    section = render(rows, args.steps, args.threads)
    from sections import write_section

    write_section(args.out, HEADING, section)
    print(section)


if __name__ == "__main__":
    main()
