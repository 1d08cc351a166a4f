"""Finding jobs: names, tags and notes given at submission, ListJobs' filters, orders and pages.

Through the real server and Redis with no worker, so submitted jobs stay
QUEUED; results and ends are written with the store calls a worker makes
(claim, append_event with a summary, finish), so that no training is needed
to have jobs to sort.
"""

from __future__ import annotations

import time

import pytest

from gradserve.errors import InvalidArgument
from gradserve.v1 import jobs_pb2
from gradserve_store import store

TINY = dict(dataset="builtin:adding", model="rnn", hidden_size=4, batch_size=2, seq_len=5, max_steps=10)


def _finish(job_store: store.JobStore, job_id: str, val_loss: float | None, state=jobs_pb2.SUCCEEDED) -> None:
    """End a job as a worker would, with a summary whose best held-out loss is `val_loss` (None: no evaluation)."""
    lease = job_store.claim(job_id, 0, "w@test", 30)
    summary = jobs_pb2.JobSummary(step=10, train_loss=1.0)
    if val_loss is not None:
        summary.best_step, summary.best_val_loss = 10, val_loss
    job_store.append_event(lease, jobs_pb2.Event(metrics=jobs_pb2.Metrics(step=10, loss=1.0)), summary)
    job_store.finish(lease, state, step=10)


@pytest.fixture(scope="module")
def job_store(idle_stack):
    s = store.JobStore.from_url(idle_stack.redis_url)
    yield s
    s.close()


def test_name_tags_and_note_are_kept_and_shown(idle_stack):
    with idle_stack.client() as c:
        job = c.submit(**TINY, name="lr sweep, run 1", tags={"lr": "0.5", "study": "tbptt"}, note="first try\nT=5")
        again = c.get_job(job.id)
    assert (again.name, again.tags, again.note) == ("lr sweep, run 1", {"lr": "0.5", "study": "tbptt"},
                                                    "first try\nT=5")


@pytest.mark.parametrize("labels, field, words", [
    (dict(name="x" * 101), "name", "at most 100 characters, got 101"),
    (dict(name="tab\there"), "name", "no control characters, got '\\t'"),
    (dict(tags={"bad key": "v"}), "tags", "'bad key'"),
    (dict(tags={"k": "v" * 257}), "tags[k]", "at most 256 characters, got 257"),
    (dict(tags={f"k{i}": "v" for i in range(33)}), "tags", "at most 32 tags, got 33"),
    (dict(note="bell\x07"), "note", "got '\\x07'"),
])
def test_bad_labels_are_refused_naming_the_field_and_value(idle_stack, labels, field, words):
    with idle_stack.client() as c, pytest.raises(InvalidArgument) as e:
        c.submit(**TINY, **labels)
    assert [f for f, _ in e.value.violations] == [field]
    assert words in e.value.violations[0][1]


def test_filters_combine(idle_stack, job_store):
    with idle_stack.client() as c:
        start = time.time()
        a = c.submit(**TINY, name="Alpha one", tags={"study": "tbptt", "T": "5"})
        b = c.submit(**TINY, name="alpha two", tags={"study": "tbptt", "T": "35"})
        other = c.submit(**{**TINY, "model": "gru"}, name="beta", tags={"study": "clip"})
        text = c.submit(**{**TINY, "dataset": "builtin:copy"}, name="alpha copy")
        _finish(job_store, b.id, 0.5)
        mid = time.time()
        late = c.submit(**TINY, name="late")
        mine = {a.id, b.id, other.id, text.id, late.id}

        def ids(**filters) -> list[str]:
            return [j.id for j in c.list_jobs(created_after=start, **filters)]

        assert ids() == [late.id, text.id, other.id, b.id, a.id]
        assert ids(name="ALPHA") == [text.id, b.id, a.id]
        assert ids(tags={"study": "tbptt"}) == [b.id, a.id]
        assert ids(tags={"study": "tbptt", "T": "35"}) == [b.id]
        assert ids(tags={"T": "3"}) == [], "a tag matches whole, not a prefix of its value"
        assert ids(model="gru") == [other.id]
        assert ids(dataset="builtin:copy") == [text.id]
        assert ids(state="SUCCEEDED") == [b.id]
        assert ids(state="QUEUED", name="alpha") == [text.id, a.id]
        assert ids(created_before=mid) == [text.id, other.id, b.id, a.id]
        assert [j.id for j in c.list_jobs(created_after=mid)] == [late.id]
        assert set(ids()) == mine


@pytest.mark.parametrize("fillers", [0, 3000], ids=["few jobs", "a rare name among thousands"])
def test_the_name_filter_matches_a_substring_of_the_name_literally(job_store, fillers):
    # With thousands of other jobs the name is rare, and Redis's own MATCH finds it rather than the walk.
    tenant, spec = f"names{fillers}", jobs_pb2.JobSpec(**TINY)
    with job_store.r.pipeline(transaction=False) as p:
        for i in range(fillers):
            job_id = store.new_job_id()
            p.hset(store.job_key(job_id), mapping={"tenant": tenant, "spec": spec.SerializeToString(), "state": 1})
            job_store._index(p, job_id, tenant, spec, store.Labels(name=f"filler {i}"), 1e9 + i, jobs_pb2.QUEUED)
            p.zadd(store.tenant_jobs_key(tenant), {job_id: 1e9 + i})
        p.execute()
    named = {}
    for name in ("lr*2 [run]", "LR*2 [RUN] again", "lr?2 run", "plain"):
        named[name] = store.new_job_id()
        job_store.create_job(named[name], spec, "cpu", tenant, store.Labels(name=name))
    star, again, query, plain = named.values()

    def ids(**kw) -> list[str]:
        # A page of one job at a time: each page starts from the last one's token.
        found, token = [], ""
        while True:
            page, token = job_store.list_jobs(store.JobQuery(limit=1, page_token=token, **kw), tenant)
            found += [j.id for j in page]
            if not token:
                return found

    assert ids(name_contains="r*2 [r") == [again, star], "glob characters in the name are plain characters"
    assert ids(name_contains="?") == [query]
    assert ids(name_contains="2 [run] a") == [again]
    assert ids(name_contains="run", reverse=True) == [star, again, query]
    created = job_store.get_job(query).created_at.ToNanoseconds() / 1e9
    assert ids(name_contains="run", created_before=created) == [again, star]
    assert ids(name_contains="run", order_by="val_loss") == [query, again, star]
    assert ids(name_contains=plain[-6:]) == [], "a name matches its name, not its id"
    job_store.request_cancel(query)
    job_store.delete_job(query)
    assert ids(name_contains="run") == [again, star]
    assert not [m for m in job_store.r.zrange(store.named_key(tenant), 0, -1) if m.endswith(query.encode())]
    if fillers:
        page, token = job_store.list_jobs(store.JobQuery(limit=2000, name_contains="filler 1"), tenant)
        assert (len(page), token) == (1111, "")  # "filler 1", 10-19, 100-199, 1000-1999


def test_a_sweep_lists_its_members(idle_stack, job_store):
    # Sweeps submit their members through the store as the server does; here two members and a loner.
    spec = jobs_pb2.JobSpec(**TINY)
    members = [store.new_job_id() for _ in range(2)]
    for job_id in members:
        job_store.create_job(job_id, spec, "cpu", "", store.Labels(sweep="sweep-0123"))
    job_store.create_job(store.new_job_id(), spec, "cpu", "")
    with idle_stack.client() as c:
        listed = c.list_jobs(sweep="sweep-0123")
        assert [j.id for j in listed] == members[::-1]
        assert {j.info.sweep for j in listed} == {"sweep-0123"}
        assert c.list_jobs(sweep="sweep-none") == []


def test_pages_cover_every_job_once_in_order_even_with_equal_times(idle_stack, job_store):
    with idle_stack.client() as c:
        jobs = [c.submit(**TINY, tags={"paging": "yes"}) for _ in range(7)]
        # Three jobs created in the same instant: the order among them is by id.
        tied = jobs[2:5]
        job_store.r.zadd(store.tenant_jobs_key(""), {j.id: 1e9 for j in tied})
        for reverse in (False, True):
            seen, token, pages = [], "", 0
            while True:
                page = c.list_jobs(limit=2, tags={"paging": "yes"}, reverse=reverse, page_token=token)
                seen += [j.id for j in page]
                pages, token = pages + 1, page.next_page_token
                if not token:
                    break
            everything = [j.id for j in c.list_jobs(limit=100, tags={"paging": "yes"}, reverse=reverse)]
            assert seen == everything and len(set(seen)) == 7 and pages == 4
        assert [j.id for j in c.iter_jobs(limit=3, tags={"paging": "yes"})] == [
            j.id for j in c.list_jobs(limit=100, tags={"paging": "yes"})]


def test_a_page_token_works_only_for_its_own_query(idle_stack):
    with idle_stack.client() as c:
        for _ in range(3):
            c.submit(**TINY, tags={"token": "test"})
        token = c.list_jobs(limit=1, tags={"token": "test"}).next_page_token
        assert token
        with pytest.raises(InvalidArgument) as e:
            c.list_jobs(limit=1, tags={"token": "test"}, order_by="val_loss", page_token=token)
        assert e.value.violations[0][0] == "page_token"
        with pytest.raises(InvalidArgument) as e:
            c.list_jobs(page_token="not a token")
        assert "same filters and order" in e.value.violations[0][1]


def test_sorting_by_a_summary_metric_puts_jobs_without_it_last(idle_stack, job_store):
    with idle_stack.client() as c:
        # Other jobs with a val loss: enough that a tag filter is far smaller than the metric's index.
        for i in range(25):
            _finish(job_store, c.submit(**TINY, name=f"other {i}").id, 0.1 + i / 10)
        for name, loss in (("mid", 0.7), ("best", 0.2), ("none", None), ("worst", 1.5), ("queued", None)):
            job = c.submit(**TINY, name=f"sorted {name}", tags={"sorted": "yes"})
            if name != "queued":
                _finish(job_store, job.id, loss)

        def names(limit: int, **kw) -> list[str]:
            return [j.name.split()[1] for j in c.iter_jobs(limit=limit, order_by="val_loss", **kw)]

        # Two ways to the same order: the tag's few jobs, and the few the name matches, sorted whole. Pages
        # end within the jobs with the metric, right after the last of them, and within the jobs without it
        # (newest first among those).
        for limit in (2, 3, 4, 50):
            assert names(limit, tags={"sorted": "yes"}) == names(limit, name="sorted ") == [
                "best", "mid", "worst", "queued", "none"]
            assert names(limit, tags={"sorted": "yes"}, reverse=True) == names(limit, name="sorted ", reverse=True) == [
                "worst", "mid", "best", "queued", "none"]
        assert names(50, tags={"sorted": "yes"}, state="SUCCEEDED") == ["best", "mid", "worst", "none"]


def test_list_requests_out_of_range_are_refused_naming_the_field(idle_stack):
    with idle_stack.client() as c:
        for kwargs, field in ((dict(order_by="loss"), "order_by"), (dict(model="transformer"), "model"),
                              (dict(tags={"a b": "c"}), "tags"), (dict(limit=1001), "limit"),
                              (dict(name="n" * 101), "name_contains")):
            with pytest.raises(InvalidArgument) as e:
                c.list_jobs(**kwargs)
            assert [f for f, _ in e.value.violations] == [field], kwargs


def test_retention_deletes_jobs_that_ended_longer_ago_and_keeps_the_rest(make_stack):
    retain_s = 3.0
    s = make_stack("retention")
    s.start_redis()
    s.start_server("--retain-days", repr(retain_s / 86400), "--reap-interval", "0.2")
    with s.client() as c:
        ended, waiting = c.submit(**TINY), c.submit(**TINY)
        ended.cancel()
        cancelled_at = time.monotonic()
        time.sleep(retain_s / 2)
        assert ended.refresh().state == jobs_pb2.CANCELLED, "deleted before its retention period was over"
        deadline = cancelled_at + retain_s + 10
        while ended.id in {j.id for j in c.list_jobs()}:
            assert time.monotonic() < deadline, s.logs()
            time.sleep(0.1)
        assert time.monotonic() - cancelled_at >= retain_s
        assert waiting.refresh().state == jobs_pb2.QUEUED
    job_store = store.JobStore.from_url(s.redis_url)
    assert not job_store.r.exists(store.events_key(ended.id))
    job_store.close()


def test_jobs_recorded_before_the_indexes_are_added_to_them(idle_stack, job_store):
    with idle_stack.client() as c:
        old = c.submit(**{**TINY, "model": "lstm"}, name="from before", tags={"era": "old"})
        _finish(job_store, old.id, 0.25)
        # As a server without ListJobs' indexes left it: the record alone.
        job_store.r.hdel(store.NAMES_KEY, old.id)
        for key in [*store.state_keys(""), *store.label_keys("", old.spec, store.Labels(tags=old.tags)), *store.sort_keys("")]:
            job_store.r.zrem(key, old.id)
        assert [j.id for j in c.list_jobs(tags={"era": "old"})] == []
        assert job_store.index_missing() == 1
        assert [j.id for j in c.list_jobs(tags={"era": "old"}, model="lstm", state="SUCCEEDED",
                                          order_by="val_loss")] == [old.id]
        assert job_store.index_missing() == 0
        # As the server before the names zset left it: the name in the names hash alone.
        member = store.name_member(old.name, old.id)
        job_store.r.zrem(store.named_key(""), member)
        assert job_store.index_missing() == 0
        assert job_store.r.zscore(store.named_key(""), member) is not None


def test_resubmit_repeats_the_spec_with_changes_and_derives_defaults_again(idle_stack):
    with idle_stack.client() as c:
        original = c.submit(**TINY, name="base", tags={"study": "resubmit"}, note="first")
        chosen = c.submit(**TINY, lr=0.5, name="chosen lr")
        again = original.resubmit(optimizer="adam", hidden_size=16, tags={"try": "2"})
        kept = chosen.resubmit(optimizer="adam")
    assert (again.spec.optimizer, again.spec.hidden_size, again.spec.lr) == ("adam", 16, 0.001)
    assert (again.spec.dataset, again.spec.seq_len, again.spec.max_steps) == ("builtin:adding", 5, 10)
    assert (again.name, again.tags, again.note) == ("base", {"study": "resubmit", "try": "2"}, "first")
    assert kept.spec.lr == 0.5, "an lr someone chose is kept"
    assert again.id != original.id
