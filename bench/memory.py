"""The memory estimate that submission checks against a worker's budget, against measured peaks.

    make bench                         # runs this after bench/run.py
    .venv/bin/python bench/memory.py --out BENCHMARKS.md

gradserve.spec.memory_estimate_bytes is what the server compares with the
smallest memory budget among the live workers of a job's queue, so it must
not fall below what training really takes. For each configuration below, a
fresh process warms torch up on a tiny run of the same model (lazy kernel and
allocator set-up is the same for every job, so the budget's headroom pays for
it, not the estimate), resets its resident high-water mark, trains three steps
with the trainer and reports how far the high-water mark rose. That rise is
what the job added: weights, gradients, optimizer state, a checkpoint, and the
activations of one backward window, as the allocator really holds them.

The grid keeps batch × window × hidden units about equal, so the rows compare
the models at the same activation size, and adds a word-level row per model,
where the vocabulary (7,636 words) dominates. The results replace the section
"Memory estimate against measured peaks" at the end of --out.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import torch

from gradserve import spec as specs
from gradserve_worker.data import build_corpus
from gradserve_worker.trainer import TrainConfig, train
from run import REPO, load_corpus

HEADING = "## Memory estimate against measured peaks"
STEPS = 3

# (model, hidden_size, num_layers, batch_size, num_steps, tokenization)
GRID = [
    (model, *shape)
    for model in ("rnn_scratch", "rnn", "gru", "lstm")
    for shape in ((256, 1, 64, 400, "char"), (512, 1, 64, 200, "char"), (512, 2, 32, 200, "char"),
                  (1024, 1, 32, 200, "char"), (128, 1, 32, 200, "word"))
    if not (model == "rnn_scratch" and shape[1] > 1)
]


def config_for(model: str, hidden: int, layers: int, batch: int, window: int, tokenization: str) -> TrainConfig:
    return TrainConfig(dataset="bench", tokenization=tokenization, model=model, hidden_size=hidden, num_layers=layers,
                       batch_size=batch, num_steps=window, max_steps=STEPS, log_every=1, val_fraction=0.0)


def estimate_mib(config: TrainConfig, text: str) -> float:
    """What the server would estimate for this job: its vocabulary and backward window as the server derives them."""
    vocab, corpus = build_corpus(text, config.tokenization, config.preprocess)
    window = specs.backprop_window(config, len(corpus) // config.batch_size)
    return specs.memory_estimate_bytes(config, len(vocab), window) / 2**20


def _status_mib(field: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024  # kB
    raise RuntimeError(f"/proc/self/status has no {field}")


def _measure(row: list) -> None:
    """The child side: warm up, reset the high-water mark, train, print the rise as JSON."""
    model, _, _, _, _, tokenization = row
    text, _, _ = load_corpus()
    train(config_for(model, 8, 1, 2, 3, tokenization), text, lambda report: None)
    before = _status_mib("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")  # 5: reset the peak resident set size to the current one
    train(config_for(*row), text, lambda report: None)
    print(json.dumps({"rise_mib": _status_mib("VmHWM") - before}))


def measure(row: tuple, threads: int) -> float:
    out = subprocess.run([sys.executable, __file__, "--threads", str(threads), "--measure", json.dumps(row)],
                         capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])["rise_mib"]


def render(rows: list[tuple[tuple, float, float]]) -> str:
    lines = [
        HEADING,
        "",
        "`bench/memory.py`: the estimate submission checks against a worker's memory budget",
        "(`gradserve.spec.memory_estimate_bytes`), against the rise of a fresh CPU process's",
        f"resident high-water mark over {STEPS} training steps, after a warm-up run; SGD, The Time",
        "Machine. The estimate has to stay above the measurement: a job it underestimates can",
        "take a worker past its budget.",
        "",
        "| model | H | layers | batch | window | tokens | estimate MiB | measured MiB | estimate / measured |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for (model, hidden, layers, batch, window, tokenization), est, measured in rows:
        lines.append(f"| {model} | {hidden} | {layers} | {batch} | {window} | {tokenization} | {est:.0f} "
                     f"| {measured:.0f} | {est / measured:.2f} |")
    low = min(est / measured for _, est, measured in rows)
    lines += ["", f"Lowest estimate / measured: {low:.2f}.", ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, default=REPO / "BENCHMARKS.md", help="the Markdown file whose section to replace")
    p.add_argument("--threads", type=int, default=torch.get_num_threads(), help="torch threads per measuring process")
    p.add_argument("--measure", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.measure:
        _measure(json.loads(args.measure))
        return
    if not Path("/proc/self/clear_refs").exists():
        sys.exit("bench/memory.py needs Linux's /proc/self/clear_refs to reset the resident high-water mark")
    text, _, _ = load_corpus()
    rows = []
    for row in GRID:
        est, measured = estimate_mib(config_for(*row), text), measure(row, args.threads)
        print(f"  {' '.join(map(str, row))}: estimate {est:.0f} MiB, measured {measured:.0f} MiB", flush=True)
        rows.append((row, est, measured))
    section = render(rows)
    existing = args.out.read_text(encoding="utf-8") if args.out.exists() else ""
    kept = existing.split(HEADING)[0].rstrip("\n")
    args.out.write_text((kept + "\n\n" if kept else "") + section, encoding="utf-8")
    print(section)


if __name__ == "__main__":
    main()
