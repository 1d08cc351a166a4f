"""Text generation through the public client: the server queues the request, a generate worker answers.

The session's stack runs one training worker and one generate worker
(`gradserve-worker --queues generate`). The failure paths that need no
generate worker (or one that never answers) run against a second stack with no worker at all (`idle_stack`).
"""

from __future__ import annotations

import json
import os
import string
import subprocess
import sys
import time
from pathlib import Path

import pytest

import gradserve
from gradserve.v1 import jobs_pb2
from gradserve_store import store

SMALL = dict(model="lstm", hidden_size=32, batch_size=16, num_steps=20, preprocess="d2l")
PREFIX = "time traveller"
D2L_CHARS = set(string.ascii_lowercase + " ")
GRADSERVE = str(Path(sys.executable).parent / "gradserve")


@pytest.fixture(scope="module")
def corpus_id(stack, timemachine) -> str:
    with stack.client() as c:
        return c.upload_bytes(timemachine, name="timemachine.txt")


@pytest.fixture(scope="module")
def trained(stack, corpus_id) -> gradserve.Job:
    with stack.client() as c:
        job = c.submit(dataset=corpus_id, max_steps=60, log_every=30, checkpoint_every=60, **SMALL)
        assert job.wait(timeout=120).state == "SUCCEEDED", stack.logs()
        yield job


def test_greedy_generation_continues_the_prefix_and_repeats_itself(trained):
    first = trained.generate(prefix=PREFIX, num_tokens=50, temperature=0.0)
    second = trained.generate(prefix=PREFIX, num_tokens=50, temperature=0.0)

    assert first.text == second.text
    assert first.text.startswith(PREFIX)
    assert len(first.text) == len(PREFIX) + 50
    assert set(first.text[len(PREFIX):]) <= D2L_CHARS, "d2l jobs know only lowercase letters and spaces"
    assert first.step == 60


def test_sampling_is_reproducible_by_seed(trained):
    def sample(seed: int) -> str:
        return trained.generate(prefix=PREFIX, num_tokens=60, temperature=1.0, seed=seed).text

    assert sample(1) == sample(1)
    # 60 draws from a barely trained model: three seeds agreeing would be astronomically unlikely.
    assert len({sample(1), sample(2), sample(3)}) > 1


def test_an_empty_or_unknown_prefix_still_generates(trained):
    assert len(trained.generate(prefix="", num_tokens=20).text) == 20
    # "É" is not in a d2l vocabulary (preprocessing makes it a space); digits neither.
    assert trained.generate(prefix="1895 É", num_tokens=10).text.startswith("1895 É")


def test_word_jobs_generate_words(client, corpus_id):
    job = client.submit(dataset=corpus_id, tokenization="word", max_steps=5, log_every=5, **SMALL)
    assert job.wait(timeout=120).state == "SUCCEEDED"

    words = job.generate(prefix="the time xyzzy", num_tokens=7).text.split()

    assert words[:3] == ["the", "time", "xyzzy"]
    assert len(words) == 3 + 7


def test_a_running_job_serves_its_latest_checkpoint(client, corpus_id):
    job = client.submit(dataset=corpus_id, max_steps=1_000_000, log_every=10, checkpoint_every=20, **SMALL)
    try:
        for event in job.events():
            if event.WhichOneof("kind") == "checkpoint":
                break
        reply = job.generate(prefix=PREFIX, num_tokens=10)
        assert reply.step >= 20 and reply.step % 20 == 0
        # The history so far (what `gradserve plot` reads) ends without waiting for the job to end.
        history = list(job.events(follow=False))
        assert job.status() == "RUNNING"
        assert any(e.WhichOneof("kind") == "checkpoint" for e in history)
        assert [gradserve.state_name(e.status.state) for e in history if e.WhichOneof("kind") == "status"] == [
            "QUEUED", "RUNNING"]
        assert [e.cursor for e in job.events(cursor=history[0].cursor, follow=False)][:1] == [history[1].cursor]
    finally:
        job.cancel()
        job.wait(timeout=30)


def test_a_job_without_a_checkpoint_is_not_found(client, corpus_id):
    job = client.submit(dataset=corpus_id, max_steps=1_000_000, log_every=10, checkpoint_every=1_000_000, **SMALL)
    try:
        with pytest.raises(gradserve.NotFound, match=f"job {job.id} has no checkpoint yet"):
            job.generate(prefix=PREFIX)
    finally:
        job.cancel()
        job.wait(timeout=30)


def test_an_unknown_job_is_not_found(client):
    # A handle made by hand, so Generate is the first call to hear of the job.
    with pytest.raises(gradserve.NotFound, match="job-0000 not found"):
        gradserve.Job(client, jobs_pb2.Job(id="job-0000")).generate(prefix=PREFIX)


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        (dict(num_tokens=0), "num_tokens"),
        (dict(num_tokens=10_001), "num_tokens"),
        (dict(num_tokens=-1), "num_tokens"),  # refused by the client: uint32 cannot hold it
        (dict(temperature=-0.5), "temperature"),
        (dict(temperature=float("nan")), "temperature"),
        (dict(temperature=101.0), "temperature"),
        (dict(prefix="x" * 10_001), "prefix"),
    ],
)
def test_invalid_requests_name_the_field(trained, kwargs, field):
    with pytest.raises(gradserve.InvalidArgument) as caught:
        trained.generate(**{"prefix": PREFIX, **kwargs})
    assert caught.value.field == field


def test_every_invalid_field_is_reported_at_once(trained):
    with pytest.raises(gradserve.InvalidArgument) as caught:
        trained.generate(prefix="x" * 10_001, num_tokens=0, temperature=float("inf"))
    assert [f for f, _ in caught.value.violations] == ["prefix", "num_tokens", "temperature"]


def test_a_malformed_job_id_is_invalid(client):
    with pytest.raises(gradserve.InvalidArgument) as caught:
        gradserve.Job(client, jobs_pb2.Job(id="nope")).generate(prefix=PREFIX)
    assert caught.value.field == "job_id"


def cli(stack, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "GRADSERVE_SERVER": stack.address}
    return subprocess.run([GRADSERVE, *args], capture_output=True, text=True, timeout=120, env=env)


def test_the_generate_command_prints_the_text_alone_and_the_step_on_stderr(stack, trained):
    done = cli(stack, "generate", trained.id, "--prefix", PREFIX, "--num-tokens", "30")

    assert done.returncode == 0, done.stderr
    assert done.stdout == trained.generate(prefix=PREFIX, num_tokens=30).text + "\n"
    assert "step 60" in done.stderr


def test_the_generate_command_with_json_and_a_seed(stack, trained):
    done = cli(stack, "generate", trained.id, "--prefix", PREFIX, "--num-tokens", "30", "--temperature", "0.8",
               "--seed", "7", "--json")

    reply = json.loads(done.stdout)
    assert reply["text"] == trained.generate(prefix=PREFIX, num_tokens=30, temperature=0.8, seed=7).text
    assert int(reply["step"]) == 60 and reply["job_id"] == trained.id


def test_the_generate_command_reports_a_refused_request_and_exits_1(stack, trained):
    done = cli(stack, "generate", trained.id, "--prefix", "x" * 10_001)

    assert done.returncode == 1
    assert "prefix" in done.stderr and "must be at most 10000 characters" in done.stderr
    assert "Traceback" not in done.stderr


def test_the_generate_command_checks_its_own_ranges_before_calling(stack, trained):
    for flag, value, allowed in (("--num-tokens", "20000", "must be in [1, 10000], got 20000"),
                                 ("--temperature", "200", "must be in [0, 100], got 200")):
        done = cli(stack, "generate", trained.id, flag, value)
        assert done.returncode == 2
        assert f"argument {flag}: {allowed}" in done.stderr and "Traceback" not in done.stderr


def test_the_plot_command_draws_a_real_run(stack, trained, tmp_path):
    out = tmp_path / "run.png"
    done = cli(stack, "plot", trained.id, "-o", str(out))

    assert done.returncode == 0, done.stderr
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "2 metrics" in done.stdout and f"{trained.id} SUCCEEDED at step 60" in done.stdout


def _fake_job_with_checkpoint(redis_url: str, data: bytes) -> str:
    """A job record whose checkpoint is `data`: the states the public API cannot produce on demand."""
    job_store = store.JobStore.from_url(redis_url)
    try:
        job_id = store.new_job_id()
        job_store.create_job(job_id, jobs_pb2.JobSpec(dataset="ds-" + "0" * 64, checkpoint_every=10), "cpu")
        # Checkpoints are written by the attempt that holds the job; ending it
        # keeps the server's reaper from ever handing the record to a worker.
        lease = job_store.claim(job_id, 1, "fake@test", 60)
        job_store.put_checkpoint(lease, 10, data)
        job_store.finish(lease, jobs_pb2.SUCCEEDED, step=10)
        return job_id
    finally:
        job_store.r.close()


def test_an_unreadable_checkpoint_is_a_failed_precondition(stack, client):
    job_id = _fake_job_with_checkpoint(stack.redis_url, b"these bytes are no checkpoint")
    with pytest.raises(gradserve.FailedPrecondition, match=f"checkpoint of job {job_id} cannot be opened"):
        client.get_job(job_id).generate(prefix=PREFIX)


def test_without_a_generate_worker_the_call_fails_at_once_and_says_how_to_start_one(idle_stack):
    job_id = _fake_job_with_checkpoint(idle_stack.redis_url, b"unread")
    with idle_stack.client() as c:
        started = time.monotonic()
        with pytest.raises(gradserve.Unavailable, match="no worker serves the generate queue") as caught:
            c.get_job(job_id).generate(prefix=PREFIX)
    assert "--queues generate" in str(caught.value)
    assert time.monotonic() - started < 5


def test_a_generate_worker_that_never_answers_ends_in_unavailable_before_the_callers_deadline(idle_stack):
    job_id = _fake_job_with_checkpoint(idle_stack.redis_url, b"unread")
    job_store = store.JobStore.from_url(idle_stack.redis_url)
    # An advertisement with no process behind it: the request is queued and nobody takes it.
    job_store.heartbeat("ghost@test", {"name": "ghost@test", "queues": "generate", "device": "cpu"})
    try:
        with idle_stack.client() as c:
            with pytest.raises(gradserve.Unavailable, match="no generate worker answered"):
                c.get_job(job_id).generate(prefix=PREFIX, timeout=3)
    finally:
        job_store.remove_worker("ghost@test")
        job_store.r.close()
