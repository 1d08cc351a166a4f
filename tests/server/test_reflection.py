"""Standard gRPC tooling finds the API through server reflection, without the .proto files."""

from __future__ import annotations

import grpc
from google.protobuf.descriptor_pool import DescriptorPool
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import ProtoReflectionDescriptorDatabase

from gradserve.v1 import jobs_pb2


def test_reflection_lists_the_services_and_describes_every_method(idle_stack):
    with grpc.insecure_channel(idle_stack.address) as channel:
        database = ProtoReflectionDescriptorDatabase(channel)
        services = set(database.get_services())
        described = DescriptorPool(database).FindServiceByName("gradserve.v1.JobService")
        request_fields = {f.name for f in DescriptorPool(database).FindMessageTypeByName(
            "gradserve.v1.SubmitJobRequest").fields}
    assert {"gradserve.v1.JobService", "grpc.health.v1.Health", "grpc.reflection.v1alpha.ServerReflection"} <= services
    ours = jobs_pb2.DESCRIPTOR.services_by_name["JobService"]
    assert {m.name for m in described.methods} == {m.name for m in ours.methods}
    assert request_fields == {f.name for f in jobs_pb2.SubmitJobRequest.DESCRIPTOR.fields}
