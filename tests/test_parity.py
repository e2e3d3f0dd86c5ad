"""Routing-aware parity: forced routing as a graph rewrite, near-tie classification, the fp32 gate at a default
~1 MP resolution, deterministic ONNX Runtime results on any thread count."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from nucleus_runtime.bundle import load_manifest
from onnx import numpy_helper

from nucleus_export.export import ExportOptions, export_bundle
from nucleus_export.model.checkpoint import open_checkpoint
from nucleus_export.model.tiny import write_checkpoint
from nucleus_export.parity.cases import batch_by_resolution, make_cases
from nucleus_export.parity.check import OnnxGraphs, check_parity, variants_of
from nucleus_export.moe.expert_choice import gamma, score_bounds
from nucleus_export.parity.routing import agreement, classify_flips

DEFAULT_1MP = [(1024, 1024)]


@pytest.fixture(scope="module")
def bundle_1mp(tiny_checkpoint, tmp_path_factory):
    out = tmp_path_factory.mktemp("parity") / "tiny-1mp"
    export_bundle(tiny_checkpoint, out, ExportOptions(resolutions=DEFAULT_1MP, max_text_len=32, opt_text_len=16))
    return out


def _graphs(bundle, threads=None, denoiser=None):
    model = denoiser if denoiser is not None else onnx.load(str(bundle / "denoiser.onnx"))
    return OnnxGraphs(variants_of(bundle / "text_kv.onnx", model), threads)


def test_forced_routing_is_exact_and_takes_effect(tiny_bundle, tiny_checkpoint):
    """Forcing the graph's own selections reproduces its end-to-end run bit for bit; forcing others changes it."""
    config = tiny_checkpoint.config
    graphs = _graphs(tiny_bundle)
    case, _ = batch_by_resolution(make_cases(config, load_manifest(tiny_bundle).profiles))[0]
    (text_kv,) = graphs.text_kv.run(None, case.text_kv_inputs(config))
    free_sel = graphs.free.run(graphs.variants.free_routing, case.denoiser_inputs(config, text_kv))
    out = graphs.run(case, config, free_sel)
    np.testing.assert_array_equal(out.forced_sample, out.sample)
    for mine, theirs in zip(out.own_selections, free_sel):
        np.testing.assert_array_equal(mine, theirs)
    shifted = [(sel + 1) % (case.grid[0] * case.grid[1]) for sel in free_sel]
    other = graphs.run(case, config, shifted)
    assert not np.allclose(other.forced_sample, out.sample)
    # The first MoE block sees the same upstream state whatever is forced, so its own choice and input do not move.
    np.testing.assert_array_equal(other.own_selections[0], free_sel[0])
    np.testing.assert_array_equal(other.gate_inputs[0], out.gate_inputs[0])
    assert not np.array_equal(other.gate_inputs[1], out.gate_inputs[1])


def test_score_bounds_follow_higham():
    rng = np.random.default_rng(0)
    x, w = rng.standard_normal((1, 5, 64)), rng.standard_normal((4, 64))
    logits = x @ w.T
    soft = np.exp(logits) / np.exp(logits).sum(-1, keepdims=True)
    u = 2.0**-24
    expected_logit = gamma(64) * (np.abs(x) @ np.abs(w).T)
    np.testing.assert_allclose(
        score_bounds(x, w, soft, "softmax"),
        soft * (expected_logit + (soft * expected_logit).sum(-1, keepdims=True)) + 6 * u * soft,
    )
    sig = 1 / (1 + np.exp(-logits))
    np.testing.assert_allclose(score_bounds(x, w, sig, "sigmoid"), sig * (1 - sig) * expected_logit + 3 * u * sig)
    # A measured input error adds its propagation through |W|.
    dx = np.full_like(x, 1e-6)
    np.testing.assert_allclose(
        score_bounds(x, w, sig, "sigmoid", input_error=dx),
        sig * (1 - sig) * (expected_logit + dx @ np.abs(w).T) + 3 * u * sig,
    )
    # float32 reordering really stays inside the bound: two summation orders of the same dot products.
    x32, w32 = x.astype(np.float32), w.astype(np.float32)
    forward = np.einsum("bsk,ek->bse", x32, w32)
    backward = np.einsum("bsk,ek->bse", x32[..., ::-1], w32[:, ::-1])
    assert np.all(np.abs(forward - backward) <= expected_logit)


def test_flips_are_classified_by_margin():
    # One row, one expert, 6 tokens, C = 2: the reference picks tokens 0 and 1.
    scores = np.array([0.9, 0.5, 0.5 - 1e-7, 0.3, 0.2, 0.1])[None, :, None]
    bounds = np.full_like(scores, 1e-7)
    expected = np.array([[[0, 1]]])
    assert classify_flips(expected, expected, scores, bounds) == (0, 0, 0.0, 0.0)
    flips, near, margin, ratio = classify_flips(np.array([[[0, 2]]]), expected, scores, bounds)
    assert (flips, near) == (1, 1) and margin == pytest.approx(1e-7) and ratio <= 1
    flips, near, margin, ratio = classify_flips(np.array([[[0, 3]]]), expected, scores, bounds)
    assert (flips, near) == (1, 0) and margin == pytest.approx(0.2) and ratio > 1e5
    assert agreement(np.array([[[0, 3]]]), expected) == 0.5


def test_fp32_gate_at_default_resolution(bundle_1mp, tiny_checkpoint, tiny_reference):
    """1024x1024 (4096 image tokens) on the tiny model: forced error is float32 noise, no flip beyond a near-tie,
    and repeated runs on other thread counts give the same report."""
    reports = [check_parity(tiny_checkpoint, bundle_1mp, reference=tiny_reference, threads=t) for t in (1, 2)]
    for report in reports:
        assert report.passed, report.summary_lines()
        assert report.worst["forced_relative_error"] <= 1e-5
        assert report.flips["decided_flips"] == 0
    assert [c.sample.relative_error for c in reports[0].cases] == [c.sample.relative_error for c in reports[1].cases]


def test_gate_fails_on_a_flip_that_is_not_a_near_tie(bundle_1mp, tiny_checkpoint, tiny_reference):
    """A router gate off by 2% (a real export bug, far above rounding) flips decided selections: the gate fails."""
    model = onnx.load(str(bundle_1mp / "denoiser.onnx"))
    layer = tiny_checkpoint.config.moe_layers[0]
    gate = next(i for i in model.graph.initializer if i.name.startswith(f"transformer_blocks.{layer}.img_mlp.gate.weight"))
    weight = numpy_helper.to_array(gate).copy()
    weight[:, 0] *= 1.02
    gate.CopyFrom(numpy_helper.from_array(weight, gate.name))
    cases = make_cases(tiny_checkpoint.config, load_manifest(bundle_1mp).profiles)[:1]
    report = check_parity(
        tiny_checkpoint, bundle_1mp, variants=variants_of(bundle_1mp / "text_kv.onnx", model),
        reference=tiny_reference, cases=cases,
    )
    assert report.flips["decided_flips"] > 0
    assert not report.passed
    assert any("beyond rounding" in f for f in report.failures())


SIGMOID_GQA = {"use_sigmoid": True, "num_experts": 16, "num_key_value_heads": 1, "capacity_factors": [0.0, 0.0, 0.0, 2.0, 1.5]}


def test_fp32_gate_at_default_resolution_other_architecture(tmp_path):
    checkpoint = open_checkpoint(write_checkpoint(tmp_path / "ckpt", SIGMOID_GQA, seed=11))
    export_bundle(checkpoint, tmp_path / "b", ExportOptions(resolutions=[(1024, 1024), (768, 1344)], max_text_len=16))
    cases = make_cases(checkpoint.config, load_manifest(tmp_path / "b").profiles, case_set="quick")
    report = check_parity(checkpoint, tmp_path / "b", cases=cases)
    assert report.passed, report.summary_lines()
    assert report.worst["forced_relative_error"] <= 1e-5


def test_denoiser_is_bitwise_deterministic_on_any_thread_count(bundle_1mp, tiny_checkpoint):
    """ONNX Runtime's ScatterND-add races across threads when indices repeat; the combine avoids it, so latents are
    the same bits on 1, 2 and 4 threads and on every repeat."""
    from nucleus_runtime.backends.onnxruntime import OrtBackend, OrtOptions

    config = tiny_checkpoint.config
    case = make_cases(config, load_manifest(bundle_1mp).profiles)[1]  # batch 2: two rows of tokens chosen twice
    outputs = []
    for threads in (1, 2, 4, 2):
        backend = OrtBackend(bundle_1mp, OrtOptions(threads=threads, device="cpu"))
        kv_inputs = case.text_kv_inputs(config)
        text_kv = backend.compute_text_kv(*(kv_inputs[k] for k in ("encoder_hidden_states", "txt_rope_cos", "txt_rope_sin")))
        inputs = case.denoiser_inputs(config, text_kv.to_numpy())
        outputs += [
            backend.denoise(inputs["hidden_states"], inputs["timestep"], inputs["img_rope_cos"], inputs["img_rope_sin"],
                            text_kv, inputs["encoder_hidden_states_mask"])
            for _ in range(2)
        ]
    for out in outputs[1:]:
        np.testing.assert_array_equal(out, outputs[0])
