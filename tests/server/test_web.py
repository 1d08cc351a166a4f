"""The HTTP side of the server (--http-listen): /healthz, /metrics, the JSON API and its auth, over real HTTP
against a real server, Redis and worker. The pages themselves are tested in a browser (tests/e2e/test_dashboard.py)."""

from __future__ import annotations

import asyncio
import json
import re
import time
import urllib.error
import urllib.parse
import urllib.request

import pytest

import gradserve
from conftest import ALICE, BOB
from gradserve.v1 import jobs_pb2
from gradserve_server import web
from gradserve_server.web import csrf_value
from gradserve_store import store

QUICK = dict(dataset="builtin:copy", model="rnn", hidden_size=8, batch_size=4, seq_len=12, max_steps=40,
             log_every=5, probe_every=10, checkpoint_every=20, eval_every=20, device="cpu")


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, *args, **kwargs):
        return None


_opener = urllib.request.build_opener(_NoRedirect)


def call(url: str, method: str = "GET", headers: dict | None = None, body: bytes | None = None):
    """(status, headers, body) of one HTTP request; redirects are answers too, not followed."""
    request = urllib.request.Request(url, data=body, method=method, headers=headers or {})
    try:
        with _opener.open(request, timeout=10) as reply:
            return reply.status, reply.headers, reply.read()
    except urllib.error.HTTPError as e:
        return e.code, e.headers, e.read()


@pytest.fixture(scope="module")
def secured(web_stack):
    return web_stack


@pytest.fixture(scope="module")
def alice_job(secured):
    with gradserve.Client(secured.address, token=ALICE) as c:
        job = c.submit(**QUICK)
        job.wait(timeout=60)
        return job.id


def test_healthz_says_redis_answers_and_needs_no_token(secured):
    status, _, body = call(f"{secured.web}/healthz")
    assert status == 200 and json.loads(body) == {"redis": "ok"}


def test_the_browsers_icon_request_gets_no_content_not_a_login_form_or_404(secured):
    status, _, body = call(f"{secured.web}/favicon.ico")
    assert (status, body) == (204, b"")


def test_metrics_are_prometheus_text_with_every_family(secured):
    # Waits are observed at the scrape after a job starts: none may be starting while this test counts them.
    with gradserve.Client(secured.address, token=ALICE) as alice, gradserve.Client(secured.address, token=BOB) as bob:
        deadline = time.monotonic() + 60
        while any(j.state in ("QUEUED", "RUNNING") for c in (alice, bob) for j in c.list_jobs(1000)):
            assert time.monotonic() < deadline, "the stack's earlier jobs did not end"
            time.sleep(0.2)
    status, headers, body = call(f"{secured.web}/metrics")
    assert status == 200 and headers["Content-Type"].startswith("text/plain")
    before = body.decode()
    for family, kind in (("gradserve_jobs", "gauge"), ("gradserve_queue_depth", "gauge"),
                         ("gradserve_queue_wait_seconds", "histogram"), ("gradserve_workers_alive", "gauge"),
                         ("gradserve_submit_seconds", "histogram"), ("gradserve_events_relayed_total", "counter"),
                         ("gradserve_watchers", "gauge"), ("gradserve_redis_errors_total", "counter"),
                         ("gradserve_job_tokens_per_second", "gauge")):
        assert f"# TYPE {family} {kind}\n" in before, family
    assert _sample(before, 'gradserve_workers_alive{device="cpu",queue="cpu"}') == 1
    with gradserve.Client(secured.address, token=BOB) as bob:
        bob.submit(**QUICK).wait(timeout=60)
        with gradserve.Client(secured.address, token=ALICE) as alice:
            succeeded = len(alice.list_jobs(1000, "SUCCEEDED")) + len(bob.list_jobs(1000, "SUCCEEDED"))
    after = call(f"{secured.web}/metrics")[2].decode()
    # One more submission timed, one more wait in the queue observed (the job started after the server did).
    for sample in ("gradserve_submit_seconds_count", "gradserve_queue_wait_seconds_count"):
        assert _sample(after, sample) == _sample(before, sample) + 1, sample
    assert _sample(after, 'gradserve_jobs{queue="cpu",state="SUCCEEDED"}') == succeeded
    assert _sample(after, "gradserve_events_relayed_total") >= _sample(before, "gradserve_events_relayed_total")


def _sample(text: str, name: str) -> float:
    found = re.search(rf"^{re.escape(name)} (\S+)$", text, re.M)
    return float(found[1]) if found else 0.0


def test_no_token_is_401_for_the_api_and_a_login_form_for_pages(secured):
    status, _, body = call(f"{secured.web}/api/jobs")
    assert status == 401 and "requires a token" in json.loads(body)["error"]
    status, _, body = call(f"{secured.web}/")
    assert status == 401 and b'action="/login"' in body
    status, _, _ = call(f"{secured.web}/api/jobs", headers={"Authorization": "Bearer not-a-token-at-all-here"})
    assert status == 401


def test_a_tenant_sees_only_its_jobs_and_another_tenants_job_is_404(secured, alice_job):
    as_alice = {"Authorization": f"Bearer {ALICE}"}
    as_bob = {"Authorization": f"Bearer {BOB}"}
    status, _, body = call(f"{secured.web}/api/jobs", headers=as_alice)
    assert status == 200 and alice_job in [j["id"] for j in json.loads(body)["jobs"]]
    status, _, body = call(f"{secured.web}/api/jobs", headers=as_bob)
    with gradserve.Client(secured.address, token=BOB) as bob:
        assert status == 200 and [j["id"] for j in json.loads(body)["jobs"]] == [j.id for j in bob.list_jobs(50)]
    assert alice_job not in [j["id"] for j in json.loads(body)["jobs"]]
    for path in (f"/api/jobs/{alice_job}", f"/api/jobs/{alice_job}/events", f"/jobs/{alice_job}",
                 f"/api/jobs/{alice_job}/checkpoint"):
        status, _, body = call(f"{secured.web}{path}", headers=as_bob)
        assert status == 404 and "not found" in json.loads(body)["error"], path
    status, _, _ = call(f"{secured.web}/api/jobs/job-does-not-exist", headers=as_alice)
    assert status == 404


def test_login_sets_an_httponly_samesite_cookie_that_authenticates(secured, alice_job):
    status, headers, _ = call(f"{secured.web}/login", "POST", body=urllib.parse.urlencode({"token": "wrong"}).encode())
    assert status == 303 and headers["Location"] == "/login?failed=1" and "Set-Cookie" not in headers
    status, headers, _ = call(f"{secured.web}/login", "POST", body=urllib.parse.urlencode({"token": ALICE}).encode())
    assert status == 303 and headers["Location"] == "/"
    cookie = headers["Set-Cookie"]
    assert "HttpOnly" in cookie and "SameSite=Strict" in cookie, cookie
    session = cookie.split(";", 1)[0]
    status, _, body = call(f"{secured.web}/api/session", headers={"Cookie": session})
    assert status == 200 and json.loads(body)["tenant"] == "alice"
    status, _, body = call(f"{secured.web}/api/jobs/{alice_job}", headers={"Cookie": session})
    assert status == 200 and json.loads(body)["job"]["id"] == alice_job


def test_changes_are_posts_checked_against_csrf(secured):
    with gradserve.Client(secured.address, token=ALICE) as c:
        job = c.submit(**{**QUICK, "max_steps": 1_000_000})
    # While it runs, /metrics has its throughput.
    deadline = time.monotonic() + 60
    while not (speed := re.search(rf'^gradserve_job_tokens_per_second{{job_id="{job.id}"}} (\S+)$',
                                  call(f"{secured.web}/metrics")[2].decode(), re.M)) or float(speed[1]) == 0:
        assert time.monotonic() < deadline, "no tokens/s for the running job"
        time.sleep(0.2)
    session = f"gradserve_session={ALICE}"
    cancel = f"{secured.web}/api/jobs/{job.id}/cancel"
    assert call(cancel, headers={"Cookie": session})[0] == 405
    status, _, body = call(cancel, "POST", headers={"Cookie": session})
    assert status == 403 and "X-CSRF-Token" in json.loads(body)["error"]
    status, _, _ = call(cancel, "POST", headers={"Cookie": session, "X-CSRF-Token": csrf_value(BOB)})
    assert status == 403
    status, _, _ = call(cancel, "POST", headers={"Cookie": session, "X-CSRF-Token": csrf_value(ALICE),
                                                 "Origin": "http://evil.example"})
    assert status == 403
    status, _, body = call(cancel, "POST", headers={"Cookie": session, "X-CSRF-Token": csrf_value(ALICE)})
    assert status == 200 and json.loads(body)["job"]["id"] == job.id
    with gradserve.Client(secured.address, token=ALICE) as c:
        assert c.get_job(job.id).wait(timeout=60).state == "CANCELLED"


def test_generate_answers_over_http(secured, alice_job):
    status, _, body = call(f"{secured.web}/api/jobs/{alice_job}/generate", "POST",
                           headers={"Authorization": f"Bearer {ALICE}", "Content-Type": "application/json"},
                           body=json.dumps({"prefix": "", "num_tokens": 0}).encode())
    # No generate worker runs here, but the request is checked first: the field, its value and its range.
    assert status == 400 and "num_tokens must be in [1," in json.loads(body)["error"]


def test_events_are_server_sent_and_resume_after_a_cursor(secured, alice_job):
    headers = {"Authorization": f"Bearer {ALICE}"}
    status, reply_headers, body = call(f"{secured.web}/api/jobs/{alice_job}/events", headers=headers)
    assert status == 200 and reply_headers["Content-Type"].startswith("text/event-stream")
    messages = _sse(body.decode())
    assert messages[-1] == ("end", "", "{}")
    with gradserve.Client(secured.address, token=ALICE) as c:
        stored = list(c.get_job(alice_job).events(follow=False))
    sent = _cursors(messages)
    assert sent["metrics"] == [e.cursor for e in stored if e.HasField("metrics")]
    assert sent["evaluation"] == [e.cursor for e in stored if e.HasField("evaluation")]
    assert sent["events"] == [e.cursor for e in stored if e.WhichOneof("kind") not in ("metrics", "evaluation")]
    assert messages[-2][1] == stored[-1].cursor, "a message's id is the cursor of its last event"
    # Resumed from a cursor, as a browser reconnecting sends it: exactly the events after it.
    middle = stored[len(stored) // 2].cursor
    for resume in ({"Last-Event-ID": middle}, {}):
        query = "" if resume else f"?cursor={middle}"
        _, _, body = call(f"{secured.web}/api/jobs/{alice_job}/events{query}", headers={**headers, **resume})
        rest = sorted(c for cursors in _cursors(_sse(body.decode())).values() for c in cursors)
        assert rest == sorted(e.cursor for e in stored[len(stored) // 2 + 1:])


def test_a_long_history_comes_in_chunks_each_event_once_however_the_page_resumes(secured):
    # More events than a few chunks hold, written as a worker writes them, then ended.
    job_store = store.JobStore.from_url(secured.redis_url)
    try:
        job_id = store.new_job_id()
        job_store.create_job(job_id, jobs_pb2.JobSpec(dataset="builtin:copy", model="rnn", max_steps=10_000), "cpu",
                             tenant="alice")
        job_store.dispatched(job_id, 1)
        lease = job_store.claim(job_id, 1, "test@web", 60)
        for step in range(1, 2 * web.HISTORY_CHUNK + 500):
            job_store.append_event(lease, jobs_pb2.Event(metrics=jobs_pb2.Metrics(step=step, loss=1.0 / step)))
            if step % 100 == 0:
                job_store.append_event(lease, jobs_pb2.Event(evaluation=jobs_pb2.Evaluation(step=step, loss=2.0)))
        job_store.finish(lease, jobs_pb2.SUCCEEDED, step=step)
        stored = job_store.events_after(job_id, count=10 * web.HISTORY_CHUNK)
    finally:
        job_store.close()
    every = [e.cursor for e in stored]
    headers = {"Authorization": f"Bearer {ALICE}"}

    def page(**resume):
        status, _, body = call(f"{secured.web}/api/jobs/{job_id}/events", headers={**headers, **resume})
        assert status == 200
        messages = _sse(body.decode())
        assert messages[-1] == ("end", "", "{}")
        for _, id_, data in messages[1:-1]:
            batch = _cursors([("message", id_, data)])
            assert sum(map(len, batch.values())) <= web.HISTORY_CHUNK
            last = max((c for cursors in batch.values() for c in cursors), key=store.cursor_position)
            assert id_ == last, "a message's id is its last event's"
        return sorted(c for cursors in _cursors(messages).values() for c in cursors), [m[1] for m in messages[1:-1]]

    first, ids = page()
    assert first == sorted(every) and len(ids) == 3
    # A second page gets the chunks the first one read, and the same events.
    assert page() == (first, ids)
    # Resumed at a message's end (a page that lost its connection), in the middle of one, and at the end.
    for after in (ids[0], every[len(every) // 2], every[-1]):
        rest, _ = page(**{"Last-Event-ID": after})
        assert rest == sorted(every[every.index(after) + 1:]), after


class _Stream:
    """A job's stored events as Histories reads them, held in memory; it counts the reads and the events read."""

    def __init__(self, events: int, ends: bool = False):
        self.events = [jobs_pb2.Event(cursor=f"{i}-0", metrics=jobs_pb2.Metrics(step=i)) for i in range(1, events + 1)]
        if ends:
            self.events[-1] = store.status_event("job-x", jobs_pb2.SUCCEEDED)
            self.events[-1].cursor = f"{events}-0"
        self.reads = self.read = 0

    async def read_history(self, job_id: str, after: str, *, count: int) -> list[jobs_pb2.Event]:
        await asyncio.sleep(0)  # a page arriving meanwhile finds this read under way
        after_position = store.cursor_position(after)
        events = [e for e in self.events if store.cursor_position(e.cursor) > after_position][:count]
        self.reads += 1
        self.read += len(events)
        return events


def _events_of(chunks: list[web.Chunk]) -> list[str]:
    return [c for chunk in chunks for cursors in _cursors(_sse(chunk.message.decode())).values() for c in cursors]


async def _page(histories: web.Histories, job_id: str, after: str = "0-0") -> list[web.Chunk]:
    return [chunk async for chunk in histories.chunks(job_id, after)]


def test_pages_opening_a_job_at_once_share_one_read_of_its_history(monkeypatch):
    monkeypatch.setattr(web, "HISTORY_CHUNK", 10)
    stream = _Stream(35)

    async def scenario():
        histories = web.Histories(stream)
        pages = await asyncio.gather(*(_page(histories, "job-x") for _ in range(5)))
        every = [e.cursor for e in stream.events]
        for chunks in pages:
            assert _events_of(chunks) == every
            assert [c.events for c in chunks] == [10, 10, 10, 5] and not any(c.ends for c in chunks)
        # Read once for all five pages, the five events after the full chunks included.
        assert stream.read == 35
        # Opened again: only what came after the kept chunks is read, and the chunks resume where pages do.
        stream.read = 0
        assert _events_of(await _page(histories, "job-x")) == every
        assert stream.read == 5
        assert _events_of(await _page(histories, "job-x", "20-0")) == every[20:]
        assert _events_of(await _page(histories, "job-x", "17-0")) == every[17:]
        assert _events_of(await _page(histories, "job-x", "35-0")) == []

    asyncio.run(scenario())


def test_a_page_gets_each_chunk_as_it_is_read_and_one_that_leaves_stops_no_read(monkeypatch):
    monkeypatch.setattr(web, "HISTORY_CHUNK", 10)
    stream = _Stream(35)

    async def scenario():
        histories = web.Histories(stream)
        leaving = histories.chunks("job-x")
        assert (await anext(leaving)).events == 10
        assert stream.reads < 4, "the first chunk came before the last was read"
        await leaving.aclose()
        assert _events_of(await _page(histories, "job-x")) == [e.cursor for e in stream.events]
        assert stream.read == 35, "the read the first page started went on, and the second page shared it"

    asyncio.run(scenario())


def test_a_history_that_ends_is_kept_whole_and_cut_at_its_end(monkeypatch):
    monkeypatch.setattr(web, "HISTORY_CHUNK", 10)
    stream = _Stream(25, ends=True)
    stream.events.append(jobs_pb2.Event(cursor="26-0", metrics=jobs_pb2.Metrics(step=26)))

    async def scenario():
        histories = web.Histories(stream)
        chunks = await _page(histories, "job-x")
        assert [(c.events, c.ends) for c in chunks] == [(10, False), (10, False), (5, True)]
        assert chunks[-1].cursor == "25-0" and "26-0" not in _events_of(chunks)
        reads = stream.reads
        assert await _page(histories, "job-x") == chunks
        assert stream.reads == reads, "every chunk of an ended job is kept: opening it again reads nothing"

    asyncio.run(scenario())


def test_kept_histories_stay_within_their_limit_dropping_the_least_recently_opened():
    a, b = _Stream(web.HISTORY_CHUNK), _Stream(web.HISTORY_CHUNK)

    async def scenario():
        histories = web.Histories(a)
        await _page(histories, "job-a")
        one = histories.size
        assert one > 0
        histories.limit = one
        histories.astore = b
        await _page(histories, "job-b")
        assert histories.size == one
        reads = b.reads
        await _page(histories, "job-b")
        assert b.reads == reads + 1, "job-b is still kept: only what came after its chunk is read"
        histories.astore = a
        reads = a.reads
        await _page(histories, "job-a")
        assert a.reads == reads + 2, "job-a was dropped: read again whole"
        histories.astore = _Stream(web.HISTORY_CHUNK - 1)
        assert len(_events_of(await _page(histories, "job-short"))) == web.HISTORY_CHUNK - 1
        assert len(histories) == 1, "a history shorter than a chunk is not kept"

    asyncio.run(scenario())


def _cursors(messages) -> dict[str, list[str]]:
    """The cursors of the events in these messages, by how they were sent: as metrics or evaluation columns, or
    as objects."""
    out = {"metrics": [], "evaluation": [], "events": []}
    for kind, _, data in messages:
        if kind == "message":
            batch = json.loads(data)
            out["metrics"] += batch.get("metrics", {}).get("cursor", [])
            out["evaluation"] += batch.get("evaluation", {}).get("cursor", [])
            out["events"] += [e["cursor"] for e in batch.get("events", [])]
    return out



def _sse(text: str) -> list[tuple[str, str, str]]:
    """(event type, id, data) of each message of an event stream; `retry`-only blocks included as ("retry", ...)."""
    out = []
    for block in text.strip().split("\n\n"):
        fields = dict(line.split(": ", 1) for line in block.splitlines())
        kind = "retry" if "retry" in fields else fields.get("event", "message")
        out.append((kind, fields.get("id", ""), fields.get("data", fields.get("retry", ""))))
    return out
