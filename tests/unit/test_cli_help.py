"""Every command and every argument of `capibara` says what it is for in `--help`."""

from __future__ import annotations

import argparse

from capibara_grpc.cli import build_parser


def missing_help(parser: argparse.ArgumentParser, path: str = "capibara") -> list[str]:
    """`path: argument` for every action of `parser` and its subcommands without help text."""
    missing = []
    for action in parser._actions:
        name = "/".join(action.option_strings) or action.dest
        if not action.help or action.help == argparse.SUPPRESS:
            missing.append(f"{path}: {name}")
        if isinstance(action, argparse._SubParsersAction):
            summaries = {choice.dest: choice.help for choice in action._choices_actions}
            for command, subparser in action.choices.items():
                if not summaries.get(command):
                    missing.append(f"{path} {command}: the command itself")
                missing += missing_help(subparser, f"{path} {command}")
    return missing


def test_every_command_and_argument_has_help():
    assert missing_help(build_parser()) == []


def test_the_walk_sees_every_command_and_finds_a_missing_help():
    parser = build_parser()
    commands = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    assert {"up", "serve", "chat", "mcp", "check", "envoy-config", "protoset", "k8s"} <= set(commands.choices)
    commands.choices["chat"].add_argument("--undocumented")
    bare = commands.add_parser("bare")
    bare.add_argument("thing", help="documented")
    assert missing_help(parser) == ["capibara chat: --undocumented", "capibara bare: the command itself"]


def test_every_help_renders():
    parser = build_parser()
    commands = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    assert "COMMAND" in parser.format_help()
    for name, subparser in commands.choices.items():
        assert f"usage: capibara {name}" in subparser.format_help()  # %(default)s and friends expand
