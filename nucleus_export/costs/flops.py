"""FLOPs and bytes of a built graph by op class at concrete shapes, and the model's intrinsic FLOPs.

The graph side walks the ONNX node list once: ONNX's per-node shape inference gives every tensor's shape, and the
small integer tensors that shape computations produce (Shape, Concat, Div, Max, Range, ...) are evaluated with the
ONNX reference runtime, so data-dependent sizes such as TopK's K (the expert capacity) come out exact. No weights
are loaded and no float tensor is computed: this runs on a real-size graph in seconds.

Counting rules: MatMul 2*M*K*N per batch matrix; Attention 4*B*Hq*S*(S+T)*D (scores and context); every other op
one FLOP per output element. Bytes: every node reads its inputs and writes its outputs once (an upper bound that
ignores the fusion TensorRT does, which mostly removes "other" traffic), except gathers and slices, which read
what they select, and scatters, counted in place (the rows they write), as engines/cost.py models the chain.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper
from onnx.reference import ReferenceEvaluator

CLASSES = ("attention", "projections", "dense and shared MLP", "routed experts", "router", "combine", "other")
GEMM_CLASSES = ("attention", "projections", "dense and shared MLP", "routed experts", "router", "combine")
# Small integer results are evaluated (shape arithmetic); larger ones only typed.
_MAX_EVALUATED = 1 << 16
_INT_TYPES = {TensorProto.INT64, TensorProto.INT32, TensorProto.BOOL}


@dataclasses.dataclass
class OpClassCost:
    """GEMM and attention FLOPs (tensor-core work), other FLOPs (elementwise, reductions), bytes, nodes."""

    gemm_flops: float = 0.0
    other_flops: float = 0.0
    bytes: float = 0.0
    nodes: int = 0


def classify(node: onnx.NodeProto) -> str:
    """Op class of a node from the module path and hints the graph builders put into node names."""
    name = node.name
    if "/combine" in name:
        return "combine"
    if "/router" in name or ".img_mlp.gate" in name:
        return "router"
    if node.op_type == "Attention":
        return "attention"
    if ".img_mlp.experts." in name or "/dispatch" in name:
        return "routed experts"
    if ".img_mlp.shared_expert." in name or ".img_mlp.net." in name:
        return "dense and shared MLP" if node.op_type == "MatMul" else "other"
    if node.op_type == "MatMul":
        return "projections"
    return "other"


def _elem_bytes(elem_type: int) -> int:
    return int(helper.tensor_dtype_to_np_dtype(elem_type).itemsize) if elem_type else 4


def _shape(t: onnx.TypeProto) -> list[int] | None:
    dims = t.tensor_type.shape.dim
    if not t.tensor_type.HasField("shape") or any(not d.HasField("dim_value") for d in dims):
        return None
    return [d.dim_value for d in dims]


def _tensor_type(elem_type: int, shape: list[int]) -> onnx.TypeProto:
    return helper.make_tensor_type_proto(elem_type, shape)


def graph_cost(model: onnx.ModelProto, input_shapes: Mapping[str, list[int]]) -> dict[str, OpClassCost]:
    """FLOPs, bytes and node count per op class (CLASSES) of `model` with its graph inputs at `input_shapes`.

    Args:
        model: a graph without custom-domain nodes (an engine ONNX), loaded without external data.
        input_shapes: a concrete shape for every graph input.

    Raises:
        ValueError: a tensor's shape stays unknown (a node this counter cannot follow).
    """
    graph = model.graph
    opsets = list(model.opset_import)
    version = {o.domain: o.version for o in opsets}
    types: dict[str, onnx.TypeProto] = {}
    values: dict[str, np.ndarray] = {}
    for init in graph.initializer:
        types[init.name] = _tensor_type(init.data_type, list(init.dims))
        if init.data_type in _INT_TYPES and init.data_location != TensorProto.EXTERNAL:
            values[init.name] = numpy_helper.to_array(init)
    for value in graph.input:
        if value.name not in types:
            types[value.name] = _tensor_type(value.type.tensor_type.elem_type, list(input_shapes[value.name]))
    costs = {c: OpClassCost() for c in CLASSES}
    for node in graph.node:
        known = [i for i in node.input if i]
        if node.op_type == "Shape":  # a shape is known even where the tensor's values are not
            attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
            dims = _shape(types[node.input[0]])
            values[node.output[0]] = np.array(dims[attrs.get("start", 0):attrs.get("end", len(dims))], np.int64)
            types[node.output[0]] = _tensor_type(TensorProto.INT64, [len(values[node.output[0]])])
            costs["other"].nodes += 1
            continue
        if all(i in values for i in known):  # shape arithmetic (and Constant nodes): evaluate
            outputs = _evaluate(node, values, opsets)
            if outputs is not None:
                for name, array in zip(node.output, outputs):
                    values[name] = array
                    types[name] = _tensor_type(helper.np_dtype_to_tensor_dtype(array.dtype), list(array.shape))
                continue
        schema = onnx.defs.get_schema(node.op_type, version.get(node.domain, 1), node.domain)
        data = {i: numpy_helper.from_array(values[i], i) for i in known if i in values}
        inferred = onnx.shape_inference.infer_node_outputs(
            schema, node, {i: types[i] for i in known}, input_data=data, opset_imports=opsets
        )
        for name in node.output:
            if name:
                if name not in inferred or _shape(inferred[name]) is None:
                    raise ValueError(f"cannot infer the shape of {name!r} ({node.op_type} {node.name})")
                types[name] = inferred[name]
        cost = costs[classify(node)]
        flops = _flops(node, types)
        if node.op_type in ("MatMul", "Attention"):
            cost.gemm_flops += flops
        else:
            cost.other_flops += flops
        cost.bytes += _bytes(node, types)
        cost.nodes += 1
    return costs


def _bytes(node: onnx.NodeProto, types: dict[str, onnx.TypeProto]) -> float:
    def size(name: str) -> float:
        return _numel(types[name]) * _elem_bytes(types[name].tensor_type.elem_type)

    if node.op_type in ("ScatterND", "ScatterElements"):
        # In place: indices and updates read, updated rows written (the data tensor is not copied).
        return size(node.input[1]) + 2 * size(node.input[2])
    if node.op_type in ("Gather", "GatherND", "GatherElements", "Slice"):
        # Only the selected elements are read.
        return sum(size(t) for t in node.input[1:] if t) + 2 * sum(size(t) for t in node.output if t)
    return sum(size(t) for t in [*node.input, *node.output] if t)


def _numel(t: onnx.TypeProto) -> int:
    return math.prod(_shape(t) or [0])


def _evaluate(node: onnx.NodeProto, values: dict[str, np.ndarray], opsets) -> list[np.ndarray] | None:
    """Run a node on known small integer inputs; None where the result is not a small integer tensor."""
    try:
        feeds = {i: values[i] for i in node.input if i}
        single = helper.make_model(
            helper.make_graph([node], "n", [helper.make_tensor_value_info(i, TensorProto.UNDEFINED, None) for i in feeds],
                              [helper.make_tensor_value_info(o, TensorProto.UNDEFINED, None) for o in node.output]),
            opset_imports=opsets,
        )
        outputs = ReferenceEvaluator(single).run(None, feeds)
    except Exception:  # noqa: BLE001 - any op the reference runtime cannot run here: fall back to shape inference
        return None
    outputs = [np.asarray(o) for o in outputs]
    if any(o.size > _MAX_EVALUATED or o.dtype.kind not in "iub" for o in outputs):
        return None
    return outputs


def _flops(node: onnx.NodeProto, types: dict[str, onnx.TypeProto]) -> float:
    out = [_shape(types[o]) for o in node.output if o]
    if node.op_type == "MatMul":
        a = _shape(types[node.input[0]])
        return 2.0 * math.prod(out[0]) * a[-1]
    if node.op_type == "Attention":
        q, k = _shape(types[node.input[0]]), _shape(types[node.input[1]])
        # 3-D Q [B, S, Hq*D], K [B, S+T, Hkv*D]: scores Hq*S*(S+T)*D and context the same, times 2 for multiply-add.
        return 4.0 * q[0] * q[1] * q[2] * k[1] if len(q) == 3 else 4.0 * math.prod(q) * k[2]
    return float(sum(math.prod(s) for s in out))


def intrinsic_flops(config, shapes: Mapping[str, tuple[int, ...]], batch: int, tokens: int, text_len: int) -> dict[str, float]:
    """GEMM and attention FLOPs one denoiser step must do, by op class: every image-side weight times the rows it
    multiplies (B*S tokens, B rows for the timestep modulation, B*C rows per routed expert), attention
    4*B*Hq*S*(S+T)*D. No combine: an index-add needs no multiplications.

    Args:
        config: ModelConfig.
        shapes: parameter shapes (model.checkpoint.expected_parameter_shapes).
    """
    text_side = ("txt_norm", "encoder_proj", "add_k_proj", "add_v_proj", "add_q_proj", "norm_added")
    out = {c: 0.0 for c in CLASSES}
    for name, shape in shapes.items():
        if not name.endswith((".weight", "gate_up_proj", "down_proj")) or len(shape) < 2 or any(t in name for t in text_side):
            continue
        numel = math.prod(shape)
        if ".img_mlp.experts." in name:
            idx = int(name.split(".")[1])
            out["routed experts"] += 2.0 * batch * config.capacity(idx, tokens) * numel
        elif ".img_mlp.gate." in name:
            out["router"] += 2.0 * batch * tokens * numel
        elif ".img_mlp." in name:
            out["dense and shared MLP"] += 2.0 * batch * tokens * numel
        elif ".img_mod." in name or name.startswith(("norm_out.", "time_text_embed.")):
            out["projections"] += 2.0 * batch * numel
        else:
            out["projections"] += 2.0 * batch * tokens * numel
    out["attention"] = 4.0 * batch * config.num_attention_heads * tokens * (tokens + text_len) * config.attention_head_dim * config.num_layers
    return out
