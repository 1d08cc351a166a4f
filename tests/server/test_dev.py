"""`gradserve-server dev` brings a whole stack up, and takes every process down with it."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

BIN = Path(sys.executable).parent


def _pids(output: str) -> list[int]:
    redis_pid = re.search(r"^redis .*pid (\d+)\)", output, re.M)
    workers = re.search(r"^workers .*ready \(pids ([\d, ]+)\)", output, re.M)
    assert redis_pid and workers, output
    return [int(redis_pid.group(1))] + [int(p) for p in workers.group(1).split(", ")]


def _gone(pid: int) -> bool:
    # Workers lead a process group of their own that holds their Celery children too.
    for probe in (lambda: os.kill(pid, 0), lambda: os.killpg(pid, 0)):
        try:
            probe()
            return False
        except ProcessLookupError:
            pass
        except PermissionError:
            return False
    return True


def test_dev_runs_a_command_against_the_stack_then_leaves_nothing_behind():
    script = (
        "import gradserve; c = gradserve.Client(); "
        "j = c.submit(dataset='builtin:pydocs', model='rnn', hidden_size=16, max_steps=5, log_every=5); "
        "print('final', j.wait(timeout=120).state == 'SUCCEEDED', len(c.workers()))"
    )
    done = subprocess.run(
        [str(BIN / "gradserve-server"), "dev", "--workers", "2", "--listen", "127.0.0.1:0",
         "--run", f"{sys.executable} -c \"{script}\""],
        capture_output=True, text=True, timeout=240,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert "final True 3" in done.stdout, "2 training workers and 1 generate worker"
    pids = _pids(done.stdout)
    assert len(pids) == 4
    assert all(_gone(p) for p in pids), f"left running: {[p for p in pids if not _gone(p)]}"


def test_dev_exits_with_the_commands_status():
    done = subprocess.run(
        [str(BIN / "gradserve-server"), "dev", "--listen", "127.0.0.1:0", "--run", "exit 7"],
        capture_output=True, text=True, timeout=240,
    )
    assert done.returncode == 7, done.stdout + done.stderr
    # Without --data-dir, the start line says what becomes of the jobs.
    assert "data in memory: the jobs go with the stack; --data-dir DIR keeps them" in done.stdout


def test_sigterm_stops_the_stack_and_every_process_it_started():
    proc = subprocess.Popen(
        [str(BIN / "gradserve-server"), "dev", "--listen", "127.0.0.1:0"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )
    output = ""
    deadline = time.monotonic() + 120
    for line in proc.stdout:
        output += line
        if line.startswith("Ready.") or time.monotonic() > deadline:
            break
    assert "Ready." in output, output
    # The dashboard is on by default, on a free port like the server, and its start line says where.
    web = re.search(r"^web +(http://127\.0\.0\.1:\d+/) ", output, re.M)
    assert web, output
    with urllib.request.urlopen(web[1] + "healthz", timeout=10) as reply:
        assert json.load(reply) == {"redis": "ok"}
    pids = _pids(output)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=60) == 0
    assert all(_gone(p) for p in pids), f"left running: {[p for p in pids if not _gone(p)]}"


def test_a_dev_stack_on_a_data_dir_keeps_its_jobs_when_started_again(tmp_path):
    data = tmp_path / "data"
    script = (
        "import gradserve; c = gradserve.Client(); "
        "j = c.submit(dataset='builtin:pydocs', model='rnn', hidden_size=16, max_steps=5, log_every=5); "
        "print('job', j.wait(timeout=120).id)"
    )
    dev = [str(BIN / "gradserve-server"), "dev", "--listen", "127.0.0.1:0", "--data-dir", str(data)]
    first = subprocess.run([*dev, "--run", f"{sys.executable} -c \"{script}\""], capture_output=True, text=True,
                           timeout=240)
    assert first.returncode == 0, first.stdout + first.stderr
    assert f"data kept in {data.resolve()}, append-only" in first.stdout
    assert f"stay in {data.resolve()}" in first.stdout
    job_id = re.search(r"^job (job-\w+)$", first.stdout, re.M).group(1)

    again = subprocess.run([*dev, "--run", f"{BIN / 'gradserve'} status {job_id}"], capture_output=True, text=True,
                           timeout=240)
    assert again.returncode == 0, again.stdout + again.stderr
    assert re.search(r"^state +SUCCEEDED$", again.stdout, re.M), again.stdout

