"""Every RPC rejects bad input with a status code that names the field and what is allowed.

These run against the real server over TCP (the session's stack).
"""

from __future__ import annotations

import hashlib

import grpc
import pytest

import gradserve
from gradserve.v1 import jobs_pb2


@pytest.fixture(scope="module")
def corpus_id(stack, timemachine) -> str:
    with stack.client() as c:
        return c.upload_bytes(timemachine, name="timemachine.txt")


@pytest.mark.parametrize(
    "fields, field, allowed",
    [
        (dict(hidden_size=0), "spec.hidden_size", "in [1, 4096], got 0"),
        (dict(num_layers=9), "spec.num_layers", "in [1, 8], got 9"),
        (dict(batch_size=5000), "spec.batch_size", "in [1, 4096]"),
        (dict(num_steps=0), "spec.num_steps", "in [1, 10000]"),
        (dict(max_steps=0), "spec.max_steps", "in [1, 10000000]"),
        (dict(lr=0.0), "spec.lr", "in (0, 100], got 0"),
        (dict(lr=float("nan")), "spec.lr", "finite"),
        (dict(clip_norm=-1.0), "spec.clip_norm", "in [0, 1e+06]"),
        (dict(log_every=0), "spec.log_every", "in [1, 1000000]"),
        (dict(checkpoint_every=0), "spec.checkpoint_every", "in [1, 10000000]"),
        (dict(model="transformer"), "spec.model", "one of rnn_scratch, rnn, gru, lstm"),
        (dict(tokenization="byte"), "spec.tokenization", "one of char, word"),
        (dict(partition="shuffled"), "spec.partition", "one of sequential, random"),
        (dict(optimizer="lbfgs"), "spec.optimizer", "one of sgd, adam"),
        (dict(device="tpu"), "spec.device", "one of auto, cpu, cuda"),
        (dict(preprocess="nfkc"), "spec.preprocess", "one of none, d2l"),
        (dict(model="rnn_scratch", num_layers=2), "spec.num_layers", "must be 1 for model rnn_scratch"),
        (dict(init="xavier"), "spec.init", "one of default, uniform, chrono"),
        (dict(init_range=0.0), "spec.init_range", "in (0, 10], got 0"),
        (dict(max_dependency=1), "spec.max_dependency", "in [2, 1000000], got 1"),
        (dict(embedding_size=8, embedding_dropout=0.95), "spec.embedding_dropout", "in [0, 0.9], got 0.95"),
        (dict(min_lr=-1.0), "spec.min_lr", "in [0, 100], got -1"),
        (dict(schedule="exponential"), "spec.schedule", "one of constant, step, cosine, plateau"),
        (dict(model="rnn", init="chrono"), "spec.init", "chrono sets the gate biases of gru and lstm"),
        (dict(embedding_dropout=0.2), "spec.embedding_dropout", "embedding_size is 0"),
        (dict(tie_weights=True, embedding_size=100, hidden_size=200), "spec.tie_weights",
         "needs embedding_size equal to hidden_size, got embedding_size 100 and hidden_size 200"),
        (dict(schedule="plateau", val_fraction=0.0), "spec.schedule", "val_fraction 0 holds nothing out"),
        (dict(truncation_tolerance=0.0), "spec.truncation_tolerance", "in (0, 0.5], got 0"),
        (dict(truncation="auto", num_steps=35, max_num_steps=20), "spec.num_steps",
         "must lie between min_num_steps (35) and max_num_steps (20) with truncation auto, got 35"),
        (dict(max_num_steps=0), "spec.max_num_steps", "in [1, 10000], got 0"),
    ],
)
def test_a_bad_spec_field_is_named_with_its_allowed_range(client, corpus_id, fields, field, allowed):
    with pytest.raises(gradserve.InvalidArgument) as err:
        client.submit(dataset=corpus_id, **fields)
    assert err.value.code == grpc.StatusCode.INVALID_ARGUMENT
    assert err.value.field == field
    assert field in str(err.value) and allowed in str(err.value)


def test_every_bad_field_is_reported_at_once(client, corpus_id):
    with pytest.raises(gradserve.InvalidArgument) as err:
        client.submit(dataset=corpus_id, hidden_size=0, lr=-1.0, model="cnn")
    assert [f for f, _ in err.value.violations] == ["spec.model", "spec.hidden_size", "spec.lr"]


def test_dataset_is_required_and_must_look_like_an_id(client):
    with pytest.raises(gradserve.InvalidArgument, match="spec.dataset is required"):
        client.submit()
    with pytest.raises(gradserve.InvalidArgument, match="ds- and 64 hex digits"):
        client.submit(dataset="book.txt")


def test_an_unknown_dataset_is_not_found(client):
    with pytest.raises(gradserve.NotFound, match="upload it first"):
        client.submit(dataset="ds-" + "0" * 64)


def test_a_dataset_too_short_for_the_batch_is_refused_with_the_numbers(client):
    tiny = client.upload_bytes("a short text, only sixty-odd characters long, for this test.", name="tiny")
    with pytest.raises(gradserve.InvalidArgument) as err:
        client.submit(dataset=tiny, batch_size=32, num_steps=35, val_fraction=0.0)
    message = str(err.value)
    assert err.value.field == "spec.dataset"
    assert "has 60 char tokens to train on" in message and "need at least 1155" in message


def test_a_validation_split_too_short_for_one_window_is_refused(client, corpus_id):
    with pytest.raises(gradserve.InvalidArgument) as err:
        client.submit(dataset=corpus_id, num_steps=2000, batch_size=2, val_fraction=0.01)
    assert err.value.field == "spec.val_fraction"
    assert "fewer than num_steps + 1 = 2001" in str(err.value)


def test_tbptt_needs_text_for_its_own_window(client):
    text = client.upload_bytes("abcdefgh" * 40, name="320 chars")
    with pytest.raises(gradserve.InvalidArgument, match="a window of 40 need at least 360"):
        client.submit(dataset=text, truncation="tbptt", partition="random", num_steps=10, tbptt_k1=20,
                      tbptt_k2=40, batch_size=8, val_fraction=0.0)
    job = client.submit(dataset=text, truncation="tbptt", partition="sequential", num_steps=10, tbptt_k1=20,
                        tbptt_k2=40, batch_size=8, val_fraction=0.0, model="rnn", hidden_size=8, max_steps=3)
    assert job.info.spec.tbptt_k2 == 40


def test_unknown_and_malformed_job_ids(client):
    with pytest.raises(gradserve.NotFound, match="job-doesnotexist not found"):
        client.get_job("job-doesnotexist")
    with pytest.raises(grpc.RpcError) as err:
        client.stub.CancelJob(jobs_pb2.CancelJobRequest(job_id="job-doesnotexist"))
    assert err.value.code() == grpc.StatusCode.NOT_FOUND
    with pytest.raises(grpc.RpcError) as err:
        client.stub.GetJob(jobs_pb2.GetJobRequest(job_id=""))
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "job_id is required" in err.value.details()
    with pytest.raises(gradserve.InvalidArgument, match="job_id must be a job-... id"):
        client.get_job("../../etc/passwd")


def test_a_malformed_cursor_is_refused(client, corpus_id):
    job = client.submit(dataset=corpus_id, max_steps=1, log_every=1, model="rnn", hidden_size=8)
    with pytest.raises(gradserve.InvalidArgument) as err:
        next(iter(job.events(cursor="yesterday")))
    assert err.value.field == "cursor"


def test_list_limit_is_bounded(client):
    with pytest.raises(gradserve.InvalidArgument, match=r"limit must be in \[0, 1000\]"):
        client.list_jobs(limit=5000)


def test_uploads_must_be_utf8_text(client):
    with pytest.raises(gradserve.InvalidArgument, match="must be UTF-8 text; byte 0xff at offset 5"):
        client.upload_bytes(b"hello\xffworld", name="binary")


def test_an_empty_upload_is_refused(client):
    with pytest.raises(gradserve.InvalidArgument, match="empty"):
        client.upload_bytes(b"", name="empty")


def test_an_upload_must_start_with_its_info(client):
    with pytest.raises(grpc.RpcError) as err:
        client.stub.UploadDataset(iter([jobs_pb2.UploadDatasetRequest(chunk=b"text first")]))
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "info must come first" in err.value.details()


def test_an_upload_over_the_limit_is_refused_and_nothing_is_kept(client, stack):
    # The stack's server runs with --max-dataset-mb 1.
    data = ("x" * 1023 + "\n").encode() * 1100
    with pytest.raises(gradserve.InvalidArgument, match="exceeds this server's limit of 1048576 bytes"):
        client.upload_bytes(data, name="big")
    with pytest.raises(gradserve.NotFound):
        client.submit(dataset="ds-" + hashlib.sha256(data).hexdigest())


def test_uploading_the_same_text_twice_gives_the_same_id(client, timemachine, corpus_id):
    assert client.upload_bytes(timemachine, name="again") == corpus_id


def test_a_job_over_the_memory_budget_is_refused_with_the_estimate(client, corpus_id):
    with pytest.raises(gradserve.InvalidArgument) as err:
        client.submit(dataset=corpus_id, model="lstm", hidden_size=4096, num_layers=8, batch_size=64, num_steps=500)
    message = str(err.value)
    assert "needs an estimated" in message and "over the cpu workers' budget of" in message
    assert "500-step backward window" in message


def test_full_truncation_on_a_long_text_is_refused_unless_it_fits(client, corpus_id):
    with pytest.raises(gradserve.InvalidArgument) as err:
        client.submit(dataset=corpus_id, truncation="full", model="lstm", hidden_size=1024, batch_size=4)
    assert err.value.field == "spec.truncation"
    assert "use truncation fixed" in str(err.value)
