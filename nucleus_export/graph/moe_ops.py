"""The `nucleus` custom ops and their ONNX-function reference bodies (spec: docs/contract.md).

Each op is a model-local function: ONNX Runtime executes the body, TensorRT either gets a plugin for the node
(`--moe plugin`) or the node is rewritten into native layers (`--moe native`, nucleus_export.engines.lowering).
"""

from __future__ import annotations

from collections.abc import Callable

import onnx
from nucleus_runtime.contract import (
    ATTR_CAPACITY_DENOMINATOR,
    ATTR_CAPACITY_NUMERATOR,
    ATTR_ROUTE_SCALE,
    ATTR_SCORE_FUNCTION,
    COMBINE_OP,
    GATING_EPS,
    ROUTER_OP,
    SCORE_FUNCTIONS,
)
from onnx import TensorProto, helper

from nucleus_export.graph.builder import NUCLEUS_DOMAIN, OPSET, GraphBuilder

# Emits one node (op type, inputs, output-name hint) and returns the name of its output.
NodeEmitter = Callable[[str, list[str], str], str]


def emit_capacity(emit: NodeEmitter, num: str, den: str, tokens: str, experts: str, one: str) -> str:
    """The contract's capacity rule (nucleus_runtime.contract.capacity) as int64 ONNX ops on [1] tensors:
    max(1, ceil(num*S / (den*E))), the ceiling as (a + b - 1) / b for positive a, b. Shared by the router's reference
    body and its native lowering so the rule is written once in graph form."""
    a = emit("Mul", [num, tokens], "cap_a")
    b = emit("Mul", [den, experts], "cap_b")
    a_plus_b_minus_1 = emit("Sub", [emit("Add", [a, b], "cap_ab"), one], "cap_ab1")
    return emit("Max", [emit("Div", [a_plus_b_minus_1, b], "cap_ceil"), one], "capacity")


def _const(name: str, value, dtype: int = TensorProto.INT64) -> onnx.NodeProto:
    values = value if isinstance(value, list) else [value]
    return helper.make_node(
        "Constant", [], [name], value=helper.make_tensor(name, dtype, [len(values)] if isinstance(value, list) else [], values)
    )


def _attribute_constant(output: str, attribute: str, kind: int) -> onnx.NodeProto:
    """A Constant whose value is the calling node's attribute (a function's ref_attr_name)."""
    node = helper.make_node("Constant", [], [output])
    field = "value_int" if kind == onnx.AttributeProto.INT else "value_float"
    node.attribute.append(onnx.AttributeProto(name=field, ref_attr_name=attribute, type=kind))
    return node


def router_function(score_function: str) -> onnx.FunctionProto:
    """Reference body of ExpertChoiceRouter for one score function.

    A function body cannot branch on a string attribute, and every MoE layer of a model shares the score function,
    so the body is specialised per model while the node still carries `score_function` for plugins and lowering.
    """
    if score_function not in SCORE_FUNCTIONS:
        raise ValueError(f"score_function must be one of {SCORE_FUNCTIONS}, got {score_function!r}")
    n = helper.make_node
    capacity_nodes: list[onnx.NodeProto] = []

    def emit(op_type: str, inputs: list[str], out: str) -> str:
        capacity_nodes.append(n(op_type, inputs, [out]))
        return out

    capacity = emit_capacity(emit, "num", "den", "tokens", "experts", "one")
    score_node = (
        n("Softmax", ["router_logits"], ["scores"], axis=-1)
        if score_function == "softmax"
        else n("Sigmoid", ["router_logits"], ["scores"])
    )
    nodes = [
        score_node,
        n("Shape", ["router_logits"], ["batch_tokens"], start=0, end=2),
        n("Shape", ["router_logits"], ["tokens"], start=1, end=2),
        n("Shape", ["router_logits"], ["experts"], start=2, end=3),
        _attribute_constant("num", ATTR_CAPACITY_NUMERATOR, onnx.AttributeProto.INT),
        _attribute_constant("den", ATTR_CAPACITY_DENOMINATOR, onnx.AttributeProto.INT),
        _const("one", [1]),
        _const("flat_shape", [0, -1]),
        *capacity_nodes,
        n("Transpose", ["scores"], ["affinity"], perm=[0, 2, 1]),
        n("TopK", ["affinity", capacity], ["top_values", "token_indices"], axis=-1, largest=1, sorted=1),
        n("Reshape", ["token_indices", "flat_shape"], ["flat_indices"]),
        n("Reshape", ["top_values", "flat_shape"], ["flat_values"]),
        n("ConstantOfShape", ["batch_tokens"], ["zeros"], value=helper.make_tensor("z", TensorProto.FLOAT, [1], [0.0])),
        n("ScatterElements", ["zeros", "flat_indices", "flat_values"], ["token_sums"], axis=1, reduction="add"),
        n("GatherElements", ["token_sums", "flat_indices"], ["chosen_sums"], axis=1),
        _const("eps", GATING_EPS, TensorProto.FLOAT),
        n("Add", ["chosen_sums", "eps"], ["denominator"]),
        n("Div", ["flat_values", "denominator"], ["normalized"]),
        _attribute_constant("route_scale_value", ATTR_ROUTE_SCALE, onnx.AttributeProto.FLOAT),
        n("Mul", ["normalized", "route_scale_value"], ["scaled"]),
        n("Shape", ["top_values"], ["gating_shape"]),
        n("Reshape", ["scaled", "gating_shape"], ["gating"]),
    ]
    return helper.make_function(
        NUCLEUS_DOMAIN,
        ROUTER_OP,
        inputs=["router_logits"],
        outputs=["token_indices", "gating"],
        nodes=nodes,
        opset_imports=[helper.make_opsetid("", OPSET)],
        attributes=[ATTR_CAPACITY_NUMERATOR, ATTR_CAPACITY_DENOMINATOR, ATTR_SCORE_FUNCTION, ATTR_ROUTE_SCALE],
    )


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
        _const("last_axis", [-1]),
        n("Unsqueeze", ["gating_ebc", "last_axis"], ["gating_ebc1"]),
        n("Mul", ["expert_f32", "gating_ebc1"], ["weighted_f32"]),
        # Contributions are rounded to the compute dtype (as diffusers does) but summed in float32, which also keeps
        # the reference runnable where a runtime has no low-precision scatter-add (ONNX Runtime CPU).
        n("CastLike", ["weighted_f32", "shared_output"], ["weighted"]),
        n("Cast", ["weighted"], ["rounded_f32"], to=TensorProto.FLOAT),
        n("Shape", ["shared_output"], ["batch"], start=0, end=1),
        n("Shape", ["shared_output"], ["tokens"], start=1, end=2),
        n("Shape", ["shared_output"], ["hidden"], start=2, end=3),
        _const("minus_one", [-1]),
        n("Concat", ["minus_one", "hidden"], ["rows_shape"], axis=0),
        n("Reshape", ["rounded_f32", "rows_shape"], ["rows"]),
        # Row of token s of batch row b in [B*S, H]: b * S + s.
        _const("zero", 0),
        _const("one", 1),
        _const("scalar", []),
        n("Reshape", ["batch", "scalar"], ["batch_scalar"]),
        n("Range", ["zero", "batch_scalar", "one"], ["batch_index"]),
        n("Mul", ["batch_index", "tokens"], ["batch_offset"]),
        _const("offset_shape", [-1, 1, 1]),
        n("Reshape", ["batch_offset", "offset_shape"], ["batch_offset_b11"]),
        n("Add", ["token_indices", "batch_offset_b11"], ["global_bec"]),
        n("Transpose", ["global_bec"], ["global_ebc"], perm=[1, 0, 2]),
        _const("index_shape", [-1, 1]),
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
        NUCLEUS_DOMAIN,
        COMBINE_OP,
        inputs=["shared_output", "expert_output", "token_indices", "gating"],
        outputs=["output"],
        nodes=nodes,
        opset_imports=[helper.make_opsetid("", OPSET)],
        attributes=[],
    )


def expert_choice_router(
    g: GraphBuilder,
    router_logits: str,
    capacity: tuple[int, int],
    score_function: str,
    route_scale: float,
) -> tuple[str, str]:
    """Emit a router node (registering its function); returns (token_indices, gating)."""
    if ROUTER_OP not in g.functions:
        g.add_function(router_function(score_function))
    indices, gating = g.op(
        ROUTER_OP,
        [router_logits],
        n_out=2,
        domain=NUCLEUS_DOMAIN,
        hint="router",
        **{
            ATTR_CAPACITY_NUMERATOR: capacity[0],
            ATTR_CAPACITY_DENOMINATOR: capacity[1],
            ATTR_SCORE_FUNCTION: score_function,
            ATTR_ROUTE_SCALE: float(route_scale),
        },
    )
    return indices, gating


def moe_combine(
    g: GraphBuilder, shared_output: str, expert_output: str, token_indices: str, gating: str, num_experts: int
) -> str:
    if COMBINE_OP not in g.functions:
        g.add_function(combine_function(num_experts))
    return g.op(COMBINE_OP, [shared_output, expert_output, token_indices, gating], domain=NUCLEUS_DOMAIN, hint="combine")
