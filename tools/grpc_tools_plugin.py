"""Python stubs from the protos, by grpcio-tools' bundled protoc, as the package capibara_grpc.generated.

Two ways in, one generator and one import rewrite:
- `buf generate` (`make protos`, buf.gen.yaml) runs this file as a protoc plugin. grpcio-tools
  ships protoc with the python, pyi and grpc_python generators compiled in but no protoc-gen-*
  executables, which is what buf expects. The plugin receives buf's CodeGeneratorRequest, hands
  the same descriptors to the bundled protoc and returns its output, so stubs are generated
  offline with exactly the generator versions the runtime uses.
- The wheel build (setup.py, `pip install .`) calls generate_package() on protos/ directly: a clean
  clone has no stubs and no buf.

protoc roots the generated imports at the proto path (`from capibara.inference.v1 import
inference_pb2`). rewrite() roots ours under capibara_grpc.generated instead, so the stubs import
as an ordinary package with no sys.path edit; Google's imports (google.api, google.protobuf) stay
as they are. The files the python generator writes come with the __init__.py of every folder.

Usage in buf.gen.yaml:  local: [python, tools/grpc_tools_plugin.py, <python|pyi|grpc_python>]
(the python one with `strategy: all`, so that each __init__.py is written once).
"""

from __future__ import annotations

import pathlib
import re
import sys
import tempfile

# The Python package the stubs live in, and the proto root (protos/capibara/...) that is ours.
PACKAGE = "capibara_grpc.generated"
PROTO_ROOT = "capibara"
GENERATORS = ("python", "pyi", "grpc_python")

# `from capibara.x.v1 import y_pb2`, `import capibara.x.v1.y_pb2`, and the module name that the
# protobuf builder gives the message classes (their __module__, what pickle and repr use).
_IMPORT = re.compile(rf"^(\s*)(from|import) {PROTO_ROOT}\.", re.MULTILINE)
_BUILDER = re.compile(rf"(BuildTopDescriptorsAndMessages\(DESCRIPTOR, ')({PROTO_ROOT}\.)")

INIT_TEXT = '"""Generated from protos/ (`make protos`, or the wheel build): never edit."""\n'


def rewrite(content: str) -> str:
    """One generated .py or .pyi file with our proto modules imported from PACKAGE."""
    content = _IMPORT.sub(rf"\1\2 {PACKAGE}.{PROTO_ROOT}.", content)
    return _BUILDER.sub(rf"\1{PACKAGE}.\2", content)


def package_files(files: dict[str, str], inits: bool = True) -> dict[str, str]:
    """protoc's output (path relative to the output folder -> text), rewritten, with an __init__.py
    in the output folder and in every folder below it that holds a module."""
    result = {name: rewrite(text) if name.endswith((".py", ".pyi")) else text for name, text in files.items()}
    if inits:
        folders = {pathlib.PurePosixPath(name).parent for name in files if name.endswith(".py")}
        for folder in set(folders):
            folders.update(folder.parents)
        for folder in folders:
            result.setdefault(str(folder / "__init__.py"), INIT_TEXT)
    return result


def run_protoc(arguments: list[str], generators: tuple[str, ...], files: list[str]) -> dict[str, str]:
    """grpc_tools.protoc with `--<generator>_out` for each generator; its output as path -> text."""
    from grpc_tools import protoc

    with tempfile.TemporaryDirectory() as tmp:
        out = pathlib.Path(tmp)
        outputs = [f"--{g}_out={out}" for g in generators]
        status = protoc.main(["protoc", *arguments, *outputs, *files])
        if status != 0:
            flags = [a.split("=")[0] for a in [*arguments, *outputs] if not a.startswith("--proto_path")]
            raise RuntimeError(f"grpc_tools.protoc {' '.join(flags)} failed with status {status}")
        return {str(p.relative_to(out)): p.read_text() for p in sorted(out.rglob("*")) if p.is_file()}


def include_dirs() -> list[str]:
    """Where protoc finds the imports of our protos: grpcio-tools' well-known types
    (google/protobuf/*.proto) and googleapis-common-protos' google/api/*.proto."""
    import google.api
    import grpc_tools

    well_known = pathlib.Path(grpc_tools.__file__).parent / "_proto"
    googleapis = pathlib.Path(list(google.api.__path__)[0]).parent.parent
    return [str(well_known), str(googleapis)]


def generate_package(protos: pathlib.Path, out: pathlib.Path) -> list[pathlib.Path]:
    """Every .proto under `protos` compiled into the package folder `out` (what the wheel holds
    as capibara_grpc/generated); returns the files written.

    In two steps, as buf does: the descriptors first (protoc fills in each field's json_name
    there), then the generators from them, so the files equal those of `make protos`."""
    sources = sorted(str(p.relative_to(protos)) for p in protos.rglob("*.proto"))
    includes = [f"--proto_path={d}" for d in (str(protos), *include_dirs())]
    with tempfile.TemporaryDirectory() as tmp:
        descriptors = pathlib.Path(tmp, "set.pb")
        described = [*includes, "--include_imports", "--include_source_info", f"--descriptor_set_out={descriptors}"]
        run_protoc(described, (), sources)
        output = run_protoc([f"--descriptor_set_in={descriptors}"], GENERATORS, sources)
    written = []
    for name, text in package_files(output).items():
        path = out / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
        written.append(path)
    return written


def main() -> int:
    """The protoc plugin that buf runs: argv[1] is the generator."""
    from google.protobuf import descriptor_pb2
    from google.protobuf.compiler import plugin_pb2

    generator = sys.argv[1]
    request = plugin_pb2.CodeGeneratorRequest.FromString(sys.stdin.buffer.read())
    response = plugin_pb2.CodeGeneratorResponse(
        supported_features=plugin_pb2.CodeGeneratorResponse.FEATURE_PROTO3_OPTIONAL
    )
    with tempfile.TemporaryDirectory() as tmp:
        descriptors = pathlib.Path(tmp, "set.pb")
        descriptors.write_bytes(descriptor_pb2.FileDescriptorSet(file=request.proto_file).SerializeToString())
        try:
            output = run_protoc([f"--descriptor_set_in={descriptors}"], (generator,), list(request.file_to_generate))
        except RuntimeError as exc:
            response.error = str(exc)
        else:
            # The python generator's files come with the __init__.py files; buf refuses a file
            # that two plugins both write.
            for name, text in sorted(package_files(output, inits=generator == "python").items()):
                response.file.add(name=name, content=text)
    sys.stdout.buffer.write(response.SerializeToString())
    return 0


if __name__ == "__main__":
    sys.exit(main())
