"""The JobService servicer and the `create_server` factory.

Every RPC validates its request before touching Redis. Errors leave as gRPC
status codes that mean what gRPC says they mean; invalid fields also carry a
``google.rpc.BadRequest`` with one violation per field, so clients can point at
the field without parsing the message.
"""

from __future__ import annotations

import asyncio
import functools
import inspect
import json
import logging
import math
import re
import secrets
import time
from pathlib import Path

import grpc
import redis
import redis.asyncio as aioredis
from google.protobuf import any_pb2
from google.rpc import code_pb2, error_details_pb2, status_pb2
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from gradserve import spec as specs
from gradserve import text
from gradserve.v1 import jobs_pb2, jobs_pb2_grpc
from gradserve_server import auth, corpus, store
from gradserve_server.decoding import StrictDecoding
from gradserve_server.queue import GENERATE_QUEUE, GENERATE_TASK, dispatch, make_celery

log = logging.getLogger("gradserve.server")

SERVICE_NAME = jobs_pb2.DESCRIPTOR.services_by_name["JobService"].full_name
DEFAULT_MAX_DATASET_BYTES = 64 * 1024 * 1024
CHUNK_BYTES = 1024 * 1024
MAX_MESSAGE_BYTES = 4 * 1024 * 1024
LIST_LIMIT_DEFAULT, LIST_LIMIT_MAX = 50, 1000
_CURSOR = re.compile(r"\d{1,20}-\d{1,20}")
# A blocking XREAD must return well inside redis-py's 5 s socket timeout.
_XREAD_BLOCK_MS = 1000
MAX_PREFIX_CHARS = 10_000
MAX_GENERATE_TOKENS = 10_000
MAX_TEMPERATURE = 100.0
# How long Generate waits for a generate worker's reply (less when the
# caller's deadline is nearer), and what it keeps of that deadline for the answer.
GENERATE_WAIT_S = 120.0
_DEADLINE_MARGIN_S = 0.5
# Each BLPOP returns well inside redis-py's socket timeout, and never asks for
# less than Redis's millisecond resolution (a timeout of 0 would block forever).
_BLPOP_MAX_S, _BLPOP_MIN_S = 1.0, 0.05
GENERATE_WORKER_HINT = "gradserve-worker --redis-url URL --queues generate (`gradserve-server dev` starts one)"
# The statuses a generate worker may answer with; anything else is INTERNAL.
_REPLY_CODES = {
    "NOT_FOUND": grpc.StatusCode.NOT_FOUND,
    "FAILED_PRECONDITION": grpc.StatusCode.FAILED_PRECONDITION,
    "INTERNAL": grpc.StatusCode.INTERNAL,
}


class _Invalid(Exception):
    def __init__(self, violations: list[tuple[str, str]]):
        self.violations = violations


class _QuotaExceeded(Exception):
    pass


def _bad_request_trailer(violations: list[tuple[str, str]]) -> tuple[str, tuple]:
    bad = error_details_pb2.BadRequest(
        field_violations=[error_details_pb2.BadRequest.FieldViolation(field=f, description=d) for f, d in violations]
    )
    detail = any_pb2.Any()
    detail.Pack(bad)
    message = "; ".join(f"{f} {d}" for f, d in violations)
    status = status_pb2.Status(code=code_pb2.INVALID_ARGUMENT, message=message, details=[detail])
    return message, (("grpc-status-details-bin", status.SerializeToString()),)


async def _abort_for(context: grpc.aio.ServicerContext, exc: Exception) -> None:
    """Turn a known failure into the status code that describes it; anything else propagates."""
    if isinstance(exc, _Invalid):
        message, trailer = _bad_request_trailer(exc.violations)
        await context.abort(grpc.StatusCode.INVALID_ARGUMENT, message, trailing_metadata=trailer)
    if isinstance(exc, store.NotFound):
        await context.abort(grpc.StatusCode.NOT_FOUND, f"{exc.args[0]} not found")
    if isinstance(exc, _QuotaExceeded):
        await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, str(exc))
    if isinstance(exc, store.Refused):
        await context.abort(
            grpc.StatusCode.FAILED_PRECONDITION, f"{exc}: only QUEUED or RUNNING jobs can be cancelled"
        )
    if isinstance(exc, redis.ConnectionError | redis.TimeoutError):
        log.warning("redis unreachable: %s", exc)
        await context.abort(grpc.StatusCode.UNAVAILABLE, "the job store (Redis) is unreachable; retry shortly")


_EXPECTED = (_Invalid, _QuotaExceeded, store.NotFound, store.Refused, redis.ConnectionError, redis.TimeoutError)


def _rpc(method):
    """Map the store's and the validator's exceptions to status codes, for unary and streaming methods alike."""
    if inspect.isasyncgenfunction(method):

        @functools.wraps(method)
        async def stream(self, request, context):
            try:
                async for item in method(self, request, context):
                    yield item
            except _EXPECTED as e:
                await _abort_for(context, e)

        return stream

    @functools.wraps(method)
    async def unary(self, request, context):
        try:
            return await method(self, request, context)
        except _EXPECTED as e:
            await _abort_for(context, e)

    return unary


def _require_id(value: str, field: str, prefix: str) -> None:
    if not value:
        raise _Invalid([(field, f"is required: a {prefix}... id")])
    if not value.startswith(prefix) or len(value) > 200:
        raise _Invalid([(field, f"must be a {prefix}... id, got {value[:80]!r}")])


class JobService(jobs_pb2_grpc.JobServiceServicer):
    """Jobs, datasets and checkpoints, each visible only to the tenant that made it (see `auth`).

    `quota_queued` and `quota_running` cap a tenant's QUEUED and RUNNING jobs
    at submission; 0 means no cap.
    """

    def __init__(self, redis_url: str, *, max_dataset_bytes: int = DEFAULT_MAX_DATASET_BYTES,
                 quota_queued: int = 0, quota_running: int = 0):
        self.store = store.JobStore.from_url(redis_url)
        self.aredis = aioredis.Redis.from_url(redis_url)
        self.celery = make_celery(redis_url)
        self.max_dataset_bytes = max_dataset_bytes
        self.quota_queued, self.quota_running = quota_queued, quota_running
        self._builtin_lock = asyncio.Lock()
        self._shutting_down = False

    async def close(self) -> None:
        await self.aredis.aclose()
        self.store.r.close()

    def end_streams(self) -> None:
        """The server is going away: every open StreamEvents ends within a second with a SERVER_SHUTTING_DOWN notice."""
        self._shutting_down = True

    # ------------------------------------------------------------ helpers

    async def _call(self, fn, *args, **kwargs):
        return await asyncio.to_thread(fn, *args, **kwargs)

    async def _owned_job(self, job_id: str) -> jobs_pb2.Job:
        """The job, if the calling tenant owns it. Another tenant's job is NotFound, exactly like a missing one."""
        job = await self._call(self.store.get_job, job_id)
        if job.tenant != auth.current_tenant.get():
            raise store.NotFound(job_id)
        return job

    async def _check_quota(self) -> None:
        tenant = auth.current_tenant.get()
        queued, running = await self._call(self.store.active_counts, tenant)
        who = f"tenant {tenant!r}" if tenant else "this server"
        for name, count, limit in (("queued", queued, self.quota_queued), ("running", running, self.quota_running)):
            if limit and count >= limit:
                raise _QuotaExceeded(
                    f"quota exceeded: {who} has {count} {name} jobs and the {name}-jobs quota is {limit}; "
                    "wait for some to finish, or cancel some (`gradserve list`, `gradserve cancel`)"
                )

    async def builtin_dataset(self, name: str) -> str:
        """The dataset id of a built-in corpus, building and storing it the first time."""
        async with self._builtin_lock:
            dataset_id = await self._call(self.store.builtin_dataset_id, name)
            if dataset_id:
                return dataset_id
            log.info("building %s (first use)", name)
            data = (await asyncio.to_thread(corpus.BUILTINS[name])).encode()
            info = await self._store_dataset(data, name)
            return await self._call(self.store.set_builtin_dataset_id, name, info.id)

    async def _store_dataset(self, data: bytes, name: str, tenant: str = "") -> jobs_pb2.Dataset:
        decoded = data.decode("utf-8")
        stats = await asyncio.to_thread(text.text_stats, decoded)
        return await self._call(self.store.put_dataset, data, name, len(decoded), stats, tenant)

    async def _text_tokens(self, spec: jobs_pb2.JobSpec, context) -> tuple[int, int]:
        """(tokens, distinct tokens) of the spec's text, refusing text too short for one minibatch."""
        dataset_id = spec.dataset
        if spec.dataset in corpus.BUILTINS:
            dataset_id = await self.builtin_dataset(spec.dataset)
        try:
            # Another tenant's upload is as invisible as one that never happened.
            if dataset_id == spec.dataset and not await self._call(
                self.store.owns_dataset, auth.current_tenant.get(), dataset_id
            ):
                raise store.NotFound(dataset_id)
            tokens, vocab_size = await self._call(
                self.store.dataset_tokens, dataset_id, spec.tokenization, spec.preprocess
            )
        except store.NotFound:
            await context.abort(
                grpc.StatusCode.NOT_FOUND,
                f"dataset {spec.dataset} not found; upload it first (Client.upload_text or `gradserve upload`)",
            )
        problems = specs.text_violations(spec, tokens)
        if problems:
            raise _Invalid([(f"spec.{f}", d) for f, d in problems])
        return tokens, vocab_size

    @staticmethod
    def _check_memory(spec: jobs_pb2.JobSpec, vocab_size: int, steps_per_sequence: int, queue: str,
                      workers: list[jobs_pb2.Worker]) -> None:
        """Refuse a job that would not fit the smallest budget among the live workers of its queue.

        Any of them may take it. With none alive, the default budget stands in.
        """
        window = specs.backprop_window(spec, steps_per_sequence)
        estimate = specs.memory_estimate_bytes(spec, vocab_size, window)
        budgets = [w.memory_budget_bytes for w in workers if queue in w.queues and w.memory_budget_bytes]
        budget = min(budgets, default=specs.DEFAULT_MEMORY_BUDGET_BYTES)
        if estimate <= budget:
            return
        mib = 2**20
        field = "spec.truncation" if spec.truncation == "full" else "spec"
        hint = "use truncation fixed, or a shorter text" if spec.truncation == "full" else (
            "lower hidden_size, batch_size or num_steps"
        )
        raise _Invalid(
            [
                (
                    field,
                    f"needs an estimated {estimate / mib:,.0f} MiB (weights, gradients, optimizer state and "
                    f"activations over a {window}-step backward window), over the {queue} workers' budget of "
                    f"{budget / mib:,.0f} MiB; {hint}",
                )
            ]
        )

    @staticmethod
    def _queue_for(device: str, workers: list[jobs_pb2.Worker]) -> str:
        if device == "cpu":
            return "cpu"
        if device == "cuda":
            return "gpu"
        return "gpu" if any("gpu" in w.queues for w in workers) else "cpu"

    # --------------------------------------------------------------- RPCs

    @_rpc
    async def SubmitJob(self, request, context):
        spec = specs.complete(request.spec)
        problems = specs.violations(spec)
        if problems:
            raise _Invalid([(f"spec.{f}", d) for f, d in problems])
        if spec.dataset in specs.SYNTHETIC_TASKS:
            vocab_size, steps_per_sequence = specs.SYNTHETIC_VOCAB[spec.dataset], specs.sequence_length(spec)
        else:
            tokens, vocab_size = await self._text_tokens(spec, context)
            steps_per_sequence = tokens // spec.batch_size
        # One look at the live workers serves both the routing and the memory budget.
        workers = await self._call(self.store.workers)
        queue = self._queue_for(spec.device, workers)
        self._check_memory(spec, vocab_size, steps_per_sequence, queue, workers)
        await self._check_quota()
        job_id = store.new_job_id()
        job = await self._call(self.store.create_job, job_id, spec, queue, auth.current_tenant.get())
        await self._call(dispatch, self.celery, self.store, job_id, job.attempt, queue)
        log.info("job %s queued on %s: %s %s", job_id, queue, spec.model, spec.dataset)
        return job

    @_rpc
    async def GetJob(self, request, context):
        _require_id(request.job_id, "job_id", "job-")
        return await self._owned_job(request.job_id)

    @_rpc
    async def ListJobs(self, request, context):
        problems = []
        if request.limit > LIST_LIMIT_MAX:
            problems.append(("limit", f"must be in [0, {LIST_LIMIT_MAX}] (0 means {LIST_LIMIT_DEFAULT}), got {request.limit}"))
        if request.state not in jobs_pb2.JobState.values():
            problems.append(("state", f"must be a JobState, got {request.state}"))
        if problems:
            raise _Invalid(problems)
        jobs = await self._call(
            self.store.list_jobs, request.limit or LIST_LIMIT_DEFAULT, request.state, auth.current_tenant.get()
        )
        return jobs_pb2.ListJobsResponse(jobs=jobs)

    @_rpc
    async def CancelJob(self, request, context):
        _require_id(request.job_id, "job_id", "job-")
        await self._owned_job(request.job_id)
        return await self._call(self.store.request_cancel, request.job_id)

    @_rpc
    async def StreamEvents(self, request, context):
        _require_id(request.job_id, "job_id", "job-")
        if request.cursor and not _CURSOR.fullmatch(request.cursor):
            raise _Invalid([("cursor", f"must be a cursor from an earlier event (like 1700000000000-0), got {request.cursor[:80]!r}")])
        job = await self._owned_job(request.job_id)
        key = store.events_key(request.job_id)
        last = request.cursor or "0-0"
        # Every move to a terminal state appends its status event in the same
        # script, and that event ends the loop below. So only a job still
        # active when the stream opens can have more to wait for; for one that
        # had ended, a read that does not block returns whatever is left.
        follow = not request.history_only and job.state not in store.TERMINAL
        while True:
            if self._shutting_down:
                # Notices are not stored, so this one carries the cursor of the
                # last event sent: resuming from it continues right after that.
                yield jobs_pb2.Event(
                    cursor="" if last == "0-0" else last, job_id=request.job_id, time=store.timestamp(time.time()),
                    notice=jobs_pb2.Notice(code="SERVER_SHUTTING_DOWN",
                                           message="this server is shutting down; reconnect with your last cursor"),
                )
                return
            # XREAD after an explicit id returns what is already there at once,
            # so one loop both replays the history and follows the live tail.
            replies = await self.aredis.xread({key: last}, count=500, block=_XREAD_BLOCK_MS if follow else None)
            if not replies:
                if not follow:
                    return
                continue
            for entry_id, fields in replies[0][1]:
                event = store.decode_event(entry_id, fields)
                yield event
                last = event.cursor
                if store.is_terminal(event):
                    return

    @_rpc
    async def UploadDataset(self, request_iterator, context):
        name, parts, size = "", [], 0
        first = True
        async for request in request_iterator:
            part = request.WhichOneof("part")
            if first:
                if part != "info":
                    raise _Invalid([("info", "must come first: send DatasetInfo before any chunk")])
                name = request.info.name
                if len(name) > 200:
                    raise _Invalid([("info.name", f"must be at most 200 characters, got {len(name)}")])
                first = False
                continue
            if part != "chunk":
                raise _Invalid([("chunk", "expected a chunk; DatasetInfo may only come first")])
            size += len(request.chunk)
            if size > self.max_dataset_bytes:
                raise _Invalid(
                    [("chunk", f"dataset exceeds this server's limit of {self.max_dataset_bytes} bytes; split it or ask for a larger --max-dataset-mb")]
                )
            parts.append(request.chunk)
        data = b"".join(parts)
        if not data:
            raise _Invalid([("chunk", "the dataset is empty: send at least one chunk of UTF-8 text")])
        try:
            return await self._store_dataset(data, name, auth.current_tenant.get())
        except UnicodeDecodeError as e:
            raise _Invalid([("chunk", f"must be UTF-8 text; byte {data[e.start]:#04x} at offset {e.start} is not")]) from e

    @_rpc
    async def DownloadCheckpoint(self, request, context):
        _require_id(request.job_id, "job_id", "job-")
        await self._owned_job(request.job_id)
        try:
            step, data = await self._call(self.store.get_checkpoint, request.job_id)
        except store.NotFound:
            await context.abort(
                grpc.StatusCode.NOT_FOUND,
                f"job {request.job_id} has no checkpoint yet; one is written every checkpoint_every steps and at the end",
            )
        for start in range(0, len(data), CHUNK_BYTES):
            yield jobs_pb2.CheckpointChunk(data=data[start : start + CHUNK_BYTES], step=step, total_bytes=len(data))

    @_rpc
    async def ListWorkers(self, request, context):
        return jobs_pb2.ListWorkersResponse(workers=await self._call(self.store.workers))

    @_rpc
    async def Generate(self, request, context):
        # The model runs on a generate worker, never here: this server has no
        # torch. The task carries a request id, and the worker pushes its reply
        # to a Redis list of that id, which this call waits on.
        _require_id(request.job_id, "job_id", "job-")
        problems = []
        if len(request.prefix) > MAX_PREFIX_CHARS:
            problems.append(("prefix", f"must be at most {MAX_PREFIX_CHARS} characters, got {len(request.prefix)}"))
        if not 1 <= request.num_tokens <= MAX_GENERATE_TOKENS:
            problems.append(("num_tokens", f"must be in [1, {MAX_GENERATE_TOKENS}], got {request.num_tokens}"))
        if not (math.isfinite(request.temperature) and 0 <= request.temperature <= MAX_TEMPERATURE):
            problems.append(("temperature", f"must be a finite number in [0, {MAX_TEMPERATURE:g}] (0 picks the "
                                            f"likeliest token), got {request.temperature}"))
        if problems:
            raise _Invalid(problems)
        job = await self._owned_job(request.job_id)
        if job.spec.dataset in specs.SYNTHETIC_TASKS:
            await context.abort(grpc.StatusCode.FAILED_PRECONDITION,
                                f"job {job.id} trains on {job.spec.dataset}, a synthetic task with no text to generate")
        if not job.checkpoint_step:
            await context.abort(
                grpc.StatusCode.NOT_FOUND,
                f"job {job.id} has no checkpoint yet; one is written every {job.spec.checkpoint_every} steps and "
                "at the end: try again after that",
            )
        workers = await self._call(self.store.workers)
        if not any(GENERATE_QUEUE in w.queues for w in workers):
            await context.abort(grpc.StatusCode.UNAVAILABLE,
                                f"no worker serves the {GENERATE_QUEUE} queue; start one: {GENERATE_WORKER_HINT}")
        wait_s = GENERATE_WAIT_S
        remaining = context.time_remaining()
        if remaining is not None:
            wait_s = max(_BLPOP_MIN_S, min(wait_s, remaining - _DEADLINE_MARGIN_S))
        request_id = secrets.token_hex(16)
        task = dict(request_id=request_id, job_id=job.id, prefix=request.prefix, num_tokens=request.num_tokens,
                    temperature=request.temperature, seed=request.seed)
        # `expires`: a request still queued when this call gives up is dropped, not computed for nobody.
        give_up_at = time.monotonic() + wait_s
        await self._call(self.celery.send_task, GENERATE_TASK, kwargs=task, queue=GENERATE_QUEUE, expires=wait_s)
        # Sending can take a while (a first connection to the broker); the caller's deadline still holds.
        reply = await self._wait_for_reply(request_id, give_up_at - time.monotonic())
        if reply is None:
            await context.abort(
                grpc.StatusCode.UNAVAILABLE,
                f"no generate worker answered within {wait_s:.0f} s: they may all be busy or stuck; check "
                f"`gradserve workers` for one on the {GENERATE_QUEUE} queue, or start another: {GENERATE_WORKER_HINT}",
            )
        if "error" in reply:
            error = reply["error"]
            await context.abort(_REPLY_CODES.get(error["code"], grpc.StatusCode.INTERNAL), error["message"])
        return jobs_pb2.GenerateResponse(text=reply["text"], step=reply["step"])

    async def _wait_for_reply(self, request_id: str, wait_s: float) -> dict | None:
        """The generate worker's reply to `request_id`, or None when none came within `wait_s`."""
        key = store.reply_key(request_id)
        deadline = time.monotonic() + wait_s
        while (left := deadline - time.monotonic()) > 0:
            popped = await self.aredis.blpop([key], timeout=max(_BLPOP_MIN_S, min(_BLPOP_MAX_S, left)))
            if popped:
                return json.loads(popped[1])
        return None


def create_server(redis_url: str, listen: str, *, tokens: dict[bytes, str] | None = None,
                  credentials: grpc.ServerCredentials | None = None,
                  **service_options) -> tuple[grpc.aio.Server, int, JobService, health.aio.HealthServicer]:
    """A ready-to-start server with the job service and the standard health service; returns the bound port too.

    With `tokens` (digest -> tenant, see `auth`), every call but health needs a
    bearer token. With `credentials`, the port speaks TLS.
    """
    interceptors = [auth.AuthInterceptor(auth.Authenticator(tokens))] if tokens else []
    server = grpc.aio.server(
        # Authentication comes first, so a stranger learns nothing, not even that a request was malformed.
        interceptors=interceptors + [StrictDecoding()],
        options=[
            ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
            ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
        ],
    )
    service = JobService(redis_url, **service_options)
    jobs_pb2_grpc.add_JobServiceServicer_to_server(service, server)
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    port = server.add_secure_port(listen, credentials) if credentials else server.add_insecure_port(listen)
    if port == 0:
        raise OSError(f"cannot listen on {listen}: the address is in use or not local")
    return server, port, service, health_servicer


def tls_credentials(cert_file: str, key_file: str, client_ca_file: str | None = None) -> grpc.ServerCredentials:
    """Server TLS from PEM files; with `client_ca_file`, clients must present a certificate it signed."""
    client_ca = Path(client_ca_file).read_bytes() if client_ca_file else None
    return grpc.ssl_server_credentials(
        [(Path(key_file).read_bytes(), Path(cert_file).read_bytes())],
        root_certificates=client_ca,
        require_client_auth=client_ca is not None,
    )


async def mark_serving(health_servicer, serving: bool) -> None:
    status = health_pb2.HealthCheckResponse.SERVING if serving else health_pb2.HealthCheckResponse.NOT_SERVING
    for name in ("", SERVICE_NAME):
        await health_servicer.set(name, status)
