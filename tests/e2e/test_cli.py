"""The `gradserve` command as a user runs it: a real process against the real stack."""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import torch

GRADSERVE = str(Path(sys.executable).parent / "gradserve")


def run(stack, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    env = {**os.environ, "GRADSERVE_SERVER": stack.address}
    return subprocess.run([GRADSERVE, *args], capture_output=True, text=True, timeout=timeout, env=env)


def test_submit_follow_then_status_list_and_download(stack, tmp_path):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text(("the time traveller smiled at us " * 200).strip())
    done = run(
        stack, "submit", "--dataset", str(corpus), "--model", "gru", "--hidden-size", "16", "--batch-size", "8",
        "--num-steps", "10", "--max-steps", "30", "--log-every", "10", "--follow",
    )
    assert done.returncode == 0, done.stdout + done.stderr
    job_id = done.stdout.splitlines()[0].strip()
    assert job_id.startswith("job-")
    lines = done.stdout.splitlines()
    step_lines = [line for line in lines if line.startswith("step ")]
    assert [line.split()[1] for line in step_lines] == ["10/30", "20/30", "30/30"]
    assert all("nats" in line and "ppl" in line and "grad_norm" in line and "tokens/s" in line for line in step_lines)
    assert any("SUCCEEDED" in line for line in lines[-3:])

    status = run(stack, "status", job_id, "--json")
    record = json.loads(status.stdout)
    assert record["state"] == "SUCCEEDED" and int(record["last_step"]) == 30
    assert int(record["summary"]["step"]) == 30 and int(record["summary"]["tokens"]) == 30 * 8 * 10

    plain = run(stack, "status", job_id).stdout
    assert re.search(r"^train +ppl \d+\.\d\d, loss \d\.\d{4} nats/token at step 30$", plain, re.M), plain
    assert re.search(r"^best val +ppl \d+\.\d\d, loss \d\.\d{4} at step 30$", plain, re.M), plain
    assert re.search(r"^trained +2,400 tokens in \d+s of steps \([\d,]+ tokens/s\); clipped at \d+ of 30 steps "
                     r"\(\d+%\)$", plain, re.M), plain

    listed = run(stack, "list", "--state", "succeeded", "--json")
    assert job_id in [j["id"] for j in json.loads(listed.stdout)]
    # As an 80-column terminal shows it: the columns that do not fit are dropped from the right.
    env = {**os.environ, "GRADSERVE_SERVER": stack.address, "COLUMNS": "80"}
    # Only this test's job (the dataset is its own): other tests' named jobs would add a name column.
    table = subprocess.run([GRADSERVE, "list", "--state", "succeeded", "--dataset", record["spec"]["dataset"]],
                           capture_output=True, text=True, timeout=60, env=env).stdout.splitlines()
    assert table[0].split()[:6] == ["id", "state", "model", "step/max", "created", "train"]
    assert all(len(line) <= 80 for line in table)
    row = next(line for line in table if line.startswith(job_id))
    assert re.search(r"SUCCEEDED +gru +30/30 +\d+s ago +ppl \d+\.\d\d", row), row
    # Piped, with room for every column, the best evaluation too.
    wide = run(stack, "list", "--state", "succeeded").stdout.splitlines()
    assert "best val" in wide[0]
    row = next(line for line in wide if line.startswith(job_id))
    assert re.search(r"ago +ppl \d+\.\d\d +ppl \d+\.\d\d +ds-", row), row

    out = tmp_path / "m.pt"
    download = run(stack, "download", job_id, "-o", str(out))
    assert download.returncode == 0 and "step 30" in download.stdout
    assert torch.load(out, weights_only=False)["step"] == 30

    deleted = run(stack, "delete", job_id, "job-00000000000000000000")
    assert deleted.returncode == 1, "one of the two was not there"
    assert deleted.stdout == (f"deleted {job_id} (SUCCEEDED at step 30): its record, events, checkpoints and log "
                              "are gone\n")
    assert "job-00000000000000000000 not found" in deleted.stderr
    gone = run(stack, "status", job_id)
    hint = re.search(rf"{job_id} not found \(`([^`]+)` lists yours\)", gone.stderr)
    assert gone.returncode == 1 and hint, gone.stderr
    # The hint runs as printed, and the deleted job is no longer listed.
    listed = subprocess.run(shlex.split(hint[1]), capture_output=True, text=True, timeout=120,
                            env={**os.environ, "GRADSERVE_SERVER": stack.address})
    assert listed.returncode == 0 and job_id not in listed.stdout, listed


def test_a_refused_spec_names_the_field_and_exits_1(stack):
    done = run(stack, "submit", "--dataset", "builtin:pydocs", "--model", "rnn_scratch", "--num-layers", "2")
    assert done.returncode == 1
    assert "spec.num_layers" in done.stderr and "must be 1 for model rnn_scratch" in done.stderr
    assert "Traceback" not in done.stderr


def test_an_unreachable_server_says_how_to_start_one(stack):
    env = {**os.environ, "GRADSERVE_SERVER": "127.0.0.1:9"}
    done = subprocess.run([GRADSERVE, "list"], capture_output=True, text=True, timeout=60, env=env)
    assert done.returncode == 1
    assert "gradserve-server dev" in done.stderr


def test_workers_shows_the_running_worker(stack):
    done = run(stack, "workers")
    assert done.returncode == 0 and "w1@test" in done.stdout and "cpu" in done.stdout
