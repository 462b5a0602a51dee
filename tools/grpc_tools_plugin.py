"""A protoc plugin for `buf generate` backed by grpcio-tools' bundled protoc.

grpcio-tools ships protoc with the python, pyi and grpc_python generators compiled in but no
protoc-gen-* executables, which is what buf expects. This plugin receives buf's
CodeGeneratorRequest, hands the same descriptors to the bundled protoc and returns its output,
so stubs are generated offline with exactly the generator versions the runtime uses.

Usage in buf.gen.yaml:  local: [python, tools/grpc_tools_plugin.py, <python|pyi|grpc_python>]
"""

import pathlib
import sys
import tempfile

from google.protobuf import descriptor_pb2
from google.protobuf.compiler import plugin_pb2
from grpc_tools import protoc


def main() -> int:
    generator = sys.argv[1]
    request = plugin_pb2.CodeGeneratorRequest.FromString(sys.stdin.buffer.read())
    response = plugin_pb2.CodeGeneratorResponse(
        supported_features=plugin_pb2.CodeGeneratorResponse.FEATURE_PROTO3_OPTIONAL
    )
    with tempfile.TemporaryDirectory() as tmp:
        descriptors = pathlib.Path(tmp, "set.pb")
        out = pathlib.Path(tmp, "out")
        out.mkdir()
        descriptors.write_bytes(descriptor_pb2.FileDescriptorSet(file=request.proto_file).SerializeToString())
        status = protoc.main(
            ["protoc", f"--descriptor_set_in={descriptors}", f"--{generator}_out={out}"]
            + list(request.file_to_generate)
        )
        if status != 0:
            response.error = f"grpc_tools.protoc --{generator}_out failed with status {status}"
        else:
            for path in sorted(out.rglob("*")):
                if path.is_file():
                    response.file.add(name=str(path.relative_to(out)), content=path.read_text())
    sys.stdout.buffer.write(response.SerializeToString())
    return 0


if __name__ == "__main__":
    sys.exit(main())
