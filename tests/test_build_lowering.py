"""MoE lowering and bf16 emulation: pure ONNX rewrites checked in ONNX Runtime against the exported graphs."""

from __future__ import annotations

import copy

import ml_dtypes
import numpy as np
import onnx
import onnxruntime as ort
import pytest
from nucleus_runtime.bundle import load_manifest
from nucleus_runtime.contract import COMBINE_OP, ROUTER_OP
from nucleus_runtime.contract import CUSTOM_OPS as MOE_OPS
from nucleus_runtime.contract import DOMAIN as NUCLEUS_DOMAIN
from nucleus_runtime.plugins import PLUGIN_NAMES, PLUGIN_NAMESPACE, PLUGIN_VERSION
from onnx import TensorProto, helper, numpy_helper

from nucleus_export.rewrites.attention_masks import broadcast_attention_masks
from nucleus_export.rewrites.bf16_emulation import emulate_bf16_in_fp32
from nucleus_export.rewrites.moe_lowering import count_moe_nodes, lower_moe_native, prepare_for_plugins

TINY_EXPERTS = 8

# Ops TensorRT's parser rejects or cannot build with a dynamic S: none may survive the native lowering.
FORBIDDEN_AFTER_LOWERING = {"OneHot", "NonZero", "Loop", "If"}


def _session(model: onnx.ModelProto) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.log_severity_level = 3
    return ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])


def _with_router_outputs(model: onnx.ModelProto, names: list[str]) -> onnx.ModelProto:
    model = copy.deepcopy(model)
    for name in names:
        model.graph.output.append(helper.make_empty_tensor_value_info(name))
    return model


def _denoiser_feeds(model: onnx.ModelProto, batch: int, tokens: int, text_len: int, seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    sizes = {"batch": batch, "image_tokens": tokens, "text_len": text_len}
    feeds = {}
    for value in model.graph.input:
        dims = [sizes.get(d.dim_param, d.dim_value) for d in value.type.tensor_type.shape.dim]
        if value.type.tensor_type.elem_type == TensorProto.INT64:
            mask = np.ones(dims, np.int64)
            mask[-1, text_len // 2 :] = 0  # padded row: the mask path is exercised
            feeds[value.name] = mask
        else:
            feeds[value.name] = rng.standard_normal(dims).astype(np.float32)
    return feeds


@pytest.fixture(scope="module")
def fp32_denoiser(tiny_bundle) -> onnx.ModelProto:
    return onnx.load(str(tiny_bundle / "denoiser.onnx"))


def test_native_lowering_removes_custom_ops_and_functions(fp32_denoiser):
    counts = count_moe_nodes(fp32_denoiser)
    assert counts[ROUTER_OP] == 2 and counts[COMBINE_OP] == 2  # tiny model: blocks 3 and 4 are MoE
    lowered = lower_moe_native(fp32_denoiser, "onehot", TINY_EXPERTS)
    onnx.checker.check_model(lowered, full_check=True)
    assert all(n.domain != NUCLEUS_DOMAIN for n in lowered.graph.node)
    assert not [f for f in lowered.functions if f.domain == NUCLEUS_DOMAIN]
    assert NUCLEUS_DOMAIN not in {o.domain for o in lowered.opset_import}
    ops = {n.op_type for n in lowered.graph.node}
    assert not ops & FORBIDDEN_AFTER_LOWERING
    for node in lowered.graph.node:
        if node.op_type in ("ScatterElements", "ScatterND"):
            reduction = {a.name: helper.get_attribute_value(a) for a in node.attribute}.get("reduction", b"none")
            assert reduction in (b"none", "none"), f"{node.name} keeps reduction={reduction}"
    # The input model is untouched.
    assert count_moe_nodes(fp32_denoiser)[ROUTER_OP] == 2


@pytest.mark.parametrize("combine", ["onehot", "chain"])
@pytest.mark.parametrize(("batch", "tokens", "text_len"), [(1, 64, 16), (2, 60, 7), (2, 64, 64)])
def test_native_lowering_is_exact_in_onnx_runtime(fp32_denoiser, tiny_bundle, batch, tokens, text_len, combine):
    """Same token indices bit for bit; gating and sample equal up to float32 summation order."""
    manifest = load_manifest(tiny_bundle)
    assert manifest.profiles.image_tokens[0] <= tokens <= manifest.profiles.image_tokens[2]
    router_outputs = [o for n in fp32_denoiser.graph.node if n.op_type == ROUTER_OP for o in n.output]
    original = _session(_with_router_outputs(fp32_denoiser, router_outputs))
    lowered = _session(_with_router_outputs(lower_moe_native(fp32_denoiser, combine, TINY_EXPERTS), router_outputs))
    feeds = _denoiser_feeds(fp32_denoiser, batch, tokens, text_len, seed=tokens)
    names = ["sample", *router_outputs]
    expected = dict(zip(names, original.run(names, feeds)))
    actual = dict(zip(names, lowered.run(names, feeds)))
    for name in names:
        if expected[name].dtype == np.int64:
            np.testing.assert_array_equal(actual[name], expected[name], err_msg=name)
        else:
            scale = float(np.abs(expected[name]).max())
            np.testing.assert_allclose(actual[name], expected[name], rtol=0, atol=1e-5 * max(scale, 1.0), err_msg=name)


def test_attention_masks_reach_tensorrt_unexpanded(fp32_denoiser):
    """ORT needs the mask expanded over the queries; the engine graph gets the [B, 1, 1, S+T] mask instead."""
    producers = {o: n for n in fp32_denoiser.graph.node for o in n.output}
    attentions = [n for n in fp32_denoiser.graph.node if n.op_type == "Attention"]
    assert len(attentions) == 5 and all(producers[n.input[3]].op_type == "Expand" for n in attentions)
    rewritten = broadcast_attention_masks(fp32_denoiser)
    onnx.checker.check_model(rewritten, full_check=True)
    producers = {o: n for n in rewritten.graph.node for o in n.output}
    masks = {n.input[3] for n in rewritten.graph.node if n.op_type == "Attention"}
    assert len(masks) == 1 and producers[masks.pop()].op_type != "Expand"
    assert sum(n.op_type == "Expand" for n in rewritten.graph.node) < sum(n.op_type == "Expand" for n in fp32_denoiser.graph.node)


def _router_model(score_function: str, num: int, den: int) -> onnx.ModelProto:
    """A graph of one router node with the exported reference body, for odd capacity fractions."""
    from nucleus_export.moe.expert_choice import router_function

    node = helper.make_node(
        ROUTER_OP, ["logits"], ["idx", "gating"], domain=NUCLEUS_DOMAIN, name="router",
        capacity_numerator=num, capacity_denominator=den, score_function=score_function, route_scale=2.5,
    )
    graph = helper.make_graph(
        [node], "router",
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["B", "S", 8])],
        [helper.make_tensor_value_info("idx", TensorProto.INT64, None),
         helper.make_tensor_value_info("gating", TensorProto.FLOAT, None)],
    )
    return helper.make_model(
        graph, opset_imports=[helper.make_opsetid("", 20), helper.make_opsetid(NUCLEUS_DOMAIN, 1)],
        functions=[router_function(score_function)],
    )


@pytest.mark.parametrize(("score_function", "num", "den"), [("softmax", 3, 2), ("sigmoid", 1, 3), ("softmax", 8, 1)])
def test_router_lowering_capacity_and_gating(score_function, num, den):
    model = _router_model(score_function, num, den)
    reference, lowered = _session(model), _session(lower_moe_native(model, "onehot", 8))
    rng = np.random.default_rng(num * 10 + den)
    for tokens in (1, 5, 13, 64):
        logits = (3 * rng.standard_normal((2, tokens, 8))).astype(np.float32)
        idx_ref, gating_ref = reference.run(None, {"logits": logits})
        idx, gating = lowered.run(None, {"logits": logits})
        assert idx.shape[-1] == max(1, -(-num * tokens // (den * 8)))
        np.testing.assert_array_equal(idx, idx_ref)
        np.testing.assert_allclose(gating, gating_ref, rtol=1e-6, atol=1e-7)


def test_prepare_for_plugins_keeps_nodes_without_bodies(fp32_denoiser):
    """Each node names the creator the plugin library registers: op_type, plugin_version "1", namespace "nucleus"."""
    assert set(MOE_OPS) == set(PLUGIN_NAMES)
    stale = copy.deepcopy(fp32_denoiser)
    for node in stale.graph.node:
        if node.domain == NUCLEUS_DOMAIN:
            node.attribute.append(helper.make_attribute("plugin_namespace", ""))  # what an older build wrote
    prepared = prepare_for_plugins(stale)
    assert count_moe_nodes(prepared) == count_moe_nodes(fp32_denoiser) and sum(count_moe_nodes(prepared).values())
    assert not [f for f in prepared.functions if f.domain == NUCLEUS_DOMAIN]
    assert NUCLEUS_DOMAIN in {o.domain for o in prepared.opset_import}
    for node in prepared.graph.node:
        if node.domain == NUCLEUS_DOMAIN:
            names = [a.name for a in node.attribute]
            assert names.count("plugin_namespace") == names.count("plugin_version") == 1
            attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
            assert attrs["plugin_version"] == PLUGIN_VERSION.encode() == b"1"
            assert attrs["plugin_namespace"] == PLUGIN_NAMESPACE.encode() == b"nucleus"


def _tiny_bf16_graph() -> onnx.ModelProto:
    w = np.random.default_rng(0).standard_normal((16, 8)).astype(np.float32)
    w_bf16 = helper.make_tensor("w", TensorProto.BFLOAT16, [16, 8], w.astype(ml_dtypes.bfloat16).tobytes(), raw=True)
    nodes = [
        helper.make_node("Cast", ["x"], ["xb"], to=TensorProto.BFLOAT16),
        helper.make_node("MatMul", ["xb", "w"], ["y"]),
        helper.make_node("Relu", ["y"], ["r"]),
        helper.make_node("Cast", ["r"], ["out"], to=TensorProto.FLOAT),
    ]
    graph = helper.make_graph(
        nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [3, 16])],
        [helper.make_tensor_value_info("out", TensorProto.FLOAT, [3, 8])], [w_bf16],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 20)])


def test_bf16_emulation_rounds_like_bf16():
    model = _tiny_bf16_graph()
    with pytest.raises(Exception):  # the reason the rewrite exists: no bf16 MatMul on ORT's CPU provider
        _session(model)
    emulated = emulate_bf16_in_fp32(model)
    onnx.checker.check_model(emulated)
    assert not [i for i in emulated.graph.initializer if i.data_type == TensorProto.BFLOAT16]
    x = np.random.default_rng(1).standard_normal((3, 16)).astype(np.float32)
    (out,) = _session(emulated).run(None, {"x": x})

    def bf16(a):
        return np.asarray(a, np.float32).astype(ml_dtypes.bfloat16).astype(np.float32)

    w = numpy_helper.to_array(model.graph.initializer[0]).astype(np.float32)
    expected = bf16(np.maximum(bf16(bf16(x) @ w), 0))
    np.testing.assert_allclose(out, expected, rtol=1e-6, atol=0)
    # ...and it is not the fp32 result: the rounding is really there.
    assert np.abs(out - np.maximum(x @ w, 0)).max() > 1e-4


def test_bf16_emulation_of_exported_bf16_denoiser(tiny_checkpoint, tmp_path):
    """The exported bf16 graph runs in ORT after emulation, close to the fp32 graph."""
    from nucleus_export.export import ExportOptions, export_bundle
    from nucleus_export.graph.precision import GraphPrecision

    out = {}
    for precision in ("fp32", "bf16"):
        export_bundle(
            tiny_checkpoint, tmp_path / precision,
            ExportOptions(GraphPrecision(precision), resolutions=[(128, 128)], max_text_len=16, opt_text_len=8),
        )
        model = onnx.load(str(tmp_path / precision / "denoiser.onnx"))
        session = _session(emulate_bf16_in_fp32(model) if precision == "bf16" else model)
        feeds = _denoiser_feeds(model, 2, 64, 8, seed=3)
        out[precision] = session.run(["sample"], feeds)[0]
    cosine = float((out["fp32"].ravel() @ out["bf16"].ravel()) / np.linalg.norm(out["fp32"]) / np.linalg.norm(out["bf16"]))
    assert cosine > 0.99
    assert not np.array_equal(out["fp32"], out["bf16"])


def test_engine_onnx_shares_the_external_data(tiny_checkpoint, tmp_path):
    """The kept engine ONNX points into the exported graph's weights (relative locations, nothing copied): the data
    file, and the linked checkpoint shards where the graph uses the checkpoint's tensors as stored."""
    from nucleus_runtime.contract import engine_onnx_file

    from nucleus_runtime.bundle import LoweringRecord

    from nucleus_export.build import write_engine_graph
    from nucleus_export.export import ExportOptions, export_bundle
    from nucleus_export.graph.external_data import load_model

    def locations(path):
        model = onnx.load(str(path), load_external_data=False)
        return {e.value for i in model.graph.initializer for e in i.external_data if e.key == "location"}

    for weights, link in (("copy", False), ("link", True)):
        bundle = tmp_path / weights
        options = ExportOptions(resolutions=[(128, 128)], max_text_len=16, external_data=True, link_checkpoint=link)
        export_bundle(tiny_checkpoint, bundle, options)
        path = write_engine_graph(bundle, "denoiser", LoweringRecord("native", "chain"), TINY_EXPERTS)
        assert path == bundle / engine_onnx_file("denoiser")
        assert locations(path) == locations(bundle / "denoiser.onnx")
        assert (locations(path) == {"denoiser.onnx.data"}) != link
        assert path.stat().st_size < 200e3
        load_model(path)  # the data resolves from the engine ONNX's folder
