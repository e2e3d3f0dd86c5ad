"""Attention masks as TensorRT takes them."""

from __future__ import annotations

import copy

import onnx


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
