"""`buf breaking` (WIRE_JSON) of the protos against those of an earlier commit of main.

Against: $BUF_BREAKING_AGAINST (any git ref) if set; else origin/main when it differs from HEAD
(a branch is checked against main); else HEAD~1 (on main, each landing against the one before).
The earlier protos are taken with `git archive` and built into an image with the same offline
Google API protos (.build/proto-deps), so nothing comes from the Buf Schema Registry. Both sides
are compared as images: buf 1.75 compares nothing when the input is a multi-module workspace
and the other side an image (it matches them by module), which would pass every change.

    .venv/bin/python tools/buf_breaking.py        (make breaking; make test runs it)
"""

from __future__ import annotations

import io
import os
import pathlib
import shutil
import subprocess
import sys
import tarfile

REPO = pathlib.Path(__file__).resolve().parent.parent
BUF = REPO / ".venv" / "bin" / "buf"
WORK = REPO / ".build" / "breaking"


def git(*args: str) -> str:
    return subprocess.run(["git", *args], cwd=REPO, capture_output=True, text=True, check=True).stdout.strip()


def resolve(ref: str) -> str | None:
    try:
        return git("rev-parse", "--verify", "--quiet", f"{ref}^{{commit}}")
    except subprocess.CalledProcessError:
        return None


def against_ref() -> str | None:
    if os.environ.get("BUF_BREAKING_AGAINST"):
        return os.environ["BUF_BREAKING_AGAINST"]
    head = resolve("HEAD")
    main = resolve("origin/main")
    if main and main != head:
        return "origin/main"
    return "HEAD~1" if resolve("HEAD~1") else None


WIRE_JSON = '{"version": "v2", "breaking": {"use": ["WIRE_JSON"]}}'


def breaking(before: pathlib.Path, after: pathlib.Path, work: pathlib.Path) -> subprocess.CompletedProcess:
    """buf breaking of workspace `after` against workspace `before` (each: buf.yaml, protos, deps)."""
    images = []
    for name, workspace in (("before", before), ("after", after)):
        image = work / f"{name}.binpb"
        subprocess.run([str(BUF), "build", str(workspace), "-o", str(image)], check=True)
        images.append(image)
    return subprocess.run(
        [str(BUF), "breaking", str(images[1]), "--against", str(images[0]), "--config", WIRE_JSON],
        capture_output=True,
        text=True,
    )


def main() -> int:
    ref = against_ref()
    if ref is None or resolve(ref) is None:
        print(f"buf breaking: no earlier commit to compare with ({ref or 'no history'}); nothing to check")
        return 0
    commit = resolve(ref)
    shutil.rmtree(WORK, ignore_errors=True)
    (WORK / "before").mkdir(parents=True)
    archive = subprocess.run(["git", "archive", "--format=tar", commit, "protos"], cwd=REPO, capture_output=True)
    if archive.returncode != 0:
        print(f"buf breaking: {ref} has no protos/; nothing to check")
        return 0
    with tarfile.open(fileobj=io.BytesIO(archive.stdout)) as tar:
        tar.extractall(WORK / "before", filter="data")
    shutil.copytree(REPO / ".build" / "proto-deps", WORK / "before" / "deps")
    (WORK / "before" / "buf.yaml").write_text("version: v2\nmodules:\n  - path: protos\n  - path: deps\n")
    result = breaking(WORK / "before", REPO, WORK)
    print(result.stdout + result.stderr, end="")
    print(f"buf breaking against {ref} ({commit[:10]}): {'ok' if result.returncode == 0 else 'BREAKING CHANGES'}")
    return result.returncode


if __name__ == "__main__":
    sys.exit(main())
