"""The `gradserve` CLI without a server: rendering, the submit flags, exit codes and error output.

Commands run through `cli.main(argv, client_factory=...)` with a fake client,
so what is asserted is what a user would see on stdout and stderr.
"""

from __future__ import annotations

import argparse
import io
import json
import re
from datetime import datetime

import pytest
from google.protobuf.timestamp_pb2 import Timestamp
from rich.console import Console

from gradserve import cli
from gradserve import spec as specs
from gradserve.client import JobPage
from gradserve.errors import FailedPrecondition, InvalidArgument, NotFound, Unavailable
from gradserve.v1 import jobs_pb2

JOB_ID = "job-0123456789abcdef0123"
DATASET_ID = "ds-" + "ab" * 32
NOW = 1_700_000_000.0


def ts(seconds: float) -> Timestamp:
    t = Timestamp()
    t.FromNanoseconds(int(seconds * 1e9))
    return t


def console() -> tuple[Console, io.StringIO]:
    buffer = io.StringIO()
    return Console(file=buffer, width=100), buffer


def metrics(step=100, *, clipped=True, clip_fraction=0.4, **overrides) -> jobs_pb2.Metrics:
    values = dict(step=step, epoch=0, loss=2.4123, perplexity=11.158, tokens_per_sec=41_234.0, lr=1.0,
                  grad_norm=0.8312, clipped=clipped, clip_fraction=clip_fraction)
    values.update(overrides)
    return jobs_pb2.Metrics(**values)


def metrics_event(step: int, cursor: str) -> jobs_pb2.Event:
    return jobs_pb2.Event(cursor=cursor, job_id=JOB_ID, time=ts(NOW), metrics=metrics(step))


def status_event(state: int, cursor: str, reason: str = "", step: int = 0) -> jobs_pb2.Event:
    return jobs_pb2.Event(
        cursor=cursor, job_id=JOB_ID, time=ts(NOW),
        status=jobs_pb2.StatusChange(state=state, reason=reason, worker="w-0@host", step=step),
    )


def history(final_state: int = jobs_pb2.SUCCEEDED, reason: str = "") -> list[jobs_pb2.Event]:
    return [
        status_event(jobs_pb2.QUEUED, "1-0"),
        status_event(jobs_pb2.RUNNING, "2-0"),
        metrics_event(100, "3-0"),
        jobs_pb2.Event(cursor="4-0", job_id=JOB_ID, checkpoint=jobs_pb2.CheckpointSaved(step=100, size_bytes=2048)),
        metrics_event(200, "5-0"),
        status_event(final_state, "6-0", reason=reason, step=200),
    ]


def job_record(state: int = jobs_pb2.RUNNING, **overrides) -> jobs_pb2.Job:
    spec = specs.complete(jobs_pb2.JobSpec(dataset=DATASET_ID, max_steps=1500))
    values = dict(id=JOB_ID, spec=spec, state=state, created_at=ts(NOW - 600), started_at=ts(NOW - 595),
                  worker="w-0@host", last_step=300, queue="cpu", checkpoint_step=0)
    values.update(overrides)
    return jobs_pb2.Job(**values)


class FakeJob:
    def __init__(self, info: jobs_pb2.Job, events=(), interrupt_after: int | None = None):
        self.info = info
        self._events = list(events)
        self.interrupt_after = interrupt_after
        self.cursor_asked = "unset"

    @property
    def id(self) -> str:
        return self.info.id

    @property
    def state(self) -> str:
        return jobs_pb2.JobState.Name(self.info.state)

    def events(self, cursor=None):
        self.cursor_asked = cursor
        for i, event in enumerate(self._events):
            if i == self.interrupt_after:
                raise KeyboardInterrupt
            yield event

    def refresh(self):
        return self.info

    def resubmit(self, **changes):
        self.resubmitted = changes
        return FakeJob(job_record(jobs_pb2.QUEUED))

    def logs(self, cursor="", follow=False):
        self.followed = follow
        yield jobs_pb2.LogLine(cursor="5-0", time=ts(NOW), level="WARNING", logger="py.warnings", attempt=2,
                               message="UserWarning: a warning\n  and its second line")

    def cancel(self):
        if self.state in ("SUCCEEDED", "FAILED"):
            raise FailedPrecondition(f"job {self.id} is {self.state}: only QUEUED or RUNNING jobs can be cancelled")
        self.cancelled = True
        return self

    def download_checkpoint(self, path, checkpoint="latest") -> int:
        with open(path, "wb") as f:
            f.write(b"x" * 1234)
        return 500


class FakeClient:
    """Records what the CLI asked for; `error` makes every call raise it."""

    def __init__(self, job: FakeJob | None = None, error: Exception | None = None, workers=()):
        self.job = job or FakeJob(job_record())
        self.error = error
        self._workers = list(workers)
        self.submitted: dict | None = None
        self.next_page_token = ""
        self.uploaded: list = []
        self.target = None

    def __call__(self, target: str, **connection) -> "FakeClient":
        self.target = target
        self.connection = connection
        return self

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        pass

    def _check(self):
        if self.error is not None:
            raise self.error

    def upload_text(self, path, name=None) -> str:
        self._check()
        self.uploaded.append((str(path), name))
        return DATASET_ID

    def submit(self, **fields):
        self._check()
        self.submitted = fields
        return self.job

    def get_job(self, job_id):
        self._check()
        return self.job

    def list_jobs(self, limit=50, state=None, page_token="", **filters):
        self._check()
        self.listed = (limit, state)
        self.filters = filters
        return JobPage([self.job], self.next_page_token)

    def workers(self):
        self._check()
        return self._workers

    def list_datasets(self):
        self._check()
        return [jobs_pb2.Dataset(id=DATASET_ID, name="book.txt", size_bytes=183_000, num_chars=183_000,
                                 num_words=32_000, uploaded_at=ts(NOW - 3600))]

    def delete_dataset(self, dataset_id):
        self._check()
        self.deleted_dataset = dataset_id
        return self.list_datasets()[0]


def run(argv, fake: FakeClient, capsys) -> tuple[int, str, str]:
    code = cli.main(argv, client_factory=fake)
    captured = capsys.readouterr()
    return code, captured.out, captured.err


# ------------------------------------------------------------------ rendering


def test_metrics_line_labels_every_number():
    line = cli.metrics_line(metrics(100), 1500)
    for part in ("step 100/1500", "epoch 0", "loss 2.412 nats", "ppl 11.16", "grad_norm 0.831 (clipped)",
                 "clipped 40% of steps", "lr 1", "tokens/s 41.2k"):
        assert part in line, (part, line)


def test_metrics_line_marks_clipping_only_when_it_fired():
    line = cli.metrics_line(metrics(100, clipped=False, clip_fraction=0.0), 1500)
    assert "clipped" not in line
    assert "grad_norm 0.831  " in line


@pytest.mark.parametrize("rate, shown", [(812.0, "812"), (41_234.0, "41.2k"), (2_500_000.0, "2.5M"), (7.25, "7.2")])
def test_token_rate_is_abbreviated(rate, shown):
    assert f"tokens/s {shown}" in cli.metrics_stats(metrics(tokens_per_sec=rate))


def test_status_and_checkpoint_lines():
    failed = cli.event_line(status_event(jobs_pb2.FAILED, "9-0", reason="loss is nan", step=42), 100)
    assert failed == "status FAILED  worker w-0@host  step 42  reason: loss is nan"
    saved = jobs_pb2.Event(checkpoint=jobs_pb2.CheckpointSaved(step=500, size_bytes=3 * 1024 * 1024))
    assert cli.event_line(saved, 1000) == "checkpoint  step 500  size 3.0 MiB"
    saved.checkpoint.best = True
    assert cli.event_line(saved, 1000) == "checkpoint  step 500  size 3.0 MiB  (best so far)"
    saved.checkpoint.also_latest = True
    assert cli.event_line(saved, 1000) == "checkpoint  step 500  size 3.0 MiB  (latest, and the best so far)"


def test_plain_stream_prints_one_line_per_event_and_remembers_where_it_was():
    out, buffer = console()
    state = cli.WatchState(JOB_ID)
    cli.stream_events(out, history(), state, 1500, json_mode=False)
    lines = buffer.getvalue().splitlines()
    assert len(lines) == 6
    assert lines[2].startswith("step 100/1500  epoch 0  loss 2.412 nats")
    assert lines[3] == "checkpoint  step 100  size 2.0 KiB"
    assert lines[5].startswith("status SUCCEEDED")
    assert state.cursor == "6-0"
    assert state.final is not None and state.final.state == jobs_pb2.SUCCEEDED


def test_plain_stream_keeps_server_text_literal():
    out, buffer = console()
    event = status_event(jobs_pb2.FAILED, "1-0", reason="bad [bold]input[/bold]")
    cli.stream_events(out, [event], cli.WatchState(JOB_ID), 10, json_mode=False)
    assert "reason: bad [bold]input[/bold]" in buffer.getvalue()


def test_json_stream_is_one_object_per_line_with_proto_field_names():
    out, buffer = console()
    cli.stream_events(out, history(), cli.WatchState(JOB_ID), 1500, json_mode=True)
    objects = [json.loads(line) for line in buffer.getvalue().splitlines()]
    assert [next(k for k in ("metrics", "status", "checkpoint") if k in o) for o in objects] == [
        "status", "status", "metrics", "checkpoint", "metrics", "status"]
    assert objects[2]["metrics"]["tokens_per_sec"] == 41_234.0
    assert objects[2]["metrics"]["step"] == 100
    assert objects[5]["status"]["state"] == "SUCCEEDED"
    assert all(o["job_id"] == JOB_ID for o in objects)


def test_live_stream_on_a_terminal_prints_status_lines_and_metrics():
    buffer = io.StringIO()
    terminal = Console(file=buffer, width=160, force_terminal=True, color_system=None)
    state = cli.WatchState(JOB_ID)
    cli.stream_events(terminal, history(), state, 1500, json_mode=False)
    text = buffer.getvalue()
    assert "status RUNNING  worker w-0@host" in text
    assert "checkpoint  step 100" in text
    assert "step 200/1500" in text and "loss 2.412 nats" in text
    assert state.cursor == "6-0"


def test_job_record_shows_progress_times_and_spec():
    out, buffer = console()
    finished = job_record(jobs_pb2.FAILED, finished_at=ts(NOW - 475), reason="loss is nan", checkpoint_step=250)
    cli.render_job(out, finished, now=NOW)
    text = buffer.getvalue()
    for part in (JOB_ID, "FAILED", "loss is nan", "lstm", DATASET_ID, "w-0@host", "300/1500 (20%)",
                 "step 250", "10m00s ago", "queued for 5s", "ran for 2m00s", "hidden_size=256", "max_steps=1500"):
        assert part in text, part


def test_job_record_gives_a_text_job_its_perplexity_and_a_task_its_own_loss():
    text_job = job_record(summary=jobs_pb2.JobSummary(step=300, train_loss=2.1395, train_perplexity=8.4945))
    task_job = job_record(summary=jobs_pb2.JobSummary(step=50, train_loss=0.4022))
    lines = []
    for job in (text_job, task_job):
        out, buffer = console()
        cli.render_job(out, job, now=NOW)
        lines += [line for line in buffer.getvalue().splitlines() if line.startswith("train")]
    assert lines == ["train        ppl 8.49, loss 2.1395 nats/token at step 300", "train        loss 0.4022 at step 50"]


def test_a_followed_job_ends_with_its_results_in_one_line():
    summary = jobs_pb2.JobSummary(step=1000, train_loss=2.1395, train_perplexity=8.4945, best_step=1000,
                                  best_val_loss=2.1286, best_val_perplexity=8.4025, tokens=1_120_000,
                                  train_seconds=21.2, tokens_per_sec=52_949.0)
    assert cli.results_line(summary) == (
        "train ppl 8.49; best val ppl 8.40 at step 1000; 1,120,000 tokens in 21s (52,949 tokens/s)")


def test_running_job_record_says_how_long_it_has_run():
    out, buffer = console()
    cli.render_job(out, job_record(), now=NOW)
    assert "running for" in buffer.getvalue() and "9m55s" in buffer.getvalue()
    assert "none yet" in buffer.getvalue()


def test_job_table_shortens_datasets_but_not_job_ids():
    out, buffer = console()
    builtin = job_record(id="job-ffffffffffffffffffff", spec=specs.complete(jobs_pb2.JobSpec(dataset="builtin:pydocs")))
    cli.render_jobs(out, [job_record(), builtin], now=NOW)
    text = buffer.getvalue()
    assert JOB_ID in text and "job-ffffffffffffffffffff" in text
    assert DATASET_ID not in text and DATASET_ID[:11] + "…" in text
    assert "builtin:pydocs" in text
    assert "300/1500" in text and "10m00s ago" in text


def test_workers_table_and_the_hint_when_there_are_none():
    out, buffer = console()
    cli.render_workers(out, [], now=NOW)
    assert "no worker is alive" in buffer.getvalue()
    assert "gradserve-worker --redis-url URL --queues cpu" in buffer.getvalue()

    out, buffer = console()
    worker = jobs_pb2.Worker(name="w-0@host", queues=["cpu", "gpu"], device="NVIDIA H100", hostname="host",
                             pid=4242, last_seen=ts(NOW - 2.5), job_id=JOB_ID)
    cli.render_workers(out, [worker], now=NOW)
    text = buffer.getvalue()
    for part in ("w-0@host", "cpu,gpu", "NVIDIA H100", "4242", JOB_ID, "2.5s ago"):
        assert part in text, part


def test_a_worker_running_several_jobs_shows_each_and_its_concurrency():
    busy = jobs_pb2.Worker(name="g", queues=["gpu"], job_id="job-a", job_ids=["job-a", "job-b"], concurrency=4)
    idle = jobs_pb2.Worker(name="h", queues=["gpu"], concurrency=4)
    single = jobs_pb2.Worker(name="c", queues=["cpu"], job_id="job-c", job_ids=["job-c"], concurrency=1)
    assert [cli.running_jobs(w) for w in (busy, idle, single)] == ["2/4: job-a, job-b", "0/4 idle", "job-c"]
    out, buffer = console()
    cli.render_workers(out, [busy], now=NOW)
    assert "2/4: job-a, job-b" in buffer.getvalue()


@pytest.mark.parametrize("seconds, shown", [(0, "0s"), (59, "59s"), (75, "1m15s"), (7300, "2h01m"), (90_000, "1d01h")])
def test_durations(seconds, shown):
    assert cli.human_duration(seconds) == shown


# ------------------------------------------------------------------- the parser


def _submit_parser() -> argparse.ArgumentParser:
    commands = next(a for a in cli.build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    return commands.choices["submit"]


def test_submit_has_one_flag_per_spec_field_with_its_default_and_choices():
    actions = {a.dest: a for a in _submit_parser()._actions}
    for field in specs.FIELDS:
        action = actions[field.name]
        flag = "--" + field.name.replace("_", "-")
        switch = isinstance(field.default, bool)
        assert action.option_strings == ([flag, flag.replace("--", "--no-")] if switch else [flag])
        assert action.default == field.default
        if field.choices:
            assert tuple(action.choices) == field.choices
        else:
            assert action.choices is None
            assert field.allowed in action.help
        if field.default is not None and not field.choices:
            assert "default" in action.help


def test_submit_flags_parse_the_proto_number_types():
    args = _submit_parser().parse_args(["--dataset", "builtin:pydocs", "--hidden-size", "64", "--lr", "0.5"])
    assert args.hidden_size == 64 and isinstance(args.hidden_size, int)
    assert args.lr == 0.5 and isinstance(args.lr, float)


@pytest.mark.parametrize("flag, value", [("--hidden-size", "0"), ("--lr", "0"), ("--lr", "nan"),
                                         ("--seed", "1.5"), ("--model", "transformer")])
def test_submit_rejects_values_outside_the_spec_before_calling_the_server(flag, value, capsys):
    fake = FakeClient()
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["submit", "--dataset", "builtin:pydocs", flag, value], client_factory=fake)
    assert exit_info.value.code == cli.EXIT_USAGE
    assert flag in capsys.readouterr().err
    assert fake.submitted is None


@pytest.mark.parametrize("argv", [["list", "--limit", "0"], ["list", "--state", "DONE"], ["frobnicate"]])
def test_other_bad_command_lines_exit_with_usage(argv, capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(argv, client_factory=FakeClient())
    assert exit_info.value.code == cli.EXIT_USAGE
    assert "error:" in capsys.readouterr().err


def test_global_options_work_before_and_after_the_command(capsys, monkeypatch):
    monkeypatch.setenv("GRADSERVE_SERVER", "env-host:1")
    for argv in (["--json", "--server", "h:9", "list"], ["list", "--json", "--server", "h:9"]):
        fake = FakeClient()
        code, out, _ = run(argv, fake, capsys)
        assert code == 0 and fake.target == "h:9"
        assert json.loads(out)[0]["id"] == JOB_ID
    fake = FakeClient()
    run(["list", "--state", "running", "--limit", "7"], fake, capsys)
    assert fake.target == "env-host:1" and fake.listed == (7, "RUNNING")


# ------------------------------------------------------------------- commands


def test_submit_sends_name_tags_and_note(capsys):
    fake = FakeClient(FakeJob(job_record(jobs_pb2.QUEUED)))
    code, _, _ = run(["submit", "--dataset", "builtin:pydocs", "--name", "T=5 run", "--tag", "study=tbptt",
                      "--tag", "T=5", "--note", "first"], fake, capsys)
    assert code == 0
    assert (fake.submitted["name"], fake.submitted["tags"], fake.submitted["note"]) == (
        "T=5 run", {"study": "tbptt", "T": "5"}, "first")


@pytest.mark.parametrize("argv, words", [
    (["submit", "--dataset", "builtin:pydocs", "--tag", "study"], "must be key=value, got 'study'"),
    (["submit", "--dataset", "builtin:pydocs", "--tag", "a b=c"], "letters, digits or _.- characters, got 'a b'"),
    (["submit", "--dataset", "builtin:pydocs", "--name", "x" * 101], "at most 100 characters, got 101"),
    (["list", "--after", "yesterday"], "an age like 90m, 6h or 2d; got 'yesterday'"),
    (["list", "--sort", "loss"], "must be one of created, train_loss, val_loss, tokens_per_sec, got 'loss'"),
    (["list", "--model", "transformer"], "must be one of rnn_scratch, rnn, gru, lstm, got 'transformer'"),
])
def test_bad_labels_and_filters_are_usage_errors_naming_the_value(argv, words, capsys):
    fake = FakeClient()
    with pytest.raises(SystemExit) as exit_info:
        cli.main(argv, client_factory=fake)
    assert exit_info.value.code == cli.EXIT_USAGE
    assert words in capsys.readouterr().err
    assert fake.submitted is None


def test_list_sends_its_filters_and_prints_the_command_for_the_next_page(capsys):
    fake = FakeClient()
    fake.next_page_token = "TOKEN2"
    argv = ["list", "--server", "h:9", "--tag", "study=tbptt", "--model", "gru", "--after", "2026-11-30",
            "--sort", "val_loss", "--page-token", "TOKEN1", "--limit", "2"]
    code, _, err = run(argv, fake, capsys)
    assert code == 0
    f = fake.filters
    assert (f["tags"], f["model"], f["order_by"], f["reverse"]) == ({"study": "tbptt"}, "gru", "val_loss", False)
    assert f["created_after"] == datetime(2026, 11, 30).timestamp()
    assert err.split() == ["more:", "gradserve", "list", "--server", "h:9", "--tag", "study=tbptt", "--model", "gru",
                           "--after", "2026-11-30", "--sort", "val_loss", "--limit", "2", "--page-token", "TOKEN2"]


def test_datasets_are_listed_with_sizes_in_units_and_deleted_by_id(capsys, monkeypatch):
    monkeypatch.setattr(cli.time, "time", lambda: NOW)
    fake = FakeClient()
    code, out, _ = run(["datasets"], fake, capsys)
    header, row = out.splitlines()
    assert header.split() == ["id", "name", "size", "chars", "words", "uploaded"]
    assert row.split() == [DATASET_ID, "book.txt", "178.7", "KiB", "183.0k", "32.0k", "1h00m", "ago"]
    code, out, _ = run(["delete-dataset", DATASET_ID], fake, capsys)
    assert code == 0 and fake.deleted_dataset == DATASET_ID
    assert out.startswith(f"deleted {DATASET_ID} (book.txt, 178.7 KiB)")


def test_logs_print_time_attempt_level_and_logger_before_each_message(capsys):
    fake = FakeClient()
    code, out, _ = run(["logs", JOB_ID, "-f"], fake, capsys)
    assert code == 0 and fake.job.followed
    when = datetime.fromtimestamp(NOW).strftime("%Y-%m-%d %H:%M:%S")
    assert out == f"{when} attempt 2 WARNING py.warnings: UserWarning: a warning\n  and its second line\n"


def test_resubmit_sends_only_the_flags_given(capsys):
    fake = FakeClient()
    code, out, _ = run(["resubmit", JOB_ID, "--optimizer", "adam", "--hidden-size", "64", "--tag", "try=2"], fake, capsys)
    assert code == 0
    assert fake.job.resubmitted == {"name": None, "tags": {"try": "2"}, "note": None, "optimizer": "adam",
                                    "hidden_size": 64}
    assert out.splitlines()[1].endswith(f"{JOB_ID} again with hidden_size=64, optimizer=adam")


def test_an_age_counts_back_from_now():
    assert cli._time_arg("90m", now=10_000.0) == 10_000.0 - 5400
    assert cli._time_arg("2d", now=200_000.0) == 200_000.0 - 172_800


def test_submit_sends_the_flags_and_prints_the_id_and_spec(capsys):
    fake = FakeClient(FakeJob(job_record(jobs_pb2.QUEUED)))
    code, out, _ = run(["submit", "--dataset", "builtin:pydocs", "--hidden-size", "64", "--model", "gru"], fake, capsys)
    assert code == 0
    assert fake.submitted["dataset"] == "builtin:pydocs"
    assert fake.submitted["hidden_size"] == 64 and fake.submitted["model"] == "gru"
    assert fake.submitted["lr"] is None  # left to the server, which picks it by optimizer
    assert set(fake.submitted) == {"dataset", "name", "tags", "note", "init_from", "init_optimizer", "init_state"} | {
        f.name for f in specs.FIELDS}
    assert out.splitlines()[0] == JOB_ID
    assert "QUEUED on queue cpu" in out and "max_steps=1500" in out


def test_submit_uploads_a_local_file_first(tmp_path, capsys):
    text = tmp_path / "book.txt"
    text.write_text("some text " * 100)
    fake = FakeClient()
    code, _, err = run(["submit", "--dataset", str(text)], fake, capsys)
    assert code == 0
    assert fake.uploaded == [(str(text), None)]
    assert fake.submitted["dataset"] == DATASET_ID
    assert f"as {DATASET_ID}" in err


def test_submit_refuses_a_dataset_that_is_neither_file_nor_id(capsys):
    fake = FakeClient()
    code, _, err = run(["submit", "--dataset", "missing.txt"], fake, capsys)
    assert code == 1 and fake.submitted is None
    assert err.startswith("error: invalid dataset")
    assert "'missing.txt'" in err


def test_invalid_argument_is_printed_with_every_field_and_exit_code_1(capsys):
    error = InvalidArgument(
        "spec.hidden_size must be in [1, 4096], got 0; spec.num_layers must be 1 for model rnn_scratch, got 2",
        violations=[("spec.hidden_size", "must be in [1, 4096], got 0"),
                    ("spec.num_layers", "must be 1 for model rnn_scratch, got 2")],
    )
    code, out, err = run(["submit", "--dataset", "builtin:pydocs"], FakeClient(error=error), capsys)
    assert code == 1 and out == ""
    lines = err.splitlines()
    assert lines[0] == "error: invalid spec.hidden_size, spec.num_layers"
    assert "  spec.hidden_size (--hidden-size): must be in [1, 4096], got 0" in lines
    assert "  spec.num_layers (--num-layers): must be 1 for model rnn_scratch, got 2" in lines
    assert "Traceback" not in err


def test_unavailable_hints_at_the_server_address(capsys):
    fake = FakeClient(error=Unavailable("connection refused"))
    code, _, err = run(["--server", "10.0.0.1:1", "workers"], fake, capsys)
    assert code == 1
    assert err.startswith("error: connection refused")
    assert "is the server running at 10.0.0.1:1?" in err and "gradserve-server dev" in err


def test_not_found_is_an_error_line(capsys):
    code, _, err = run(["status", JOB_ID], FakeClient(error=NotFound(f"{JOB_ID} not found")), capsys)
    assert (code, err) == (1, f"error: {JOB_ID} not found\n")


@pytest.mark.parametrize("state, code", [(jobs_pb2.SUCCEEDED, 0), (jobs_pb2.FAILED, 1), (jobs_pb2.CANCELLED, 3)])
def test_watch_exit_code_and_final_line_follow_the_job_state(state, code, capsys):
    fake = FakeClient(FakeJob(job_record(), history(state, reason="why")))
    exit_code, out, _ = run(["watch", JOB_ID], fake, capsys)
    assert exit_code == code
    assert f"job {JOB_ID} {jobs_pb2.JobState.Name(state)} at step 200/1500" in out
    assert "reason: why" in out


def test_watch_resumes_from_the_cursor_and_asks_the_server_when_the_stream_holds_no_end(capsys):
    job = FakeJob(job_record(jobs_pb2.FAILED, reason="diverged"), [])
    code, out, _ = run(["watch", JOB_ID, "--cursor", "6-0"], FakeClient(job), capsys)
    assert job.cursor_asked == "6-0"
    assert code == 1
    assert "FAILED at step 300/1500" in out and "reason: diverged" in out


def test_ctrl_c_stops_watching_and_says_how_to_resume_and_cancel(capsys):
    job = FakeJob(job_record(), history(), interrupt_after=3)
    code, out, err = run(["watch", JOB_ID], FakeClient(job), capsys)
    assert code == cli.EXIT_INTERRUPTED
    assert "step 100/1500" in out
    assert f"gradserve watch {JOB_ID} --cursor 3-0" in err
    assert f"gradserve cancel {JOB_ID}" in err


def test_json_watch_prints_only_json_lines(capsys):
    fake = FakeClient(FakeJob(job_record(), history(jobs_pb2.CANCELLED)))
    code, out, _ = run(["watch", JOB_ID, "--json"], fake, capsys)
    assert code == 3
    objects = [json.loads(line) for line in out.splitlines()]
    assert len(objects) == 6 and objects[-1]["status"]["state"] == "CANCELLED"


def test_submit_follow_with_json_prints_the_job_then_its_events(capsys):
    fake = FakeClient(FakeJob(job_record(jobs_pb2.QUEUED), history()))
    code, out, _ = run(["submit", "--dataset", "builtin:pydocs", "--follow", "--json"], fake, capsys)
    objects = [json.loads(line) for line in out.splitlines()]
    assert code == 0
    assert objects[0]["id"] == JOB_ID and objects[0]["spec"]["max_steps"] == 1500
    assert len(objects) == 7


def test_cancel_of_a_running_job_says_it_stops_at_the_next_step(capsys):
    code, out, _ = run(["cancel", JOB_ID], FakeClient(FakeJob(job_record(jobs_pb2.RUNNING))), capsys)
    assert code == 0 and "cancel requested; the job stops at its next step" in out
    queued = FakeJob(job_record(jobs_pb2.CANCELLED, reason="cancelled before it started"))
    code, out, _ = run(["cancel", JOB_ID], FakeClient(queued), capsys)
    assert out == f"{JOB_ID} CANCELLED: cancelled before it started\n"


def test_download_reports_path_size_and_step(tmp_path, capsys):
    target = tmp_path / "model.pt"
    code, out, _ = run(["download", JOB_ID, "-o", str(target)], FakeClient(), capsys)
    assert code == 0
    assert out == f"wrote {target} (1234 bytes, step 500)\n"


def test_download_into_a_missing_folder_is_an_error_line(tmp_path, capsys):
    code, _, err = run(["download", JOB_ID, "-o", str(tmp_path / "no" / "model.pt")], FakeClient(), capsys)
    assert code == 1 and err.startswith("error: no such directory") and "Traceback" not in err


def test_upload_prints_the_dataset_id(tmp_path, capsys):
    text = tmp_path / "book.txt"
    text.write_text("hello")
    fake = FakeClient()
    code, out, _ = run(["upload", str(text), "--name", "book"], fake, capsys)
    assert (code, out) == (0, DATASET_ID + "\n")
    assert fake.uploaded == [(str(text), "book")]
    code, out, _ = run(["upload", str(text), "--json"], fake, capsys)
    assert json.loads(out) == {"id": DATASET_ID}


def test_connection_options_reach_the_client(capsys):
    fake = FakeClient()
    run(["--token", "t0ken", "--ca-file", "ca.pem", "workers"], fake, capsys)
    assert fake.connection["token"] == "t0ken" and fake.connection["ca_file"] == "ca.pem"
    run(["workers", "--tls"], fake, capsys)
    assert fake.connection["tls"] is True and fake.connection["token"] is None


def test_evaluation_and_probe_events_are_labelled():
    text_eval = jobs_pb2.Event(evaluation=jobs_pb2.Evaluation(step=500, loss=1.9, perplexity=6.69))
    assert cli.event_line(text_eval, 1000) == "eval  step 500  val loss 1.900 nats  val ppl 6.69"
    task_eval = jobs_pb2.Event(evaluation=jobs_pb2.Evaluation(step=9, loss=0.02, metric="mse", value=0.02,
                                                              baseline=0.167))
    assert "held-out mse 0.02 (trivial baseline 0.167)" in cli.event_line(task_eval, 10)
    probe = jobs_pb2.Event(probe=jobs_pb2.Probe(
        step=200,
        grad_through_time=[jobs_pb2.GradProfile(layer=0, norms=[1e-4, 1e-3, 2e-2])],
        spectral_norms=[jobs_pb2.SpectralNorm(name="rnn.weight_hh_l0", gate="f", sigma=1.3),
                        jobs_pb2.SpectralNorm(name="rnn.weight_hh_l0", gate="i", sigma=0.9)],
    ))
    line = cli.event_line(probe, 1000)
    assert "|dL/dh_t| 1.00e-04 at t=1 .. 2.00e-02 at t=3" in line
    assert "largest singular value 1.3 (rnn.weight_hh_l0[f])" in line


def test_a_synthetic_tasks_metrics_have_no_perplexity():
    m = jobs_pb2.Metrics(step=5, loss=0.05, perplexity=0.0, grad_norm=0.2, lr=0.001, tokens_per_sec=1000,
                         skipped_steps=2)
    line = cli.metrics_line(m, 10)
    assert "ppl" not in line and "nats" not in line and "loss 0.05" in line
    assert "skipped 2 non-finite steps" in line


# ------------------------------------------------------ what a new user reads


def test_a_bad_command_line_prints_one_error_line_and_where_to_read_more(capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["submit", "--dataset", "builtin:pydocs", "--hidden-size", "0"], client_factory=FakeClient())
    assert exit_info.value.code == cli.EXIT_USAGE
    err = capsys.readouterr().err.splitlines()
    assert err[0].endswith("submit: error: argument --hidden-size: must be in [1, 4096], got 0")
    assert err[1].startswith("see `") and err[1].endswith("submit --help`")
    assert len(err) == 2, "no usage block before the error"


def test_generate_refuses_too_many_tokens_itself_and_names_the_flag(capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["generate", JOB_ID, "--num-tokens", "20000"], client_factory=FakeClient())
    assert exit_info.value.code == cli.EXIT_USAGE
    assert f"argument --num-tokens: must be in [1, {specs.MAX_GENERATE_TOKENS}], got 20000" in capsys.readouterr().err


def test_the_job_list_fits_80_columns_without_cutting_a_value():
    buffer = io.StringIO()
    narrow = Console(file=buffer, width=80)
    jobs = [job_record(jobs_pb2.SUCCEEDED, id=f"job-{i:020d}", last_step=1500, worker="dev-0@a-long-host-name")
            for i in range(3)]
    cli.render_jobs(narrow, jobs, now=NOW)
    lines = buffer.getvalue().splitlines()
    assert all(len(line) <= 80 for line in lines), lines
    for part in ("SUCCEEDED", "1500/1500", "job-00000000000000000002", "10m00s ago", "lstm"):
        assert part in buffer.getvalue(), part


def test_piped_output_has_no_trailing_padding(capsys):
    for argv in (["status", JOB_ID], ["list"]):
        code, out, _ = run(argv, FakeClient(), capsys)
        assert code == 0
        assert all(line == line.rstrip() for line in out.splitlines()), argv


def test_a_queued_job_that_waits_says_why_in_status_list_watch_and_submit(capsys):
    reason = "no live worker serves the gpu queue, so the job waits until one does; start one: gradserve-worker ..."
    waiting = job_record(jobs_pb2.QUEUED, queue="gpu", waiting=reason, started_at=None, last_step=0)
    code, out, _ = run(["status", JOB_ID], FakeClient(FakeJob(waiting)), capsys)
    assert re.search(rf"^waiting +{re.escape(reason)}$", out, re.M)
    code, out, _ = run(["list"], FakeClient(FakeJob(waiting)), capsys)
    assert "QUEUED*" in out and f"* 1 QUEUED job waiting: {reason}" in out
    code, _, err = run(["submit", "--dataset", "builtin:pydocs"], FakeClient(FakeJob(waiting)), capsys)
    assert f"warning: {JOB_ID} is QUEUED and waiting: {reason}" in err
    code, _, err = run(["watch", JOB_ID], FakeClient(FakeJob(waiting, history())), capsys)
    assert f"warning: {JOB_ID} is QUEUED and waiting" in err


def test_the_final_line_gives_the_step_the_job_ended_at():
    out, buffer = console()
    job = FakeJob(job_record(jobs_pb2.FAILED, last_step=0),
                  [status_event(jobs_pb2.FAILED, "1-0", reason="loss became nan at step 3", step=3)])
    cli.follow(out, console()[0], job, "", json_mode=False, server="h:1")
    assert f"job {JOB_ID} FAILED at step 3/1500" in buffer.getvalue()


@pytest.mark.parametrize("state", [jobs_pb2.SUCCEEDED, jobs_pb2.FAILED, jobs_pb2.CANCELLED])
def test_cancelling_a_job_that_has_ended_exits_0_and_says_so(state, capsys):
    code, out, _ = run(["cancel", JOB_ID], FakeClient(FakeJob(job_record(state, reason="r"))), capsys)
    assert code == 0
    name = jobs_pb2.JobState.Name(state)
    assert (f"had already ended {name}; nothing to cancel" if name != "CANCELLED" else f"{JOB_ID} CANCELLED") in out


class _LostStream(FakeJob):
    def events(self, cursor=None):
        yield metrics_event(100, "7-0")
        error = Unavailable(f"lost the event stream of {JOB_ID}")
        error.cursor = "7-0"
        raise error


def test_a_lost_watch_offers_the_cli_command_to_resume(capsys):
    code, _, err = run(["watch", JOB_ID], FakeClient(_LostStream(job_record())), capsys)
    assert code == 1
    assert f"gradserve watch {JOB_ID} --cursor 7-0" in err
    assert "events(" not in err


def test_an_overdue_worker_is_marked():
    out, buffer = console()
    fresh = jobs_pb2.Worker(name="w-1@h", queues=["cpu"], last_seen=ts(NOW - 3), heartbeat_interval_s=5)
    silent = jobs_pb2.Worker(name="w-2@h", queues=["cpu"], last_seen=ts(NOW - 12.5), heartbeat_interval_s=5)
    cli.render_workers(out, [fresh, silent], now=NOW)
    lines = buffer.getvalue().splitlines()
    assert "3.0s ago" in lines[1] and "overdue" not in lines[1]
    assert "12.5s ago (overdue: likely dead)" in lines[2]


def test_an_upload_of_a_file_that_is_not_utf8_names_the_file_and_the_offset(tmp_path, capsys):
    bad = tmp_path / "book.txt"
    bad.write_bytes("é".encode() * 700_000 + b"\xff tail")
    # The real client: it refuses the file before it connects to anything.
    code, _, err = run(["upload", str(bad), "--server", "127.0.0.1:9"], cli.Client, capsys)
    assert code == 1
    assert f"{bad}: must be UTF-8 text; byte 0xff at offset 1400000 is not" in err


def test_hints_name_a_command_that_runs_as_printed(tmp_path, monkeypatch, capsys):
    from gradserve import cmdline

    bin_dir = tmp_path / "venv" / "bin"
    bin_dir.mkdir(parents=True)
    for name in ("gradserve", "gradserve-server"):
        (bin_dir / name).write_text("#!/bin/sh\n")
        (bin_dir / name).chmod(0o755)
    monkeypatch.setattr("sys.argv", [str(bin_dir / "gradserve"), "watch"])
    monkeypatch.setenv("PATH", "/nonexistent")
    monkeypatch.chdir(tmp_path)
    assert cmdline.command("gradserve download") == "venv/bin/gradserve download"
    assert cmdline.command("gradserve-server dev") == "venv/bin/gradserve-server dev"
    fake = FakeClient(error=NotFound(f"{JOB_ID} not found (`gradserve list` lists yours)"))
    # The server's hints too.
    error = run(["status", JOB_ID], fake, capsys)[2]
    assert error == f"error: {JOB_ID} not found (`venv/bin/gradserve list` lists yours)\n"
    fake = FakeClient(error=FailedPrecondition("no worker serves generate (`gradserve-server dev` starts one)"))
    error = run(["status", JOB_ID], fake, capsys)[2]
    assert error == "error: no worker serves generate (`venv/bin/gradserve-server dev` starts one)\n"
    console = Console(file=io.StringIO(), width=200)
    cli.render_datasets(console, [])
    assert console.file.getvalue() == "no datasets; upload one with `venv/bin/gradserve upload FILE`\n"
    monkeypatch.setenv("PATH", str(bin_dir))
    assert cmdline.command("gradserve download") == "gradserve download"


def test_boolean_spec_fields_are_switches():
    parser = _submit_parser()
    args = parser.parse_args(["--dataset", "builtin:pydocs", "--eos", "--no-tie-weights"])
    assert args.eos is True and args.tie_weights is False
    assert parser.parse_args(["--dataset", "builtin:pydocs"]).eos is False


def test_a_window_change_reads_as_one_line():
    event = jobs_pb2.Event(window_change=jobs_pb2.WindowChange(step=300, from_window=5, to_window=10, suggested=37))
    assert cli.event_line(event, 1000) == ("window  step 300  num_steps 5 -> 10 steps "
                                           "(the probes since the last checkpoint suggest 37)")


def test_a_deleted_sweep_names_its_first_members_and_counts_the_rest():
    sweep = jobs_pb2.Sweep(id="sweep-1", members=[jobs_pb2.Sweep.Member(job_id=f"job-{i}") for i in range(7)])
    assert cli._deleted(sweep) == ("deleted sweep-1 and its 7 member(s), job-0, job-1, job-2, job-3, job-4 and 2 more: "
                                   "their records, events, checkpoints and logs are gone")
