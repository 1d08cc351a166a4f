"""Everything gradserve keeps in Redis, and the only code that knows its layout.

The server and the workers share nothing else, so both import this module:
the server to create, list and cancel jobs and to read event streams, the
worker to move a job through its states, append events and write checkpoints.

Keys (all under ``gradserve:``):

    job:{id}        hash    spec (JobSpec bytes), state, queue, times, reason, worker, steps, cancel flag,
                            attempt, owner (the running attempt's fencing token), losses (workers lost),
                            last_step and seen:{kind} (the last step of the stream's metrics events,
                            and of each other kind of event), summary (JobSummary bytes);
                            name, tags ("\nkey=value\n" lines) and note, as given at submission
    jobs:{tenant}   zset    job id -> creation time, for listing a tenant's jobs newest first
    active:{tenant} set     the tenant's jobs that may still be QUEUED or RUNNING (pruned when counted)
    datasets:{tenant} set   the dataset ids the tenant uploaded (datasets are shared by content)
    by:{tenant}:{attribute}:{value}
                    zset    job id -> creation time, for ListJobs' filters: the tenant's jobs in one state
                            (attribute "state", kept by every change), or of one model, dataset or tag ("k=v")
    names           hash    job id -> its name casefolded ("" for none): which jobs are indexed, and the name
                            a deletion takes out of named:{tenant}
    named:{tenant}  zset    "casefolded name NUL job id" -> creation time, for the tenant's jobs with a name:
                            ListJobs' name filter matches these in Redis
    sort:{order}:{tenant} zset  job id -> its train_loss, val_loss or tokens_per_sec, once it has one
    sweep:{id}      hash    spec (SweepSpec bytes), tenant, name, tags, note, created, members (JSON: [[job id,
                            {field: value}], ...] in the spec's order); written with every member's job at once
    sweeps:{tenant} zset    sweep id -> creation time, for listing a tenant's sweeps newest first
    sweep:{id}:loss:{at}  hash  member job id -> its held-out loss at step (or halving rung) `at`, for early stopping
    sweep:{id}:losses     set   the sweep's loss:{at} keys, which go with the sweep
    leases          zset    job id -> the moment (Redis clock, ms) its running attempt's lease expires
    dispatch        zset    job id -> the moment (ms) after which any server may (re)send its train task
    events:{id}     stream  one entry per Event (field "e", Event bytes; the entry id is the cursor)
    logs:{id}       stream  the job's log lines, the newest LOG_LINES kept (fields: time, level, logger, attempt,
                            message; the entry id is the cursor)
    dataset:{id}    hash    data (UTF-8 text), name, size, num_chars, token counts per tokenization
    builtin:{name}  string  the dataset id a built-in corpus is stored under
    ckpt:{id}       hash    data (the trainer's bytes), step; replaced whole, in one script
    ckpt:{id}:best  hash    data, step, loss: the checkpoint of the evaluation with the lowest held-out loss
    init:{id}       hash    data, step: the checkpoint of another job this one starts from (InitFrom), copied
    worker:{name}   hash    a worker's advertisement; expires unless its heartbeat renews it
    workers         set     the names of the advertised workers; a name whose advertisement expired is
                            dropped by the next read
    reply:{req}     list    a generate worker's JSON reply to one Generate call; expires unread after REPLY_TTL_S
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import functools
import hashlib
import json
import logging
import math
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import NamedTuple

import redis
import redis.asyncio as aioredis
from redis.asyncio.retry import Retry as AsyncRetry
from redis.backoff import NoBackoff
from google.protobuf.timestamp_pb2 import Timestamp

from gradserve import text
from gradserve.v1 import jobs_pb2
from gradserve_store import scripts

log = logging.getLogger("gradserve.store")

PREFIX = "gradserve:"
TERMINAL = frozenset({jobs_pb2.SUCCEEDED, jobs_pb2.FAILED, jobs_pb2.CANCELLED})
WORKER_TTL_S = 15
# How often a worker renews its advertisement: three beats to a TTL, so one lost beat loses nothing.
HEARTBEAT_S = WORKER_TTL_S / 3


def job_key(job_id: str) -> str:
    return f"{PREFIX}job:{job_id}"


def events_key(job_id: str) -> str:
    return f"{PREFIX}events:{job_id}"


def logs_key(job_id: str) -> str:
    return f"{PREFIX}logs:{job_id}"


def dataset_key(dataset_id: str) -> str:
    return f"{PREFIX}dataset:{dataset_id}"


def checkpoint_key(job_id: str) -> str:
    return f"{PREFIX}ckpt:{job_id}"


def best_checkpoint_key(job_id: str) -> str:
    return f"{PREFIX}ckpt:{job_id}:best"


def init_key(job_id: str) -> str:
    return f"{PREFIX}init:{job_id}"


def worker_key(name: str) -> str:
    return f"{PREFIX}worker:{name}"


def tenant_jobs_key(tenant: str) -> str:
    return f"{PREFIX}jobs:{tenant}"


def active_key(tenant: str) -> str:
    return f"{PREFIX}active:{tenant}"


def tenant_datasets_key(tenant: str) -> str:
    return f"{PREFIX}datasets:{tenant}"


def sort_key(order: str, tenant: str) -> str:
    return f"{PREFIX}sort:{order}:{tenant}"


def sweep_key(sweep_id: str) -> str:
    return f"{PREFIX}sweep:{sweep_id}"


def tenant_sweeps_key(tenant: str) -> str:
    return f"{PREFIX}sweeps:{tenant}"


def named_key(tenant: str) -> str:
    return f"{PREFIX}named:{tenant}"


def name_member(name: str, job_id: str) -> str:
    """A job's member in named_key: its name casefolded, then its id; a name has no control characters."""
    return f"{name.casefold()}\0{job_id}"


def name_pattern(contains: str) -> str:
    """The MATCH pattern for the name_member of every name that contains `contains`, casefolded."""
    literal = "".join("\\" + c if c in "\\*?[]" else c for c in contains.casefold())
    # The NUL comes after the name, so the match cannot run on into the id.
    return f"*{literal}*\0*"


def by_key(tenant: str, attribute: str, value: str) -> str:
    """The tenant's zset of jobs (scored by creation time) whose `attribute` (state, model, dataset, tag) is `value`."""
    # Tenant names have no ":" (auth), so the tenant ends at the first one.
    return f"{PREFIX}by:{tenant}:{attribute}:{value}"


def state_keys(tenant: str) -> list[str]:
    """The tenant's zsets of jobs by state, in JOB_STATES' order (scripts.CAS finds them by state number)."""
    return [by_key(tenant, "state", str(state)) for state in JOB_STATES]


def label_keys(tenant: str, spec: jobs_pb2.JobSpec, labels: Labels) -> list[str]:
    """The zsets a job is in for what never changes: its model, its dataset, each of its tags, its sweep."""
    return [by_key(tenant, "model", spec.model), by_key(tenant, "dataset", spec.dataset),
            *(by_key(tenant, "tag", f"{k}={v}") for k, v in sorted(labels.tags.items())),
            *([by_key(tenant, "sweep", labels.sweep)] if labels.sweep else [])]


def builtin_key(name: str) -> str:
    return f"{PREFIX}builtin:{name}"


def reply_key(request_id: str) -> str:
    return f"{PREFIX}reply:{request_id}"


def wake_key(name: str) -> str:
    return f"{PREFIX}wake:{name}"


# A job's log keeps its newest lines, each cut to a length: at most about
# LOG_LINES x LOG_LINE_CHARS bytes (4 MiB) a job, whatever it prints.
LOG_LINES = 1000
LOG_LINE_CHARS = 4000

# How long a generate reply waits to be read: long enough for a server still
# waiting for it; short enough that replies nobody reads (the caller gave up)
# do not pile up.
REPLY_TTL_S = 60

LEASES_KEY = f"{PREFIX}leases"
WORKERS_KEY = f"{PREFIX}workers"
NAMES_KEY = f"{PREFIX}names"
JOB_STATES = tuple(range(jobs_pb2.QUEUED, jobs_pb2.CANCELLED + 1))
DISPATCH_KEY = f"{PREFIX}dispatch"

# A job in the dispatch outbox whose task nobody confirmed sending this long
# after it was queued is sent again by a server's reaper. The one that queued
# it sends it at once, so this only matters when that process died in between.
DISPATCH_RETRY_S = 30


def timestamp(seconds: float) -> Timestamp:
    ts = Timestamp()
    ts.FromNanoseconds(int(seconds * 1e9))
    return ts


def encode_event(event: jobs_pb2.Event) -> bytes:
    return event.SerializeToString()


def cursor_position(cursor: str) -> tuple[int, int]:
    """A cursor (a stream entry id, "ms-seq") as a pair that orders like the stream."""
    ms, _, seq = cursor.partition("-")
    return int(ms), int(seq or 0)


def decode_event(entry_id: bytes | str, fields: dict) -> jobs_pb2.Event:
    """An Event read from a stream entry, with the entry id as its cursor."""
    event = jobs_pb2.Event.FromString(fields[b"e"])
    event.cursor = entry_id.decode() if isinstance(entry_id, bytes) else entry_id
    return event


class Stored(NamedTuple):
    """An event read from its stream, with what each of its watchers needs worked out once for all of them.

    `wire` is the event encoded (its cursor included), `framed` the same as an
    element of EventBatch.events, `position` its cursor_position, `ends`
    whether it ends the stream (is_terminal).
    """

    event: jobs_pb2.Event
    wire: bytes
    framed: bytes
    position: tuple[int, int]
    ends: bool

    @classmethod
    def of(cls, event: jobs_pb2.Event, wire: bytes) -> "Stored":
        return cls(event, wire, _length_delimited(_EVENTS_TAG, wire), cursor_position(event.cursor) if event.cursor
                   else (0, 0), is_terminal(event))


def _length_delimited(field_tag: bytes, data: bytes) -> bytes:
    """`data` as one length-delimited protobuf field whose tag byte is `field_tag`."""
    size, head = len(data), bytearray(field_tag)
    while size > 0x7F:
        head.append(0x80 | (size & 0x7F))
        size >>= 7
    head.append(size)
    return bytes(head) + data


_CURSOR_TAG = b"\x0a"  # Event.cursor: field 1, length-delimited
_EVENTS_TAG = b"\x0a"  # EventBatch.events: field 1, length-delimited


def stored_event(entry_id: bytes | str, fields: dict) -> Stored:
    """A stream entry as a Stored event.

    Protobuf reads a field given twice as its last value, so appending the
    cursor to the stored bytes encodes the event with its cursor without
    encoding it again: a relay encodes each event once, not once per watcher.
    """
    cursor = entry_id if isinstance(entry_id, bytes) else entry_id.encode()
    wire = fields[b"e"] + _length_delimited(_CURSOR_TAG, cursor)
    return Stored.of(jobs_pb2.Event.FromString(wire), wire)


def stored(event: jobs_pb2.Event) -> Stored:
    """An event made here (a notice, say) in the form the relay hands out."""
    return Stored.of(event, event.SerializeToString())


def batch_wire(items: list[Stored]) -> bytes:
    """The EventBatch of `items`, from their encoded bytes."""
    return b"".join(item.framed for item in items)


def status_event(job_id: str, state: int, reason: str = "", worker: str = "", step: int = 0, attempt: int = 0,
                 resumed_from_step: int = 0) -> jobs_pb2.Event:
    return jobs_pb2.Event(
        job_id=job_id,
        time=timestamp(time.time()),
        status=jobs_pb2.StatusChange(state=state, reason=reason, worker=worker, step=step, attempt=attempt,
                                     resumed_from_step=resumed_from_step),
    )


def is_terminal(event: jobs_pb2.Event) -> bool:
    return event.WhichOneof("kind") == "status" and event.status.state in TERMINAL


@dataclass
class Refused(Exception):
    """A state change that the job's current state does not allow."""

    job_id: str
    state: int

    def __str__(self) -> str:
        return f"job {self.job_id} is {jobs_pb2.JobState.Name(self.state)}"


class NotFound(KeyError):
    pass


@dataclass
class Fenced(Exception):
    """A write by an attempt that no longer owns its job: a later attempt has it, or it ended."""

    job_id: str
    attempt: int
    detail: str

    def __str__(self) -> str:
        return f"attempt {self.attempt} of job {self.job_id} no longer owns it: {self.detail}"


@dataclass(frozen=True)
class LostAttempt:
    """What the reaper knows of a running attempt whose lease expired."""

    job_id: str
    state: int
    attempt: int
    owner: str
    worker: str
    last_step: int
    checkpoint_step: int
    # Workers lost running the job before this one.
    losses: int
    cancel_requested: bool


@dataclass(frozen=True)
class Lease:
    """A worker's claim on one attempt of a job, which each of its writes presents."""

    job_id: str
    attempt: int
    token: str
    worker: str
    queue: str
    # The checkpoint this attempt resumes from; 0 when it starts from scratch.
    checkpoint_step: int
    tenant: str = ""  # the job's owner, whose indexes its writes keep current


def _text(value: bytes | str | None) -> str:
    """A Redis reply as text; "" for a missing value."""
    if value is None:
        return ""
    return value.decode() if isinstance(value, bytes) else str(value)


def wait_for_redis(url: str, timeout: float, *, alive=lambda: True) -> None:
    """Return once the Redis at `url` answers PING; raise the last redis.RedisError after `timeout`
    seconds, or as soon as `alive()` says the server being waited for has died."""
    client = redis.Redis.from_url(url, socket_connect_timeout=0.5)
    deadline = time.monotonic() + timeout
    try:
        while True:
            try:
                client.ping()
                return
            except redis.RedisError:
                if not alive() or time.monotonic() > deadline:
                    raise
                time.sleep(0.1)
    finally:
        client.close()


def new_job_id() -> str:
    return "job-" + secrets.token_hex(10)


def new_sweep_id() -> str:
    return "sweep-" + secrets.token_hex(8)


def dataset_id_for(data: bytes) -> str:
    return "ds-" + hashlib.sha256(data).hexdigest()


# ------------------------------------------------------------ finding jobs


class Labels(NamedTuple):
    """What a job is called and tagged with at submission (validated by the server)."""

    name: str = ""
    tags: dict[str, str] = {}
    note: str = ""
    sweep: str = ""  # the sweep the job is a member of


def _tags_field(tags: dict[str, str]) -> str:
    return json.dumps(dict(sorted(tags.items()))) if tags else ""


def _tags_from(field: str) -> dict[str, str]:
    return json.loads(field) if field else {}


def _finite(value: float) -> str:
    return repr(value) if math.isfinite(value) else ""


class SortField(NamedTuple):
    name: str  # its zset's name (sort_key); "" for creation time, the tenant's jobs zset
    highest_first: bool
    of: Callable[[jobs_pb2.JobSummary], str] | None  # a summary's value for it ("" for none yet)


# ListJobsRequest.order_by: each order and its natural direction. A NaN or
# infinite loss (a diverged job) is no value: the job sorts with those that have none.
SORT_FIELDS = {
    "created": SortField("", True, None),
    "train_loss": SortField("train_loss", False, lambda s: _finite(s.train_loss) if s.step else ""),
    "val_loss": SortField("val_loss", False, lambda s: _finite(s.best_val_loss) if s.best_step else ""),
    "tokens_per_sec": SortField("tokens_per_sec", True, lambda s: _finite(s.tokens_per_sec) if s.step else ""),
}
METRIC_SORTS = tuple(f for f in SORT_FIELDS.values() if f.of is not None)


def sort_keys(tenant: str) -> list[str]:
    """The tenant's sort zsets, in METRIC_SORTS' order."""
    return [sort_key(f.name, tenant) for f in METRIC_SORTS]


@dataclass(frozen=True)
class JobQuery:
    """A ListJobs query: every filter that is set must hold. Built and validated by the server."""

    limit: int = 50
    state: int = 0
    name_contains: str = ""
    tags: dict[str, str] = field(default_factory=dict)
    model: str = ""
    dataset: str = ""
    created_after: float | None = None
    created_before: float | None = None
    order_by: str = "created"
    reverse: bool = False
    page_token: str = ""
    sweep: str = ""

    def _fingerprint(self) -> str:
        # A token is good only for the query that made it: same filters, same order.
        what = json.dumps([self.state, self.name_contains, sorted(self.tags.items()), self.model, self.dataset,
                           self.created_after, self.created_before, self.order_by, self.reverse, self.sweep])
        return hashlib.sha256(what.encode()).hexdigest()[:16]

    def position(self) -> dict | None:
        """Where the previous page ended, as scripts.LIST reads it; None for the first page."""
        if not self.page_token:
            return None
        try:
            token = json.loads(base64.urlsafe_b64decode(self.page_token.encode()))
            if token["q"] != self._fingerprint():
                raise ValueError
            rank, score, job_id = int(token["r"]), float(token["s"]), str(token["i"])
            if rank not in (0, 1) or not math.isfinite(score):
                raise ValueError
            # repr: the shortest text that reads back as the same double, which LIST compares scores by.
            return {"rank": rank, "score": repr(score), "id": job_id}
        except (ValueError, KeyError, TypeError, binascii.Error):
            raise ValueError("is not the next_page_token of an earlier page of this same query (same filters "
                             "and order)") from None

    def next_token(self, rank: str, score: str, last_id: str) -> str:
        token = json.dumps({"q": self._fingerprint(), "r": int(rank), "s": score, "i": last_id}, separators=(",", ":"))
        return base64.urlsafe_b64encode(token.encode()).decode()


class JobStore:
    """Synchronous access to the shared Redis. The async server calls it from a thread."""

    def __init__(self, client: redis.Redis):
        self.r = client
        self._cas = client.register_script(scripts.CAS)
        self._append = client.register_script(scripts.APPEND)
        self._checkpoint = client.register_script(scripts.CHECKPOINT)
        self._best_checkpoint = client.register_script(scripts.BEST_CHECKPOINT)
        self._latest_and_best_checkpoint = client.register_script(scripts.LATEST_AND_BEST_CHECKPOINT)
        self._checkpoint_of = client.register_script(scripts.CHECKPOINT_OF)
        self._take_dispatch = client.register_script(scripts.TAKE_DISPATCH)
        self._dispatched = client.register_script(scripts.DISPATCHED)
        self._delete = client.register_script(scripts.DELETE)
        self._list = client.register_script(scripts.LIST)
        self._hold_dataset = client.register_script(scripts.HOLD_DATASET)
        self._store_dataset = client.register_script(scripts.STORE_DATASET)
        self._release_dataset = client.register_script(scripts.RELEASE_DATASET)

    @classmethod
    def from_url(cls, url: str, **options) -> "JobStore":
        # redis-py 8 sets a 5 s socket timeout by default; nothing here blocks that long.
        return cls(redis.Redis.from_url(url, **{"health_check_interval": 30, **options}))

    def close(self) -> None:
        self.r.close()

    def ping(self) -> None:
        """Raise redis.RedisError unless Redis answers."""
        self.r.ping()

    def run_id(self) -> str:
        """The running Redis process's id: it changes when Redis restarts."""
        return self.r.info("server")["run_id"]

    # ---------------------------------------------------------------- jobs

    def create_job(self, job_id: str, spec: jobs_pb2.JobSpec, queue: str, tenant: str = "",
                   labels: Labels = Labels(), init: tuple[jobs_pb2.InitFrom, bytes] | None = None) -> jobs_pb2.Job:
        """Record a QUEUED job as attempt 1, in the dispatch outbox until `dispatched` says its task was sent.

        `init` is the checkpoint it starts from (InitFrom, and the checkpoint's bytes), kept with it.
        """
        with self.r.pipeline(transaction=True) as p:
            job = self._create(p, job_id, spec, queue, tenant, labels, init)
            p.execute()
        return job

    def _create(self, p, job_id: str, spec: jobs_pb2.JobSpec, queue: str, tenant: str, labels: Labels,
                init: tuple[jobs_pb2.InitFrom, bytes] | None = None) -> jobs_pb2.Job:
        """Queue on transaction `p` the writes that record a new job; returns its record."""
        now = time.time()
        event = status_event(job_id, jobs_pb2.QUEUED, attempt=1)
        resend_at = self.now_ms() + DISPATCH_RETRY_S * 1000
        p.hset(
            job_key(job_id),
            mapping={"spec": spec.SerializeToString(), "state": jobs_pb2.QUEUED, "queue": queue, "created": now,
                     "attempt": 1, "tenant": tenant, "name": labels.name, "tags": _tags_field(labels.tags),
                     "note": labels.note, "sweep": labels.sweep},
        )
        self._index(p, job_id, tenant, spec, labels, now, jobs_pb2.QUEUED)
        if init is not None:
            p.hset(init_key(job_id), mapping={"data": init[1], "step": init[0].step})
            p.hset(job_key(job_id), "init_from", init[0].SerializeToString())
        p.zadd(tenant_jobs_key(tenant), {job_id: now})
        p.sadd(active_key(tenant), job_id)
        p.zadd(DISPATCH_KEY, {job_id: resend_at})
        p.xadd(events_key(job_id), {"e": encode_event(event)})
        return jobs_pb2.Job(id=job_id, spec=spec, state=jobs_pb2.QUEUED, queue=queue, attempt=1, tenant=tenant,
                            created_at=timestamp(now), name=labels.name, tags=labels.tags, note=labels.note,
                            sweep=labels.sweep,
                            init_from=init[0] if init is not None else None)

    @staticmethod
    def _index(p, job_id: str, tenant: str, spec: jobs_pb2.JobSpec, labels: Labels, created: float, state: int,
               summary: jobs_pb2.JobSummary | None = None) -> None:
        """Queue on `p` the writes that put a job in ListJobs' indexes."""
        for key in label_keys(tenant, spec, labels):
            p.zadd(key, {job_id: created})
        p.zadd(by_key(tenant, "state", str(state)), {job_id: created})
        p.hset(NAMES_KEY, job_id, labels.name.casefold())
        if labels.name:
            p.zadd(named_key(tenant), {name_member(labels.name, job_id): created})
        if summary is not None:
            for f, zset in zip(METRIC_SORTS, sort_keys(tenant)):
                if value := f.of(summary):
                    p.zadd(zset, {job_id: value})

    def get_job(self, job_id: str) -> jobs_pb2.Job:
        raw = self.r.hgetall(job_key(job_id))
        if not raw:
            raise NotFound(job_id)
        return _job_from_hash(job_id, raw)

    def list_jobs(self, query: JobQuery, tenant: str = "") -> tuple[list[jobs_pb2.Job], str]:
        """One page of the tenant's jobs that match `query`, and the token of the next page ("" on the last).

        Raises ValueError when query.page_token was not made by an earlier page of the same query.
        """
        sort = SORT_FIELDS[query.order_by]
        filters = [by_key(tenant, "state", str(query.state))] if query.state else []
        filters += [by_key(tenant, "model", query.model)] if query.model else []
        filters += [by_key(tenant, "dataset", query.dataset)] if query.dataset else []
        filters += [by_key(tenant, "tag", f"{k}={v}") for k, v in sorted(query.tags.items())]
        filters += [by_key(tenant, "sweep", query.sweep)] if query.sweep else []
        args = {"name": query.name_contains.casefold() or None,
                "after": repr(query.created_after) if query.created_after is not None else None,
                "before": repr(query.created_before) if query.created_before is not None else None,
                "by_metric": bool(sort.name), "desc": sort.highest_first != query.reverse, "limit": query.limit,
                "token": query.position()}
        # Left out rather than null: Lua's cjson reads null as a value, and a true one.
        query_json = json.dumps({k: v for k, v in args.items() if v is not None})
        jobs_zset = tenant_jobs_key(tenant)
        ordered_by = sort_key(sort.name, tenant) if sort.name else jobs_zset
        found = self._list(keys=[jobs_zset, NAMES_KEY, named_key(tenant), ordered_by, *filters],
                           args=[query_json, *([name_pattern(query.name_contains)] if query.name_contains else [])])
        ids, (rank, score, last) = [i.decode() for i in found[:-3]], (_text(v) for v in found[-3:])
        with self.r.pipeline(transaction=False) as p:
            for i in ids:
                p.hgetall(job_key(i))
            raws = p.execute()
        # A job deleted between the two reads is left out of its page.
        jobs = [_job_from_hash(i, raw) for i, raw in zip(ids, raws) if raw]
        return jobs, query.next_token(rank, score, last) if last else ""

    def index_missing(self) -> int:
        """Put the jobs recorded before ListJobs' indexes existed into them; returns how many there were."""
        added = 0
        for key in self.r.scan_iter(match=tenant_jobs_key("*"), count=1000):
            tenant = key.decode().removeprefix(tenant_jobs_key(""))
            created = {i.decode(): t for i, t in self.r.zrange(key, 0, -1, withscores=True)}
            ids = list(created)
            for start in range(0, len(ids), 500):
                chunk = ids[start:start + 500]
                # Every indexed job has a name entry, "" when it has no name.
                names = self.r.hmget(NAMES_KEY, chunk)
                missing = [i for i, name in zip(chunk, names) if name is None]
                # Named jobs indexed before the names zset existed; adding one already there changes nothing.
                named = {name_member(name.decode(), i): created[i] for i, name in zip(chunk, names) if name}
                if named:
                    self.r.zadd(named_key(tenant), named)
                    # A job deleted since the names were read has lost its entry; its member goes too.
                    gone = [m for m, name in zip(named, self.r.hmget(NAMES_KEY, [m.split("\0")[1] for m in named]))
                            if name is None]
                    if gone:
                        self.r.zrem(named_key(tenant), *gone)
                with self.r.pipeline(transaction=False) as p:
                    for i in missing:
                        p.hgetall(job_key(i))
                    raws = p.execute()
                for i, raw in zip(missing, raws):
                    if not raw:
                        continue
                    job = _job_from_hash(i, raw)
                    # One transaction with a check of the state: a worker that moved the job since it was read
                    # moved it between state zsets this one is not in yet, so the next start tries again.
                    with self.r.pipeline(transaction=True) as p:
                        p.watch(job_key(i))
                        if int(p.hget(job_key(i), "state") or 0) != job.state:
                            continue
                        p.multi()
                        self._index(p, i, job.tenant, job.spec, _labels_of(job),
                                    job.created_at.ToNanoseconds() / 1e9, job.state, job.summary)
                        try:
                            p.execute()
                            added += 1
                        except redis.WatchError:
                            pass
        return added

    def active_counts(self, tenant: str) -> tuple[int, int]:
        """How many of the tenant's jobs are (QUEUED, RUNNING) now; forgets the ones that have ended."""
        ids = list(self.r.smembers(active_key(tenant)))
        if not ids:
            return 0, 0
        with self.r.pipeline(transaction=False) as p:
            for i in ids:
                p.hget(job_key(i.decode()), "state")
            states = p.execute()
        ended = [i for i, s in zip(ids, states) if s is None or int(s) in TERMINAL]
        if ended:
            self.r.srem(active_key(tenant), *ended)
        live = [int(s) for s in states if s is not None and int(s) not in TERMINAL]
        return live.count(jobs_pb2.QUEUED), live.count(jobs_pb2.RUNNING)

    def request_cancel(self, job_id: str) -> jobs_pb2.Job:
        """Cancel a queued job now, or flag a running one for its worker to stop at its next step.

        Cancelling a cancelled job is a no-op; a job that already succeeded or failed is Refused.
        """
        reason = "cancelled before it started"
        op = {"expect": {"state": jobs_pb2.QUEUED}, "dispatch": "del",
              "set": {"state": jobs_pb2.CANCELLED, "reason": reason, "finished": time.time()}}
        # A job the reaper queues again between the two reads goes round once more.
        while not self._apply(job_id, op, status_event(job_id, jobs_pb2.CANCELLED, reason=reason))[0]:
            state = int(self.r.hget(job_key(job_id), "state"))
            if state == jobs_pb2.RUNNING:
                self.r.hset(job_key(job_id), "cancel", 1)
                break
            if state == jobs_pb2.CANCELLED:
                break
            if state != jobs_pb2.QUEUED:
                raise Refused(job_id, state)
        return self.get_job(job_id)

    def delete_job(self, job_id: str) -> jobs_pb2.Job:
        """Remove an ended job (record, events, checkpoint) and return its record as it was.

        Raises Refused for a job still QUEUED or RUNNING, NotFound when there is none.
        """
        job = self._delete_ended(job_id)
        if job.sweep:
            self._forget_sweep_without_members(job.sweep, job.tenant)
        return job

    def delete_sweep(self, sweep_id: str) -> None:
        """Remove every member of the sweep, each as delete_job does, and then the sweep.

        Raises Refused for a member still QUEUED or RUNNING (those before it
        are gone by then), NotFound when there is no such sweep.
        """
        members, tenant = self.r.hmget(sweep_key(sweep_id), "members", "tenant")
        if members is None:
            raise NotFound(sweep_id)
        for job_id, _ in json.loads(members):
            with contextlib.suppress(NotFound):  # deleted already
                self._delete_ended(job_id)
        self._forget_sweep_without_members(sweep_id, (tenant or b"").decode())

    def _delete_ended(self, job_id: str) -> jobs_pb2.Job:
        job = self.get_job(job_id)
        result = self._delete(
            keys=[job_key(job_id), events_key(job_id), checkpoint_key(job_id), best_checkpoint_key(job_id),
                  init_key(job_id), logs_key(job_id), tenant_jobs_key(job.tenant),
                  active_key(job.tenant), LEASES_KEY, DISPATCH_KEY, NAMES_KEY, named_key(job.tenant),
                  *state_keys(job.tenant),
                  *label_keys(job.tenant, job.spec, _labels_of(job)), *sort_keys(job.tenant)],
            args=[job_id, *sorted(TERMINAL)],
        )
        if result[0] == -1:
            raise NotFound(job_id)
        if result[0] == 0:
            raise Refused(job_id, int(result[1]))
        return job

    def _forget_sweep_without_members(self, sweep_id: str, tenant: str) -> None:
        # A sweep gets all its members when it is created and none later, so once the last one is deleted (by
        # hand or by retention) nothing can bring it back: its record, its members' held-out losses and its
        # place in the tenant's list go too, instead of listing an empty sweep for ever.
        members = self.r.hget(sweep_key(sweep_id), "members")
        if members is None:
            return
        ids = [job_id for job_id, _ in json.loads(members)]
        if self.r.exists(*map(job_key, ids)):
            return
        losses = _losses_key(sweep_id)
        with self.r.pipeline(transaction=True) as p:
            p.delete(sweep_key(sweep_id), losses, *self.r.smembers(losses))
            p.zrem(tenant_sweeps_key(tenant), sweep_id)
            p.execute()

    def ended_before(self, cutoff: float, limit: int = 1000) -> list[str]:
        """Up to `limit` jobs, of any tenant, that ended (SUCCEEDED, FAILED, CANCELLED) before Unix time `cutoff`.

        A job ends after it is created, so only those created before the cutoff are looked at.
        """
        found: list[str] = []
        for key in self.r.scan_iter(match=tenant_jobs_key("*"), count=1000):
            start = 0
            while len(found) < limit:
                ids = [i.decode() for i in self.r.zrangebyscore(key, "-inf", cutoff, start=start, num=limit)]
                if not ids:
                    break
                start += len(ids)
                with self.r.pipeline(transaction=False) as p:
                    for i in ids:
                        p.hmget(job_key(i), "state", "finished")
                    rows = p.execute()
                found += [i for i, (state, finished) in zip(ids, rows)
                          if state is not None and int(state) in TERMINAL and finished and float(finished) < cutoff]
        return found[:limit]

    def cancel_requested(self, job_id: str) -> bool:
        return self.r.hget(job_key(job_id), "cancel") == b"1"

    def spec(self, job_id: str) -> jobs_pb2.JobSpec:
        raw = self.r.hget(job_key(job_id), "spec")
        if raw is None:
            raise NotFound(job_id)
        return jobs_pb2.JobSpec.FromString(raw)

    # ------------------------------------------------ attempts and leases

    def now_ms(self) -> int:
        """Redis's clock, in milliseconds: the one that lease deadlines and dispatch times are on."""
        seconds, micros = self.r.time()
        return seconds * 1000 + micros // 1000

    def _apply(self, job_id: str, op: dict, event: jobs_pb2.Event | None = None) -> tuple[bool, str]:
        """Run the scripts.CAS compare-and-set; (True, cursor or "") when applied, else (False, the first field not as expected)."""
        full = {"job": job_id, "expect": {}, "lease_expired": False, "set": {}, "lease": "", "lease_ms": 0,
                "dispatch": "", "dispatch_ms": 0, **op}
        full["expect"] = {k: str(v) for k, v in full["expect"].items()}
        full["set"] = {k: str(v) for k, v in full["set"].items()}
        tenant = _text(self.r.hget(job_key(job_id), "tenant"))
        result = self._cas(
            keys=[job_key(job_id), events_key(job_id), LEASES_KEY, DISPATCH_KEY, *state_keys(tenant)],
            args=[json.dumps(full), encode_event(event) if event is not None else b""],
        )
        if result[0] == -1:
            raise NotFound(job_id)
        return result[0] == 1, _text(result[1])

    @staticmethod
    def _fence_args(lease: Lease) -> list:
        return [lease.attempt, lease.token, jobs_pb2.RUNNING]

    @staticmethod
    def _fence(lease: Lease) -> dict:
        return {"state": jobs_pb2.RUNNING, "attempt": lease.attempt, "owner": lease.token}

    @staticmethod
    def _fenced_result(lease: Lease, result: list) -> bool:
        if result[0] == 0:
            state, attempt = _text(result[1]), _text(result[2])
            now = f"it is {jobs_pb2.JobState.Name(int(state))}, attempt {attempt or 1}" if state else "it is gone"
            raise Fenced(lease.job_id, lease.attempt, now)
        return result[0] == 1

    def claim(self, job_id: str, attempt: int, worker: str, lease_s: float) -> Lease:
        """Start the job's current attempt on `worker`: QUEUED to RUNNING, under a lease of `lease_s` seconds.

        `attempt` is the one the task was sent for; 0 takes whichever is
        current. Raises Refused when the job is not QUEUED (another delivery of
        the task got it first, or it ended), Fenced when it was queued again as
        a later attempt after this task was sent, NotFound when there is no job.
        """
        state, current, checkpoint, started, queue, tenant = self.r.hmget(
            job_key(job_id), "state", "attempt", "checkpoint_step", "started", "queue", "tenant"
        )
        if state is None:
            raise NotFound(job_id)
        if int(state) != jobs_pb2.QUEUED:
            raise Refused(job_id, int(state))
        number = int(current or 1)
        if attempt and attempt != number:
            raise Fenced(job_id, attempt, f"it was queued again as attempt {number}")
        resumed = int(checkpoint or 0)
        reason = ""
        if number > 1:
            reason = (f"attempt {number}, resumed from step {resumed}" if resumed
                      else f"attempt {number}, starting over: there was no checkpoint yet")
        token = secrets.token_hex(8)
        fields = {"state": jobs_pb2.RUNNING, "attempt": number, "worker": worker, "owner": token}
        if started is None:
            fields["started"] = time.time()
        event = status_event(job_id, jobs_pb2.RUNNING, reason=reason, worker=worker, step=resumed, attempt=number,
                             resumed_from_step=resumed)
        applied, _ = self._apply(
            job_id,
            {"expect": {"state": jobs_pb2.QUEUED, "attempt": _text(current), "checkpoint_step": _text(checkpoint)},
             "set": fields, "lease": "set", "lease_ms": int(lease_s * 1000), "dispatch": "del"},
            event,
        )
        if not applied:
            # Another delivery of the same attempt won the race.
            raise Refused(job_id, int(self.r.hget(job_key(job_id), "state") or jobs_pb2.RUNNING))
        return Lease(job_id, number, token, worker, _text(queue), resumed, _text(tenant))

    def renew(self, lease: Lease, lease_s: float) -> bool:
        """Extend the lease to `lease_s` seconds from now; False when the attempt no longer owns the job."""
        try:
            applied, _ = self._apply(lease.job_id, {"expect": self._fence(lease), "lease": "set",
                                                    "lease_ms": int(lease_s * 1000)})
        except NotFound:
            return False
        return applied

    def finish(self, lease: Lease, state: int, *, reason: str = "", step: int = 0) -> None:
        """End the attempt's job in a terminal `state`. Raises Fenced when the attempt no longer owns it."""
        fields = {"state": state, "finished": time.time(), "worker": lease.worker}
        if reason:
            fields["reason"] = reason
        event = status_event(lease.job_id, state, reason=reason, worker=lease.worker, step=step, attempt=lease.attempt)
        applied, _ = self._apply(lease.job_id, {"expect": self._fence(lease), "set": fields, "lease": "del"}, event)
        if applied:
            return
        now_state, attempt, owner = self.r.hmget(job_key(lease.job_id), "state", "attempt", "owner")
        # A retry of a finish whose reply was lost finds its own work done.
        if (_text(now_state), _text(attempt), _text(owner)) == (str(state), str(lease.attempt), lease.token):
            return
        raise Fenced(lease.job_id, lease.attempt, f"it is {jobs_pb2.JobState.Name(int(now_state or 0))}, "
                                                  f"attempt {_text(attempt) or 1}")

    def hand_back(self, lease: Lease, step: int, reason: str) -> int:
        """Queue the job again as the next attempt, to resume from its checkpoint elsewhere; returns that attempt.

        Returns 0, changing nothing, when a cancel was requested: the job should
        end CANCELLED instead. The new attempt waits in the dispatch outbox
        until `dispatched`. Raises Fenced when the attempt no longer owns the job.
        """
        after = lease.attempt + 1
        event = status_event(lease.job_id, jobs_pb2.QUEUED, reason=reason, worker=lease.worker, step=step,
                             attempt=after)
        applied, field = self._apply(
            lease.job_id,
            {"expect": {**self._fence(lease), "cancel": ""}, "set": {"state": jobs_pb2.QUEUED, "attempt": after},
             "lease": "del", "dispatch": "add", "dispatch_ms": DISPATCH_RETRY_S * 1000},
            event,
        )
        if applied:
            return after
        if field == "cancel":
            return 0
        raise Fenced(lease.job_id, lease.attempt, f"its {field} changed")

    def unclaimed(self, lease: Lease) -> bool:
        """Whether the job is QUEUED at the lease's own attempt: Redis came back from a state older than the claim."""
        state, attempt = self.r.hmget(job_key(lease.job_id), "state", "attempt")
        return (_text(state), _text(attempt)) == (str(jobs_pb2.QUEUED), str(lease.attempt))

    def expired_leases(self, limit: int = 100) -> list[str]:
        """Jobs whose running attempt's lease ran out: their workers stopped renewing it."""
        return [i.decode() for i in self.r.zrangebyscore(LEASES_KEY, "-inf", self.now_ms(), start=0, num=limit)]

    def lost_attempt(self, job_id: str) -> LostAttempt | None:
        """The job's running attempt as it stands, for the reaper to judge; None when the job is gone."""
        state, attempt, owner, worker, last_step, checkpoint, losses, cancel = self.r.hmget(
            job_key(job_id), "state", "attempt", "owner", "worker", "last_step", "checkpoint_step", "losses", "cancel"
        )
        if state is None:  # deleted under its lease
            self.r.zrem(LEASES_KEY, job_id)
            return None
        return LostAttempt(job_id, int(state), int(attempt or 1), _text(owner), _text(worker), int(last_step or 0),
                           int(checkpoint or 0), int(losses or 0), cancel == b"1")

    def end_lost_attempt(self, lost: LostAttempt, state: int, reason: str) -> bool:
        """Take the job from `lost`'s attempt, whose lease expired: QUEUED as the next attempt, or a final state.

        Applies only while the job is still exactly as `lost` read it and its
        lease is still expired; returns False otherwise (the lease was renewed
        meanwhile, or another server got there first).
        """
        losses = lost.losses + 1
        op = {"expect": {"state": jobs_pb2.RUNNING, "attempt": lost.attempt, "owner": lost.owner,
                         "losses": lost.losses or "", "cancel": "1" if lost.cancel_requested else ""},
              "lease_expired": True, "lease": "del"}
        attempt = lost.attempt
        if state == jobs_pb2.QUEUED:
            attempt += 1
            op.update(set={"state": state, "attempt": attempt, "losses": losses}, dispatch="add")
        else:
            op["set"] = {"state": state, "reason": reason, "finished": time.time(), "losses": losses}
        event = status_event(lost.job_id, state, reason=reason, worker=lost.worker or "?", step=lost.last_step,
                             attempt=attempt)
        return self._apply(lost.job_id, op, event)[0]

    def due_dispatches(self, limit: int = 100) -> list[tuple[str, int, str]]:
        """Queued jobs whose train task may never have been sent, each taken for this caller for a while.

        Returns (job id, attempt, queue) for each; send the task, then call `dispatched`.
        """
        due = []
        for raw in self.r.zrangebyscore(DISPATCH_KEY, "-inf", self.now_ms(), start=0, num=limit):
            job_id = raw.decode()
            taken = self._take_dispatch(keys=[DISPATCH_KEY, job_key(job_id)],
                                        args=[job_id, DISPATCH_RETRY_S * 1000, jobs_pb2.QUEUED])
            if taken:
                due.append((job_id, int(taken[0] or 1), _text(taken[1])))
        return due

    def redispatch_queued(self) -> int:
        """Put every QUEUED job back in the dispatch outbox, due now; returns how many.

        For after Redis restarted: a train task it had handed to a worker just
        before may be gone with that worker's connection, or held as
        unacknowledged until the visibility timeout (a week), while the AOF
        still says QUEUED. Sending again is safe: only one delivery can claim.
        """
        now, count = self.now_ms(), 0
        for key in self.r.scan_iter(match=active_key("*"), count=500):
            ids = list(self.r.smembers(key))
            with self.r.pipeline(transaction=False) as p:
                for i in ids:
                    p.hget(job_key(i.decode()), "state")
                states = p.execute()
            queued = {i: now for i, s in zip(ids, states) if s is not None and int(s) == jobs_pb2.QUEUED}
            if queued:
                self.r.zadd(DISPATCH_KEY, queued)
                count += len(queued)
        return count

    def dispatched(self, job_id: str, attempt: int) -> None:
        """The train task of this attempt was sent: take the job out of the dispatch outbox."""
        self._dispatched(keys=[DISPATCH_KEY, job_key(job_id)], args=[job_id, attempt])

    # -------------------------------------------------------------- events

    def append_event(self, lease: Lease, event: jobs_pb2.Event, summary: jobs_pb2.JobSummary | None = None) -> bool:
        """Append a running attempt's event (metrics, evaluation, probe); metrics also advance last_step.

        `summary`, when given, is the job's summary with the event counted in,
        stored with the event or not at all. Returns False, appending nothing,
        when the stream already has an event of this kind at this step or
        later. Raises Fenced when `lease` no longer owns the job.
        """
        event.job_id = lease.job_id
        event.time.CopyFrom(timestamp(time.time()))
        kind = event.WhichOneof("kind")
        payload = getattr(event, kind)
        step = str(payload.step) if "step" in payload.DESCRIPTOR.fields_by_name else ""
        values = [f.of(summary) for f in METRIC_SORTS] if summary is not None else []
        result = self._append(
            keys=[job_key(lease.job_id), events_key(lease.job_id), *(sort_keys(lease.tenant) if values else [])],
            args=[*self._fence_args(lease), kind, step, encode_event(event),
                  summary.SerializeToString() if summary is not None else b"", lease.job_id, *values],
        )
        return self._fenced_result(lease, result)

    def summary(self, job_id: str) -> jobs_pb2.JobSummary:
        """The job's summary as its last stored report left it (empty before the first)."""
        return jobs_pb2.JobSummary.FromString(self.r.hget(job_key(job_id), "summary") or b"")

    def events_after(self, job_id: str, cursor: str = "", count: int = 1000) -> list[jobs_pb2.Event]:
        """Events strictly after `cursor` (all of them when it is empty), oldest first."""
        start = f"({cursor}" if cursor else "-"
        return [decode_event(i, f) for i, f in self.r.xrange(events_key(job_id), start, "+", count=count)]

    # ---------------------------------------------------------------- sweeps

    def create_sweep(self, sweep_id: str, spec: jobs_pb2.SweepSpec, tenant: str, labels: Labels,
                     members: list[tuple[str, jobs_pb2.JobSpec, str, Labels, dict[str, str]]]) -> jobs_pb2.Sweep:
        """Record a sweep and every member as a QUEUED job (job id, spec, queue, labels, values), in one transaction.

        Each member is in the dispatch outbox like any new job.
        """
        now = time.time()
        with self.r.pipeline(transaction=True) as p:
            jobs = [self._create(p, job_id, job_spec, queue, tenant, job_labels)
                    for job_id, job_spec, queue, job_labels, _ in members]
            p.hset(sweep_key(sweep_id), mapping={
                "spec": spec.SerializeToString(), "tenant": tenant, "name": labels.name,
                "tags": _tags_field(labels.tags), "note": labels.note, "created": now,
                "members": json.dumps([[job_id, values] for job_id, _, _, _, values in members])})
            p.zadd(tenant_sweeps_key(tenant), {sweep_id: now})
            p.execute()
        sweep = _sweep_from_hash(sweep_id, self.r.hgetall(sweep_key(sweep_id)))
        _tally(sweep, jobs)
        for member, job in zip(sweep.members, jobs):
            member.job.CopyFrom(job)
        return sweep

    def get_sweep(self, sweep_id: str, tenant: str, records: bool = True) -> jobs_pb2.Sweep:
        """The tenant's sweep, its members counted by state; with `records`, each member's job record too.

        Raises NotFound for no such sweep, or another tenant's.
        """
        raw = self.r.hgetall(sweep_key(sweep_id))
        if not raw or raw[b"tenant"].decode() != tenant:
            raise NotFound(sweep_id)
        sweep = _sweep_from_hash(sweep_id, raw)
        ids = [m.job_id for m in sweep.members]
        with self.r.pipeline(transaction=False) as p:
            for i in ids:
                if records:
                    p.hgetall(job_key(i))
                else:
                    p.hmget(job_key(i), "state", "summary")
            found = p.execute()
        if records:
            jobs = [_job_from_hash(i, raw) if raw else None for i, raw in zip(ids, found)]
        else:
            jobs = [jobs_pb2.Job(id=i, state=int(state), summary=jobs_pb2.JobSummary.FromString(summary or b""))
                    if state is not None else None for i, (state, summary) in zip(ids, found)]
        # A deleted member (it had ended) is no longer one: what is left of the sweep lists, counts and is done.
        for i in reversed(range(len(jobs))):
            if jobs[i] is None:
                del sweep.members[i], jobs[i]
        _tally(sweep, jobs)
        if records:
            for member, job in zip(sweep.members, jobs):
                member.job.CopyFrom(job)
        return sweep

    def list_sweeps(self, tenant: str, limit: int, page_token: str = "") -> tuple[list[jobs_pb2.Sweep], str]:
        """One page of the tenant's sweeps, newest first, without their members' records; and the next page's token.

        Raises ValueError for a page_token no earlier page made.
        """
        high, after_id = "+inf", None
        if page_token:
            try:
                score, after_id = page_token.split("/", 1)
                high = repr(float(score))
            except ValueError:
                raise ValueError("is not the next_page_token of an earlier page") from None
        # Sweeps created in the same instant as the token's come in id order, newest first; skip those before it.
        rows = self.r.zrevrangebyscore(tenant_sweeps_key(tenant), high, "-inf", start=0, num=limit + 64,
                                       withscores=True)
        rows = [(i.decode(), t) for i, t in rows
                if after_id is None or t < float(high) or i.decode() < after_id]
        page = rows[:limit]
        sweeps = []
        for sweep_id, _ in page:
            try:
                sweeps.append(self.get_sweep(sweep_id, tenant, records=False))
            except NotFound:
                continue
        more = len(rows) > limit
        return sweeps, f"{page[-1][1]!r}/{page[-1][0]}" if more and page else ""

    def early_stop_of(self, job_id: str) -> tuple[str, jobs_pb2.EarlyStop] | None:
        """(sweep id, its EarlyStop) when the job is a member of a sweep that stops members early; else None."""
        sweep_id = self.r.hget(job_key(job_id), "sweep")
        raw = self.r.hget(sweep_key(sweep_id.decode()), "spec") if sweep_id else None
        if raw is None:
            return None
        stop = jobs_pb2.SweepSpec.FromString(raw).early_stop
        return (sweep_id.decode(), stop) if stop.rule else None

    def sweep_losses(self, sweep_id: str, at: str, job_id: str, loss: float, *, first: bool = False) -> dict[str, float]:
        """Record the member's held-out loss at `at` (a step, or a rung), and return every member's there.

        With `first`, a loss the member already has there is kept (a resumed
        attempt that evaluates the same step again is not judged twice on a
        different number).
        """
        key = f"{sweep_key(sweep_id)}:loss:{at}"
        with self.r.pipeline(transaction=True) as p:
            (p.hsetnx if first else p.hset)(key, job_id, repr(loss))
            p.hgetall(key)
            p.sadd(_losses_key(sweep_id), key)  # so that the sweep's deletion finds it without a scan
            losses = p.execute()[1]
        return {k.decode(): float(v) for k, v in losses.items()}

    # ---------------------------------------------------------------- logs

    def append_log(self, job_id: str, attempt: int, created: float, level: str, logger: str, message: str) -> None:
        """Keep one log line of the job's; only the newest LOG_LINES stay, each cut to LOG_LINE_CHARS."""
        if len(message) > LOG_LINE_CHARS:
            message = message[:LOG_LINE_CHARS] + f" [... {len(message) - LOG_LINE_CHARS} more characters]"
        self.r.xadd(logs_key(job_id), {"t": created, "l": level, "n": logger, "a": attempt, "m": message},
                    maxlen=LOG_LINES, approximate=True)

    def logs_after(self, job_id: str, cursor: str = "", count: int = 500) -> list[jobs_pb2.LogLine]:
        """The job's log lines strictly after `cursor` (from the oldest kept when it is empty)."""
        start = f"({cursor}" if cursor else "-"
        return [_log_line(i, f) for i, f in self.r.xrange(logs_key(job_id), start, "+", count=count)]

    # ------------------------------------------------------------ datasets

    def put_dataset(self, data: bytes, name: str, num_chars: int, stats: dict[str, int],
                    tenant: str = "") -> jobs_pb2.Dataset:
        """Store the text once per content, and record that `tenant` may use it."""
        dataset_id = dataset_id_for(data)
        keys = [dataset_key(dataset_id), tenant_datasets_key(tenant)]
        # The text goes over the wire only when Redis does not have it already.
        if not self._hold_dataset(keys=keys, args=[dataset_id]):
            fields = {"name": name, "size": len(data), "num_chars": num_chars, "uploaded": time.time(), **stats}
            self._store_dataset(keys=keys, args=[dataset_id, data, *(x for kv in fields.items() for x in kv)])
        return self.dataset_info(dataset_id, tenant)

    def owns_dataset(self, tenant: str, dataset_id: str) -> bool:
        return bool(self.r.sismember(tenant_datasets_key(tenant), dataset_id))

    def builtin_dataset_id(self, name: str) -> str:
        """The stored dataset id of built-in corpus `name`, or "" before its first use."""
        dataset_id = self.r.get(builtin_key(name))
        return dataset_id.decode() if dataset_id else ""

    def set_builtin_dataset_id(self, name: str, dataset_id: str) -> str:
        """Record the corpus's id unless another server did first; returns the id that stands."""
        self.r.set(builtin_key(name), dataset_id, nx=True)
        return self.builtin_dataset_id(name)

    def resolve_dataset(self, name: str) -> str:
        """The dataset id that a spec's `dataset` names."""
        if name.startswith("builtin:"):
            dataset_id = self.builtin_dataset_id(name)
            if not dataset_id:
                raise NotFound(name)
            return dataset_id
        return name

    def dataset_info(self, dataset_id: str, tenant: str = "") -> jobs_pb2.Dataset:
        name, size, num_chars, words, uploaded = self.r.hmget(
            dataset_key(dataset_id), "name", "size", "num_chars", text.stat_key("tokens", "word", "none"), "uploaded")
        if size is None:
            raise NotFound(dataset_id)
        info = jobs_pb2.Dataset(id=dataset_id, name=name.decode(), size_bytes=int(size), num_chars=int(num_chars),
                                num_words=int(words or 0), tenant=tenant)
        if uploaded is not None:
            info.uploaded_at.CopyFrom(timestamp(float(uploaded)))
        return info

    def list_datasets(self, tenant: str) -> list[jobs_pb2.Dataset]:
        """The tenant's datasets, newest upload first."""
        found = []
        for dataset_id in self.r.smembers(tenant_datasets_key(tenant)):
            try:
                found.append(self.dataset_info(dataset_id.decode(), tenant))
            except NotFound:  # its text went with a delete racing this read
                pass
        return sorted(found, key=lambda d: (d.uploaded_at.ToNanoseconds(), d.id), reverse=True)

    def datasets_in_use(self, tenant: str, dataset_id: str) -> list[str]:
        """The tenant's QUEUED and RUNNING jobs on this dataset."""
        active = [i.decode() for state in (jobs_pb2.QUEUED, jobs_pb2.RUNNING)
                  for i in self.r.zrange(by_key(tenant, "state", str(state)), 0, -1)]
        if not active:
            return []
        on_it = self.r.zmscore(by_key(tenant, "dataset", dataset_id), active)
        return [i for i, score in zip(active, on_it) if score is not None]

    def delete_dataset(self, tenant: str, dataset_id: str) -> jobs_pb2.Dataset:
        """Take the dataset from the tenant, and remove its text once no tenant has it; returns what it was.

        Raises NotFound when the tenant has no such dataset.
        """
        if not self.owns_dataset(tenant, dataset_id):
            raise NotFound(dataset_id)
        info = self.dataset_info(dataset_id, tenant)
        self._release_dataset(keys=[dataset_key(dataset_id), tenant_datasets_key(tenant)], args=[dataset_id])
        return info

    def dataset_tokens(self, dataset_id: str, tokenization: str, preprocess: str) -> tuple[int, int]:
        """(token count, distinct tokens) of the dataset under that tokenization."""
        n, vocab = self.r.hmget(dataset_key(dataset_id), text.stat_key("tokens", tokenization, preprocess),
                                text.stat_key("vocab", tokenization, preprocess))
        if n is None:
            raise NotFound(dataset_id)
        return int(n), int(vocab)

    def dataset_text(self, dataset_id: str) -> str:
        data = self.r.hget(dataset_key(dataset_id), "data")
        if data is None:
            raise NotFound(dataset_id)
        return data.decode("utf-8")

    # --------------------------------------------------------- checkpoints

    def put_checkpoint(self, lease: Lease, step: int, data: bytes) -> bool:
        """Replace the job's checkpoint whole, with its event: a reader sees the old one or the new one.

        Returns False, writing nothing, when the stored checkpoint is as new.
        Raises Fenced when `lease` no longer owns the job.
        """
        event = _checkpoint_event(lease.job_id, step, data)
        result = self._checkpoint(keys=_checkpoint_keys(lease.job_id),
                                  args=[*self._fence_args(lease), step, data, event])
        return self._fenced_result(lease, result)

    def put_best_checkpoint(self, lease: Lease, step: int, loss: float, data: bytes) -> bool:
        """Keep `data` as the job's best checkpoint if its evaluation's held-out `loss` is the lowest so far.

        Returns False, writing nothing, when the stored best is as good. Raises Fenced as put_checkpoint does.
        """
        event = _checkpoint_event(lease.job_id, step, data, best=True)
        result = self._best_checkpoint(keys=_checkpoint_keys(lease.job_id),
                                       args=[*self._fence_args(lease), step, data, event, repr(loss)])
        return self._fenced_result(lease, result)

    def put_latest_and_best_checkpoint(self, lease: Lease, step: int, loss: float, data: bytes) -> bool:
        """One save that is the latest checkpoint and, its evaluation's held-out `loss` being the lowest so far,
        the best one too: stored once, with one event.

        Each part is skipped as put_checkpoint and put_best_checkpoint skip it;
        returns False when both are. Raises Fenced as put_checkpoint does.
        """
        events = [_checkpoint_event(lease.job_id, step, data, best=True, also_latest=True),
                  _checkpoint_event(lease.job_id, step, data),
                  _checkpoint_event(lease.job_id, step, data, best=True)]
        result = self._latest_and_best_checkpoint(keys=_checkpoint_keys(lease.job_id),
                                                  args=[*self._fence_args(lease), step, data, repr(loss), *events])
        return self._fenced_result(lease, result)

    def get_checkpoint(self, job_id: str, which: str = "latest") -> tuple[int, bytes]:
        """(step, bytes) of the job's "latest" or "best" checkpoint, or of whichever of them is at step `which`.

        Raises NotFound (with the job id) when there is no such checkpoint.
        """
        found = self._checkpoint_of(keys=[checkpoint_key(job_id), best_checkpoint_key(job_id)], args=[which])
        if not found:
            raise NotFound(job_id)
        step, data = found
        return int(step), data

    def get_init(self, job_id: str) -> tuple[jobs_pb2.InitFrom, bytes] | None:
        """The checkpoint the job starts from (what was asked, and its bytes), or None when it starts fresh."""
        asked, data = self.r.hget(job_key(job_id), "init_from"), self.r.hget(init_key(job_id), "data")
        if asked is None or data is None:
            return None
        return jobs_pb2.InitFrom.FromString(asked), data

    def checkpoint_step(self, job_id: str, which: str = "latest") -> int:
        """The step of the job's "latest" or "best" checkpoint, or `which` itself when one of them is at that
        step; 0 when there is none. Read without the bytes."""
        latest, best = (self.r.hget(key, "step") for key in (checkpoint_key(job_id), best_checkpoint_key(job_id)))
        steps = {"latest": int(latest or 0), "best": int(best or 0)}
        if which in steps:
            return steps[which]
        return int(which) if which in {str(s) for s in steps.values() if s} else 0

    # ------------------------------------------------------------- replies

    def put_reply(self, request_id: str, reply: dict) -> None:
        """Hand a generate worker's reply to the server that waits for it (AsyncJobStore.wait_reply)."""
        key = reply_key(request_id)
        with self.r.pipeline(transaction=True) as p:
            p.lpush(key, json.dumps(reply))
            p.expire(key, REPLY_TTL_S)
            p.execute()

    # ------------------------------------------------------------- workers

    def heartbeat(self, name: str, advert: dict, jobs: list[str] | None = None) -> None:
        """Renew a worker's advertisement; `jobs`, when given, replaces the jobs it says it runs."""
        key = worker_key(name)
        stale = []
        if jobs is not None:
            fields = [f for f in map(_text, self.r.hkeys(key)) if f.startswith(_JOB_FIELD)]
            stale = [f for f in fields if f[len(_JOB_FIELD):] not in jobs]
        with self.r.pipeline(transaction=True) as p:
            p.hset(key, mapping={**advert, "last_seen": time.time(), **{_JOB_FIELD + j: 1 for j in jobs or ()}})
            p.sadd(WORKERS_KEY, name)
            if stale:
                p.hdel(key, *stale)
            p.expire(key, WORKER_TTL_S)
            p.execute()

    def set_worker_job(self, name: str, job_id: str, running: bool = True) -> None:
        """Record in a worker's advertisement that it runs `job_id` now, or (running=False) no longer.

        A worker may run several jobs at once, each recorded apart. The write
        renews the entry's expiry too: a worker that dies mid-job must not
        leave an entry behind that never expires.
        """
        with self.r.pipeline(transaction=True) as p:
            if running:
                p.hset(worker_key(name), _JOB_FIELD + job_id, 1)
            else:
                p.hdel(worker_key(name), _JOB_FIELD + job_id)
            p.expire(worker_key(name), WORKER_TTL_S)
            p.execute()

    def remove_worker(self, name: str) -> None:
        with self.r.pipeline(transaction=True) as p:
            p.delete(worker_key(name))
            p.srem(WORKERS_KEY, name)
            p.execute()

    def workers(self) -> list[jobs_pb2.Worker]:
        """The advertised workers. An entry that is not a whole advertisement is skipped, and logged once.

        Such an entry can only come from outside this version's workers (an
        older release, a hand-made key); it must never fail the calls that
        read the list, such as every SubmitJob.
        """
        # By the names' set, not a SCAN: a SCAN walks every key of every job, and this runs with each SubmitJob.
        names = sorted(_text(n) for n in self.r.smembers(WORKERS_KEY))
        keys = [worker_key(n) for n in names]
        with self.r.pipeline(transaction=False) as p:
            for k in keys:
                p.hgetall(k)
            raws = p.execute()
        expired = [n for n, raw in zip(names, raws) if not raw]
        if expired:
            self.r.srem(WORKERS_KEY, *expired)
        out = []
        for key, raw in zip(keys, raws):
            if not raw:
                continue
            try:
                out.append(_worker_from_hash(raw))
            except (KeyError, ValueError, UnicodeDecodeError) as e:
                name = _text(key)
                if name not in _malformed_workers_logged:
                    _malformed_workers_logged.add(name)
                    log.warning("skipping the malformed worker entry %s (%s: %s)", name, type(e).__name__, e)
        return out


# Worker entries already reported as malformed, so that each costs one log line, not one per read.
_malformed_workers_logged: set[str] = set()
# A worker's hash has one field per job it runs: this prefix and the job's id.
_JOB_FIELD = "job:"


def _worker_from_hash(raw: dict) -> jobs_pb2.Worker:
    g = {k.decode(): v.decode() for k, v in raw.items()}
    jobs = sorted(k[len(_JOB_FIELD):] for k in g if k.startswith(_JOB_FIELD))
    return jobs_pb2.Worker(
        name=g["name"],
        queues=g.get("queues", "").split(","),
        device=g.get("device", ""),
        hostname=g.get("hostname", ""),
        pid=int(g.get("pid", 0)),
        started_at=timestamp(float(g.get("started", 0))),
        last_seen=timestamp(float(g["last_seen"])),
        job_id=jobs[0] if jobs else "",
        job_ids=jobs,
        memory_budget_bytes=int(g.get("memory_budget", 0)),
        heartbeat_interval_s=float(g.get("heartbeat_interval_s", HEARTBEAT_S)),
        concurrency=int(g.get("concurrency", 1)),
        memory_reserved_bytes=int(g.get("memory_reserved", 0)),
    )


def _log_line(entry_id: bytes, fields: dict) -> jobs_pb2.LogLine:
    g = {k.decode(): v.decode(errors="replace") for k, v in fields.items()}
    return jobs_pb2.LogLine(cursor=_text(entry_id), time=timestamp(float(g["t"])), level=g["l"], logger=g["n"],
                            attempt=int(g["a"]), message=g["m"])


def _losses_key(sweep_id: str) -> str:
    return f"{sweep_key(sweep_id)}:losses"


def _checkpoint_keys(job_id: str) -> list[str]:
    """The KEYS of the checkpoint scripts (scripts.KEEP_SHARED_BEST)."""
    return [job_key(job_id), events_key(job_id), checkpoint_key(job_id), best_checkpoint_key(job_id)]


def _checkpoint_event(job_id: str, step: int, data: bytes, *, best: bool = False, also_latest: bool = False) -> bytes:
    saved = jobs_pb2.CheckpointSaved(step=step, size_bytes=len(data), best=best, also_latest=also_latest)
    return encode_event(jobs_pb2.Event(job_id=job_id, time=timestamp(time.time()), checkpoint=saved))


def _sweep_from_hash(sweep_id: str, raw: dict) -> jobs_pb2.Sweep:
    sweep = jobs_pb2.Sweep(
        id=sweep_id, spec=jobs_pb2.SweepSpec.FromString(raw[b"spec"]), name=raw[b"name"].decode(),
        tags=_tags_from(raw.get(b"tags", b"").decode()), note=raw[b"note"].decode(),
        created_at=timestamp(float(raw[b"created"])))
    for job_id, values in json.loads(raw[b"members"]):
        sweep.members.add(job_id=job_id, values=values)
    return sweep


def _tally(sweep: jobs_pb2.Sweep, jobs: list[jobs_pb2.Job]) -> None:
    """Count the members by state and name the one with the lowest held-out loss."""
    counts = {jobs_pb2.QUEUED: "queued", jobs_pb2.RUNNING: "running", jobs_pb2.SUCCEEDED: "succeeded",
              jobs_pb2.FAILED: "failed", jobs_pb2.CANCELLED: "cancelled"}
    best = None
    for job in jobs:
        attr = counts[job.state]
        setattr(sweep, attr, getattr(sweep, attr) + 1)
        if job.summary.best_step and (best is None or job.summary.best_val_loss < best.summary.best_val_loss):
            best = job
    if best is not None:
        sweep.best_job_id, sweep.best_val_loss = best.id, best.summary.best_val_loss


def _labels_of(job: jobs_pb2.Job) -> Labels:
    return Labels(job.name, dict(job.tags), job.note, job.sweep)


def _job_from_hash(job_id: str, raw: dict) -> jobs_pb2.Job:
    g = {k.decode(): v for k, v in raw.items()}
    job = jobs_pb2.Job(
        id=job_id,
        spec=jobs_pb2.JobSpec.FromString(g["spec"]),
        state=int(g["state"]),
        reason=g.get("reason", b"").decode(),
        worker=g.get("worker", b"").decode(),
        last_step=int(g.get("last_step", 0)),
        queue=g.get("queue", b"").decode(),
        checkpoint_step=int(g.get("checkpoint_step", 0)),
        attempt=int(g.get("attempt", 1)),
        tenant=g.get("tenant", b"").decode(),
        summary=jobs_pb2.JobSummary.FromString(g.get("summary", b"")),
        name=g.get("name", b"").decode(),
        tags=_tags_from(g.get("tags", b"").decode()),
        note=g.get("note", b"").decode(),
        best_checkpoint_step=int(g.get("best_checkpoint_step", 0)),
        init_from=jobs_pb2.InitFrom.FromString(g.get("init_from", b"")),
        sweep=g.get("sweep", b"").decode(),
    )
    for attr, name in (("created_at", "created"), ("started_at", "started"), ("finished_at", "finished")):
        if name in g:
            getattr(job, attr).CopyFrom(timestamp(float(g[name])))
    return job


# ------------------------------------------------------------------ the async face

# A blocking read must return well inside redis-py's 5 s socket timeout, and
# never ask for less than Redis's millisecond resolution (0 would block forever).
_BLOCK_MAX_S, _BLOCK_MIN_S = 1.0, 0.05


# How long a wake stream outlives its last nudge: one whose server died without deleting it goes then.
WAKE_TTL_S = 24 * 3600


class Wake:
    """A stream that one relay's blocking read_streams also waits on, so that a nudge ends the wait."""

    def __init__(self):
        self.key = wake_key(secrets.token_hex(8))
        self.seen = "0-0"  # the newest nudge a read has returned


class AsyncJobStore:
    """The reads the server's event loop waits on (event streams, generate replies), without a thread each.

    Everything else goes through JobStore from a thread; both know the same layout.
    """

    def __init__(self, client: aioredis.Redis):
        self.r = client

    @classmethod
    def from_url(cls, url: str) -> "AsyncJobStore":
        # One retry on a connection error: a pooled connection that a restarted Redis closed fails once, and
        # the retry opens a fresh one. (redis-py's asyncio client retries nothing by default.)
        return cls(aioredis.Redis.from_url(url, retry=AsyncRetry(NoBackoff(), 1),
                                           retry_on_error=[redis.ConnectionError]))

    async def close(self) -> None:
        await self.r.aclose()

    async def read_events(self, job_id: str, after: str, *, count: int) -> list[Stored]:
        """Up to `count` events after cursor `after` ("0-0": from the start), oldest first, without waiting."""
        replies = await self.r.xread({events_key(job_id): after}, count=count)
        return [stored_event(i, f) for i, f in replies[0][1]] if replies else []

    async def read_streams(self, afters: dict[str, str], *, count: int, block_s: float,
                           wake: Wake | None = None) -> dict[str, list[Stored]]:
        """For each job in `afters` (job id -> cursor), up to `count` of its events after that cursor.

        One read for all of them, waiting up to `block_s` (at most a second) for
        any to have one, or for a nudge of `wake` not seen yet; only jobs with
        events are in the answer.
        """
        block = int(1000 * max(_BLOCK_MIN_S, min(_BLOCK_MAX_S, block_s)))
        streams = {events_key(job_id): after for job_id, after in afters.items()}
        if wake is not None:
            streams[wake.key] = wake.seen
        replies = await self.r.xread(streams, count=count, block=block)
        prefix, out = len(events_key("")), {}
        for key, entries in replies or ():
            if wake is not None and _text(key) == wake.key:
                wake.seen = _text(entries[-1][0])
            else:
                out[_text(key)[prefix:]] = [stored_event(i, f) for i, f in entries]
        return out

    async def nudge(self, wake: Wake) -> None:
        """End a read_streams of `wake` that waits now, or make its next one return at once."""
        async with self.r.pipeline(transaction=True) as pipe:
            pipe.xadd(wake.key, {"n": 1}, maxlen=1, approximate=False)
            pipe.expire(wake.key, WAKE_TTL_S)
            await pipe.execute()

    async def forget(self, wake: Wake) -> None:
        await self.r.delete(wake.key)

    async def last_cursor(self, job_id: str) -> str:
        """The cursor of the job's newest event ("0-0" when it has none)."""
        newest = await self.r.xrevrange(events_key(job_id), count=1)
        return _text(newest[0][0]) if newest else "0-0"

    async def wait_reply(self, request_id: str, wait_s: float) -> dict | None:
        """The reply a generate worker pushed for `request_id`, or None when none came within `wait_s`."""
        key = reply_key(request_id)
        deadline = time.monotonic() + wait_s
        while (left := deadline - time.monotonic()) > 0:
            popped = await self.r.blpop([key], timeout=max(_BLOCK_MIN_S, min(_BLOCK_MAX_S, left)))
            if popped:
                return json.loads(popped[1])
        return None

    async def read_history(self, job_id: str, after: str, *, count: int) -> list[jobs_pb2.Event]:
        """Up to `count` events after cursor `after` ("0-0": from the start), oldest first, each with its cursor.

        For readers that encode events their own way (the dashboard's JSON):
        Redis packs them into one string, and none of Stored's gRPC bytes are
        built. read_events, whose reply is parsed entry by entry, costs the
        reader about ten times the CPU an event, which made up most of what
        opening a long job's page cost the server.
        """
        packed = await self._history_script(keys=[events_key(job_id)], args=[after, count])
        events, at = [], 0
        while at < len(packed):
            space = packed.index(b" ", at)
            newline = packed.index(b"\n", space)
            start = newline + 1
            end = start + int(packed[space + 1:newline])
            event = jobs_pb2.Event.FromString(packed[start:end])
            event.cursor = packed[at:space].decode()
            events.append(event)
            at = end
        return events

    @functools.cached_property
    def _history_script(self):
        return self.r.register_script(_HISTORY)


# A stream's entries after a cursor (exclusive: Redis 6.2 and later), packed as "CURSOR LENGTH\nBYTES" one
# after another, where BYTES is the entry's encoded event.
_HISTORY = """
local entries = redis.call('XRANGE', KEYS[1], '(' .. ARGV[1], '+', 'COUNT', ARGV[2])
local out = {}
for i, entry in ipairs(entries) do
  local fields, event = entry[2], ''
  for j = 1, #fields, 2 do
    if fields[j] == 'e' then event = fields[j + 1] end
  end
  out[i] = entry[1] .. ' ' .. #event .. '\\n' .. event
end
return table.concat(out)
"""
