"""The dashboard, /metrics and /healthz: HTTP on --http-listen, served from the gRPC server's own event loop.

    /                    jobs, live          /api/jobs                   ListJobs (?state=RUNNING&limit=N)
    /jobs/JOB            one job, live       /api/jobs/JOB               GetJob, plus the newest event's cursor
    /compare?jobs=A,B    jobs side by side   /api/jobs/JOB/events        its events as Server-Sent Events
    /compare?sweep=S     a sweep's members   /api/sweeps, /api/sweeps/S  ListSweeps, GetSweep
    /workers             the workers         /api/jobs/JOB/cancel        POST: CancelJob
    /login               the token form      /api/jobs/JOB/generate      POST: Generate
    /healthz             whether Redis answers /api/jobs/JOB/checkpoint  DownloadCheckpoint, as a file
    /metrics             Prometheus          /api/workers                ListWorkers     /api/session  who, and the CSRF value

Every JSON endpoint calls the JobService's own RPC methods, with a stand-in
for the gRPC context, so the dashboard validates, authorizes and fails exactly
as the API does; their gRPC statuses become HTTP ones (NOT_FOUND is 404, and so
on). A page's event stream is the job's stored history, then the server's
event relay from where the history ended, like StreamEvents. The history comes
from `Histories`: read in one string per HISTORY_CHUNK events, sent as one SSE
message each, and kept (up to HISTORY_CACHE_BYTES) so that pages opening the
same job share one read. Each message (`batch_json`) has as `id` the cursor of
its last event. A browser that reconnects sends it back as Last-Event-ID (or
`?cursor=`), and the stream resumes right after it, with every event exactly
once. A stream that ends because the job did ends with an `end` message; one
cut short (the server stopping, a watcher too slow) just closes, and the
browser reconnects.

With tokens configured, every page and API call needs one: `authorization:
Bearer TOKEN`, or the HttpOnly, SameSite=Strict cookie the login form sets.
The calls that change anything are POSTs that must carry the X-CSRF-Token
header /api/session gives (a page on another site can neither read it nor
send the header without a CORS preflight that this server never answers).
/healthz and /metrics need no token, so that probes and scrapers reach them.
"""

from __future__ import annotations

import asyncio
import collections
import hashlib
import hmac
import json
import logging
import math
import re
from collections.abc import AsyncIterator
from pathlib import Path
from typing import NamedTuple

import grpc
import redis
from aiohttp import web
from google.protobuf import json_format

from gradserve.v1 import jobs_pb2
from gradserve_server import auth, errors
from gradserve_server.metrics import CONTENT_TYPE, Metrics
from gradserve_server.relay import HISTORY_READS
from gradserve_store import store

log = logging.getLogger("gradserve.web")

STATIC = Path(__file__).with_name("static")
SESSION_COOKIE = "gradserve_session"
CSRF_HEADER = "X-CSRF-Token"
# Served without a token. Logging out needs no check: forging one only logs a user out.
PUBLIC_PATHS = frozenset({"/healthz", "/metrics", "/login", "/logout", "/favicon.ico"})
# How long a browser waits before it reconnects a closed event stream, in milliseconds.
RECONNECT_MS = 1000
# How long the server waits for open requests when it stops; the event streams have ended by then.
SHUTDOWN_S = 2.0
# Events of a page's history read and sent at a time, as one message.
HISTORY_CHUNK = 1000
# Bytes of history messages kept for the pages that open a job next (about 90 bytes an event); the jobs opened
# least recently are dropped first.
HISTORY_CACHE_BYTES = 64 << 20
# The newest sweeps the compare page offers.
SWEEPS_LISTED = 100
# A cursor the history can be read after; anything else goes to the relay, which refuses it as the API does.
_STREAM_ID = re.compile(r"[0-9]{1,19}-[0-9]{1,19}")
_PAGES = {"/": "index.html", "/compare": "compare.html", "/workers": "workers.html"}
_HTTP_STATUS = {
    grpc.StatusCode.INVALID_ARGUMENT: 400,
    grpc.StatusCode.UNAUTHENTICATED: 401,
    grpc.StatusCode.NOT_FOUND: 404,
    grpc.StatusCode.FAILED_PRECONDITION: 409,
    grpc.StatusCode.RESOURCE_EXHAUSTED: 429,
    grpc.StatusCode.UNAVAILABLE: 503,
}


class Refused(Exception):
    """A servicer call that ended in a gRPC status other than OK."""

    def __init__(self, code: grpc.StatusCode, message: str):
        super().__init__(message)
        self.code, self.message = code, message

    @property
    def http_status(self) -> int:
        return _HTTP_STATUS.get(self.code, 500)


class _CallContext:
    """What the servicer's methods use of a gRPC context, for calls that come over HTTP."""

    def time_remaining(self):
        return None

    async def abort(self, code, details, trailing_metadata=()):
        raise Refused(code, details)


def _finite(x: float):
    # JSON has no NaN or infinity, and a diverged job's loss may be either.
    return x if math.isfinite(x) else None


# The columns a batch's metrics and evaluations go out as: nearly all of a long job's events are these, and
# columns of numbers cost the server and the browser about half what an object per event does.
METRICS_COLUMNS = ("cursor", "step", "loss", "perplexity", "tokens_per_sec", "lr", "grad_norm", "clipped")
EVALUATION_COLUMNS = ("cursor", "step", "loss", "perplexity", "metric", "value")


def batch_json(events: list[jobs_pb2.Event]) -> str:
    """A batch of events as the pages read it: {"metrics": {column: [...]}, "evaluation": {column: [...]},
    "events": [every other event, as an object]}, each kind in the order of its events, fields by their proto
    names; the objects carry their time in Unix seconds."""
    metrics = {c: [] for c in METRICS_COLUMNS}
    evaluation = {c: [] for c in EVALUATION_COLUMNS}
    others = []
    m_cursor, m_step, m_loss, m_ppl, m_speed, m_lr, m_norm, m_clipped = metrics.values()
    e_cursor, e_step, e_loss, e_ppl, e_metric, e_value = evaluation.values()
    for event in events:
        kind = event.WhichOneof("kind")
        if kind == "metrics":
            m = event.metrics
            m_cursor.append(event.cursor)
            m_step.append(m.step)
            m_loss.append(_finite(m.loss))
            m_ppl.append(_finite(m.perplexity))
            m_speed.append(m.tokens_per_sec)
            m_lr.append(m.lr)
            m_norm.append(_finite(m.grad_norm))
            m_clipped.append(m.clipped)
        elif kind == "evaluation":
            e = event.evaluation
            e_cursor.append(event.cursor)
            e_step.append(e.step)
            e_loss.append(_finite(e.loss))
            e_ppl.append(_finite(e.perplexity))
            e_metric.append(e.metric)
            e_value.append(_finite(e.value))
        else:
            others.append(event_json(event))
    out = {}
    if m_cursor:
        out["metrics"] = metrics
    if e_cursor:
        out["evaluation"] = evaluation
    if others:
        out["events"] = others
    return json.dumps(out, separators=(",", ":"))


def event_json(event: jobs_pb2.Event) -> dict:
    """A probe, status change, checkpoint or notice as an object: the fields the pages draw."""
    kind = event.WhichOneof("kind")
    out = {"cursor": event.cursor, "time": event.time.seconds + event.time.nanos / 1e9, "kind": kind}
    if kind == "probe":
        p = event.probe
        out.update(step=p.step, grad_through_time=[[_finite(x) for x in g.norms] for g in p.grad_through_time],
                   spectral_norms=[{"name": s.name, "gate": s.gate, "sigma": _finite(s.sigma)}
                                   for s in p.spectral_norms])
    elif kind == "status":
        s = event.status
        out.update(state=jobs_pb2.JobState.Name(s.state), reason=s.reason, worker=s.worker, step=s.step,
                   attempt=s.attempt, resumed_from_step=s.resumed_from_step)
    elif kind == "checkpoint":
        c = event.checkpoint
        out.update(step=c.step, size_bytes=c.size_bytes, kept="latest, best" if c.also_latest else
                   "best" if c.best else "latest")
    elif kind == "notice":
        out.update(code=event.notice.code, message=event.notice.message)
    return out


class Chunk(NamedTuple):
    """Consecutive events of a job as one event-stream message: `cursor` is its last event's, `ends` whether that
    event ends the job's stream."""

    message: bytes
    cursor: str
    events: int
    ends: bool

    @classmethod
    def of(cls, events: list[jobs_pb2.Event]) -> "Chunk":
        """The chunk of `events` up to the first that ends the job, if one does."""
        ends = False
        for i, event in enumerate(events):
            if store.is_terminal(event):
                events, ends = events[:i + 1], True
                break
        cursor = events[-1].cursor
        return cls(f"id: {cursor}\ndata: {batch_json(events)}\n\n".encode(), cursor, len(events), ends)


class _History:
    """A job's history as kept for pages: its chunks from the first event on, each HISTORY_CHUNK events long but
    the one that ends the job. A partial chunk is never kept: the events after the last full one are read again
    by each read that extends the history. Stored events never change, so neither do kept chunks."""

    def __init__(self):
        self.chunks: list[Chunk] = []
        # The index of the first chunk after each cursor a page may resume from.
        self.after = {"0-0": 0}
        self.size = 0
        # The read adding chunks, while one runs; it returns the partial chunk after them, if any.
        self.reading: asyncio.Task | None = None
        # Set, and replaced, whenever a chunk is added or the read ends.
        self.changed = asyncio.Event()

    @property
    def ends(self) -> bool:
        return bool(self.chunks) and self.chunks[-1].ends

    def add(self, chunk: Chunk) -> None:
        self.chunks.append(chunk)
        self.after[chunk.cursor] = len(self.chunks)
        self.size += len(chunk.message)
        self.change()

    def change(self) -> None:
        self.changed.set()
        self.changed = asyncio.Event()


class Histories:
    """Jobs' stored histories as event-stream messages, for the pages that open them.

    A page opening a job from its start (or resuming at a chunk's end) gets
    the chunks kept for it, and each new one as a read that extends them to
    the job's last full chunk adds it; pages opening the same job at once share
    one such read, which goes on if they leave. The partial chunk after the
    full ones is sent to the pages that read shared, not kept. Any other cursor
    is read for its page alone. Reads go through `astore.read_history`, at most
    HISTORY_READS at a time. The least recently opened jobs are dropped beyond
    `limit` bytes.
    """

    def __init__(self, astore: store.AsyncJobStore, limit: int = HISTORY_CACHE_BYTES):
        self.astore, self.limit = astore, limit
        self._jobs: collections.OrderedDict[str, _History] = collections.OrderedDict()
        self._reads = asyncio.Semaphore(HISTORY_READS)

    def __len__(self) -> int:
        """Jobs whose history is kept."""
        return len(self._jobs)

    @property
    def size(self) -> int:
        return sum(h.size for h in self._jobs.values())

    async def chunks(self, job_id: str, after: str = "0-0") -> AsyncIterator[Chunk]:
        """The job's stored events after cursor `after` ("0-0": all), oldest first, as chunks; the last ends the
        job's stream or was the newest event stored when it was read."""
        history = self._jobs.get(job_id)
        if after == "0-0" or (history is not None and after in history.after):
            if history is None:
                history = self._jobs[job_id] = _History()
            self._jobs.move_to_end(job_id)
            if history.reading is None:
                history.reading = asyncio.create_task(self._extend(job_id, history))
                # Retrieved here too, so that a failed read whose pages have all left is not reported as lost.
                history.reading.add_done_callback(lambda task: task.cancelled() or task.exception())
            reading, next_chunk = history.reading, history.after[after]
            while True:
                # Taken before the chunks are looked at: a chunk added meanwhile sets it.
                changed = history.changed
                while next_chunk < len(history.chunks):
                    yield history.chunks[next_chunk]
                    next_chunk += 1
                if reading.done() or history.reading is not reading:
                    break
                await changed.wait()
            # Shielded: a page that leaves must not stop the read the others share.
            tail = await asyncio.shield(reading)
            self._keep(job_id, history)
            if tail is not None:
                yield tail
            return
        last = after
        while True:
            events = await self._read(job_id, last)
            if not events:
                return
            chunk = Chunk.of(events)
            yield chunk
            if chunk.ends or len(events) < HISTORY_CHUNK:
                return
            last = chunk.cursor

    async def _extend(self, job_id: str, history: _History) -> Chunk | None:
        """Read and keep the job's full chunks after those kept; the partial one after them, if any, is not kept
        but returned."""
        try:
            while not history.ends:
                events = await self._read(job_id, history.chunks[-1].cursor if history.chunks else "0-0")
                if not events:
                    return None
                chunk = Chunk.of(events)
                if not (chunk.ends or chunk.events == HISTORY_CHUNK):
                    return chunk
                history.add(chunk)
            return None
        finally:
            history.reading = None
            history.change()

    def close(self) -> None:
        """Stop the reads under way: the server is stopping."""
        for history in self._jobs.values():
            if history.reading is not None:
                history.reading.cancel()

    async def _read(self, job_id: str, after: str) -> list[jobs_pb2.Event]:
        async with self._reads:
            return await self.astore.read_history(job_id, after, count=HISTORY_CHUNK)

    def _keep(self, job_id: str, history: _History) -> None:
        # A history without a full chunk holds nothing worth keeping, and would never be dropped for its size.
        if not history.chunks and self._jobs.get(job_id) is history:
            del self._jobs[job_id]
        size = self.size
        while size > self.limit:
            _, history = self._jobs.popitem(last=False)
            size -= history.size


def message_json(message) -> dict:
    return json_format.MessageToDict(message, preserving_proto_field_name=True,
                                     always_print_fields_with_no_presence=True)


def csrf_value(basis: str) -> str:
    """The CSRF header value for a session: derived from its token, so it needs no server-side state."""
    return hashlib.sha256(b"gradserve-csrf\0" + basis.encode()).hexdigest()


class Dashboard:
    """The HTTP face of one server process: `service` is its JobService, `tokens` its configured tokens."""

    def __init__(self, service, metrics: Metrics, tokens: dict[bytes, str] | None = None):
        self.service, self.metrics = service, metrics
        self.authenticator = auth.Authenticator(tokens) if tokens else None
        self.histories = Histories(service.relay.astore)
        self.app = web.Application(middlewares=[self._authenticate])
        self.app.add_routes([
            web.get("/healthz", self.healthz),
            web.get("/favicon.ico", self.no_icon),
            web.get("/metrics", self.prometheus),
            web.get("/login", self.login_page),
            web.post("/login", self.login),
            web.post("/logout", self.logout),
            web.get("/", self.page),
            web.get("/compare", self.page),
            web.get("/workers", self.page),
            web.get("/jobs/{job_id}", self.job_page),
            web.get("/api/session", self.session),
            web.get("/api/jobs", self.list_jobs),
            web.get("/api/jobs/{job_id}", self.get_job),
            web.get("/api/jobs/{job_id}/events", self.events),
            web.get("/api/jobs/{job_id}/checkpoint", self.checkpoint),
            web.post("/api/jobs/{job_id}/cancel", self.cancel),
            web.post("/api/jobs/{job_id}/generate", self.generate),
            web.get("/api/workers", self.workers),
            web.get("/api/sweeps", self.list_sweeps),
            web.get("/api/sweeps/{sweep_id}", self.get_sweep),
            web.static("/static", STATIC),
        ])
        self._runner: web.AppRunner | None = None

    async def start(self, listen: str) -> str:
        """Serve on `listen` (host:port; port 0 picks one); returns the address bound."""
        host, _, port = listen.rpartition(":")
        # Cancelled when its client leaves, so an idle event stream gives its relay watcher back at once.
        self._runner = web.AppRunner(self.app, handler_cancellation=True, access_log=None,
                                     shutdown_timeout=SHUTDOWN_S)
        await self._runner.setup()
        site = web.TCPSite(self._runner, host.strip("[]") or "0.0.0.0", int(port), reuse_port=False)
        try:
            await site.start()
        except OSError:
            await self._runner.cleanup()
            raise
        bound = self._runner.addresses[0]
        return f"{host}:{bound[1]}"

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
        self.histories.close()

    # ------------------------------------------------------------ auth

    def _caller(self, request: web.Request) -> tuple[str | None, str]:
        """(tenant, the token the session is based on): tenant None when a token is needed and missing or unknown."""
        if self.authenticator is None:
            return "", ""
        header = request.headers.get("Authorization", "")
        if header.startswith("Bearer "):
            # A bearer header is never sent by a browser on its own, so it needs no CSRF check: basis None.
            return self.authenticator.tenant_for(header[len("Bearer "):].strip()), None
        token = request.cookies.get(SESSION_COOKIE, "")
        return (self.authenticator.tenant_for(token) if token else None), token

    @web.middleware
    async def _authenticate(self, request: web.Request, handler):
        if request.path in PUBLIC_PATHS or request.path.startswith("/static/"):
            return await handler(request)
        tenant, basis = self._caller(request)
        if tenant is None:
            if request.path.startswith("/api/"):
                return _error(401, "this server requires a token: log in at /login, or send "
                                   "`Authorization: Bearer TOKEN`")
            return web.FileResponse(STATIC / "login.html", status=401)
        if request.method == "POST":
            origin = request.headers.get("Origin")
            if origin and origin.split("://", 1)[-1] != request.host:
                return _error(403, f"cross-origin request from {origin} refused")
            if basis is not None and not hmac.compare_digest(request.headers.get(CSRF_HEADER, ""), csrf_value(basis)):
                return _error(403, f"missing or wrong {CSRF_HEADER} header; pages send the one /api/session gives")
        request["basis"] = basis
        auth.current_tenant.set(tenant)
        return await handler(request)

    async def login_page(self, request: web.Request) -> web.StreamResponse:
        return web.FileResponse(STATIC / "login.html")

    async def login(self, request: web.Request) -> web.StreamResponse:
        if self.authenticator is None:
            raise web.HTTPSeeOther("/")
        origin = request.headers.get("Origin")
        if origin and origin.split("://", 1)[-1] != request.host:
            return _error(403, f"cross-origin login from {origin} refused")
        token = str((await request.post()).get("token", "")).strip()
        if not token or self.authenticator.tenant_for(token) is None:
            raise web.HTTPSeeOther("/login?failed=1")
        response = web.HTTPSeeOther("/")
        response.set_cookie(SESSION_COOKIE, token, httponly=True, samesite="Strict", path="/", secure=request.secure)
        return response

    async def logout(self, request: web.Request) -> web.StreamResponse:
        response = web.HTTPSeeOther("/login")
        response.del_cookie(SESSION_COOKIE, path="/")
        return response

    async def session(self, request: web.Request) -> web.StreamResponse:
        basis = request["basis"]
        return web.json_response({"tenant": auth.current_tenant.get(), "auth": self.authenticator is not None,
                                  "csrf": csrf_value(basis or "")})

    # ------------------------------------------------------------ health and metrics

    async def no_icon(self, request: web.Request) -> web.StreamResponse:
        # Pages name an empty icon, but a browser still asks for /favicon.ico for what is not a page (a JSON
        # answer opened in a tab, a redirect): "none" rather than a 404 in its console.
        return web.Response(status=204)

    async def healthz(self, request: web.Request) -> web.StreamResponse:
        try:
            await asyncio.to_thread(self.service.store.ping)
        except redis.RedisError as e:
            return web.json_response({"redis": "unreachable", "error": str(e)}, status=503)
        return web.json_response({"redis": "ok"})

    async def prometheus(self, request: web.Request) -> web.StreamResponse:
        try:
            await asyncio.to_thread(self.metrics.refresh)
        except redis.RedisError as e:
            log.warning("metrics: redis unreachable (%s); serving the last values read", e)
        return web.Response(body=self.metrics.exposition(), headers={"Content-Type": CONTENT_TYPE})

    # ------------------------------------------------------------ pages

    async def page(self, request: web.Request) -> web.StreamResponse:
        return web.FileResponse(STATIC / _PAGES[request.path])

    async def job_page(self, request: web.Request) -> web.StreamResponse:
        # The same answer as the API's for a job that is missing or another tenant's.
        await self._call("GetJob", jobs_pb2.GetJobRequest(job_id=request.match_info["job_id"]))
        return web.FileResponse(STATIC / "job.html")

    # ------------------------------------------------------------ the API

    async def _call(self, method: str, message):
        try:
            return await getattr(self.service, method)(message, _CallContext())
        except Refused as e:
            raise _http_error(e) from None

    async def list_jobs(self, request: web.Request) -> web.StreamResponse:
        state = request.query.get("state", "")
        if state and state not in jobs_pb2.JobState.keys():
            return _error(400, f"state must be one of {', '.join(jobs_pb2.JobState.keys()[1:])}, got {state!r}")
        try:
            limit = int(request.query.get("limit", "0"))
        except ValueError:
            return _error(400, f"limit must be a whole number, got {request.query['limit']!r}")
        reply = await self._call("ListJobs", jobs_pb2.ListJobsRequest(
            state=jobs_pb2.JobState.Value(state) if state else 0, limit=max(limit, 0)))
        return web.json_response({"jobs": [message_json(j) for j in reply.jobs]})

    async def get_job(self, request: web.Request) -> web.StreamResponse:
        job_id = request.match_info["job_id"]
        job = await self._call("GetJob", jobs_pb2.GetJobRequest(job_id=job_id))
        # A page drawing the history knows it has caught up once it has this event.
        newest = await self.service.relay.newest(job_id)
        return web.json_response({"job": message_json(job), "newest_cursor": "" if newest == "0-0" else newest})

    async def cancel(self, request: web.Request) -> web.StreamResponse:
        job = await self._call("CancelJob", jobs_pb2.CancelJobRequest(job_id=request.match_info["job_id"]))
        return web.json_response({"job": message_json(job)})

    async def generate(self, request: web.Request) -> web.StreamResponse:
        try:
            body = await request.json()
            ask = jobs_pb2.GenerateRequest(job_id=request.match_info["job_id"], prefix=str(body.get("prefix", "")),
                                           num_tokens=int(body.get("num_tokens", 200)),
                                           temperature=float(body.get("temperature", 1.0)),
                                           seed=int(body.get("seed", 0)))
        except (ValueError, TypeError, AttributeError) as e:
            return _error(400, f"the body must be JSON like {{\"prefix\": \"The \", \"num_tokens\": 200, "
                               f"\"temperature\": 0.8}}: {e}")
        reply = await self._call("Generate", ask)
        return web.json_response({"text": reply.text, "step": reply.step})

    async def checkpoint(self, request: web.Request) -> web.StreamResponse:
        job_id = request.match_info["job_id"]
        chunks = self.service.DownloadCheckpoint(jobs_pb2.DownloadCheckpointRequest(job_id=job_id), _CallContext())
        try:
            first = await anext(chunks)
        except Refused as e:
            raise _http_error(e) from None
        response = web.StreamResponse(headers={
            "Content-Type": "application/octet-stream", "Content-Length": str(first.total_bytes),
            "Content-Disposition": f'attachment; filename="{job_id}-step{first.step}.pt"'})
        await response.prepare(request)
        await response.write(first.data)
        async for chunk in chunks:
            await response.write(chunk.data)
        await response.write_eof()
        return response

    async def list_sweeps(self, request: web.Request) -> web.StreamResponse:
        reply = await self._call("ListSweeps", jobs_pb2.ListSweepsRequest(limit=SWEEPS_LISTED))
        return web.json_response({"sweeps": [message_json(s) for s in reply.sweeps]})

    async def get_sweep(self, request: web.Request) -> web.StreamResponse:
        sweep = await self._call("GetSweep", jobs_pb2.GetSweepRequest(sweep_id=request.match_info["sweep_id"]))
        return web.json_response({"sweep": message_json(sweep)})

    async def workers(self, request: web.Request) -> web.StreamResponse:
        reply = await self._call("ListWorkers", jobs_pb2.ListWorkersRequest())
        return web.json_response({"workers": [message_json(w) for w in reply.workers]})

    async def events(self, request: web.Request) -> web.StreamResponse:
        job_id = request.match_info["job_id"]
        cursor = request.headers.get("Last-Event-ID") or request.query.get("cursor", "")
        # Checked before the response starts, so that a missing job is a 404 and not an event.
        await self._call("GetJob", jobs_pb2.GetJobRequest(job_id=job_id))
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-store",
                                               "X-Accel-Buffering": "no"})
        await response.prepare(request)
        await response.write(f"retry: {RECONNECT_MS}\n\n".encode())
        relay = self.service.relay
        try:
            if not cursor or _STREAM_ID.fullmatch(cursor):
                async for chunk in self.histories.chunks(job_id, cursor or "0-0"):
                    await response.write(chunk.message)
                    # /metrics counts the events pages get, however they were read.
                    relay.relayed += chunk.events
                    cursor = chunk.cursor
                    if chunk.ends:
                        await response.write(b"event: end\ndata: {}\n\n")
                        return response
            # The relay goes on from the history's last event: what came since, then what comes.
            cut = False
            async for batch in self.service.follow(jobs_pb2.StreamEventsRequest(job_id=job_id, cursor=cursor)):
                events = [item.event for item in batch if not item.event.HasField("notice")]
                if events:
                    await response.write(f"id: {events[-1].cursor}\ndata: {batch_json(events)}\n\n".encode())
                # A notice means the stream was cut short: the browser reconnects with its last id.
                cut = len(events) < len(batch)
        except (errors.Exhausted, redis.ConnectionError, redis.TimeoutError):
            # Too many streams on this process, or Redis away: the browser retries after RECONNECT_MS.
            return response
        except errors.ServiceError as e:
            await response.write(f"event: failed\ndata: {json.dumps({'error': e.message})}\n\n".encode())
            return response
        # Not cut short: the job has ended, and the stream gave every event up to its last.
        if not cut:
            await response.write(b"event: end\ndata: {}\n\n")
        return response


_HTTP_ERRORS = {400: web.HTTPBadRequest, 401: web.HTTPUnauthorized, 404: web.HTTPNotFound, 409: web.HTTPConflict,
                429: web.HTTPTooManyRequests, 503: web.HTTPServiceUnavailable}


def _http_error(e: Refused) -> web.HTTPException:
    return _HTTP_ERRORS.get(e.http_status, web.HTTPInternalServerError)(
        text=json.dumps({"error": e.message, "code": e.code.name}), content_type="application/json")


def _error(status: int, message: str) -> web.Response:
    return web.json_response({"error": message}, status=status)
