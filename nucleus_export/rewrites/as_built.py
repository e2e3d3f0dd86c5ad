"""What graph a backend gets: the one answer to "which graph does this engine compute?".

`build` writes `engine_graph(...)` beside each exported graph and builds the engine from it; `inspect --bundle`
counts its FLOPs; the quality report runs `engine_graph(..., runnable_on_cpu=True)`, the same computation in the form
ONNX Runtime's CPU provider runs (bf16 emulated, attention masks expanded), against diffusers.
"""

from __future__ import annotations

import onnx
import onnx.inliner
from nucleus_runtime.bundle import LoweringRecord
from nucleus_runtime.contract import COMBINE_OP, DOMAIN, MOE_NATIVE, MOE_PLUGIN

from nucleus_export.rewrites.attention_masks import broadcast_attention_masks
from nucleus_export.rewrites.bf16_emulation import emulate_bf16_in_fp32, has_bf16
from nucleus_export.rewrites.moe_lowering import lower_moe_native, prepare_for_plugins


def engine_graph(
    model: onnx.ModelProto, lowering: LoweringRecord | None, num_experts: int, runnable_on_cpu: bool = False,
    keep_weights: bool = False,
) -> onnx.ModelProto:
    """The graph an engine with this MoE lowering is built from.

    Args:
        model: a graph as exported (its MoE ops as `nucleus` nodes with function bodies; parity variants of it are
            fine: they only touch the router nodes); not modified.
        lowering: native layers (with the combine formulation) or plugins; None for a graph without MoE ops (the
            text encoder, the VAE decoder).
        num_experts: the model's expert count.
        runnable_on_cpu: the same computation for ONNX Runtime's CPU provider instead of TensorRT: plugin builds
            keep the reference bodies the plugins implement (the combine inlined, so bf16 emulation rounds its
            contributions), every bf16 tensor is emulated in float32, attention masks stay expanded.
        keep_weights: with runnable_on_cpu, bf16 weights are widened by Cast nodes instead of in the graph, so a
            graph whose weights are external data is rewritten without reading them (rewrites.bf16_emulation).
    """
    if lowering is None:
        moe = model
    elif lowering.moe == MOE_NATIVE:
        moe = lower_moe_native(model, lowering.combine, num_experts)
    elif lowering.moe != MOE_PLUGIN:
        raise ValueError(f"unknown MoE lowering {lowering.moe!r}")
    elif not runnable_on_cpu:
        moe = prepare_for_plugins(model)
    elif has_bf16(model):
        moe = onnx.inliner.inline_selected_functions(model, [(DOMAIN, COMBINE_OP)])
    else:
        moe = model
    if runnable_on_cpu:
        return emulate_bf16_in_fp32(moe, keep_weights) if has_bf16(moe) else moe
    return broadcast_attention_masks(moe)
