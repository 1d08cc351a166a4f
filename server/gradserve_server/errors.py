"""How a call fails: a few errors, each carrying the message its caller reads, and the one place they become gRPC statuses.

    ServiceError            INTERNAL, unless a subclass says otherwise
    ├── Invalid             INVALID_ARGUMENT, with a google.rpc.BadRequest naming every bad field
    ├── NotFound            NOT_FOUND (another tenant's job or dataset too: it must not tell them apart)
    ├── Precondition        FAILED_PRECONDITION: the job's state does not allow it
    ├── Exhausted           RESOURCE_EXHAUSTED: a quota, or the server busy; retrying later may work
    └── Unavailable         UNAVAILABLE: what the call needs is not there now (a generate worker)

The store's NotFound (an id only) and Redis being unreachable are mapped here too.
"""

from __future__ import annotations

import functools
import inspect
import logging

import grpc
import redis
from google.protobuf import any_pb2
from google.rpc import code_pb2, error_details_pb2, status_pb2

from gradserve_server import store

log = logging.getLogger("gradserve.server")


class ServiceError(Exception):
    code = grpc.StatusCode.INTERNAL

    def __init__(self, message: str):
        super().__init__(message)
        self.message = message


class Invalid(ServiceError):
    code = grpc.StatusCode.INVALID_ARGUMENT

    def __init__(self, violations: list[tuple[str, str]]):
        super().__init__("; ".join(f"{f} {d}" for f, d in violations))
        self.violations = violations


class NotFound(ServiceError):
    code = grpc.StatusCode.NOT_FOUND


class Precondition(ServiceError):
    code = grpc.StatusCode.FAILED_PRECONDITION


class Exhausted(ServiceError):
    code = grpc.StatusCode.RESOURCE_EXHAUSTED


class Unavailable(ServiceError):
    code = grpc.StatusCode.UNAVAILABLE


BY_CODE_NAME = {cls.code.name: cls for cls in (Invalid, NotFound, Precondition, Exhausted, Unavailable)}


def _bad_request_trailer(error: Invalid) -> tuple:
    bad = error_details_pb2.BadRequest(
        field_violations=[error_details_pb2.BadRequest.FieldViolation(field=f, description=d)
                          for f, d in error.violations]
    )
    detail = any_pb2.Any()
    detail.Pack(bad)
    status = status_pb2.Status(code=code_pb2.INVALID_ARGUMENT, message=error.message, details=[detail])
    return (("grpc-status-details-bin", status.SerializeToString()),)


_EXPECTED = (ServiceError, store.NotFound, redis.ConnectionError, redis.TimeoutError)


async def _abort(context: grpc.aio.ServicerContext, exc: Exception) -> None:
    if isinstance(exc, Invalid):
        await context.abort(exc.code, exc.message, trailing_metadata=_bad_request_trailer(exc))
    if isinstance(exc, ServiceError):
        await context.abort(exc.code, exc.message)
    if isinstance(exc, store.NotFound):
        await context.abort(grpc.StatusCode.NOT_FOUND, f"{exc.args[0]} not found")
    log.warning("redis unreachable: %s", exc)
    await context.abort(grpc.StatusCode.UNAVAILABLE, "the job store (Redis) is unreachable; retry shortly")


def rpc(method):
    """Turn the errors above into their statuses, for unary and streaming methods alike; anything else is a bug."""
    if inspect.isasyncgenfunction(method):

        @functools.wraps(method)
        async def stream(self, request, context):
            try:
                async for item in method(self, request, context):
                    yield item
            except _EXPECTED as e:
                await _abort(context, e)

        return stream

    @functools.wraps(method)
    async def unary(self, request, context):
        try:
            return await method(self, request, context)
        except _EXPECTED as e:
            await _abort(context, e)

    return unary
