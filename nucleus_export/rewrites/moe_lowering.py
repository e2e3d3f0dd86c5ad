"""The MoE ops as a TensorRT parser takes them (pure functions on onnx.ModelProto).

- `lower_moe_native`: replaces the `nucleus` custom nodes (ExpertChoiceRouter, MoECombine) by exact subgraphs of
  layers every TensorRT parser supports (nucleus_export.moe) and removes their function bodies.
- `prepare_for_plugins`: keeps the custom nodes for the plugin library and removes their function bodies, so a node
  can only become a plugin layer (a missing plugin fails the parse instead of silently inlining the slow reference).

Why the lowerings look the way they do (facts checked with TensorRT-RTX 1.7.1 on the CPU, engines/README-facts.md):
- ScatterElements / ScatterND with reduction="add" are rejected by the parser ("Unsupported reduction type"), so the
  reference bodies (scatter-add) cannot be used. ScatterElements *without* reduction builds; it is exact whenever the
  indices it writes are distinct, which holds within one (batch row, expert): top-C returns C distinct tokens.
- OneHot needs a build-time depth; `Equal(Unsqueeze(idx, -1), Range(0, S))` builds with a dynamic S.
- TopK accepts a K computed in the graph from the dynamic S with integer Shape/Mul/Add/Div/Max ops.
"""

from __future__ import annotations

import copy

import onnx
from nucleus_runtime.contract import COMBINE_OP, CUSTOM_OPS, DOMAIN, PLUGIN_NAMESPACE, PLUGIN_VERSION, ROUTER_OP

from nucleus_export.moe import combine as combine_forms
from nucleus_export.moe import expert_choice
from nucleus_export.rewrites.surgery import NodeWriter, drop_functions, replace_nodes, set_attribute


def count_moe_nodes(model: onnx.ModelProto) -> dict[str, int]:
    """Number of nucleus custom nodes per op type in the main graph."""
    counts = {op: 0 for op in CUSTOM_OPS}
    for node in model.graph.node:
        if node.domain == DOMAIN and node.op_type in counts:
            counts[node.op_type] += 1
    return counts


def lower_moe_native(model: onnx.ModelProto, combine: str, num_experts: int) -> onnx.ModelProto:
    """Replace every nucleus.ExpertChoiceRouter / nucleus.MoECombine node with native ONNX ops TensorRT builds.

    Exact with respect to docs/contract.md: token indices are equal (same TopK), gating and the combined output are
    equal up to float summation order (the "chain" combine adds in exactly the contract's order).

    Args:
        model: a bundle graph as exported ("functions" lowering); not modified.
        combine: the combine's formulation (nucleus_export.moe.combine.FORMULATIONS; costs.combine chooses).
        num_experts: the model's expert count (its config).

    Returns:
        A new model without nucleus nodes or functions.
    """
    if combine not in combine_forms.FORMULATIONS:
        raise ValueError(f"unknown combine formulation {combine!r}; use one of {sorted(combine_forms.FORMULATIONS)}")
    lower_combine = combine_forms.FORMULATIONS[combine]

    def combine_nodes(node: onnx.NodeProto, writer: NodeWriter) -> None:
        lower_combine(node, writer, num_experts)

    lowered = replace_nodes(model, {ROUTER_OP: expert_choice.lower_router, COMBINE_OP: combine_nodes})
    drop_functions(lowered, CUSTOM_OPS)
    left = [n.op_type for n in lowered.graph.node if n.domain == DOMAIN]
    if left:
        raise ValueError(f"nucleus ops without a native lowering: {sorted(set(left))}")
    return lowered


def prepare_for_plugins(model: onnx.ModelProto) -> onnx.ModelProto:
    """Keep the nucleus custom nodes so TensorRT's ONNX parser turns each into a plugin layer.

    The parser inlines a model-local function whenever one exists, unless OnnxParserFlag.ENABLE_PLUGIN_OVERRIDE is
    set *and* a creator of that name is registered; with a library that lacks an op it would silently inline the
    reference body (which then fails on its scatter-add). Dropping the bodies leaves the parser one route: its
    plugin importer, which looks the creator up by op_type, the node's `plugin_version` attribute (default "1") and
    `plugin_namespace` attribute (default ""), and passes the other attributes as plugin fields. The library
    registers its creators under namespace "nucleus", so the nodes must name it.

    Args:
        model: a bundle graph as exported; not modified.

    Returns:
        A new model whose nucleus nodes carry the plugin library's plugin_version/plugin_namespace and no function
        bodies.
    """
    out = copy.deepcopy(model)
    for node in out.graph.node:
        if node.domain == DOMAIN and node.op_type in CUSTOM_OPS:
            set_attribute(node, "plugin_version", PLUGIN_VERSION)
            set_attribute(node, "plugin_namespace", PLUGIN_NAMESPACE)
    drop_functions(out, CUSTOM_OPS)
    return out
