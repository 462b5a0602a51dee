"""What pyproject.toml cannot say: the wheel holds the generated stubs.

A clean clone has no capibara_grpc/generated (git-ignored; `make protos` writes it with buf). The
build compiles protos/ with grpcio-tools' protoc into the build's capibara_grpc/generated, with the
import rewrite and __init__.py files of `make protos` (the same code: tools/grpc_tools_plugin.py),
so `pip install .` gives a package whose stubs import. Everything else is in pyproject.toml.
"""

import pathlib
import shutil
import sys

from setuptools import setup
from setuptools.command.build_py import build_py
from setuptools.command.sdist import sdist

ROOT = pathlib.Path(__file__).resolve().parent
# What the build reads besides the packages: an sdist must carry them too.
BUILD_INPUTS = ("protos", "tools/grpc_tools_plugin.py")


class BuildPyWithStubs(build_py):
    def run(self) -> None:
        super().run()
        if self.editable_mode:
            # An editable install imports the checkout's own capibara_grpc/generated, which
            # `make protos` keeps current; a clean clone gets it here once, so that
            # `pip install -e .` alone gives a capibara that starts.
            out = ROOT / "capibara_grpc" / "generated"
            if (out / "__init__.py").exists():
                return
        else:
            out = pathlib.Path(self.build_lib) / "capibara_grpc" / "generated"
        sys.path.insert(0, str(ROOT / "tools"))
        import grpc_tools_plugin

        shutil.rmtree(out, ignore_errors=True)
        written = grpc_tools_plugin.generate_package(ROOT / "protos", out)
        print(f"generated {len(written)} stub files from protos/ into {out}")


class SdistWithProtos(sdist):
    def make_release_tree(self, base_dir: str, files: list[str]) -> None:
        super().make_release_tree(base_dir, files)
        for name in BUILD_INPUTS:
            source, target = ROOT / name, pathlib.Path(base_dir) / name
            if source.is_dir():
                shutil.copytree(source, target, dirs_exist_ok=True)
            else:
                target.parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(source, target)


setup(cmdclass={"build_py": BuildPyWithStubs, "sdist": SdistWithProtos})
