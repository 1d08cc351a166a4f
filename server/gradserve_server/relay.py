"""The event relay: one Redis reader per followed job in this server process, fanned out to its watchers.

    watcher A ─┐                      ┌─ history after A's cursor (XREAD, no wait), then A's queue
    watcher B ─┼─ Relay ── Feed(job) ─┤
    watcher C ─┘           one reader └─ blocking XREAD on events:{job} → every watcher's queue

A feed fixes where it starts (the job's newest event) before any watcher
registers with it, and a watcher reads the history after its cursor only
once registered: whatever the feed reads after its start reaches the
watcher's queue, and whatever came before is in the history. Live events the
history already gave are dropped, so the seam has neither a gap nor a
duplicate. The feed starts with its first watcher and stops after its
last one leaves, and at most HISTORY_READS history reads run at once, so the
Redis connections a server holds grow with the jobs followed, never with the
watchers.

Each watcher's queue is bounded. A watcher that falls `queue_events` behind
(DEFAULT_QUEUE_EVENTS) is ended with a notice that carries its cursor, and the client resumes from it
(replaying from Redis), so a slow watcher neither slows the others nor grows
the server's memory.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import time
from collections.abc import AsyncIterator

import redis

from gradserve.v1 import jobs_pb2
from gradserve_store import store

log = logging.getLogger("gradserve.relay")

# Events a watcher may fall behind its feed before it is asked to resume from its cursor.
DEFAULT_QUEUE_EVENTS = 10_000
# How long one blocking read of a feed waits for an event before looking again (for its watchers leaving).
FEED_POLL_S = 1.0
# Events one history read or one feed read takes at a time.
BATCH = 500
# Short reads (history, a feed's start) in flight at once, whatever the number of watchers arriving:
# each holds a connection.
HISTORY_READS = 8
# A feed's wait before it tries Redis again after a failed read.
RETRY_S = 0.5
# Notice codes that end a stream early; the client resumes from the notice's cursor on any notice.
SERVER_SHUTTING_DOWN = "SERVER_SHUTTING_DOWN"
WATCHER_TOO_SLOW = "WATCHER_TOO_SLOW"
FEED_FAILED = "FEED_FAILED"
_NOTICES = {
    SERVER_SHUTTING_DOWN: "this server is shutting down; reconnect with your last cursor",
    WATCHER_TOO_SLOW: "this watcher fell too far behind the job's events; reconnect with your last cursor, and "
                      "the rest comes from the stored history",
    FEED_FAILED: "this server's reader of the job's events failed; reconnect with your last cursor",
}


class _Watcher:
    def __init__(self, limit: int):
        self.limit = limit
        self.events: collections.deque[jobs_pb2.Event] = collections.deque()
        self.wake = asyncio.Event()
        self.ended = ""  # a notice code once the watcher must stop

    def offer(self, event: jobs_pb2.Event) -> None:
        if self.ended:
            return
        if len(self.events) >= self.limit:
            self.events.clear()  # it will replay from Redis; holding these helps nobody
            self.ended = WATCHER_TOO_SLOW
        else:
            self.events.append(event)
        self.wake.set()

    def end(self, code: str) -> None:
        self.ended = self.ended or code
        self.wake.set()


class _Feed:
    """The one reader of a job's stream in this process."""

    def __init__(self, relay: Relay, job_id: str, start: str):
        self.relay, self.job_id, self.start = relay, job_id, start
        self.watchers: set[_Watcher] = set()
        self.task = asyncio.create_task(self._guarded())
        # The relay keeps every task until it ends, a feed its watchers left included (its last read).
        relay.tasks.add(self.task)
        self.task.add_done_callback(relay.tasks.discard)

    async def _guarded(self) -> None:
        try:
            await self.run()
        except Exception:
            log.exception("the feed of job %s failed; its watchers are asked to reconnect", self.job_id)
            for watcher in list(self.watchers):
                watcher.end(FEED_FAILED)

    async def run(self) -> None:
        astore, last, outage = self.relay.astore, self.start, False
        while self.watchers:
            try:
                events = await astore.read_events(self.job_id, last, count=BATCH, block_s=FEED_POLL_S)
            except (redis.ConnectionError, redis.TimeoutError) as e:
                outage = True
                self.relay.redis_down(e)
                await asyncio.sleep(RETRY_S)
                continue
            if outage:
                outage = False
                self.relay.redis_up()
            watchers = list(self.watchers)  # one snapshot a batch: a watcher may leave while it is handed out
            for event in events:
                last = event.cursor
                for watcher in watchers:
                    watcher.offer(event)


class Relay:
    """The feeds of this server process's followed jobs. `follow` is what StreamEvents runs."""

    def __init__(self, astore: store.AsyncJobStore, *, queue_events: int = DEFAULT_QUEUE_EVENTS):
        self.astore, self.queue_events = astore, queue_events
        self._feeds: dict[str, _Feed] = {}
        self._watchers: set[_Watcher] = set()
        self._closing = False
        self._failed_reads = 0
        self._history_reads = asyncio.Semaphore(HISTORY_READS)
        self.tasks: set[asyncio.Task] = set()

    @property
    def feeds(self) -> int:
        return len(self._feeds)

    @property
    def watchers(self) -> int:
        return len(self._watchers)

    def close(self) -> None:
        """The server is going away: every watcher ends with a SERVER_SHUTTING_DOWN notice."""
        self._closing = True
        for watcher in list(self._watchers):
            watcher.end(SERVER_SHUTTING_DOWN)

    async def aclose(self) -> None:
        """Stop the feeds still reading, then let go of Redis."""
        self.close()
        for task in list(self.tasks):
            task.cancel()
        await asyncio.gather(*self.tasks, return_exceptions=True)
        await self.astore.close()

    def redis_down(self, error: Exception) -> None:
        # One line when an outage starts and one when it ends, whatever the number of feeds retrying.
        if not self._failed_reads:
            log.warning("redis unreachable (%s); the event feeds retry every %.1f s", error, RETRY_S)
        self._failed_reads += 1

    def redis_up(self) -> None:
        if self._failed_reads:
            log.warning("redis is back; the event feeds' reads had failed %d times", self._failed_reads)
            self._failed_reads = 0

    async def newest(self, job_id: str) -> str:
        """The cursor of the job's newest event ("0-0": none), read as one of the relay's short reads."""
        async with self._history_reads:
            return await self.astore.last_cursor(job_id)

    async def follow(self, job_id: str, after: str, *, live: bool) -> AsyncIterator[jobs_pb2.Event]:
        """Events after cursor `after` ("0-0": all), oldest first; with `live`, then new ones until the job ends.

        A stream ended early (the server closing, the watcher too slow) ends
        with a notice whose cursor is that of the last event given.
        """
        watcher = _Watcher(self.queue_events)
        if self._closing:
            watcher.end(SERVER_SHUTTING_DOWN)
        self._watchers.add(watcher)
        feed = None
        last = after
        try:
            if live:
                feed = self._feeds.get(job_id)
                if feed is None:
                    start = await self.newest(job_id)
                    # Another watcher may have started one while this one waited for Redis.
                    feed = self._feeds.get(job_id)
                    if feed is None:
                        feed = self._feeds[job_id] = _Feed(self, job_id, start)
                # Registered before the history is read, with the feed's start already fixed: see the module.
                feed.watchers.add(watcher)
            while not watcher.ended:
                async with self._history_reads:
                    events = await self.astore.read_events(job_id, last, count=BATCH, block_s=None)
                for event in events:
                    yield event
                    last = event.cursor
                    if store.is_terminal(event):
                        return
                if len(events) < BATCH:
                    break
            if watcher.ended:
                yield _notice(job_id, last, watcher.ended)
                return
            if not live:
                return
            seen = store.cursor_position(last)
            while True:
                while watcher.events:
                    event = watcher.events.popleft()
                    if store.cursor_position(event.cursor) <= seen:
                        continue  # the history gave it already
                    yield event
                    last, seen = event.cursor, store.cursor_position(event.cursor)
                    if store.is_terminal(event):
                        return
                if watcher.ended:
                    yield _notice(job_id, last, watcher.ended)
                    return
                watcher.wake.clear()
                await watcher.wake.wait()
        finally:
            self._watchers.discard(watcher)
            if feed is not None:
                feed.watchers.discard(watcher)
                if not feed.watchers and self._feeds.get(job_id) is feed:
                    del self._feeds[job_id]


def _notice(job_id: str, last: str, code: str) -> jobs_pb2.Event:
    # Notices are not stored, so each carries the cursor of the last event sent: resuming from it
    # continues right after that.
    return jobs_pb2.Event(cursor="" if last == "0-0" else last, job_id=job_id, time=store.timestamp(time.time()),
                          notice=jobs_pb2.Notice(code=code, message=_NOTICES[code]))
