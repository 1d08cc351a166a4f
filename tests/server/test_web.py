"""The HTTP side of the server (--http-listen): /healthz, /metrics, the JSON API and its auth, over real HTTP
against a real server, Redis and worker. The pages themselves are tested in a browser (tests/e2e/test_dashboard.py)."""

from __future__ import annotations

import json
import re
import time
import urllib.error
import urllib.parse
import urllib.request

import pytest

import gradserve
from conftest import ALICE, BOB
from gradserve_server.web import csrf_value

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
