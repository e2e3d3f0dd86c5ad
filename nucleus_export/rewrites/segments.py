"""Denoiser segments: the denoiser graph cut at block boundaries into consecutive pieces, built and run one by one.

A segment is a pure graph rewrite of the exported denoiser.onnx: the nodes between two block-boundary tensors (the
first segment also holds everything before block 0, the last everything after the last block), with
- inputs: the graph inputs it reads plus the tensors of earlier segments it needs (the residual stream, the time
  embedding, ...), each with a type whose dims are static or profile dims (batch, image_tokens, text_len);
- a tensor whose shape has another dim (the attention bias over image + text tokens) or that is an integer tensor
  is never passed between segments: its weight-free producers are recomputed in the segment that needs it;
- `text_kv` sliced to the segment's blocks: the input is [n, 2, B, T, Hkv, Dh] for its n blocks and each per-block
  Gather index is rebased, so a runtime passes `text_kv[first:last]` (on the device: a pointer offset, no copy);
- initializers that reference the SAME external data file as the full graph (no weight is copied on disk).

Why segments: the builder's peak memory grows with the weights of the network it builds (measured in
benchmarks/bench_build_memory.py), so a denoiser in k segments is built with about 1/k of that peak; the runtime
chains the engines with every intermediate on the device.

Block boundaries are recorded by the exporter in the graph's metadata (contract.BLOCK_OUTPUTS_METADATA): tensor
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
    TEXT_LEN_DIM,
    DENOISER_GRAPH,
    TEXT_KV,
    segment_name,
)
from onnx import TensorProto, helper, numpy_helper

from nucleus_export.errors import NucleusExportError

PROFILE_DIMS = (BATCH_DIM, IMAGE_TOKENS_DIM, TEXT_LEN_DIM)
_FLOAT_TYPES = (TensorProto.FLOAT, TensorProto.FLOAT16, TensorProto.BFLOAT16)


@dataclasses.dataclass(frozen=True)
class Segment:
    """One piece of the denoiser: blocks [first, last), its graph inputs/outputs and the text_kv layers it reads."""

    index: int
    graph: str
    blocks: tuple[int, int]
    inputs: list[str]
    outputs: list[str]

    @property
    def name(self) -> str:
        return segment_name(self.graph, self.index)


def block_outputs(model: onnx.ModelProto) -> list[str]:
    """The residual-stream tensor after each block, as the exporter recorded it."""
    for prop in model.metadata_props:
        if prop.key == BLOCK_OUTPUTS_METADATA:
            return list(json.loads(prop.value))
    raise NucleusExportError(
        f"the denoiser graph has no '{BLOCK_OUTPUTS_METADATA}' metadata, so it cannot be cut into segments.",
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


def split_denoiser(model: onnx.ModelProto, groups: Sequence[tuple[int, int]], graph: str = DENOISER_GRAPH) -> list[tuple[onnx.ModelProto, Segment]]:
    """Cut a denoiser graph (loaded without external data) into segment graphs, one per block group.

    Args:
        model: the exported denoiser (its initializers may reference external data; nothing is loaded).
        groups: consecutive block ranges [first, last) covering all blocks in order.
        graph: graph name for segment names.

    Returns:
        (segment model, Segment) in execution order. Each model's external initializers keep their location, so
        saved next to the full graph they read the same data file.
    """
    outputs_per_block = block_outputs(model)
    num_blocks = len(outputs_per_block)
    if not groups or groups[0][0] != 0 or groups[-1][1] != num_blocks or any(
        a[1] != b[0] or a[0] >= a[1] for a, b in zip(groups, groups[1:])
    ) or groups[-1][0] >= groups[-1][1]:
        raise NucleusExportError(f"segment groups {list(groups)} do not cover blocks 0..{num_blocks - 1} in order.")
    nodes = list(model.graph.node)
    producer = {out: i for i, node in enumerate(nodes) for out in node.output if out}
    inferred = onnx.shape_inference.infer_shapes(model, data_prop=True)
    types = {v.name: v for v in list(inferred.graph.value_info) + list(inferred.graph.input) + list(inferred.graph.output)}
    initializers = {init.name: init for init in model.graph.initializer}
    graph_inputs = {v.name: v for v in model.graph.input}
    graph_outputs = [v.name for v in model.graph.output]

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
                            "report this as a bug (the denoiser cannot be cut at this block).",
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
        outs = graph_outputs if k == len(members) - 1 else list(dict.fromkeys(n for n in produced if n in later))
        seg = Segment(k, graph, (first, last), inputs[k], outs)
        segments.append((_segment_model(model, nodes, member, seg, types, initializers, graph_inputs), seg))
    return segments


def _segment_model(
    model: onnx.ModelProto,
    nodes: list[onnx.NodeProto],
    member: list[int],
    seg: Segment,
    types: dict[str, onnx.ValueInfoProto],
    initializers: dict[str, TensorProto],
    graph_inputs: dict[str, onnx.ValueInfoProto],
) -> onnx.ModelProto:
    first, last = seg.blocks
    seg_nodes = [copy.deepcopy(nodes[i]) for i in member]
    new_inits: dict[str, TensorProto] = {}
    # Rebase the per-block Gather on text_kv to the slice this segment receives.
    for node in seg_nodes:
        if TEXT_KV in node.input:
            index = node.input[1] if node.op_type == "Gather" and len(node.input) == 2 else None
            if index not in initializers or node.input[0] != TEXT_KV:
                raise NucleusExportError(
                    f"node {node.name} reads text_kv other than by a constant per-block Gather.",
                    "report this as a bug (the denoiser cannot be cut into segments).",
                )
            layer = int(numpy_helper.to_array(initializers[index]))
            if not first <= layer < last:
                raise NucleusExportError(f"segment of blocks {first}..{last - 1} reads text_kv layer {layer}.")
            name = f"{TEXT_KV}_layer_{layer - first}"
            new_inits[name] = numpy_helper.from_array(np.array(layer - first, dtype=np.int64), name)
            node.input[1] = name
    used = {n for node in seg_nodes for n in node.input if n}
    inits = [initializers[n] for n in initializers if n in used] + list(new_inits.values())

    def value_info(name: str) -> onnx.ValueInfoProto:
        if name == TEXT_KV:
            full = graph_inputs[TEXT_KV]
            info = copy.deepcopy(full)
            info.type.tensor_type.shape.dim[0].dim_value = last - first
            return info
        if name in graph_inputs:
            return copy.deepcopy(graph_inputs[name])
        return copy.deepcopy(types[name])

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


def block_weight_bytes(model: onnx.ModelProto) -> tuple[list[int], int]:
    """Weight bytes per block (initializers first used in that block's node range) and of the rest (pre/post)."""
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
