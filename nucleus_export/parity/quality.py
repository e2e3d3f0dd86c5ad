"""Quality report of a built bundle: the graph TensorRT builds, run in ONNX Runtime on the CPU against diffusers'
float32 forward, next to diffusers itself run in bf16 on the same cases; written to parity.json.

The graph under test is the one the engine was built from: MoE lowered to native layers (`--moe native`,
nucleus_export.rewrites.as_built) or, for plugin builds, the custom nodes with the combine inlined (the plugins
implement the reference bodies). ONNX Runtime's CPU provider runs FP8 QuantizeLinear/DequantizeLinear but has no
bfloat16 MatMul, so bf16 graphs run through `emulate_bf16_in_fp32` after lowering: every bf16 tensor of the lowered
graph, the combine's per-contribution rounding included, is rounded where it is produced, whatever formulation the
lowering chose.

Default gate for bf16, fp16 and FP8 graphs: against float32 truth, pooled over all cases, relative error, 1 - cosine
and 1 - routing agreement at most (1 + BASELINE_MARGIN) x those of diffusers in bf16 (parity.check.Tolerance).
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import onnx
from nucleus_runtime.bundle import LoweringRecord, Manifest, load_manifest
from nucleus_runtime.contract import DENOISER_GRAPH as DENOISER
from nucleus_runtime.contract import MOE_PLUGIN
from nucleus_runtime.contract import TEXT_KV_GRAPH as TEXT_KV
from nucleus_runtime.contract import onnx_file

from nucleus_export.graph.external_data import load_external_data, load_model
from nucleus_export.graph.precision import GraphPrecision
from nucleus_export.model.checkpoint import Checkpoint
from nucleus_export.parity.check import GraphVariants, ParityReport, Tolerance, variants_of
from nucleus_export.rewrites.as_built import engine_graph
from nucleus_export.rewrites.bf16_emulation import EMULATION_LABEL, emulate_bf16_in_fp32, has_bf16

if TYPE_CHECKING:
    import torch

# The case set is a sample and routing flips are discrete, so one graph's pooled error moves with the inputs: on the
# tiny model's quick case set over 4 case seeds, the bf16 graph's relative error spans 1.11e-2..1.61e-2 (largest
# 1.14x the mean), FP8's and diffusers-bf16's 1.01x. A graph may exceed diffusers-bf16 by that spread before it
# counts as worse.
BASELINE_MARGIN = 0.15


def check_quality_memory(checkpoint: Checkpoint) -> None:
    """Fail before any work when the CPU report cannot fit: the reference holds the weights in float32 and its bf16
    copy in bf16, and ONNX Runtime holds the (float32-widened) graph variants while building their sessions."""

    import psutil

    from nucleus_export.errors import NucleusExportError

    needed = checkpoint.weights.num_parameters * (4 + 2 + 4 * 3)
    available = psutil.virtual_memory().available
    if needed > available:
        raise NucleusExportError(
            f"the CPU quality report needs about {needed / 1e9:.0f} GB of memory for this model; {available / 1e9:.0f} GB is free.",
            "build with --skip-quality, then run `nucleus-export check` on the ONNX bundle on a machine with more memory.",
        )


def tolerance_for(precision: GraphPrecision) -> Tolerance:
    """fp32 graphs: the exact gate (Tolerance's defaults). Lower precision: no worse than diffusers in bf16."""
    if precision.exact:
        return Tolerance()
    return Tolerance(
        max_relative_error=None, max_forced_relative_error=None, near_ties_only=False, baseline_margin=BASELINE_MARGIN
    )


def built_lowering(manifest: Manifest) -> LoweringRecord | None:
    """How the bundle's denoiser engines compute the MoE ops (None for an ONNX-only bundle)."""
    records = [manifest.engine(u) for u in manifest.units(DENOISER)]
    return records[0].lowering if records and records[0] is not None else None


def built_variants(bundle_dir: Path, lowering: LoweringRecord | None) -> tuple[GraphVariants, str]:
    """Parity variants of the bundle's graphs as the engines compute them (as exported without engines), and a note
    for the report."""
    bundle_dir = Path(bundle_dir)
    manifest = load_manifest(bundle_dir)
    text_kv_path = bundle_dir / onnx_file(TEXT_KV)
    denoiser = load_model(bundle_dir / onnx_file(DENOISER))
    emulated = has_bf16(denoiser)
    num_experts = manifest.model_config["num_experts"]

    # As exported, the custom nodes run their reference bodies, which is what plugin engines compute.
    computed = lowering or LoweringRecord(MOE_PLUGIN)
    variants = variants_of(text_kv_path, denoiser, lambda m: engine_graph(m, computed, num_experts, runnable_on_cpu=True))
    # Its weights are loaded only where it must be rewritten: ONNX Runtime runs any other text_kv from its path.
    text_kv = onnx.load(str(text_kv_path), load_external_data=False)
    if has_bf16(text_kv):
        load_external_data(text_kv, bundle_dir)
        variants.text_kv = emulate_bf16_in_fp32(text_kv)
    if lowering is None:
        how = "MoE as custom nodes (as exported)"
    elif lowering.combine is not None:
        how = f"MoE lowered ({lowering.moe}, {lowering.combine} combine)"
    else:
        how = "MoE as custom nodes (plugin semantics)"
    return variants, f"ONNX Runtime CPU vs diffusers float32; {how}; {EMULATION_LABEL if emulated else 'run as exported'}"


def quality_report(
    checkpoint: Checkpoint,
    bundle_dir: Path,
    precision: GraphPrecision,
    lowering: LoweringRecord | None,
    reference: torch.nn.Module | None = None,
    tolerance: Tolerance | None = None,
    case_set: str = "full",
) -> ParityReport:
    """Check the bundle's graphs as built against diffusers' float32 forward, with diffusers-bf16 as the baseline for
    low-precision graphs.

    Args:
        precision: how the graphs compute (its label names the report; fp32 without quantization gets the exact gate).
        lowering: how the engines compute the MoE ops (None: the graphs as exported).

    Returns:
        nucleus_export.parity.check.ParityReport labelled with the graph precision, lowering and emulation.
    """
    from nucleus_export.parity.check import check_parity

    variants, note = built_variants(bundle_dir, lowering)
    return check_parity(
        checkpoint,
        bundle_dir,
        tolerance or tolerance_for(precision),
        variants=variants,
        graph_precision=precision.label,
        reference=reference,
        case_set=case_set,
        note=note,
        baseline=not precision.exact,
    )
