"""The bearer-token interceptor, on a real grpc.aio server over TCP with a tiny echo service."""

from __future__ import annotations

import asyncio
import threading

import grpc
import pytest
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from gradserve_server import auth

TOKEN_A, TOKEN_B = "token-of-tenant-a-0123456789", "token-of-tenant-b-0123456789"


def _identity(b: bytes) -> bytes:
    return b


async def _whoami(request, context):
    return auth.current_tenant.get().encode()


async def _whoami_stream(request, context):
    for _ in range(2):
        yield auth.current_tenant.get().encode()


@pytest.fixture(scope="module")
def address():
    loop = asyncio.new_event_loop()
    started = threading.Event()
    holder = {}

    async def serve():
        tokens = auth.parse_tokens(f"alpha {auth.hash_token(TOKEN_A)}\nbeta {auth.hash_token(TOKEN_B)}", "test")
        server = grpc.aio.server(interceptors=[auth.AuthInterceptor(auth.Authenticator(tokens))])
        server.add_generic_rpc_handlers([
            grpc.method_handlers_generic_handler("echo.Echo", {
                "WhoAmI": grpc.unary_unary_rpc_method_handler(_whoami, _identity, _identity),
                "WhoAmIStream": grpc.unary_stream_rpc_method_handler(_whoami_stream, _identity, _identity),
            })
        ])
        health_pb2_grpc.add_HealthServicer_to_server(health.aio.HealthServicer(), server)
        holder["port"] = server.add_insecure_port("127.0.0.1:0")
        holder["stop"] = asyncio.Event()
        await server.start()
        started.set()
        await holder["stop"].wait()
        await server.stop(0)

    thread = threading.Thread(target=loop.run_until_complete, args=(serve(),), daemon=True)
    thread.start()
    assert started.wait(10)
    yield f"127.0.0.1:{holder['port']}"
    loop.call_soon_threadsafe(holder["stop"].set)
    thread.join(10)
    assert not thread.is_alive()


def _call(address, method, token=None, stream=False):
    metadata = (("authorization", f"Bearer {token}"),) if token else None
    with grpc.insecure_channel(address) as channel:
        if stream:
            call = channel.unary_stream(f"/echo.Echo/{method}", _identity, _identity)
            return list(call(b"", metadata=metadata, timeout=5))
        return channel.unary_unary(f"/echo.Echo/{method}", _identity, _identity)(b"", metadata=metadata, timeout=5)


def test_each_token_maps_to_its_tenant(address):
    assert _call(address, "WhoAmI", TOKEN_A) == b"alpha"
    assert _call(address, "WhoAmI", TOKEN_B) == b"beta"
    assert _call(address, "WhoAmIStream", TOKEN_B, stream=True) == [b"beta", b"beta"]


@pytest.mark.parametrize("token", [None, "not-a-configured-token-at-all"])
@pytest.mark.parametrize("stream", [False, True])
def test_a_missing_or_unknown_token_is_unauthenticated(address, token, stream):
    with pytest.raises(grpc.RpcError) as err:
        _call(address, "WhoAmIStream" if stream else "WhoAmI", token, stream=stream)
    assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
    assert ("requires a token" if token is None else "unknown token") in err.value.details()


def test_health_needs_no_token(address):
    with grpc.insecure_channel(address) as channel:
        reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5)
    assert reply.status == health_pb2.HealthCheckResponse.SERVING


def test_tokens_are_configured_hashed_from_a_file_and_the_environment(tmp_path):
    path = tmp_path / "tokens"
    path.write_text(f"# operators\nalpha {auth.hash_token(TOKEN_A)}\n")
    tokens = auth.load_tokens(str(path), {"GRADSERVE_TOKENS": f"beta {auth.hash_token(TOKEN_B)}"})
    assert sorted(tokens.values()) == ["alpha", "beta"]
    assert TOKEN_A.encode() not in path.read_bytes()
    authenticator = auth.Authenticator(tokens)
    assert authenticator.tenant_for(TOKEN_A) == "alpha" and authenticator.tenant_for("nope") is None


def test_a_malformed_tokens_entry_names_its_place():
    with pytest.raises(ValueError, match="GRADSERVE_TOKENS: entry 2 is not `TENANT sha256:HEX`"):
        auth.parse_tokens(f"alpha {auth.hash_token(TOKEN_A)},beta plaintext-token", "GRADSERVE_TOKENS")
