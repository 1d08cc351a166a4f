"""The client's defaults, read from the environment in this one place.

    GRADSERVE_SERVER    the server's address (default 127.0.0.1:50051), or a target list
    GRADSERVE_TOKEN     a bearer token sent with every call
    GRADSERVE_CA_FILE   a PEM file of the CA that signed the server's certificate (turns TLS on)
    GRADSERVE_TLS       "1": TLS, trusting the system's roots
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass

DEFAULT_SERVER = "127.0.0.1:50051"


@dataclass(frozen=True)
class ClientSettings:
    server: str = DEFAULT_SERVER
    token: str | None = None
    ca_file: str | None = None
    tls: bool = False

    @classmethod
    def from_env(cls, env: Mapping[str, str] = os.environ) -> "ClientSettings":
        return cls(server=env.get("GRADSERVE_SERVER") or DEFAULT_SERVER, token=env.get("GRADSERVE_TOKEN") or None,
                   ca_file=env.get("GRADSERVE_CA_FILE") or None, tls=env.get("GRADSERVE_TLS") == "1")
