"""gradserve-worker with a fault installed: every job's process dies at a chosen step, as on a killed machine.

    python tests/harness/faulty_worker.py --crash-at-step 150 [gradserve-worker flags]

The reliability tests start it in place of `gradserve-worker`; the product
itself has no way to do this. The hook is installed in the worker's parent
before Celery forks its pool, so every job's process has it.
"""

from __future__ import annotations

import logging
import os
import sys

from gradserve_worker import hooks
from gradserve_worker import main as worker

log = logging.getLogger("gradserve.tests.faults")


def crash_at(step: int):
    def hook(report) -> None:
        # By name: the trainer's classes import torch, which the parent must not load before forking.
        if type(report).__name__ == "StepMetrics" and report.step >= step:
            log.error("fault injected: dying at step %d", report.step)
            os._exit(70)

    return hook


if __name__ == "__main__":
    argv = sys.argv[1:]
    at = argv.index("--crash-at-step")
    hooks.report_hooks.append(crash_at(int(argv[at + 1])))
    worker.main(argv[:at] + argv[at + 2:])
