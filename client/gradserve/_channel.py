"""How the client reaches a server: plain or TLS (optionally mutual), with or without a bearer token."""

from __future__ import annotations

import collections
from pathlib import Path

import grpc

MAX_MESSAGE_BYTES = 4 * 1024 * 1024
_OPTIONS = [
    ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
    ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
    # gRPC's default backoff grows to two minutes; a restarted server should be found again within seconds.
    ("grpc.initial_reconnect_backoff_ms", 250),
    ("grpc.max_reconnect_backoff_ms", 2000),
]


class _CallDetails(
    collections.namedtuple("_CallDetails", ("method", "timeout", "metadata", "credentials", "wait_for_ready",
                                            "compression")),
    grpc.ClientCallDetails,
):
    pass


class _BearerToken(
    grpc.UnaryUnaryClientInterceptor,
    grpc.UnaryStreamClientInterceptor,
    grpc.StreamUnaryClientInterceptor,
    grpc.StreamStreamClientInterceptor,
):
    """Adds `authorization: Bearer TOKEN` to every call.

    gRPC's own call credentials refuse to travel over a plain channel, and a
    plain channel on a trusted network (or an SSH tunnel) is a real setup.
    """

    def __init__(self, token: str):
        self.header = ("authorization", f"Bearer {token}")

    def _details(self, details):
        metadata = list(details.metadata or []) + [self.header]
        return _CallDetails(details.method, details.timeout, metadata, details.credentials,
                            details.wait_for_ready, details.compression)

    def intercept_unary_unary(self, continuation, details, request):
        return continuation(self._details(details), request)

    def intercept_unary_stream(self, continuation, details, request):
        return continuation(self._details(details), request)

    def intercept_stream_unary(self, continuation, details, request_iterator):
        return continuation(self._details(details), request_iterator)

    def intercept_stream_stream(self, continuation, details, request_iterator):
        return continuation(self._details(details), request_iterator)


def open_channel(target: str, *, token: str | None = None, tls: bool = False, ca_file: str | None = None,
                 cert_file: str | None = None, key_file: str | None = None) -> grpc.Channel:
    """A channel to `target`. TLS trusts `ca_file`, or the system's roots when it is None;
    `cert_file` and `key_file` present a client certificate for mutual TLS."""
    if tls:
        credentials = grpc.ssl_channel_credentials(
            root_certificates=Path(ca_file).read_bytes() if ca_file else None,
            private_key=Path(key_file).read_bytes() if key_file else None,
            certificate_chain=Path(cert_file).read_bytes() if cert_file else None,
        )
        channel = grpc.secure_channel(target, credentials, options=_OPTIONS)
    else:
        channel = grpc.insecure_channel(target, options=_OPTIONS)
    return grpc.intercept_channel(channel, _BearerToken(token)) if token else channel
