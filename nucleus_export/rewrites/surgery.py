"""Primitives of graph rewrites: a writer of uniquely named nodes, node replacement, dropping function bodies."""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterable
from typing import Any

import numpy as np
import onnx
from nucleus_runtime.contract import DOMAIN
from onnx import helper, numpy_helper


class NodeWriter:
    """Creates uniquely named nodes and constants for one replaced node (the moe lowerings' NodeSink)."""

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

    def op(self, op_type: str, inputs: list[str], n_out: int = 1, hint: str | None = None, **attrs: Any) -> list[str]:
        outs = [self.name(f"{hint or op_type}_out{i}") for i in range(n_out)]
        self.nodes.append(helper.make_node(op_type, inputs, outs, name=self.name(hint or op_type), **attrs))
        return outs

    def one(self, op_type: str, inputs: list[str], hint: str | None = None, **attrs: Any) -> str:
        return self.op(op_type, inputs, 1, hint, **attrs)[0]

    def const(self, value: np.ndarray, hint: str) -> str:
        # Constant nodes rather than initializers: the rewrite stays local to the node list.
        out = self.name(hint)
        self.nodes.append(
            helper.make_node("Constant", [], [out], name=self.name(hint + "_node"), value=numpy_helper.from_array(value))
        )
        return out


# Replaces one node: (the node, a writer to emit its replacement into).
Replacement = Callable[[onnx.NodeProto, NodeWriter], None]


def replace_nodes(model: onnx.ModelProto, replace: dict[str, Replacement]) -> onnx.ModelProto:
    """A copy of `model` whose `nucleus`-domain nodes of the given op types are replaced by what `replace` emits."""
    out = copy.deepcopy(model)
    graph = out.graph
    taken = {n.name for n in graph.node} | {o for n in graph.node for o in n.output} | {i.name for i in graph.initializer}
    taken |= {i.name for i in graph.input} | {o.name for o in graph.output}
    new_nodes: list[onnx.NodeProto] = []
    for i, node in enumerate(graph.node):
        fn = replace.get(node.op_type) if node.domain == DOMAIN else None
        if fn is None:
            new_nodes.append(node)
            continue
        writer = NodeWriter(node.name or f"{node.op_type}_{i}", taken)
        fn(node, writer)
        new_nodes.extend(writer.nodes)
    del graph.node[:]
    graph.node.extend(new_nodes)
    return out


def drop_functions(model: onnx.ModelProto, ops: Iterable[str]) -> None:
    """Remove the `nucleus` function bodies of `ops` (in place), and the domain's opset once nothing uses it."""
    ops = set(ops)
    keep = [f for f in model.functions if not (f.domain == DOMAIN and f.name in ops)]
    del model.functions[:]
    model.functions.extend(keep)
    used = {n.domain for n in model.graph.node} | {n.domain for f in model.functions for n in f.node}
    if DOMAIN not in used:
        keep_ops = [o for o in model.opset_import if o.domain != DOMAIN]
        del model.opset_import[:]
        model.opset_import.extend(keep_ops)


def set_attribute(node: onnx.NodeProto, name: str, value: str) -> None:
    """Set a string attribute, replacing a stale value (e.g. a graph prepared for another namespace)."""
    keep = [a for a in node.attribute if a.name != name]
    del node.attribute[:]
    node.attribute.extend([*keep, helper.make_attribute(name, value)])
