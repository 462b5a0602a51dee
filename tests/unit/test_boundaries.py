"""The gateway depends on the library one way: nothing in capibara_grpc imports capibara_gateway.

The library starts the gateway only through the service table's "module:function" string, so a
process that runs no gateway never loads it, and the two packages cannot form an import cycle.
"""

from __future__ import annotations

import ast
import pathlib

import capibara_grpc

LIBRARY = pathlib.Path(capibara_grpc.__file__).parent
GATEWAY = "capibara_gateway"


def imported_modules(path: pathlib.Path) -> list[tuple[int, str]]:
    """(line, module) of every import statement in the file, at any depth (functions included)."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.append((node.lineno, node.module))
    return found


def test_the_library_never_imports_the_gateway():
    sources = [p for p in LIBRARY.rglob("*.py") if "generated" not in p.relative_to(LIBRARY).parts]
    assert len(sources) > 20
    offending = [
        f"{path.relative_to(LIBRARY.parent)}:{line} imports {module}"
        for path in sources
        for line, module in imported_modules(path)
        if module == GATEWAY or module.startswith(GATEWAY + ".")
    ]
    assert offending == []


def test_the_check_sees_imports_inside_functions(tmp_path):
    sample = tmp_path / "sample.py"
    sample.write_text("def start():\n    from capibara_gateway.core import ChatGateway\n    import capibara_gateway\n")
    assert imported_modules(sample) == [(2, "capibara_gateway.core"), (3, "capibara_gateway")]
