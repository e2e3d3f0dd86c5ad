"""Graph rewrites applied to an exported bundle graph before TensorRT parses it (pure functions on onnx.ModelProto).

- `lower_moe_native`: replaces the `nucleus` custom nodes (ExpertChoiceRouter, MoECombine) by an exact subgraph of
  layers every TensorRT parser supports, and removes their function bodies.
- `prepare_for_plugins`: keeps the custom nodes for the plugin library and removes their function bodies, so a node
  can only become a plugin layer (a missing plugin fails the parse instead of silently inlining the slow reference).
- `broadcast_attention_masks`: gives TensorRT the attention mask unexpanded over the queries.

Why the lowering looks the way it does (facts checked with TensorRT-RTX 1.7.1 on the CPU, see README-facts.md):
- ScatterElements / ScatterND with reduction="add" are rejected by the parser ("Unsupported reduction type"), so the
  reference bodies (scatter-add) cannot be used. ScatterElements *without* reduction builds; it is exact whenever the
  indices it writes are distinct, which holds within one (batch row, expert): top-C returns C distinct tokens.
- OneHot needs a build-time depth; `Equal(Unsqueeze(idx, -1), Range(0, S))` builds with a dynamic S.
- TopK accepts a K computed in the graph from the dynamic S with integer Shape/Mul/Add/Div/Max ops.
"""

from __future__ import annotations

import copy
from collections.abc import Iterable

import numpy as np
import onnx
from nucleus_runtime.contract import (
    ATTR_CAPACITY_DENOMINATOR,
    ATTR_CAPACITY_NUMERATOR,
    ATTR_ROUTE_SCALE,
    ATTR_SCORE_FUNCTION,
    COMBINE_OP,
    GATING_EPS,
    PLUGIN_NAMESPACE,
    PLUGIN_VERSION,
    ROUTER_OP,
    SCORE_FUNCTIONS,
)
from nucleus_runtime.contract import CUSTOM_OPS as MOE_OPS
from nucleus_runtime.contract import DOMAIN as NUCLEUS_DOMAIN
from onnx import TensorProto, helper, numpy_helper

from nucleus_export.graph.moe_ops import emit_capacity


def _attrs(node: onnx.NodeProto) -> dict[str, object]:
    return {a.name: helper.get_attribute_value(a) for a in node.attribute}


def count_moe_nodes(model: onnx.ModelProto) -> dict[str, int]:
    """Number of nucleus custom nodes per op type in the main graph."""
    counts = {op: 0 for op in MOE_OPS}
    for node in model.graph.node:
        if node.domain == NUCLEUS_DOMAIN and node.op_type in counts:
            counts[node.op_type] += 1
    return counts


class _Emitter:
    """Creates uniquely named nodes and constants for one replaced node."""

    def __init__(self, prefix: str, taken: set[str]):
        self.prefix = prefix
        self.taken = taken
        self.nodes: list[onnx.NodeProto] = []

    def name(self, hint: str) -> str:
        base = f"{self.prefix}/{hint}"
        name, i = base, 0
        while name in self.taken:
            i += 1
            name = f"{base}_{i}"
        self.taken.add(name)
        return name

    def op(self, op_type: str, inputs: list[str], n_out: int = 1, hint: str | None = None, **attrs) -> list[str]:
        outs = [self.name(f"{hint or op_type}_out{i}") for i in range(n_out)]
        self.nodes.append(helper.make_node(op_type, inputs, outs, name=self.name(hint or op_type), **attrs))
        return outs

    def one(self, op_type: str, inputs: list[str], hint: str | None = None, **attrs) -> str:
        return self.op(op_type, inputs, 1, hint, **attrs)[0]

    def const(self, value: np.ndarray, hint: str) -> str:
        # Constant nodes rather than initializers: the rewrite stays local to the node list.
        out = self.name(hint)
        self.nodes.append(
            helper.make_node("Constant", [], [out], name=self.name(hint + "_node"), value=numpy_helper.from_array(value))
        )
        return out


def _i64(*values: int) -> np.ndarray:
    return np.array(values, dtype=np.int64)


def _router_nodes(node: onnx.NodeProto, em: _Emitter) -> None:
    a = _attrs(node)
    num = int(a[ATTR_CAPACITY_NUMERATOR])
    den = int(a[ATTR_CAPACITY_DENOMINATOR])
    score_function = a.get(ATTR_SCORE_FUNCTION, SCORE_FUNCTIONS[0].encode())
    score_function = score_function.decode() if isinstance(score_function, bytes) else str(score_function)
    route_scale = float(a.get(ATTR_ROUTE_SCALE, 1.0))
    if num <= 0 or den <= 0:
        raise ValueError(f"{node.name}: capacity_numerator/denominator must be positive, got {num}/{den}")
    if score_function not in SCORE_FUNCTIONS:
        raise ValueError(f"{node.name}: unknown score_function {score_function!r}")
    logits = node.input[0]
    token_indices, gating = node.output[0], node.output[1]

    # Scores in float32 whatever the logits' dtype: the router stays high precision (docs/contract.md).
    x = em.one("Cast", [logits], "logits_f32", to=TensorProto.FLOAT)
    scores = em.one("Softmax", [x], "scores", axis=-1) if score_function == "softmax" else em.one("Sigmoid", [x], "scores")
    scores_t = em.one("Transpose", [scores], "scores_t", perm=[0, 2, 1])  # [B, E, S]

    shape = em.one("Shape", [logits], "logits_shape")
    s = em.one("Gather", [shape, em.const(_i64(1), "axis_s")], "S", axis=0)
    e = em.one("Gather", [shape, em.const(_i64(2), "axis_e")], "E", axis=0)
    c = emit_capacity(
        lambda op_type, inputs, hint: em.one(op_type, inputs, hint),
        em.const(_i64(num), "num"), em.const(_i64(den), "den"), s, e, em.const(_i64(1), "one"),
    )

    values, indices = em.op("TopK", [scores_t, c], 2, "topk", axis=-1, largest=1, sorted=1)  # [B, E, C] each
    em.nodes.append(helper.make_node("Identity", [indices], [token_indices], name=em.name("token_indices")))

    # Per-token sum of the scores of the (expert, slot) pairs that chose the token. A mask [B, E, S] written with
    # ScatterElements (no reduction: the C tokens of one expert are distinct, so no write collides) selects them.
    zeros = em.one("ConstantOfShape", [em.one("Shape", [scores_t], "scores_t_shape")], "zeros",
                   value=numpy_helper.from_array(np.zeros(1, np.float32)))
    ones = em.one("ConstantOfShape", [em.one("Shape", [values], "values_shape")], "ones",
                  value=numpy_helper.from_array(np.ones(1, np.float32)))
    mask = em.one("ScatterElements", [zeros, indices, ones], "chosen_mask", axis=2)
    chosen = em.one("Mul", [scores_t, mask], "chosen_scores")
    denom = em.one("ReduceSum", [chosen, em.const(_i64(1), "reduce_e")], "token_denominator", keepdims=0)  # [B, S]
    # Back to [B, E, C]: an exact gather of each chosen token's denominator.
    flat_idx = em.one("Reshape", [indices, em.const(_i64(0, -1), "flat_shape")], "flat_indices")  # [B, E*C]
    denom_at = em.one("GatherElements", [denom, flat_idx], "denominator_at", axis=1)
    denom_at = em.one("Reshape", [denom_at, em.one("Shape", [indices], "indices_shape")], "denominator_bec")
    denom_eps = em.one("Add", [denom_at, em.const(np.array(GATING_EPS, np.float32), "eps")], "denominator_eps")
    normalized = em.one("Div", [values, denom_eps], "normalized")
    em.nodes.append(
        helper.make_node("Mul", [normalized, em.const(np.array(route_scale, np.float32), "route_scale")], [gating],
                         name=em.name("gating"))
    )


def _weighted_contributions(node: onnx.NodeProto, em: _Emitter) -> str:
    """weighted[e, b, c] = cast_to_compute(float32(expert_output[e, b, c]) * gating[b, e, c]), as in the contract."""
    shared, expert_output, _, gating = node.input[:4]
    gating_ebc = em.one("Transpose", [gating], "gating_ebc", perm=[1, 0, 2])
    gating_ebc1 = em.one("Unsqueeze", [gating_ebc, em.const(_i64(-1), "last_axis")], "gating_ebc1")
    expert_f32 = em.one("Cast", [expert_output], "expert_f32", to=TensorProto.FLOAT)
    return em.one("CastLike", [em.one("Mul", [expert_f32, gating_ebc1], "weighted_f32"), shared], "weighted")


def _combine_onehot(node: onnx.NodeProto, em: _Emitter, num_experts: int) -> None:
    """One GEMM [B, S, E*C] x [B, E*C, H] with a 0/1 matrix: tensor-core speed, but quadratic in S (engines/cost.py)."""
    shared, _, token_indices, _ = node.input[:4]
    output = node.output[0]
    weighted = _weighted_contributions(node, em)
    # [E, B, C, H] -> [B, E*C, H]
    weighted_b = em.one("Transpose", [weighted], "weighted_becH", perm=[1, 0, 2, 3])
    shared_shape = em.one("Shape", [shared], "shared_shape")
    b_dim = em.one("Slice", [shared_shape, em.const(_i64(0), "s0"), em.const(_i64(1), "s1")], "B")
    h_dim = em.one("Slice", [shared_shape, em.const(_i64(2), "s2"), em.const(_i64(3), "s3")], "H")
    s_dim = em.one("Squeeze", [em.one("Slice", [shared_shape, em.const(_i64(1), "t1"), em.const(_i64(2), "t2")], "S1")], "S")
    flat_shape = em.one("Concat", [b_dim, em.const(_i64(-1), "minus_one"), h_dim], "flat_shape", axis=0)
    weighted_flat = em.one("Reshape", [weighted_b, flat_shape], "weighted_flat")
    # one_hot[b, s, k] = (token_indices[b].flat[k] == s), built with a dynamic S (OneHot needs a constant depth).
    flat_idx = em.one("Reshape", [token_indices, em.const(_i64(0, -1), "idx_flat_shape")], "idx_flat")  # [B, E*C]
    idx_b1k = em.one("Unsqueeze", [flat_idx, em.const(_i64(1), "axis1")], "idx_b1k")
    positions = em.one("Range", [em.const(np.array(0, np.int64), "r0"), s_dim, em.const(np.array(1, np.int64), "r1")], "positions")
    positions_s1 = em.one("Unsqueeze", [positions, em.const(_i64(-1), "axis_last")], "positions_s1")
    hit = em.one("Equal", [positions_s1, idx_b1k], "one_hot_bool")  # [B, S, E*C]
    one_hot = em.one("CastLike", [hit, shared], "one_hot")
    # Exact in any dtype: each product is x * 1 or x * 0; the sum runs in the GEMM accumulator.
    combined = em.one("MatMul", [one_hot, weighted_flat], "combined")
    em.nodes.append(helper.make_node("Add", [shared, combined], [output], name=em.name("output")))


def _combine_chain(node: onnx.NodeProto, em: _Emitter, num_experts: int) -> None:
    """Per expert, in ascending order: gather the float32 running sums of its B*C tokens, add its contributions,
    scatter them back. Linear in S. Exact: the C tokens of one expert (offset by b*S per batch row) are distinct, so
    a ScatterND without reduction (which TensorRT builds, unlike reduction="add") never collides, and every token
    sums shared + e0 + e1 + ... in float32, in the contract's order."""
    shared, _, token_indices, _ = node.input[:4]
    output = node.output[0]
    rounded = em.one("Cast", [_weighted_contributions(node, em)], "rounded_f32", to=TensorProto.FLOAT)
    shared_shape = em.one("Shape", [shared], "shared_shape")
    h_dim = em.one("Slice", [shared_shape, em.const(_i64(2), "s2"), em.const(_i64(3), "s3")], "H")
    rows_shape = em.one("Concat", [em.const(_i64(-1), "minus_one"), h_dim], "rows_shape", axis=0)
    acc = em.one("Reshape", [em.one("Cast", [shared], "shared_f32", to=TensorProto.FLOAT), rows_shape], "acc")
    per_expert_shape = em.one("Concat", [em.const(_i64(num_experts, -1), "e_rows"), h_dim], "per_expert_shape", axis=0)
    per_expert = em.one("Reshape", [rounded, per_expert_shape], "contributions")  # [E, B*C, H]
    # Row of token s of batch row b in [B*S, H]: b * S + s; per expert [B*C, 1].
    s_dim = em.one("Slice", [shared_shape, em.const(_i64(1), "t1"), em.const(_i64(2), "t2")], "S")
    b_scalar = em.one("Squeeze", [em.one("Slice", [shared_shape, em.const(_i64(0), "s0"), em.const(_i64(1), "s1")], "B")],
                      "B_scalar")
    batch_index = em.one("Range", [em.const(np.array(0, np.int64), "r0"), b_scalar, em.const(np.array(1, np.int64), "r1")],
                         "batch_index")
    offsets = em.one("Reshape", [em.one("Mul", [batch_index, s_dim], "batch_offset"), em.const(_i64(-1, 1, 1), "b11")],
                     "batch_offset_b11")
    rows_bec = em.one("Add", [token_indices, offsets], "rows_bec")
    rows = em.one("Reshape", [em.one("Transpose", [rows_bec], "rows_ebc", perm=[1, 0, 2]),
                              em.const(_i64(num_experts, -1, 1), "rows_shape_e")], "rows")  # [E, B*C, 1]
    for e in range(num_experts):
        index = em.const(np.array(e, np.int64), f"expert{e}")
        rows_e = em.one("Gather", [rows, index], f"rows{e}", axis=0)
        current = em.one("GatherND", [acc, rows_e], f"sum{e}")
        updated = em.one("Add", [current, em.one("Gather", [per_expert, index], f"contribution{e}", axis=0)], f"add{e}")
        acc = em.one("ScatterND", [acc, rows_e, updated], f"scatter{e}")
    total = em.one("Reshape", [acc, shared_shape], "sum_f32")
    em.nodes.append(helper.make_node("CastLike", [total, shared], [output], name=em.name("output")))


# name -> emitter(node, emitter, num_experts); the one-hot GEMM needs no static E, the chain unrolls over it.
COMBINE_FORMULATIONS = {"onehot": _combine_onehot, "chain": _combine_chain}


def _rewrite(model: onnx.ModelProto, replace: dict[str, object]) -> onnx.ModelProto:
    out = copy.deepcopy(model)
    graph = out.graph
    taken = {n.name for n in graph.node} | {o for n in graph.node for o in n.output} | {i.name for i in graph.initializer}
    taken |= {i.name for i in graph.input} | {o.name for o in graph.output}
    new_nodes: list[onnx.NodeProto] = []
    for i, node in enumerate(graph.node):
        fn = replace.get(node.op_type) if node.domain == NUCLEUS_DOMAIN else None
        if fn is None:
            new_nodes.append(node)
            continue
        em = _Emitter(node.name or f"{node.op_type}_{i}", taken)
        fn(node, em)
        new_nodes.extend(em.nodes)
    del graph.node[:]
    graph.node.extend(new_nodes)
    return out


def _drop_functions(model: onnx.ModelProto, ops: Iterable[str]) -> None:
    ops = set(ops)
    keep = [f for f in model.functions if not (f.domain == NUCLEUS_DOMAIN and f.name in ops)]
    del model.functions[:]
    model.functions.extend(keep)
    used = {n.domain for n in model.graph.node} | {n.domain for f in model.functions for n in f.node}
    if NUCLEUS_DOMAIN not in used:
        keep_ops = [o for o in model.opset_import if o.domain != NUCLEUS_DOMAIN]
        del model.opset_import[:]
        model.opset_import.extend(keep_ops)


def expert_counts(model: onnx.ModelProto) -> dict[str, int]:
    """E of every MoECombine node (by node name), from the static first dim of its expert_output.

    Shape inference runs on the graph without weights (initializers are not loaded) with data propagation, which
    carries E through the Reshape that forms expert_output."""
    inferred = onnx.shape_inference.infer_shapes(model, data_prop=True)
    shapes = {v.name: v.type.tensor_type.shape for v in [*inferred.graph.value_info, *inferred.graph.input]}
    counts = {}
    for node in model.graph.node:
        if node.domain == NUCLEUS_DOMAIN and node.op_type == COMBINE_OP:
            shape = shapes.get(node.input[1])
            dim = shape.dim[0].dim_value if shape is not None and len(shape.dim) == 4 else 0
            if dim <= 0:
                raise ValueError(f"{node.name}: the number of experts (expert_output dim 0) is not static")
            counts[node.name] = dim
    return counts


def lower_moe_native(model: onnx.ModelProto, combine: str = "onehot", num_experts: int | None = None) -> onnx.ModelProto:
    """Replace every nucleus.ExpertChoiceRouter / nucleus.MoECombine node with native ONNX ops TensorRT builds.

    Exact with respect to docs/contract.md: token indices are equal (same TopK), gating and the combined output are
    equal up to float summation order (the per-token sums add the same terms in another order; the "chain" combine
    adds in exactly the contract's order, the "onehot" GEMM sums the experts in its accumulator, rounds that sum to
    the compute dtype and then adds the shared output).

    Args:
        model: a bundle graph as exported ("functions" lowering); not modified.
        combine: "onehot" or "chain" (COMBINE_FORMULATIONS; engines/cost.py chooses per profile).
        num_experts: the model's expert count where the caller knows it (its config); None infers each combine's E
            from the graph (shape inference over the whole graph).

    Returns:
        A new model without nucleus nodes or functions.
    """
    if combine not in COMBINE_FORMULATIONS:
        raise ValueError(f"unknown combine formulation {combine!r}; use one of {sorted(COMBINE_FORMULATIONS)}")
    combines = [n.name for n in model.graph.node if n.domain == NUCLEUS_DOMAIN and n.op_type == COMBINE_OP]
    if num_experts is not None:
        counts = dict.fromkeys(combines, num_experts)
    else:
        counts = expert_counts(model) if combines else {}
    formulation = COMBINE_FORMULATIONS[combine]

    def combine_nodes(node: onnx.NodeProto, em: _Emitter) -> None:
        formulation(node, em, counts[node.name])

    lowered = _rewrite(model, {ROUTER_OP: _router_nodes, COMBINE_OP: combine_nodes})
    _drop_functions(lowered, MOE_OPS)
    left = [n.op_type for n in lowered.graph.node if n.domain == NUCLEUS_DOMAIN]
    if left:
        raise ValueError(f"nucleus ops without a native lowering: {sorted(set(left))}")
    return lowered


def broadcast_attention_masks(model: onnx.ModelProto) -> onnx.ModelProto:
    """Feed each Attention node the mask before its Expand over the queries ([B, 1, 1, S+T] instead of
    [B, 1, S, S+T]): valid ONNX (the op broadcasts the mask) that TensorRT builds without materializing B*S*(S+T)
    mask elements. ONNX Runtime 1.32 needs the expanded form, which is why the exported graph carries it.

    Args:
        model: a graph; not modified.

    Returns:
        A new model; Expand nodes left without consumers are removed.
    """
    out = copy.deepcopy(model)
    graph = out.graph
    producers = {o: n for n in graph.node for o in n.output}
    for node in graph.node:
        if node.op_type == "Attention" and len(node.input) > 3 and node.input[3]:
            source = producers.get(node.input[3])
            if source is not None and source.op_type == "Expand":
                node.input[3] = source.input[0]
    used = {i for n in graph.node for i in n.input} | {o.name for o in graph.output}
    keep = [n for n in graph.node if not (n.op_type == "Expand" and n.output[0] not in used)]
    del graph.node[:]
    graph.node.extend(keep)
    return out


def prepare_for_plugins(model: onnx.ModelProto) -> onnx.ModelProto:
    """Keep the nucleus custom nodes so TensorRT's ONNX parser turns each into a plugin layer.

    The parser inlines a model-local function whenever one exists, unless OnnxParserFlag.ENABLE_PLUGIN_OVERRIDE is
    set *and* a creator of that name is registered; with a library that lacks an op it would silently inline the
    reference body (which then fails on its scatter-add). Dropping the bodies leaves the parser one route: its
    plugin importer, which looks the creator up by op_type, the node's `plugin_version` attribute (default "1") and
    `plugin_namespace` attribute (default ""), and passes the other attributes as plugin fields. The library
    registers its creators under namespace "nucleus", so the nodes must name it. A missing plugin then fails the
    parse with "Plugin not found" at the node, which the builder reports by op name.

    Args:
        model: a bundle graph as exported; not modified.

    Returns:
        A new model whose nucleus nodes carry the plugin library's plugin_version/plugin_namespace and no function
        bodies.
    """
    out = copy.deepcopy(model)
    for node in out.graph.node:
        if node.domain == NUCLEUS_DOMAIN and node.op_type in MOE_OPS:
            _set_attribute(node, "plugin_version", PLUGIN_VERSION)
            _set_attribute(node, "plugin_namespace", PLUGIN_NAMESPACE)
    _drop_functions(out, MOE_OPS)
    return out


def _set_attribute(node: onnx.NodeProto, name: str, value: str) -> None:
    # Replaces a stale value (e.g. a graph prepared for another namespace) instead of keeping the first one.
    keep = [a for a in node.attribute if a.name != name]
    del node.attribute[:]
    node.attribute.extend([*keep, helper.make_attribute(name, value)])
