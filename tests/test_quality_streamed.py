"""Fidelity at real scale: diffusers block by block (bitwise the whole model), the graph segment by segment (the same
report as the whole graph), the memory the real model's report needs, the default FP8 recipe, the engine check's
control flow (stand-ins for TensorRT: no GPU here) and image metrics."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
from nucleus_runtime.bundle import LoweringRecord
from nucleus_runtime.contract import GemmMode

from nucleus_export.errors import NucleusExportError
from nucleus_export.export import ExportOptions, export_bundle
from nucleus_export.graph.precision import GraphPrecision, QuantRecipe
from nucleus_export.model.checkpoint import Checkpoint, TensorInfo, WeightStore, expected_parameter_shapes
from nucleus_export.model.config import ModelConfig
from nucleus_export.model.reference import BlockwiseReference
from nucleus_export.model.synthetic import nucleus_image_config
from nucleus_export.parity.check import Tolerance, bf16_copy
from nucleus_export.parity.quality import check_quality_memory, quality_memory_estimate, quality_report, report_groups

NATIVE = LoweringRecord("native", "chain")


def _inputs(config, batch=2, grid=(8, 8), text=8, seed=0):
    rng = np.random.default_rng(seed)
    mask = np.ones((batch, text), np.int64)
    mask[-1, text // 2:] = 0
    return (rng.standard_normal((batch, grid[0] * grid[1], config.in_channels)).astype(np.float32), grid,
            rng.standard_normal((batch, text, config.joint_attention_dim)).astype(np.float32), mask,
            np.linspace(0.9, 0.2, batch).astype(np.float32))


def _whole(model, hs, grid, ehs, mask, ts, dtype=torch.float32):
    with torch.no_grad():
        return model(hidden_states=torch.from_numpy(hs).to(dtype), img_shapes=[(1, *grid)] * hs.shape[0],
                     encoder_hidden_states=torch.from_numpy(ehs).to(dtype), encoder_hidden_states_mask=torch.from_numpy(mask),
                     timestep=torch.from_numpy(ts).to(dtype), return_dict=False)[0].float().numpy()


def test_streamed_reference_is_bitwise_the_whole_model(tiny_checkpoint, tiny_reference):
    """One block's weights at a time, read from the safetensors: the same bits as diffusers' whole model, in float32
    and in bf16 (against bf16_copy, the baseline's model), and the blocks are freed after use."""
    inputs = _inputs(tiny_checkpoint.config)
    streamed = BlockwiseReference(tiny_checkpoint, device="cpu")
    np.testing.assert_array_equal(streamed.forward(*inputs), _whole(tiny_reference, *inputs))
    assert all(p.is_meta for p in streamed.model.transformer_blocks.parameters())
    assert not any(p.is_meta for n, p in streamed.model.named_parameters() if not n.startswith("transformer_blocks."))
    low = BlockwiseReference(tiny_checkpoint, dtype=torch.bfloat16, device="cpu")
    np.testing.assert_array_equal(low.forward(*inputs), _whole(bf16_copy(tiny_reference), *inputs, dtype=torch.bfloat16))
    # A whole model run block by block is the same too.
    np.testing.assert_array_equal(BlockwiseReference(tiny_checkpoint, model=tiny_reference).forward(*inputs),
                                  _whole(tiny_reference, *inputs))


@pytest.fixture(scope="module")
def bf16_bundle(tiny_checkpoint, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("streamed") / "bf16"
    export_bundle(tiny_checkpoint, out, ExportOptions(GraphPrecision("bf16"), resolutions=[(256, 256)], max_text_len=16))
    return out


def test_segmented_report_is_the_whole_graph_report(tiny_checkpoint, tiny_reference, bf16_bundle):
    """The graph cut into one segment per block, one ONNX Runtime session at a time, one batch row per run, and
    diffusers streamed from the checkpoint: the report of the whole graph against the whole model."""
    precision = GraphPrecision("bf16")
    whole = quality_report(tiny_checkpoint, bf16_bundle, precision, NATIVE, reference=tiny_reference, groups=[(0, 5)],
                           max_rows=None)
    per_block = [(i, i + 1) for i in range(tiny_checkpoint.config.num_layers)]
    cut = quality_report(tiny_checkpoint, bf16_bundle, precision, NATIVE, groups=per_block, max_rows=1)
    assert "5 segments" in cut.note and "block by block" in cut.note
    assert cut.images == {} and "no image scores" in cut.note  # a transformer folder alone has no VAE
    for a, b in zip(whole.cases, cut.cases, strict=True):
        assert a.name == b.name
        for field in ("sample", "forced", "text_kv", "baseline"):
            assert getattr(b, field).relative_error == pytest.approx(getattr(a, field).relative_error, rel=1e-5, abs=1e-9)
        assert {k: (r.agreement, r.forced_agreement, r.flips, r.near_ties) for k, r in a.routing.items()} == \
               {k: (r.agreement, r.forced_agreement, r.flips, r.near_ties) for k, r in b.routing.items()}
        assert a.baseline_routing == b.baseline_routing
    assert whole.passed == cut.passed


def test_report_groups_keep_segments_small(monkeypatch):
    from nucleus_export.parity import quality

    monkeypatch.setattr(quality, "block_weight_bytes", lambda _m: ([100, 100, 900, 50], 10))
    assert report_groups(None, 2000) == [(0, 4)]
    assert report_groups(None, 1000) == [(0, 1), (1, 2), (2, 3), (3, 4)]


def _header_only_checkpoint(layers: int) -> Checkpoint:
    """The real architecture's tensor list (bf16) without any file: what the memory estimate reads."""
    config = ModelConfig.from_dict(nucleus_image_config(layers))
    infos, offset = {}, 0
    for name, shape in expected_parameter_shapes(config).items():
        nbytes = math.prod(shape) * 2
        infos[name] = TensorInfo(Path("/nonexistent"), "BF16", shape, offset, offset + nbytes)
        offset += nbytes
    return Checkpoint(Path("/nonexistent"), None, config, WeightStore(infos))


def test_real_model_report_fits_the_build_budget(monkeypatch):
    """The streamed report of the real 32 blocks at 1024x1024 is predicted within 0.5 x checkpoint + 2 GB (the
    build's budget; measured in docs/quality.md), the same at any depth (one block at a time), and the check refuses
    only when memory is short."""
    checkpoint = _header_only_checkpoint(32)
    ckpt_bytes = sum(i.nbytes for i in (checkpoint.weights.info(n) for n in checkpoint.weights))
    assert quality_memory_estimate(checkpoint, 4096) <= 0.5 * ckpt_bytes + 2e9
    assert quality_memory_estimate(_header_only_checkpoint(8), 4096) == quality_memory_estimate(checkpoint, 4096)
    import psutil

    class _Memory:
        available = 2 << 30

    monkeypatch.setattr(psutil, "virtual_memory", lambda: _Memory())
    with pytest.raises(NucleusExportError, match="one block at a time"):
        check_quality_memory(checkpoint)


def test_default_recipe_by_position_and_kind():
    from nucleus_export.quant.default_recipe import DEFAULT_RULES, apply_default_recipe, default_modes
    from nucleus_export.quant.gemms import fp8_share, gemm_groups

    config = ModelConfig.from_dict(nucleus_image_config())
    modes = default_modes(config)
    assert set(modes) == {g.name for g in gemm_groups(config)}
    assert all(m == GemmMode.COMPUTE for g, m in modes.items() if g.startswith("transformer_blocks.0/"))
    # MoE blocks 3..31: the first 14 are early (bf16), blocks 17..30 late, 31 the last.
    assert modes["transformer_blocks.16/experts"] == GemmMode.COMPUTE
    assert modes["transformer_blocks.17/experts"] == modes["transformer_blocks.31/experts"] == GemmMode.FP8_WEIGHTS
    assert modes["transformer_blocks.17/attn_qkv"] == GemmMode.FP8 and modes["transformer_blocks.1/attn_out"] == GemmMode.FP8
    assert (("experts", "late-moe") in DEFAULT_RULES) and modes["transformer_blocks.20/shared_expert"] == GemmMode.COMPUTE
    names = [gemm for g in gemm_groups(config) for gemm in g.gemms]
    recipe = apply_default_recipe(QuantRecipe(dict.fromkeys(names, 1.0)), config)
    assert recipe.calibration["recipe"] == "nucleus-default-1"
    share = fp8_share(config, recipe)
    assert 0.4 < share.weight_bytes < 0.6  # the late experts' bytes
    for group in gemm_groups(config):
        assert all(recipe.mode(g) == modes[group.name] for g in group.gemms)


# ---- the engine check: control flow with stand-ins (no GPU here) ---------------------------------------------------


def test_engine_check_runs_a_backend_against_diffusers(tiny_checkpoint, tiny_bundle):
    """`check --backend tensorrt` opens the runtime's backend and holds its outputs to diffusers float32 with the
    bf16 baseline; the ONNX Runtime backend stands in for TensorRT (no GPU here), so the fp32 bundle must match."""
    from nucleus_runtime.backends.onnxruntime import OrtBackend, OrtOptions

    from nucleus_export.parity.cases import make_cases
    from nucleus_export.parity.engines import check_engines
    from nucleus_runtime.bundle import load_manifest

    cases = make_cases(tiny_checkpoint.config, load_manifest(tiny_bundle).profiles, case_set="quick")
    backend = OrtBackend(tiny_bundle, OrtOptions(threads=2, device="cpu"))
    report = check_engines(tiny_checkpoint, tiny_bundle, backend, Tolerance(), "fp32 (stand-in)", cases=cases, device="cpu")
    assert report.passed, report.summary_lines()
    assert report.worst["sample_relative_error"] < 1e-4 and report.worst["text_kv_relative_error"] < 1e-5
    assert all(c.baseline is not None and c.baseline.relative_error > 1e-4 for c in report.cases)
    assert "not observable from plans" in report.note


def test_engine_check_scores_the_engines_images(toy_bundle):
    """With the pipeline's VAE, the engine check decodes the engines' x0 estimates too (the ONNX Runtime backend
    standing in for TensorRT): an fp32 bundle's images are float32's, diffusers bf16's are not."""
    from nucleus_runtime.backends.onnxruntime import OrtBackend, OrtOptions
    from nucleus_runtime.bundle import load_manifest
    from toy_pipeline import allow_processor_without_torchvision, ensure_toy_pipeline

    from nucleus_export.model.specs import open_model
    from nucleus_export.parity.cases import make_cases
    from nucleus_export.parity.engines import check_engines

    with allow_processor_without_torchvision():
        checkpoint = open_model(ensure_toy_pipeline())
    cases = make_cases(checkpoint.config, load_manifest(toy_bundle).profiles, case_set="quick")
    backend = OrtBackend(toy_bundle, OrtOptions(threads=2, device="cpu"))
    report = check_engines(checkpoint, toy_bundle, backend, Tolerance(), "fp32 (stand-in)", cases=cases, device="cpu")
    graph, baseline = report.images["graph"], report.images["diffusers bf16"]
    assert (graph["psnr"] is None or graph["psnr"] > 48) and graph["ssim"] > 0.9999
    assert baseline["psnr"] is not None and baseline["psnr"] < (graph["psnr"] or math.inf)
    assert "decoded by diffusers' float32 VAE" in report.note


@pytest.fixture(scope="module")
def segmented_bundle(tiny_checkpoint, tmp_path_factory) -> Path:
    """fp32 bundle of the tiny model with its denoiser cut into three segments."""
    out = tmp_path_factory.mktemp("bundles") / "tiny-3-segments"
    export_bundle(tiny_checkpoint, out, ExportOptions(resolutions=[(128, 128), (96, 160)], max_text_len=16, segments=3))
    return out


def _segment_check(checkpoint, bundle, backend):
    from nucleus_runtime.bundle import load_manifest

    from nucleus_export.parity.cases import make_cases
    from nucleus_export.parity.engines import check_engines

    cases = make_cases(checkpoint.config, load_manifest(bundle).profiles, case_set="quick")
    return check_engines(checkpoint, bundle, backend, Tolerance(), "fp32 (stand-in)", cases=cases, device="cpu")


def test_engine_check_compares_each_segment(tiny_checkpoint, segmented_bundle):
    """A cut denoiser is compared segment by segment: in sequence (the units chained, which is what `denoise`
    computes: the last one's output is the end-to-end sample) and alone on float32's residual stream."""
    import json

    from nucleus_runtime.backends.onnxruntime import OrtBackend, OrtOptions
    from nucleus_runtime.bundle import load_manifest

    units = load_manifest(segmented_bundle).unit_records("denoiser")
    report = _segment_check(tiny_checkpoint, segmented_bundle, OrtBackend(segmented_bundle, OrtOptions(threads=2, device="cpu")))
    assert report.passed, report.summary_lines()
    assert [s["name"] for s in report.segments] == [u.name for u in units] and len(units) == 3
    for case in report.cases:
        first, last = case.segments[0], case.segments[-1]
        assert first.alone == first.in_sequence  # the first segment's input is the case's own
        assert last.in_sequence.relative_error == pytest.approx(case.sample.relative_error, rel=1e-9, abs=1e-12)
        assert all(s.alone.relative_error < 1e-4 and s.in_sequence.relative_error < 1e-4 for s in case.segments)
    assert [s["blocks"] for s in json.loads(report.to_json())["segments"]] == [list(u.blocks) for u in units]
    assert any(line.startswith("per segment vs float32") for line in report.summary_lines())


def test_engine_check_places_an_error_in_its_segment(tiny_checkpoint, segmented_bundle):
    """A backend whose middle segment is off: that segment is off alone, the one after it only in sequence."""
    from nucleus_runtime.backends.onnxruntime import OrtBackend, OrtOptions

    class OffInTheMiddle(OrtBackend):
        def run_denoiser_unit(self, index, inputs, text_kv):
            out = super().run_denoiser_unit(index, inputs, text_kv)
            return {n: v * 1.01 if index == 1 and v.dtype == np.float32 else v for n, v in out.items()}

    report = _segment_check(tiny_checkpoint, segmented_bundle, OffInTheMiddle(segmented_bundle, OrtOptions(threads=2, device="cpu")))
    first, middle, last = ({k: s[k]["relative_error"] for k in ("in_sequence", "alone")} for s in report.segments)
    assert max(first.values()) < 1e-4
    assert middle["alone"] > 5e-3 and middle["in_sequence"] > 5e-3
    assert last["in_sequence"] > 1e-3 and last["alone"] < 1e-4


def test_bf16_bits_round_to_nearest_even():
    from nucleus_export.parity.engines import _as_float32, _in_form_of

    values = torch.randn(4096, dtype=torch.float32) * 10
    expected = values.to(torch.bfloat16).float().numpy()
    bits = _in_form_of(values.numpy(), np.zeros(1, np.uint16))
    assert bits.dtype == np.uint16 and np.array_equal(_as_float32(bits), expected)
    assert np.array_equal(_in_form_of(values.numpy(), np.zeros(1, np.float16)), values.numpy().astype(np.float16))


def test_engine_check_refuses_clearly_without_engines_or_gpu(tiny_bundle):
    from nucleus_export.parity.engines import open_engine_backend

    with pytest.raises(NucleusExportError, match="holds no tensorrt engines"):
        open_engine_backend(tiny_bundle, "tensorrt")


def test_polygraphy_comparison_control_flow(tiny_checkpoint, tiny_bundle):
    """Polygraphy's Comparator over two runners on the same inputs (ONNX Runtime on both sides here; on a GPU the
    first is TrtRunner over the plan)."""
    pytest.importorskip("polygraphy")
    from polygraphy.backend.onnxrt import OnnxrtRunner, SessionFromOnnx

    from nucleus_export.parity.cases import make_cases
    from nucleus_export.parity.engines import polygraphy_compare
    from nucleus_runtime.bundle import load_manifest

    case = make_cases(tiny_checkpoint.config, load_manifest(tiny_bundle).profiles, case_set="quick")[0]
    inputs = case.text_kv_inputs(tiny_checkpoint.config)

    def runners(onnx_path):
        return [OnnxrtRunner(SessionFromOnnx(str(onnx_path)), name="stand-in-engine"),
                OnnxrtRunner(SessionFromOnnx(str(tiny_bundle / "text_kv.onnx")), name="onnxrt")]

    result = polygraphy_compare(tiny_bundle, "text_kv", "tensorrt", inputs, runners=runners)
    assert result.passed and result.outputs["text_kv"]["max_abs_error"] < 1e-5
    assert result.summary_line().startswith("polygraphy text_kv: PASS")


def test_check_backend_cli_without_engines_is_one_line(tiny_bundle, capsys):
    from nucleus_export.cli import main

    code = main(["check", "--model", "tiny", "--bundle", str(tiny_bundle), "--backend", "tensorrt", "--cases", "quick"])
    err = capsys.readouterr().err
    assert code != 0 and "holds no tensorrt engines" in err


# ---- images ----------------------------------------------------------------------------------------------------------


def test_x0_estimate_is_the_pipelines_step_to_sigma_zero():
    """diffusers' pipeline negates the transformer's output before the FlowMatch Euler step; one step from sigma to 0
    is the clean-latent estimate the images are decoded from."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    from nucleus_export.parity.images import x0_estimate

    rng = np.random.default_rng(0)
    for sigma in (0.95, 0.5, 0.05):
        scheduler = FlowMatchEulerDiscreteScheduler(shift=1.0)
        scheduler.set_timesteps(sigmas=[sigma])
        x, output = (torch.from_numpy(rng.standard_normal((2, 6, 8)).astype(np.float32)) for _ in range(2))
        step = scheduler.step(-output, scheduler.timesteps[0], x, return_dict=False)[0].numpy()
        timestep = (scheduler.timesteps[:1] / scheduler.config.num_train_timesteps).numpy().repeat(2)
        np.testing.assert_allclose(x0_estimate(x.numpy(), output.numpy(), timestep), step, rtol=1e-6, atol=1e-6)


def test_psnr_ssim_and_their_pooling():
    from nucleus_export.parity.compare import ImageScore
    from nucleus_export.parity.images import psnr, ssim

    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (2, 24, 32, 3)).astype(np.uint8)
    smooth = np.repeat(np.repeat(image[:, ::4, ::4], 4, axis=1), 4, axis=2)
    first = lambda x: np.moveaxis(x, -1, -3)  # noqa: E731  (ssim takes channel-first images)
    assert psnr(image, image) is None and ssim(first(image), first(image)) == pytest.approx(1.0)
    noisy = np.clip(smooth.astype(np.int16) + rng.integers(-3, 4, smooth.shape), 0, 255).astype(np.uint8)
    assert psnr(noisy, smooth) == pytest.approx(10 * np.log10(255**2 / np.mean((noisy - smooth.astype(float)) ** 2)))
    assert 0.8 < ssim(first(noisy), first(smooth)) < 1.0 and abs(ssim(first(image), first(smooth[::-1]))) < 0.2
    # Pooled over cases: the PSNR of all pixels together and the pixel-weighted SSIM, as one score of everything.
    parts = [ImageScore.of(noisy[:1], smooth[:1]), ImageScore.of(noisy[1:], smooth[1:])]
    whole = ImageScore.of(noisy, smooth)
    assert ImageScore.pooled(parts) == pytest.approx({"psnr": whole.psnr, "ssim": whole.ssim})


@pytest.fixture(scope="module")
def other_pipeline():
    """The toy pipeline of other dimensions (sigmoid routing, 6 experts, a VAE scaling by 4): a model with a VAE."""
    from toy_pipeline import allow_processor_without_torchvision, ensure_toy_pipeline

    from nucleus_export.model.specs import open_model

    with allow_processor_without_torchvision():
        return open_model(ensure_toy_pipeline("other"))


def test_report_scores_decoded_images_next_to_diffusers_bf16(other_pipeline, tmp_path):
    """With a VAE beside the transformer, the report decodes every case's x0 estimate (graph, diffusers float32 and
    bf16) and gives PSNR and SSIM against float32's images, per case and pooled, in parity.json too."""
    import json

    from nucleus_runtime.contract import PARITY_NAME

    from nucleus_export.parity.check import write_report

    out = tmp_path / "bf16"
    export_bundle(other_pipeline, out, ExportOptions(GraphPrecision("bf16"), resolutions=[(64, 64)], max_text_len=16,
                                                     stages=("denoiser",)))  # fmt: skip
    report = quality_report(other_pipeline, out, GraphPrecision("bf16"), NATIVE, case_set="quick")
    assert "decoded by diffusers' float32 VAE" in report.note
    assert set(report.images) == {"graph", "diffusers bf16"}
    for label, score in report.images.items():
        # bf16 moves the latents by ~1e-2: visible in 8-bit images, far from noise.
        assert score["psnr"] is not None and 20 < score["psnr"] < 90, (label, score)
        assert 0.5 < score["ssim"] < 1.0, (label, score)
    for case in report.cases:  # every row of every case decoded to a 64x64 RGB image per side
        rows = 1 if "/b1/" in case.name else 2
        assert case.images is not None and {s.values for s in case.images.values()} == {rows * 64 * 64 * 3}
    assert any(line.startswith("decoded x0 estimates vs float32's") for line in report.summary_lines())
    written = json.loads(write_report(out, {"bf16": report}).read_text())["bf16"]
    assert written["images"] == report.images and (out / PARITY_NAME).is_file()
    skipped = quality_report(other_pipeline, out, GraphPrecision("bf16"), NATIVE, case_set="quick", images=False)
    assert skipped.images == {} and "image scores skipped" in skipped.note


def test_streamed_calibration_measures_what_the_whole_model_does(tiny_checkpoint, tiny_reference):
    """FP8 calibration block by block from the checkpoint (what the 17B model needs) records the same amax as the
    whole model in memory."""
    from nucleus_export.export import build_profiles
    from nucleus_export.quant import calibrate_fp8

    profiles = build_profiles(tiny_checkpoint.config, ExportOptions(resolutions=[(128, 128)], max_text_len=16))
    whole = calibrate_fp8(tiny_checkpoint, profiles, size=1, steps=2, reference=tiny_reference)
    streamed = calibrate_fp8(tiny_checkpoint, profiles, size=1, steps=2)
    assert streamed.activation_amax == whole.activation_amax
