"""FP8 calibration: coverage of every quantized GEMM, calibration-file validation, the FP8 graph in ONNX Runtime."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from safetensors.numpy import save_file

from nucleus_export.errors import NucleusExportError
from nucleus_export.export import ExportOptions, export_bundle
from nucleus_export.graph.precision import Fp8Scales, GraphPrecision
from nucleus_export.parity.check import Tolerance, check_parity
from nucleus_export.quant import calibrate_fp8, load_calibration_prompts
from nucleus_export.quant.calibrate import quantized_linears

OPTIONS = dict(resolutions=[(128, 128), (96, 160)], max_text_len=32)


@pytest.fixture(scope="module")
def scales(tiny_checkpoint, tiny_reference):
    return calibrate_fp8(tiny_checkpoint, ExportOptions(**OPTIONS), size=2, steps=3, reference=tiny_reference)


def test_calibration_covers_every_quantized_gemm(tiny_checkpoint, scales):
    config = tiny_checkpoint.config
    experts = [f"transformer_blocks.{i}.img_mlp.experts.{w}" for i in config.moe_layers for w in ("gate_up_proj", "down_proj")]
    assert set(scales.activation_amax) == set(quantized_linears(config)) | set(experts)
    assert all(v > 0 for v in scales.activation_amax.values())
    assert len(scales.calibration["timesteps"]) > 2  # spread over the schedule
    assert scales.calibration["resolutions"] == ["128x128", "96x160"]


def test_fp8_graph_quality_in_onnxruntime(tiny_checkpoint, tiny_reference, scales, tmp_path):
    """fp32 compute with FP8 Q/DQ runs in ONNX Runtime as is; the router stays exact enough to agree mostly."""
    export_bundle(tiny_checkpoint, tmp_path / "fp8", ExportOptions(GraphPrecision("fp32", scales), **OPTIONS))
    model = onnx.load(str(tmp_path / "fp8" / "denoiser.onnx"))
    quantize = [n for n in model.graph.node if n.op_type == "QuantizeLinear"]
    assert len(quantize) == len(scales.activation_amax)
    assert not any(".img_mlp.gate" in n.name for n in model.graph.node if n.op_type in ("QuantizeLinear", "DequantizeLinear"))
    assert Fp8Scales.load(tmp_path / "fp8" / "fp8_scales.json") == scales
    report = check_parity(tiny_checkpoint, tmp_path / "fp8", Tolerance(0.25, 0.99, 0.9), reference=tiny_reference)
    assert report.passed, report.summary_lines()
    assert report.worst["sample_relative_error"] > 1e-4  # it really is quantized


def test_calibration_prompt_file_validation(tiny_checkpoint, tmp_path):
    config = tiny_checkpoint.config
    good = tmp_path / "good.safetensors"
    save_file({"prompt_embeds": np.zeros((3, 7, config.joint_attention_dim), np.float32)}, str(good))
    embeds, mask = load_calibration_prompts(good, config)
    assert embeds.shape == (3, 7, config.joint_attention_dim) and mask.shape == (3, 7) and mask.all()
    wide = tmp_path / "wide.safetensors"
    save_file({"prompt_embeds": np.zeros((3, 7, config.joint_attention_dim + 1), np.float32)}, str(wide))
    with pytest.raises(NucleusExportError, match=r"expected \[N, T, 64\]"):
        load_calibration_prompts(wide, config)
    bad_mask = tmp_path / "mask.safetensors"
    save_file(
        {"prompt_embeds": np.zeros((3, 7, config.joint_attention_dim), np.float32), "prompt_embeds_mask": np.ones((3, 6), np.int64)},
        str(bad_mask),
    )
    with pytest.raises(NucleusExportError, match="prompt_embeds_mask has shape"):
        load_calibration_prompts(bad_mask, config)
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(b"not a safetensors file")
    with pytest.raises(NucleusExportError, match="cannot read calibration prompts"):
        load_calibration_prompts(garbage, config)


def test_calibration_with_prompt_file(tiny_checkpoint, tiny_reference, tmp_path):
    config = tiny_checkpoint.config
    prompts = tmp_path / "prompts.safetensors"
    rng = np.random.default_rng(5)
    mask = np.ones((2, 9), np.int64)
    mask[1, 5:] = 0
    save_file({"prompt_embeds": rng.standard_normal((2, 9, config.joint_attention_dim)).astype(np.float32), "prompt_embeds_mask": mask}, str(prompts))
    scales = calibrate_fp8(tiny_checkpoint, ExportOptions(**OPTIONS), prompts=prompts, size=2, steps=2, reference=tiny_reference)
    assert scales.calibration["prompts"] == str(prompts)
    too_long = tmp_path / "long.safetensors"
    save_file({"prompt_embeds": np.zeros((1, 40, config.joint_attention_dim), np.float32)}, str(too_long))
    with pytest.raises(NucleusExportError, match="max text length"):
        calibrate_fp8(tiny_checkpoint, ExportOptions(**OPTIONS), prompts=too_long, size=1, steps=1, reference=tiny_reference)
