"""The FileDescriptorSet that Envoy's transcoder reads, built from the generated stubs.

Built from the very modules the services run, with every import included, so Envoy and the
servers can never disagree about the protos.
"""

from __future__ import annotations

from google.protobuf import descriptor_pb2
from google.rpc import status_pb2

from capibara_grpc.stubs import API_MODULES


def descriptor_set() -> descriptor_pb2.FileDescriptorSet:
    ordered: list = []
    seen: set[str] = set()

    def add(file_descriptor) -> None:
        if file_descriptor.name in seen:
            return
        seen.add(file_descriptor.name)
        for dependency in file_descriptor.dependencies:
            add(dependency)
        proto = descriptor_pb2.FileDescriptorProto()
        file_descriptor.CopyToProto(proto)
        ordered.append(proto)

    # google.rpc.Status lets the transcoder turn gRPC errors into JSON bodies.
    for module in (*API_MODULES, status_pb2):
        add(module.DESCRIPTOR)
    return descriptor_pb2.FileDescriptorSet(file=ordered)


def http_rules() -> list[dict]:
    """Every REST binding: method, path, gRPC method path, request message, body field."""
    from google.api import annotations_pb2

    rules = []
    for module in API_MODULES:
        for service in module.DESCRIPTOR.services_by_name.values():
            for method in service.methods:
                options = method.GetOptions()
                if not options.HasExtension(annotations_pb2.http):
                    continue
                rule = options.Extensions[annotations_pb2.http]
                verb = rule.WhichOneof("pattern")
                rules.append(
                    {
                        "verb": verb.upper(),
                        "path": getattr(rule, verb),
                        "grpc_path": f"/{service.full_name}/{method.name}",
                        "service": service.full_name,
                        "input": method.input_type,
                        "output": method.output_type,
                        "body": rule.body,
                        "server_streaming": method.server_streaming,
                    }
                )
    return rules
