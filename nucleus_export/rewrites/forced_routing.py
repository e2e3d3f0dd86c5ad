"""Graph variants that parity runs: pure rewrites of a denoiser graph (onnx.ModelProto in, new ModelProto out).

- `with_router_outputs`: the router selections of every MoE block become extra graph outputs (routing agreement).
- `with_forced_routing`: every ExpertChoiceRouter takes its token selection from a new graph input instead of its
  own top-C, and reports what it would have chosen as an extra output. Run with the reference's selections, the
  graph computes the same function as the reference whatever near-tie flips its own float32 arithmetic would cause,
  so its error measures everything except routing; the extra outputs give, per block, the graph's own choice on the
  reference's upstream state (a flip there cannot be the echo of a flip in an earlier block).

The forced router is derived from the graph's own ExpertChoiceRouter function body
(nucleus_export.moe.expert_choice.forced_router_function), so gating follows the one definition of the op.
"""

from __future__ import annotations

import copy
import dataclasses

import onnx
from nucleus_runtime.contract import DOMAIN, ROUTER_OP
from onnx import TensorProto, helper

from nucleus_export.moe.expert_choice import FORCED_DOMAIN, FORCED_ROUTER_OP, forced_router_function

FORCED_INPUT_PREFIX = "forced_token_indices"


@dataclasses.dataclass(frozen=True)
class RoutingNames:
    """Tensor names of a graph variant: per MoE block (in block order) the selection the graph used or would use."""

    selections: list[str]
    forced_inputs: list[str] = dataclasses.field(default_factory=list)
    gate_inputs: list[str] = dataclasses.field(default_factory=list)  # the router's input features (float32)


def router_nodes(model: onnx.ModelProto) -> list[onnx.NodeProto]:
    return [n for n in model.graph.node if n.domain == DOMAIN and n.op_type == ROUTER_OP]


def expose(model: onnx.ModelProto, names: list[str]) -> onnx.ModelProto:
    """Copy with the given int64 tensors added as graph outputs (they must exist under these names)."""
    out = copy.deepcopy(model)
    _add_int64_outputs(out, names)
    return out


def _add_int64_outputs(model: onnx.ModelProto, names: list[str]) -> None:
    present = {o.name for o in model.graph.output}
    model.graph.output.extend(
        helper.make_tensor_value_info(name, TensorProto.INT64, None) for name in names if name not in present
    )


def with_router_outputs(model: onnx.ModelProto) -> tuple[onnx.ModelProto, list[str]]:
    """Copy of a denoiser graph whose router selections ([B, E, C] token indices per MoE block) are graph outputs.

    The names are those of the router nodes' first outputs; a MoE lowering keeps them (it writes the lowered
    selection under the same name), so the names taken before lowering can be exposed after it with `expose`."""
    names = [node.output[0] for node in router_nodes(model)]
    return expose(model, names), names


def with_forced_routing(model: onnx.ModelProto) -> tuple[onnx.ModelProto, RoutingNames]:
    """Copy of an exported denoiser graph (router function bodies present) whose routers take their selections from
    graph inputs `forced_token_indices.<k>` ([B, E, C] int64, k = MoE block in order) and output their own choice.

    Returns:
        The model and its names: `forced_inputs` to feed, `selections` the graph's own choice per block,
        `gate_inputs` the router input features per block (extra float32 outputs, to measure their error).
    """
    out = copy.deepcopy(model)
    if not router_nodes(out):
        return out, RoutingNames([], [], [])  # a model without MoE blocks: nothing to force
    bodies = [f for f in out.functions if f.domain == DOMAIN and f.name == ROUTER_OP]
    if not bodies:
        raise ValueError(f"the graph has no {ROUTER_OP} function body to derive forced routing from")
    out.functions.append(forced_router_function(bodies[0]))
    if not any(o.domain == FORCED_DOMAIN for o in out.opset_import):
        out.opset_import.append(helper.make_opsetid(FORCED_DOMAIN, 1))
    names = RoutingNames([], [], [])
    producers = {o: n for n in out.graph.node for o in n.output}
    for k, node in enumerate(router_nodes(out)):
        gate = producers.get(node.input[0])
        if gate is None or gate.op_type != "MatMul":
            raise ValueError(f"router {node.name} is not fed by a gate MatMul; cannot read its input features")
        names.gate_inputs.append(gate.input[0])
        forced = f"{FORCED_INPUT_PREFIX}.{k}"
        own = f"{node.output[0]}__own"
        out.graph.input.append(helper.make_tensor_value_info(forced, TensorProto.INT64, ["batch", None, None]))
        node.domain, node.op_type = FORCED_DOMAIN, FORCED_ROUTER_OP
        node.input.append(forced)
        node.output.append(own)
        names.forced_inputs.append(forced)
        names.selections.append(own)
    _add_int64_outputs(out, names.selections)  # `out` is this function's own copy already
    out.graph.output.extend(helper.make_tensor_value_info(x, TensorProto.FLOAT, None) for x in names.gate_inputs)
    return out, names
