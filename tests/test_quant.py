"""FP8 calibration: coverage of every quantized GEMM, calibration-file validation, the FP8 graph in ONNX Runtime."""

from __future__ import annotations

import dataclasses

import numpy as np
import onnx
import pytest
from safetensors.numpy import save_file

from nucleus_export.errors import NucleusExportError
from nucleus_export.export import ExportOptions, export_bundle
from nucleus_export.graph.precision import Fp8Scales, GraphPrecision
from nucleus_export.model.checkpoint import open_checkpoint
from nucleus_export.model.tiny import random_weight, write_checkpoint
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
    tolerance = Tolerance(max_relative_error=None, max_forced_relative_error=None, min_cosine=0.99, near_ties_only=False)
    report = check_parity(tiny_checkpoint, tmp_path / "fp8", tolerance, reference=tiny_reference)
    assert report.passed, report.summary_lines()
    assert report.worst["sample_relative_error"] > 1e-4  # it really is quantized


def test_kept_blocks_stay_in_compute_precision(tiny_checkpoint, scales, tmp_path):
    kept = dataclasses.replace(scales, keep=("transformer_blocks.4",))
    export_bundle(tiny_checkpoint, tmp_path / "fp8", ExportOptions(GraphPrecision("bf16", kept), **OPTIONS))
    model = onnx.load(str(tmp_path / "fp8" / "denoiser.onnx"), load_external_data=False)
    quantized = {n.name.split("/")[0] for n in model.graph.node if n.op_type == "QuantizeLinear"}
    assert quantized and not any(name.startswith("transformer_blocks.4") for name in quantized)
    expected = [k for k in scales.activation_amax if not k.startswith("transformer_blocks.4.")]
    assert sum(n.op_type == "QuantizeLinear" for n in model.graph.node) == len(expected)
    assert Fp8Scales.load(tmp_path / "fp8" / "fp8_scales.json") == kept


def _plain_init(name, shape, seed):
    """std 1/sqrt(fan_in) in every matrix, the router gate included (closer scores than the tiny model's gate)."""
    weight = random_weight(name, shape, seed)
    return weight / 4 if name.endswith("img_mlp.gate.weight") else weight


RANDOM_ARCHITECTURES = {
    "sigmoid": {"use_sigmoid": True},
    "16-experts-gqa4": {"num_experts": 16, "num_key_value_heads": 1, "capacity_factors": [0.0, 0.0, 0.0, 2.0, 4.0]},
    "4-experts-mha-sigmoid": {"num_experts": 4, "num_key_value_heads": 4, "dense_moe_strategy": "leave_first_block_dense",
                              "capacity_factors": [0.0, 1.0, 2.0, 2.0, 1.0], "use_sigmoid": True},
}


@pytest.mark.parametrize("arch", sorted(RANDOM_ARCHITECTURES))
def test_fp8_no_worse_than_diffusers_bf16_on_unseen_architectures(arch, tmp_path):
    """Random weights the toolkit was never tuned on: bf16 and FP8 graphs, as built (MoE lowered, bf16 emulated),
    against float32 truth pass the default gate (no worse than diffusers in bf16); FP8 costs more than bf16."""
    from nucleus_export.model.reference import load_reference
    from nucleus_export.parity.quality import quality_report

    checkpoint = open_checkpoint(write_checkpoint(tmp_path / "ckpt", RANDOM_ARCHITECTURES[arch], seed=5, init=_plain_init))
    reference = load_reference(checkpoint)
    options = {"resolutions": [(256, 256)], "max_text_len": 16}
    scales = calibrate_fp8(checkpoint, ExportOptions(**options), size=2, steps=3, reference=reference)
    pooled = {}
    for label, precision in (("bf16", GraphPrecision("bf16")), ("bf16+fp8", GraphPrecision("bf16", scales))):
        export_bundle(checkpoint, tmp_path / label, ExportOptions(precision, **options))
        report = quality_report(checkpoint, tmp_path / label, label, "bf16", precision.fp8 is not None,
                                moe_lowering="native", reference=reference)
        assert report.passed, report.summary_lines()
        pooled[label] = report.pooled["graph"]["relative_error"]
    assert pooled["bf16"] < pooled["bf16+fp8"]
    print(f"{arch}: bf16 {pooled['bf16']:.3e}, fp8 {pooled['bf16+fp8']:.3e}, ratio {pooled['bf16+fp8'] / pooled['bf16']:.2f}")


@pytest.mark.slow
def test_fp8_sensitivity_keeps_the_most_sensitive_blocks(tiny_checkpoint, tiny_reference, scales):
    from nucleus_export.quant.sensitivity import select_bf16_blocks

    chosen, sensitivity = select_bf16_blocks(tiny_checkpoint, scales, reference=tiny_reference)
    blocks = list(range(tiny_checkpoint.config.num_layers))
    assert sorted(sensitivity.ranking) == blocks and set(sensitivity.per_block) == set(blocks)
    kept = sensitivity.chosen.keep
    assert len(kept) <= (len(blocks) + 1) // 2
    assert set(kept) == set(sensitivity.ranking[: len(kept)])  # the most sensitive ones
    assert chosen.keep == tuple(f"transformer_blocks.{b}" for b in kept)
    assert sensitivity.bf16.relative_error < sensitivity.all_fp8.relative_error
    assert sensitivity.chosen.relative_error <= sensitivity.all_fp8.relative_error
    assert chosen.calibration["sensitivity"]["ranking"] == sensitivity.ranking
    print(sensitivity.summary())


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
