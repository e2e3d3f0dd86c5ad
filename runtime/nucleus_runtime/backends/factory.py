"""Open a bundle with a backend by name, and name the bundle files each backend reads.

One place for "which backend runs this bundle, from which files": `nucleus-export run`, the benchmarks and the
Triton in-process model all open backends here, and `nucleus-export triton --layout inprocess` places exactly
`backend_files` into the model's version folder. The files are chosen from the manifest's records (every recorded
ONNX graph and external-data file, or every recorded engine and the plugin library), not from fixed names, so a
bundle with more graph files than the two of the basic contract (e.g. a denoiser split into several engines)
travels unchanged.
"""

from __future__ import annotations

from pathlib import Path

from nucleus_runtime.backends.base import Backend
from nucleus_runtime.bundle import Manifest, load_manifest
from nucleus_runtime.contract import (
    ENGINE_ONNX_SUFFIX,
    GRAPHS,
    MANIFEST_NAME,
    MOE_PLUGIN,
    ONNXRUNTIME,
    PLAN_SUFFIX,
    SCHEDULER_CONFIG_NAME,
    TENSORRT,
    is_weight_data,
    onnx_file,
    plan_file,
)
from nucleus_runtime.errors import NucleusError

# Runtime backend names (`Backend.name` of the ONNX Runtime backend; the TensorRT backend answers to either engine
# library, see backends/tensorrt.py).
BACKENDS = (ONNXRUNTIME, TENSORRT)


def backend_files(manifest: Manifest, backend: str) -> list[str]:
    """Bundle-relative paths a backend reads besides the manifest and scheduler config, in manifest order.

    Raises:
        NucleusError: unknown backend name.
    """
    recorded = list(manifest.files)
    library: list[str] = []
    units = manifest.engine_units()
    if backend == ONNXRUNTIME:
        # The exported graphs, their segments and weights (data files, linked checkpoint shards); not the engines'
        # lowered graphs (*.engine.onnx).
        graphs = [f for f in recorded if f.endswith(".onnx") and not f.endswith(ENGINE_ONNX_SUFFIX)]
        files = graphs + [f for f in recorded if is_weight_data(f)]
        defaults = [onnx_file(g) for g in GRAPHS] + [onnx_file(u) for u in units if u not in GRAPHS]
    elif backend == TENSORRT:
        files = [f for f in recorded if f.endswith(PLAN_SUFFIX)]
        defaults = [plan_file(u) for u in units]
        if manifest.moe_lowering == MOE_PLUGIN and manifest.plugins and manifest.plugins.get("library"):
            library = [str(manifest.plugins["library"])]
    else:
        raise NucleusError(f"unknown backend '{backend}'.", f"use one of: {', '.join(BACKENDS)}.")
    # The contract's graph files always (a manifest that lost their records must not silently serve without them),
    # then whatever else is recorded (external data, further graph files).
    names = defaults + [f for f in files if f not in defaults]
    return names + [f for f in library if f not in names]


def serving_files(manifest: Manifest, backend: str) -> list[str]:
    """Everything a folder needs so that `open_backend(folder, backend)` and the denoising loop can serve it."""
    return [MANIFEST_NAME, SCHEDULER_CONFIG_NAME, *backend_files(manifest, backend)]


def open_backend(
    bundle_dir: Path,
    backend: str,
    manifest: Manifest | None = None,
    *,
    device: str = "auto",
    threads: int | None = None,
    verify_checksums: bool = True,
    weight_streaming_budget: int | None = None,
) -> Backend:
    """The bundle's graphs in a backend.

    Args:
        bundle_dir: a bundle folder (or any folder holding `serving_files`).
        backend: "onnxruntime" or "tensorrt".
        manifest: the bundle's manifest, when the caller has it loaded already.
        device: ONNX Runtime's device ("auto", "cpu", "cuda"); the TensorRT backend runs on the current CUDA device.
        threads: ONNX Runtime intra-op threads (None: one per physical core).
        verify_checksums: check the files against the manifest before loading them.
        weight_streaming_budget: TensorRT only: bytes of denoiser weights kept on the GPU (engines built with
            `build --weight-streaming`); None keeps them all.
    """
    manifest = manifest or load_manifest(bundle_dir)
    if backend == TENSORRT:
        from nucleus_runtime.backends.tensorrt import TensorRTBackend

        return TensorRTBackend(
            bundle_dir, manifest=manifest, verify_checksums=verify_checksums, weight_streaming_budget=weight_streaming_budget
        )
    if backend == ONNXRUNTIME:
        from nucleus_runtime.backends.onnxruntime import OrtBackend, OrtOptions

        options = OrtOptions(threads=threads, device=device, verify_checksums=verify_checksums)
        return OrtBackend(bundle_dir, options, manifest=manifest)
    raise NucleusError(f"unknown backend '{backend}'.", f"use one of: {', '.join(BACKENDS)}.")


def select_cuda_device(device_id: int) -> None:
    """Make `device_id` the current CUDA device of this process, before a TensorRT backend is opened on it."""
    from nucleus_runtime.backends import tensorrt

    cudart = tensorrt._import_cudart()
    tensorrt._check(cudart.cudaSetDevice(device_id), f"cudaSetDevice({device_id})")
