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

from gradserve.v1 import jobs_pb2, jobs_pb2_grpc
from gradserve_store import store
from gradserve_server.relay import FEED_POLL_S, HISTORY_READS, Relay

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
            return [e.cursor async for e in relay.follow(job_id, "0-0", live=True)]

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


def test_a_slow_watcher_is_asked_to_resume_from_its_cursor_and_misses_nothing(idle_stack):
    job_id, steps = "job-slow", 40

    async def scenario():
        r = aioredis.Redis.from_url(idle_stack.redis_url)
        relay = Relay(store.AsyncJobStore.from_url(idle_stack.redis_url), queue_events=5)
        await r.xadd(store.events_key(job_id), {"e": store.encode_event(_status(job_id, jobs_pb2.RUNNING))})
        stream = relay.follow(job_id, "0-0", live=True)
        first = await anext(stream)
        # The watcher reads nothing while the job appends many more events than its queue holds.
        await _produce(r, job_id, steps, 0.0)
        await asyncio.sleep(2 * FEED_POLL_S)
        got = [first] + [e async for e in stream]
        notice = got.pop()
        assert relay.watchers == 0 and relay.feeds == 0, "a watcher that ended must leave its feed"
        resumed = [e async for e in relay.follow(job_id, notice.cursor, live=True)]
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
