"""The CLI surface: help on every subcommand, inspect, exit codes and one-line errors."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from nucleus_export.cli import COMMAND_MODULES, build_parser, main


def _run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "nucleus_export.cli", *args], capture_output=True, text=True)


def test_every_subcommand_is_registered_and_has_help(capsys):
    parser = build_parser()
    registered = set(parser._subparsers._group_actions[0].choices)
    assert registered == set(COMMAND_MODULES)
    for name in COMMAND_MODULES:
        with pytest.raises(SystemExit) as info:
            main([name, "--help"])
        assert info.value.code == 0
        assert "usage: nucleus-export" in capsys.readouterr().out


def test_inspect_tiny_and_folder(tiny_checkpoint_dir):
    result = _run("inspect", "--model", "tiny", "--resolutions", "1024x1024,768x1360")
    assert result.returncode == 0, result.stderr
    assert "moe" in result.stdout and "touched per image token" in result.stdout
    result = _run("inspect", "--model", str(tiny_checkpoint_dir), "--json")
    assert result.returncode == 0, result.stderr
    summary = json.loads(result.stdout)
    kinds = [layer["kind"] for layer in summary["layers"]]
    assert kinds == ["dense", "dense", "dense", "moe", "moe"]
    assert summary["layers"][3]["capacity"]["1024x1024"] == 2048  # ceil(4 * 4096 / 8)
    assert summary["total_parameters"] > summary["parameters_per_token"]["1024x1024"] > 0


def test_inspect_names_routed_experts_only_with_moe_blocks_and_flags_overfull_capacity(tmp_path):
    from nucleus_export.model.tiny import write_checkpoint

    dense = write_checkpoint(tmp_path / "dense", {"dense_moe_strategy": "all_dense", "capacity_factors": 0.0})
    result = _run("inspect", "--model", str(dense), "--resolutions", "128x128")
    assert result.returncode == 0, result.stderr
    assert "routed experts" not in result.stdout and "no MoE blocks" in result.stdout
    assert json.loads(_run("inspect", "--model", str(dense), "--json").stdout)["routed_expert_parameters_per_layer"] is None
    # Two experts at capacity factor 4: each would take 2 S tokens of a row of S, which do not exist.
    overfull = write_checkpoint(tmp_path / "overfull", {"num_experts": 2, "capacity_factors": [0.0, 0.0, 0.0, 4.0, 1.0]})
    result = _run("inspect", "--model", str(overfull), "--resolutions", "128x128")
    assert result.returncode == 0, result.stderr
    assert "block 3 at 128x128: capacity 128 exceeds the 64 image tokens" in " ".join(result.stdout.split())
    summary = json.loads(_run("inspect", "--model", str(overfull), "--resolutions", "128x128", "--json").stdout)
    assert summary["layers"][3]["over_capacity"] == ["128x128"] and summary["layers"][4]["over_capacity"] == []


def test_usage_error_exit_code_2():
    result = _run("inspect")
    assert result.returncode == 2
    result = _run("inspect", "--model", "tiny", "--resolutions", "1000x1000")
    assert result.returncode == 2
    assert "multiple of 16" in result.stderr and len(result.stderr.strip().splitlines()) == 1


def test_failure_exit_code_1_one_line_and_verbose_traceback(tmp_path):
    result = _run("inspect", "--model", str(tmp_path))
    assert result.returncode == 1
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "error:" in lines[0] and "Fix:" in lines[0]
    verbose = _run("inspect", "--model", str(tmp_path), "--verbose")
    assert verbose.returncode == 1 and "Traceback" in verbose.stderr


def test_export_default_out_folder_and_refusal(tmp_path):
    args = ["export", "--model", "tiny", "--resolutions", "128x128", "--max-text-len", "8"]
    result = subprocess.run([sys.executable, "-m", "nucleus_export.cli", *args], capture_output=True, text=True, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "bundle-tiny-fp32" / "manifest.json").is_file()
    again = subprocess.run([sys.executable, "-m", "nucleus_export.cli", *args], capture_output=True, text=True, cwd=tmp_path)
    assert again.returncode == 2 and "already exists" in again.stderr
