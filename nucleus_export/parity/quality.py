"""Quality report of a built bundle: its bf16 / FP8 graphs in ONNX Runtime on the CPU against diffusers' float32
forward (relative error, cosine, routing agreement per MoE layer), written to parity.json.

ONNX Runtime's CPU provider runs FP8 QuantizeLinear/DequantizeLinear and model-local functions, but has no bfloat16
MatMul or bf16 QuantizeLinear: bf16 graphs run through `emulate_bf16_in_fp32` and the report says so.
"""

from __future__ import annotations

import dataclasses
import os
import tempfile
from pathlib import Path
from typing import Any

import onnx
from nucleus_runtime.contract import DENOISER_GRAPH as DENOISER
from nucleus_runtime.contract import EXTERNAL_DATA_THRESHOLD_BYTES, GRAPHS

from nucleus_export.parity.emulation import EMULATION_LABEL, emulate_bf16_in_fp32

# Pass criteria of the build's quality report. FP8: the cosine >= 0.99; routing may flip for tokens whose
# scores sit within quantization noise of the C-th best, so agreement is reported and held to a loose floor.
QUALITY_TOLERANCES: dict[str, dict[str, float]] = {
    "fp32": {"max_relative_error": 1e-4, "min_cosine": 0.9999, "min_routing_agreement": 1.0},
    "bf16": {"max_relative_error": 0.15, "min_cosine": 0.99, "min_routing_agreement": 0.9},
    "fp16": {"max_relative_error": 0.05, "min_cosine": 0.998, "min_routing_agreement": 0.95},
    "fp8": {"max_relative_error": 0.25, "min_cosine": 0.99, "min_routing_agreement": 0.8},
}


def check_quality_memory(checkpoint: Any) -> None:
    """Fail before any work when the CPU report cannot fit: the reference holds the weights in float32, and ONNX
    Runtime holds the (float32-widened) graph twice while building its session."""

    import psutil

    from nucleus_export.errors import NucleusExportError

    needed = checkpoint.weights.num_parameters * 4 * 3
    available = psutil.virtual_memory().available
    if needed > available:
        raise NucleusExportError(
            f"the CPU quality report needs about {needed / 1e9:.0f} GB of memory for this model; {available / 1e9:.0f} GB is free.",
            "build with --skip-quality, then run `nucleus-export check` on the ONNX bundle on a machine with more memory.",
        )


def tolerance_for(precision: str, fp8: bool) -> dict[str, float]:
    return dict(QUALITY_TOLERANCES["fp8" if fp8 else precision])


def _has_bf16(model: onnx.ModelProto) -> bool:
    if any(i.data_type == onnx.TensorProto.BFLOAT16 for i in model.graph.initializer):
        return True
    return any(
        a.name == "to" and a.i == onnx.TensorProto.BFLOAT16 for n in model.graph.node for a in n.attribute
    )


@dataclasses.dataclass
class CpuGraphs:
    """Paths of ONNX Runtime-runnable copies of a bundle's graphs (emulated where needed) and the report label."""

    paths: dict[str, Path]
    emulated: bool

    def cleanup(self) -> None:
        for path in self.paths.values():
            if path.name.startswith(".quality-"):
                path.unlink(missing_ok=True)


def cpu_runnable_graphs(bundle_dir: Path) -> CpuGraphs:
    """Write emulated copies of bf16 graphs next to the originals (hidden names, so relative external data still
    resolves); graphs ORT can run as they are are used in place."""
    paths: dict[str, Path] = {}
    emulated = False
    for graph in GRAPHS:
        source = Path(bundle_dir) / f"{graph}.onnx"
        if not _has_bf16(onnx.load(str(source), load_external_data=False)):
            paths[graph] = source
            continue
        emulated = True
        model = onnx.load(str(source))
        fd, tmp = tempfile.mkstemp(prefix=f".quality-{graph}-", suffix=".onnx", dir=bundle_dir)
        os.close(fd)
        cpu_model = emulate_bf16_in_fp32(model)
        # Large graphs go to a sibling data file: protobuf cannot hold more than 2 GB.
        onnx.save_model(
            cpu_model,
            tmp,
            save_as_external_data=cpu_model.ByteSize() > EXTERNAL_DATA_THRESHOLD_BYTES,
            location=Path(tmp).name + ".data",
        )
        paths[graph] = Path(tmp)
    return CpuGraphs(paths, emulated)


def quality_report(checkpoint: Any, bundle_dir: Path, precision_label: str, precision: str, fp8: bool,
                   reference: Any = None, tolerance: Any = None) -> Any:
    """Run the parity check on the bundle's (emulated) graphs against diffusers' fp32 forward; the tolerance
    defaults to QUALITY_TOLERANCES of the precision.

    Returns:
        nucleus_export.parity.check.ParityReport labelled with the graph precision and, for bf16, the emulation.
    """
    from nucleus_export.parity.check import Tolerance, check_parity

    graphs = cpu_runnable_graphs(bundle_dir)
    try:
        note = EMULATION_LABEL if graphs.emulated else "run as exported"
        return check_parity(
            checkpoint,
            bundle_dir,
            tolerance or Tolerance(**tolerance_for(precision, fp8)),
            text_kv_path=graphs.paths["text_kv"],
            denoiser_path=graphs.paths[DENOISER],
            graph_precision=precision_label,
            reference=reference,
            note=f"ONNX Runtime CPU vs diffusers float32; {note}",
        )
    finally:
        graphs.cleanup()
