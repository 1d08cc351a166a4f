"""gradserve-server: serve the JobService, or run a whole local stack.

    gradserve-server --redis-url redis://localhost:6379/0 --listen 0.0.0.0:50051
    gradserve-server dev --workers 2            # private Redis + server + workers, Ctrl-C stops all
    gradserve-server hash-token TENANT < token  # a line for --tokens-file

Every flag also reads an environment variable (GRADSERVE_REDIS_URL,
GRADSERVE_LISTEN, GRADSERVE_MAX_DATASET_MB, GRADSERVE_MAX_ATTEMPTS,
GRADSERVE_REAP_INTERVAL_S, GRADSERVE_TOKENS_FILE, GRADSERVE_QUOTA_QUEUED,
GRADSERVE_QUOTA_RUNNING, GRADSERVE_TLS_CERT, GRADSERVE_TLS_KEY,
GRADSERVE_TLS_CLIENT_CA). With tokens configured, every call needs a bearer
token and sees only its tenant's jobs and datasets.

Besides serving, the server runs a reaper (`reaper.Reaper`) that gives the
jobs of workers that died to new attempts. SIGTERM or SIGINT stops it
gracefully: the health check turns NOT_SERVING, open event streams end with a
SERVER_SHUTTING_DOWN notice a DRAIN_S later (clients reconnect from their last
cursor), calls in flight get STOP_GRACE_S to finish, and the process exits.
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

from gradserve_server import auth, corpus
from gradserve_server.reaper import DEFAULT_INTERVAL_S, DEFAULT_MAX_ATTEMPTS, Reaper
from gradserve_server.service import create_server, mark_serving, tls_credentials

DEFAULT_LISTEN = "127.0.0.1:50051"
STOP_GRACE_S = 5.0
# After a stop signal the server says NOT_SERVING but still answers for this
# long, so that a balancer polling its health can move new calls elsewhere
# before the port closes.
DRAIN_S = 1.0
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


async def serve(redis_url: str, listen: str, *, max_dataset_bytes: int, on_ready=None,
                max_attempts: int = DEFAULT_MAX_ATTEMPTS, reap_interval: float = DEFAULT_INTERVAL_S,
                **server_options) -> None:
    """Serve and reap until SIGINT or SIGTERM; then stop taking calls and finish the ones in flight.

    `server_options` go to `create_server`: tokens, credentials, quotas.
    """
    server, port, service, health_servicer = create_server(redis_url, listen, max_dataset_bytes=max_dataset_bytes,
                                                           **server_options)
    await server.start()
    await mark_serving(health_servicer, True)
    reaper = Reaper(redis_url, max_attempts=max_attempts, interval=reap_interval)
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
        await on_ready(address, stop)
    await stop.wait()
    log.info("shutting down")
    # Health first, so that balancers send new calls elsewhere; then the open
    # streams end, telling their clients to reconnect, here or elsewhere.
    await health_servicer.enter_graceful_shutdown()
    await asyncio.sleep(DRAIN_S)
    service.end_streams()
    reaping.cancel()
    await server.stop(STOP_GRACE_S)
    warm.cancel()
    await service.close()
    reaper.close()


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
    p.add_argument(
        "--max-attempts",
        type=int,
        default=int(os.environ.get("GRADSERVE_MAX_ATTEMPTS", DEFAULT_MAX_ATTEMPTS)),
        help="a job FAILS once this many workers died running it (env GRADSERVE_MAX_ATTEMPTS, default "
        f"{DEFAULT_MAX_ATTEMPTS})",
    )
    p.add_argument(
        "--reap-interval",
        type=float,
        default=float(os.environ.get("GRADSERVE_REAP_INTERVAL_S", DEFAULT_INTERVAL_S)),
        help="seconds between the reaper's looks for jobs whose worker's lease expired (env "
        f"GRADSERVE_REAP_INTERVAL_S, default {DEFAULT_INTERVAL_S:g})",
    )
    p.add_argument("--tokens-file", default=os.environ.get("GRADSERVE_TOKENS_FILE"),
                   help="`TENANT sha256:HEX` lines (from `gradserve-server hash-token TENANT`); with these, or with "
                   "GRADSERVE_TOKENS, every call needs a bearer token (env GRADSERVE_TOKENS_FILE)")
    p.add_argument("--quota-queued", type=int, default=int(os.environ.get("GRADSERVE_QUOTA_QUEUED", "0")),
                   help="most QUEUED jobs per tenant; 0 means no cap (env GRADSERVE_QUOTA_QUEUED)")
    p.add_argument("--quota-running", type=int, default=int(os.environ.get("GRADSERVE_QUOTA_RUNNING", "0")),
                   help="a tenant with this many RUNNING jobs cannot submit more; 0 means no cap "
                   "(env GRADSERVE_QUOTA_RUNNING)")
    p.add_argument("--tls-cert", default=os.environ.get("GRADSERVE_TLS_CERT"),
                   help="PEM certificate chain: serve TLS (with --tls-key; env GRADSERVE_TLS_CERT)")
    p.add_argument("--tls-key", default=os.environ.get("GRADSERVE_TLS_KEY"), help="PEM private key (env GRADSERVE_TLS_KEY)")
    p.add_argument("--tls-client-ca", default=os.environ.get("GRADSERVE_TLS_CLIENT_CA"),
                   help="PEM CA: require client certificates it signed, i.e. mutual TLS (env GRADSERVE_TLS_CLIENT_CA)")
    p.add_argument("--log-level", default=os.environ.get("GRADSERVE_LOG_LEVEL", "INFO"))
    return p


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["dev"]:
        from gradserve_server import dev

        dev.main(argv[1:])
        return
    if argv[:1] == ["hash-token"]:
        auth.hash_token_main(argv[1:])
        return
    args = _parser().parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(name)s %(levelname)s %(message)s")
    if not args.redis_url:
        sys.exit(
            "gradserve-server: --redis-url (or GRADSERVE_REDIS_URL) is required, e.g. redis://localhost:6379/0; "
            "`gradserve-server dev` runs a private Redis for you"
        )
    if args.max_attempts < 1:
        sys.exit(f"gradserve-server: --max-attempts must be at least 1, got {args.max_attempts}")
    if args.reap_interval <= 0:
        sys.exit(f"gradserve-server: --reap-interval must be above 0, got {args.reap_interval}")
    if args.quota_queued < 0 or args.quota_running < 0:
        sys.exit("gradserve-server: --quota-queued and --quota-running must be 0 (no cap) or more")
    if bool(args.tls_cert) != bool(args.tls_key) or (args.tls_client_ca and not args.tls_cert):
        sys.exit("gradserve-server: TLS needs both --tls-cert and --tls-key (and --tls-client-ca only with them)")
    try:
        tokens = auth.load_tokens(args.tokens_file)
        credentials = tls_credentials(args.tls_cert, args.tls_key, args.tls_client_ca) if args.tls_cert else None
    except (OSError, ValueError) as e:
        sys.exit(f"gradserve-server: {e}")
    log.info("authentication %s; transport %s",
             f"on ({len(set(tokens.values()))} tenants)" if tokens else "OFF: anyone who reaches the port may use it",
             ("mutual TLS" if args.tls_client_ca else "TLS") if credentials else "plaintext")
    wait_for_redis(args.redis_url)
    asyncio.run(serve(args.redis_url, args.listen, max_dataset_bytes=int(args.max_dataset_mb * 1024 * 1024),
                      max_attempts=args.max_attempts, reap_interval=args.reap_interval, tokens=tokens,
                      credentials=credentials, quota_queued=args.quota_queued, quota_running=args.quota_running))


if __name__ == "__main__":
    main()
