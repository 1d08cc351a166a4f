"""Serving one gradserve-server process: the gRPC service and the reaper, from start to a graceful stop.

`gradserve-server` (main) and `gradserve-server dev` (dev) both run `serve`,
so it lives apart from either of them.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import signal
import sys

import redis

from gradserve_server import corpus
from gradserve_store import store
from gradserve_server.reaper import DEFAULT_INTERVAL_S, DEFAULT_MAX_ATTEMPTS, Reaper
from gradserve_server.metrics import Metrics
from gradserve_server.service import ListenError, create_server, mark_serving
from gradserve_server.web import Dashboard
from gradserve_store.settings import Shared

STOP_GRACE_S = 5.0
# After a stop signal the server says NOT_SERVING but still answers for this
# long, so that a balancer polling its health can move new calls elsewhere
# before the port closes.
DRAIN_S = 1.0
# Allocations between the collector's youngest-generation runs (Python's default is 700). A relayed event
# allocates a few objects for each of its watchers, so at the default the collector runs every few events
# and stalls every stream at once; see BENCHMARKS.md's relay section.
GC_GEN0_THRESHOLD = 10_000
REDIS_WAIT_S = 15.0

log = logging.getLogger("gradserve.server")


def wait_for_redis(url: str, timeout: float = REDIS_WAIT_S) -> None:
    """Return once Redis answers PING; exit with a message saying what to check if it never does."""
    try:
        store.wait_for_redis(url, timeout)
    except redis.RedisError as e:
        sys.exit(f"gradserve-server: cannot reach Redis at {url} ({e}); check --redis-url and that Redis is running")


def tune_collector() -> None:
    """Set the garbage collector up for relaying: call once the process has loaded what it serves with."""
    # What is loaded by now lives as long as the process: frozen, the collector's full runs no longer walk it.
    gc.freeze()
    gc.set_threshold(GC_GEN0_THRESHOLD, *gc.get_threshold()[1:])


async def serve(redis_url: str, listen: str, *, shared: Shared, max_dataset_bytes: int, on_ready=None,
                max_attempts: int = DEFAULT_MAX_ATTEMPTS, reap_interval: float = DEFAULT_INTERVAL_S,
                retain_s: float = 0.0, http_listen: str = "", **server_options) -> None:
    """Serve and reap until SIGINT or SIGTERM; then stop taking calls and finish the ones in flight.

    With `http_listen` (host:port), the dashboard, /metrics and /healthz are served there too (`web`).
    `server_options` go to `create_server`: tokens, credentials, quotas. `on_ready(address, stop, dashboard)`
    runs once serving, with the dashboard's URL ("" without one).
    """
    metrics = Metrics()
    server, port, service, health_servicer = create_server(redis_url, listen, shared=shared,
                                                           max_dataset_bytes=max_dataset_bytes,
                                                           interceptors=(metrics.interceptor(),), **server_options)
    metrics.watch(service.store, service.relay)
    # Jobs recorded by an older server are not in ListJobs' indexes yet; once done, this finds none.
    indexed = await asyncio.to_thread(service.store.index_missing)
    if indexed:
        log.info("added %d jobs recorded before ListJobs' filters to their indexes", indexed)
    dashboard, dashboard_url = None, ""
    if http_listen:
        dashboard = Dashboard(service, metrics, server_options.get("tokens"))
        try:
            dashboard_url = f"http://{await dashboard.start(http_listen)}/"
        except (OSError, ValueError):
            await service.close()
            raise ListenError(http_listen, "--http-listen") from None
        log.info("dashboard, /metrics and /healthz on %s", dashboard_url)
    tune_collector()
    await server.start()
    await mark_serving(health_servicer, True)
    reaper = Reaper(redis_url, shared=shared, max_attempts=max_attempts, interval=reap_interval, retain_s=retain_s)
    reaping = asyncio.create_task(reaper.run())
    host = listen.rsplit(":", 1)[0]
    address = f"{host}:{port}"
    log.info("listening on %s (redis %s)", address, redis_url)
    # The first job on a built-in corpus would otherwise wait seconds for it.
    warm = asyncio.create_task(service.builtin_dataset(next(iter(corpus.BUILTINS))))
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    if on_ready is not None:
        await on_ready(address, stop, dashboard_url)
    await stop.wait()
    log.info("shutting down")
    # Health first, so that balancers send new calls elsewhere; then the open
    # streams end, telling their clients to reconnect, here or elsewhere.
    await health_servicer.enter_graceful_shutdown()
    await asyncio.sleep(DRAIN_S)
    service.end_streams()
    reaping.cancel()
    await server.stop(STOP_GRACE_S)
    if dashboard is not None:
        await dashboard.stop()
    warm.cancel()
    await service.close()
    reaper.close()
