"""Segments: a graph with per-layer structure (the denoiser's blocks, the text encoder's decoder layers) cut at layer
boundaries into consecutive pieces, built and run one by one.

A segment is a pure graph rewrite of the exported graph: the nodes between two layer-boundary tensors (the first
segment also holds everything before layer 0, the last everything after the last layer), with
- inputs: the graph inputs it reads plus the tensors of earlier segments it needs (the residual stream, the time
  embedding, ...), each with a type whose dims are static or profile dims (batch, image_tokens, text_len);
- a tensor whose shape has another dim (an attention bias over image + text tokens or over past + new tokens, rope
  tables of the new tokens' positions) or that is an integer tensor is never passed between segments: its
  weight-free producers are recomputed in the segment that needs it;
- the tensors stacked over all layers on axis 0 (contract.SEGMENT_SLICED_INPUTS / SEGMENT_SLICED_OUTPUTS) sliced to
  the segment's layers: an input such as `text_kv` or `past_key_values` becomes [n, ...] for its n layers and each
  per-layer Gather index is rebased, so a runtime passes `tensor[first:last]` (on the device: a pointer offset, no
  copy); an output such as `key_values` becomes the Concat of the segment's own layers, so a runtime writes each
  segment's piece at offset `first` of one buffer and no stacked tensor travels between segments;
- initializers that reference the SAME external data file as the full graph (no weight is copied on disk).

Why segments: the builder's peak memory grows with the weights of the network it builds (measured in
benchmarks/bench_build_memory.py), so a graph in k segments is built with about 1/k of that peak; the runtime
chains the engines with every intermediate on the device.

Layer boundaries are recorded by the exporter in the graph's metadata (contract.BLOCK_OUTPUTS_METADATA): tensor
names, not a naming convention.
"""

from __future__ import annotations

import copy
import dataclasses
import json
from collections.abc import Sequence

import numpy as np
import onnx
from nucleus_runtime.contract import (
    BATCH_DIM,
    BLOCK_OUTPUTS_METADATA,
    IMAGE_TOKENS_DIM,
    INLINE_TENSOR_MAX_BYTES,
    SEGMENT_SLICED_INPUTS,
    SEGMENT_SLICED_OUTPUTS,
    TEXT_LEN_DIM,
    segment_name,
)
from onnx import TensorProto, helper, numpy_helper

from nucleus_export.errors import NucleusExportError

PROFILE_DIMS = (BATCH_DIM, IMAGE_TOKENS_DIM, TEXT_LEN_DIM)
_FLOAT_TYPES = (TensorProto.FLOAT, TensorProto.FLOAT16, TensorProto.BFLOAT16)


@dataclasses.dataclass(frozen=True)
class Segment:
    """One piece of a graph: layers [first, last) (the blocks of the denoiser), its graph inputs and outputs."""

    index: int
    graph: str
    blocks: tuple[int, int]
    inputs: list[str]
    outputs: list[str]

    @property
    def name(self) -> str:
        return segment_name(self.graph, self.index)


def block_outputs(model: onnx.ModelProto) -> list[str]:
    """The residual-stream tensor after each block or layer, as the exporter recorded it."""
    for prop in model.metadata_props:
        if prop.key == BLOCK_OUTPUTS_METADATA:
            return list(json.loads(prop.value))
    raise NucleusExportError(
        f"the {model.graph.name or 'exported'} graph has no '{BLOCK_OUTPUTS_METADATA}' metadata, so it cannot be cut "
        "into segments.",
        "export the bundle again with this version of nucleus-export.",
    )


def even_groups(num_blocks: int, num_segments: int) -> list[tuple[int, int]]:
    """Split blocks 0..n-1 into `num_segments` consecutive groups of near-equal size."""
    if not 1 <= num_segments <= num_blocks:
        raise NucleusExportError(
            f"cannot cut {num_blocks} blocks into {num_segments} segments.", f"use 1..{num_blocks} segments."
        )
    edges = [round(i * num_blocks / num_segments) for i in range(num_segments + 1)]
    return [(edges[i], edges[i + 1]) for i in range(num_segments)]


def segment_groups(num_blocks: int, num_segments: int | None) -> list[tuple[int, int]] | None:
    """The block groups `--segments N` asks for; None (one graph) for None or 1."""
    return None if num_segments in (None, 1) else even_groups(num_blocks, num_segments)


def _typed(value: onnx.ValueInfoProto | None) -> bool:
    """A tensor that may cross between segments: float, with every dim static or a profile dim."""
    if value is None or not value.type.HasField("tensor_type"):
        return False
    tensor = value.type.tensor_type
    if tensor.elem_type not in _FLOAT_TYPES or not tensor.HasField("shape"):
        return False
    return all(d.dim_param in PROFILE_DIMS if d.dim_param else d.dim_value > 0 for d in tensor.shape.dim)


def _nbytes(init: TensorProto) -> int:
    for entry in init.external_data:
        if entry.key == "length":
            return int(entry.value)
    return len(init.raw_data)


def _stacked_output_parts(nodes: list[onnx.NodeProto], producer: dict[str, int], output: str,
                          num_blocks: int) -> tuple[list[int], list[str]]:
    """The nodes that assemble a stacked graph output (its Identity, if any, and the Concat over axis 0) and the
    per-layer tensors they concatenate, in layer order."""
    chain = [producer[output]]
    while nodes[chain[-1]].op_type == "Identity":
        chain.append(producer[nodes[chain[-1]].input[0]])
    concat = nodes[chain[-1]]
    axis = next((a.i for a in concat.attribute if a.name == "axis"), None)
    if concat.op_type != "Concat" or axis != 0 or len(concat.input) != num_blocks:
        raise NucleusExportError(
            f"graph output '{output}' is not a Concat of one tensor per layer on axis 0, so it cannot be sliced per "
            "segment.",
            "report this as a bug (the graph cannot be cut into segments).",
        )
    return chain, list(concat.input)


def split_segments(model: onnx.ModelProto, groups: Sequence[tuple[int, int]], graph: str) -> list[tuple[onnx.ModelProto, Segment]]:
    """Cut a graph (loaded without external data) into segment graphs, one per layer group.

    Args:
        model: the exported graph (its initializers may reference external data; nothing is loaded).
        groups: consecutive layer ranges [first, last) covering all layers in order.
        graph: the stage (contract.SEGMENT_SLICED_INPUTS names its stacked tensors); names the segments.

    Returns:
        (segment model, Segment) in execution order. Each model's external initializers keep their location, so
        saved next to the full graph they read the same data file.
    """
    if graph not in SEGMENT_SLICED_INPUTS:
        raise NucleusExportError(f"the {graph} stage cannot be cut into segments.",
                                 f"only {', '.join(SEGMENT_SLICED_INPUTS)} have layer boundaries.")
    outputs_per_block = block_outputs(model)
    num_blocks = len(outputs_per_block)
    if not groups or groups[0][0] != 0 or groups[-1][1] != num_blocks or any(
        a[1] != b[0] or a[0] >= a[1] for a, b in zip(groups, groups[1:])
    ) or groups[-1][0] >= groups[-1][1]:
        raise NucleusExportError(f"segment groups {list(groups)} do not cover blocks 0..{num_blocks - 1} in order.")
    all_nodes = list(model.graph.node)
    producer = {out: i for i, node in enumerate(all_nodes) for out in node.output if out}
    # Stacked outputs are assembled per segment from its own layers: the full graph's assembly is left out.
    stacked: dict[str, list[str]] = {}
    assembly: set[int] = set()
    for name in SEGMENT_SLICED_OUTPUTS[graph]:
        chain, stacked[name] = _stacked_output_parts(all_nodes, producer, name, num_blocks)
        assembly.update(chain)
    nodes = [node for i, node in enumerate(all_nodes) if i not in assembly]
    producer = {out: i for i, node in enumerate(nodes) for out in node.output if out}
    inferred = onnx.shape_inference.infer_shapes(model, data_prop=True)
    types = {v.name: v for v in list(inferred.graph.value_info) + list(inferred.graph.input) + list(inferred.graph.output)}
    initializers = {init.name: init for init in model.graph.initializer}
    graph_inputs = {v.name: v for v in model.graph.input}
    graph_outputs = {v.name: v for v in model.graph.output}

    # Node index ranges: segment k ends with the node producing its last block's output; the last takes the rest.
    ends = [producer[outputs_per_block[last - 1]] + 1 for _, last in groups[:-1]] + [len(nodes)]
    starts = [0] + ends[:-1]
    members: list[list[int]] = []
    for k, (lo, hi) in enumerate(zip(starts, ends)):
        own = set(range(lo, hi))
        # Pull back producers of tensors that cannot cross (untyped or integer): recompute them here.
        changed = True
        while changed:
            changed = False
            for i in sorted(own):
                for name in nodes[i].input:
                    if not name or name in initializers or name in graph_inputs:
                        continue
                    j = producer[name]
                    if j in own or _typed(types.get(name)):
                        continue
                    if any(_nbytes(initializers[x]) >= INLINE_TENSOR_MAX_BYTES for x in nodes[j].input if x in initializers):
                        raise NucleusExportError(
                            f"segment {k} needs '{name}', which has no profile-dim shape and is computed from weights.",
                            f"report this as a bug (the {graph} cannot be cut at this layer).",
                        )
                    own.add(j)
                    changed = True
        members.append(sorted(own))

    def needs(k: int) -> list[str]:
        produced = {o for i in members[k] for o in nodes[i].output}
        seen: dict[str, None] = {}
        for i in members[k]:
            for name in nodes[i].input:
                if name and name not in produced and name not in initializers:
                    seen[name] = None
        return list(seen)

    inputs = [needs(k) for k in range(len(members))]
    segments = []
    for k, ((first, last), member) in enumerate(zip(groups, members)):
        produced = [o for i in member for o in nodes[i].output if o]
        later = {n for j in range(k + 1, len(members)) for n in inputs[j]}
        if k == len(members) - 1:
            outs = list(graph_outputs)
        else:
            outs = list(dict.fromkeys(n for n in produced if n in later)) + list(stacked)
        seg = Segment(k, graph, (first, last), inputs[k], outs)
        assemble = [helper.make_node("Concat", parts[first:last], [name], name=f"{seg.name}/{name}", axis=0)
                    for name, parts in stacked.items()]
        seg_nodes = [copy.deepcopy(nodes[i]) for i in member] + assemble
        segments.append((_segment_model(model, seg_nodes, seg, types, initializers, graph_inputs, graph_outputs), seg))
    return segments


def _segment_model(
    model: onnx.ModelProto,
    seg_nodes: list[onnx.NodeProto],
    seg: Segment,
    types: dict[str, onnx.ValueInfoProto],
    initializers: dict[str, TensorProto],
    graph_inputs: dict[str, onnx.ValueInfoProto],
    graph_outputs: dict[str, onnx.ValueInfoProto],
) -> onnx.ModelProto:
    first, last = seg.blocks
    sliced_inputs, sliced_outputs = SEGMENT_SLICED_INPUTS[seg.graph], SEGMENT_SLICED_OUTPUTS[seg.graph]
    new_inits: dict[str, TensorProto] = {}
    # Rebase the per-layer Gathers on a stacked input to the slice this segment receives. Shape nodes may read it
    # too, for a dim other than the sliced one (the text encoder's past length).
    for node in seg_nodes:
        for stacked in (n for n in sliced_inputs if n in node.input):
            if node.op_type == "Shape" and node.input[0] == stacked and _attribute(node, "start", 0) >= 1:
                continue
            index = node.input[1] if node.op_type == "Gather" and len(node.input) == 2 else None
            if index not in initializers or node.input[0] != stacked or _attribute(node, "axis", 0) != 0:
                raise NucleusExportError(
                    f"node {node.name} reads {stacked} other than by a constant per-layer Gather.",
                    f"report this as a bug (the {seg.graph} cannot be cut into segments).",
                )
            layer = int(numpy_helper.to_array(initializers[index]))
            if not first <= layer < last:
                raise NucleusExportError(f"segment of layers {first}..{last - 1} reads {stacked} layer {layer}.")
            name = f"{stacked}_layer_{layer - first}"
            new_inits[name] = numpy_helper.from_array(np.array(layer - first, dtype=np.int64), name)
            node.input[1] = name
    used = {n for node in seg_nodes for n in node.input if n}
    inits = [initializers[n] for n in initializers if n in used] + list(new_inits.values())

    def value_info(name: str) -> onnx.ValueInfoProto:
        full = graph_inputs.get(name) or graph_outputs.get(name)
        info = copy.deepcopy(full if full is not None else types[name])
        if name in sliced_inputs or name in sliced_outputs:
            info.type.tensor_type.shape.dim[0].dim_value = last - first
        return info

    graph = helper.make_graph(
        seg_nodes,
        seg.name,
        [value_info(n) for n in seg.inputs],
        [value_info(n) for n in seg.outputs],
        initializer=inits,
    )
    out = helper.make_model(
        graph,
        opset_imports=list(model.opset_import),
        functions=list(model.functions),
        producer_name=model.producer_name,
        producer_version=model.producer_version,
    )
    out.ir_version = model.ir_version
    return out


def _attribute(node: onnx.NodeProto, name: str, default: int) -> int:
    return next((a.i for a in node.attribute if a.name == name), default)


def block_weight_bytes(model: onnx.ModelProto) -> tuple[list[int], int]:
    """Weight bytes per block or layer (initializers first used in its node range; the first one's count includes
    what precedes it, such as the text encoder's embedding table) and of the rest (after the last one)."""
    outputs_per_block = block_outputs(model)
    nodes = list(model.graph.node)
    producer = {out: i for i, node in enumerate(nodes) for out in node.output if out}
    ends = [producer[name] + 1 for name in outputs_per_block]
    initializers = {init.name: _nbytes(init) for init in model.graph.initializer}
    per_block = [0] * len(ends)
    seen: set[str] = set()
    rest = 0
    for i, node in enumerate(nodes):
        block = next((b for b, end in enumerate(ends) if i < end), None)
        for name in node.input:
            if name in initializers and name not in seen:
                seen.add(name)
                if block is None:
                    rest += initializers[name]
                else:
                    per_block[block] += initializers[name]
    return per_block, rest
