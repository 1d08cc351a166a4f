"""The exceptions the client raises, one per gRPC status a caller can act on.

    GradserveError                 any failed call; .code is the grpc.StatusCode
    ├── InvalidArgument            a request field is wrong; .field names it, .violations has all of them
    ├── NotFound                   no such job, dataset or checkpoint
    ├── FailedPrecondition         the job's state does not allow it (cancelling a finished job)
    ├── ResourceExhausted          a quota, or the server busy: then .retry_after says when to try again
    └── Unavailable                the server (or its Redis) cannot be reached; safe to retry
"""

from __future__ import annotations

import grpc
from google.rpc import error_details_pb2, status_pb2


class GradserveError(Exception):
    def __init__(self, message: str, code: grpc.StatusCode | None = None):
        super().__init__(message)
        self.code = code


class InvalidArgument(GradserveError):
    def __init__(self, message: str, code=None, violations: list[tuple[str, str]] | None = None):
        super().__init__(message, code)
        self.violations = violations or []
        self.field = self.violations[0][0] if self.violations else None


class NotFound(GradserveError):
    pass


class FailedPrecondition(GradserveError):
    pass


class ResourceExhausted(GradserveError):
    def __init__(self, message: str, code=None, retry_after: float | None = None):
        super().__init__(message, code)
        # Seconds after which the same request may succeed (the server was busy); None for a quota.
        self.retry_after = retry_after


class Unavailable(GradserveError):
    pass


_BY_CODE = {
    grpc.StatusCode.INVALID_ARGUMENT: InvalidArgument,
    grpc.StatusCode.NOT_FOUND: NotFound,
    grpc.StatusCode.FAILED_PRECONDITION: FailedPrecondition,
    grpc.StatusCode.UNAVAILABLE: Unavailable,
    grpc.StatusCode.RESOURCE_EXHAUSTED: ResourceExhausted,
}


def _detail(error: grpc.RpcError, kind):
    """The google.rpc detail of type `kind` that the error's status carries, or None."""
    for key, value in error.trailing_metadata() or ():
        if key == "grpc-status-details-bin":
            for detail in status_pb2.Status.FromString(value).details:
                found = kind()
                if detail.Unpack(found):
                    return found
    return None


def from_rpc_error(error: grpc.RpcError) -> GradserveError:
    """The client exception for a failed call, keeping the server's message."""
    code = error.code()
    cls = _BY_CODE.get(code, GradserveError)
    message = error.details() or code.name
    if cls is InvalidArgument:
        bad = _detail(error, error_details_pb2.BadRequest)
        return InvalidArgument(message, code, [(v.field, v.description) for v in bad.field_violations] if bad else [])
    if cls is ResourceExhausted:
        retry = _detail(error, error_details_pb2.RetryInfo)
        return ResourceExhausted(message, code, retry.retry_delay.ToNanoseconds() / 1e9 if retry else None)
    return cls(message, code)
