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
import logging
import re

import grpc
import redis
import redis.asyncio as aioredis
from google.protobuf import any_pb2
from google.rpc import code_pb2, error_details_pb2, status_pb2
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from gradserve import spec as specs
from gradserve import text
from gradserve.v1 import jobs_pb2, jobs_pb2_grpc
from gradserve_server import corpus, store
from gradserve_server.queue import TRAIN_TASK, make_celery

log = logging.getLogger("gradserve.server")

SERVICE_NAME = jobs_pb2.DESCRIPTOR.services_by_name["JobService"].full_name
DEFAULT_MAX_DATASET_BYTES = 64 * 1024 * 1024
CHUNK_BYTES = 1024 * 1024
MAX_MESSAGE_BYTES = 4 * 1024 * 1024
LIST_LIMIT_DEFAULT, LIST_LIMIT_MAX = 50, 1000
_CURSOR = re.compile(r"\d{1,20}-\d{1,20}")
# A blocking XREAD must return well inside redis-py's 5 s socket timeout.
_XREAD_BLOCK_MS = 1000


class _Invalid(Exception):
    def __init__(self, violations: list[tuple[str, str]]):
        self.violations = violations


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
    if isinstance(exc, store.Refused):
        await context.abort(
            grpc.StatusCode.FAILED_PRECONDITION, f"{exc}: only QUEUED or RUNNING jobs can be cancelled"
        )
    if isinstance(exc, redis.ConnectionError | redis.TimeoutError):
        log.warning("redis unreachable: %s", exc)
        await context.abort(grpc.StatusCode.UNAVAILABLE, "the job store (Redis) is unreachable; retry shortly")


def _rpc(method):
    """Map the store's and the validator's exceptions to status codes, for unary and streaming methods alike."""
    if inspect.isasyncgenfunction(method):

        @functools.wraps(method)
        async def stream(self, request, context):
            try:
                async for item in method(self, request, context):
                    yield item
            except (_Invalid, store.NotFound, store.Refused, redis.ConnectionError, redis.TimeoutError) as e:
                await _abort_for(context, e)

        return stream

    @functools.wraps(method)
    async def unary(self, request, context):
        try:
            return await method(self, request, context)
        except (_Invalid, store.NotFound, store.Refused, redis.ConnectionError, redis.TimeoutError) as e:
            await _abort_for(context, e)

    return unary


def _require_id(value: str, field: str, prefix: str) -> None:
    if not value:
        raise _Invalid([(field, f"is required: a {prefix}... id")])
    if not value.startswith(prefix) or len(value) > 200:
        raise _Invalid([(field, f"must be a {prefix}... id, got {value[:80]!r}")])


class JobService(jobs_pb2_grpc.JobServiceServicer):
    def __init__(self, redis_url: str, *, max_dataset_bytes: int = DEFAULT_MAX_DATASET_BYTES):
        self.store = store.JobStore.from_url(redis_url)
        self.aredis = aioredis.Redis.from_url(redis_url)
        self.celery = make_celery(redis_url)
        self.max_dataset_bytes = max_dataset_bytes
        self._builtin_lock = asyncio.Lock()

    async def close(self) -> None:
        await self.aredis.aclose()
        self.store.r.close()

    # ------------------------------------------------------------ helpers

    async def _call(self, fn, *args, **kwargs):
        return await asyncio.to_thread(fn, *args, **kwargs)

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

    async def _store_dataset(self, data: bytes, name: str) -> jobs_pb2.Dataset:
        decoded = data.decode("utf-8")
        counts = await asyncio.to_thread(text.token_counts, decoded)
        return await self._call(self.store.put_dataset, data, name, len(decoded), counts)

    async def _queue_for(self, device: str) -> str:
        if device == "cpu":
            return "cpu"
        if device == "cuda":
            return "gpu"
        workers = await self._call(self.store.workers)
        return "gpu" if any("gpu" in w.queues for w in workers) else "cpu"

    # --------------------------------------------------------------- RPCs

    @_rpc
    async def SubmitJob(self, request, context):
        spec = specs.complete(request.spec)
        problems = specs.violations(spec)
        if problems:
            raise _Invalid([(f"spec.{f}", d) for f, d in problems])
        dataset_id = spec.dataset
        if spec.dataset in corpus.BUILTINS:
            dataset_id = await self.builtin_dataset(spec.dataset)
        try:
            tokens = await self._call(self.store.dataset_tokens, dataset_id, spec.tokenization, spec.preprocess)
        except store.NotFound:
            await context.abort(
                grpc.StatusCode.NOT_FOUND,
                f"dataset {spec.dataset} not found; upload it first (Client.upload_text or `gradserve upload`)",
            )
        need = specs.min_tokens(spec.batch_size, spec.num_steps)
        if tokens < need:
            raise _Invalid(
                [
                    (
                        "spec.dataset",
                        f"has {tokens} {spec.tokenization} tokens (preprocess {spec.preprocess}), but batch_size "
                        f"{spec.batch_size} and num_steps {spec.num_steps} need at least {need}; lower "
                        "batch_size or num_steps, or upload more text",
                    )
                ]
            )
        queue = await self._queue_for(spec.device)
        job_id = store.new_job_id()
        job = await self._call(self.store.create_job, job_id, spec, queue)
        await self._call(self.celery.send_task, TRAIN_TASK, args=[job_id], queue=queue)
        log.info("job %s queued on %s: %s %s", job_id, queue, spec.model, spec.dataset)
        return job

    @_rpc
    async def GetJob(self, request, context):
        _require_id(request.job_id, "job_id", "job-")
        return await self._call(self.store.get_job, request.job_id)

    @_rpc
    async def ListJobs(self, request, context):
        problems = []
        if request.limit > LIST_LIMIT_MAX:
            problems.append(("limit", f"must be in [0, {LIST_LIMIT_MAX}] (0 means {LIST_LIMIT_DEFAULT}), got {request.limit}"))
        if request.state not in jobs_pb2.JobState.values():
            problems.append(("state", f"must be a JobState, got {request.state}"))
        if problems:
            raise _Invalid(problems)
        jobs = await self._call(self.store.list_jobs, request.limit or LIST_LIMIT_DEFAULT, request.state)
        return jobs_pb2.ListJobsResponse(jobs=jobs)

    @_rpc
    async def CancelJob(self, request, context):
        _require_id(request.job_id, "job_id", "job-")
        return await self._call(self.store.request_cancel, request.job_id)

    @_rpc
    async def StreamEvents(self, request, context):
        _require_id(request.job_id, "job_id", "job-")
        if request.cursor and not _CURSOR.fullmatch(request.cursor):
            raise _Invalid([("cursor", f"must be a cursor from an earlier event (like 1700000000000-0), got {request.cursor[:80]!r}")])
        await self._call(self.store.get_job, request.job_id)
        key = store.events_key(request.job_id)
        last = request.cursor or "0-0"
        while True:
            # XREAD after an explicit id returns what is already there at once,
            # so one loop both replays the history and follows the live tail.
            replies = await self.aredis.xread({key: last}, count=500, block=_XREAD_BLOCK_MS)
            if not replies:
                job = await self._call(self.store.get_job, request.job_id)
                if job.state in store.TERMINAL and not await self.aredis.xread({key: last}, count=1):
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
            return await self._store_dataset(data, name)
        except UnicodeDecodeError as e:
            raise _Invalid([("chunk", f"must be UTF-8 text; byte {data[e.start]:#04x} at offset {e.start} is not")]) from e

    @_rpc
    async def DownloadCheckpoint(self, request, context):
        _require_id(request.job_id, "job_id", "job-")
        await self._call(self.store.get_job, request.job_id)
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


def create_server(redis_url: str, listen: str, **service_options) -> tuple[grpc.aio.Server, int, JobService, health.aio.HealthServicer]:
    """A ready-to-start server with the job service and the standard health service; returns the bound port too."""
    server = grpc.aio.server(
        options=[
            ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
            ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
        ]
    )
    service = JobService(redis_url, **service_options)
    jobs_pb2_grpc.add_JobServiceServicer_to_server(service, server)
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    port = server.add_insecure_port(listen)
    if port == 0:
        raise OSError(f"cannot listen on {listen}: the address is in use or not local")
    return server, port, service, health_servicer


async def mark_serving(health_servicer, serving: bool) -> None:
    status = health_pb2.HealthCheckResponse.SERVING if serving else health_pb2.HealthCheckResponse.NOT_SERVING
    for name in ("", SERVICE_NAME):
        await health_servicer.set(name, status)
