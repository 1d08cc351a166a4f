"""The event relay against a real Redis: many watchers, late joiners and slow watchers.

One reader per followed job serves all of its watchers, so the Redis
connections a server holds do not grow with them (through the real server);
a watcher that joins late gets the history and then the live events with no
gap and no duplicate; one that falls behind is asked to resume from its
cursor, and misses nothing (the relay driven directly, where a consumer's
pace is not hidden by gRPC's transport buffers).
"""

from __future__ import annotations

import asyncio
import os
import threading
import time

import grpc
import redis
import redis.asyncio as aioredis

import gradserve.errors
from gradserve.v1 import jobs_pb2, jobs_pb2_grpc
from gradserve_store import store
from gradserve_server import relay as relay_module
from gradserve_server.relay import BATCH, BATCH_BYTES, FEED_POLL_S, HISTORY_READS, Relay, batches

SMALL = dict(model="rnn", hidden_size=8, batch_size=4, num_steps=5, preprocess="d2l", val_fraction=0.0)
WATCHERS = 150  # more than the 100 connections of redis-py's default pool, which once capped the streams


async def _watch_all(address: str, job_id: str, ready: threading.Event, count: int) -> list[list[jobs_pb2.Event]]:
    async with grpc.aio.insecure_channel(address) as channel:
        stub = jobs_pb2_grpc.JobServiceStub(channel)
        first = asyncio.Semaphore(0)

        async def one() -> list[jobs_pb2.Event]:
            seen = []
            async for event in stub.StreamEvents(jobs_pb2.StreamEventsRequest(job_id=job_id), timeout=120):
                seen.append(event)
                if len(seen) == 1:
                    first.release()
            return seen

        tasks = [asyncio.create_task(one()) for _ in range(count)]
        for _ in range(count):
            await first.acquire()
        ready.set()
        return await asyncio.gather(*tasks)


def test_many_watchers_of_one_job_share_one_reader(idle_stack, timemachine):
    r = redis.Redis.from_url(idle_stack.redis_url)
    with idle_stack.client() as c:
        job = c.submit(dataset=c.upload_bytes(timemachine), max_steps=5, **SMALL)
        before = r.info("clients")["connected_clients"]
        ready, result = threading.Event(), {}
        thread = threading.Thread(
            target=lambda: result.update(seen=asyncio.run(_watch_all(idle_stack.address, job.id, ready, WATCHERS))),
            daemon=True)
        thread.start()
        assert ready.wait(60), "not every watcher got the job's first event"
        during = r.info("clients")["connected_clients"]
        job.cancel()
        thread.join(60)
    r.close()
    # The bound, whatever the number of watchers: the job's one feed, the history reads in flight, and one
    # connection per thread of the pool the server runs its synchronous store calls on.
    bound = 1 + HISTORY_READS + min(32, (os.cpu_count() or 1) + 4)
    assert during - before <= bound, f"{WATCHERS} watchers took {during - before} more Redis connections"
    for seen in result["seen"]:
        states = [jobs_pb2.JobState.Name(e.status.state) for e in seen if e.WhichOneof("kind") == "status"]
        assert states == ["QUEUED", "CANCELLED"]
        assert len({e.cursor for e in seen}) == len(seen)


def _status(job_id: str, state: int) -> jobs_pb2.Event:
    return store.status_event(job_id, state)


def _metrics(job_id: str, step: int) -> jobs_pb2.Event:
    return jobs_pb2.Event(job_id=job_id, time=store.timestamp(time.time()), metrics=jobs_pb2.Metrics(step=step))


async def _produce(r, job_id: str, steps: int, pause_s: float) -> None:
    """A job's events as a worker appends them: metrics for `steps` steps, then SUCCEEDED."""
    for step in range(1, steps + 1):
        await r.xadd(store.events_key(job_id), {"e": store.encode_event(_metrics(job_id, step))})
        await asyncio.sleep(pause_s)
    await r.xadd(store.events_key(job_id), {"e": store.encode_event(_status(job_id, jobs_pb2.SUCCEEDED))})


def test_watchers_that_join_at_any_moment_get_every_event_once(idle_stack):
    """The seam between a late watcher's history and the live feed has no gap and no duplicate."""
    job_id, steps = "job-seam", 300

    async def scenario():
        r = aioredis.Redis.from_url(idle_stack.redis_url)
        relay = Relay(store.AsyncJobStore.from_url(idle_stack.redis_url))
        await r.xadd(store.events_key(job_id), {"e": store.encode_event(_status(job_id, jobs_pb2.RUNNING))})

        async def watch(delay: float) -> list[str]:
            await asyncio.sleep(delay)
            return [item.event.cursor async for batch in relay.follow(job_id, "0-0", live=True) for item in batch]

        producer = asyncio.create_task(_produce(r, job_id, steps, 0.002))
        seen = await asyncio.gather(*(watch(i * 0.01) for i in range(60)))
        await producer
        stored = [i.decode() for i, _ in await r.xrange(store.events_key(job_id))]
        await relay.astore.close()
        await r.aclose()
        return seen, stored

    seen, stored = asyncio.run(scenario())
    assert len(stored) == steps + 2
    for cursors in seen:
        assert cursors == stored


def test_a_job_first_followed_while_the_reader_waits_on_others_streams_at_once(idle_stack, monkeypatch):
    """A new feed nudges the reader out of its blocking read, so its first live event does not wait for it to end."""
    # Unnudged, the reader's read of the first job's stream would wait an hour, or until a socket timeout.
    monkeypatch.setattr(store, "_BLOCK_MAX_S", 3600.0)
    monkeypatch.setattr(relay_module, "FEED_POLL_S", 3600.0)

    async def scenario():
        r = aioredis.Redis.from_url(idle_stack.redis_url)
        relay = Relay(store.AsyncJobStore.from_url(idle_stack.redis_url))
        for job_id in ("job-followed", "job-joined"):
            await r.xadd(store.events_key(job_id), {"e": store.encode_event(_status(job_id, jobs_pb2.RUNNING))})
        followed = relay.follow("job-followed", "0-0", live=True)
        await anext(followed)
        while not any(c["cmd"] == "xread" and "b" in c["flags"] for c in await r.client_list()):
            await asyncio.sleep(0.01)  # until the reader waits on the first job's stream
        joined = relay.follow("job-joined", "0-0", live=True)
        history = [item.event for item in await anext(joined)]
        await r.xadd(store.events_key("job-joined"), {"e": store.encode_event(_metrics("job-joined", 1))})
        # Far longer than a nudged read takes, and shorter than what would end an unnudged one and let the new
        # feed in: redis-py's 5 s socket timeout, tried twice by the store (10 s).
        live = [item.event for item in await asyncio.wait_for(anext(joined), 5)]
        await followed.aclose()
        await joined.aclose()
        wake = relay._wake.key
        await relay.aclose()
        left = await r.exists(wake)
        await r.aclose()
        return history, live, left

    history, live, left = asyncio.run(scenario())
    assert [e.status.state for e in history] == [jobs_pb2.RUNNING]
    assert [e.metrics.step for e in live] == [1]
    assert not left, "a relay that closes deletes its wake stream"


def test_a_slow_watcher_is_asked_to_resume_from_its_cursor_and_misses_nothing(idle_stack):
    job_id, steps = "job-slow", 40

    async def scenario():
        r = aioredis.Redis.from_url(idle_stack.redis_url)
        relay = Relay(store.AsyncJobStore.from_url(idle_stack.redis_url), queue_events=5)
        await r.xadd(store.events_key(job_id), {"e": store.encode_event(_status(job_id, jobs_pb2.RUNNING))})
        stream = relay.follow(job_id, "0-0", live=True)
        first = [item.event for item in await anext(stream)]
        # The watcher reads nothing while the job appends many more events than its queue holds.
        await _produce(r, job_id, steps, 0.0)
        await asyncio.sleep(2 * FEED_POLL_S)
        got = first + [item.event async for batch in stream for item in batch]
        notice = got.pop()
        assert relay.watchers == 0 and relay.feeds == 0, "a watcher that ended must leave its feed"
        resumed = [item.event async for batch in relay.follow(job_id, notice.cursor, live=True) for item in batch]
        stored = [i.decode() for i, _ in await r.xrange(store.events_key(job_id))]
        await relay.astore.close()
        await r.aclose()
        return got, notice, resumed, stored

    got, notice, resumed, stored = asyncio.run(scenario())
    assert notice.WhichOneof("kind") == "notice" and notice.notice.code == "WATCHER_TOO_SLOW"
    assert notice.cursor == got[-1].cursor, "a notice must resume right after the last event given"
    assert len(got) < len(stored), "the watcher should have been cut short"
    assert [e.cursor for e in got + resumed] == stored, "every event exactly once across the resume"


def test_streams_work_at_once_after_redis_restarts_under_the_server(make_stack, timemachine):
    # The relay's pooled connections to the old Redis are dead; the first read on each must not fail the call.
    s = make_stack("redis-restart-relay")
    s.start_redis(appendonly=True)
    s.start_server()
    with s.client() as c:
        job = c.submit(dataset=c.upload_bytes(timemachine), max_steps=5, **SMALL)
        before = [e.cursor for e in job.events(follow=False)]
        s.redis.kill()
        s.redis.wait()
        s.start_redis(appendonly=True)
        with grpc.insecure_channel(s.address) as channel:
            stub = jobs_pb2_grpc.JobServiceStub(channel)
            request = jobs_pb2.StreamEventsRequest(job_id=job.id, history_only=True)
            after = [e.cursor for e in stub.StreamEvents(request, timeout=30)]
        job.cancel()
    assert after == before


def test_a_history_comes_several_events_to_a_message_and_the_same_as_one_by_one(idle_stack, timemachine):
    steps = 1200
    r = redis.Redis.from_url(idle_stack.redis_url)
    with idle_stack.client() as c:
        job = c.submit(dataset=c.upload_bytes(timemachine), max_steps=5, **SMALL)
        for step in range(1, steps + 1):
            r.xadd(store.events_key(job.id), {"e": store.encode_event(_metrics(job.id, step))})
        request = jobs_pb2.StreamEventsRequest(job_id=job.id, history_only=True)
        with grpc.insecure_channel(idle_stack.address) as channel:
            stub = jobs_pb2_grpc.JobServiceStub(channel)
            singles = list(stub.StreamEvents(request, timeout=30))
            batches = list(stub.StreamEventBatches(request, timeout=30))
        job.cancel()
    r.close()
    assert [e.WhichOneof("kind") for e in singles] == ["status"] + ["metrics"] * steps
    assert [e for batch in batches for e in batch.events] == singles
    # One message per history read (relay.BATCH events), not one per event.
    assert len(batches) == -(-len(singles) // BATCH)


def _sized(cursor: str, size: int, state: int = 0) -> store.Stored:
    event = _status("job-x", state) if state else jobs_pb2.Event(job_id="job-x", metrics=jobs_pb2.Metrics(
        param_grad_norms=[jobs_pb2.ParamGradNorm(name="x" * size)]))
    return store.stored_event(cursor, {b"e": store.encode_event(event)})


def test_a_batch_holds_at_most_its_byte_budget_and_ends_with_the_terminal_event():
    big = BATCH_BYTES * 2 // 5
    items = [_sized(f"1-{i}", big) for i in range(5)] + [_sized("1-5", 2 * BATCH_BYTES)] + [
        _sized("1-6", 10, jobs_pb2.SUCCEEDED), _sized("1-7", 10)]
    cut = list(batches(items))
    assert [[item.event.cursor for item in batch] for batch, _ in cut] == [
        ["1-0", "1-1"], ["1-2", "1-3"], ["1-4"], ["1-5"], ["1-6"]]
    assert [ends for _, ends in cut] == [False, False, False, False, True]
    assert all(sum(len(i.wire) for i in batch) <= BATCH_BYTES for batch, _ in cut if len(batch) > 1)


def test_a_stream_past_max_watchers_is_refused_as_busy_and_the_client_waits_its_turn(make_stack, timemachine):
    s = make_stack("busy-relay")
    s.start_redis()
    s.start_server("--max-watchers", "2")
    with s.client() as c:
        job = c.submit(dataset=c.upload_bytes(timemachine), max_steps=5, **SMALL)  # no worker: it stays QUEUED
        request = jobs_pb2.StreamEventsRequest(job_id=job.id)
        with grpc.insecure_channel(s.address) as channel:
            stub = jobs_pb2_grpc.JobServiceStub(channel)
            held = [stub.StreamEventBatches(request, timeout=60) for _ in range(2)]
            for call in held:
                next(call)  # each has begun: it got the job's QUEUED status
            try:
                next(stub.StreamEventBatches(request, timeout=10))
                refused = None
            except grpc.RpcError as e:
                refused = e
            seen: list[jobs_pb2.Event] = []
            waiting = threading.Thread(target=lambda: seen.extend(c.get_job(job.id).events()), daemon=True)
            waiting.start()
            time.sleep(1.5)
            assert not seen, "a third stream got in past --max-watchers 2"
            held[0].cancel()
            deadline = time.monotonic() + 20
            while not seen and time.monotonic() < deadline:
                time.sleep(0.05)
            assert seen, "the client did not get in once a stream had left"
            job.cancel()
            waiting.join(20)
            held[1].cancel()
    assert refused is not None and refused.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert refused.details().startswith("server busy: this server process already serves 2 event streams "
                                        "(--max-watchers 2)")
    assert gradserve.errors.from_rpc_error(refused).retry_after == 1.0
    assert [jobs_pb2.JobState.Name(e.status.state) for e in seen] == ["QUEUED", "CANCELLED"]
