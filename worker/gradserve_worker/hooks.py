"""Callables the runner hands every trainer report to, before it writes it: empty in production.

The reliability tests install one here (tests/harness/faulty_worker.py) to make
a job's process die at a chosen step, as a killed machine would. This module
imports nothing, so a worker's parent process can install hooks before it
forks its pool without loading the trainer.
"""

from __future__ import annotations

from collections.abc import Callable

report_hooks: list[Callable[[object], None]] = []
