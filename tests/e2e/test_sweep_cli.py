"""`gradserve sweep`, `sweeps`, `cancel SWEEP` and `delete SWEEP` as a user runs them: real processes against the
real stack."""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

GRADSERVE = str(Path(sys.executable).parent / "gradserve")
TINY = ["--dataset", "builtin:adding", "--model", "rnn", "--hidden-size", "8", "--batch-size", "4", "--seq-len", "8",
        "--log-every", "10", "--eval-every", "10"]


def run(stack, *args: str, timeout: float = 240) -> subprocess.CompletedProcess:
    env = {**os.environ, "GRADSERVE_SERVER": stack.address}
    return subprocess.run([GRADSERVE, *args], capture_output=True, text=True, timeout=timeout, env=env)


def test_sweep_follow_prints_each_member_then_the_table_sorted_by_val_loss(stack):
    done = run(stack, "sweep", *TINY, "--max-steps", "30", "--grid", "lr=0.05,1", "--grid", "seed=1,2",
               "--name", "cli grid", "--follow")
    assert done.returncode == 0, done.stdout + done.stderr
    out = done.stdout.splitlines()
    sweep_id = out[0]
    assert sweep_id.startswith("sweep-") and out[1].strip() == "4 members, QUEUED"
    ids = [line.split()[0] for line in out[2:6]]
    assert [line.split()[1:] for line in out[2:6]] == [["lr=0.05", "seed=1"], ["lr=0.05", "seed=2"],
                                                      ["lr=1", "seed=1"], ["lr=1", "seed=2"]]
    ended = [line for line in out if re.fullmatch(r"job-\w+ \(lr=\S+ seed=\d\) SUCCEEDED at step 30/30", line)]
    assert len(ended) == 4, out
    header = next(i for i, line in enumerate(out) if line.startswith("member "))
    assert out[header].split()[:5] == ["member", "state", "step", "train", "loss"]
    rows = out[header + 1:header + 5]
    val = [float(line.split()[6]) for line in rows]
    assert val == sorted(val) and {line.split()[-1] for line in rows} == set(ids)
    best = next(line for line in out if line.startswith("best: "))
    assert best.startswith(f"best: {rows[0].split()[-1]} ") and "best val loss" in best
    assert out[-1].startswith("compare: ") and out[-1].endswith(f"gradserve compare --sweep {sweep_id} -o compare.png")

    shown = run(stack, "sweeps", sweep_id).stdout.splitlines()
    assert shown[0].startswith("member ") and len([line for line in shown if "SUCCEEDED" in line]) == 4
    listed = run(stack, "sweeps", "--json")
    mine = next(s for s in json.loads(listed.stdout) if s["id"] == sweep_id)
    assert mine["name"] == "cli grid" and mine["succeeded"] == 4
    members = run(stack, "list", "--sweep", sweep_id, "--json")
    assert sorted(j["id"] for j in json.loads(members.stdout)) == sorted(ids)


def test_a_bad_axis_is_refused_before_anything_is_sent(stack):
    done = run(stack, "sweep", *TINY, "--grid", "lr=0.5,0")
    assert done.returncode == 2
    assert "argument --grid: lr value '0': must be in (0, 100], got 0" in done.stderr
    done = run(stack, "sweep", *TINY, "--grid", "num_steps")
    assert done.returncode == 2 and "must be FIELD=VALUE,VALUE,..." in done.stderr


def test_the_server_names_a_member_whose_combination_is_invalid(stack):
    done = run(stack, "sweep", *TINY, "--truncation", "tbptt", "--tbptt-k2", "20", "--grid", "tbptt_k1=10,30")
    assert done.returncode == 1
    assert "spec.base.tbptt_k2 (--tbptt-k2): with tbptt_k1=30: must be at least tbptt_k1 (30), got 20" in done.stderr


def test_cancel_and_delete_take_a_sweep(stack):
    submitted = run(stack, "sweep", *TINY, "--max-steps", "100000", "--grid", "lr=0.1,0.2")
    sweep_id = submitted.stdout.splitlines()[0]
    assert submitted.stdout.splitlines()[-1].endswith(f"sweeps {sweep_id} --follow")
    refused = run(stack, "delete", sweep_id)
    hint = re.search(r"cancel it first \(`([^`]+)`\)", refused.stderr)
    assert refused.returncode == 1 and hint and "2 member(s) QUEUED or RUNNING" in refused.stderr, refused.stderr
    # The hint, run as printed.
    cancelled = subprocess.run(shlex.split(hint[1]), capture_output=True, text=True, timeout=120,
                               env={**os.environ, "GRADSERVE_SERVER": stack.address})
    assert cancelled.returncode == 0, cancelled.stderr
    assert re.fullmatch(rf"{sweep_id}: (2 members cancelled|1 member cancelled, 1 stops at the next step|"
                        rf"0 members cancelled, 2 stop at the next step)\n", cancelled.stdout)
    followed = run(stack, "sweeps", sweep_id, "--follow")
    assert followed.returncode == 3, followed.stdout + followed.stderr
    assert "0 succeeded, 0 failed, 2 cancelled" in followed.stdout
    deleted = run(stack, "delete", sweep_id)
    assert deleted.returncode == 0, deleted.stderr
    members = re.fullmatch(rf"deleted {sweep_id} and its 2 member\(s\), (job-\w+), (job-\w+): their records, events, "
                           r"checkpoints and logs are gone\n", deleted.stdout)
    assert members, deleted.stdout
    for job_id in members.groups():
        assert run(stack, "status", job_id).returncode == 1
    gone = run(stack, "sweeps", sweep_id)
    assert gone.returncode == 1 and f"sweep {sweep_id} not found" in gone.stderr
