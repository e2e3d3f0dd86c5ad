"""Resolve "auto" to a runtime backend for a bundle (TensorRT engines on a GPU, else ONNX Runtime) and open it
through the runtime's backend factory.

Shared by `EngineTransformer` and `nucleus-export generate`, which both let the user say "auto".
"""

from __future__ import annotations

import importlib.util
import logging
from pathlib import Path

from nucleus_runtime.backends import factory
from nucleus_runtime.backends.base import Backend
from nucleus_runtime.bundle import Manifest
from nucleus_runtime.contract import (
    ONNXRUNTIME,
    TENSORRT,
    TENSORRT_MODULES,
    plan_file,
)
from nucleus_runtime.errors import NucleusError

logger = logging.getLogger("nucleus_export")

AUTO = "auto"
BACKEND_CHOICES = (AUTO, ONNXRUNTIME, TENSORRT)


def _has_engines(bundle: Path, manifest: Manifest) -> bool:
    """Every engine unit (text_kv, the denoiser or each of its segments) has its plan."""
    return all((bundle / plan_file(unit)).is_file() for unit in manifest.engine_units())


def _gpu_visible() -> bool:
    import torch

    return torch.cuda.is_available()


def _tensorrt_installed() -> bool:
    return any(importlib.util.find_spec(module) is not None for module in TENSORRT_MODULES.values())


def resolve_backend_choice(bundle: Path, manifest: Manifest, choice: str) -> str:
    """"auto" -> "tensorrt" when the bundle has engines, TensorRT is installed and a GPU is visible, else ONNX Runtime."""
    if choice not in BACKEND_CHOICES:
        raise NucleusError(f"unknown backend {choice!r}.", f"pass one of {', '.join(BACKEND_CHOICES)}.")
    if choice != AUTO:
        return choice
    if _has_engines(bundle, manifest) and _tensorrt_installed() and _gpu_visible():
        return TENSORRT
    return ONNXRUNTIME


def open_backend(
    bundle: Path,
    manifest: Manifest,
    choice: str = AUTO,
    *,
    threads: int | None = None,
    device: str = AUTO,
    verify_checksums: bool = True,
) -> Backend:
    """Open the bundle's graphs with the chosen backend.

    Args:
        bundle: the bundle folder.
        manifest: its manifest.
        choice: "auto", "onnxruntime" or "tensorrt".
        threads: ONNX Runtime intra-op threads (None: its default).
        device: ONNX Runtime device, "auto", "cpu" or "cuda".
        verify_checksums: check the files against the manifest before loading them.
    """
    resolved = resolve_backend_choice(Path(bundle), manifest, choice)
    logger.debug("backend %s (asked: %s)", resolved, choice)
    return factory.open_backend(
        Path(bundle), resolved, manifest, device=device, threads=threads, verify_checksums=verify_checksums
    )
