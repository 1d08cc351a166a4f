"""gradserve-server: serve the JobService, or run a whole local stack.

    gradserve-server --redis-url redis://localhost:6379/0 --listen 0.0.0.0:50051
    gradserve-server dev --workers 2            # private Redis + server + workers, Ctrl-C stops all

Every flag also reads an environment variable (GRADSERVE_REDIS_URL,
GRADSERVE_LISTEN, GRADSERVE_MAX_DATASET_MB).
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import sys
import time

import redis

from gradserve_server import corpus
from gradserve_server.service import create_server, mark_serving

DEFAULT_LISTEN = "127.0.0.1:50051"
STOP_GRACE_S = 5.0
REDIS_WAIT_S = 15.0

log = logging.getLogger("gradserve.server")


def wait_for_redis(url: str, timeout: float = REDIS_WAIT_S) -> None:
    """Return once Redis answers PING; exit with a message saying what to check if it never does."""
    deadline = time.monotonic() + timeout
    client = redis.Redis.from_url(url, socket_connect_timeout=1)
    while True:
        try:
            client.ping()
            client.close()
            return
        except redis.RedisError as e:
            if time.monotonic() > deadline:
                sys.exit(f"gradserve-server: cannot reach Redis at {url} ({e}); check --redis-url and that Redis is running")
            time.sleep(0.2)


async def serve(redis_url: str, listen: str, *, max_dataset_bytes: int, on_ready=None) -> None:
    """Serve until SIGINT or SIGTERM, then stop taking calls and finish the ones in flight."""
    server, port, service, health_servicer = create_server(redis_url, listen, max_dataset_bytes=max_dataset_bytes)
    await server.start()
    await mark_serving(health_servicer, True)
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
        await on_ready(address, stop)
    await stop.wait()
    await mark_serving(health_servicer, False)
    await server.stop(STOP_GRACE_S)
    warm.cancel()
    await service.close()


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="gradserve-server",
        description="Serve gradserve's JobService. `gradserve-server dev --help` runs a whole local stack instead.",
    )
    p.add_argument(
        "--redis-url",
        default=os.environ.get("GRADSERVE_REDIS_URL"),
        help="Redis shared with the workers (env GRADSERVE_REDIS_URL), e.g. redis://localhost:6379/0",
    )
    p.add_argument(
        "--listen",
        default=os.environ.get("GRADSERVE_LISTEN", DEFAULT_LISTEN),
        help=f"host:port to serve gRPC on (env GRADSERVE_LISTEN, default {DEFAULT_LISTEN}; port 0 picks a free one)",
    )
    p.add_argument(
        "--max-dataset-mb",
        type=float,
        default=float(os.environ.get("GRADSERVE_MAX_DATASET_MB", "64")),
        help="largest dataset an upload may carry, in MiB (env GRADSERVE_MAX_DATASET_MB, default 64)",
    )
    p.add_argument("--log-level", default=os.environ.get("GRADSERVE_LOG_LEVEL", "INFO"))
    return p


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["dev"]:
        from gradserve_server import dev

        dev.main(argv[1:])
        return
    args = _parser().parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(name)s %(levelname)s %(message)s")
    if not args.redis_url:
        sys.exit(
            "gradserve-server: --redis-url (or GRADSERVE_REDIS_URL) is required, e.g. redis://localhost:6379/0; "
            "`gradserve-server dev` runs a private Redis for you"
        )
    wait_for_redis(args.redis_url)
    asyncio.run(serve(args.redis_url, args.listen, max_dataset_bytes=int(args.max_dataset_mb * 1024 * 1024)))


if __name__ == "__main__":
    main()
