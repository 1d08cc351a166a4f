"""The web dashboard in a real headless Chromium, against a real server, Redis and Celery worker.

The server has tokens for two tenants (conftest's `web_stack`), so the browser logs in first, as a user does.

The pages expose what they have drawn (`window.gsJob`: the job's points and the cursor of every metrics event
received), so the tests count points in the browser and compare them with the job's stored events.
"""

from __future__ import annotations

import re
import sys
import time
import urllib.request
from pathlib import Path

import pytest

import gradserve
from conftest import ALICE, BOB
from gradserve_server import dev

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "harness"))
import browser  # noqa: E402

# Slow enough to watch: a tiny model that reports every few steps and probes often, until cancelled.
LONG = dict(dataset="builtin:copy", model="rnn", hidden_size=16, batch_size=8, seq_len=20, max_steps=1_000_000,
            log_every=10, probe_every=40, eval_every=200, checkpoint_every=1_000_000, device="cpu")


@pytest.fixture(scope="module")
def driver():
    why = browser.missing()
    if why:
        pytest.fail(why)
    d = browser.chrome()
    yield d
    d.quit()


@pytest.fixture(scope="module")
def web(web_stack, driver):
    """The stack, with the browser logged in as alice."""
    login(driver, web_stack.web, ALICE)
    until(lambda: js(driver, "!!document.querySelector('#jobs')"), what="the jobs page after logging in")
    return web_stack


@pytest.fixture(scope="module")
def running(web):
    """A job of alice's training while this module's tests watch it; cancelled at the end."""
    with web.client(token=ALICE) as c:
        job = c.submit(**LONG)
        deadline = time.monotonic() + 60
        while job.status() != "RUNNING":
            assert time.monotonic() < deadline, f"the job never started:\n{web.logs()}"
            time.sleep(0.1)
        yield job
        if job.status() in ("QUEUED", "RUNNING"):
            job.cancel()


def until(condition, timeout: float = 20.0, what: str = "the page"):
    from selenium.common.exceptions import JavascriptException

    deadline = time.monotonic() + timeout
    while True:
        try:
            value = condition()
        except JavascriptException as e:
            # A script run while the page navigates (after a form is sent) finds the old document going away.
            value, last_error = None, e
        else:
            last_error = None
        if value:
            return value
        assert time.monotonic() < deadline, f"timed out waiting for {what}" + (f": {last_error.msg}" if last_error else "")
        time.sleep(0.1)


def js(driver, expression: str):
    return driver.execute_script(f"return {expression};")


def metric_points(driver) -> int:
    # The points the loss chart holds: uPlot's own data, x values with a train loss.
    return js(driver, "window.gsJob?.charts ? window.gsJob.charts.loss[0].data[1].filter((v) => v !== null).length : 0")


def test_the_jobs_page_lists_a_running_job(driver, web, running):
    driver.get(f"{web.web}/")
    row = f'tr[data-job="{running.id}"]'
    until(lambda: js(driver, f"document.querySelector('{row} .state')?.textContent") == "RUNNING",
          what="the running job's row")
    assert js(driver, f"document.querySelector('{row} a').getAttribute('href')") == f"/jobs/{running.id}"
    assert browser.console_errors(driver) == []


def test_the_loss_curve_gains_points_while_the_job_trains(driver, web, running):
    driver.get(f"{web.web}/jobs/{running.id}")
    first = until(lambda: metric_points(driver), what="the first points")
    second = until(lambda: (n := metric_points(driver)) > first and n, what="more points")
    assert second > first
    assert js(driver, "document.getElementById('state').textContent") == "RUNNING"
    assert browser.console_errors(driver) == []


def test_the_heatmap_appears_after_the_first_probe(driver, web, running):
    driver.get(f"{web.web}/jobs/{running.id}")
    columns = until(lambda: int(js(driver, "document.getElementById('heatmap').dataset.columns || 0")),
                    what="the heatmap's first column")
    assert js(driver, "document.getElementById('heatmap').hidden") is False
    assert js(driver, "document.getElementById('heat-empty').hidden") is True
    # A column for each probe event the page received (drawn once a frame), and more as the job trains.
    assert 1 <= columns <= js(driver, "window.gsJob.history.probes.length")
    until(lambda: int(js(driver, "document.getElementById('heatmap').dataset.columns")) > columns,
          what="a new heatmap column")
    # Drawn: the canvas holds coloured pixels, one column per probe and one row per position in the window.
    width, height, painted = js(driver, """(() => { const c = document.getElementById('heatmap');
        const d = c.getContext('2d').getImageData(0, 0, c.width, c.height).data;
        let painted = 0; for (let i = 3; i < d.length; i += 4) if (d[i] === 255) painted++;
        return [c.width, c.height, painted]; })()""")
    window = js(driver, "window.gsJob.history.probes[0].grad_through_time[0].length")
    assert width >= columns and height == window > 1 and painted == width * height
    assert browser.console_errors(driver) == []


def watchers(web) -> float:
    """The event streams the server holds open, from /metrics."""
    with urllib.request.urlopen(f"{web.web}/metrics", timeout=10) as reply:
        return float(re.search(r"^gradserve_watchers (\S+)$", reply.read().decode(), re.M)[1])


def test_a_page_left_for_another_gives_its_stream_back_and_resumes_it_when_shown_again(driver, web, running):
    # The browser keeps a page left this way whole (the back/forward cache). A kept page's open stream held one
    # of the six connections the browser makes to a server, and the seventh page opened after it waited a minute.
    driver.get(f"{web.web}/jobs/{running.id}")
    until(lambda: metric_points(driver) > 3, what="the first points")
    driver.execute_script("window.keptWhole = true")
    driver.get(f"{web.web}/workers")
    until(lambda: watchers(web) == 0, what="the left page's stream to close")
    driver.back()
    assert js(driver, "window.keptWhole === true"), "the page was loaded again, not restored as it was left"
    before = len(js(driver, "window.gsJob.history.metricCursors"))
    until(lambda: len(js(driver, "window.gsJob.history.metricCursors")) > before + 2, what="points after coming back")
    received = js(driver, "window.gsJob.history.metricCursors")
    assert len(received) == len(set(received)), "an event came twice"
    assert browser.console_errors(driver) == []


def test_after_a_server_restart_the_page_resumes_without_a_duplicate_point(driver, web, running):
    driver.get(f"{web.web}/jobs/{running.id}")
    until(lambda: metric_points(driver) > 3, what="the first points")
    dev.stop_process(web.server)
    until(lambda: js(driver, "window.gsJob.stream") != "live", what="the page to see the server go")
    before = len(js(driver, "window.gsJob.history.metricCursors"))
    web.start_server()
    until(lambda: js(driver, "window.gsJob.stream") == "live", what="the page to reconnect")
    until(lambda: len(js(driver, "window.gsJob.history.metricCursors")) > before + 2, what="points after the restart")
    running.cancel()
    until(lambda: js(driver, "window.gsJob.stream") == "ended", what="the stream to end with the job")
    received = js(driver, "window.gsJob.history.metricCursors")
    with web.client(token=ALICE) as c:
        stored = [e.cursor for e in c.get_job(running.id).events(follow=False) if e.HasField("metrics")]
    # Every metrics event exactly once, in order: none lost across the restart and none repeated.
    assert received == stored
    assert metric_points(driver) == len(set(stored))
    browser.console_errors(driver)  # the refused reconnections while the server was down are logged; not errors of the page


def test_the_compare_and_workers_pages_draw_without_errors(driver, web, running):
    with web.client(token=ALICE) as c:
        other = c.submit(**{**LONG, "max_steps": 60, "hidden_size": 8}).wait(timeout=60)
    driver.get(f"{web.web}/compare?jobs={running.id},{other.id}")
    until(lambda: js(driver, "document.querySelectorAll('#table tbody tr').length") == 2, what="the table")
    until(lambda: js(driver, "[...document.querySelectorAll('#heatmaps canvas')].every((c) => +c.dataset.columns > 0)"),
          what="both heatmaps")
    # Sorted by a column when its header is clicked, and the other way on a second click.
    driver.execute_script("document.querySelector('#table th[data-col=\"7\"]').click()")
    steps = js(driver, "[...document.querySelectorAll('#table tbody tr')].map((r) => r.dataset.job)")
    driver.execute_script("document.querySelector('#table th[data-col=\"7\"]').click()")
    assert js(driver, "[...document.querySelectorAll('#table tbody tr')].map((r) => r.dataset.job)") == steps[::-1]
    driver.get(f"{web.web}/workers")
    until(lambda: js(driver, "document.getElementById('workers').textContent.includes('w1@test')"), what="the worker")
    assert browser.console_errors(driver) == []


def test_the_compare_page_shows_a_sweeps_members_by_their_values(driver, web):
    with web.client(token=ALICE) as c:
        # More members than the page streams at once: the rest load as those streams end.
        sweep = c.submit_sweep(base={**LONG, "max_steps": 40, "probe_every": 20}, grid={"lr": [0.1, 0.2, 0.4],
                                                                                       "seed": [1, 2]},
                               name="compare page").wait(timeout=120)
    driver.get(f"{web.web}/compare")
    until(lambda: js(driver, f"[...document.querySelectorAll('#sweep option')].some((o) => o.value === '{sweep.id}')"),
          what="the sweep among the choices")
    driver.get(f"{web.web}/compare?sweep={sweep.id}")
    until(lambda: js(driver, "document.querySelectorAll('#table tbody tr').length") == 6, what="the table")
    until(lambda: js(driver, "[...document.querySelectorAll('#heatmaps canvas')].every((c) => +c.dataset.columns > 0)"),
          what="every member's heatmap")
    members = js(driver, "[...document.querySelectorAll('#table tbody tr')].map((r) => r.cells[2].textContent)")
    assert sorted(members) == sorted(f"lr={lr} seed={seed}" for lr in ("0.1", "0.2", "0.4") for seed in (1, 2))
    assert browser.console_errors(driver) == []


# ------------------------------------------------------------------ auth, in the browser


@pytest.fixture(scope="module")
def secured(web):
    """A job of alice's and one of bob's, queued behind each other or ended: all these tests need."""
    with gradserve.Client(web.address, token=ALICE) as alice, gradserve.Client(web.address, token=BOB) as bob:
        web.alice_job, web.bob_job = alice.submit(**LONG).id, bob.submit(**{**LONG, "max_steps": 20}).id
    return web


def login(driver, site: str, token: str) -> None:
    driver.delete_all_cookies()
    driver.get(f"{site}/login")
    driver.find_element("id", "token").send_keys(token)
    driver.find_element("id", "login").click()


def test_without_a_token_the_dashboard_asks_for_one(driver, secured):
    driver.delete_all_cookies()
    driver.get(f"{secured.web}/")
    assert js(driver, "!!document.querySelector('form[action=\"/login\"]')")
    login(driver, secured.web, "not-a-token-of-this-server")
    until(lambda: js(driver, "!document.getElementById('failed').hidden"), what="the refusal")
    browser.console_errors(driver)  # the 401 of the first page is logged by the browser itself


def test_a_logged_in_tenant_sees_only_its_jobs_through_an_httponly_cookie(driver, secured):
    login(driver, secured.web, ALICE)
    until(lambda: secured.alice_job in js(driver, "[...document.querySelectorAll('#jobs tr')].map((r) => r.dataset.job)"),
          what="alice's new job")
    with gradserve.Client(secured.address, token=ALICE) as alice:
        mine = [j.id for j in alice.list_jobs(200)]
    assert js(driver, "[...document.querySelectorAll('#jobs tr')].map((r) => r.dataset.job)") == mine
    assert secured.bob_job not in mine
    assert "gradserve_session" not in js(driver, "document.cookie")
    assert js(driver, "document.querySelector('header .who').textContent") == "tenant alice"
    assert browser.console_errors(driver) == []
    driver.get(f"{secured.web}/jobs/{secured.bob_job}")
    assert "not found" in driver.find_element("tag name", "body").text
    browser.console_errors(driver)  # the browser logs the 404 itself


def test_the_cancel_button_posts_with_the_csrf_value(driver, secured):
    login(driver, secured.web, ALICE)
    # The form's answer sets the cookie: a page asked for before it arrives would be the login form again.
    until(lambda: js(driver, "!!document.querySelector('#jobs')"), what="the jobs page after logging in")
    driver.get(f"{secured.web}/jobs/{secured.alice_job}")
    until(lambda: js(driver, "!document.getElementById('cancel').hidden"), what="the cancel button")
    driver.execute_script("window.confirm = () => true; document.getElementById('cancel').click()")
    until(lambda: js(driver, "document.getElementById('state').textContent") == "CANCELLED", what="the cancellation")
    with gradserve.Client(secured.address, token=ALICE) as alice:
        assert alice.get_job(secured.alice_job).state == "CANCELLED"
    assert browser.console_errors(driver) == []
