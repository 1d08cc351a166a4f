"""The whole pipeline through the public client, against real Redis, server and Celery worker processes."""

from __future__ import annotations

import math
import time

import pytest
import redis
import torch

import gradserve
import gradserve.summary
from gradserve.v1 import jobs_pb2

# Small enough to train in a second or two on 2 cores, big enough to learn something.
SMALL = dict(model="lstm", hidden_size=32, batch_size=16, num_steps=20, preprocess="d2l")


@pytest.fixture(scope="module")
def corpus_id(stack, timemachine) -> str:
    with stack.client() as c:
        return c.upload_bytes(timemachine, name="timemachine.txt")


def kinds(events) -> list[str]:
    return [e.WhichOneof("kind") for e in events]


def states(events) -> list[str]:
    return [gradserve.state_name(e.status.state) for e in events if e.WhichOneof("kind") == "status"]


def wait_for_state(job: gradserve.Job, state: str, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while job.status() != state:
        assert time.monotonic() < deadline, f"{job.id} stayed {job.info.state} instead of reaching {state}"
        time.sleep(0.1)


def test_submit_stream_and_download(client, corpus_id, tmp_path):
    job = client.submit(dataset=corpus_id, max_steps=60, log_every=10, checkpoint_every=30, **SMALL)
    assert job.info.state == jobs_pb2.QUEUED
    assert job.info.queue == "cpu", "device=auto must go to cpu when no GPU worker is alive"

    events = list(job.events())

    assert states(events) == ["QUEUED", "RUNNING", "SUCCEEDED"]
    metrics = [e.metrics for e in events if e.WhichOneof("kind") == "metrics"]
    assert [m.step for m in metrics] == [10, 20, 30, 40, 50, 60]
    for m in metrics:
        assert m.perplexity == pytest.approx(math.exp(m.loss), rel=1e-9)
        assert m.tokens_per_sec > 0 and m.grad_norm > 0
        assert {p.name for p in m.param_grad_norms}, "per-parameter gradient norms are missing"
        assert m.clipped == (m.grad_norm > 1.0)
    assert metrics[-1].loss < metrics[0].loss, "training did not reduce the loss"
    # The one evaluation, at the end, is the best so far: the last checkpoint is the best one too, saved and
    # announced once.
    assert [(e.checkpoint.step, e.checkpoint.best, e.checkpoint.also_latest)
            for e in events if e.WhichOneof("kind") == "checkpoint"] == [(30, False, False), (60, True, True)]
    cursors = [e.cursor for e in events]
    assert len(set(cursors)) == len(cursors)

    final = job.wait(timeout=10)
    assert final.state == "SUCCEEDED"
    assert final.last_step == 60 and final.checkpoint_step == 60
    assert final.worker and final.info.started_at.seconds and final.info.finished_at.seconds

    path = tmp_path / "model.pt"
    assert job.download_checkpoint(path) == 60
    checkpoint = torch.load(path, weights_only=False)
    assert checkpoint["step"] == 60
    assert checkpoint["config"]["hidden_size"] == 32


def test_the_job_record_carries_its_results_as_its_events_add_up(client, corpus_id):
    # A tight clip norm, so that clipping fires at some steps and the clipped count means something.
    job = client.submit(dataset=corpus_id, max_steps=40, log_every=10, eval_every=20, clip_norm=0.5, **SMALL)
    events = list(job.events())
    summary = job.wait(timeout=10).info.summary

    metrics = [e.metrics for e in events if e.WhichOneof("kind") == "metrics"]
    evaluations = [e.evaluation for e in events if e.WhichOneof("kind") == "evaluation"]
    assert [v.step for v in evaluations] == [20, 40]
    assert summary.step == 40
    assert (summary.train_loss, summary.train_perplexity) == (metrics[-1].loss, metrics[-1].perplexity)
    best = min(evaluations, key=lambda v: v.loss)
    assert (summary.best_step, summary.best_val_loss, summary.best_val_perplexity) == (
        best.step, best.loss, best.perplexity)
    assert summary.tokens == 40 * SMALL["batch_size"] * SMALL["num_steps"]
    assert summary.train_seconds == pytest.approx(sum(m.seconds for m in metrics), rel=1e-9)
    assert summary.tokens_per_sec == pytest.approx(summary.tokens / summary.train_seconds, rel=1e-9)
    assert summary.clipped_steps == sum(round(m.clip_fraction * 10) for m in metrics)
    assert summary.clip_fraction == summary.clipped_steps / 40
    # The stored summary is exactly what the events add up to.
    folded = jobs_pb2.JobSummary()
    for event in events:
        gradserve.summary.add(folded, event)
    assert folded == summary
    assert client.list_jobs(limit=5)[0].info.summary == summary


def test_deleting_an_ended_job_leaves_nothing_of_it_and_an_active_one_is_refused(stack, client, corpus_id, tmp_path):
    done = client.submit(dataset=corpus_id, max_steps=20, log_every=10, checkpoint_every=20, **SMALL).wait(timeout=60)
    running = client.submit(dataset=corpus_id, max_steps=1_000_000, log_every=10, **SMALL)
    wait_for_state(running, "RUNNING")
    with pytest.raises(gradserve.FailedPrecondition) as refused:
        running.delete()
    assert str(refused.value) == (f"job {running.id} is RUNNING: only a job that has ended can be deleted; "
                                  f"cancel it first (`gradserve cancel {running.id}`)")
    running.cancel().wait(timeout=60)

    gone = done.delete()
    assert gone.info.state == jobs_pb2.SUCCEEDED and gone.info.last_step == 20
    for call in (lambda: client.get_job(done.id), lambda: list(done.events(follow=False)),
                 lambda: done.download_checkpoint(tmp_path / "m.pt"), done.delete):
        with pytest.raises(gradserve.NotFound):
            call()
    assert done.id not in [j.id for j in client.list_jobs(limit=1000)]
    assert not list(redis.Redis.from_url(stack.redis_url).scan_iter(f"*{done.id}*")), "a key of the job is left"
    assert running.delete().info.state == jobs_pb2.CANCELLED


def test_a_cut_stream_resumes_from_its_cursor_without_loss_or_duplicates(client, corpus_id):
    job = client.submit(dataset=corpus_id, max_steps=80, log_every=5, checkpoint_every=40, **SMALL)
    first_part = []
    for event in job.events():
        first_part.append(event)
        if len(first_part) == 6:
            break  # the watcher goes away mid-job
    rest = list(job.events(cursor=first_part[-1].cursor))
    seen = first_part + rest

    late_watcher = list(client.get_job(job.id).events())

    assert [e.cursor for e in seen] == [e.cursor for e in late_watcher]
    steps = [e.metrics.step for e in seen if e.WhichOneof("kind") == "metrics"]
    assert steps == list(range(5, 81, 5))
    assert states(seen)[-1] == "SUCCEEDED"


def test_cancel_a_running_job_stops_it_and_keeps_its_checkpoint(client, corpus_id, tmp_path):
    job = client.submit(dataset=corpus_id, max_steps=1_000_000, log_every=5, checkpoint_every=1_000_000, **SMALL)
    for event in job.events():
        if event.WhichOneof("kind") == "metrics":
            break
    requested = time.monotonic()
    assert job.cancel().state == "RUNNING"  # a running job stops at its next step
    final = job.wait(timeout=30)
    assert time.monotonic() - requested < 5
    assert final.state == "CANCELLED"
    assert "cancelled" in final.reason
    assert states(job.events())[-1] == "CANCELLED"
    assert job.download_checkpoint(tmp_path / "c.pt") == final.last_step > 0


def test_cancel_a_queued_job_at_once_and_it_never_starts(client, corpus_id):
    busy = client.submit(dataset=corpus_id, max_steps=1_000_000, log_every=50, **SMALL)
    wait_for_state(busy, "RUNNING")
    queued = client.submit(dataset=corpus_id, max_steps=10, **SMALL)
    assert queued.cancel().state == "CANCELLED"
    busy.cancel()
    busy.wait(timeout=30)
    # Give the worker time to take the cancelled job from the queue and drop it.
    follow_up = client.submit(dataset=corpus_id, max_steps=5, log_every=5, **SMALL)
    assert follow_up.wait(timeout=60).state == "SUCCEEDED"
    assert states(queued.events()) == ["QUEUED", "CANCELLED"]
    assert queued.status() == "CANCELLED"


def test_cancelling_a_finished_job_is_a_failed_precondition(client, corpus_id):
    job = client.submit(dataset=corpus_id, max_steps=5, log_every=5, **SMALL)
    job.wait(timeout=60)
    with pytest.raises(gradserve.FailedPrecondition, match="SUCCEEDED"):
        job.cancel()


def test_a_diverging_job_fails_with_the_step_and_a_hint(client, corpus_id):
    # Adam moves every weight by about lr at once; with an unbounded ReLU
    # recurrence the hidden state overflows within a window.
    job = client.submit(
        dataset=corpus_id, model="rnn", nonlinearity="relu", hidden_size=32, optimizer="adam", lr=100.0,
        clip_norm=0.0, max_steps=500, log_every=10, batch_size=16, num_steps=20,
    )
    final = job.wait(timeout=60)
    assert final.state == "FAILED"
    assert "became nan at step 2" in final.reason and "lower lr" in final.reason
    last = list(job.events())[-1]
    assert gradserve.state_name(last.status.state) == "FAILED" and last.status.reason == final.reason
    # The end names the step its reason names, though no metrics event reported that step.
    assert last.status.step == 2 and final.last_step == 0


def test_workers_are_listed_with_their_queue(client):
    workers = {w.name: w for w in client.workers()}
    assert sorted(workers) == ["g1@test", "w1@test"]
    assert list(workers["w1@test"].queues) == ["cpu"] and workers["w1@test"].device == "cpu"
    assert list(workers["g1@test"].queues) == ["generate"]


def test_jobs_are_listed_newest_first_and_filtered_by_state(client, corpus_id):
    a = client.submit(dataset=corpus_id, max_steps=5, log_every=5, **SMALL)
    b = client.submit(dataset=corpus_id, max_steps=5, log_every=5, **SMALL)
    b.wait(timeout=60)
    ids = [j.id for j in client.list_jobs(limit=1000)]
    assert ids.index(b.id) < ids.index(a.id)
    assert all(j.info.state == jobs_pb2.SUCCEEDED for j in client.list_jobs(state="SUCCEEDED"))
    assert b.id in [j.id for j in client.list_jobs(state="SUCCEEDED")]


def test_builtin_corpus_trains_without_an_upload(client):
    job = client.submit(dataset="builtin:pydocs", max_steps=10, log_every=10, **SMALL)
    assert job.wait(timeout=120).state == "SUCCEEDED"
