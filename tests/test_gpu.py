"""Checks that need a CUDA GPU (marker `gpu`): skipped where none is visible, run by default where one is."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.gpu


@pytest.mark.skipif(shutil.which("nvcc") is None and not Path("/usr/local/cuda/bin/nvcc").exists(), reason="needs nvcc")
def test_plugin_kernels_match_pytorch_on_the_gpu(tmp_path):
    """plugins/gpu_check.sh compiles the kernels and checks them against PyTorch at the real layer sizes (S=4096)."""
    env = {**os.environ, "PYTHON": sys.executable}
    result = subprocess.run(
        ["bash", str(ROOT / "plugins" / "gpu_check.sh"), "--tokens", "4096", "--iters", "3", "--skip-layer"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=900,
    )
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    assert "FAIL" not in result.stdout
