"""Everything gradserve keeps in Redis, and the only code that knows its layout.

The server and the workers share nothing else, so both import this module:
the server to create, list and cancel jobs and to read event streams, the
worker to move a job through its states, append events and write checkpoints.

Keys (all under ``gradserve:``):

    job:{id}        hash    spec (JobSpec bytes), state, queue, times, reason, worker, steps, cancel flag
    jobs            zset    job id -> creation time, for listing newest first
    events:{id}     stream  one entry per Event (field "e", Event bytes; the entry id is the cursor)
    dataset:{id}    hash    data (UTF-8 text), name, size, num_chars, token counts per tokenization
    builtin:{name}  string  the dataset id a built-in corpus is stored under
    ckpt:{id}       hash    data (the trainer's bytes), step; replaced whole by RENAME
    worker:{name}   hash    a worker's advertisement; expires unless its heartbeat renews it
"""

from __future__ import annotations

import hashlib
import secrets
import time
from dataclasses import dataclass

import redis
from google.protobuf.timestamp_pb2 import Timestamp

from gradserve.v1 import jobs_pb2

PREFIX = "gradserve:"
TERMINAL = frozenset({jobs_pb2.SUCCEEDED, jobs_pb2.FAILED, jobs_pb2.CANCELLED})
WORKER_TTL_S = 15


def job_key(job_id: str) -> str:
    return f"{PREFIX}job:{job_id}"


def events_key(job_id: str) -> str:
    return f"{PREFIX}events:{job_id}"


def dataset_key(dataset_id: str) -> str:
    return f"{PREFIX}dataset:{dataset_id}"


def checkpoint_key(job_id: str) -> str:
    return f"{PREFIX}ckpt:{job_id}"


def worker_key(name: str) -> str:
    return f"{PREFIX}worker:{name}"


def builtin_key(name: str) -> str:
    return f"{PREFIX}builtin:{name}"


JOBS_KEY = f"{PREFIX}jobs"


def timestamp(seconds: float) -> Timestamp:
    ts = Timestamp()
    ts.FromNanoseconds(int(seconds * 1e9))
    return ts


def encode_event(event: jobs_pb2.Event) -> bytes:
    return event.SerializeToString()


def decode_event(entry_id: bytes | str, fields: dict) -> jobs_pb2.Event:
    """An Event read from a stream entry, with the entry id as its cursor."""
    event = jobs_pb2.Event.FromString(fields[b"e"])
    event.cursor = entry_id.decode() if isinstance(entry_id, bytes) else entry_id
    return event


def status_event(job_id: str, state: int, reason: str = "", worker: str = "", step: int = 0) -> jobs_pb2.Event:
    return jobs_pb2.Event(
        job_id=job_id,
        time=timestamp(time.time()),
        status=jobs_pb2.StatusChange(state=state, reason=reason, worker=worker, step=step),
    )


def is_terminal(event: jobs_pb2.Event) -> bool:
    return event.WhichOneof("kind") == "status" and event.status.state in TERMINAL


# A state change and its status event are one atomic step, so a watcher that
# sees the event can rely on the record, and a job can never be moved out of a
# state twice (a cancel racing a worker's start, say).
#   KEYS: job hash, event stream
#   ARGV: allowed current states (comma separated), new state, event bytes, field, value, ...
#   Returns {1, entry id} on success, {0, current state} when refused, {-1} when there is no job.
_TRANSITION = """
local state = redis.call('HGET', KEYS[1], 'state')
if not state then return {-1} end
for allowed in string.gmatch(ARGV[1], '[^,]+') do
  if allowed == state then
    local fields = {'state', ARGV[2]}
    for i = 4, #ARGV do fields[#fields + 1] = ARGV[i] end
    redis.call('HSET', KEYS[1], unpack(fields))
    return {1, redis.call('XADD', KEYS[2], '*', 'e', ARGV[3])}
  end
end
return {0, state}
"""


@dataclass
class Refused(Exception):
    """A state change that the job's current state does not allow."""

    job_id: str
    state: int

    def __str__(self) -> str:
        return f"job {self.job_id} is {jobs_pb2.JobState.Name(self.state)}"


class NotFound(KeyError):
    pass


def new_job_id() -> str:
    return "job-" + secrets.token_hex(10)


def dataset_id_for(data: bytes) -> str:
    return "ds-" + hashlib.sha256(data).hexdigest()


class JobStore:
    """Synchronous access to the shared Redis. The async server calls it from a thread."""

    def __init__(self, client: redis.Redis):
        self.r = client
        self._transition = client.register_script(_TRANSITION)

    @classmethod
    def from_url(cls, url: str) -> "JobStore":
        # redis-py 8 sets a 5 s socket timeout by default; nothing here blocks that long.
        return cls(redis.Redis.from_url(url, health_check_interval=30))

    # ---------------------------------------------------------------- jobs

    def create_job(self, job_id: str, spec: jobs_pb2.JobSpec, queue: str) -> jobs_pb2.Job:
        now = time.time()
        event = status_event(job_id, jobs_pb2.QUEUED)
        with self.r.pipeline(transaction=True) as p:
            p.hset(
                job_key(job_id),
                mapping={"spec": spec.SerializeToString(), "state": jobs_pb2.QUEUED, "queue": queue, "created": now},
            )
            p.zadd(JOBS_KEY, {job_id: now})
            p.xadd(events_key(job_id), {"e": encode_event(event)})
            p.execute()
        return self.get_job(job_id)

    def get_job(self, job_id: str) -> jobs_pb2.Job:
        raw = self.r.hgetall(job_key(job_id))
        if not raw:
            raise NotFound(job_id)
        return _job_from_hash(job_id, raw)

    def list_jobs(self, limit: int, state: int = 0) -> list[jobs_pb2.Job]:
        jobs = []
        # Filtering happens after reading, so read in pages until enough match.
        start = 0
        while len(jobs) < limit:
            ids = self.r.zrevrange(JOBS_KEY, start, start + 4 * limit - 1)
            if not ids:
                break
            start += len(ids)
            with self.r.pipeline(transaction=False) as p:
                for i in ids:
                    p.hgetall(job_key(i.decode()))
                raws = p.execute()
            for i, raw in zip(ids, raws):
                if raw and (not state or int(raw[b"state"]) == state):
                    jobs.append(_job_from_hash(i.decode(), raw))
        return jobs[:limit]

    def transition(self, job_id: str, allowed: set[int], new_state: int, *, reason: str = "", worker: str = "",
                   step: int = 0, fields: dict | None = None) -> str:
        """Move the job to `new_state` if it is in one of `allowed`, with its status event; returns the cursor."""
        extra = dict(fields or {})
        if reason:
            extra["reason"] = reason
        if worker:
            extra["worker"] = worker
        now = time.time()
        if new_state == jobs_pb2.RUNNING:
            extra["started"] = now
        if new_state in TERMINAL:
            extra["finished"] = now
        event = status_event(job_id, new_state, reason=reason, worker=worker, step=step)
        args = [",".join(str(s) for s in sorted(allowed)), new_state, encode_event(event)]
        for k, v in extra.items():
            args += [k, v]
        result = self._transition(keys=[job_key(job_id), events_key(job_id)], args=args)
        if result[0] == -1:
            raise NotFound(job_id)
        if result[0] == 0:
            raise Refused(job_id, int(result[1]))
        return result[1].decode()

    def request_cancel(self, job_id: str) -> jobs_pb2.Job:
        """Cancel a queued job now, or flag a running one for its worker to stop at its next step.

        Cancelling a cancelled job is a no-op; a job that already succeeded or failed is Refused.
        """
        try:
            self.transition(job_id, {jobs_pb2.QUEUED}, jobs_pb2.CANCELLED, reason="cancelled before it started")
        except Refused as e:
            if e.state == jobs_pb2.RUNNING:
                self.r.hset(job_key(job_id), "cancel", 1)
            elif e.state != jobs_pb2.CANCELLED:
                raise
        return self.get_job(job_id)

    def cancel_requested(self, job_id: str) -> bool:
        return self.r.hget(job_key(job_id), "cancel") == b"1"

    def spec(self, job_id: str) -> jobs_pb2.JobSpec:
        raw = self.r.hget(job_key(job_id), "spec")
        if raw is None:
            raise NotFound(job_id)
        return jobs_pb2.JobSpec.FromString(raw)

    # -------------------------------------------------------------- events

    def append_metrics(self, job_id: str, metrics: jobs_pb2.Metrics) -> None:
        event = jobs_pb2.Event(job_id=job_id, time=timestamp(time.time()), metrics=metrics)
        with self.r.pipeline(transaction=True) as p:
            p.xadd(events_key(job_id), {"e": encode_event(event)})
            p.hset(job_key(job_id), "last_step", metrics.step)
            p.execute()

    def events_after(self, job_id: str, cursor: str = "", count: int = 1000) -> list[jobs_pb2.Event]:
        """Events strictly after `cursor` (all of them when it is empty), oldest first."""
        start = f"({cursor}" if cursor else "-"
        return [decode_event(i, f) for i, f in self.r.xrange(events_key(job_id), start, "+", count=count)]

    # ------------------------------------------------------------ datasets

    def put_dataset(self, data: bytes, name: str, num_chars: int, token_counts: dict[str, int]) -> jobs_pb2.Dataset:
        dataset_id = dataset_id_for(data)
        key = dataset_key(dataset_id)
        if not self.r.exists(key):
            mapping = {"data": data, "name": name, "size": len(data), "num_chars": num_chars}
            mapping.update({f"tokens:{k}": v for k, v in token_counts.items()})
            self.r.hset(key, mapping=mapping)
        return self.dataset_info(dataset_id)

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

    def dataset_info(self, dataset_id: str) -> jobs_pb2.Dataset:
        name, size, num_chars = self.r.hmget(dataset_key(dataset_id), "name", "size", "num_chars")
        if size is None:
            raise NotFound(dataset_id)
        return jobs_pb2.Dataset(id=dataset_id, name=name.decode(), size_bytes=int(size), num_chars=int(num_chars))

    def dataset_tokens(self, dataset_id: str, tokenization: str, preprocess: str) -> int:
        n = self.r.hget(dataset_key(dataset_id), f"tokens:{tokenization}:{preprocess}")
        if n is None:
            raise NotFound(dataset_id)
        return int(n)

    def dataset_text(self, dataset_id: str) -> str:
        data = self.r.hget(dataset_key(dataset_id), "data")
        if data is None:
            raise NotFound(dataset_id)
        return data.decode("utf-8")

    # --------------------------------------------------------- checkpoints

    def put_checkpoint(self, job_id: str, step: int, data: bytes) -> None:
        """Replace the job's checkpoint whole: a reader sees the old one or the new one, never a mix."""
        tmp = checkpoint_key(job_id) + ":tmp"
        with self.r.pipeline(transaction=True) as p:
            p.delete(tmp)
            p.hset(tmp, mapping={"data": data, "step": step})
            p.rename(tmp, checkpoint_key(job_id))
            p.hset(job_key(job_id), "checkpoint_step", step)
            p.xadd(
                events_key(job_id),
                {"e": encode_event(jobs_pb2.Event(job_id=job_id, time=timestamp(time.time()),
                                                  checkpoint=jobs_pb2.CheckpointSaved(step=step, size_bytes=len(data))))},
            )
            p.execute()

    def get_checkpoint(self, job_id: str) -> tuple[int, bytes]:
        data, step = self.r.hmget(checkpoint_key(job_id), "data", "step")
        if data is None:
            raise NotFound(job_id)
        return int(step), data

    # ------------------------------------------------------------- workers

    def heartbeat(self, name: str, advert: dict) -> None:
        with self.r.pipeline(transaction=True) as p:
            p.hset(worker_key(name), mapping={**advert, "last_seen": time.time()})
            p.expire(worker_key(name), WORKER_TTL_S)
            p.execute()

    def set_worker_job(self, name: str, job_id: str) -> None:
        if job_id:
            self.r.hset(worker_key(name), "job_id", job_id)
        else:
            self.r.hdel(worker_key(name), "job_id")

    def remove_worker(self, name: str) -> None:
        self.r.delete(worker_key(name))

    def workers(self) -> list[jobs_pb2.Worker]:
        keys = sorted(self.r.scan_iter(match=worker_key("*"), count=500))
        with self.r.pipeline(transaction=False) as p:
            for k in keys:
                p.hgetall(k)
            raws = p.execute()
        out = []
        for raw in raws:
            if not raw:
                continue
            g = {k.decode(): v.decode() for k, v in raw.items()}
            out.append(
                jobs_pb2.Worker(
                    name=g["name"],
                    queues=g.get("queues", "").split(","),
                    device=g.get("device", ""),
                    hostname=g.get("hostname", ""),
                    pid=int(g.get("pid", 0)),
                    started_at=timestamp(float(g.get("started", 0))),
                    last_seen=timestamp(float(g["last_seen"])),
                    job_id=g.get("job_id", ""),
                )
            )
        return out


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
    )
    for field, name in (("created_at", "created"), ("started_at", "started"), ("finished_at", "finished")):
        if name in g:
            getattr(job, field).CopyFrom(timestamp(float(g[name])))
    return job
