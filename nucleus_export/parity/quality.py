"""Quality report of a built bundle: the graph TensorRT builds, run in ONNX Runtime on the CPU against diffusers'
float32 forward, next to diffusers itself run in bf16 on the same cases; written to parity.json.

The graph under test is the one the engine was built from: MoE lowered to native layers (`--moe native`,
nucleus_export.engines.lowering) or, for plugin builds, the custom nodes with the combine inlined (the plugins
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
import onnx.inliner
from nucleus_runtime.bundle import load_manifest
from nucleus_runtime.contract import (
    COMBINE_OP,
    DOMAIN,
    MOE_NATIVE,
    graph_of_unit,
    onnx_file,
)
from nucleus_runtime.contract import DENOISER_GRAPH as DENOISER
from nucleus_runtime.contract import TEXT_KV_GRAPH as TEXT_KV

from nucleus_export.graph.external_data import load_external_data, load_model
from nucleus_export.model.checkpoint import Checkpoint
from nucleus_export.parity.check import (
    GraphVariants,
    ParityReport,
    Tolerance,
    variants_of,
)
from nucleus_export.parity.emulation import EMULATION_LABEL, emulate_bf16_in_fp32

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


def tolerance_for(precision: str, fp8: bool) -> Tolerance:
    """fp32 graphs: the exact gate (Tolerance's defaults). Lower precision: no worse than diffusers in bf16."""
    if precision == "fp32" and not fp8:
        return Tolerance()
    return Tolerance(
        max_relative_error=None, max_forced_relative_error=None, near_ties_only=False, baseline_margin=BASELINE_MARGIN
    )


def _has_bf16(model: onnx.ModelProto) -> bool:
    if any(i.data_type == onnx.TensorProto.BFLOAT16 for i in model.graph.initializer):
        return True
    return any(a.name == "to" and a.i == onnx.TensorProto.BFLOAT16 for n in model.graph.node for a in n.attribute)


def as_built(
    model: onnx.ModelProto, moe_lowering: str | None, combine: str = "onehot", num_experts: int | None = None
) -> onnx.ModelProto:
    """The denoiser as its engine computes it, runnable by ONNX Runtime on the CPU.

    Args:
        model: the exported graph (parity variants of it are fine: they only touch the router nodes).
        moe_lowering: the manifest's `moe_lowering` ("native", "plugin", or None for an ONNX-only bundle).
        combine: the native combine formulation the engine was built with ("onehot" or "chain").
    """
    from nucleus_export.engines.lowering import lower_moe_native

    if moe_lowering == MOE_NATIVE:
        built = lower_moe_native(model, combine, num_experts)
    elif _has_bf16(model):
        # Plugins compute the reference bodies; inlining the combine lets the emulation round its contributions.
        built = onnx.inliner.inline_selected_functions(model, [(DOMAIN, COMBINE_OP)])
    else:
        return model  # what the ONNX Runtime backend runs
    return emulate_bf16_in_fp32(built) if _has_bf16(built) else built


def built_combine(bundle_dir: Path) -> str:
    """The native combine formulation the bundle's denoiser engine was built with (manifest engines.denoiser.combine;
    engines built before the choice existed used the one-hot GEMM)."""
    engines = load_manifest(bundle_dir).engines or {}
    records = [r.get("combine") for name, r in engines.items() if graph_of_unit(name) == DENOISER and isinstance(r, dict)]
    return str(next((r["formulation"] for r in records if r), "onehot"))


def built_variants(bundle_dir: Path, moe_lowering: str | None, combine: str = "onehot") -> tuple[GraphVariants, str]:
    """Parity variants of the bundle's graphs as built, and a note for the report."""
    bundle_dir = Path(bundle_dir)
    text_kv_path = bundle_dir / onnx_file(TEXT_KV)
    denoiser = load_model(bundle_dir / onnx_file(DENOISER))
    emulated = _has_bf16(denoiser)
    num_experts = load_manifest(bundle_dir).model_config.get("num_experts")
    variants = variants_of(text_kv_path, denoiser, lambda m: as_built(m, moe_lowering, combine, num_experts))
    # Its weights are loaded only where it must be rewritten: ONNX Runtime runs any other text_kv from its path.
    text_kv = onnx.load(str(text_kv_path), load_external_data=False)
    if _has_bf16(text_kv):
        load_external_data(text_kv, bundle_dir)
        variants.text_kv = emulate_bf16_in_fp32(text_kv)
    lowering = f"MoE lowered ({moe_lowering}, {combine} combine)" if moe_lowering == MOE_NATIVE else "MoE as custom nodes (plugin semantics)"
    return variants, f"ONNX Runtime CPU vs diffusers float32; {lowering}; {EMULATION_LABEL if emulated else 'run as exported'}"


def quality_report(
    checkpoint: Checkpoint,
    bundle_dir: Path,
    precision_label: str,
    precision: str,
    fp8: bool,
    moe_lowering: str | None = None,
    reference: torch.nn.Module | None = None,
    tolerance: Tolerance | None = None,
    case_set: str = "full",
    combine: str | None = None,
) -> ParityReport:
    """Check the bundle's graphs as built against diffusers' float32 forward, with diffusers-bf16 as the baseline for
    low-precision graphs. `combine`: the native combine formulation (None: as the manifest records it).

    Returns:
        nucleus_export.parity.check.ParityReport labelled with the graph precision, lowering and emulation.
    """
    from nucleus_export.parity.check import check_parity

    variants, note = built_variants(bundle_dir, moe_lowering, combine or built_combine(bundle_dir))
    low_precision = precision != "fp32" or fp8
    return check_parity(
        checkpoint,
        bundle_dir,
        tolerance or tolerance_for(precision, fp8),
        variants=variants,
        graph_precision=precision_label,
        reference=reference,
        case_set=case_set,
        note=note,
        baseline=low_precision,
    )
