"""Real TensorRT-RTX engine builds of the tiny model on the CPU (bf16 and FP8, native MoE lowering), with checks of
the parsed networks, the bundle, the build log and the CPU quality report."""

from __future__ import annotations

import json
import shutil

import pytest
from nucleus_runtime.bundle import load_manifest, verify_files
from nucleus_runtime.contract import engine_onnx_file
from nucleus_runtime.errors import NucleusError

from nucleus_runtime.bundle import LoweringRecord

from nucleus_export.build import BuildOptions, build_bundle, write_engine_graph
from nucleus_export.cli import main
from nucleus_export.engines.flavors import resolve_flavor
from nucleus_export.engines.loaders import BuildSettings, EngineFromOnnx, NetworkFromOnnxPath
from nucleus_export.engines.profiles import dim_ranges_from_profiles, onnx_input_shapes, profile_shapes
from nucleus_export.errors import NucleusExportError
from nucleus_export.export import ExportOptions, build_profiles
from nucleus_export.graph.precision import GraphPrecision

pytest.importorskip("tensorrt_rtx")

RESOLUTIONS = [(128, 128), (96, 160), (160, 96)]
MOE_BLOCKS = (3, 4)
ATTENTION = ("attn.to_q", "attn.to_k", "attn.to_v", "attn.to_out.0")
EXPERTS = ("img_mlp.experts.gate_up_proj", "img_mlp.experts.down_proj", "img_mlp.shared_expert.net.0.proj",
           "img_mlp.shared_expert.net.2")


def _export_options(precision: GraphPrecision) -> ExportOptions:
    return ExportOptions(precision=precision, resolutions=RESOLUTIONS, max_text_len=64, opt_text_len=16)


def _fp8_recipe(checkpoint, tiny_reference):
    from nucleus_export.quant import calibrate_fp8

    profiles = build_profiles(checkpoint.config, _export_options(GraphPrecision("bf16")))
    return calibrate_fp8(checkpoint, profiles, size=4, steps=4, reference=tiny_reference)


@pytest.fixture(scope="module")
def bf16_build(tiny_checkpoint, tmp_path_factory):
    out = tmp_path_factory.mktemp("engines") / "tiny-bf16"
    manifest, reports, parity = build_bundle(
        tiny_checkpoint, out, _export_options(GraphPrecision("bf16")), BuildOptions(flavor="tensorrt-rtx")
    )
    return out, manifest, {r.graph: r for r in reports}, parity


@pytest.fixture(scope="module")
def fp8_build(tiny_checkpoint, tiny_reference, tmp_path_factory):
    options = _export_options(GraphPrecision("bf16"))
    work = tmp_path_factory.mktemp("engines")
    options.precision = GraphPrecision("bf16", _fp8_recipe(tiny_checkpoint, tiny_reference))
    out = work / "tiny-fp8"
    manifest, reports, parity = build_bundle(tiny_checkpoint, out, options, BuildOptions(flavor="tensorrt-rtx"))
    return out, manifest, {r.graph: r for r in reports}, parity


def _gemms(report, block: int, names) -> list:
    found = []
    for name in names:
        matches = report.network.gemm(f"transformer_blocks.{block}.{name}")
        assert matches, f"no GEMM for block {block} {name}"
        found += matches
    return found


def test_bf16_bundle(bf16_build):
    out, manifest, reports, parity = bf16_build
    assert {p.name for p in out.iterdir()} >= {"text_kv.plan", "denoiser.plan", "build_log.json", "parity.json"}
    assert not [p for p in out.iterdir() if p.name.startswith(".")]  # no leftover lowered graphs
    # A transformer-only bundle builds exactly its two stages, with the build's MoE lowering recorded on both.
    assert manifest.engine_units() == ["text_kv", "denoiser"] and not list(out.glob("text_encoder*"))
    assert manifest.engine("text_kv").lowering == manifest.engine("denoiser").lowering
    verify_files(out, load_manifest(out))  # every file, the plans included, is recorded with its checksum
    assert manifest.engine("denoiser").lowering.moe == "native"
    assert manifest.engine("denoiser").flavor == "tensorrt-rtx"
    assert manifest.engine("denoiser").compute_capabilities
    denoiser = reports["denoiser"].network
    # Strongly typed: GEMMs in bf16, except the router gates, which stay float32; no Q/DQ without --fp8.
    assert denoiser.num_quantize == denoiser.num_dequantize == 0
    gates = [g for g in denoiser.gemms if g.name.split("/")[-1].startswith("transformer_blocks.") and ".img_mlp.gate_" in g.name]
    assert len(gates) == len(MOE_BLOCKS) and all(g.input_dtypes == ["FLOAT", "FLOAT"] for g in gates)
    assert all(g.input_dtypes == ["BF16", "BF16"] for g in _gemms(reports["denoiser"], 3, ATTENTION + EXPERTS))
    assert "SCATTER" in denoiser.layer_types and "TOPK" in denoiser.layer_types  # native lowering, no plugins
    assert not denoiser.plugin_layers
    # One fused attention (its input and output boundary layers) per block; nothing decomposed around it.
    assert denoiser.layer_types["ATTENTION_INPUT"] == denoiser.layer_types["ATTENTION_OUTPUT"] == 5
    assert "SOFTMAX" not in denoiser.layer_types or denoiser.layer_types["SOFTMAX"] == len(MOE_BLOCKS)  # the routers
    assert "ROTARY_EMBEDDING" in denoiser.layer_types
    # The exact ONNX each engine was built from stays in the bundle, recorded in the manifest.
    for graph in ("text_kv", "denoiser"):
        assert engine_onnx_file(graph) in manifest.files and (out / engine_onnx_file(graph)).is_file()
    assert manifest.engine("denoiser").lowering.combine in ("onehot", "chain")
    # Optimization profile: batch 1..2 (opt 2), image tokens over the served grids, opt at the largest one here.
    lo, opt, hi = reports["denoiser"].profile["hidden_states"]
    assert (lo[0], opt[0], hi[0]) == (1, 2, 2)
    assert (lo[1], hi[1]) == (60, 64) and lo[1] <= opt[1] <= hi[1]
    log = json.loads((out / "build_log.json").read_text())
    assert log["combine"]["requested"] == "auto" and log["combine"]["formulation"] == manifest.engine("denoiser").lowering.combine
    for graph in ("text_kv", "denoiser"):
        entry = log["engines"][graph]
        assert entry["network"]["num_layers"] > 0 and entry["engine_bytes"] == (out / f"{graph}.plan").stat().st_size
        assert entry["build_seconds"] > 0 and entry["network"]["precision_per_layer_type"]["MATRIX_MULTIPLY"]


def test_bf16_quality_report(bf16_build):
    out, _, _, parity = bf16_build
    assert parity is not None and parity.passed
    report = json.loads((out / "parity.json").read_text())["bf16"]
    assert "bf16 emulated on CPU" in report["note"] and "MoE lowered (native, " in report["note"]
    assert set(report["routing_agreement_by_layer"]) == {str(b) for b in MOE_BLOCKS}
    assert report["worst"]["sample_cosine"] >= 0.99
    # Gated against diffusers run in bf16 on the same cases, both against float32 truth.
    graph, baseline = report["pooled"]["graph"], report["pooled"]["diffusers bf16"]
    assert report["tolerance"]["baseline_margin"] is not None
    assert graph["relative_error"] <= (1 + report["tolerance"]["baseline_margin"]) * baseline["relative_error"]
    assert all(case["baseline"] is not None for case in report["cases"])


def test_fp8_qdq_placement(fp8_build):
    out, manifest, reports, _ = fp8_build
    denoiser = reports["denoiser"].network
    assert denoiser.num_quantize > 0 and denoiser.num_dequantize > denoiser.num_quantize
    for block in range(5):
        for gemm in _gemms(reports["denoiser"], block, ATTENTION):
            assert gemm.fp8_inputs == [True, True], gemm
    for block in MOE_BLOCKS:
        for gemm in _gemms(reports["denoiser"], block, EXPERTS):
            assert gemm.fp8_inputs == [True, True], gemm
        (gate,) = [g for g in denoiser.gemms if f"transformer_blocks.{block}.img_mlp.gate_" in g.name]
        assert gate.fp8_inputs == [False, False] and gate.input_dtypes == ["FLOAT", "FLOAT"]
    # The text K/V graph runs once per prompt and is not quantized.
    assert reports["text_kv"].network.num_quantize == 0
    assert (out / "fp8_scales.json").is_file() and "fp8_scales.json" in manifest.files
    assert manifest.quantization.scheme == "fp8_e4m3" and manifest.precision_label == "bf16+fp8"


def test_fp8_quality_report(fp8_build):
    out, _, _, parity = fp8_build
    report = json.loads((out / "parity.json").read_text())
    (label,) = report
    assert "fp8" in label
    assert report[label]["passed"], report[label]["failures"]
    assert report[label]["worst"]["sample_cosine"] >= 0.99
    assert "diffusers bf16" in report[label]["pooled"]
    assert set(report[label]["routing_agreement_by_layer"]) == {str(b) for b in MOE_BLOCKS}
    print("fp8 quality:", report[label]["worst"], report[label]["routing_agreement_by_layer"])


def test_rebuild_from_stored_scales_is_reproducible(fp8_build, tmp_path):
    """--fp8-scales with the bundle's fp8_scales.json gives the same denoiser.onnx without recalibrating."""
    out = fp8_build[0]
    rebuilt = tmp_path / "again"
    code = main([
        "build", "--model", "tiny", "--out", str(rebuilt), "--fp8", "--fp8-scales", str(out / "fp8_scales.json"),
        "--resolutions", "128x128,96x160,160x96", "--max-text-len", "64", "--opt-text-len", "16",
        "--backend", "tensorrt-rtx", "--skip-quality",
    ])
    assert code == 0
    assert (rebuilt / "denoiser.onnx").read_bytes() == (out / "denoiser.onnx").read_bytes()


def test_cli_build_and_force(tmp_path, capsys):
    out = tmp_path / "bundle"
    args = ["build", "--model", "tiny", "--out", str(out), "--resolutions", "128x128", "--max-text-len", "16",
            "--skip-quality", "--backend", "tensorrt-rtx"]
    assert main(args) == 0
    assert "denoiser.plan" in capsys.readouterr().out
    first = (out / "denoiser.plan").stat().st_mtime_ns
    assert main(args) == 2  # exists
    assert main([*args, "--force", "--precision", "fp32"]) == 0
    assert (out / "denoiser.plan").stat().st_mtime_ns != first
    assert load_manifest(out).precision == "fp32"


def test_engine_loader_rejects_inverted_profile(bf16_build, tmp_path):
    """The engine loader validates shapes itself, whatever produced them."""
    path = bf16_build[0] / engine_onnx_file("text_kv")
    shapes = profile_shapes(onnx_input_shapes(path), {"batch": (1, 2, 2), "text_len": (1, 16, 64)})
    lo, opt, hi = shapes["encoder_hidden_states"]
    shapes["encoder_hidden_states"] = (hi, opt, lo)
    loader = EngineFromOnnx(NetworkFromOnnxPath(resolve_flavor("tensorrt-rtx"), path), BuildSettings(shapes),
                            tmp_path / "x.plan", "text_kv")
    with pytest.raises(NucleusExportError, match="impossible profile"):
        loader()
    assert not (tmp_path / "x.plan").exists()


def test_plugin_graph_parses_only_with_the_plugin_library(bf16_build, tmp_path):
    """The plugin-prepared denoiser has no reference bodies to fall back on: without the nucleus creators (namespace
    "nucleus"), TensorRT-RTX's parser stops at the MoE nodes and the error says to load the library."""
    shutil.copy(bf16_build[0] / "denoiser.onnx", tmp_path)  # the tiny model's weights are embedded
    path = write_engine_graph(tmp_path, "denoiser", LoweringRecord("plugin"), 8)
    with pytest.raises(NucleusExportError, match="Plugin not found") as info:
        NetworkFromOnnxPath(resolve_flavor("tensorrt-rtx"), path, plugin_override=True)()
    assert "--plugins" in info.value.fix


def test_plugin_library_recorded_in_manifest(bf16_build, tmp_path):
    """--moe plugin bundles ship the library at the path the runtime looks for, with its checksum in the manifest."""
    import dataclasses

    from nucleus_runtime.atomic import write_atomic
    from nucleus_runtime.bundle import PluginRecord, sha256_file

    from nucleus_export.build import copy_plugin_library
    from nucleus_export.graph.identity import record_bundle

    library = tmp_path / "libcustom_name.so"
    library.write_bytes(b"stand-in for the plugin library")
    bundle = tmp_path / "bundle"
    bundle.mkdir()
    info = copy_plugin_library(bundle, library, sha256_file(library))
    files, _ = record_bundle(bundle, [])
    manifest = dataclasses.replace(bf16_build[1], plugins=info, files=files)
    write_atomic(bundle / "manifest.json", manifest.to_json())
    relpath = "plugins/libnucleus_trt_plugins.so"
    assert info == PluginRecord(relpath, ["ExpertChoiceRouter", "MoECombine"], "nucleus", "1")
    assert load_manifest(bundle).plugins == info and manifest.files[relpath].sha256 == sha256_file(library)
    verify_files(bundle, load_manifest(bundle))
    (bundle / relpath).write_bytes(b"changed")
    with pytest.raises(NucleusError, match="does not match its checksum"):
        verify_files(bundle, load_manifest(bundle))


@pytest.mark.parametrize("combine", ["onehot", "chain"])
def test_both_combine_formulations_build(bf16_build, tmp_path, combine):
    """Each native combine parses into native layers and builds with TensorRT-RTX over the bundle's profile."""
    out, manifest = bf16_build[0], bf16_build[1]
    shutil.copy(out / "denoiser.onnx", tmp_path)
    path = write_engine_graph(tmp_path, "denoiser", LoweringRecord("native", combine), 8)
    shapes = profile_shapes(onnx_input_shapes(path), dim_ranges_from_profiles(manifest.profiles))
    report = EngineFromOnnx(NetworkFromOnnxPath(resolve_flavor("tensorrt-rtx"), path), BuildSettings(shapes),
                            tmp_path / "denoiser.plan", "denoiser")()
    assert report.engine_bytes > 0 and not report.network.plugin_layers
    gemms_with_one_hot = [g for g in report.network.gemms if "combined" in g.name]
    assert len(gemms_with_one_hot) == (len(MOE_BLOCKS) if combine == "onehot" else 0)


def test_inspect_built_bundle_counts_fused_attention(bf16_build):
    from nucleus_export.costs.bundle_cost import bundle_cost

    report = bundle_cost(bf16_build[0], "h100")
    assert report.engine_onnx == engine_onnx_file("denoiser") and not report.notes
    assert report.fused_attention_layers == report.blocks == 5
    assert report.combine == bf16_build[1].engine("denoiser").lowering.combine
