"""The event relay: one Redis reader for all the jobs this server process follows, fanned out to their watchers.

    watcher A ─┐                      ┌─ history after A's cursor (XREAD, no wait), then A's queue
    watcher B ─┼─ Relay ── Feed(job) ─┤
    watcher C ─┘                      └─ the relay's one blocking XREAD over every feed's stream
                                         → every watcher's queue

A feed fixes where it starts (the job's newest event) before any watcher
registers with it, and a watcher reads the history after its cursor only
once registered: whatever the feed reads after its start reaches the
watcher's queue, and whatever came before is in the history. Live events the
history already gave are dropped, so the seam has neither a gap nor a
duplicate. A feed starts with its job's first watcher and stops after its
last one leaves. One reader serves every feed with a single XREAD over all
their streams, and at most HISTORY_READS history reads run at once, so the
Redis connections a server holds for its watchers stay constant, however
many watch and however many jobs they watch. The read also waits on a
stream of the relay's own (store.Wake), which a new feed nudges: the read
starts again with it at once, instead of when its wait runs out.

Events go out in batches: whatever a watcher has waiting (up to BATCH_BYTES)
is one message, so one that falls behind catches up in fewer messages, which
is where a server's time goes (about 40 us of CPU per gRPC message, whatever
its size). Each event is encoded once, where it is read (store.Stored), not
once per watcher.

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
from gradserve_server import errors
from gradserve_store import store

log = logging.getLogger("gradserve.relay")

# Events a watcher may fall behind its feed before it is asked to resume from its cursor.
DEFAULT_QUEUE_EVENTS = 10_000
# Event streams one server process serves at once; more are refused as busy. A grpc.aio server (grpcio
# 1.85) stops starting new streaming calls at about 2,400 open ones, without an error, and gradserve's at
# about 1,800: below that, a stream too many is told so instead of hanging (see BENCHMARKS.md).
DEFAULT_MAX_WATCHERS = 1_500
# When a stream refused as busy may try again: by then a watcher has often left.
BUSY_RETRY_AFTER_S = 1.0
# How long the reader's blocking read waits for an event or a new feed's nudge before it reads again.
FEED_POLL_S = 0.25
# Events one history read takes at a time, and the reader from each stream.
BATCH = 500
# The most encoded bytes one message carries; a single larger event still goes, alone.
BATCH_BYTES = 1 << 20
# Short reads (history, a feed's start) in flight at once, whatever the number of watchers arriving:
# each holds a connection.
HISTORY_READS = 8
# The reader's wait before it tries Redis again after a failed read.
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
        self.events: collections.deque[store.Stored] = collections.deque()
        self.wake = asyncio.Event()
        self.ended = ""  # a notice code once the watcher must stop

    def offer(self, item: store.Stored) -> None:
        if self.ended:
            return
        if len(self.events) >= self.limit:
            self.events.clear()  # it will replay from Redis; holding these helps nobody
            self.ended = WATCHER_TOO_SLOW
        else:
            self.events.append(item)
        self.wake.set()

    def end(self, code: str) -> None:
        self.ended = self.ended or code
        self.wake.set()


class _Feed:
    """A followed job: where the reader has read its stream up to, and the watchers it hands events to."""

    def __init__(self, job_id: str, start: str):
        self.job_id, self.last = job_id, start
        self.watchers: set[_Watcher] = set()


class Relay:
    """The feeds of this server process's followed jobs and their one reader. `follow` is what the streams run."""

    def __init__(self, astore: store.AsyncJobStore, *, queue_events: int = DEFAULT_QUEUE_EVENTS,
                 max_watchers: int = DEFAULT_MAX_WATCHERS):
        if max_watchers < 1:
            raise ValueError(f"max_watchers must be at least 1, got {max_watchers}")
        self.astore, self.queue_events, self.max_watchers = astore, queue_events, max_watchers
        self._feeds: dict[str, _Feed] = {}
        self._watchers: set[_Watcher] = set()
        self._reader: asyncio.Task | None = None
        self._closing = False
        self._failed_reads = 0
        # Totals since the process began, for /metrics: events handed to watchers, and reads Redis failed.
        self.relayed = 0
        self.redis_errors = 0
        self._history_reads = asyncio.Semaphore(HISTORY_READS)
        self._wake = store.Wake()

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
        """Stop the reader, then let go of Redis."""
        self.close()
        if self._reader is not None:
            self._reader.cancel()
            await asyncio.gather(self._reader, return_exceptions=True)
        try:
            await self.astore.forget(self._wake)
        except (redis.ConnectionError, redis.TimeoutError):
            pass  # it expires (store.WAKE_TTL_S)
        await self.astore.close()

    def _add_feed(self, job_id: str, start: str) -> _Feed:
        feed = self._feeds[job_id] = _Feed(job_id, start)
        if self._reader is None:
            self._reader = asyncio.create_task(self._guarded_read())
        return feed

    async def _guarded_read(self) -> None:
        try:
            await self._read()
        except Exception:
            log.exception("the relay's reader failed; its watchers are asked to reconnect")
            self._reader = None
            for feed in list(self._feeds.values()):
                for watcher in list(feed.watchers):
                    watcher.end(FEED_FAILED)

    async def _read(self) -> None:
        outage = False
        while True:
            if not self._feeds:
                # Checked and cleared in one step of the loop, so a feed added from now on starts a new reader.
                self._reader = None
                return
            # A feed added during the read nudges it, and waits for the next one; its start is fixed, so it
            # loses nothing.
            feeds = dict(self._feeds)
            try:
                read = await self.astore.read_streams({job_id: feed.last for job_id, feed in feeds.items()},
                                                      count=BATCH, block_s=FEED_POLL_S, wake=self._wake)
            except (redis.ConnectionError, redis.TimeoutError) as e:
                outage = True
                self.redis_down(e)
                await asyncio.sleep(RETRY_S)
                continue
            if outage:
                outage = False
                self.redis_up()
            for job_id, items in read.items():
                feed = feeds[job_id]
                watchers = list(feed.watchers)  # one snapshot a batch: a watcher may leave while it is handed out
                for item in items:
                    feed.last = item.event.cursor
                    for watcher in watchers:
                        watcher.offer(item)

    def redis_down(self, error: Exception) -> None:
        # One line when an outage starts and one when it ends, however long it lasts.
        if not self._failed_reads:
            log.warning("redis unreachable (%s); the event reader retries every %.1f s", error, RETRY_S)
        self._failed_reads += 1
        self.redis_errors += 1

    def redis_up(self) -> None:
        if self._failed_reads:
            log.warning("redis is back; the event reader's reads had failed %d times", self._failed_reads)
            self._failed_reads = 0

    async def newest(self, job_id: str) -> str:
        """The cursor of the job's newest event ("0-0": none), read as one of the relay's short reads."""
        async with self._history_reads:
            return await self.astore.last_cursor(job_id)

    async def follow(self, job_id: str, after: str, *, live: bool) -> AsyncIterator[list[store.Stored]]:
        """Batches of the events after cursor `after` ("0-0": all), oldest first; with `live`, then new ones until
        the job ends.

        A stream ended early (the server closing, the watcher too slow) ends
        with a notice whose cursor is that of the last event given.
        """
        # Counted and registered in one step, with no wait between: streams arriving together cannot all
        # pass the check before any of them counts.
        if len(self._watchers) >= self.max_watchers:
            raise errors.Exhausted(
                f"server busy: this server process already serves {len(self._watchers)} event streams "
                f"(--max-watchers {self.max_watchers}); retry shortly, or reach another server process",
                retry_after_s=BUSY_RETRY_AFTER_S)
        watcher = _Watcher(self.queue_events)
        if self._closing:
            watcher.end(SERVER_SHUTTING_DOWN)
        self._watchers.add(watcher)
        feed, added = None, False
        last = after
        try:
            if live:
                feed = self._feeds.get(job_id)
                if feed is None:
                    start = await self.newest(job_id)
                    # Another watcher may have started one while this one waited for Redis.
                    feed = self._feeds.get(job_id)
                    if feed is None:
                        feed = self._add_feed(job_id, start)
                        added = True
                # Registered before the history is read, with the feed's start already fixed: see the module.
                feed.watchers.add(watcher)
                if added:
                    # The reader may be waiting on the other feeds' streams: its next read takes this one in.
                    async with self._history_reads:
                        await self.astore.nudge(self._wake)
            while not watcher.ended:
                async with self._history_reads:
                    items = await self.astore.read_events(job_id, last, count=BATCH)
                for batch, ends in batches(items):
                    self.relayed += len(batch)
                    yield batch
                    last = batch[-1].event.cursor
                    if ends:
                        return
                if len(items) < BATCH:
                    break
            if watcher.ended:
                yield [_notice(job_id, last, watcher.ended)]
                return
            if not live:
                return
            seen = store.cursor_position(last)
            while True:
                # The history gave some of the first ones already.
                while watcher.events and watcher.events[0].position <= seen:
                    watcher.events.popleft()
                if watcher.events:
                    batch, ends = _take_batch(watcher.events)
                    self.relayed += len(batch)
                    yield batch
                    last, seen = batch[-1].event.cursor, batch[-1].position
                    if ends:
                        return
                    continue
                if watcher.ended:
                    yield [_notice(job_id, last, watcher.ended)]
                    return
                watcher.wake.clear()
                await watcher.wake.wait()
        finally:
            self._watchers.discard(watcher)
            if feed is not None:
                feed.watchers.discard(watcher)
                if not feed.watchers and self._feeds.get(job_id) is feed:
                    del self._feeds[job_id]


def _take_batch(queue: collections.deque[store.Stored]) -> tuple[list[store.Stored], bool]:
    """Events from the front of `queue`, up to BATCH_BYTES (at least one), and whether the last ends the stream."""
    batch, size = [], 0
    while queue and (not batch or size + len(queue[0].wire) <= BATCH_BYTES):
        item = queue.popleft()
        batch.append(item)
        size += len(item.wire)
        if item.ends:
            return batch, True
    return batch, False


def batches(items: list[store.Stored]):
    """`items` cut into batches of at most BATCH_BYTES, ending at a terminal event; each with whether it ends."""
    queue = collections.deque(items)
    while queue:
        batch, ends = _take_batch(queue)
        yield batch, ends
        if ends:
            return


def _notice(job_id: str, last: str, code: str) -> store.Stored:
    # Notices are not stored, so each carries the cursor of the last event sent: resuming from it
    # continues right after that.
    return store.stored(jobs_pb2.Event(cursor="" if last == "0-0" else last, job_id=job_id,
                                       time=store.timestamp(time.time()),
                                       notice=jobs_pb2.Notice(code=code, message=_NOTICES[code])))
