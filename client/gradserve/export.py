"""A job's history written to files other tools read: CSV tables, JSON lines, or TensorBoard event files.

    gradserve export JOB --format csv -o DIR

or from Python:

    from gradserve.export import export
    export(list(job.events(follow=False)), job.info, "csv", "run-1/")

csv writes metrics.csv, evaluations.csv, probes.csv (one row per layer and
window position: the gradient-through-time profile, long form),
spectral_norms.csv and status.csv; jsonl writes job.json (the record) and
events.jsonl (one event a line, the proto's field names); tensorboard writes
an event file with every metric and evaluation as a scalar and, per probe, the
gradient-through-time profile of each layer as an image. TensorBoard needs the
`export` extra: pip install 'gradserve[export]' (tensorboardX and matplotlib).
"""

from __future__ import annotations

import csv
import json
import math
from collections.abc import Iterable, Sequence
from pathlib import Path

from google.protobuf import json_format

from gradserve.v1 import jobs_pb2

FORMATS = ("csv", "jsonl", "tensorboard")
INSTALL_HINT = "pip install 'gradserve[export]'"
METRICS_COLUMNS = ("step", "epoch", "loss", "perplexity", "tokens_per_sec", "lr", "grad_norm", "clipped",
                   "clip_fraction", "nonfinite_grads", "skipped_steps", "tokens", "seconds")
EVALUATION_COLUMNS = ("step", "loss", "perplexity", "metric", "value", "baseline")


class ExportMissing(ImportError):
    """The TensorBoard export was asked for, but its packages are not installed."""


def as_dict(message) -> dict:
    """A message as JSON-ready data, with the proto's field names and every field present."""
    return json_format.MessageToDict(message, preserving_proto_field_name=True,
                                     always_print_fields_with_no_presence=True, unquote_int64_if_possible=True)


def _of_kind(events: Iterable[jobs_pb2.Event], kind: str) -> list:
    return [getattr(e, kind) for e in events if e.WhichOneof("kind") == kind]


def _write_csv(path: Path, header: Sequence[str], rows: Iterable[Sequence]) -> int:
    count = 0
    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(header)
        for row in rows:
            writer.writerow(row)
            count += 1
    return count


def write_csv(events: Sequence[jobs_pb2.Event], folder: Path) -> dict[str, int]:
    """The tables, one file each; returns the rows written per file."""
    metrics, evaluations = _of_kind(events, "metrics"), _of_kind(events, "evaluation")
    probes = _of_kind(events, "probe")
    statuses = [(e.time, e.status) for e in events if e.WhichOneof("kind") == "status"]
    return {
        "metrics.csv": _write_csv(folder / "metrics.csv", METRICS_COLUMNS,
                                  ([getattr(m, c) for c in METRICS_COLUMNS] for m in metrics)),
        "evaluations.csv": _write_csv(folder / "evaluations.csv", EVALUATION_COLUMNS,
                                      ([getattr(v, c) for c in EVALUATION_COLUMNS] for v in evaluations)),
        "probes.csv": _write_csv(folder / "probes.csv", ("step", "layer", "t", "grad_norm"),
                                 ((p.step, g.layer, t, norm) for p in probes for g in p.grad_through_time
                                  for t, norm in enumerate(g.norms, start=1))),
        "spectral_norms.csv": _write_csv(folder / "spectral_norms.csv", ("step", "name", "gate", "sigma"),
                                         ((p.step, s.name, s.gate, s.sigma) for p in probes
                                          for s in p.spectral_norms)),
        "status.csv": _write_csv(folder / "status.csv", ("time", "state", "attempt", "step", "reason"),
                                 ((t.ToJsonString(), jobs_pb2.JobState.Name(s.state), s.attempt, s.step, s.reason)
                                  for t, s in statuses)),
    }


def write_jsonl(events: Sequence[jobs_pb2.Event], job: jobs_pb2.Job, folder: Path) -> dict[str, int]:
    (folder / "job.json").write_text(json.dumps(as_dict(job), indent=2) + "\n", encoding="utf-8")
    with open(folder / "events.jsonl", "w", encoding="utf-8") as f:
        for event in events:
            f.write(json.dumps(as_dict(event)) + "\n")
    return {"job.json": 1, "events.jsonl": len(events)}


def load_tensorboard():
    """What the tensorboard format needs, imported on first use; ExportMissing names the extra to install."""
    try:
        from tensorboardX import SummaryWriter
        from matplotlib.figure import Figure
    except ImportError as e:
        raise ExportMissing(f"the tensorboard format needs tensorboardX and matplotlib; {INSTALL_HINT}") from e
    return SummaryWriter, Figure


def _profile_figure(Figure, profile: jobs_pb2.GradProfile, step: int):
    fig = Figure(figsize=(5, 3), dpi=100)
    ax = fig.subplots()
    norms = [n if n > 0 and math.isfinite(n) else float("nan") for n in profile.norms]
    ax.plot(range(1, len(norms) + 1), norms, marker=".")
    ax.set_yscale("log")
    ax.set_xlabel("position t in the truncation window")
    ax.set_ylabel("||dL/dh_t||")
    ax.set_title(f"gradient through time, layer {profile.layer}, step {step}")
    fig.tight_layout()
    return fig


def write_tensorboard(events: Sequence[jobs_pb2.Event], folder: Path) -> dict[str, int]:
    """One TensorBoard event file in `folder`; returns the scalars and images written."""
    SummaryWriter, Figure = load_tensorboard()
    scalars = images = 0
    writer = SummaryWriter(str(folder))
    try:
        for m in _of_kind(events, "metrics"):
            values = {"train/loss": m.loss, "train/grad_norm": m.grad_norm, "train/lr": m.lr,
                      "train/tokens_per_sec": m.tokens_per_sec, "train/clip_fraction": m.clip_fraction}
            if m.perplexity:
                values["train/perplexity"] = m.perplexity
            for tag, value in values.items():
                writer.add_scalar(tag, value, m.step)
                scalars += 1
        for v in _of_kind(events, "evaluation"):
            values = {"val/loss": v.loss}
            if v.perplexity:
                values["val/perplexity"] = v.perplexity
            if v.metric:
                values[f"val/{v.metric}"] = v.value
            for tag, value in values.items():
                writer.add_scalar(tag, value, v.step)
                scalars += 1
        for p in _of_kind(events, "probe"):
            for s in p.spectral_norms:
                writer.add_scalar(f"spectral_norm/{s.name}" + (f"/{s.gate}" if s.gate else ""), s.sigma, p.step)
                scalars += 1
            for profile in p.grad_through_time:
                writer.add_figure(f"grad_through_time/layer{profile.layer}",
                                  _profile_figure(Figure, profile, p.step), p.step, close=False)
                images += 1
    finally:
        writer.close()
    return {"scalars": scalars, "images": images}


def export(events: Sequence[jobs_pb2.Event], job: jobs_pb2.Job, fmt: str, folder: str | Path) -> dict[str, int]:
    """Write the job's events to `folder` (made if missing) in format `fmt`; returns what was written."""
    if fmt not in FORMATS:
        raise ValueError(f"format must be one of {', '.join(FORMATS)}, got {fmt!r}")
    if fmt == "tensorboard":
        load_tensorboard()  # before the folder is made: a missing package leaves nothing behind
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    if fmt == "csv":
        return write_csv(events, folder)
    if fmt == "jsonl":
        return write_jsonl(events, job, folder)
    return write_tensorboard(events, folder)
