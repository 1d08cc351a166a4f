"""`gradserve export`: a finished job's history as CSV, JSON lines and a TensorBoard event file, read back."""

from __future__ import annotations

import csv
import json
import struct

import pytest
from tensorboardX.proto import event_pb2

from gradserve import cli

JOB = dict(dataset="builtin:adding", model="lstm", hidden_size=8, batch_size=8, seq_len=10, max_steps=40,
           log_every=10, eval_every=20, probe_every=20)


@pytest.fixture(scope="module")
def finished(stack):
    with stack.client() as c:
        job = c.submit(**JOB).wait(timeout=120)
        assert job.state == "SUCCEEDED"
        return job.id, list(job.events())


def _export(stack, job_id, fmt, folder, capsys) -> str:
    code = cli.main(["--server", stack.address, "export", job_id, "--format", fmt, "-o", str(folder)])
    out = capsys.readouterr().out
    assert code == 0, out
    return out


def _records(path) -> list[event_pb2.Event]:
    """The events of a TensorBoard file: each record is its length, a CRC of it, the data, a CRC of that."""
    data, records, at = path.read_bytes(), [], 0
    while at < len(data):
        (length,) = struct.unpack("<Q", data[at:at + 8])
        records.append(event_pb2.Event.FromString(data[at + 12:at + 12 + length]))
        at += 12 + length + 4
    return records


def _kinds(events) -> dict[str, int]:
    kinds: dict[str, int] = {}
    for e in events:
        kinds[e.WhichOneof("kind")] = kinds.get(e.WhichOneof("kind"), 0) + 1
    return kinds


def test_csv_has_a_row_per_report(stack, finished, tmp_path, capsys):
    job_id, events = finished
    out = _export(stack, job_id, "csv", tmp_path, capsys)
    assert out.startswith(f"wrote {tmp_path}: metrics.csv (4), evaluations.csv (2), probes.csv (")
    metrics = list(csv.DictReader(open(tmp_path / "metrics.csv")))
    assert [int(r["step"]) for r in metrics] == [10, 20, 30, 40]
    first = next(e.metrics for e in events if e.WhichOneof("kind") == "metrics")
    assert float(metrics[0]["loss"]) == first.loss and float(metrics[0]["grad_norm"]) == first.grad_norm
    evaluations = list(csv.DictReader(open(tmp_path / "evaluations.csv")))
    assert [(r["step"], r["metric"]) for r in evaluations] == [("20", "mse"), ("40", "mse")]
    probes = list(csv.DictReader(open(tmp_path / "probes.csv")))
    assert {(r["step"], r["layer"]) for r in probes} == {("20", "0"), ("40", "0")}
    assert sorted(int(r["t"]) for r in probes if r["step"] == "20") == list(range(1, 11))
    statuses = [r["state"] for r in csv.DictReader(open(tmp_path / "status.csv"))]
    assert statuses == ["QUEUED", "RUNNING", "SUCCEEDED"]


def test_jsonl_has_every_event_once(stack, finished, tmp_path, capsys):
    job_id, events = finished
    _export(stack, job_id, "jsonl", tmp_path, capsys)
    lines = [json.loads(line) for line in open(tmp_path / "events.jsonl")]
    assert [line["cursor"] for line in lines] == [e.cursor for e in events]
    assert json.loads((tmp_path / "job.json").read_text())["id"] == job_id


def test_tensorboard_has_the_scalars_and_a_profile_image_per_probe(stack, finished, tmp_path, capsys):
    job_id, events = finished
    _export(stack, job_id, "tensorboard", tmp_path, capsys)
    (event_file,) = tmp_path.glob("events.out.tfevents.*")
    values = [(v.tag, r.step, v) for r in _records(event_file) if r.HasField("summary") for v in r.summary.value]
    losses = [(step, v.simple_value) for tag, step, v in values if tag == "train/loss"]
    assert [s for s, _ in losses] == [10, 20, 30, 40]
    assert losses[0][1] == pytest.approx(next(e.metrics.loss for e in events if e.WhichOneof("kind") == "metrics"))
    assert [step for tag, step, _ in values if tag == "val/mse"] == [20, 40]
    images = [(step, v.image) for tag, step, v in values if tag == "grad_through_time/layer0"]
    assert [step for step, _ in images] == [20, 40] == [e.probe.step for e in events if e.WhichOneof("kind") == "probe"]
    assert all(image.encoded_image_string.startswith(b"\x89PNG") and image.width > 100 for _, image in images)
    assert _kinds(events)["probe"] == len(images)
