"""The package layout holds: the gateway and the MCP server reach the other services only through
their clients and the shared types, and the modules import each other without a circle."""

from __future__ import annotations

import ast
from pathlib import Path

from capibara_grpc.services import SERVICES

REPO = Path(__file__).resolve().parents[2]
ROOTS = {"capibara_grpc": REPO / "capibara_grpc", "capibara_gateway": REPO / "gateway" / "capibara_gateway"}
# What the gateway and the MCP server may import of another service's package.
CLIENT_MODULE = "client"


def _modules() -> dict[str, Path]:
    found = {}
    for package, folder in ROOTS.items():
        for path in folder.rglob("*.py"):
            if "generated" in path.parts:
                continue
            parts = [package, *path.relative_to(folder).with_suffix("").parts]
            if parts[-1] == "__init__":
                parts.pop()
            found[".".join(parts)] = path
    return found


def _imports(path: Path, modules: dict[str, Path]) -> set[str]:
    """The mesh's modules `path` imports, anywhere in the file (a lazy import is an arrow too)."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
            names.update(f"{node.module}.{alias.name}" for alias in node.names)
    return {name for name in names if name in modules}


def test_the_gateway_and_the_mcp_server_use_the_services_clients_not_their_cores():
    modules = _modules()
    services = {s.name for s in SERVICES} - {"gateway"}
    outside = {
        name: path
        for name, path in modules.items()
        if name.startswith("capibara_gateway") or name.startswith("capibara_grpc.mcp_server")
    }
    wrong = []
    for name, path in outside.items():
        for imported in _imports(path, modules):
            parts = imported.split(".")
            if parts[0] == "capibara_grpc" and len(parts) > 2 and parts[1] in services and parts[2] != CLIENT_MODULE:
                wrong.append(f"{name} imports {imported}")
    assert not wrong, wrong


def test_no_import_circle():
    modules = _modules()
    graph = {name: _imports(path, modules) - {name} for name, path in modules.items()}
    # A package's __init__ importing its own modules is not a circle of the code's design.
    for name in graph:
        graph[name] = {m for m in graph[name] if not m.startswith(name + ".")}
    circles, state = [], {}

    def visit(node: str, stack: list[str]) -> None:
        state[node] = "open"
        stack.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == "open":
                circles.append(stack[stack.index(nxt) :] + [nxt])
            elif nxt not in state:
                visit(nxt, stack)
        stack.pop()
        state[node] = "done"

    for node in sorted(graph):
        if node not in state:
            visit(node, [])
    assert not circles, [" -> ".join(c) for c in circles]
