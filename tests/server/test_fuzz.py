"""Thousands of random and malformed requests: the server never crashes or hangs, every
rejection is a well-formed status that blames the request, and it stays healthy afterwards.

Runs against a real server over TCP with no worker, so specs that pass validation just queue.
"""

from __future__ import annotations

import math

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gradserve import spec as specs
from gradserve.v1 import jobs_pb2

# What a request may earn: anything else (INTERNAL, UNKNOWN, DEADLINE_EXCEEDED...) is a server fault.
ACCEPTABLE = {
    grpc.StatusCode.OK,
    grpc.StatusCode.INVALID_ARGUMENT,
    grpc.StatusCode.NOT_FOUND,
    grpc.StatusCode.FAILED_PRECONDITION,
}
METHODS = {
    "SubmitJob": ("unary", jobs_pb2.SubmitJobRequest),
    "GetJob": ("unary", jobs_pb2.GetJobRequest),
    "ListJobs": ("unary", jobs_pb2.ListJobsRequest),
    "CancelJob": ("unary", jobs_pb2.CancelJobRequest),
    "ListWorkers": ("unary", jobs_pb2.ListWorkersRequest),
    "StreamEvents": ("server_stream", jobs_pb2.StreamEventsRequest),
    "DownloadCheckpoint": ("server_stream", jobs_pb2.DownloadCheckpointRequest),
    "UploadDataset": ("client_stream", jobs_pb2.UploadDatasetRequest),
}
UINT32, UINT64 = 2**32 - 1, 2**64 - 1
SETTINGS = settings(max_examples=600, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)


def _identity(b: bytes) -> bytes:
    return b


@pytest.fixture(scope="module")
def channel(idle_stack):
    with grpc.insecure_channel(idle_stack.address) as ch:
        yield ch


def _check(error: grpc.RpcError | None) -> None:
    if error is None:
        return
    assert error.code() in ACCEPTABLE, f"{error.code()}: {error.details()}"
    assert error.details(), "a rejection must say why"


def _field_value(field: specs.Field):
    proto = jobs_pb2.JobSpec.DESCRIPTOR.fields_by_name[field.name]
    if field.choices:
        return st.one_of(st.sampled_from(field.choices), st.text(max_size=30))
    if proto.type == proto.TYPE_BOOL:
        return st.booleans()
    if proto.type == proto.TYPE_DOUBLE:
        return st.one_of(st.floats(allow_nan=True, allow_infinity=True), st.floats(field.low or 0, field.high))
    top = UINT32 if proto.type == proto.TYPE_UINT32 else UINT64
    return st.one_of(st.integers(0, top), st.integers(int(field.low or 0), int(min(field.high, 10_000))))


specs_strategy = st.fixed_dictionaries(
    {"dataset": st.one_of(st.sampled_from(specs.BUILTIN_DATASETS), st.just("ds-" + "0" * 64), st.text(max_size=80))},
    optional={f.name: _field_value(f) for f in specs.FIELDS},
)


@SETTINGS
@given(fields=specs_strategy)
def test_random_specs_are_accepted_or_refused_cleanly(channel, fields):
    call = channel.unary_unary("/gradserve.v1.JobService/SubmitJob", jobs_pb2.SubmitJobRequest.SerializeToString,
                               jobs_pb2.Job.FromString)
    request = jobs_pb2.SubmitJobRequest(spec=jobs_pb2.JobSpec(**fields))
    try:
        job = call(request, timeout=30)
    except grpc.RpcError as e:
        _check(e)
        if e.code() == grpc.StatusCode.INVALID_ARGUMENT:
            assert "spec." in e.details(), e.details()
        return
    # Accepted: then it really was valid.
    assert job.state == jobs_pb2.QUEUED
    assert specs.violations(job.spec) == []
    assert all(math.isfinite(getattr(job.spec, f.name)) for f in specs.FIELDS if not f.choices)


@SETTINGS
@given(method=st.sampled_from(sorted(METHODS)), payload=st.binary(max_size=300), count=st.integers(0, 4))
def test_random_bytes_to_every_method_are_refused_cleanly(channel, method, payload, count):
    kind, _ = METHODS[method]
    path = f"/gradserve.v1.JobService/{method}"
    try:
        if kind == "unary":
            channel.unary_unary(path, _identity, _identity)(payload, timeout=30)
        elif kind == "server_stream":
            for _ in channel.unary_stream(path, _identity, _identity)(payload, timeout=5):
                pass
        else:
            channel.stream_unary(path, _identity, _identity)(iter([payload] * count), timeout=30)
    except grpc.RpcError as e:
        if e.code() == grpc.StatusCode.DEADLINE_EXCEEDED and kind == "server_stream":
            return  # a well-formed StreamEvents for a live job follows it until the deadline
        _check(e)


@SETTINGS
@given(job_id=st.text(max_size=300), cursor=st.text(max_size=60))
def test_random_ids_and_cursors_are_refused_cleanly(channel, job_id, cursor):
    stub_calls = [
        ("GetJob", jobs_pb2.GetJobRequest(job_id=job_id)),
        ("CancelJob", jobs_pb2.CancelJobRequest(job_id=job_id)),
    ]
    for method, request in stub_calls:
        try:
            channel.unary_unary(f"/gradserve.v1.JobService/{method}", type(request).SerializeToString,
                                _identity)(request, timeout=30)
        except grpc.RpcError as e:
            _check(e)
    try:
        stream = channel.unary_stream("/gradserve.v1.JobService/StreamEvents",
                                      jobs_pb2.StreamEventsRequest.SerializeToString, _identity)
        for _ in stream(jobs_pb2.StreamEventsRequest(job_id=job_id, cursor=cursor), timeout=5):
            pass
    except grpc.RpcError as e:
        _check(e)


def test_the_server_is_still_healthy_and_serving_afterwards(channel, idle_stack):
    reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5)
    assert reply.status == health_pb2.HealthCheckResponse.SERVING
    assert idle_stack.server.poll() is None, "the server process died"
    listed = channel.unary_unary("/gradserve.v1.JobService/ListJobs", jobs_pb2.ListJobsRequest.SerializeToString,
                                 jobs_pb2.ListJobsResponse.FromString)(jobs_pb2.ListJobsRequest(limit=5), timeout=5)
    assert len(listed.jobs) == 5
