"""Shared fixtures: a private model cache, the tiny checkpoint, variant checkpoints and exported bundles."""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import pytest

# Every test (and every CLI subprocess) uses a private cache, so tests never touch ~/.cache; the session removes it.
_OWN_CACHE = None if "NUCLEUS_EXPORT_CACHE" in os.environ else tempfile.mkdtemp(prefix="nucleus-export-test-cache-")
if _OWN_CACHE is not None:
    os.environ["NUCLEUS_EXPORT_CACHE"] = _OWN_CACHE
    # torch's compile cache would otherwise land in the system temp folder too.
    os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", os.path.join(_OWN_CACHE, "torchinductor"))


# Bit-for-bit tests (diffusers block by block against the whole model, streamed calibration) compare two runs of the
# same float32 math whose operands lie at different addresses; MKL's kernels may round such runs differently unless
# told to be alignment-independent (seen on AMD EPYC; Intel Xeons happened to agree). Read when MKL loads, so here,
# before any test imports torch.
os.environ.setdefault("MKL_CBWR", "AUTO,STRICT")


def pytest_sessionfinish(session, exitstatus):  # noqa: ARG001 - pytest's hook signature
    if _OWN_CACHE is not None:
        shutil.rmtree(_OWN_CACHE, ignore_errors=True)

def pytest_collection_modifyitems(config, items):  # noqa: ARG001 - pytest's hook signature
    """`gpu` tests run where a CUDA GPU is visible to PyTorch and are skipped (with the reason) elsewhere."""
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU (none is visible)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


SMALL_RESOLUTIONS = [(128, 128), (96, 160), (160, 96)]


@pytest.fixture(scope="session")
def tiny_checkpoint_dir() -> Path:
    from nucleus_export.model.tiny import ensure_tiny_checkpoint

    return ensure_tiny_checkpoint()


@pytest.fixture(scope="session")
def tiny_checkpoint(tiny_checkpoint_dir):
    from nucleus_export.model.checkpoint import open_checkpoint

    return open_checkpoint(tiny_checkpoint_dir)


@pytest.fixture(scope="session")
def tiny_reference(tiny_checkpoint):
    from nucleus_export.model.reference import load_reference

    return load_reference(tiny_checkpoint)


@pytest.fixture(scope="session")
def tiny_bundle(tiny_checkpoint, tmp_path_factory) -> Path:
    """fp32 bundle of the tiny model at three small resolutions, text up to 64 tokens."""
    from nucleus_export.export import ExportOptions, export_bundle

    out = tmp_path_factory.mktemp("bundles") / "tiny-fp32"
    export_bundle(
        tiny_checkpoint, out, ExportOptions(resolutions=SMALL_RESOLUTIONS, max_text_len=64, opt_text_len=16)
    )
    return out


@pytest.fixture()
def checkpoint_copy(tiny_checkpoint_dir, tmp_path) -> Path:
    """A private copy of the tiny checkpoint that a test may damage."""
    import shutil

    dst = tmp_path / "transformer"
    shutil.copytree(tiny_checkpoint_dir, dst)
    return dst


@pytest.fixture(scope="session")
def triton_install(tmp_path_factory):
    """A real tritonserver from the nvidia-pytriton wheel (nucleus_export.triton.local_server), or a skip where the
    wheel cannot be installed; a failure where it can but is missing."""
    import importlib.util

    from nucleus_export.errors import NucleusExportError
    from nucleus_export.triton.local_server import find_local_triton, wheel_unavailable_reason

    if importlib.util.find_spec("pytriton") is None or importlib.util.find_spec("tritonclient") is None:
        reason = wheel_unavailable_reason()
        if reason:
            pytest.skip(reason)
        pytest.fail("nvidia-pytriton (or tritonclient) is not installed but installs here: pip install -e '.[dev]'.")
    try:
        return find_local_triton(tmp_path_factory.mktemp("triton_backends"))
    except NucleusExportError as exc:
        pytest.skip(str(exc))


# Served sizes of the batching bundles: two grids, so requests of different sizes run side by side.
SERVING_RESOLUTIONS = [(128, 128), (96, 160)]
TOY_RESOLUTIONS = "64x64,64x128"


@pytest.fixture(scope="session")
def serving_bundle(tiny_checkpoint, tmp_path_factory) -> Path:
    """fp32 bundle of the tiny model whose batch profile holds 8 rows: four CFG requests in one denoiser call."""
    from nucleus_export.export import ExportOptions, export_bundle

    out = tmp_path_factory.mktemp("bundles") / "tiny-batch8"
    export_bundle(tiny_checkpoint, out, ExportOptions(resolutions=SERVING_RESOLUTIONS, max_text_len=64, opt_text_len=16,
                                                      max_batch=8))  # fmt: skip
    return out


@pytest.fixture(scope="session")
def toy_bundle(tmp_path_factory) -> Path:
    """fp32 bundle with every stage (text encoder, text K/V, denoiser, VAE decoder) of the toy pipeline
    (tests/toy_pipeline.py), batch up to 8; the toy tokenizer is character-level, hence 512 text tokens."""
    from toy_pipeline import allow_processor_without_torchvision, ensure_toy_pipeline

    from nucleus_export.cli import main

    out = tmp_path_factory.mktemp("bundles") / "toy-batch8"
    with allow_processor_without_torchvision():
        root = ensure_toy_pipeline()
        assert main(["export", "--model", str(root), "--out", str(out), "--precision", "fp32", "--resolutions",
                     TOY_RESOLUTIONS, "--max-batch", "8", "--max-text-len", "512"]) == 0  # fmt: skip
    return out
