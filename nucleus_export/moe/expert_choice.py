"""Expert-choice routing, every form of it in one place (spec: docs/contract.md, `ExpertChoiceRouter`).

- the score functions (softmax / sigmoid over the experts): in ONNX, in torch (diffusers' reference) and their float32
  rounding bounds (`SCORE_FUNCTIONS`);
- the capacity rule as int64 ONNX ops (`emit_capacity`);
- the op's ONNX-function reference body (`router_function`) and the node the exporter emits (`emit_router`);
- its native TensorRT lowering (`lower_router`), its forced-selection variant for parity (`forced_router_function`);
- the reference selection diffusers makes (`reference_selection`) and the bound on a score's rounding error that
  classifies routing flips (`score_bounds`).

A new score function is one `ScoreFunction` here, its name in `nucleus_runtime.contract.SCORE_FUNCTIONS`, the config
field that selects it (`nucleus_export.model.config.ModelConfig.score_function`) and, for `--moe plugin`, the CUDA
kernel and its reference (plugins/): docs/architecture.md lists them.

This module builds nodes through two small protocols instead of importing the graph builder or the rewriter, so the
graph builders (nucleus_export.graph) and the rewrites (nucleus_export.rewrites) both stand on it.
"""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np
import onnx
from nucleus_runtime.contract import (
    ATTR_CAPACITY_DENOMINATOR,
    ATTR_CAPACITY_NUMERATOR,
    ATTR_ROUTE_SCALE,
    ATTR_SCORE_FUNCTION,
    DOMAIN,
    GATING_EPS,
    ONNX_OPSET,
    ROUTER_OP,
)
from nucleus_runtime.contract import SCORE_FUNCTIONS as SCORE_FUNCTION_NAMES
from onnx import TensorProto, helper, numpy_helper

if TYPE_CHECKING:
    import torch

UNIT_ROUNDOFF_FP32 = 2.0**-24

# Emits one node (op type, inputs, output-name hint, attributes) and returns the name of its output.
NodeEmitter = Callable[..., str]


class NodeSink(Protocol):
    """What a native lowering writes into (nucleus_export.rewrites.surgery.NodeWriter)."""

    nodes: list[onnx.NodeProto]

    def one(self, op_type: str, inputs: list[str], hint: str | None = None, **attrs: Any) -> str: ...

    def op(self, op_type: str, inputs: list[str], n_out: int = 1, hint: str | None = None, **attrs: Any) -> list[str]: ...

    def const(self, value: np.ndarray, hint: str) -> str: ...

    def name(self, hint: str) -> str: ...


class GraphSink(Protocol):
    """What the exporter emits into (nucleus_export.graph.builder.GraphBuilder)."""

    functions: dict[str, onnx.FunctionProto]

    def add_function(self, function: onnx.FunctionProto) -> None: ...

    def op(self, op_type: str, inputs: list[str], n_out: int = 1, domain: str = "", hint: str | None = None, **attrs: Any) -> Any: ...


# ---- score functions --------------------------------------------------------------------------------------------


def gamma(terms: int, unit_roundoff: float = UNIT_ROUNDOFF_FP32) -> float:
    """Higham's gamma_n = n u / (1 - n u): the relative bound on reordering a sum of n products."""
    nu = terms * unit_roundoff
    if nu >= 1:
        raise ValueError(f"gamma_{terms} is unbounded for unit roundoff {unit_roundoff}")
    return nu / (1 - nu)


@dataclasses.dataclass(frozen=True)
class ScoreFunction:
    """How router logits [B, S, E] become scores, in every form the toolkit needs.

    Attributes:
        name: the `score_function` attribute value (contract.SCORE_FUNCTIONS).
        onnx_op: the ONNX op computing it over the expert axis.
        torch_fn: diffusers' computation on float32 logits.
        bound: (scores, logit error bound) -> score error bound, float64 [B, S, E]: the logit bound propagated
            through the function plus its own float32 rounding.
    """

    name: str
    onnx_op: str
    torch_fn: Callable[[Any], Any]
    bound: Callable[[np.ndarray, np.ndarray], np.ndarray]

    def emit(self, emit: NodeEmitter, logits: str) -> str:
        attrs = {"axis": -1} if self.onnx_op == "Softmax" else {}
        return emit(self.onnx_op, [logits], "scores", **attrs)


def _softmax_bound(s: np.ndarray, logit_bound: np.ndarray) -> np.ndarray:
    # |ds_e| <= s_e (|dl_e| + sum_j s_j |dl_j|); exp, a sum of E terms and a divide: (E + 2) u relative.
    propagated = s * (logit_bound + (s * logit_bound).sum(axis=-1, keepdims=True))
    return propagated + (s.shape[-1] + 2) * UNIT_ROUNDOFF_FP32 * s


def _sigmoid_bound(s: np.ndarray, logit_bound: np.ndarray) -> np.ndarray:
    # |ds| <= s (1 - s) |dl|; exp, add, divide: 3 u relative.
    return s * (1 - s) * logit_bound + 3 * UNIT_ROUNDOFF_FP32 * s


def _torch_softmax(logits: Any) -> Any:
    import torch

    return torch.softmax(logits, dim=-1)


def _torch_sigmoid(logits: Any) -> Any:
    import torch

    return torch.sigmoid(logits)


SCORE_FUNCTIONS: dict[str, ScoreFunction] = {
    "softmax": ScoreFunction("softmax", "Softmax", _torch_softmax, _softmax_bound),
    "sigmoid": ScoreFunction("sigmoid", "Sigmoid", _torch_sigmoid, _sigmoid_bound),
}
assert tuple(SCORE_FUNCTIONS) == SCORE_FUNCTION_NAMES, "every contract score function has its forms here"


def score_function(name: str) -> ScoreFunction:
    if name not in SCORE_FUNCTIONS:
        raise ValueError(f"unknown score_function {name!r}; known: {', '.join(SCORE_FUNCTIONS)}")
    return SCORE_FUNCTIONS[name]


# ---- the capacity rule in graph form ----------------------------------------------------------------------------


def emit_capacity(emit: NodeEmitter, num: str, den: str, tokens: str, experts: str, one: str) -> str:
    """The contract's capacity rule (nucleus_runtime.contract.capacity) as int64 ONNX ops on [1] tensors:
    max(1, ceil(num*S / (den*E))), the ceiling as (a + b - 1) / b for positive a, b. Shared by the router's reference
    body and its native lowering so the rule is written once in graph form."""
    a = emit("Mul", [num, tokens], "cap_a")
    b = emit("Mul", [den, experts], "cap_b")
    a_plus_b_minus_1 = emit("Sub", [emit("Add", [a, b], "cap_ab"), one], "cap_ab1")
    return emit("Max", [emit("Div", [a_plus_b_minus_1, b], "cap_ceil"), one], "capacity")


# ---- the reference body and the exported node -------------------------------------------------------------------


def constant_node(name: str, value: Any, dtype: int = TensorProto.INT64) -> onnx.NodeProto:
    """A Constant node for function bodies: a scalar, or a 1-D tensor when `value` is a list."""
    values = value if isinstance(value, list) else [value]
    shape = [len(values)] if isinstance(value, list) else []
    return helper.make_node("Constant", [], [name], value=helper.make_tensor(name, dtype, shape, values))


def _attribute_constant(output: str, attribute: str, kind: int) -> onnx.NodeProto:
    """A Constant whose value is the calling node's attribute (a function's ref_attr_name)."""
    node = helper.make_node("Constant", [], [output])
    field = "value_int" if kind == onnx.AttributeProto.INT else "value_float"
    node.attribute.append(onnx.AttributeProto(name=field, ref_attr_name=attribute, type=kind))
    return node


def _fixed_emitter(nodes: list[onnx.NodeProto]) -> NodeEmitter:
    """An emitter for function bodies: the hint is the output's name (bodies have their own namespace)."""

    def emit(op_type: str, inputs: list[str], out: str, **attrs: Any) -> str:
        nodes.append(helper.make_node(op_type, inputs, [out], **attrs))
        return out

    return emit


def router_function(score_name: str) -> onnx.FunctionProto:
    """Reference body of ExpertChoiceRouter for one score function.

    A function body cannot branch on a string attribute, and every MoE layer of a model shares the score function,
    so the body is specialised per model while the node still carries `score_function` for plugins and lowering.
    """
    scores_fn = score_function(score_name)
    n = helper.make_node
    head: list[onnx.NodeProto] = []
    emit = _fixed_emitter(head)
    scores_fn.emit(emit, "router_logits")
    capacity_nodes: list[onnx.NodeProto] = []
    capacity = emit_capacity(_fixed_emitter(capacity_nodes), "num", "den", "tokens", "experts", "one")
    nodes = [
        *head,
        n("Shape", ["router_logits"], ["batch_tokens"], start=0, end=2),
        n("Shape", ["router_logits"], ["tokens"], start=1, end=2),
        n("Shape", ["router_logits"], ["experts"], start=2, end=3),
        _attribute_constant("num", ATTR_CAPACITY_NUMERATOR, onnx.AttributeProto.INT),
        _attribute_constant("den", ATTR_CAPACITY_DENOMINATOR, onnx.AttributeProto.INT),
        constant_node("one", [1]),
        constant_node("flat_shape", [0, -1]),
        *capacity_nodes,
        n("Transpose", ["scores"], ["affinity"], perm=[0, 2, 1]),
        n("TopK", ["affinity", capacity], ["top_values", "token_indices"], axis=-1, largest=1, sorted=1),
        n("Reshape", ["token_indices", "flat_shape"], ["flat_indices"]),
        n("Reshape", ["top_values", "flat_shape"], ["flat_values"]),
        n("ConstantOfShape", ["batch_tokens"], ["zeros"], value=helper.make_tensor("z", TensorProto.FLOAT, [1], [0.0])),
        n("ScatterElements", ["zeros", "flat_indices", "flat_values"], ["token_sums"], axis=1, reduction="add"),
        n("GatherElements", ["token_sums", "flat_indices"], ["chosen_sums"], axis=1),
        constant_node("eps", GATING_EPS, TensorProto.FLOAT),
        n("Add", ["chosen_sums", "eps"], ["denominator"]),
        n("Div", ["flat_values", "denominator"], ["normalized"]),
        _attribute_constant("route_scale_value", ATTR_ROUTE_SCALE, onnx.AttributeProto.FLOAT),
        n("Mul", ["normalized", "route_scale_value"], ["scaled"]),
        n("Shape", ["top_values"], ["gating_shape"]),
        n("Reshape", ["scaled", "gating_shape"], ["gating"]),
    ]
    return helper.make_function(
        DOMAIN,
        ROUTER_OP,
        inputs=["router_logits"],
        outputs=["token_indices", "gating"],
        nodes=nodes,
        opset_imports=[helper.make_opsetid("", ONNX_OPSET)],
        attributes=[ATTR_CAPACITY_NUMERATOR, ATTR_CAPACITY_DENOMINATOR, ATTR_SCORE_FUNCTION, ATTR_ROUTE_SCALE],
    )


def emit_router(
    g: GraphSink, router_logits: str, capacity: tuple[int, int], score_name: str, route_scale: float
) -> tuple[str, str]:
    """Emit a router node (registering its function body); returns (token_indices, gating)."""
    if ROUTER_OP not in g.functions:
        g.add_function(router_function(score_name))
    indices, gating = g.op(
        ROUTER_OP,
        [router_logits],
        n_out=2,
        domain=DOMAIN,
        hint="router",
        **{
            ATTR_CAPACITY_NUMERATOR: capacity[0],
            ATTR_CAPACITY_DENOMINATOR: capacity[1],
            ATTR_SCORE_FUNCTION: score_name,
            ATTR_ROUTE_SCALE: float(route_scale),
        },
    )
    return indices, gating


# ---- the native lowering ----------------------------------------------------------------------------------------


def _i64(*values: int) -> np.ndarray:
    return np.array(values, dtype=np.int64)


def router_attributes(node: onnx.NodeProto) -> tuple[int, int, str, float]:
    """(capacity numerator, denominator, score function, route scale) of a router node, validated."""
    a = {attr.name: helper.get_attribute_value(attr) for attr in node.attribute}
    num, den = int(a[ATTR_CAPACITY_NUMERATOR]), int(a[ATTR_CAPACITY_DENOMINATOR])
    name = a.get(ATTR_SCORE_FUNCTION, SCORE_FUNCTION_NAMES[0].encode())
    name = name.decode() if isinstance(name, bytes) else str(name)
    if num <= 0 or den <= 0:
        raise ValueError(f"{node.name}: capacity_numerator/denominator must be positive, got {num}/{den}")
    score_function(name)
    return num, den, name, float(a.get(ATTR_ROUTE_SCALE, 1.0))


def lower_router(node: onnx.NodeProto, em: NodeSink) -> None:
    """ExpertChoiceRouter as layers every TensorRT parser builds (exact with respect to the reference body: the same
    TopK; the per-token gating sums add the same terms in another order).

    TensorRT rejects ScatterElements with reduction="add", so the per-token sums go through a [B, E, S] selection mask
    written by ScatterElements without reduction (the C tokens of one expert are distinct, so no write collides)."""
    num, den, name, route_scale = router_attributes(node)
    logits = node.input[0]
    token_indices, gating = node.output[0], node.output[1]

    # Scores in float32 whatever the logits' dtype: the router stays high precision (docs/contract.md).
    x = em.one("Cast", [logits], "logits_f32", to=TensorProto.FLOAT)
    scores = score_function(name).emit(em.one, x)
    scores_t = em.one("Transpose", [scores], "scores_t", perm=[0, 2, 1])  # [B, E, S]

    shape = em.one("Shape", [logits], "logits_shape")
    s = em.one("Gather", [shape, em.const(_i64(1), "axis_s")], "S", axis=0)
    e = em.one("Gather", [shape, em.const(_i64(2), "axis_e")], "E", axis=0)
    c = emit_capacity(em.one, em.const(_i64(num), "num"), em.const(_i64(den), "den"), s, e, em.const(_i64(1), "one"))

    values, indices = em.op("TopK", [scores_t, c], 2, "topk", axis=-1, largest=1, sorted=1)  # [B, E, C] each
    em.nodes.append(helper.make_node("Identity", [indices], [token_indices], name=em.name("token_indices")))

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


# ---- forced routing (parity) ------------------------------------------------------------------------------------

FORCED_DOMAIN = "nucleus.parity"
FORCED_ROUTER_OP = f"{ROUTER_OP}Forced"


def forced_router_function(router: onnx.FunctionProto) -> onnx.FunctionProto:
    """The router body with its TopK's selection replaced by a `forced_indices` input; TopK's own indices become a
    third output `own_indices`. Gating then follows the op's one definition for whatever selection is forced. It lives
    in its own domain, so a MoE lowering (which rewrites only `nucleus` ops) leaves it in place."""
    topk = [n for n in router.node if n.op_type == "TopK"]
    if len(topk) != 1:
        raise ValueError(f"{ROUTER_OP} body has {len(topk)} TopK nodes; forced routing needs exactly one")
    values, indices = topk[0].output[0], topk[0].output[1]
    affinity = topk[0].input[0]
    nodes = []
    for node in router.node:
        if node is topk[0]:
            own = copy.deepcopy(node)
            own.output[0], own.output[1] = "own_values", "own_indices"
            nodes += [
                own,
                helper.make_node("GatherElements", [affinity, "forced_indices"], [values], axis=-1),
                helper.make_node("Identity", ["forced_indices"], [indices]),
            ]
        else:
            nodes.append(node)
    return helper.make_function(
        FORCED_DOMAIN,
        FORCED_ROUTER_OP,
        inputs=[*router.input, "forced_indices"],
        outputs=[*router.output, "own_indices"],
        nodes=nodes,
        opset_imports=list(router.opset_import),
        attributes=list(router.attribute),
    )


# ---- the reference (diffusers) ----------------------------------------------------------------------------------


def reference_scores(logits: torch.Tensor, score_name: str) -> torch.Tensor:
    """The scores diffusers' topk sees: computed in float32, rounded to the logits' dtype."""
    return score_function(score_name).torch_fn(logits.float()).to(logits.dtype)


def reference_selection(scores: torch.Tensor, capacity: int) -> np.ndarray:
    """[B, E, C] token indices diffusers chooses from [B, S, E] scores."""
    import torch

    return torch.topk(scores.transpose(1, 2), k=capacity, dim=-1).indices.cpu().numpy()


def score_bounds(
    gate_input: np.ndarray,
    gate_weight: np.ndarray,
    scores: np.ndarray,
    score_name: str,
    input_error: np.ndarray | None = None,
) -> np.ndarray:
    """Per (batch row, token, expert) bound on a score's float32 rounding error, none of its parts tuned:
    - the gate's own reduction order: logits are K-term dot products, and two summation orders differ by at most
      gamma_K * sum_i |x_i| |w_i| (Higham, Accuracy and Stability of Numerical Algorithms, 3.1);
    - the gate input's measured difference between graph and reference: sum_i |dx_i| |w_i|;
    - the score function, propagated and its own rounding (ScoreFunction.bound).

    Args:
        gate_input: [B, S, K] router input of the reference.
        gate_weight: [E, K] router weight.
        scores: [B, S, E] the reference's scores.
        score_name: the score function.
        input_error: [B, S, K] |graph's router input - reference's|, when measured.

    Returns:
        [B, S, E] float64 bounds.
    """
    abs_w = np.abs(gate_weight.astype(np.float64)).T
    logit_bound = gamma(gate_input.shape[-1]) * (np.abs(gate_input.astype(np.float64)) @ abs_w)
    if input_error is not None:
        logit_bound += np.abs(input_error.astype(np.float64)) @ abs_w
    return score_function(score_name).bound(scores.astype(np.float64), logit_bound)
