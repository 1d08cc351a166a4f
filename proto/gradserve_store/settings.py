"""Settings the servers and the workers of one deployment must agree on, read once where a process starts.

Each entry point (`gradserve-server`, `gradserve-server dev`, `gradserve-worker`)
builds one `Shared` from its environment and passes it down; nothing below an
entry point reads the environment.

    GRADSERVE_LEASE_TTL_S           a running job's lease: workers renew it every third of
                                    it, and a server presumes a worker dead once it lapses
                                    (and, after a Redis outage, waits this long before reaping)
    GRADSERVE_VISIBILITY_TIMEOUT_S  Redis hands an unacknowledged task to another worker
                                    after this; it must exceed the longest job
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass

DEFAULT_LEASE_TTL_S = 10.0
# Whether a job's worker is alive is for its lease to say (seconds), not for
# this redelivery, which would only bring back a task whose job is running or
# done; so it stays far above any job we expect (one week).
DEFAULT_VISIBILITY_TIMEOUT_S = 7 * 24 * 3600


@dataclass(frozen=True)
class Shared:
    lease_ttl_s: float = DEFAULT_LEASE_TTL_S
    visibility_timeout_s: int = DEFAULT_VISIBILITY_TIMEOUT_S

    @classmethod
    def from_env(cls, env: Mapping[str, str] = os.environ) -> "Shared":
        """The settings in `env`, defaults for the ones it lacks; ValueError names a bad one and its value."""
        return cls(
            lease_ttl_s=_number(env, "GRADSERVE_LEASE_TTL_S", float, DEFAULT_LEASE_TTL_S),
            visibility_timeout_s=_number(env, "GRADSERVE_VISIBILITY_TIMEOUT_S", int, DEFAULT_VISIBILITY_TIMEOUT_S),
        )


def _number(env: Mapping[str, str], name: str, kind: type, default):
    text = env.get(name)
    if text is None or text == "":
        return default
    try:
        value = kind(text)
    except ValueError:
        value = None
    if value is None or not value > 0 or value == float("inf"):
        raise ValueError(f"{name} must be a {'whole ' if kind is int else ''}number of seconds above 0, got {text!r}")
    return value
