"""The backends a bundle can be opened with, and the one place that chooses among them.

`nucleus-export run` and `generate`, `EngineTransformer`, the Triton pipeline model, the benchmarks and
`--backend auto` all open backends here; `nucleus-export triton --layout inprocess` places exactly `serving_files`
into the model's version folder. A new backend is a `Backend` subclass with its `files`, `available`, `serves` and
`open`, listed in `BACKENDS` (docs/architecture.md).
"""

from __future__ import annotations

from pathlib import Path

from nucleus_runtime.backends.base import Backend, BackendOptions
from nucleus_runtime.backends.onnxruntime import OrtBackend
from nucleus_runtime.backends.tensorrt import TensorRTBackend, TensorRTRtxBackend
from nucleus_runtime.bundle import Manifest, load_manifest
from nucleus_runtime.contract import (
    AUTO,
    MANIFEST_NAME,
    ONNXRUNTIME,
    PROMPT_TEMPLATE_FILE,
    SCHEDULER_CONFIG_NAME,
    TEXT_ENCODER_GRAPH,
    TOKENIZER_FILE,
)
from nucleus_runtime.errors import NucleusError

BACKENDS: dict[str, type[Backend]] = {cls.name: cls for cls in (OrtBackend, TensorRTBackend, TensorRTRtxBackend)}
CHOICES = (AUTO, *BACKENDS)


def backend_class(name: str) -> type[Backend]:
    if name not in BACKENDS:
        raise NucleusError(f"unknown backend '{name}'.", f"use one of: {', '.join(CHOICES)}.")
    return BACKENDS[name]


def backend_files(manifest: Manifest, name: str) -> list[str]:
    """Bundle-relative paths a backend reads besides the manifest and scheduler config, in manifest order."""
    return backend_class(name).files(manifest)


def serving_files(manifest: Manifest, name: str) -> list[str]:
    """Everything a folder needs so that `open_backend(folder, name)`, the denoising loop and, where the bundle has a
    text encoder, the prompt tokenizer (`text_to_image.load_prompt_tokenizer`) can serve it."""
    tokenizer = [TOKENIZER_FILE, PROMPT_TEMPLATE_FILE] if TEXT_ENCODER_GRAPH in manifest.stages else []
    return [MANIFEST_NAME, SCHEDULER_CONFIG_NAME, *backend_files(manifest, name), *tokenizer]


def resolve_backend(choice: str, bundle_dir: Path, manifest: Manifest) -> str:
    """"auto": the TensorRT flavor the bundle's engines were built with when it can run here (library installed, GPU
    visible, every engine present), else ONNX Runtime; any other choice is checked and returned."""
    if choice != AUTO:
        return backend_class(choice).name
    for name, cls in BACKENDS.items():
        if name != ONNXRUNTIME and cls.serves(bundle_dir, manifest) and cls.available():
            return name
    return ONNXRUNTIME


def open_backend(
    bundle_dir: Path, choice: str = AUTO, manifest: Manifest | None = None, options: BackendOptions = BackendOptions()
) -> Backend:
    """The bundle's graphs in a backend ("auto" resolved by `resolve_backend`)."""
    manifest = manifest or load_manifest(bundle_dir)
    return backend_class(resolve_backend(choice, Path(bundle_dir), manifest)).open(Path(bundle_dir), manifest, options)
