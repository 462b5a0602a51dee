"""Every command the README and docs/*.md name works as written: `capibara <command> --flag`
against the real argument parser, `make <target>` against the Makefile (a dry run), scripts
(`python benchmarks/x.py --flag`, `python -m module --flag`) against the files and their `--help`,
and the repository paths they name (the README's layout table first of all) against the tree.
Nothing here starts the mesh."""

from __future__ import annotations

import argparse
import functools
import pathlib
import re
import shlex
import subprocess
import sys

import pytest

from capibara_grpc.cli import build_parser

REPO = REAL_REPO = pathlib.Path(__file__).resolve().parents[2]
DOCS = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
# Top-level folders of the repository: a span starting with one of them is a path to check.
FOLDERS = (
    "benchmarks",
    "capibara_grpc",
    "clients",
    "config",
    "deploy",
    "docs",
    "envoy",
    "gateway",
    "protos",
    "tests",
    "tools",
)
# A file (with an extension) or a folder (ending in /): `tools/call` is MCP's method, not a path.
PATH = re.compile(rf"^(?:\./)?(?:{'|'.join(FOLDERS)})/(?:[\w./-]*/|[\w./-]*\.\w+)$")
SCRIPT = re.compile(r"^(?:\./)?(?:benchmarks|tools)/[\w/]+\.py$")
SEPARATORS = {"&&", "||", ";", "|", "&", "#", ">", "2>&1"}
SHELL_BLOCKS = {"sh", "bash", "shell"}


def commands(path: pathlib.Path) -> list[tuple[int, str]]:
    """(line, text) of everything in `path` that may be a command: inline code spans, each line of
    a sh block, and the `$ ` lines of console and plain blocks (the rest of those is output, whose
    own code spans still count)."""
    found = []
    fence = None  # the open block's language
    for number, line in enumerate(path.read_text().splitlines(), 1):
        stripped = line.strip()
        if stripped.startswith("```"):
            fence = None if fence is not None else stripped[3:].strip()
            continue
        if fence is None or fence in ("console", ""):
            if fence is not None and stripped.startswith("$ "):
                found.append((number, stripped[2:]))
            else:
                found += [(number, span) for span in re.findall(r"`([^`\n]+)`", line)]
        elif fence in SHELL_BLOCKS:
            found.append((number, stripped))
    return found


def words(text: str) -> list[list[str]]:
    """The simple commands of a shell line, as words, split at separators and comments."""
    try:
        tokens = shlex.split(text, comments=False)
    except ValueError:  # an unbalanced quote in a placeholder such as "..."
        tokens = text.split()
    pieces, current = [], []
    for token in tokens:
        if token in SEPARATORS or token.startswith("#"):
            pieces.append(current)
            current = []
            if token.startswith("#"):
                break
        else:
            current.append(token)
    return [p for p in [*pieces, current] if p]


def invocations(program) -> list[tuple[str, list[str]]]:
    """`where, args` of every command of the docs whose program `program(word)` accepts."""
    found = []
    for path in DOCS:
        for number, text in commands(path):
            for command in words(text):
                for i, word in enumerate(command):
                    if program(word):
                        found.append((f"{path.relative_to(REPO)}:{number}", command[i + 1 :]))
    return found


def flags(args: list[str]) -> list[str]:
    """The long and short options of `args`, brackets of optional parts removed (`[--model phi]`)."""
    return [a.strip("[]").split("=")[0] for a in args if a.strip("[]").startswith("-") and a.strip("[]") != "-"]


def subcommands(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    (action,) = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    return action.choices


def capibara_problems() -> tuple[list[str], int]:
    parser = build_parser()
    known = subcommands(parser)
    problems, count = [], 0
    for where, args in invocations(lambda w: w == "capibara" or w.endswith("/capibara")):
        args = [a.strip("[]") for a in args]
        while args[:1] == ["--config"]:  # `capibara --config FILE up`
            args = args[2:]
        if not args or not re.match(r"^[a-z][a-z-]*$", args[0]):
            continue  # `capibara` alone, or output such as "capibara up: ..."
        name, rest = args[0], args[1:]
        count += 1
        if name not in known:
            problems.append(f"{where}: capibara {name}: no such command (commands: {', '.join(known)})")
            continue
        options = {o for a in known[name]._actions for o in a.option_strings}
        problems += [f"{where}: capibara {name} {flag}: no such option" for flag in flags(rest) if flag not in options]
        if name == "serve":  # the services, unless a placeholder (<svc>)
            names = [a for a in rest if re.match(r"^[a-z]+$", a)]
            services = next(a.choices for a in known["serve"]._actions if a.dest == "services")
            problems += [f"{where}: capibara serve {s}: no such service" for s in names if s not in services]
    return problems, count


def test_every_capibara_command_and_option_in_the_docs_exists():
    problems, count = capibara_problems()
    assert count > 40, "the docs name capibara commands; the extraction must find them"
    assert problems == []


@functools.cache
def make_target_exists(target: str) -> bool:
    """`make -n target`: a dry run, nothing built."""
    result = subprocess.run(["make", "-n", "-C", str(REAL_REPO), target], capture_output=True, text=True, timeout=30)
    return result.returncode == 0 and "No rule to make target" not in result.stderr


def test_every_make_target_in_the_docs_exists():
    found = [(where, args[0]) for where, args in invocations(lambda w: w == "make") if args and args[0][0].isalpha()]
    assert {"run", "test", "unit"} <= {target for _, target in found}
    assert [
        f"{where}: make {target}: no such target" for where, target in found if not make_target_exists(target)
    ] == []


@functools.cache
def help_text(argv: tuple[str, ...]) -> str | None:
    """`argv --help`, for a script that takes options with argparse; None for one that does not."""
    result = subprocess.run([*argv, "--help"], capture_output=True, text=True, timeout=30, cwd=REPO)
    return result.stdout if result.returncode == 0 else None


def script_problems() -> tuple[list[str], int]:
    problems, count = [], 0
    for path in DOCS:
        for number, text in commands(path):
            for command in words(text):
                for i, word in enumerate(command):
                    where = f"{path.relative_to(REPO)}:{number}"
                    if SCRIPT.match(word):
                        source, argv = REPO / word, (sys.executable, word)
                    elif word == "-m" and i + 1 < len(command) and i > 0 and "python" in command[i - 1]:
                        module = command[i + 1]
                        base = REPO / module.replace(".", "/")
                        source = next((p for p in (base.with_suffix(".py"), base / "__main__.py") if p.is_file()), None)
                        argv = (sys.executable, "-m", module)
                        if source is None:
                            problems.append(f"{where}: python -m {module}: no such module in the repository")
                            continue
                        i += 1
                    else:
                        continue
                    count += 1
                    if not source.is_file():
                        problems.append(f"{where}: {word}: no such file")
                        continue
                    wanted = flags(command[i + 1 :])
                    if not wanted:
                        continue
                    text_of_source = source.read_text()
                    listed = help_text(argv) if "argparse" in text_of_source else None
                    for flag in wanted:
                        if flag not in (listed if listed is not None else text_of_source):
                            problems.append(f"{where}: {' '.join(argv[1:])} {flag}: not an option of it")
    return problems, count


def test_every_script_and_its_options_in_the_docs_exist():
    problems, count = script_problems()
    assert count > 20, "the docs name the benchmarks and tools; the extraction must find them"
    assert problems == []


def test_every_repository_path_in_the_docs_exists():
    missing = []
    for path in DOCS:
        for number, text in commands(path):
            for command in words(text):
                for word in command:
                    word = word.strip("[](),:").rstrip(".")
                    if PATH.match(word) and not (REPO / word).exists():
                        missing.append(f"{path.relative_to(REPO)}:{number}: {word}")
    assert missing == []


def layout_rows() -> list[tuple[int, list[str], list[str]]]:
    """(line, paths of the first column, code spans of the second) of the README's layout table."""
    text = (REPO / "README.md").read_text().splitlines()
    start = text.index("## Layout")
    rows = []
    for number, line in enumerate(text[start + 1 :], start + 2):
        if line.startswith("## "):
            break
        cells = line.split("|")
        if len(cells) < 4 or set(cells[1].strip()) <= {"-"} or cells[1].strip() == "folder":
            continue
        rows.append((number, re.findall(r"`([^`]+)`", cells[1]), re.findall(r"`([^`]+)`", "|".join(cells[2:]))))
    return rows


def test_every_path_in_the_readme_layout_exists():
    rows = layout_rows()
    assert len(rows) > 10
    missing = []
    for number, paths, spans in rows:
        missing += [f"README.md:{number}: {p}" for p in paths if not any(REPO.glob(p.rstrip("/")))]
        # Parts named inside a folder's row (`supervision/`, `text.py`) are inside that folder.
        folder = paths[0] if len(paths) == 1 and paths[0].endswith("/") else ""
        for span in spans:
            if not re.match(r"^[\w./-]+(/|\.py|\.yaml|\.json)$", span):
                continue
            candidates = [REPO / span] + ([REPO / folder / span] if folder else [])
            if not any(c.exists() for c in candidates):
                missing.append(f"README.md:{number}: {span}" + (f" (in {folder})" if folder else ""))
    assert missing == []


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("capibara up [--split]", [["capibara", "up", "[--split]"]]),
        ("make run     # installs everything", [["make", "run"]]),
        (
            "cd x && .venv/bin/capibara chat hola | head",
            [["cd", "x"], [".venv/bin/capibara", "chat", "hola"], ["head"]],
        ),
        ('capibara chat "..." [--model phi]', [["capibara", "chat", "...", "[--model", "phi]"]]),
    ],
)
def test_commands_are_split_as_a_shell_would(text, expected):
    assert words(text) == expected


def test_a_wrong_command_or_option_would_be_caught(tmp_path, monkeypatch):
    doc = tmp_path / "doc.md"
    doc.write_text(
        "Run `capibara protoset --check`, `capibara nope`, `make no-such-target`,\n"
        "```sh\n.venv/bin/python benchmarks/ttft.py --no-such-flag\n```\n"
        "```console\n$ capibara up --split\ncapibara up: output, not a command\n```\n"
    )
    monkeypatch.setattr(sys.modules[__name__], "DOCS", [doc])
    monkeypatch.setattr(sys.modules[__name__], "REPO", tmp_path)
    problems, count = capibara_problems()
    assert count == 3
    assert [p.split(": ", 1)[1].split(" (")[0] for p in problems] == [
        "capibara protoset --check: no such option",
        "capibara nope: no such command",
    ]
    assert not make_target_exists("no-such-target") and make_target_exists("unit")
    (tmp_path / "benchmarks").mkdir()
    (tmp_path / "benchmarks" / "ttft.py").write_text((REAL_REPO / "benchmarks" / "ttft.py").read_text())
    problems, count = script_problems()
    assert count == 1
    assert problems == ["doc.md:3: benchmarks/ttft.py --no-such-flag: not an option of it"]
