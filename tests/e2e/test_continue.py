"""Continue and fork through the real stack: the best checkpoint beside the latest, and jobs started from others."""

from __future__ import annotations

import io

import pytest
import torch

import gradserve
from gradserve import cli

SMALL = dict(model="gru", hidden_size=16, batch_size=8, num_steps=10, preprocess="d2l", log_every=10,
             eval_every=10, val_fraction=0.05, lr=2.0)


@pytest.fixture(scope="module")
def source(stack, timemachine) -> gradserve.Job:
    with stack.client() as c:
        job = c.submit(dataset=c.upload_bytes(timemachine), max_steps=40, **SMALL).wait(timeout=120)
        assert job.state == "SUCCEEDED", stack.logs()
        yield job


def test_the_best_checkpoint_is_kept_beside_the_latest(stack, source, tmp_path):
    losses = {e.evaluation.step: e.evaluation.loss for e in source.events() if e.WhichOneof("kind") == "evaluation"}
    best_step = min(losses, key=losses.get)
    assert source.best_checkpoint_step == best_step and source.checkpoint_step == 40
    saved = [(e.checkpoint.step, e.checkpoint.best, e.checkpoint.also_latest)
             for e in source.events() if e.WhichOneof("kind") == "checkpoint"]
    # The last step's checkpoint is announced once, as both, when its evaluation was the best.
    last_is_best = best_step == 40
    assert (best_step, True, last_is_best) in saved and (40, last_is_best, last_is_best) in saved
    with stack.client() as c:
        job = c.get_job(source.id)
        assert job.download_checkpoint(tmp_path / "best.pt", "best") == best_step
        assert job.download_checkpoint(tmp_path / "latest.pt", "latest") == 40
        assert job.download_checkpoint(tmp_path / "by-step.pt", str(best_step)) == best_step
        assert (tmp_path / "by-step.pt").read_bytes() == (tmp_path / "best.pt").read_bytes()
        with pytest.raises(gradserve.NotFound, match=f"it keeps two: latest at step 40, best at step {best_step}"):
            job.download_checkpoint(tmp_path / "none.pt", "7")
        assert job.generate("time", 5, checkpoint="best").step == best_step


def test_a_job_started_from_the_best_checkpoint_begins_with_its_weights(stack, source, timemachine, tmp_path):
    with stack.client() as c:
        job = c.submit(dataset=source.spec.dataset, max_steps=10, init_from=f"{source.id}@best",
                       **{**SMALL, "lr": 1e-30}).wait(timeout=120)
        assert job.state == "SUCCEEDED", stack.logs()
        assert (job.info.init_from.job_id, job.info.init_from.step) == (source.id, source.best_checkpoint_step)
        assert any(f"starting from step {source.best_checkpoint_step} of job {source.id}" in line.message
                   for line in job.logs())
        source.download_checkpoint(tmp_path / "best.pt", "best")
        job.download_checkpoint(tmp_path / "mine.pt")
    load = lambda path: torch.load(io.BytesIO(path.read_bytes()), weights_only=True)["model"]
    theirs, mine = load(tmp_path / "best.pt"), load(tmp_path / "mine.pt")
    assert all(torch.equal(mine[k], v) for k, v in theirs.items()), "an lr of 1e-30 leaves the weights as they came"


def test_a_job_that_cannot_start_from_the_checkpoint_is_refused_naming_why(stack, source):
    with stack.client() as c:
        with pytest.raises(gradserve.InvalidArgument) as err:
            c.submit(dataset=source.spec.dataset, max_steps=10, init_from=source.id,
                     **{**SMALL, "hidden_size": 32, "preprocess": "none"})
        assert [f for f, _ in err.value.violations] == ["spec.hidden_size", "spec.preprocess"]
        assert "must be 16 as in job" in err.value.violations[0][1]
        with pytest.raises(gradserve.InvalidArgument, match="init_from.state"):
            c.submit(dataset=source.spec.dataset, init_from=source.id, init_state=True,
                     **{**SMALL, "partition": "random"})
        with pytest.raises(gradserve.FailedPrecondition, match="has no checkpoint at step 5; it keeps two"):
            c.submit(dataset=source.spec.dataset, init_from=f"{source.id}@5", **SMALL)
        with pytest.raises(gradserve.InvalidArgument, match="init_from.checkpoint must be latest, best"):
            c.submit(dataset=source.spec.dataset, init_from=f"{source.id}@newest", **SMALL)
        with pytest.raises(gradserve.NotFound, match="init_from: job job-00000000000000000000 not found"):
            c.submit(dataset=source.spec.dataset, init_from="job-00000000000000000000", **SMALL)


def test_status_says_where_a_job_started_from(stack, source, capsys):
    with stack.client() as c:
        job = c.submit(dataset=source.spec.dataset, max_steps=10, init_from=source.id, init_optimizer=True, **SMALL)
        job.wait(timeout=120)
    assert cli.main(["--server", stack.address, "status", job.id]) == 0
    out = capsys.readouterr().out
    assert f"started from  {source.id} at step 40 (weights, optimizer state)" in out
