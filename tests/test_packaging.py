"""Packaging: every package folder ships (each pyproject's explicit package list matches the folders on disk), and the
runtime installs alone, without torch, diffusers or transformers, into a fresh venv where it runs a bundle."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import tomllib

ROOT = Path(__file__).resolve().parents[1]
DISTRIBUTIONS = {ROOT: ("nucleus_export",), ROOT / "runtime": ("nucleus_runtime",)}


@pytest.mark.parametrize("root", sorted(DISTRIBUTIONS), ids=lambda p: p.name)
def test_pyproject_lists_every_package(root):
    setuptools = tomllib.loads((root / "pyproject.toml").read_text())["tool"]["setuptools"]
    on_disk = {
        ".".join(init.parent.relative_to(root).parts)
        for top in DISTRIBUTIONS[root]
        for init in (root / top).rglob("__init__.py")
    }
    assert set(setuptools["packages"]) == on_disk


def test_the_toolkit_depends_on_the_runtime_distribution():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    runtime = tomllib.loads((ROOT / "runtime" / "pyproject.toml").read_text())["project"]
    assert any(d.startswith(f"{runtime['name']}[onnxruntime]=={runtime['version']}") for d in project["dependencies"])
    assert not [d for d in runtime["dependencies"] if d.split(">")[0].split("=")[0] in ("torch", "diffusers", "transformers")]


RUN_A_BUNDLE = textwrap.dedent(
    """
    import importlib.util, sys
    import numpy as np
    assert all(importlib.util.find_spec(m) is None for m in ("torch", "diffusers", "transformers", "nucleus_export"))
    from nucleus_runtime import generate
    from nucleus_runtime.backends.registry import open_backend
    from nucleus_runtime.bundle import load_manifest
    from nucleus_runtime.scheduler import SchedulerConfig
    bundle = sys.argv[1]
    manifest = load_manifest(bundle)
    backend = open_backend(bundle, "auto", manifest)
    rng = np.random.default_rng(0)
    text = rng.standard_normal((1, 8, manifest.model_config["joint_attention_dim"])).astype(np.float32)
    latents = generate(backend, manifest, SchedulerConfig.from_file(f"{bundle}/scheduler_config.json"), text, None,
                       np.zeros_like(text), None, height=128, width=128, steps=2, guidance=4.0, seed=1)
    assert backend.name == "onnxruntime"
    np.save(sys.argv[2], latents)
    """
)


@pytest.fixture(scope="module")
def runtime_venv(tmp_path_factory) -> Path:
    """A fresh venv with only `pip install './runtime[onnxruntime]'` (not editable: what a deployment gets)."""
    root = tmp_path_factory.mktemp("runtime-venv")
    # A copy of the source: pip builds in the source folder, which must stay clean.
    source = Path(shutil.copytree(ROOT / "runtime", root / "runtime", ignore=shutil.ignore_patterns("build", "*.egg-info", "__pycache__")))
    venv = root / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    python = venv / "bin" / "python"
    subprocess.run([str(python), "-m", "pip", "install", "--quiet", f"{source}[onnxruntime]"], check=True)
    return python


def test_runtime_installs_alone_and_runs_a_bundle(runtime_venv, tiny_bundle, tmp_path):
    installed = json.loads(subprocess.run([str(runtime_venv), "-m", "pip", "list", "--format", "json"],
                                          capture_output=True, text=True, check=True).stdout)
    names = {p["name"].lower() for p in installed}
    assert "nucleus-runtime" in names and not names & {"torch", "diffusers", "transformers", "nucleus-export"}
    out = tmp_path / "latents.npy"
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    subprocess.run([str(runtime_venv), "-c", RUN_A_BUNDLE, str(tiny_bundle), str(out)], check=True, env=env, cwd=tmp_path)
    # The same loop in this process (the toolkit's environment) gives the same latents, bit for bit.
    from nucleus_runtime import generate
    from nucleus_runtime.backends.registry import open_backend
    from nucleus_runtime.bundle import load_manifest
    from nucleus_runtime.scheduler import SchedulerConfig

    manifest = load_manifest(tiny_bundle)
    text = np.random.default_rng(0).standard_normal((1, 8, manifest.model_config["joint_attention_dim"])).astype(np.float32)
    expected = generate(open_backend(tiny_bundle, "onnxruntime", manifest), manifest,
                        SchedulerConfig.from_file(tiny_bundle / "scheduler_config.json"), text, None, np.zeros_like(text),
                        None, height=128, width=128, steps=2, guidance=4.0, seed=1)
    np.testing.assert_array_equal(np.load(out), expected)


TEXT_TO_IMAGE = textwrap.dedent(
    """
    import importlib.util, sys
    assert all(importlib.util.find_spec(m) is None for m in ("torch", "diffusers", "transformers", "nucleus_export"))
    from nucleus_runtime.png import write_png
    from nucleus_runtime.text_to_image import TextToImage
    with TextToImage(sys.argv[1], threads=2) as pipe:
        write_png(sys.argv[2], pipe("a red fox", height=64, width=64, steps=2, seed=4))
    """
)


def test_runtime_alone_turns_text_into_the_same_png(runtime_venv, tmp_path):
    """The deployment venv takes a sentence and gives the PNG the toolkit's environment gives (tokenizer included)."""
    from toy_pipeline import allow_processor_without_torchvision, ensure_toy_pipeline

    from nucleus_export.cli import main

    bundle = tmp_path / "bundle"
    with allow_processor_without_torchvision():
        assert main(["export", "--model", str(ensure_toy_pipeline()), "--out", str(bundle), "--precision", "fp32",
                     "--resolutions", "64x64", "--max-text-len", "512"]) == 0
    out = tmp_path / "fox.png"
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    subprocess.run([str(runtime_venv), "-c", TEXT_TO_IMAGE, str(bundle), str(out)], check=True, env=env, cwd=tmp_path)
    from nucleus_runtime.png import encode_png
    from nucleus_runtime.text_to_image import TextToImage

    with TextToImage(bundle, threads=2) as pipe:
        assert out.read_bytes() == encode_png(pipe("a red fox", height=64, width=64, steps=2, seed=4))
