"""gradserve-server: serve the JobService, or run a whole local stack.

    gradserve-server --redis-url redis://localhost:6379/0 --listen 0.0.0.0:50051 --http-listen 0.0.0.0:8080
    gradserve-server dev --workers 2            # private Redis + server + workers, Ctrl-C stops all
    gradserve-server hash-token TENANT < token  # a line for --tokens-file

Every flag also reads an environment variable (GRADSERVE_REDIS_URL,
GRADSERVE_LISTEN, GRADSERVE_HTTP_LISTEN, GRADSERVE_MAX_DATASET_MB, GRADSERVE_MAX_UPLOADS, GRADSERVE_MAX_ATTEMPTS,
GRADSERVE_REAP_INTERVAL_S, GRADSERVE_TOKENS_FILE, GRADSERVE_QUOTA_QUEUED,
GRADSERVE_QUOTA_RUNNING, GRADSERVE_TLS_CERT, GRADSERVE_TLS_KEY,
GRADSERVE_TLS_CLIENT_CA). With tokens configured, every call needs a bearer
token and sees only its tenant's jobs and datasets.

Besides serving, the server runs a reaper (`reaper.Reaper`) that gives the
jobs of workers that died to new attempts. SIGTERM or SIGINT stops it
gracefully (`serving.serve`): the health check turns NOT_SERVING, open event
streams end with a SERVER_SHUTTING_DOWN notice a DRAIN_S later (clients
reconnect from their last cursor), calls in flight get STOP_GRACE_S to
finish, and the process exits.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import sys

from gradserve.cmdline import Parser, add_version
from gradserve_server import auth, dev
from gradserve_server.reaper import DEFAULT_INTERVAL_S, DEFAULT_MAX_ATTEMPTS
from gradserve_server.relay import DEFAULT_MAX_WATCHERS, DEFAULT_QUEUE_EVENTS
from gradserve_server.service import DEFAULT_MAX_UPLOADS, ListenError, tls_credentials
from gradserve_server.serving import serve, wait_for_redis
from gradserve_store.settings import Shared

DEFAULT_LISTEN = "127.0.0.1:50051"
log = logging.getLogger("gradserve.server")


def _parser() -> argparse.ArgumentParser:
    p = Parser(
        prog="gradserve-server",
        description="Serve gradserve's JobService. `gradserve-server dev --help` runs a whole local stack instead; "
        "`gradserve-server hash-token --help` makes a line for --tokens-file.",
    )
    add_version(p, "gradserve-server")
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
        "--http-listen",
        default=os.environ.get("GRADSERVE_HTTP_LISTEN", ""),
        help="host:port to serve the web dashboard, /metrics (Prometheus) and /healthz on (env "
        "GRADSERVE_HTTP_LISTEN, default: none; port 0 picks a free one). With tokens configured the dashboard needs "
        "one too; /metrics and /healthz do not, so bind it where only your network reaches",
    )
    p.add_argument(
        "--max-dataset-mb",
        type=float,
        default=float(os.environ.get("GRADSERVE_MAX_DATASET_MB", "64")),
        help="largest dataset an upload may carry, in MiB (env GRADSERVE_MAX_DATASET_MB, default 64)",
    )
    p.add_argument(
        "--max-uploads",
        type=int,
        default=int(os.environ.get("GRADSERVE_MAX_UPLOADS", DEFAULT_MAX_UPLOADS)),
        help="uploads received at once, each holding its bytes and up to about 60 MiB more; another waits up to "
        f"10 s for a slot, then gets RESOURCE_EXHAUSTED (env GRADSERVE_MAX_UPLOADS, default {DEFAULT_MAX_UPLOADS})",
    )
    p.add_argument(
        "--watcher-queue-events",
        type=int,
        default=int(os.environ.get("GRADSERVE_WATCHER_QUEUE_EVENTS", DEFAULT_QUEUE_EVENTS)),
        help="events an event stream's watcher may fall behind before it is asked to reconnect from its cursor "
        f"(the client does so by itself; env GRADSERVE_WATCHER_QUEUE_EVENTS, default {DEFAULT_QUEUE_EVENTS})",
    )
    p.add_argument(
        "--max-watchers",
        type=int,
        default=int(os.environ.get("GRADSERVE_MAX_WATCHERS", DEFAULT_MAX_WATCHERS)),
        help="event streams served at once; another is refused with RESOURCE_EXHAUSTED, which the client retries "
        f"after a second (env GRADSERVE_MAX_WATCHERS, default {DEFAULT_MAX_WATCHERS})",
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
    p.add_argument(
        "--retain-days",
        type=float,
        default=float(os.environ.get("GRADSERVE_RETAIN_DAYS", "0")),
        help="delete jobs (record, events, checkpoint) this many days after they ended; 0 keeps them for ever "
        "(env GRADSERVE_RETAIN_DAYS, default 0)",
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
    if not 0 <= args.retain_days <= 36500:  # also refuses nan
        sys.exit(f"gradserve-server: --retain-days must be 0 (keep for ever) up to 36500, got {args.retain_days:g}")
    if args.max_uploads < 1:
        sys.exit(f"gradserve-server: --max-uploads must be at least 1, got {args.max_uploads}")
    if args.max_watchers < 1:
        sys.exit(f"gradserve-server: --max-watchers must be at least 1, got {args.max_watchers}")
    if args.watcher_queue_events < 1:
        sys.exit(f"gradserve-server: --watcher-queue-events must be at least 1, got {args.watcher_queue_events}")
    if args.quota_queued < 0 or args.quota_running < 0:
        sys.exit("gradserve-server: --quota-queued and --quota-running must be 0 (no cap) or more")
    if bool(args.tls_cert) != bool(args.tls_key) or (args.tls_client_ca and not args.tls_cert):
        sys.exit("gradserve-server: TLS needs both --tls-cert and --tls-key (and --tls-client-ca only with them)")
    try:
        shared = Shared.from_env(os.environ)
        tokens = auth.load_tokens(args.tokens_file, os.environ)
        credentials = tls_credentials(args.tls_cert, args.tls_key, args.tls_client_ca) if args.tls_cert else None
    except (OSError, ValueError) as e:
        sys.exit(f"gradserve-server: {e}")
    log.info("authentication %s; transport %s",
             f"on ({len(set(tokens.values()))} tenants)" if tokens else "OFF: anyone who reaches the port may use it",
             ("mutual TLS" if args.tls_client_ca else "TLS") if credentials else "plaintext")
    wait_for_redis(args.redis_url)
    try:
        asyncio.run(serve(args.redis_url, args.listen, shared=shared,
                          max_dataset_bytes=int(args.max_dataset_mb * 1024 * 1024),
                          max_attempts=args.max_attempts, reap_interval=args.reap_interval,
                          retain_s=args.retain_days * 86400, tokens=tokens,
                          credentials=credentials, quota_queued=args.quota_queued, quota_running=args.quota_running,
                          max_uploads=args.max_uploads, watcher_queue_events=args.watcher_queue_events,
                          max_watchers=args.max_watchers, http_listen=args.http_listen))
    except ListenError as e:
        sys.exit(f"gradserve-server: {e}")


if __name__ == "__main__":
    main()
