"""A job's log: what the worker logs while it runs an attempt, kept with the job in Redis.

    with job_log(job_store, lease):
        ...   # every record at the root logger's level or above, warnings included, goes to the job's log

`gradserve logs JOB` reads it back (JobStore.append_log keeps the newest
lines, each cut to a length). A worker trains one job per process, so what
the process logs meanwhile is the job's: the trainer, the lease keeper's
thread, torch's warnings, a crash's traceback.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Iterator

from gradserve_store.store import JobStore, Lease

# After a failed write, the lines of this long are dropped rather than each
# waiting on an unreachable Redis; the runner's own retries report the outage.
QUIET_AFTER_FAILURE_S = 5.0


class JobLog(logging.Handler):
    def __init__(self, job_store: JobStore, lease: Lease):
        super().__init__()
        self.store, self.lease = job_store, lease
        self.setFormatter(logging.Formatter("%(message)s"))
        self._quiet_until = 0.0

    def emit(self, record: logging.LogRecord) -> None:
        # redis-py's own records would come back here through the very write that logs them.
        if record.name.startswith("redis") or time.monotonic() < self._quiet_until:
            return
        try:
            self.store.append_log(self.lease.job_id, self.lease.attempt, record.created, record.levelname,
                                  record.name, self.format(record))
        except Exception:
            self._quiet_until = time.monotonic() + QUIET_AFTER_FAILURE_S


@contextlib.contextmanager
def job_log(job_store: JobStore, lease: Lease) -> Iterator[JobLog]:
    """Send the process's log records, and Python warnings, to the job's log while the block runs."""
    handler = JobLog(job_store, lease)
    root = logging.getLogger()
    root.addHandler(handler)
    logging.captureWarnings(True)
    try:
        yield handler
    finally:
        logging.captureWarnings(False)
        root.removeHandler(handler)
