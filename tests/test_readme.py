"""The README and docs/ tell the truth about the code.

1. Every `nucleus-export ...` command line shown in README.md, docs/*.md, runtime/README.md and plugins/README.md
   names a real subcommand, real flags and, for flags with choices, literal values the parser takes (checked with the
   real parser, as tests/test_fix_hints.py does for the code). A command in a code block without synopsis marks
   (`[...]`, `a|b`, `...`) must parse completely with `build_parser().parse_args`, required arguments included.
2. The README's block marked `<!-- test_readme: run -->` runs as written, line by line, in an empty temporary
   folder, each command with exit code 0. Nothing is substituted: its outputs are relative folders and files
   (bundle-tiny, triton_repo, *.safetensors) inside that folder. `nucleus-export` lines run through
   `nucleus_export.cli.main` in this process, which is what the console script calls (checked against
   pyproject.toml), so the tiny model and torch load once; the `python -c` line runs with this interpreter. Then the
   Python block marked `<!-- test_readme: python -->` runs in the same folder.
   Not run here, being too slow for this file or needing the real pipeline: `build` (tests/test_build_engines.py
   builds bf16 and FP8 engines of the tiny model at small resolutions and rebuilds from a stored recipe with the
   CLI; tests/test_segments.py builds a segmented bundle), `generate` and `EngineTransformer` (tests/test_generate.py,
   on a pipeline of tiny components of the real classes).
3. The import floors of docs/architecture.md hold for every import in nucleus_export/, lazy ones included, and the
   runtime imports nothing of the toolkit.
"""

from __future__ import annotations

import argparse
import ast
import os
import re
import shlex
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from nucleus_export.cli import COMMAND_MODULES, build_parser, main

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md")), ROOT / "runtime" / "README.md",
        ROOT / "plugins" / "README.md"]
FENCE = re.compile(r"^```[^\n]*\n(.*?)^```", re.S | re.M)
INLINE = re.compile(r"`(nucleus-export [^`]+)`")
SYNOPSIS = re.compile(r"\[|\||\.\.\.")


def _fenced_block_after(text: str, marker: str) -> str:
    at = text.index(f"<!-- test_readme: {marker} -->")
    return FENCE.search(text, at).group(1)


def _logical_lines(block: str) -> list[str]:
    """Shell lines joined across `\\` continuations, open quotes and the indented option lines of a synopsis."""
    out: list[str] = []
    pending = ""
    for line in block.splitlines():
        if pending.endswith("\\"):
            pending = pending.removesuffix("\\").rstrip() + " " + line.strip()
            continue
        if pending and _open_quote(pending):
            pending += "\n" + line
            continue
        if pending and line[:1].isspace() and line.strip():
            pending += " " + line.strip()
            continue
        if pending:
            out.append(pending)
        pending = line.rstrip() if line.strip() else ""
    if pending:
        out.append(pending)
    return out


def _open_quote(line: str) -> bool:
    try:
        shlex.split(line, comments=True)
    except ValueError:
        return True
    return False


def _documented_commands() -> list[tuple[str, str, bool]]:
    """(where, command, in a code block) for every `nucleus-export ...` shown; error-message formats such as
    `nucleus-export CMD: error: ...` are output, not commands."""
    found = []
    for path in DOCS:
        text = path.read_text()
        where = str(path.relative_to(ROOT))
        for block in FENCE.findall(text):
            for line in _logical_lines(block):
                for part in re.split(r"\s&&\s|;\s", line):
                    if part.strip().startswith("nucleus-export "):
                        found.append((where, part.strip(), True))
        prose = FENCE.sub("", text)
        found += [(where, c, False) for c in INLINE.findall(prose)]
    return [(w, c, f) for w, c, f in found if not c.split()[1].endswith(":")]


def _subparsers() -> dict[str, argparse.ArgumentParser]:
    parser = build_parser()
    action = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return dict(action.choices)


COMMANDS = _documented_commands()


def test_the_scan_finds_the_documented_commands():
    assert len(COMMANDS) >= 30
    shown = {c.split()[1] for _, c, _ in COMMANDS}
    assert shown >= set(COMMAND_MODULES)


def test_the_readme_shows_a_complete_example_of_every_command():
    readme = [c for w, c, fenced in COMMANDS if w == "README.md" and fenced and not SYNOPSIS.search(c)]
    assert {c.split()[1] for c in readme} >= set(COMMAND_MODULES)


@pytest.mark.parametrize("where,command,fenced", COMMANDS, ids=[f"{w}:{c[:90]}" for w, c, _ in COMMANDS])
def test_documented_command_parses(where, command, fenced):
    subparsers = _subparsers()
    words = shlex.split(command, comments=True)
    assert words[1] in subparsers, f"{where}: `{command}` names no subcommand ({', '.join(subparsers)})"
    options = subparsers[words[1]]._option_string_actions
    tokens = shlex.split(re.sub(r"[\[\]]", " ", command), comments=True)[2:]
    for i, token in enumerate(tokens):
        for alternative in token.split("|"):
            flag = alternative.split("=", 1)[0]
            if not flag.startswith("-"):
                continue
            assert flag in options, f"{where}: `{command}`: {words[1]} has no option {flag}"
            action = options[flag]
            value = alternative.split("=", 1)[1] if "=" in alternative else (tokens[i + 1] if i + 1 < len(tokens) else None)
            if action.choices is None or value is None or value.startswith("-"):
                continue
            for literal in value.split("|"):
                # A literal value (not a placeholder such as SMxx or GB) must be one the parser takes.
                if literal and not literal.isupper() and not literal.startswith("-"):
                    assert literal in [str(c) for c in action.choices], f"{where}: `{command}`: {literal!r} is not a choice of {flag}"
    if fenced and not SYNOPSIS.search(command):
        try:
            build_parser().parse_args(words[1:])
        except SystemExit:
            pytest.fail(f"{where}: `{command}` does not parse (see the usage error above)")


# ---- the README's quick commands, run as written ---------------------------------------------------------------


def test_the_console_script_is_cli_main():
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    assert scripts["nucleus-export"] == "nucleus_export.cli:main"


@pytest.fixture(scope="module")
def readme_folder(tmp_path_factory):
    """An empty folder in which the README's run block ran, command by command."""
    folder = tmp_path_factory.mktemp("readme")
    block = _fenced_block_after((ROOT / "README.md").read_text(), "run")
    cwd = Path.cwd()
    os.chdir(folder)
    try:
        for line in _logical_lines(block):
            words = shlex.split(line, comments=True)
            if not words:
                continue
            if words[0] == "nucleus-export":
                assert main(words[1:]) == 0, f"README: `{line}` failed"
            elif words[0] == "python":
                result = subprocess.run([sys.executable, *words[1:]], capture_output=True, text=True, timeout=120)
                assert result.returncode == 0, f"README: `{line}` failed:\n{result.stderr}"
            else:
                pytest.fail(f"README run block: `{words[0]}` is neither nucleus-export nor python")
    finally:
        os.chdir(cwd)
    return folder


def test_readme_quick_commands_run(readme_folder):
    from nucleus_runtime.bundle import load_manifest
    from safetensors import safe_open

    manifest = load_manifest(readme_folder / "bundle-tiny")
    assert (256, 256) in [tuple(r) for r in manifest.profiles.resolutions]
    assert (readme_folder / "bundle-tiny" / "parity.json").is_file()
    with safe_open(str(readme_folder / "latents.safetensors"), "np") as f:
        assert f.get_tensor("latents").shape == (1, 256, 64)
        assert f.metadata()["bundle_identity"] == manifest.identity
    assert not (readme_folder / "triton_repo").exists()  # --dry-run writes nothing


def test_readme_runtime_python_example_runs(readme_folder):
    code = _fenced_block_after((ROOT / "README.md").read_text(), "python")
    namespace: dict = {}
    cwd = Path.cwd()
    os.chdir(readme_folder)
    try:
        exec(compile(code, "<README runtime example>", "exec"), namespace)
    finally:
        os.chdir(cwd)
    assert namespace["latents"].shape == (1, 256, 64)
    assert namespace["cache"].stats.misses == 1


# ---- docs/architecture.md: import floors -------------------------------------------------------------------------


def _floors() -> dict[str, int]:
    block = _fenced_block_after((ROOT / "docs" / "architecture.md").read_text(), "floors")
    floors = {}
    for line in block.strip().splitlines():
        number, rooms = line.split(":", 1)
        for room in rooms.split():
            assert room not in floors, f"docs/architecture.md puts {room} on two floors"
            floors[room] = int(number)
    return floors


def _room(path: Path) -> str:
    parts = path.relative_to(ROOT / "nucleus_export").with_suffix("").parts
    return "__init__" if parts == ("__init__",) else parts[0]


def _imported_rooms(tree: ast.AST, rooms: set[str]) -> set[str]:
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            modules = [(a.name, None) for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module:
            modules = [(node.module, [a.name for a in node.names])]
        else:
            continue
        for module, names in modules:
            top, _, rest = module.partition(".")
            if top == "nucleus_runtime":
                found.add("nucleus_runtime")
            elif top == "nucleus_export" and rest:
                found.add(rest.split(".")[0])
            elif top == "nucleus_export":  # from nucleus_export import X: a room, or the package root
                found.update(n if n in rooms else "__init__" for n in names or ["__init__"])
    return found


def test_import_floors_hold():
    floors = _floors()
    sources = sorted((ROOT / "nucleus_export").rglob("*.py"))
    rooms = {_room(p) for p in sources}
    assert rooms | {"nucleus_runtime"} == set(floors), "docs/architecture.md's floors name exactly the rooms"
    upward = []
    for path in sources:
        room = _room(path)
        for target in _imported_rooms(ast.parse(path.read_text()), rooms) - {room}:
            if floors[target] >= floors[room]:
                upward.append(f"{path.relative_to(ROOT)} ({room}, floor {floors[room]}) imports {target} (floor {floors[target]})")
    assert not upward, "\n".join(upward)


def test_the_runtime_imports_nothing_of_the_toolkit():
    for path in sorted((ROOT / "runtime" / "nucleus_runtime").rglob("*.py")):
        tree = ast.parse(path.read_text())
        modules = [a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names]
        modules += [n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module]
        assert not [m for m in modules if m.split(".")[0] == "nucleus_export"], path
