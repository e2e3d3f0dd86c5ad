"""Every `nucleus-export ...` command that an error hint, help text or message in the code names exists: its
subcommand, each of its flags, and every literal value given to a flag with choices (checked with the real parser)."""

from __future__ import annotations

import argparse
import ast
import re
import shlex
from pathlib import Path

import pytest

from nucleus_export.cli import build_parser

ROOT = Path(__file__).resolve().parents[1]
SOURCES = sorted([*(ROOT / "nucleus_export").rglob("*.py"), *(ROOT / "runtime" / "nucleus_runtime").rglob("*.py")])
COMMAND = re.compile(r"`(nucleus-export [^`]+)`")
# What an f-string interpolates: a value the test cannot know, accepted wherever a value goes.
HOLE = "\x00"


def _strings(tree: ast.AST) -> list[str]:
    """String constants and f-strings (interpolations replaced by HOLE). Adjacent literals are one node already."""
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.JoinedStr):
            found.append("".join(v.value if isinstance(v, ast.Constant) else HOLE for v in node.values))
        elif isinstance(node, ast.Constant) and isinstance(node.value, str):
            found.append(node.value)
    return found


def _commands() -> list[tuple[str, str]]:
    out = []
    for path in SOURCES:
        for text in _strings(ast.parse(path.read_text())):
            # A template whose subcommand is interpolated (`nucleus-export {arguments}`) is checked where it is filled.
            out += [(str(path.relative_to(ROOT)), c) for c in COMMAND.findall(text) if HOLE not in c.split()[1]]
    return out


def _subparsers(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    action = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return dict(action.choices)


COMMANDS = _commands()


def test_the_scan_finds_the_hints():
    # The scan itself works: the code names its commands in many places (a broken regex would find none).
    assert len(COMMANDS) >= 10
    assert {command.split()[1] for _, command in COMMANDS} >= {"export", "build"}


@pytest.mark.parametrize("where,command", COMMANDS, ids=[f"{w}:{c}".replace(HOLE, "{}") for w, c in COMMANDS])
def test_named_command_exists(where, command):
    subparsers = _subparsers(build_parser())
    words = shlex.split(re.sub(r"[\[\]]", " ", command.replace("|", " ")))
    assert words[1] in subparsers, f"{where}: `{command}` names no subcommand ({', '.join(subparsers)})"
    sub = subparsers[words[1]]
    options = sub._option_string_actions
    for i, word in enumerate(words[2:], start=2):
        flag = word.split("=", 1)[0]
        if not flag.startswith("-") or HOLE in flag:
            continue
        assert flag in options, f"{where}: `{command}`: {words[1]} has no option {flag}"
        action = options[flag]
        value = word.split("=", 1)[1] if "=" in word else (words[i + 1] if i + 1 < len(words) else None)
        if action.choices and value is not None and HOLE not in value and not value.isupper():
            # A literal value (not a placeholder such as MODEL or an interpolation) must be one the parser takes.
            assert value in action.choices, f"{where}: `{command}`: {value!r} is not a choice of {flag}"
