"""The latest and best checkpoints in the job store, against a real redis-server (no server or worker processes)."""

from __future__ import annotations

import pytest

from gradserve.v1 import jobs_pb2
from gradserve_store import store


@pytest.fixture(scope="module")
def redis_url(make_stack) -> str:
    s = make_stack("checkpoints")
    s.start_redis()
    return s.redis_url


@pytest.fixture
def job_store(redis_url):
    s = store.JobStore.from_url(redis_url)
    yield s
    s.r.close()


def running_job(job_store: store.JobStore) -> tuple[str, store.Lease]:
    job_id = store.new_job_id()
    job_store.create_job(job_id, jobs_pb2.JobSpec(dataset="ds-x"), "cpu")
    return job_id, job_store.claim(job_id, 1, "w@test", 60)


def saved(job_store: store.JobStore, job_id: str) -> list[tuple[int, bool, bool]]:
    return [(e.checkpoint.step, e.checkpoint.best, e.checkpoint.also_latest)
            for e in job_store.events_after(job_id) if e.HasField("checkpoint")]


def test_a_save_that_is_latest_and_best_is_stored_once_with_one_event(job_store):
    job_id, lease = running_job(job_store)
    assert job_store.put_latest_and_best_checkpoint(lease, 100, 2.0, b"hundred")
    assert saved(job_store, job_id) == [(100, True, True)]
    assert job_store.get_checkpoint(job_id, "latest") == job_store.get_checkpoint(job_id, "best") == (100, b"hundred")
    assert job_store.get_checkpoint(job_id, "100") == (100, b"hundred")
    assert job_store.r.hget(store.best_checkpoint_key(job_id), "data") is None, "the bytes are stored twice"

    # A newer latest checkpoint leaves the best one its bytes.
    assert job_store.put_checkpoint(lease, 200, b"two hundred")
    assert job_store.get_checkpoint(job_id, "best") == (100, b"hundred")
    assert job_store.get_checkpoint(job_id, "latest") == (200, b"two hundred")
    assert job_store.put_checkpoint(lease, 300, b"three hundred")
    assert job_store.get_checkpoint(job_id, "best") == (100, b"hundred")
    assert saved(job_store, job_id) == [(100, True, True), (200, False, False), (300, False, False)]


def test_each_part_of_a_latest_and_best_save_is_kept_only_when_it_is_new(job_store):
    job_id, lease = running_job(job_store)
    job_store.put_latest_and_best_checkpoint(lease, 100, 2.0, b"hundred")
    job_store.put_checkpoint(lease, 200, b"two hundred")
    # Saved again (a resumed attempt): nothing is new, nothing changes.
    assert not job_store.put_latest_and_best_checkpoint(lease, 100, 2.0, b"hundred again")
    # Not newer than the latest, but better than the best: the best alone, with its own bytes.
    assert job_store.put_latest_and_best_checkpoint(lease, 150, 1.0, b"one fifty")
    assert job_store.get_checkpoint(job_id, "best") == (150, b"one fifty")
    assert job_store.get_checkpoint(job_id, "latest") == (200, b"two hundred")
    # Newer than the latest, not better than the best: the latest alone.
    assert job_store.put_latest_and_best_checkpoint(lease, 300, 1.5, b"three hundred")
    assert job_store.get_checkpoint(job_id, "best") == (150, b"one fifty")
    assert job_store.get_checkpoint(job_id, "latest") == (300, b"three hundred")
    assert saved(job_store, job_id) == [(100, True, True), (200, False, False), (150, True, False), (300, False, False)]


def test_a_best_checkpoint_alone_replaces_a_shared_one(job_store):
    job_id, lease = running_job(job_store)
    job_store.put_latest_and_best_checkpoint(lease, 100, 2.0, b"hundred")
    assert job_store.put_best_checkpoint(lease, 150, 1.0, b"one fifty")
    assert job_store.get_checkpoint(job_id, "best") == (150, b"one fifty")
    assert job_store.get_checkpoint(job_id, "latest") == (100, b"hundred")
    job_store.put_checkpoint(lease, 200, b"two hundred")
    assert job_store.get_checkpoint(job_id, "best") == (150, b"one fifty")
