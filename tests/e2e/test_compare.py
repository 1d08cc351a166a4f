"""`gradserve compare` through the real stack: the hint `gradserve sweeps` prints works as printed."""

from __future__ import annotations

import shlex

import pytest

pytest.importorskip("matplotlib", reason="the plot extra is not installed: pip install './client[plot]'")

from gradserve import cli  # noqa: E402

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
BASE = dict(dataset="builtin:copy", model="rnn", hidden_size=8, batch_size=4, seq_len=4, max_steps=20,
            log_every=5, eval_every=10, checkpoint_every=20, probe_every=10)


def test_the_compare_hint_of_a_finished_sweep_draws_every_member(stack, tmp_path, monkeypatch, capsys):
    with stack.client() as c:
        sweep = c.submit_sweep(base=BASE, grid={"num_steps": [3, 24]}).wait(timeout=240)
    assert sweep.info.succeeded == 2, stack.logs()
    monkeypatch.chdir(tmp_path)

    assert cli.main(["--server", stack.address, "sweeps", sweep.id]) == cli.EXIT_OK
    hint = next(line for line in capsys.readouterr().out.splitlines() if line.startswith("compare: "))
    words = shlex.split(hint.removeprefix("compare: "))
    assert words[1:] == ["compare", "--sweep", sweep.id, "-o", "compare.png"]

    assert cli.main(["--server", stack.address, *words[1:]]) == cli.EXIT_OK
    assert (tmp_path / "compare.png").read_bytes()[:8] == PNG_MAGIC
    printed = capsys.readouterr().out
    # 4 metrics (every 5 of 20 steps), 2 evaluations and 2 probes (every 10) for each of the two members.
    assert "wrote compare.png: 2 jobs, 8 metrics, 4 evaluations, 4 probes" in printed
    for job in sweep.jobs:
        assert f"{job.id}  num_steps={job.spec.num_steps}: SUCCEEDED at step 20" in printed


def test_an_unknown_job_is_named(stack, tmp_path, capsys):
    code = cli.main(["--server", stack.address, "compare", "job-00000000000000000000", "-o",
                     str(tmp_path / "compare.png")])
    assert code == cli.EXIT_FAILED
    assert "job-00000000000000000000 not found" in capsys.readouterr().err
    assert not (tmp_path / "compare.png").exists()
