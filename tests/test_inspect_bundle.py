"""`inspect --bundle`: the built graph's FLOPs by op class against the model's intrinsic FLOPs (tiny configs)."""

from __future__ import annotations

import json

import onnx
import pytest
from nucleus_runtime.bundle import load_manifest

from nucleus_export.cli import main
from nucleus_runtime.bundle import LoweringRecord

from nucleus_export.costs.flops import GEMM_CLASSES, graph_cost, intrinsic_flops
from nucleus_export.model.checkpoint import expected_parameter_shapes
from nucleus_export.rewrites.as_built import engine_graph


def _costs(bundle, combine, batch, tokens, text_len):
    exported = onnx.load(str(bundle / "denoiser.onnx"), load_external_data=False)
    model = engine_graph(exported, LoweringRecord("native", combine), load_manifest(bundle).model_config["num_experts"])
    sizes = {"batch": batch, "image_tokens": tokens, "text_len": text_len}
    shapes = {v.name: [sizes.get(d.dim_param, d.dim_value) for d in v.type.tensor_type.shape.dim] for v in model.graph.input}
    return graph_cost(model, shapes)


@pytest.mark.parametrize(("batch", "tokens", "text_len"), [(1, 60, 7), (2, 64, 64)])
def test_built_gemm_flops_equal_intrinsic_with_the_chain(tiny_bundle, tiny_checkpoint, batch, tokens, text_len):
    """Every GEMM and attention FLOP of the graph is one the model needs; the one-hot combine adds 2*B*S*E*C*H."""
    config = tiny_checkpoint.config
    intrinsic = intrinsic_flops(config, expected_parameter_shapes(config), batch, tokens, text_len)
    chain = _costs(tiny_bundle, "chain", batch, tokens, text_len)
    for name in GEMM_CLASSES:
        assert chain[name].gemm_flops == pytest.approx(intrinsic[name], rel=1e-9), name
    onehot = _costs(tiny_bundle, "onehot", batch, tokens, text_len)
    extra = sum(2.0 * batch * tokens * config.num_experts * config.capacity(i, tokens) * config.hidden_size
                for i in config.moe_layers)
    assert onehot["combine"].gemm_flops == pytest.approx(extra)
    assert chain["combine"].gemm_flops == 0


def test_inspect_bundle_cli(tiny_bundle, capsys):
    assert main(["inspect", "--bundle", str(tiny_bundle), "--gpu", "rtx4090", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    manifest = load_manifest(tiny_bundle)
    assert [tuple(r["resolution"]) for r in report["resolutions"]] == [tuple(r) for r in manifest.profiles.resolutions]
    assert report["combine"] in ("onehot", "chain") and report["gpu"] == "GeForce RTX 4090"
    for r in report["resolutions"]:
        assert r["batch"] == manifest.profiles.batch[2] and r["roofline_seconds"] >= r["compute_floor_seconds"] > 0
        assert 0 <= r["combine_share"] < 1 and r["gemm_ratio"] >= 1
    assert report["tensorrt_layers"] is None and report["notes"]  # exported, not built
    assert main(["inspect", "--bundle", str(tiny_bundle)]) == 0
    assert "intrinsic" in capsys.readouterr().out


def test_inspect_needs_model_or_bundle(tiny_bundle):
    with pytest.raises(SystemExit) as info:
        main(["inspect", "--bundle", str(tiny_bundle), "--model", "tiny"])
    assert info.value.code == 2
