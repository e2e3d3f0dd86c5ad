"""The native combine formulations against MoECombine's reference body (docs/contract.md) in ONNX Runtime."""

from __future__ import annotations

import ml_dtypes
import numpy as np
import onnx
import onnxruntime as ort
import pytest
from nucleus_runtime.contract import COMBINE_OP, DOMAIN, DOMAIN_VERSION
from onnx import TensorProto, helper

from nucleus_runtime.contract import ONNX_OPSET as OPSET

from nucleus_export.moe.combine import FORMULATIONS as COMBINE_FORMULATIONS
from nucleus_export.moe.combine import combine_function
from nucleus_export.rewrites.bf16_emulation import emulate_bf16_in_fp32
from nucleus_export.rewrites.moe_lowering import lower_moe_native

DTYPES = {"fp32": (TensorProto.FLOAT, np.float32), "bf16": (TensorProto.BFLOAT16, ml_dtypes.bfloat16)}


def _combine_model(experts: int, hidden: int, dtype: int) -> onnx.ModelProto:
    """One MoECombine node with its reference body; E and H static, B, S, C dynamic, as in an exported denoiser.
    Inputs and output are float32 (numpy has no bfloat16 ONNX Runtime accepts); casts at the edges give the node
    its compute dtype."""
    nodes = [
        helper.make_node("Cast", ["shared_f32"], ["shared"], to=dtype),
        helper.make_node("Cast", ["expert_output_f32"], ["expert_output"], to=dtype),
        helper.make_node(COMBINE_OP, ["shared", "expert_output", "indices", "gating"], ["out"], domain=DOMAIN,
                         name="combine"),
        helper.make_node("Cast", ["out"], ["out_f32"], to=TensorProto.FLOAT),
    ]
    graph = helper.make_graph(
        nodes, "combine",
        [
            helper.make_tensor_value_info("shared_f32", TensorProto.FLOAT, ["B", "S", hidden]),
            helper.make_tensor_value_info("expert_output_f32", TensorProto.FLOAT, [experts, "B", "C", hidden]),
            helper.make_tensor_value_info("indices", TensorProto.INT64, ["B", experts, "C"]),
            helper.make_tensor_value_info("gating", TensorProto.FLOAT, ["B", experts, "C"]),
        ],
        [helper.make_tensor_value_info("out_f32", TensorProto.FLOAT, ["B", "S", hidden])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET), helper.make_opsetid(DOMAIN, DOMAIN_VERSION)],
                              functions=[combine_function(experts)])
    model.ir_version = 10
    return model


def _feeds(batch: int, tokens: int, experts: int, capacity: int, hidden: int, np_dtype, seed: int) -> dict:
    rng = np.random.default_rng(seed)
    # Per (row, expert) C distinct tokens in the router's order (not sorted), as top-C returns them.
    indices = np.stack([np.stack([rng.permutation(tokens)[:capacity] for _ in range(experts)]) for _ in range(batch)])
    return {
        # Values representable in the compute dtype, so the entry casts are exact.
        "shared_f32": rng.standard_normal((batch, tokens, hidden)).astype(np_dtype).astype(np.float32),
        "expert_output_f32": rng.standard_normal((experts, batch, capacity, hidden)).astype(np_dtype).astype(np.float32),
        "indices": indices.astype(np.int64),
        "gating": rng.uniform(0.1, 2.5, (batch, experts, capacity)).astype(np.float32),
    }


def _run(model: onnx.ModelProto, feeds: dict) -> np.ndarray:
    options = ort.SessionOptions()
    options.log_severity_level = 3
    session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    return session.run(None, feeds)[0]


# (B, S, E, C, H): capacity below, at and above S / E, one expert, C = S (every expert takes every token).
CONFIGS = [(1, 16, 4, 4, 8), (2, 37, 8, 10, 16), (2, 64, 6, 32, 8), (1, 9, 1, 9, 4), (2, 12, 5, 12, 8)]


@pytest.mark.parametrize("combine", sorted(COMBINE_FORMULATIONS))
@pytest.mark.parametrize("config", CONFIGS)
def test_combine_matches_reference_fp32(combine, config):
    batch, tokens, experts, capacity, hidden = config
    model = _combine_model(experts, hidden, TensorProto.FLOAT)
    lowered = lower_moe_native(model, combine, experts)
    onnx.checker.check_model(lowered, full_check=True)
    assert {n.op_type for n in lowered.graph.node}.isdisjoint({COMBINE_OP, "ScatterElements"})
    feeds = _feeds(batch, tokens, experts, capacity, hidden, np.float32, seed=sum(config))
    expected, actual = _run(model, feeds), _run(lowered, feeds)
    if combine == "chain":
        # The contract's order (shared, then experts ascending, in float32): bit for bit the reference.
        np.testing.assert_array_equal(actual, expected)
    else:
        np.testing.assert_allclose(actual, expected, rtol=0, atol=1e-5 * float(np.abs(expected).max()))


@pytest.mark.parametrize("config", CONFIGS[:3])
def test_chain_combine_matches_reference_bf16(config):
    """bf16 rounding of each contribution and one rounding of the float32 sum, exactly as the contract says."""
    batch, tokens, experts, capacity, hidden = config
    model = _combine_model(experts, hidden, TensorProto.BFLOAT16)
    feeds = _feeds(batch, tokens, experts, capacity, hidden, ml_dtypes.bfloat16, seed=sum(config))
    expected = _run(model, feeds)
    np.testing.assert_array_equal(_run(lower_moe_native(model, "chain", experts), feeds), expected)
    # The one-hot GEMM (no bf16 MatMul on ORT's CPU: emulated) rounds the expert sum once more before the shared add.
    onehot = _run(emulate_bf16_in_fp32(lower_moe_native(model, "onehot", experts)), feeds)
    np.testing.assert_allclose(onehot, expected, rtol=0, atol=2e-2 * float(np.abs(expected).max()))


def test_unknown_formulation_is_refused():
    with pytest.raises(ValueError, match="unknown combine"):
        lower_moe_native(_combine_model(2, 4, TensorProto.FLOAT), "sorted", 2)
