"""ONNX export verified against diffusers: several architectures, precisions, bad inputs, atomic output."""

from __future__ import annotations

import json

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from nucleus_runtime.bundle import load_manifest, verify_files
from nucleus_runtime.contract import CHECKPOINT_LINKS_DIR, COMBINE_OP, ROUTER_OP
from nucleus_runtime.errors import NucleusError

from nucleus_export.errors import NucleusExportError, UsageError
from nucleus_export.export import ExportOptions, export_bundle
from nucleus_export.graph.external_data import check_model, load_model
from nucleus_export.graph.precision import GraphPrecision
from nucleus_export.model.checkpoint import open_checkpoint
from nucleus_export.model.tiny import write_checkpoint
from nucleus_export.parity.cases import make_cases
from nucleus_export.parity.check import check_parity

SMALL_RESOLUTIONS = [(128, 128), (96, 160), (160, 96)]  # as the tiny_bundle fixture
OPTIONS = dict(resolutions=SMALL_RESOLUTIONS, max_text_len=64, opt_text_len=16)


def test_bundle_contract(tiny_bundle, tiny_checkpoint):
    manifest = load_manifest(tiny_bundle)
    verify_files(tiny_bundle, manifest)
    config = tiny_checkpoint.config
    denoiser = onnx.load(str(tiny_bundle / "denoiser.onnx"))
    text_kv = onnx.load(str(tiny_bundle / "text_kv.onnx"))
    assert [i.name for i in text_kv.graph.input] == ["encoder_hidden_states", "txt_rope_cos", "txt_rope_sin"]
    assert [o.name for o in text_kv.graph.output] == ["text_kv"]
    assert [i.name for i in denoiser.graph.input] == [
        "hidden_states", "timestep", "img_rope_cos", "img_rope_sin", "text_kv", "encoder_hidden_states_mask",
    ]
    assert [o.name for o in denoiser.graph.output] == ["sample"]
    assert manifest.io["text_kv"].outputs["text_kv"].shape == [5, 2, "batch", "text_len", config.kv_heads, 32]
    # MoE as nucleus custom ops with their function bodies; dispatch is a plain Gather; no text projections.
    ops = [n.op_type for n in denoiser.graph.node]
    assert ops.count(ROUTER_OP) == ops.count(COMBINE_OP) == len(config.moe_layers)
    assert {(f.domain, f.name) for f in denoiser.functions} == {("nucleus", ROUTER_OP), ("nucleus", COMBINE_OP)}
    assert "Gather" in ops
    assert not any("encoder_proj" in i.name or "add_k_proj" in i.name for i in denoiser.graph.initializer)
    assert manifest.profiles.image_tokens == (60, 64, 64)
    assert (tiny_bundle / "scheduler_config.json").is_file()


def test_fp32_parity_tiny(tiny_bundle, tiny_checkpoint, tiny_reference):
    report = check_parity(tiny_checkpoint, tiny_bundle, reference=tiny_reference)
    assert len(report.cases) == 3 * len(SMALL_RESOLUTIONS)
    assert {c.name.split("/")[1] for c in report.cases} == {"b1", "b2"}
    assert report.passed, report.summary_lines()
    assert report.worst["routing_agreement"] == 1.0
    assert report.worst["sample_relative_error"] <= 1e-4


VARIANTS = {
    "mha-sigmoid-all-moe": {"num_key_value_heads": 4, "use_sigmoid": True, "dense_moe_strategy": "all_moe",
                            "capacity_factors": [2.0, 1.5, 3.0, 1.0, 2.5]},
    "gqa4-16experts-first-dense": {"num_key_value_heads": 1, "num_experts": 16, "dense_moe_strategy": "leave_first_block_dense",
                                   "capacity_factors": [0.0, 8.0, 0.5, 1.25, 2.0]},
    "patch1-mha-all-dense": {"patch_size": 1, "in_channels": 16, "out_channels": None, "num_key_value_heads": None,
                             "dense_moe_strategy": "all_dense"},
    "moe-disabled-odd-experts": {"moe_enabled": False, "num_experts": 5},
    "last-dense-scalar-cf": {"dense_moe_strategy": "leave_first_three_and_last_block_dense", "num_layers": 6,
                             "capacity_factors": 3.0, "route_scale": 1.0, "moe_intermediate_dim": 48},
}


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_fp32_parity_other_architectures(variant, tmp_path):
    checkpoint = open_checkpoint(write_checkpoint(tmp_path / "ckpt", VARIANTS[variant], seed=3))
    export_bundle(checkpoint, tmp_path / "bundle", ExportOptions(resolutions=[(128, 128), (96, 160)], max_text_len=32))
    report = check_parity(checkpoint, tmp_path / "bundle")
    assert report.passed, report.summary_lines()
    assert report.worst["routing_agreement"] == 1.0


def _elem_types(model: onnx.ModelProto) -> dict[str, int]:
    inferred = onnx.shape_inference.infer_shapes(model)
    values = list(inferred.graph.value_info) + list(inferred.graph.input) + list(inferred.graph.output)
    types = {v.name: v.type.tensor_type.elem_type for v in values}
    types.update({i.name: i.data_type for i in model.graph.initializer})
    return types


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_reduced_precision_keeps_router_norms_softmax_in_fp32(precision, tiny_checkpoint, tmp_path):
    export_bundle(tiny_checkpoint, tmp_path / "b", ExportOptions(GraphPrecision(precision), **OPTIONS))
    model = onnx.load(str(tmp_path / "b" / "denoiser.onnx"))
    types = _elem_types(model)
    low = onnx.TensorProto.BFLOAT16 if precision == "bf16" else onnx.TensorProto.FLOAT16
    for node in model.graph.node:
        if node.op_type in ("Softmax", "LayerNormalization", "ReduceMean", ROUTER_OP):
            assert types[node.input[0]] == onnx.TensorProto.FLOAT, node.name
        if node.op_type == "MatMul" and node.name.endswith(".gate_2") is False and ".img_mlp.gate" in node.name:
            assert types[node.input[1]] == onnx.TensorProto.FLOAT  # router gate stays fp32
    gemm_types = {types[n.input[1]] for n in model.graph.node if n.op_type == "MatMul" and "attn.to_q" in n.name}
    assert gemm_types == {low}
    assert load_manifest(tmp_path / "b").io["denoiser"].inputs["text_kv"].dtype == ("bfloat16" if precision == "bf16" else "float16")


def test_fp16_graph_runs_in_onnxruntime_close_to_fp32(tiny_checkpoint, tiny_bundle, tmp_path):
    export_bundle(tiny_checkpoint, tmp_path / "b16", ExportOptions(GraphPrecision("fp16"), **OPTIONS))
    case = make_cases(tiny_checkpoint.config, load_manifest(tiny_bundle).profiles)[1]
    outputs = {}
    for name, folder in (("fp32", tiny_bundle), ("fp16", tmp_path / "b16")):
        text_kv = ort.InferenceSession(str(folder / "text_kv.onnx")).run(None, case.text_kv_inputs(tiny_checkpoint.config))[0]
        session = ort.InferenceSession(str(folder / "denoiser.onnx"))
        outputs[name] = session.run(None, case.denoiser_inputs(tiny_checkpoint.config, text_kv))[0]
    cos = float(np.sum(outputs["fp32"] * outputs["fp16"]) / np.linalg.norm(outputs["fp32"]) / np.linalg.norm(outputs["fp16"]))
    assert cos > 0.999


def _linked_shards(bundle):
    return sorted(p.name for p in (bundle / CHECKPOINT_LINKS_DIR).iterdir()) if (bundle / CHECKPOINT_LINKS_DIR).is_dir() else []


def test_external_data_streams_weights(tiny_checkpoint, tiny_reference, tmp_path):
    export_bundle(tiny_checkpoint, tmp_path / "ext", ExportOptions(external_data=True, link_checkpoint=False, **OPTIONS))
    assert (tmp_path / "ext" / "denoiser.onnx.data").stat().st_size > 1e6
    assert (tmp_path / "ext" / "denoiser.onnx").stat().st_size < 200e3
    assert _linked_shards(tmp_path / "ext") == []
    report = check_parity(tiny_checkpoint, tmp_path / "ext", reference=tiny_reference)
    assert report.passed


def test_linked_weights_are_the_checkpoint_bytes(tiny_checkpoint, tiny_reference, tmp_path):
    """fp32 graph, fp32 checkpoint: every weight is read in place from hard links to the shards, nothing is copied,
    and the graph computes bit for bit what the copying export computes."""
    export_bundle(tiny_checkpoint, tmp_path / "link", ExportOptions(external_data=True, **OPTIONS))
    export_bundle(tiny_checkpoint, tmp_path / "copy", ExportOptions(external_data=True, link_checkpoint=False, **OPTIONS))
    link = tmp_path / "link"
    shards = tiny_checkpoint.weights.shards
    assert _linked_shards(link) == sorted(s.name for s in shards)
    for shard in shards:
        assert (link / CHECKPOINT_LINKS_DIR / shard.name).stat().st_ino == shard.stat().st_ino
    assert not (link / "denoiser.onnx.data").exists()  # every large weight linked
    manifest = load_manifest(link)
    verify_files(link, manifest)
    assert {f"{CHECKPOINT_LINKS_DIR}/{s.name}" for s in shards} <= set(manifest.files)
    case = make_cases(tiny_checkpoint.config, manifest.profiles)[0]
    outputs = {}
    for name in ("link", "copy"):
        text_kv = ort.InferenceSession(str(tmp_path / name / "text_kv.onnx")).run(None, case.text_kv_inputs(tiny_checkpoint.config))[0]
        session = ort.InferenceSession(str(tmp_path / name / "denoiser.onnx"))
        outputs[name] = session.run(None, case.denoiser_inputs(tiny_checkpoint.config, text_kv))[0]
    np.testing.assert_array_equal(outputs["link"], outputs["copy"])
    assert check_parity(tiny_checkpoint, link, reference=tiny_reference).passed


def test_linked_weights_fall_back_to_copies(tiny_checkpoint, tmp_path, monkeypatch):
    """A bundle on another file system than the checkpoint (EXDEV) gets copies, and is just as valid."""
    import errno
    import os

    def refuse(*_args, **_kwargs):
        raise OSError(errno.EXDEV, os.strerror(errno.EXDEV))

    monkeypatch.setattr(os, "link", refuse)
    export_bundle(tiny_checkpoint, tmp_path / "b", ExportOptions(external_data=True, **OPTIONS))
    assert _linked_shards(tmp_path / "b") == []
    assert (tmp_path / "b" / "denoiser.onnx.data").stat().st_size > 1e6
    verify_files(tmp_path / "b", load_manifest(tmp_path / "b"))


def test_bf16_checkpoint_links_into_bf16_graphs(tmp_path):
    """The released checkpoint's case: bf16 weights, bf16 graph. GEMM weights and biases are read in place (Linear
    weights through a Transpose node); only what the graph keeps in float32 (norm weights, router gate) is copied."""
    checkpoint = open_checkpoint(write_checkpoint(tmp_path / "ckpt", dtype="bfloat16"))
    export_bundle(checkpoint, tmp_path / "b", ExportOptions(GraphPrecision("bf16"), external_data=True, **OPTIONS))
    model = onnx.load(str(tmp_path / "b" / "denoiser.onnx"), load_external_data=False)
    location = {i.name: next((e.value for e in i.external_data if e.key == "location"), None) for i in model.graph.initializer}
    linked = {n for n, loc in location.items() if loc and loc.startswith(CHECKPOINT_LINKS_DIR + "/")}
    copied = {n for n, loc in location.items() if loc == "denoiser.onnx.data"}
    assert "transformer_blocks.3.img_mlp.experts.gate_up_proj" in linked
    assert "transformer_blocks.0.attn.to_q.weight" in linked
    assert "transformer_blocks.3.img_mlp.gate.weight.T" in copied  # float32 router gate from bf16 weights
    linked_bytes = sum(int(next(e.value for e in i.external_data if e.key == "length")) for i in model.graph.initializer if i.name in linked)
    assert linked_bytes > 0.9 * sum(s.stat().st_size for s in checkpoint.weights.shards) - (tmp_path / "b" / "denoiser.onnx.data").stat().st_size
    assert (tmp_path / "b" / "denoiser.onnx.data").stat().st_size < 0.1 * linked_bytes


def test_external_data_outside_the_bundle_is_refused(tiny_checkpoint, tmp_path):
    export_bundle(tiny_checkpoint, tmp_path / "b", ExportOptions(external_data=True, **OPTIONS))
    model = onnx.load(str(tmp_path / "b" / "denoiser.onnx"), load_external_data=False)
    tensor = next(i for i in model.graph.initializer if i.external_data)
    entry = next(e for e in tensor.external_data if e.key == "location")
    entry.value = "../elsewhere.safetensors"
    onnx.save_model(model, str(tmp_path / "b" / "evil.onnx"))
    with pytest.raises(NucleusError, match="external data of tensor"):
        load_model(tmp_path / "b" / "evil.onnx")
    entry.value = f"{CHECKPOINT_LINKS_DIR}/{tiny_checkpoint.weights.shards[0].name}"
    next(e for e in tensor.external_data if e.key == "offset").value = str(10**9)
    onnx.save_model(model, str(tmp_path / "b" / "evil.onnx"))
    with pytest.raises(NucleusExportError, match="spans bytes"):
        check_model(tmp_path / "b" / "evil.onnx")


def test_external_data_bf16_matches_embedded(tiny_checkpoint, tmp_path):
    options = dict(precision=GraphPrecision("bf16"), **OPTIONS)
    export_bundle(tiny_checkpoint, tmp_path / "ext", ExportOptions(external_data=True, link_checkpoint=False, **options))
    export_bundle(tiny_checkpoint, tmp_path / "emb", ExportOptions(external_data=False, **options))
    external = load_model(tmp_path / "ext" / "denoiser.onnx")
    embedded = {i.name: onnx.numpy_helper.to_array(i) for i in onnx.load(str(tmp_path / "emb" / "denoiser.onnx")).graph.initializer}
    assert len(external.graph.initializer) == len(embedded)
    for tensor in external.graph.initializer:
        np.testing.assert_array_equal(onnx.numpy_helper.to_array(tensor), embedded[tensor.name])


def test_bad_inputs(tiny_checkpoint, tiny_bundle, tmp_path):
    with pytest.raises(UsageError, match="multiple of 16"):
        export_bundle(tiny_checkpoint, tmp_path / "x", ExportOptions(resolutions=[(100, 128)]))
    with pytest.raises(UsageError, match="rope positions"):
        export_bundle(tiny_checkpoint, tmp_path / "x", ExportOptions(resolutions=[(1024, 1024)], max_text_len=4090))
    with pytest.raises(UsageError, match="already exists"):
        export_bundle(tiny_checkpoint, tiny_bundle, ExportOptions(**OPTIONS))
    crowded = open_checkpoint(write_checkpoint(tmp_path / "crowded", {"num_experts": 2, "capacity_factors": [0, 0, 0, 4.0, 2.0]}))
    with pytest.raises(UsageError, match="more tokens than exist"):
        export_bundle(crowded, tmp_path / "x", ExportOptions(**OPTIONS))
    assert not (tmp_path / "x").exists()
    assert not list(tmp_path.glob(".*partial*"))  # nothing half-written left behind


def test_force_replaces_bundle_atomically(tiny_checkpoint, tmp_path):
    out = tmp_path / "b"
    export_bundle(tiny_checkpoint, out, ExportOptions(**OPTIONS))
    (out / "stale.txt").write_text("old")
    export_bundle(tiny_checkpoint, out, ExportOptions(**OPTIONS), force=True)
    assert not (out / "stale.txt").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["b"]


def test_check_refuses_bundle_of_other_model(tiny_bundle, tmp_path):
    other = open_checkpoint(write_checkpoint(tmp_path / "other", {"num_experts": 4}))
    with pytest.raises(NucleusExportError, match="another model"):
        check_parity(other, tiny_bundle)


def test_check_cli_writes_parity_json(tiny_bundle):
    import subprocess
    import sys

    result = subprocess.run(
        [sys.executable, "-m", "nucleus_export.cli", "check", "--model", "tiny", "--bundle", str(tiny_bundle)],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stderr
    assert "PASS" in result.stdout
    parity = json.loads((tiny_bundle / "parity.json").read_text())
    assert parity["fp32"]["passed"] and parity["fp32"]["worst"]["routing_agreement"] == 1.0
    # a tolerance nobody can meet must fail with exit code 1
    strict = subprocess.run(
        [sys.executable, "-m", "nucleus_export.cli", "check", "--model", "tiny", "--bundle", str(tiny_bundle),
         "--max-rel-error", "1e-12"],
        capture_output=True,
        text=True,
    )
    assert strict.returncode == 1 and "FAIL" in strict.stdout


def test_check_cli_on_bf16_bundle_runs_emulated(tiny_checkpoint, tmp_path):
    from nucleus_export.cli import main

    export_bundle(tiny_checkpoint, tmp_path / "b16", ExportOptions(GraphPrecision("bf16"), resolutions=[(128, 128)], max_text_len=16))
    assert main(["check", "--model", "tiny", "--bundle", str(tmp_path / "b16")]) == 0
    report = json.loads((tmp_path / "b16" / "parity.json").read_text())["bf16"]
    assert report["passed"] and "emulated" in report["note"]
    assert 1e-4 < report["worst"]["sample_relative_error"] < 0.15  # really bf16, within the bf16 tolerance
    assert main(["check", "--model", "tiny", "--bundle", str(tmp_path / "b16"), "--max-rel-error", "1e-4"]) == 1
