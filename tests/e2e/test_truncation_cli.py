"""The window advice and truncation=auto, and the pytorch/examples recipe's settings, through the real stack."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import torch

GRADSERVE = str(Path(sys.executable).parent / "gradserve")


def run(stack, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "GRADSERVE_SERVER": stack.address}
    return subprocess.run([GRADSERVE, *args], capture_output=True, text=True, timeout=120, env=env)


def test_auto_truncation_grows_the_window_and_the_cli_shows_the_probes_advice(stack):
    done = run(
        stack, "submit", "--dataset", "builtin:copy", "--seq-len", "20", "--model", "gru", "--hidden-size", "16",
        "--batch-size", "8", "--num-steps", "5", "--truncation", "auto", "--max-num-steps", "30", "--init", "chrono",
        "--max-dependency", "40", "--max-steps", "6", "--probe-every", "2", "--checkpoint-every", "3",
        "--log-every", "3", "--follow",
    )
    assert done.returncode == 0, done.stdout + done.stderr
    lines = done.stdout.splitlines()
    changes = [line for line in lines if line.startswith("window ")]
    assert changes and changes[0].startswith("window  step 3  num_steps 5 -> 10 steps (the probes since the last "
                                             "checkpoint suggest "), done.stdout
    first_probe = next(line for line in lines if line.startswith("probe "))
    assert re.search(r"gradient half-life [\d.]+ steps, suggested window \d+ steps; the gradient at the window's "
                     r"start is still \d+% of its end: a longer num_steps may learn longer dependencies$",
                     first_probe), first_probe


def test_a_word_job_with_the_recipe_settings_checkpoints_eos_tied_weights_and_plateau(stack, tmp_path):
    corpus = tmp_path / "lines.txt"
    corpus.write_text("the time traveller smiled\nat us and said\n" * 150)
    done = run(
        stack, "submit", "--dataset", str(corpus), "--tokenization", "word", "--eos", "--model", "lstm",
        "--hidden-size", "16", "--embedding-size", "16", "--tie-weights", "--init", "uniform",
        "--embedding-dropout", "0.2", "--dropout", "0.2", "--schedule", "plateau", "--lr-gamma", "0.25",
        "--eval-every", "5", "--batch-size", "4", "--num-steps", "8", "--max-steps", "10", "--log-every", "5",
        "--follow",
    )
    assert done.returncode == 0, done.stdout + done.stderr
    job_id = done.stdout.splitlines()[0].strip()
    assert "eos=True" in done.stdout and "tie_weights=True" in done.stdout and "init=uniform" in done.stdout
    out = tmp_path / "m.pt"
    assert run(stack, "download", job_id, "-o", str(out)).returncode == 0
    checkpoint = torch.load(out, weights_only=False)
    assert "<eos>" in checkpoint["vocab"]
    weights = checkpoint["model"]
    assert weights["linear.weight"].data_ptr() == weights["embedding.weight"].data_ptr()  # one tensor, tied
    assert checkpoint["plateau"]["best"] < float("inf")
