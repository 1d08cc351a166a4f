"""The Python API: a `Client` for the service and a `Job` handle for each job.

    with gradserve.Client("127.0.0.1:50051") as c:
        ds = c.upload_text("book.txt")
        job = c.submit(dataset=ds, model="lstm", max_steps=300)
        for ev in job.events():      # history first, then live; reconnects by itself
            ...
        job.wait(timeout=600)
        job.download_checkpoint("model.pt")
"""

from __future__ import annotations

import codecs
import os
import queue
import threading
import time
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import NamedTuple

import grpc

from gradserve import spec as specs
from gradserve import sweeps
from gradserve._channel import open_channel
from gradserve.errors import InvalidArgument, Unavailable, from_rpc_error
from gradserve.settings import ClientSettings
from gradserve.v1 import jobs_pb2, jobs_pb2_grpc

DEFAULT_TIMEOUT_S = 30.0
# How long events() keeps trying to reconnect before it gives up.
DEFAULT_RECONNECT_S = 60.0
UPLOAD_CHUNK_BYTES = 1024 * 1024
TERMINAL_STATES = frozenset({"SUCCEEDED", "FAILED", "CANCELLED"})
# The wait before reconnecting an event stream, unless the server asks for longer.
RECONNECT_PAUSE_S = 0.2
_RECONNECT_CODES = {grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED, grpc.StatusCode.INTERNAL}
_WAIT_POLL_S = 0.5
# Events of a sweep's members read ahead of the caller; a member's reader waits when it is full.
_SWEEP_QUEUE_EVENTS = 1024
# Generation runs on a worker that may first have to load the model; the
# server gives up a little before this deadline and says why.
DEFAULT_GENERATE_TIMEOUT_S = 120.0
DEFAULT_GENERATE_TOKENS = 100


def first_non_utf8(data: bytes, chunk: int = UPLOAD_CHUNK_BYTES) -> int | None:
    """The offset of the first byte that makes `data` invalid UTF-8, or None; decodes a chunk at a time."""
    view, start = memoryview(data), 0
    # A chunk holds at least one whole character (4 bytes at most), so each pass moves on.
    chunk = max(chunk, 4)
    while start < len(data):
        end = start + chunk
        try:
            # Not final before the end: a character cut by the chunk's edge is left for the next chunk.
            _, used = codecs.utf_8_decode(view[start:end], "strict", end >= len(data))
        except UnicodeDecodeError as e:
            return start + e.start
        start += used
    return None


def state_name(state: int) -> str:
    """"RUNNING" for jobs_pb2.RUNNING, and so on."""
    return jobs_pb2.JobState.Name(state)


class Client:
    """A connection to a gradserve server. `target` defaults to $GRADSERVE_SERVER, then 127.0.0.1:50051."""

    def __init__(self, target: str | None = None, *, token: str | None = None, tls: bool | None = None,
                 ca_file: str | None = None, cert_file: str | None = None, key_file: str | None = None,
                 timeout: float = DEFAULT_TIMEOUT_S, reconnect_timeout: float = DEFAULT_RECONNECT_S):
        """Connect to `target` (default $GRADSERVE_SERVER, then 127.0.0.1:50051).

        `token` (default $GRADSERVE_TOKEN) is sent as a bearer token. TLS is on
        when `tls` is true, or when a CA file is given ($GRADSERVE_CA_FILE);
        without a CA file it trusts the system's roots. `cert_file` and
        `key_file` present a client certificate, for servers that require one.
        """
        defaults = ClientSettings.from_env()
        self.target = target or defaults.server
        self.timeout = timeout
        self.reconnect_timeout = reconnect_timeout
        ca_file = ca_file or defaults.ca_file
        if tls is None:
            tls = bool(ca_file or cert_file) or defaults.tls
        self._channel = open_channel(
            self.target, token=token or defaults.token, tls=tls, ca_file=ca_file, cert_file=cert_file,
            key_file=key_file,
        )
        self.stub = jobs_pb2_grpc.JobServiceStub(self._channel)

    def close(self) -> None:
        self._channel.close()

    def __enter__(self) -> "Client":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _unary(self, method, request):
        try:
            return method(request, timeout=self.timeout)
        except grpc.RpcError as e:
            raise from_rpc_error(e) from None

    # ---------------------------------------------------------------- data

    def upload_text(self, path: str | os.PathLike, name: str | None = None) -> str:
        """Upload a UTF-8 text file; returns its dataset id (the same id for the same content).

        A file that is not UTF-8 is refused here, before any byte is sent, with
        InvalidArgument naming the file and the offset of its first bad byte.
        """
        path = Path(path)
        data = path.read_bytes()
        bad = first_non_utf8(data)
        if bad is not None:
            reason = f"must be UTF-8 text; byte {data[bad]:#04x} at offset {bad} is not"
            raise InvalidArgument(f"{path} {reason}", None, [(str(path), reason)])
        return self.upload_bytes(data, name or path.name)

    def upload_bytes(self, data: bytes | str, name: str = "") -> str:
        """Upload text held in memory; returns its dataset id.

        A server receiving too many uploads at once refuses this one as busy;
        it is sent again, as the server advises, until the client's timeout (or
        a second per MB, if longer) runs out, and then ResourceExhausted is raised.
        """
        if isinstance(data, str):
            data = data.encode("utf-8")

        def requests():
            yield jobs_pb2.UploadDatasetRequest(info=jobs_pb2.DatasetInfo(name=name))
            for start in range(0, len(data), UPLOAD_CHUNK_BYTES):
                yield jobs_pb2.UploadDatasetRequest(chunk=data[start : start + UPLOAD_CHUNK_BYTES])

        # A server busy with other uploads says when to try again; that is waited for, within the call's time.
        deadline = time.monotonic() + max(self.timeout, len(data) / 1e6)
        while True:
            try:
                return self.stub.UploadDataset(requests(), timeout=deadline - time.monotonic()).id
            except grpc.RpcError as e:
                error = from_rpc_error(e)
            retry_after = getattr(error, "retry_after", None)
            if retry_after is None or time.monotonic() + retry_after >= deadline:
                raise error
            time.sleep(retry_after)

    # ---------------------------------------------------------------- jobs

    def submit(self, spec: jobs_pb2.JobSpec | None = None, *, name: str = "", tags: Mapping[str, str] | None = None,
               note: str = "", init_from: str = "", init_optimizer: bool = False, init_state: bool = False,
               **fields) -> "Job":
        """Submit a job. Give a JobSpec, or its fields as keywords (unset ones take the server's defaults).

        Field names, defaults and allowed values: `gradserve.spec.FIELDS`.
        `name`, `tags` and `note` label the job for finding it later
        (list_jobs); the rules for them are in `gradserve.labels`.
        `init_from` "JOB", "JOB@best" or "JOB@STEP" starts from that job's
        latest, best or step-STEP checkpoint: its weights, and with
        init_optimizer its optimizer state, with init_state its carried hidden
        state. The model, sizes and vocabulary must match (the server names
        each that does not).
        """
        message = self._spec_message(fields, spec)
        request = jobs_pb2.SubmitJobRequest(spec=message, name=name, tags=tags or {}, note=note)
        if init_from:
            source, _, checkpoint = init_from.partition("@")
            request.init_from.CopyFrom(jobs_pb2.InitFrom(job_id=source, checkpoint=checkpoint or "latest",
                                                         optimizer=init_optimizer, state=init_state))
        return Job(self, self._unary(self.stub.SubmitJob, request))

    @staticmethod
    def _spec_message(fields: dict, spec: jobs_pb2.JobSpec | None = None) -> jobs_pb2.JobSpec:
        """`spec` (or an empty one) with `fields` set; a field that does not exist or whose value cannot be sent
        is refused here, naming it."""
        unknown = sorted(set(fields) - set(jobs_pb2.JobSpec.DESCRIPTOR.fields_by_name))
        if unknown:
            raise TypeError(f"unknown job spec field(s): {', '.join(unknown)}; see gradserve.spec.FIELDS")
        message = jobs_pb2.JobSpec()
        if spec is not None:
            message.CopyFrom(spec)
        for key, value in fields.items():
            if value is None:
                continue
            try:
                setattr(message, key, value)
            except (TypeError, ValueError):
                # Out of the wire type's range (a negative size, say): the server never sees it.
                field = specs.BY_NAME.get(key)
                allowed = f"must be {field.allowed}" if field else "has the wrong type"
                reason = f"{allowed}, got {value!r}"
                raise InvalidArgument(f"spec.{key} {reason}", None, [(f"spec.{key}", reason)]) from None
        return message

    def get_job(self, job_id: str) -> "Job":
        return Job(self, self._unary(self.stub.GetJob, jobs_pb2.GetJobRequest(job_id=job_id)))

    def list_jobs(self, limit: int = 50, state: str | None = None, *, name: str = "",
                  tags: Mapping[str, str] | None = None, model: str = "", dataset: str = "",
                  created_after: float | None = None, created_before: float | None = None,
                  order_by: str = "created", reverse: bool = False, page_token: str = "", sweep: str = "") -> "JobPage":
        """One page of jobs that match every filter given, newest first unless `order_by` says otherwise.

        state: "RUNNING" and so on. name: a part of the name, ignoring case.
        tags: every one must be on the job. sweep: its members only. created_after, created_before:
        Unix times. order_by: "created", or a summary metric, best first:
        "train_loss", "val_loss", "tokens_per_sec". The page is a list; its
        `next_page_token`, passed back with the same filters, gives the next
        page ("" on the last one). `iter_jobs` walks every page.
        """
        request = jobs_pb2.ListJobsRequest(
            limit=limit, state=jobs_pb2.JobState.Value(state) if state else 0, name_contains=name, tags=tags or {},
            model=model, dataset=dataset, order_by=order_by, reverse=reverse, page_token=page_token, sweep=sweep)
        for attr, seconds in (("created_after", created_after), ("created_before", created_before)):
            if seconds is not None:
                getattr(request, attr).FromNanoseconds(int(seconds * 1e9))
        reply = self._unary(self.stub.ListJobs, request)
        return JobPage([Job(self, j) for j in reply.jobs], reply.next_page_token)

    def iter_jobs(self, **filters) -> Iterator["Job"]:
        """Every job that matches, page after page; takes list_jobs' keywords but page_token."""
        token = None
        while token != "":
            page = self.list_jobs(**filters, page_token=token or "")
            yield from page
            token = page.next_page_token

    def list_datasets(self) -> list[jobs_pb2.Dataset]:
        """Your datasets, newest upload first: id, name, size in bytes, characters, words, upload time."""
        return list(self._unary(self.stub.ListDatasets, jobs_pb2.ListDatasetsRequest()).datasets)

    def delete_dataset(self, dataset_id: str) -> jobs_pb2.Dataset:
        """Forget one of your datasets (its text goes once no one else has it); returns what it was.

        FailedPrecondition while a QUEUED or RUNNING job of yours trains on it.
        """
        return self._unary(self.stub.DeleteDataset, jobs_pb2.DeleteDatasetRequest(dataset_id=dataset_id))

    def workers(self) -> list[jobs_pb2.Worker]:
        """Workers whose heartbeat is current."""
        return list(self._unary(self.stub.ListWorkers, jobs_pb2.ListWorkersRequest()).workers)

    # ---------------------------------------------------------------- sweeps

    def submit_sweep(self, base: jobs_pb2.JobSpec | Mapping | None = None, *,
                     grid: Mapping[str, list] | None = None, members: list[Mapping] | None = None,
                     early_stop: str = "", min_steps: int = 0, min_peers: int = 0, eta: int = 0,
                     name: str = "", tags: Mapping[str, str] | None = None, note: str = "") -> "Sweep":
        """Submit one job per member: `base` (a JobSpec or its fields) with each combination of `grid`'s values
        (the cartesian product, the last field varying fastest), then each of `members` (fields to set).

        Values may be given as numbers, booleans or text. early_stop "median" or "halving" stops members whose
        held-out loss falls behind (see jobs.proto's EarlyStop for min_steps, min_peers and eta). Members are
        jobs: named after `name` and their values, tagged with `tags`, each with its own id and events.
        """
        spec = jobs_pb2.SweepSpec(early_stop=jobs_pb2.EarlyStop(rule=early_stop, min_steps=min_steps,
                                                               min_peers=min_peers, eta=eta))
        if isinstance(base, jobs_pb2.JobSpec):
            spec.base.CopyFrom(base)
        elif base:
            spec.base.CopyFrom(self._spec_message(dict(base)))
        for field, values in (grid or {}).items():
            spec.axes.add(field=field, values=[_value_text(v) for v in values])
        for values in members or []:
            spec.members.add(values={k: _value_text(v) for k, v in values.items()})
        request = jobs_pb2.SubmitSweepRequest(spec=spec, name=name, tags=tags or {}, note=note)
        return Sweep(self, self._unary(self.stub.SubmitSweep, request))

    def get_sweep(self, sweep_id: str) -> "Sweep":
        return Sweep(self, self._unary(self.stub.GetSweep, jobs_pb2.GetSweepRequest(sweep_id=sweep_id)))

    def list_sweeps(self, limit: int = 50, page_token: str = "") -> list[jobs_pb2.Sweep]:
        """Your sweeps, newest first, with their members counted by state; `.next_page_token` as in list_jobs."""
        reply = self._unary(self.stub.ListSweeps, jobs_pb2.ListSweepsRequest(limit=limit, page_token=page_token))
        return JobPage(list(reply.sweeps), reply.next_page_token)

    @staticmethod
    def defaults() -> dict:
        """The spec's defaults, as the server fills them in."""
        return {f.name: f.default for f in specs.FIELDS}


class JobPage(list):
    """A page of list_jobs: a list of Job, and the token of the next page ("" on the last)."""

    def __init__(self, jobs: list["Job"], next_page_token: str):
        super().__init__(jobs)
        self.next_page_token = next_page_token


class Job:
    """A handle on one job. `info` is the record as last fetched; `refresh()` fetches it again.

    The record's main fields read from the handle too, with the state by its
    name: `job.state` is "QUEUED", "RUNNING", "SUCCEEDED", "FAILED" or
    "CANCELLED", as of the last fetch.
    """

    def __init__(self, client: Client, info: jobs_pb2.Job):
        self.client = client
        self.info = info

    @property
    def id(self) -> str:
        return self.info.id

    @property
    def state(self) -> str:
        return state_name(self.info.state)

    @property
    def reason(self) -> str:
        """Why the job FAILED or was CANCELLED, or why a sweep's member SUCCEEDED before max_steps."""
        return self.info.reason

    @property
    def waiting(self) -> str:
        """Why a QUEUED job is not running yet, and what would start it; "" otherwise."""
        return self.info.waiting

    @property
    def last_step(self) -> int:
        return self.info.last_step

    @property
    def checkpoint_step(self) -> int:
        return self.info.checkpoint_step

    @property
    def worker(self) -> str:
        return self.info.worker

    @property
    def attempt(self) -> int:
        return self.info.attempt

    @property
    def summary(self) -> jobs_pb2.JobSummary:
        """Its results so far: latest training loss, best evaluation, tokens, time, clipped steps."""
        return self.info.summary

    @property
    def name(self) -> str:
        return self.info.name

    @property
    def tags(self) -> dict[str, str]:
        return dict(self.info.tags)

    @property
    def note(self) -> str:
        return self.info.note

    @property
    def spec(self) -> jobs_pb2.JobSpec:
        """The complete, effective spec: every field the server defaulted is filled in."""
        return self.info.spec

    def __repr__(self) -> str:
        return f"<Job {self.id} {self.state}>"

    def refresh(self) -> jobs_pb2.Job:
        self.info = self.client._unary(self.client.stub.GetJob, jobs_pb2.GetJobRequest(job_id=self.id))
        return self.info

    def status(self) -> str:
        """The job's state now: QUEUED, RUNNING, SUCCEEDED, FAILED or CANCELLED."""
        return state_name(self.refresh().state)

    def cancel(self) -> "Job":
        """Cancel the job: at once when queued, at its next step when running. Returns this handle, updated.

        Cancelling a cancelled job changes nothing; one that SUCCEEDED or FAILED
        raises FailedPrecondition.
        """
        self.info = self.client._unary(self.client.stub.CancelJob, jobs_pb2.CancelJobRequest(job_id=self.id))
        return self

    def delete(self) -> "Job":
        """Remove the ended job from the service: its record, events and checkpoint. Returns this handle,
        holding the record as it was.

        A job still QUEUED or RUNNING raises FailedPrecondition: cancel it first.
        """
        self.info = self.client._unary(self.client.stub.DeleteJob, jobs_pb2.DeleteJobRequest(job_id=self.id))
        return self

    def wait(self, timeout: float | None = None) -> "Job":
        """Block until the job ends; returns this handle, holding the final record. Raises TimeoutError after `timeout` s.

        A server that goes away meanwhile is waited for, as events() does, up
        to the client's `reconnect_timeout` at a time.
        """
        deadline = None if timeout is None else time.monotonic() + timeout
        down_since = None
        while True:
            try:
                if state_name(self.refresh().state) in TERMINAL_STATES:
                    return self
                down_since = None
            except Unavailable:
                down_since = down_since or time.monotonic()
                if time.monotonic() - down_since > self.client.reconnect_timeout:
                    raise
            if deadline is not None and time.monotonic() >= deadline:
                raise TimeoutError(f"job {self.id} is still {state_name(self.info.state)} after {timeout:g} s")
            time.sleep(_WAIT_POLL_S)

    def events(self, cursor: str | None = None, follow: bool = True, *,
               _merge: "_Merge | None" = None) -> Iterator[jobs_pb2.Event]:
        """Every event after `cursor` (all of them by default), then live ones until the job ends.

        With follow=False it ends after the events stored so far instead, even
        while the job runs: the history up to now, e.g. to plot it.

        If the connection drops, it reconnects from the last event it yielded, so
        no event is missed and none comes twice. It gives up with Unavailable
        after the client's `reconnect_timeout` without a connection. A server
        that ends the stream early (it is shutting down, or this watcher fell
        too far behind) sends a notice, which is not yielded: it is the cue to
        reconnect the same way.
        """
        cursor = cursor or ""
        down_since = None
        while True:
            pause = RECONNECT_PAUSE_S
            call = self.client.stub.StreamEventBatches(
                jobs_pb2.StreamEventsRequest(job_id=self.id, cursor=cursor, history_only=not follow)
            )
            if _merge is not None and not _merge.register(self.id, call):
                return
            try:
                for event in (event for batch in call for event in batch.events):
                    if event.WhichOneof("kind") == "notice":
                        # The server ended the stream early (it is shutting down, or this watcher fell too far
                        # behind): reconnect from `cursor`, which a notice (not a stored event) does not move.
                        break
                    down_since = None
                    cursor = event.cursor
                    yield event
                    if event.WhichOneof("kind") == "status" and state_name(event.status.state) in TERMINAL_STATES:
                        return
                else:
                    # A stream the server ends by itself has nothing more: the history was all
                    # there was, or the job had ended before `cursor`. Only a notice reconnects.
                    return
            except grpc.RpcError as e:
                if _merge is not None and _merge.stopped.is_set():
                    return
                error = from_rpc_error(e)
                # A server busy with other watchers says when to try again; that counts as being cut off.
                busy_for = getattr(error, "retry_after", None)
                if e.code() not in _RECONNECT_CODES and busy_for is None:
                    raise error from None
                pause = max(pause, busy_for or 0.0)
            except Unavailable:
                pass
            finally:
                call.cancel()
            down_since = down_since or time.monotonic()
            if time.monotonic() - down_since > self.client.reconnect_timeout:
                lost = Unavailable(
                    f"lost the event stream of {self.id} and could not reconnect to {self.client.target} for "
                    f"{self.client.reconnect_timeout:g} s" + (f"; the last event seen has cursor {cursor}" if cursor else "")
                )
                # Where to resume: events(cursor=e.cursor) continues right after the last event given.
                lost.cursor = cursor
                raise lost
            time.sleep(pause)

    def generate(self, prefix: str = "", num_tokens: int = DEFAULT_GENERATE_TOKENS, *, temperature: float = 0.0,
                 seed: int = 0, timeout: float = DEFAULT_GENERATE_TIMEOUT_S,
                 checkpoint: str = "latest") -> jobs_pb2.GenerateResponse:
        """Text from the job's latest checkpoint, running or finished; `.text` holds it, `.step` the checkpoint's step.

        `checkpoint` "best" takes the one kept for the best evaluation instead,
        and a step (as a string) whichever of the two is at that step.

        The model reads `prefix` (split and preprocessed as the job's text was;
        tokens it never saw become <unk>), then adds `num_tokens` tokens:
        characters for char jobs, words for word jobs. `.text` is the prefix as
        given followed by those tokens, so for preprocess=d2l jobs the added text
        is lowercase letters and spaces. temperature 0 always picks the likeliest
        token (the same text every time); above 0 it samples from
        softmax(logits / temperature), reproducibly for the same `seed`.

        A worker serving the "generate" queue does the work (`gradserve-server
        dev` starts one). Raises NotFound when the job has no checkpoint yet,
        InvalidArgument for values out of range, and Unavailable when no
        generate worker answers.
        """
        request = jobs_pb2.GenerateRequest(job_id=self.id, checkpoint=checkpoint)
        for field, value in (("prefix", prefix), ("num_tokens", num_tokens), ("temperature", temperature),
                             ("seed", seed)):
            try:
                setattr(request, field, value)
            except (TypeError, ValueError):
                # The wrong type, or out of the wire type's range (a negative count): the server never sees it.
                reason = f"has the wrong type or is out of range, got {value!r}"
                raise InvalidArgument(f"{field} {reason}", None, [(field, reason)]) from None
        try:
            return self.client.stub.Generate(request, timeout=timeout)
        except grpc.RpcError as e:
            raise from_rpc_error(e) from None

    def resubmit(self, *, name: str | None = None, tags: Mapping[str, str] | None = None, note: str | None = None,
                 **changes) -> "Job":
        """Submit this job's spec again as a new job, with `changes` (spec fields) applied.

        Fields whose defaults derive from others (lr from the optimizer;
        tbptt_k1, tbptt_k2 and auto's bounds from num_steps) are derived again
        from the changed spec unless they were set apart from their defaults. The name and note carry over unless given; `tags` are
        added to the job's own.
        """
        spec = specs.rederivable(self.spec)
        return self.client.submit(spec, name=self.name if name is None else name, tags={**self.tags, **(tags or {})},
                                  note=self.note if note is None else note, **changes)

    @property
    def best_checkpoint_step(self) -> int:
        """The step of the checkpoint kept for the best evaluation so far; 0 when there is none."""
        return self.info.best_checkpoint_step

    def logs(self, cursor: str = "", follow: bool = False) -> Iterator[jobs_pb2.LogLine]:
        """The job's log lines after `cursor` (from the oldest kept by default): what its workers logged.

        With follow=True it then waits for new lines until the job ends.
        Each line's `.cursor` resumes right after it.
        """
        request = jobs_pb2.StreamLogsRequest(job_id=self.id, cursor=cursor, follow=follow)
        try:
            yield from self.client.stub.StreamLogs(request, timeout=None if follow else self.client.timeout)
        except grpc.RpcError as e:
            raise from_rpc_error(e) from None

    def download_checkpoint(self, path: str | os.PathLike, checkpoint: str = "latest") -> int:
        """Write the job's latest checkpoint to `path` (whole or not at all); returns its step.

        `checkpoint` "best" writes the one kept for the best evaluation instead,
        and a step (as a string) whichever of the two is at that step.
        """
        path = Path(path)
        if not path.parent.is_dir():
            raise FileNotFoundError(f"cannot write {path}: the folder {path.parent} does not exist")
        tmp = path.with_name(path.name + ".part")
        step = 0
        try:
            with open(tmp, "wb") as f:
                for chunk in self.client.stub.DownloadCheckpoint(
                    jobs_pb2.DownloadCheckpointRequest(job_id=self.id, checkpoint=checkpoint),
                    timeout=self.client.timeout * 10
                ):
                    f.write(chunk.data)
                    step = chunk.step
            os.replace(tmp, path)
        except grpc.RpcError as e:
            tmp.unlink(missing_ok=True)
            raise from_rpc_error(e) from None
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        return step




def _value_text(value) -> str:
    """A sweep value as the server reads it: booleans as true/false, numbers and text as written."""
    if isinstance(value, bool):
        return "true" if value else "false"
    return f"{value:g}" if isinstance(value, float) else str(value)


class Sweep:
    """A handle on one sweep. `info` is the record as last fetched (jobs_pb2.Sweep); `refresh()` fetches it again."""

    def __init__(self, client: Client, info: jobs_pb2.Sweep):
        self.client = client
        self.info = info

    @property
    def id(self) -> str:
        return self.info.id

    @property
    def jobs(self) -> list[Job]:
        """The members, as Job handles on their records as last fetched, in the sweep's order."""
        return [Job(self.client, m.job) for m in self.info.members]

    @property
    def values(self) -> list[dict[str, str]]:
        """Each member's own field values, as given, in the sweep's order."""
        return [sweeps.ordered(self.info.spec, m.values) for m in self.info.members]

    @property
    def done(self) -> bool:
        i = self.info
        return len(i.members) == i.succeeded + i.failed + i.cancelled

    def __repr__(self) -> str:
        i = self.info
        return (f"Sweep({i.id}, {len(i.members)} members: {i.queued} queued, {i.running} running, "
                f"{i.succeeded} succeeded, {i.failed} failed, {i.cancelled} cancelled)")

    def refresh(self) -> jobs_pb2.Sweep:
        self.info = self.client.get_sweep(self.id).info
        return self.info

    def cancel(self) -> "Sweep":
        """Cancel every member still queued or running. Returns this handle, updated."""
        self.info = self.client._unary(self.client.stub.CancelSweep, jobs_pb2.CancelSweepRequest(sweep_id=self.id))
        return self

    def delete(self) -> "Sweep":
        """Delete every member, as Job.delete does each, and with them the sweep. Returns this handle, holding the
        sweep as it was.

        A sweep with a member still QUEUED or RUNNING raises FailedPrecondition, deleting nothing: cancel it first.
        """
        self.info = self.client._unary(self.client.stub.DeleteSweep, jobs_pb2.DeleteSweepRequest(sweep_id=self.id))
        return self

    def wait(self, timeout: float | None = None) -> "Sweep":
        """Block until every member has ended; returns this handle. Raises TimeoutError after `timeout` s."""
        deadline = None if timeout is None else time.monotonic() + timeout
        down_since = None
        while True:
            try:
                self.refresh()
                down_since = None
                if self.done:
                    return self
            except Unavailable:
                down_since = down_since or time.monotonic()
                if time.monotonic() - down_since > self.client.reconnect_timeout:
                    raise
            if deadline is not None and time.monotonic() >= deadline:
                raise TimeoutError(f"sweep {self.id} still has members queued or running after {timeout:g} s: "
                                   f"{self!r}")
            time.sleep(_WAIT_POLL_S)

    def events(self, cursors: Mapping[str, str] | None = None, follow: bool = True) -> Iterator[jobs_pb2.Event]:
        """Every member's events merged as they arrive, each naming its job (`event.job_id`), until all have ended.

        Each member's events come in order, exactly once, as Job.events gives
        them. To resume, pass `cursors`: for each job id, the cursor of the
        last of its events you have; the others start from their first event.
        """
        cursors = dict(cursors or {})
        merged: queue.Queue = queue.Queue(maxsize=_SWEEP_QUEUE_EVENTS)
        control = _Merge()
        stopped = control.stopped

        def follow_member(job: Job) -> None:
            try:
                for event in job.events(cursors.get(job.id), follow, _merge=control):
                    while not stopped.is_set():
                        try:
                            merged.put(event, timeout=0.2)
                            break
                        except queue.Full:
                            continue
                    if stopped.is_set():
                        return
                merged.put(_MemberEnded(job.id, None))
            except Exception as e:  # handed to the reader, which raises it
                merged.put(_MemberEnded(job.id, e))

        threads = [threading.Thread(target=follow_member, args=(job,), daemon=True, name=f"sweep-events-{job.id}")
                   for job in self.jobs]
        for t in threads:
            t.start()
        try:
            running = len(threads)
            while running:
                item = merged.get()
                if isinstance(item, _MemberEnded):
                    running -= 1
                    if item.error is not None and not stopped.is_set():
                        raise item.error
                    continue
                yield item
        finally:
            control.stop()

    def table(self) -> list[dict]:
        """One row per member, in the sweep's order: its id, name, values, state, step and latest results.

        Fetches the sweep again first. The results come from each member's
        summary: train loss and perplexity at the latest step, and the best
        held-out loss and perplexity with their step (None where none yet).
        """
        self.refresh()
        rows = []
        for member in self.info.members:
            job, summary = member.job, member.job.summary
            rows.append({
                "job_id": member.job_id, "name": job.name, **sweeps.ordered(self.info.spec, member.values),
                "state": state_name(job.state),
                "step": job.last_step, "train_loss": summary.train_loss if summary.step else None,
                "train_perplexity": summary.train_perplexity if summary.step else None,
                "val_loss": summary.best_val_loss if summary.best_step else None,
                "val_perplexity": summary.best_val_perplexity if summary.best_step else None,
                "best_step": summary.best_step or None, "reason": job.reason,
            })
        return rows


class _Merge:
    """The streams one Sweep.events call reads: stopping it cancels each, and any a member's reader opens later."""

    def __init__(self):
        self.stopped = threading.Event()
        self._lock = threading.Lock()
        self._calls: dict[str, grpc.Call] = {}

    def register(self, job_id: str, call) -> bool:
        """Keep `call` to cancel on stop; False (and the call cancelled) when already stopped."""
        with self._lock:
            if self.stopped.is_set():
                call.cancel()
                return False
            self._calls[job_id] = call
            return True

    def stop(self) -> None:
        with self._lock:
            self.stopped.set()
            calls = list(self._calls.values())
        for call in calls:
            call.cancel()


class _MemberEnded(NamedTuple):
    job_id: str
    error: Exception | None
