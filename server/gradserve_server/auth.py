"""Bearer-token authentication: which tenant is calling.

Tokens are configured hashed, never in the clear: a file with one
``TENANT sha256:HEX`` line per token (``--tokens-file``, env
GRADSERVE_TOKENS_FILE), or the same pairs in GRADSERVE_TOKENS, separated by
commas. ``gradserve-server hash-token`` prints the line for a token.

Authentication is on whenever any token is configured. The interceptor checks
the ``authorization: Bearer TOKEN`` metadata of every call except the health
service, and answers UNAUTHENTICATED when it is missing or unknown. For
accepted calls it puts the tenant in `current_tenant`, where the servicer reads
it to namespace jobs and datasets.
"""

from __future__ import annotations

import contextvars
import hashlib
import hmac
import re
import sys
from collections.abc import Mapping
from pathlib import Path

import grpc

from gradserve.cmdline import Parser, add_version

# The tenant of the call being served; "" when authentication is off.
current_tenant: contextvars.ContextVar[str] = contextvars.ContextVar("gradserve_tenant", default="")

_HEALTH_PREFIX = "/grpc.health.v1.Health/"
_LINE = re.compile(r"(?P<tenant>[A-Za-z0-9_.-]{1,64})\s+sha256:(?P<digest>[0-9a-f]{64})")


def hash_token(token: str) -> str:
    return "sha256:" + hashlib.sha256(token.encode()).hexdigest()


def parse_tokens(text: str, source: str) -> dict[bytes, str]:
    """Digest -> tenant from `TENANT sha256:HEX` entries, one per line or comma-separated."""
    tokens: dict[bytes, str] = {}
    for number, entry in enumerate(re.split(r"[\n,]", text), start=1):
        entry = entry.split("#", 1)[0].strip()
        if not entry:
            continue
        match = _LINE.fullmatch(entry)
        if not match:
            raise ValueError(
                f"{source}: entry {number} is not `TENANT sha256:HEX` (tenant: letters, digits, _.-; "
                "`gradserve-server hash-token` prints a valid line)"
            )
        tokens[bytes.fromhex(match["digest"])] = match["tenant"]
    return tokens


def load_tokens(tokens_file: str | None, env: Mapping[str, str]) -> dict[bytes, str]:
    """Every configured token, from the file and the environment together."""
    tokens: dict[bytes, str] = {}
    if tokens_file:
        tokens.update(parse_tokens(Path(tokens_file).read_text(), tokens_file))
    if env.get("GRADSERVE_TOKENS"):
        tokens.update(parse_tokens(env["GRADSERVE_TOKENS"], "GRADSERVE_TOKENS"))
    return tokens


class Authenticator:
    def __init__(self, tokens: dict[bytes, str]):
        self._tokens = list(tokens.items())

    def tenant_for(self, token: str) -> str | None:
        """The tenant owning `token`, or None.

        Every configured digest is compared, in constant time, so the answer's
        timing says nothing about which entry (if any) came close.
        """
        digest = hashlib.sha256(token.encode()).digest()
        found = None
        for known, tenant in self._tokens:
            if hmac.compare_digest(digest, known):
                found = tenant
        return found


def _bearer(metadata) -> str:
    for key, value in metadata or ():
        if key == "authorization" and isinstance(value, str) and value.startswith("Bearer "):
            return value[len("Bearer "):].strip()
    return ""


def _with_tenant(behavior, tenant: str, streaming_response: bool):
    if streaming_response:

        async def stream(request, context):
            current_tenant.set(tenant)
            async for item in behavior(request, context):
                yield item

        return stream

    async def unary(request, context):
        current_tenant.set(tenant)
        return await behavior(request, context)

    return unary


def _refuse(handler: grpc.RpcMethodHandler, message: str) -> grpc.RpcMethodHandler:
    async def abort(request, context):
        await context.abort(grpc.StatusCode.UNAUTHENTICATED, message)

    async def abort_stream(request, context):
        await context.abort(grpc.StatusCode.UNAUTHENTICATED, message)
        yield  # pragma: no cover - makes this an async generator, as a streaming handler must be

    kwargs = dict(request_deserializer=handler.request_deserializer, response_serializer=handler.response_serializer)
    if handler.request_streaming and handler.response_streaming:
        return grpc.stream_stream_rpc_method_handler(abort_stream, **kwargs)
    if handler.request_streaming:
        return grpc.stream_unary_rpc_method_handler(abort, **kwargs)
    if handler.response_streaming:
        return grpc.unary_stream_rpc_method_handler(abort_stream, **kwargs)
    return grpc.unary_unary_rpc_method_handler(abort, **kwargs)


class AuthInterceptor(grpc.aio.ServerInterceptor):
    def __init__(self, authenticator: Authenticator):
        self.authenticator = authenticator

    async def intercept_service(self, continuation, handler_call_details):
        handler = await continuation(handler_call_details)
        if handler is None or handler_call_details.method.startswith(_HEALTH_PREFIX):
            return handler
        token = _bearer(handler_call_details.invocation_metadata)
        if not token:
            return _refuse(handler, "this server requires a token: pass `authorization: Bearer TOKEN` "
                                    "(gradserve --token, or GRADSERVE_TOKEN)")
        tenant = self.authenticator.tenant_for(token)
        if tenant is None:
            return _refuse(handler, "unknown token; ask the server's operator for a valid one")
        if handler.request_streaming and handler.response_streaming:
            behavior, make = handler.stream_stream, grpc.stream_stream_rpc_method_handler
        elif handler.request_streaming:
            behavior, make = handler.stream_unary, grpc.stream_unary_rpc_method_handler
        elif handler.response_streaming:
            behavior, make = handler.unary_stream, grpc.unary_stream_rpc_method_handler
        else:
            behavior, make = handler.unary_unary, grpc.unary_unary_rpc_method_handler
        return make(
            _with_tenant(behavior, tenant, handler.response_streaming),
            request_deserializer=handler.request_deserializer,
            response_serializer=handler.response_serializer,
        )


def hash_token_main(argv: list[str]) -> None:
    """`gradserve-server hash-token TENANT`: read a token on stdin, print its tokens-file line."""
    p = Parser(prog="gradserve-server hash-token",
               description="Read a bearer token on stdin and print the --tokens-file line for TENANT: the tenant "
               "and the token's SHA-256 digest (the token itself is never stored).",
               epilog="example: gradserve-server hash-token alice < alice.token >> tokens")
    add_version(p, "gradserve-server")
    p.add_argument("tenant", metavar="TENANT", help="who the token belongs to: 1-64 letters, digits, _ . -")
    args = p.parse_args(argv)
    if not re.fullmatch(r"[A-Za-z0-9_.-]{1,64}", args.tenant):
        p.error(f"TENANT must be 1-64 letters, digits, _ . or -, got {args.tenant!r}")
    token = sys.stdin.readline().strip()
    if len(token) < 16:
        sys.exit("gradserve-server hash-token: a token must be at least 16 characters; "
                 "`python -c 'import secrets; print(secrets.token_urlsafe(32))'` makes a good one")
    print(f"{args.tenant} {hash_token(token)}")
