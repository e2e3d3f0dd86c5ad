"""bf16 emulation for quality reports on the CPU.

ONNX Runtime's CPU provider has no bfloat16 MatMul (nor bf16 QuantizeLinear), so a bf16 or bf16+FP8 bundle graph
cannot run there as is. `emulate_bf16_in_fp32` rewrites it into a float32 graph that rounds every tensor that was
bfloat16 to bfloat16 right where it is produced (Cast to BFLOAT16 then back to FLOAT), with bf16 initializers and
constants widened exactly to float32. Each op then computes in float32 and stores its result rounded to bf16, which
is what a GPU bf16 kernel does for GEMMs (fp32 accumulation, one rounding) and elementwise ops. The quality report
applies it to the graph after MoE lowering (rewrites.as_built.engine_graph), so the combine's rounding is that of the
native layers TensorRT builds (e.g. each gated contribution rounded to bf16), whatever formulation the lowering
chose; inside a function body (not inlined) only the node's outputs are rounded. It remains an estimate where a
GPU op accumulates in bf16 across additions. Reports label it "bf16 emulated on CPU".
"""

from __future__ import annotations

import copy

import ml_dtypes
import numpy as np
import onnx
import onnx.inliner
from onnx import TensorProto, helper, numpy_helper

BF16 = TensorProto.BFLOAT16
F32 = TensorProto.FLOAT
EMULATION_LABEL = "bf16 emulated on CPU (float32 math, bf16 rounding of every bf16 tensor)"


def has_bf16(model: onnx.ModelProto) -> bool:
    """Whether a graph holds bfloat16 weights or casts to bfloat16 (what ONNX Runtime's CPU provider cannot run)."""
    if any(i.data_type == BF16 for i in model.graph.initializer):
        return True
    return any(a.name == "to" and a.i == BF16 for n in model.graph.node for a in n.attribute)


def _widen(tensor: TensorProto) -> TensorProto:
    """A bf16 TensorProto as an exactly equal float32 one (same name; external data is loaded if present)."""
    array = numpy_helper.to_array(tensor)  # ml_dtypes.bfloat16
    out = numpy_helper.from_array(np.asarray(array, dtype=ml_dtypes.bfloat16).astype(np.float32), tensor.name)
    return out


def _bf16_values(model: onnx.ModelProto) -> set[str]:
    inferred = onnx.shape_inference.infer_shapes(model, check_type=False, strict_mode=False)
    names = set()
    for value in list(inferred.graph.value_info) + list(inferred.graph.output) + list(inferred.graph.input):
        if value.type.tensor_type.elem_type == BF16:
            names.add(value.name)
    return names


def emulate_bf16_in_fp32(model: onnx.ModelProto, keep_weights: bool = False) -> onnx.ModelProto:
    """Rewrite a graph holding bfloat16 tensors into a float32 graph that rounds them to bf16 (see module docstring).

    Graph inputs and outputs typed bf16 become float32 (inputs are rounded to bf16 on entry). The nucleus custom
    nodes stay (their bodies are dtype-generic through CastLike, and parity reads the router outputs off them); their
    bf16 outputs are rounded like any other.

    Args:
        model: a bundle graph with its weights loaded, or any graph with `keep_weights`; not modified.
        keep_weights: leave bf16 initializers as they are (loaded or external data, never read here) and widen each
            with a Cast to float32 where the graph starts: the same exact values, and a graph whose weights stay
            in the bundle's files (ONNX Runtime reads and folds them when it opens a session).

    Returns:
        A float32 graph runnable by ONNX Runtime on the CPU. A graph without bf16 comes back unchanged.
    """
    model = copy.deepcopy(model)
    bf16 = _bf16_values(model)
    graph = model.graph

    rename: dict[str, str] = {}
    entry_nodes: list[onnx.NodeProto] = []
    for i, init in enumerate(graph.initializer):
        if init.data_type != BF16:
            continue
        if keep_weights:
            widened = f"{init.name}__f32"
            entry_nodes.append(helper.make_node("Cast", [init.name], [widened], to=F32, name=f"{init.name}/widen_f32"))
            rename[init.name] = widened
        else:
            graph.initializer[i].CopyFrom(_widen(init))
    for value in graph.input:
        if value.type.tensor_type.elem_type == BF16:
            value.type.tensor_type.elem_type = F32
            rounded = f"{value.name}__bf16_rounded"
            entry_nodes += _round_pair(value.name, rounded)
            rename[value.name] = rounded
    for value in graph.output:
        if value.type.tensor_type.elem_type == BF16:
            value.type.tensor_type.elem_type = F32
    init_names = {i.name for i in graph.initializer}

    new_nodes: list[onnx.NodeProto] = list(entry_nodes)
    for node in graph.node:
        node = copy.deepcopy(node)
        for k, name in enumerate(node.input):
            if name in rename:
                node.input[k] = rename[name]
        _widen_attributes(node)
        rounding: list[onnx.NodeProto] = []
        for k, name in enumerate(node.output):
            if name and name in bf16 and name not in init_names:
                raw = f"{name}__f32"
                node.output[k] = raw
                rounding += _round_pair(raw, name)
        new_nodes.append(node)
        new_nodes.extend(rounding)
    del graph.node[:]
    graph.node.extend(new_nodes)
    # Intermediate value_info still says bfloat16 for renamed tensors: drop it, ORT infers types itself.
    del graph.value_info[:]
    return model


def _round_pair(src: str, dst: str) -> list[onnx.NodeProto]:
    mid = f"{dst}__bf16"
    return [
        helper.make_node("Cast", [src], [mid], to=BF16, name=f"{dst}/round_bf16"),
        helper.make_node("Cast", [mid], [dst], to=F32, name=f"{dst}/widen_f32"),
    ]


def _widen_attributes(node: onnx.NodeProto) -> None:
    """Retarget attributes that create bf16 values: Cast(to=bf16), Constant/ConstantOfShape with bf16 tensors."""
    for attr in node.attribute:
        if node.op_type == "Cast" and attr.name == "to" and attr.i == BF16:
            attr.i = F32  # the rounding pair after the node restores the bf16 rounding
        elif attr.type == onnx.AttributeProto.TENSOR and attr.t.data_type == BF16:
            attr.t.CopyFrom(_widen(attr.t))
