"""gradserve-worker with a fault installed in every job's process, at a chosen step.

    python tests/harness/faulty_worker.py --crash-at-step 150 [gradserve-worker flags]
    python tests/harness/faulty_worker.py --raise-at-step 20 [gradserve-worker flags]

--crash-at-step: the process dies there, as on a killed machine.
--raise-at-step: the trainer's report there warns, then raises, as a bug in
the training code would.

The tests start it in place of `gradserve-worker`; the product itself has no
way to do this. The hook is installed in the worker's parent before Celery
forks its pool, so every job's process has it.
"""

from __future__ import annotations

import logging
import os
import sys
import warnings

from gradserve_worker import hooks
from gradserve_worker import main as worker

log = logging.getLogger("gradserve.tests.faults")


# By name: the trainer's classes import torch, which the parent must not load before forking.
def _is_metrics_at(report, step: int) -> bool:
    return type(report).__name__ == "StepMetrics" and report.step >= step


def crash_at(step: int):
    def hook(report) -> None:
        if _is_metrics_at(report, step):
            log.error("fault injected: dying at step %d", report.step)
            os._exit(70)

    return hook


def raise_at(step: int):
    def hook(report) -> None:
        if _is_metrics_at(report, step):
            warnings.warn(f"fault injected: a warning at step {report.step}", RuntimeWarning)
            raise RuntimeError(f"fault injected at step {report.step}")

    return hook


FAULTS = {"--crash-at-step": crash_at, "--raise-at-step": raise_at}

if __name__ == "__main__":
    argv = sys.argv[1:]
    flag = next(f for f in FAULTS if f in argv)
    at = argv.index(flag)
    hooks.report_hooks.append(FAULTS[flag](int(argv[at + 1])))
    worker.main(argv[:at] + argv[at + 2:])
