"""The MoE combine, every form of it in one place (spec: docs/contract.md, `MoECombine`): the ONNX-function reference
body, the node the exporter emits, and the two native TensorRT lowerings (`FORMULATIONS`). Which formulation an
engine gets is decided by the cost model (nucleus_export.costs.combine)."""

from __future__ import annotations

import numpy as np
import onnx
from nucleus_runtime.contract import COMBINE_CHAIN, COMBINE_ONEHOT, COMBINE_OP, DOMAIN, ONNX_OPSET
from onnx import TensorProto, helper

from nucleus_export.moe.expert_choice import GraphSink, NodeSink, constant_node


def combine_function(num_experts: int) -> onnx.FunctionProto:
    """Reference body of MoECombine: gated scatter-add of [E,B,C,H] expert outputs onto [B,S,H].

    Rows are scattered whole (ScatterND over [B*S, H] with one index per (e, b, c)), one expert after the other, so
    every token sums its experts in ascending order, as diffusers' flattened scatter_add does. One ScatterND per
    expert rather than one for all: ONNX Runtime's CPU ScatterND splits its updates over intra-op threads without
    guarding duplicate indices (microsoft/onnxruntime#18048), so a token chosen by two experts in one call loses
    updates at random whenever more than one thread runs; within one expert the B*C rows are distinct tokens, so
    each call is race-free and the result equals the serial sum bit for bit on any thread count. The body is
    unrolled per model (like the router's score function) because E is a build-time constant of the architecture.
    """
    n = helper.make_node
    nodes = [
        n("Cast", ["expert_output"], ["expert_f32"], to=TensorProto.FLOAT),
        n("Transpose", ["gating"], ["gating_ebc"], perm=[1, 0, 2]),
        constant_node("last_axis", [-1]),
        n("Unsqueeze", ["gating_ebc", "last_axis"], ["gating_ebc1"]),
        n("Mul", ["expert_f32", "gating_ebc1"], ["weighted_f32"]),
        # Contributions are rounded to the compute dtype (as diffusers does) but summed in float32, which also keeps
        # the reference runnable where a runtime has no low-precision scatter-add (ONNX Runtime CPU).
        n("CastLike", ["weighted_f32", "shared_output"], ["weighted"]),
        n("Cast", ["weighted"], ["rounded_f32"], to=TensorProto.FLOAT),
        n("Shape", ["shared_output"], ["batch"], start=0, end=1),
        n("Shape", ["shared_output"], ["tokens"], start=1, end=2),
        n("Shape", ["shared_output"], ["hidden"], start=2, end=3),
        constant_node("minus_one", [-1]),
        n("Concat", ["minus_one", "hidden"], ["rows_shape"], axis=0),
        n("Reshape", ["rounded_f32", "rows_shape"], ["rows"]),
        # Row of token s of batch row b in [B*S, H]: b * S + s.
        constant_node("zero", 0),
        constant_node("one", 1),
        constant_node("scalar", []),
        n("Reshape", ["batch", "scalar"], ["batch_scalar"]),
        n("Range", ["zero", "batch_scalar", "one"], ["batch_index"]),
        n("Mul", ["batch_index", "tokens"], ["batch_offset"]),
        constant_node("offset_shape", [-1, 1, 1]),
        n("Reshape", ["batch_offset", "offset_shape"], ["batch_offset_b11"]),
        n("Add", ["token_indices", "batch_offset_b11"], ["global_bec"]),
        n("Transpose", ["global_bec"], ["global_ebc"], perm=[1, 0, 2]),
        constant_node("index_shape", [-1, 1]),
        n("Reshape", ["global_ebc", "index_shape"], ["row_indices"]),
        n("Cast", ["shared_output"], ["shared_f32"], to=TensorProto.FLOAT),
        n("Reshape", ["shared_f32", "rows_shape"], ["sum_0"]),
        # Expert-major rows: the e-th of E equal chunks holds expert e's B*C rows.
        n("Split", ["row_indices"], [f"indices_{e}" for e in range(num_experts)], axis=0, num_outputs=num_experts),
        n("Split", ["rows"], [f"rows_{e}" for e in range(num_experts)], axis=0, num_outputs=num_experts),
        *(
            n("ScatterND", [f"sum_{e}", f"indices_{e}", f"rows_{e}"], [f"sum_{e + 1}"], reduction="add")
            for e in range(num_experts)
        ),
        n("Identity", [f"sum_{num_experts}"], ["sum_rows"]),
        n("Shape", ["shared_output"], ["output_shape"]),
        n("Reshape", ["sum_rows", "output_shape"], ["sum_f32"]),
        n("CastLike", ["sum_f32", "shared_output"], ["output"]),
    ]
    return helper.make_function(
        DOMAIN,
        COMBINE_OP,
        inputs=["shared_output", "expert_output", "token_indices", "gating"],
        outputs=["output"],
        nodes=nodes,
        opset_imports=[helper.make_opsetid("", ONNX_OPSET)],
        attributes=[],
    )


def emit_combine(g: GraphSink, shared_output: str, expert_output: str, token_indices: str, gating: str, num_experts: int) -> str:
    """Emit a combine node (registering its function body); returns its output."""
    if COMBINE_OP not in g.functions:
        g.add_function(combine_function(num_experts))
    return g.op(COMBINE_OP, [shared_output, expert_output, token_indices, gating], domain=DOMAIN, hint="combine")


# ---- native lowerings -------------------------------------------------------------------------------------------


def _i64(*values: int) -> np.ndarray:
    return np.array(values, dtype=np.int64)


def _weighted_contributions(node: onnx.NodeProto, em: NodeSink) -> str:
    """weighted[e, b, c] = cast_to_compute(float32(expert_output[e, b, c]) * gating[b, e, c]), as in the contract."""
    shared, expert_output, _, gating = node.input[:4]
    gating_ebc = em.one("Transpose", [gating], "gating_ebc", perm=[1, 0, 2])
    gating_ebc1 = em.one("Unsqueeze", [gating_ebc, em.const(_i64(-1), "last_axis")], "gating_ebc1")
    expert_f32 = em.one("Cast", [expert_output], "expert_f32", to=TensorProto.FLOAT)
    return em.one("CastLike", [em.one("Mul", [expert_f32, gating_ebc1], "weighted_f32"), shared], "weighted")


def lower_onehot(node: onnx.NodeProto, em: NodeSink, num_experts: int) -> None:
    """One GEMM [B, S, E*C] x [B, E*C, H] with a 0/1 matrix: tensor-core speed, but quadratic in S
    (nucleus_export.costs.combine). Exact in any dtype: each product is x * 1 or x * 0; the sum runs in the GEMM
    accumulator, is rounded to the compute dtype, then the shared output is added."""
    shared, _, token_indices, _ = node.input[:4]
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
    combined = em.one("MatMul", [one_hot, weighted_flat], "combined")
    em.nodes.append(helper.make_node("Add", [shared, combined], [node.output[0]], name=em.name("output")))


def lower_chain(node: onnx.NodeProto, em: NodeSink, num_experts: int) -> None:
    """Per expert, in ascending order: gather the float32 running sums of its B*C tokens, add its contributions,
    scatter them back. Linear in S. Exact: the C tokens of one expert (offset by b*S per batch row) are distinct, so
    a ScatterND without reduction (which TensorRT builds, unlike reduction="add") never collides, and every token
    sums shared + e0 + e1 + ... in float32, in the contract's order."""
    shared, _, token_indices, _ = node.input[:4]
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
    em.nodes.append(helper.make_node("CastLike", [total, shared], [node.output[0]], name=em.name("output")))


# name -> lowering(node, sink, num_experts); the one-hot GEMM needs no static E, the chain unrolls over it.
FORMULATIONS = {COMBINE_ONEHOT: lower_onehot, COMBINE_CHAIN: lower_chain}
