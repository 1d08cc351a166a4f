"""How a call fails: a few errors, each carrying the message its caller reads, and the one place they become gRPC statuses.

    ServiceError            INTERNAL, unless a subclass says otherwise
    ├── Invalid             INVALID_ARGUMENT, with a google.rpc.BadRequest naming every bad field
    ├── NotFound            NOT_FOUND (another tenant's job or dataset too: it must not tell them apart)
    ├── Precondition        FAILED_PRECONDITION: the job's state does not allow it
    ├── Exhausted           RESOURCE_EXHAUSTED: a quota, or the server busy (then with a
    │                       google.rpc.RetryInfo saying when to send the request again)
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

from gradserve_store import store

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

    def __init__(self, message: str, retry_after_s: float | None = None):
        super().__init__(message)
        # Set when the same request may succeed after this long (the server was busy, not over a quota).
        self.retry_after_s = retry_after_s


class Unavailable(ServiceError):
    code = grpc.StatusCode.UNAVAILABLE


BY_CODE_NAME = {cls.code.name: cls for cls in (Invalid, NotFound, Precondition, Exhausted, Unavailable)}


def _details_trailer(error: ServiceError, detail_message) -> tuple:
    """The google.rpc.Status trailer that carries `detail_message` beside the error's code and message."""
    detail = any_pb2.Any()
    detail.Pack(detail_message)
    status = status_pb2.Status(code=getattr(code_pb2, error.code.name), message=error.message, details=[detail])
    return (("grpc-status-details-bin", status.SerializeToString()),)


def _trailer(error: ServiceError) -> tuple:
    if isinstance(error, Invalid):
        return _details_trailer(error, error_details_pb2.BadRequest(
            field_violations=[error_details_pb2.BadRequest.FieldViolation(field=f, description=d)
                              for f, d in error.violations]))
    if isinstance(error, Exhausted) and error.retry_after_s is not None:
        retry = error_details_pb2.RetryInfo()
        retry.retry_delay.FromNanoseconds(int(error.retry_after_s * 1e9))
        return _details_trailer(error, retry)
    return ()


# Calls that found Redis unreachable since the process began, for /metrics.
redis_failures = 0

_EXPECTED = (ServiceError, store.NotFound, redis.ConnectionError, redis.TimeoutError)


# Where a caller finds the ids it may use, by the kind of id that was not found.
_LISTINGS = {"job-": "`gradserve list` lists yours", "sweep-": "`gradserve sweeps` lists yours",
             "ds-": "`gradserve datasets` lists yours"}


def listed_by(name: str) -> str:
    """What follows "not found" for an id of a kind a command lists, " (`gradserve list` lists yours)"; else ""."""
    return next((f" ({listing})" for prefix, listing in _LISTINGS.items() if name.startswith(prefix)), "")


async def _abort(context: grpc.aio.ServicerContext, exc: Exception) -> None:
    if isinstance(exc, ServiceError):
        await context.abort(exc.code, exc.message, trailing_metadata=_trailer(exc))
    if isinstance(exc, store.NotFound):
        await context.abort(grpc.StatusCode.NOT_FOUND, f"{exc.args[0]} not found{listed_by(exc.args[0])}")
    global redis_failures
    redis_failures += 1
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
