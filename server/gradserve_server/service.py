"""The JobService servicer and the `create_server` factory.

Every RPC validates its request before touching Redis. A call that fails
raises one of `errors`' exceptions, with the message its caller reads, and
`errors.rpc` turns it into the gRPC status that means what gRPC says it means;
invalid fields also carry a ``google.rpc.BadRequest`` with one violation per
field, so clients can point at the field without parsing the message.
"""

from __future__ import annotations

import asyncio
import codecs
import logging
import math
import mmap
import re
import secrets
import time
from pathlib import Path

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from gradserve import labels, sweeps, text
from gradserve import spec as specs
from gradserve.v1 import jobs_pb2, jobs_pb2_grpc
from gradserve_server import auth, corpus, errors
from gradserve_store import store
from gradserve_server.decoding import StrictDecoding
from gradserve_store.queue import (CPU_QUEUE, GENERATE_QUEUE, GENERATE_TASK, GPU_QUEUE, dispatch, dispatch_group,
                                   make_celery)
from gradserve_server.relay import DEFAULT_MAX_WATCHERS, DEFAULT_QUEUE_EVENTS, Relay
from gradserve_store.settings import Shared

log = logging.getLogger("gradserve.server")

SERVICE_NAME = jobs_pb2.DESCRIPTOR.services_by_name["JobService"].full_name
DEFAULT_MAX_DATASET_BYTES = 64 * 1024 * 1024
# Uploads received at once; each holds its bytes and a few tens of MiB more (see _receive_dataset), so this
# caps their memory.
DEFAULT_MAX_UPLOADS = 2
# How long an upload past that cap waits for a slot (less when the caller's deadline is nearer) before
# RESOURCE_EXHAUSTED.
UPLOAD_WAIT_S = 10.0
# What a busy refusal tells the client to wait before it sends the upload again.
UPLOAD_RETRY_AFTER_S = 1.0
CHUNK_BYTES = 1024 * 1024
MAX_MESSAGE_BYTES = 4 * 1024 * 1024
LIST_LIMIT_DEFAULT, LIST_LIMIT_MAX = 50, 1000
# StreamLogs reads a job's log this many lines at a time, and a follower's looks for new ones this often:
# logs are few and seldom followed, so polling holds no Redis connection.
LOG_BATCH = 500
LOG_POLL_S = 0.5
_CURSOR = re.compile(r"\d{1,20}-\d{1,20}")
# How long Generate waits for a generate worker's reply (less when the
# caller's deadline is nearer), and what it keeps of that deadline for the answer.
GENERATE_WAIT_S = 120.0
_DEADLINE_MARGIN_S = 0.5
# The shortest wait Generate asks for, even past the caller's deadline: one round trip.
_GENERATE_MIN_WAIT_S = 0.05
GENERATE_WORKER_HINT = "gradserve-worker --redis-url URL --queues generate (`gradserve-server dev` starts one)"


def _some(ids: list[str]) -> str:
    """The first few of `ids` for a message, "..." standing for the rest."""
    return ", ".join(ids[:5]) + (", ..." if len(ids) > 5 else "")


# Stream ids are two unsigned 64-bit integers, milliseconds and a sequence number.
_CURSOR_PART_MAX = 2**64 - 1


def _parse_cursor(cursor: str) -> tuple[int, int]:
    """A cursor as (milliseconds, sequence), refusing anything that is not a Redis stream id."""
    if _CURSOR.fullmatch(cursor):
        parts = store.cursor_position(cursor)
        if max(parts) <= _CURSOR_PART_MAX:
            return parts
    raise errors.Invalid([("cursor", f"must be a cursor from an earlier event (like 1700000000000-0: two whole numbers "
                               f"up to {_CURSOR_PART_MAX}), got {cursor[:80]!r}")])


def _budget(queue: str, workers: list[jobs_pb2.Worker]) -> int:
    """The smallest memory budget among the live workers of `queue`; the default with none alive."""
    budgets = [w.memory_budget_bytes for w in workers if queue in w.queues and w.memory_budget_bytes]
    return min(budgets, default=specs.DEFAULT_MEMORY_BUDGET_BYTES)


def _require_id(value: str, field: str, prefix: str) -> None:
    if not value:
        raise errors.Invalid([(field, f"is required: a {prefix}... id")])
    if not value.startswith(prefix) or len(value) > 200:
        raise errors.Invalid([(field, f"must be a {prefix}... id, got {value[:80]!r}")])


def _job_query(request: jobs_pb2.ListJobsRequest) -> store.JobQuery:
    """The store's query for a ListJobs request, refusing every field out of range."""
    problems = []
    if request.limit > LIST_LIMIT_MAX:
        problems.append(("limit", f"must be in [0, {LIST_LIMIT_MAX}] (0 means {LIST_LIMIT_DEFAULT}), got {request.limit}"))
    if request.state not in jobs_pb2.JobState.values():
        problems.append(("state", f"must be a JobState, got {request.state}"))
    problems += labels.name_violations(request.name_contains, "name_contains")
    problems += labels.tag_violations(request.tags)
    if request.model and request.model not in specs.MODELS:
        problems.append(("model", f"must be one of {', '.join(specs.MODELS)}, got {request.model[:80]!r}"))
    for name in ("dataset", "sweep"):
        if len(getattr(request, name)) > 200:
            problems.append((name, f"must be at most 200 characters, got {len(getattr(request, name))}"))
    order_by = request.order_by or "created"
    if order_by not in store.SORT_FIELDS:
        problems.append(("order_by", f"must be one of {', '.join(store.SORT_FIELDS)}, got {request.order_by[:80]!r}"))
    times = {}
    for name in ("created_after", "created_before"):
        if request.HasField(name):
            ts = getattr(request, name)
            if not 0 <= ts.seconds <= 253402300799 or not 0 <= ts.nanos < 10**9:
                problems.append((name, f"must be a time between 1970 and 9999, got {ts.seconds} s {ts.nanos} ns"))
            else:
                times[name] = ts.seconds + ts.nanos / 1e9
    if len(request.page_token) > 1000:
        problems.append(("page_token", f"must be a next_page_token (at most 1000 characters), got {len(request.page_token)}"))
    if problems:
        raise errors.Invalid(problems)
    return store.JobQuery(limit=request.limit or LIST_LIMIT_DEFAULT, state=request.state,
                          name_contains=request.name_contains, tags=dict(request.tags), model=request.model,
                          dataset=request.dataset, order_by=order_by, reverse=request.reverse,
                          page_token=request.page_token, sweep=request.sweep, **times)


def _checkpoint_choice(value: str, field: str) -> str:
    """A checkpoint selector as the store takes it: "latest" (also for ""), "best", or a step's digits."""
    if value in ("", "latest"):
        return "latest"
    if value == "best" or (value.isdigit() and len(value) <= 20 and value.isascii()):
        return value if value == "best" else str(int(value))
    raise errors.Invalid([(field, f"must be latest, best or the step of one of those two checkpoints, got "
                                  f"{value[:80]!r}")])


def _checkpoint_missing(job: jobs_pb2.Job, which: str) -> str:
    """What to say when the job has no checkpoint `which`."""
    if not job.checkpoint_step:
        return (f"job {job.id} has no checkpoint yet; one is written every {job.spec.checkpoint_every} steps and at "
                "the end")
    kept = f"latest at step {job.checkpoint_step}" + (
        f", best at step {job.best_checkpoint_step}" if job.best_checkpoint_step else ", no best yet (one is kept at "
        "each evaluation that improves the held-out loss)")
    named = f"{which} checkpoint" if which in ("latest", "best") else f"checkpoint at step {which}"
    return f"job {job.id} has no {named}; it keeps two: {kept}"


# How to start a worker for each queue, as the hint in a waiting job's record says it.
WORKER_HINTS = {
    "cpu": "gradserve-worker --redis-url URL --queues cpu",
    "gpu": "gradserve-worker --redis-url URL --queues gpu, on a machine with a CUDA GPU",
}


def waiting_reason(queue: str, workers: list[jobs_pb2.Worker]) -> str:
    """Why a job QUEUED on `queue` is not running, given the live workers; "" when a worker is free for it."""
    serving = [w for w in workers if queue in w.queues]
    hint = WORKER_HINTS.get(queue, f"gradserve-worker --redis-url URL --queues {queue}")
    if not serving:
        return (f"no live worker serves the {queue} queue, so the job waits until one does; start one: {hint}"
                + ("" if queue == "cpu" else ", or submit with --device cpu"))
    if all(len(w.job_ids) >= max(w.concurrency, 1) for w in serving):
        busy = f"all {len(serving)} workers of the {queue} queue are" if len(serving) > 1 else (
            f"the one worker of the {queue} queue is")
        return f"{busy} busy; the job starts when one is free, or add one: {hint}"
    return ""


class JobService(jobs_pb2_grpc.JobServiceServicer):
    """Jobs, datasets and checkpoints, each visible only to the tenant that made it (see `auth`).

    `quota_queued` and `quota_running` cap a tenant's QUEUED and RUNNING jobs
    at submission; 0 means no cap.
    """

    def __init__(self, redis_url: str, *, shared: Shared = Shared(), max_dataset_bytes: int = DEFAULT_MAX_DATASET_BYTES,
                 quota_queued: int = 0, quota_running: int = 0, max_uploads: int = DEFAULT_MAX_UPLOADS,
                 watcher_queue_events: int = DEFAULT_QUEUE_EVENTS, max_watchers: int = DEFAULT_MAX_WATCHERS):
        self.store = store.JobStore.from_url(redis_url)
        # Streams and Generate's waits use connections of their own, so that neither can starve the other.
        self.relay = Relay(store.AsyncJobStore.from_url(redis_url), queue_events=watcher_queue_events,
                           max_watchers=max_watchers)
        self.replies = store.AsyncJobStore.from_url(redis_url)
        self.celery = make_celery(redis_url, shared.visibility_timeout_s)
        self.max_dataset_bytes = max_dataset_bytes
        self.quota_queued, self.quota_running = quota_queued, quota_running
        if max_uploads < 1:
            raise ValueError(f"max_uploads must be at least 1, got {max_uploads}")
        self.max_uploads = max_uploads
        self._upload_slots = asyncio.Semaphore(max_uploads)
        self._builtin_lock = asyncio.Lock()

    async def close(self) -> None:
        await self.relay.aclose()
        await self.replies.close()
        self.store.close()

    def end_streams(self) -> None:
        """The server is going away: every open StreamEvents ends at once with a SERVER_SHUTTING_DOWN notice."""
        self.relay.close()

    # ------------------------------------------------------------ helpers

    async def _call(self, fn, *args, **kwargs):
        return await asyncio.to_thread(fn, *args, **kwargs)

    async def _owned_job(self, job_id: str) -> jobs_pb2.Job:
        """The job, if the calling tenant owns it. Another tenant's job is NotFound, exactly like a missing one."""
        job = await self._call(self.store.get_job, job_id)
        if job.tenant != auth.current_tenant.get():
            raise store.NotFound(job_id)
        return job

    async def _check_quota(self, adding: int = 1) -> None:
        """Refuse `adding` more jobs when the tenant's queued (or running) jobs would pass their quota."""
        tenant = auth.current_tenant.get()
        queued, running = await self._call(self.store.active_counts, tenant)
        who = f"tenant {tenant!r}" if tenant else "this server"
        # The new jobs wait as queued ones: they count against that quota alone.
        for name, count, new, limit in (("queued", queued, adding, self.quota_queued),
                                        ("running", running, 1, self.quota_running)):
            if limit and count + new > limit:
                more = f"; a sweep of {adding} members needs room for all of them" if adding > 1 else ""
                raise errors.Exhausted(
                    f"quota exceeded: {who} has {count} {name} jobs and the {name}-jobs quota is {limit}{more}; "
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

    async def _store_dataset(self, data: bytes | memoryview, name: str, tenant: str = "",
                             stats: dict[str, int] | None = None) -> jobs_pb2.Dataset:
        """Store UTF-8 `data`, with its `text.text_stats` (computed here unless given)."""
        if stats is None:
            stats = await asyncio.to_thread(text.text_stats, data.decode("utf-8"))
        return await self._call(self.store.put_dataset, data, name, stats[text.stat_key("tokens", "char", "none")], stats, tenant)

    async def _take_upload_slot(self, context) -> None:
        """Wait (briefly) until fewer than max_uploads uploads are being received; else refuse as busy."""
        slots = self._upload_slots
        if not slots.locked():
            await slots.acquire()
            return
        wait_s = UPLOAD_WAIT_S
        remaining = context.time_remaining()
        if remaining is not None:
            wait_s = min(wait_s, remaining - _DEADLINE_MARGIN_S)
        try:
            if wait_s <= 0:
                raise TimeoutError
            await asyncio.wait_for(slots.acquire(), wait_s)
        except TimeoutError:
            raise errors.Exhausted(
                f"server busy: {self.max_uploads} uploads already in progress (--max-uploads {self.max_uploads}); "
                "retry shortly",
                retry_after_s=UPLOAD_RETRY_AFTER_S,
            ) from None

    @staticmethod
    def _count_text(stats: text.TextStats, decoder, chunk: bytes, offset: int, final: bool = False) -> None:
        """Decode the next `chunk` of an upload (its bytes from `offset` on) and add it to `stats`."""
        held = len(decoder.getstate()[0])  # the end of the previous chunk, when it cut a character
        try:
            stats.add(decoder.decode(chunk, final))
        except UnicodeDecodeError as e:
            # e.object is the held bytes and then this chunk: offsets count over the whole upload.
            raise errors.Invalid([("chunk", f"must be UTF-8 text; byte {e.object[e.start]:#04x} at offset "
                                      f"{offset - held + e.start} is not")]) from e

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
            raise errors.NotFound(
                f"dataset {spec.dataset} not found; upload it first (Client.upload_text or `gradserve upload`)"
            ) from None
        problems = specs.text_violations(spec, tokens)
        if problems:
            raise errors.Invalid([(f"spec.{f}", d) for f, d in problems])
        return tokens, vocab_size

    @staticmethod
    def _check_memory(spec: jobs_pb2.JobSpec, vocab_size: int, steps_per_sequence: int, queue: str,
                      workers: list[jobs_pb2.Worker]) -> int:
        """Refuse a job that would not fit the smallest budget among the live workers of its queue; its estimate.

        Any of them may take it. With none alive, the default budget stands in.
        """
        window = specs.backprop_window(spec, steps_per_sequence)
        estimate = specs.memory_estimate_bytes(spec, vocab_size, window)
        budget = _budget(queue, workers)
        if estimate <= budget:
            return estimate
        mib = 2**20
        field = "spec.truncation" if spec.truncation == "full" else "spec"
        hint = "use truncation fixed, or a shorter text" if spec.truncation == "full" else (
            "lower hidden_size, batch_size or num_steps"
        )
        raise errors.Invalid(
            [
                (
                    field,
                    f"needs an estimated {estimate / mib:,.0f} MiB (the training process itself, weights, gradients, "
                    f"optimizer state and activations over a {window}-step backward window), over the {queue} "
                    f"workers' budget of {budget / mib:,.0f} MiB; {hint}",
                )
            ]
        )

    async def _admit(self, spec: jobs_pb2.JobSpec, context, workers: list[jobs_pb2.Worker]) -> tuple[str, int]:
        """The queue for a valid, complete spec and its memory estimate, once its text is long enough and it fits
        the workers' memory."""
        if spec.dataset in specs.SYNTHETIC_TASKS:
            vocab_size, steps_per_sequence = specs.TASKS[spec.dataset].symbols, specs.sequence_length(spec)
        else:
            tokens, vocab_size = await self._text_tokens(spec, context)
            steps_per_sequence = tokens // spec.batch_size
        queue = self._queue_for(spec.device, workers)
        return queue, self._check_memory(spec, vocab_size, steps_per_sequence, queue, workers)

    async def _explain_waits(self, jobs: list[jobs_pb2.Job], workers: list[jobs_pb2.Worker] | None = None) -> None:
        """Say in each QUEUED job's `waiting` why it is not running yet; reads the workers only when one is queued."""
        queued = [j for j in jobs if j.state == jobs_pb2.QUEUED]
        if not queued:
            return
        if workers is None:
            workers = await self._call(self.store.workers)
        for job in queued:
            job.waiting = waiting_reason(job.queue, workers)

    async def _init_from(self, asked: jobs_pb2.InitFrom, spec: jobs_pb2.JobSpec) -> tuple[jobs_pb2.InitFrom, bytes]:
        """The checkpoint a new job starts from, with its step filled in; refuses a source it cannot start from."""
        _require_id(asked.job_id, "init_from.job_id", "job-")
        which = _checkpoint_choice(asked.checkpoint, "init_from.checkpoint")
        try:
            source = await self._owned_job(asked.job_id)
        except store.NotFound:
            raise errors.NotFound(f"init_from: job {asked.job_id} not found") from None
        problems = [(f"spec.{name}",
                     f"must be {getattr(source.spec, name)!r} as in job {source.id}, which it starts from; got "
                     f"{getattr(spec, name)!r}")
                    for name in specs.init_must_match(spec, optimizer=asked.optimizer, state=asked.state)
                    if getattr(spec, name) != getattr(source.spec, name)]
        if asked.state and (spec.partition != "sequential" or spec.dataset in specs.SYNTHETIC_TASKS):
            problems.append(("init_from.state", "carries a hidden state over, which only a text job with partition "
                                                "sequential keeps: leave it false, or use partition sequential"))
        if problems:
            raise errors.Invalid(problems)
        try:
            step, data = await self._call(self.store.get_checkpoint, source.id, which)
        except store.NotFound:
            raise errors.Precondition("init_from: " + _checkpoint_missing(source, which)) from None
        init = jobs_pb2.InitFrom()
        init.CopyFrom(asked)
        init.checkpoint, init.step = which, step
        return init, data

    @staticmethod
    def _queue_for(device: str, workers: list[jobs_pb2.Worker]) -> str:
        if device == "cpu":
            return CPU_QUEUE
        if device == "cuda":
            return GPU_QUEUE
        return GPU_QUEUE if any(GPU_QUEUE in w.queues for w in workers) else CPU_QUEUE

    # --------------------------------------------------------------- RPCs

    @errors.rpc
    async def SubmitJob(self, request, context):
        spec = specs.complete(request.spec)
        problems = [(f"spec.{f}", d) for f, d in specs.violations(spec)]
        problems += labels.violations(request.name, request.tags, request.note)
        if problems:
            raise errors.Invalid(problems)
        # One look at the live workers serves both the routing and the memory budget.
        workers = await self._call(self.store.workers)
        queue, _ = await self._admit(spec, context, workers)
        await self._check_quota()
        init = await self._init_from(request.init_from, spec) if request.HasField("init_from") else None
        job_id = store.new_job_id()
        job = await self._call(self.store.create_job, job_id, spec, queue, auth.current_tenant.get(),
                               store.Labels(request.name, dict(request.tags), request.note), init)
        await self._call(dispatch, self.celery, self.store, job_id, job.attempt, queue)
        log.info("job %s queued on %s: %s %s", job_id, queue, spec.model, spec.dataset)
        await self._explain_waits([job], workers)
        return job

    @errors.rpc
    async def SubmitSweep(self, request, context):
        sweep_spec = request.spec
        problems = sweeps.violations(sweep_spec)
        problems += labels.violations(request.name, request.tags, request.note)
        if problems:
            raise errors.Invalid(problems)
        workers = await self._call(self.store.workers)
        sweep_id, members, estimates = store.new_sweep_id(), [], []
        for i, values in enumerate(sweeps.members(sweep_spec)):
            spec = sweeps.member_spec(sweep_spec.base, values)
            try:
                queue, estimate = await self._admit(spec, context, workers)
            except errors.Invalid as e:
                # The member's own values say which one it is.
                shown = " ".join(f"{k}={v}" for k, v in values.items())
                raise errors.Invalid([(f"members[{i}] ({shown}): {f}", d) for f, d in e.violations]) from None
            member_labels = store.Labels(sweeps.member_name(request.name, values), dict(request.tags), "", sweep_id)
            members.append((store.new_job_id(), spec, queue, member_labels, values))
            estimates.append(estimate)
        await self._check_quota(len(members))
        sweep = await self._call(self.store.create_sweep, sweep_id, sweep_spec, auth.current_tenant.get(),
                                 store.Labels(request.name, dict(request.tags), request.note), members)
        # Members that share shapes and data train as one batched model, in as many parts as fit the memory of the
        # queue's workers and spread over their slots; the rest alone, side by side.
        queues = {m[2] for m in members}
        slots = sum(w.concurrency or 1 for w in workers if queues & set(w.queues))
        parts = sweeps.groups([m[1] for m in members], member_bytes=estimates,
                              budget=min(_budget(q, workers) for q in queues), slots=slots,
                              on_cpu=queues == {CPU_QUEUE})
        for part in parts:
            ids = [members[i][0] for i in part]
            if len(ids) == 1:
                await self._call(dispatch, self.celery, self.store, ids[0], 1, members[part[0]][2])
            else:
                await self._call(dispatch_group, self.celery, self.store, ids, members[part[0]][2])
        log.info("sweep %s queued: %d members in %d tasks", sweep_id, len(members), len(parts))
        await self._explain_waits([m.job for m in sweep.members], workers)
        return sweep

    @errors.rpc
    async def GetSweep(self, request, context):
        _require_id(request.sweep_id, "sweep_id", "sweep-")
        return await self._owned_sweep(request.sweep_id)

    @errors.rpc
    async def ListSweeps(self, request, context):
        if request.limit > LIST_LIMIT_MAX:
            raise errors.Invalid([("limit", f"must be in [0, {LIST_LIMIT_MAX}] (0 for 50), got {request.limit}")])
        try:
            found, token = await self._call(self.store.list_sweeps, auth.current_tenant.get(), request.limit or 50,
                                            request.page_token)
        except ValueError as e:
            raise errors.Invalid([("page_token", str(e))]) from None
        return jobs_pb2.ListSweepsResponse(sweeps=found, next_page_token=token)

    @errors.rpc
    async def CancelSweep(self, request, context):
        _require_id(request.sweep_id, "sweep_id", "sweep-")
        sweep = await self._owned_sweep(request.sweep_id)
        for member in sweep.members:
            if member.job.state in (jobs_pb2.QUEUED, jobs_pb2.RUNNING):
                try:
                    await self._call(self.store.request_cancel, member.job_id)
                except store.Refused:
                    pass  # it ended on its own meanwhile
        return await self._owned_sweep(request.sweep_id)

    @errors.rpc
    async def DeleteSweep(self, request, context):
        _require_id(request.sweep_id, "sweep_id", "sweep-")
        sweep = await self._owned_sweep(request.sweep_id)
        active = [m.job_id for m in sweep.members if m.job.state not in store.TERMINAL]
        if active:
            raise errors.Precondition(
                f"sweep {sweep.id} has {len(active)} member(s) QUEUED or RUNNING ({_some(active)}): only a sweep "
                f"whose members have all ended can be deleted; cancel it first (`gradserve cancel {sweep.id}`)")
        # A job that has ended stays ended, so no member can refuse now.
        try:
            await self._call(self.store.delete_sweep, sweep.id)
        except store.NotFound:
            pass  # deleted meanwhile, with its last member
        return sweep

    async def _owned_sweep(self, sweep_id: str) -> jobs_pb2.Sweep:
        try:
            sweep = await self._call(self.store.get_sweep, sweep_id, auth.current_tenant.get())
        except store.NotFound:
            raise errors.NotFound(f"sweep {sweep_id} not found{errors.listed_by(sweep_id)}") from None
        await self._explain_waits([m.job for m in sweep.members])
        return sweep

    @errors.rpc
    async def GetJob(self, request, context):
        _require_id(request.job_id, "job_id", "job-")
        job = await self._owned_job(request.job_id)
        await self._explain_waits([job])
        return job

    @errors.rpc
    async def ListJobs(self, request, context):
        query = _job_query(request)
        try:
            jobs, next_token = await self._call(self.store.list_jobs, query, auth.current_tenant.get())
        except ValueError as e:
            raise errors.Invalid([("page_token", str(e))]) from None
        await self._explain_waits(jobs)
        return jobs_pb2.ListJobsResponse(jobs=jobs, next_page_token=next_token)

    @errors.rpc
    async def CancelJob(self, request, context):
        _require_id(request.job_id, "job_id", "job-")
        await self._owned_job(request.job_id)
        try:
            return await self._call(self.store.request_cancel, request.job_id)
        except store.Refused as e:
            raise errors.Precondition(f"{e}: only QUEUED or RUNNING jobs can be cancelled") from None

    @errors.rpc
    async def DeleteJob(self, request, context):
        _require_id(request.job_id, "job_id", "job-")
        await self._owned_job(request.job_id)
        try:
            return await self._call(self.store.delete_job, request.job_id)
        except store.Refused as e:
            raise errors.Precondition(f"{e}: only a job that has ended can be deleted; cancel it first "
                                      f"(`gradserve cancel {request.job_id}`)") from None

    @errors.rpc
    async def StreamEvents(self, request, context):
        # Each event's bytes, encoded once by the relay (see ENCODED).
        async for batch in self._follow(request):
            for item in batch:
                yield item.wire

    @errors.rpc
    async def StreamEventBatches(self, request, context):
        async for batch in self._follow(request):
            yield store.batch_wire(batch)

    async def _follow(self, request):
        _require_id(request.job_id, "job_id", "job-")
        after = _parse_cursor(request.cursor) if request.cursor else (0, 0)
        job = await self._owned_job(request.job_id)
        last = request.cursor or "0-0"
        # A cursor past the newest event came from no event of this job, or
        # from events a Redis restarted from its AOF lost. For a job that has
        # ended, or a cursor from the future, nothing will ever come after it:
        # waiting would last until the deadline, or for ever. (A running job's
        # new events do pass a lost tail's cursor, so that watcher may follow.)
        newest = await self.relay.newest(request.job_id)
        if after > store.cursor_position(newest) and (
                job.state in store.TERMINAL or after[0] > await self._call(self.store.now_ms)):
            raise errors.Invalid([("cursor", f"is past the last event of job {request.job_id}: got {request.cursor}, and "
                                       f"its last event's cursor is {newest}; resume from the cursor of an event "
                                       "you received, or give none to replay the whole history")])
        # Every move to a terminal state appends its status event in the same
        # script, and that event ends the stream. So only a job still active
        # when the stream opens can have more to wait for; for one that had
        # ended, the stored history is all there is.
        live = not request.history_only and job.state not in store.TERMINAL
        async for batch in self.relay.follow(request.job_id, last, live=live):
            yield batch

    # The dashboard's event streams (web.Dashboard.events) are the same streams.
    follow = _follow

    @errors.rpc
    async def StreamLogs(self, request, context):
        _require_id(request.job_id, "job_id", "job-")
        cursor = request.cursor
        if cursor:
            _parse_cursor(cursor)
        await self._owned_job(request.job_id)
        while True:
            lines = await self._call(self.store.logs_after, request.job_id, cursor, LOG_BATCH)
            for line in lines:
                yield line
            if lines:
                cursor = lines[-1].cursor
                if len(lines) == LOG_BATCH:
                    continue
            if not request.follow:
                return
            # A job that has ended logs no more, once what it logged before has been sent.
            ended = (await self._owned_job(request.job_id)).state in store.TERMINAL
            if ended and not await self._call(self.store.logs_after, request.job_id, cursor, 1):
                return
            await asyncio.sleep(LOG_POLL_S)

    @errors.rpc
    async def ListDatasets(self, request, context):
        datasets = await self._call(self.store.list_datasets, auth.current_tenant.get())
        return jobs_pb2.ListDatasetsResponse(datasets=datasets)

    @errors.rpc
    async def DeleteDataset(self, request, context):
        _require_id(request.dataset_id, "dataset_id", "ds-")
        tenant = auth.current_tenant.get()
        if not await self._call(self.store.owns_dataset, tenant, request.dataset_id):
            raise errors.NotFound(f"dataset {request.dataset_id} not found{errors.listed_by(request.dataset_id)}")
        for name in corpus.BUILTINS:
            if await self._call(self.store.builtin_dataset_id, name) == request.dataset_id:
                raise errors.Precondition(f"dataset {request.dataset_id} is the built-in corpus {name}, which "
                                          "every tenant may use; it cannot be deleted")
        users = await self._call(self.store.datasets_in_use, tenant, request.dataset_id)
        if users:
            raise errors.Precondition(
                f"dataset {request.dataset_id} is in use by {len(users)} QUEUED or RUNNING job(s): "
                f"{_some(users)}; wait for them to end, or cancel them (`gradserve cancel JOB`)")
        try:
            return await self._call(self.store.delete_dataset, tenant, request.dataset_id)
        except store.NotFound:  # deleted by a call racing this one
            raise errors.NotFound(f"dataset {request.dataset_id} not found{errors.listed_by(request.dataset_id)}") from None

    @errors.rpc
    async def UploadDataset(self, request_iterator, context):
        # A slot first, before reading a byte: until then gRPC's flow control keeps the upload in the client.
        await self._take_upload_slot(context)
        try:
            return await self._receive_dataset(request_iterator)
        finally:
            self._upload_slots.release()

    async def _receive_dataset(self, request_iterator) -> jobs_pb2.Dataset:
        """Receive, check and store one upload, holding its bytes once and little else.

        The chunks are written one after the other into an anonymous memory map as large as the
        biggest dataset allowed: only the pages written become resident, and closing it gives them
        straight back to the system, whatever the allocator holds on to. The store takes a view of
        it (any bytes-like value does), so the text is never copied whole. Each chunk is decoded and
        counted (text.TextStats) as it arrives, so neither the decoded text nor its words are ever
        held whole either.
        """
        buffer = mmap.mmap(-1, max(self.max_dataset_bytes, 1))
        try:
            return await self._receive_into(buffer, request_iterator)
        finally:
            try:
                buffer.close()
            except BufferError:  # a view outlived the call (an exception's traceback): the GC unmaps it
                pass

    async def _receive_into(self, buffer: mmap.mmap, request_iterator) -> jobs_pb2.Dataset:
        name, size = "", 0
        stats, decoder = text.TextStats(), codecs.getincrementaldecoder("utf-8")()
        first = True
        async for request in request_iterator:
            part = request.WhichOneof("part")
            if first:
                if part != "info":
                    raise errors.Invalid([("info", "must come first: send DatasetInfo before any chunk")])
                name = request.info.name
                if len(name) > 200:
                    raise errors.Invalid([("info.name", f"must be at most 200 characters, got {len(name)}")])
                first = False
                continue
            if part != "chunk":
                raise errors.Invalid([("chunk", "expected a chunk; DatasetInfo may only come first")])
            chunk = request.chunk
            del request  # the message holds the chunk's bytes too
            size += len(chunk)
            if size > self.max_dataset_bytes:
                raise errors.Invalid(
                    [("chunk", f"dataset exceeds this server's limit of {self.max_dataset_bytes} bytes; split it or ask for a larger --max-dataset-mb")]
                )
            buffer.write(chunk)
            await asyncio.to_thread(self._count_text, stats, decoder, chunk, size - len(chunk))
            del chunk
        if not size:
            raise errors.Invalid([("chunk", "the dataset is empty: send at least one chunk of UTF-8 text")])
        await asyncio.to_thread(self._count_text, stats, decoder, b"", size, True)
        with memoryview(buffer)[:size] as data:
            return await self._store_dataset(data, name, auth.current_tenant.get(),
                                             await asyncio.to_thread(stats.result))

    @errors.rpc
    async def DownloadCheckpoint(self, request, context):
        _require_id(request.job_id, "job_id", "job-")
        which = _checkpoint_choice(request.checkpoint, "checkpoint")
        job = await self._owned_job(request.job_id)
        try:
            step, data = await self._call(self.store.get_checkpoint, request.job_id, which)
        except store.NotFound:
            raise errors.NotFound(_checkpoint_missing(job, which)) from None
        for start in range(0, len(data), CHUNK_BYTES):
            yield jobs_pb2.CheckpointChunk(data=data[start : start + CHUNK_BYTES], step=step, total_bytes=len(data))

    @errors.rpc
    async def ListWorkers(self, request, context):
        return jobs_pb2.ListWorkersResponse(workers=await self._call(self.store.workers))

    @errors.rpc
    async def Generate(self, request, context):
        # The model runs on a generate worker, never here: this server has no
        # torch. The task carries a request id, and the worker pushes its reply
        # to a Redis list of that id, which this call waits on.
        _require_id(request.job_id, "job_id", "job-")
        problems = []
        if len(request.prefix) > specs.MAX_PREFIX_CHARS:
            problems.append(("prefix", f"must be at most {specs.MAX_PREFIX_CHARS} characters, got {len(request.prefix)}"))
        if not 1 <= request.num_tokens <= specs.MAX_GENERATE_TOKENS:
            problems.append(("num_tokens", f"must be in [1, {specs.MAX_GENERATE_TOKENS}], got {request.num_tokens}"))
        if not (math.isfinite(request.temperature) and 0 <= request.temperature <= specs.MAX_TEMPERATURE):
            problems.append(("temperature", f"must be a finite number in [0, {specs.MAX_TEMPERATURE:g}] (0 picks the "
                                            f"likeliest token), got {request.temperature}"))
        if problems:
            raise errors.Invalid(problems)
        which = _checkpoint_choice(request.checkpoint, "checkpoint")
        job = await self._owned_job(request.job_id)
        if job.spec.dataset in specs.SYNTHETIC_TASKS:
            raise errors.Precondition(f"job {job.id} trains on {job.spec.dataset}, a synthetic task with no text to "
                                      "generate")
        if not await self._call(self.store.checkpoint_step, job.id, which):
            raise errors.NotFound(_checkpoint_missing(job, which))
        workers = await self._call(self.store.workers)
        if not any(GENERATE_QUEUE in w.queues for w in workers):
            raise errors.Unavailable(f"no worker serves the {GENERATE_QUEUE} queue; start one: {GENERATE_WORKER_HINT}")
        wait_s = GENERATE_WAIT_S
        remaining = context.time_remaining()
        if remaining is not None:
            wait_s = max(_GENERATE_MIN_WAIT_S, min(wait_s, remaining - _DEADLINE_MARGIN_S))
        request_id = secrets.token_hex(16)
        task = dict(request_id=request_id, job_id=job.id, prefix=request.prefix, num_tokens=request.num_tokens,
                    temperature=request.temperature, seed=request.seed, checkpoint=which)
        # `expires`: a request still queued when this call gives up is dropped, not computed for nobody.
        give_up_at = time.monotonic() + wait_s
        await self._call(self.celery.send_task, GENERATE_TASK, kwargs=task, queue=GENERATE_QUEUE, expires=wait_s)
        # Sending can take a while (a first connection to the broker); the caller's deadline still holds.
        reply = await self.replies.wait_reply(request_id, give_up_at - time.monotonic())
        if reply is None:
            raise errors.Unavailable(
                f"no generate worker answered within {wait_s:.0f} s: they may all be busy or stuck; check "
                f"`gradserve workers` for one on the {GENERATE_QUEUE} queue, or start another: {GENERATE_WORKER_HINT}"
            )
        if "error" in reply:
            error = reply["error"]
            # A worker's answer names its status; one this server does not know is its bug, so INTERNAL.
            raise errors.BY_CODE_NAME.get(error["code"], errors.ServiceError)(error["message"])
        return jobs_pb2.GenerateResponse(text=reply["text"], step=reply["step"])


def create_server(redis_url: str, listen: str, *, tokens: dict[bytes, str] | None = None,
                  credentials: grpc.ServerCredentials | None = None, interceptors: tuple = (),
                  **service_options) -> tuple[grpc.aio.Server, int, JobService, health.aio.HealthServicer]:
    """A ready-to-start server with the job service and the standard health service; returns the bound port too.

    With `tokens` (digest -> tenant, see `auth`), every call but health needs a
    bearer token. With `credentials`, the port speaks TLS. `interceptors` run after those two (metrics).
    """
    authentication = [auth.AuthInterceptor(auth.Authenticator(tokens))] if tokens else []
    server = grpc.aio.server(
        # Authentication comes first, so a stranger learns nothing, not even that a request was malformed.
        interceptors=authentication + [StrictDecoding(), *interceptors],
        options=[
            ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
            ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
            # gRPC turns SO_REUSEPORT on by default, so a second server on a
            # taken port would start and silently split the calls with the first.
            ("grpc.so_reuseport", 0),
        ],
    )
    service = JobService(redis_url, **service_options)
    jobs_pb2_grpc.add_JobServiceServicer_to_server(service, _SendingEncoded(server))
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    # grpcurl, Evans and the like list and call the services without the .proto files.
    reflection.enable_server_reflection((SERVICE_NAME, health.SERVICE_NAME, reflection.SERVICE_NAME), server)
    try:
        port = server.add_secure_port(listen, credentials) if credentials else server.add_insecure_port(listen)
    except RuntimeError:
        port = 0
    if port == 0:
        raise ListenError(listen)
    return server, port, service, health_servicer


# Methods whose handlers yield bytes already encoded: the relay encodes an event once for all its watchers.
ENCODED = ("StreamEvents", "StreamEventBatches")


class _SendingEncoded:
    """Takes the generated registration's handlers to `server`, with ENCODED's responses sent as they are."""

    def __init__(self, server: grpc.aio.Server):
        self.server = server

    def add_generic_rpc_handlers(self, handlers) -> None:
        # The same handlers come to add_registered_method_handlers, which registers both ways.
        pass

    def add_registered_method_handlers(self, service_name: str, handlers: dict) -> None:
        handlers = {name: handler._replace(response_serializer=None) if name in ENCODED else handler
                    for name, handler in handlers.items()}
        self.server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(service_name, handlers),))
        self.server.add_registered_method_handlers(service_name, handlers)


class ListenError(OSError):
    """The address to serve on cannot be bound: most often another server holds the port."""

    def __init__(self, listen: str, flag: str = "--listen"):
        super().__init__(f"cannot listen on {listen}: the port is in use (another gradserve-server?) or the "
                         f"address is not this machine's; pick another with {flag} HOST:PORT (port 0 picks a free one)")


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
