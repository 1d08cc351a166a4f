"""Malformed request bytes get INVALID_ARGUMENT, not INTERNAL.

gRPC answers a request it cannot deserialize with INTERNAL, which tells the
caller the server broke. This interceptor takes the decoding over: handlers
receive raw bytes, parse them here, and a message that does not parse as the
method's request type is refused as the caller's mistake.
"""

from __future__ import annotations

import grpc
from google.protobuf.message import DecodeError


def _identity(data: bytes) -> bytes:
    return data


class _Malformed(Exception):
    pass


def _parse(parse, data: bytes):
    try:
        return parse(data)
    except DecodeError as e:
        raise _Malformed(str(e)) from None


async def _abort(context, name: str, error: _Malformed) -> None:
    await context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"the request is not a valid {name}: {error}")


def _strict(handler: grpc.RpcMethodHandler) -> grpc.RpcMethodHandler:
    parse = handler.request_deserializer
    message_type = getattr(parse, "__self__", None)
    name = message_type.DESCRIPTOR.full_name if hasattr(message_type, "DESCRIPTOR") else "request"
    kwargs = dict(request_deserializer=_identity, response_serializer=handler.response_serializer)

    if handler.request_streaming:
        behavior = handler.stream_stream or handler.stream_unary

        async def parsed(requests):
            async for data in requests:
                yield _parse(parse, data)

        if handler.response_streaming:

            async def stream_stream(requests, context):
                try:
                    async for item in behavior(parsed(requests), context):
                        yield item
                except _Malformed as e:
                    await _abort(context, name, e)

            return grpc.stream_stream_rpc_method_handler(stream_stream, **kwargs)

        async def stream_unary(requests, context):
            try:
                return await behavior(parsed(requests), context)
            except _Malformed as e:
                await _abort(context, name, e)

        return grpc.stream_unary_rpc_method_handler(stream_unary, **kwargs)

    if handler.response_streaming:

        async def unary_stream(data, context):
            try:
                request = _parse(parse, data)
            except _Malformed as e:
                await _abort(context, name, e)
            async for item in handler.unary_stream(request, context):
                yield item

        return grpc.unary_stream_rpc_method_handler(unary_stream, **kwargs)

    async def unary_unary(data, context):
        try:
            request = _parse(parse, data)
        except _Malformed as e:
            await _abort(context, name, e)
        return await handler.unary_unary(request, context)

    return grpc.unary_unary_rpc_method_handler(unary_unary, **kwargs)


class StrictDecoding(grpc.aio.ServerInterceptor):
    """Applies to gradserve's own methods, whose streaming handlers are all async generators.

    Other services (health) may stream by writing to the context instead, which this wrapping would break.
    """

    async def intercept_service(self, continuation, handler_call_details):
        handler = await continuation(handler_call_details)
        if handler is None or handler.request_deserializer is None or not handler_call_details.method.startswith(
            "/gradserve."
        ):
            return handler
        return _strict(handler)
