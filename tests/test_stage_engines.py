"""Engines and runtime of the pipeline's other stages: `build` from a pipeline root builds text_encoder.plan (or its
segments) and vae_decoder.plan with profiles derived from the manifest; the text encoder cut to the build-memory
budget runs in segments with exactly the full graph's results; both backends say what a stage costs to load.

Two pipelines of tiny random components of the real classes saved in the real layout: the toy pipeline
(tests/toy_pipeline.py: GQA text encoder, return_index -8, 8x VAE) and a variant with an MHA text encoder
(attention biases, heads x head_dim != hidden, return_index -1, so the final norm) and diffusers' 4x dummy VAE.
Engines are real TensorRT-RTX builds on the CPU; ONNX Runtime runs the fp32 bundles. The TensorRT backend cannot run
here (no GPU): its binding logic is checked on stand-in engines and contexts, as tests/test_segments.py does.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from nucleus_runtime.backends.base import BackendOptions
from nucleus_runtime.backends.onnxruntime import OrtBackend, OrtOptions, OrtTensor
from nucleus_runtime.bundle import FileRecord, load_manifest, verify_files
from nucleus_runtime.contract import (
    ATTENTION_MASK,
    INPUT_IDS,
    KEY_VALUES,
    PAST_KEY_VALUES,
    PROMPT_EMBEDS,
    PROMPT_TEMPLATE_FILE,
    TOKENIZER_FILE,
    engine_onnx_file,
    plan_file,
)
from nucleus_runtime.errors import NucleusError
from nucleus_runtime.tokenizer import PromptTokenizer
from toy_pipeline import allow_processor_without_torchvision, ensure_toy_pipeline

from nucleus_export.build import BuildOptions, build_bundle
from nucleus_export.costs.build_memory import BUILD_BASE_BYTES, BUILD_BYTES_PER_WEIGHT_BYTE
from nucleus_export.engines.profiles import dim_ranges_from_manifest
from nucleus_export.errors import NucleusExportError
from nucleus_export.export import ExportOptions
from nucleus_export.graph.precision import GraphPrecision
from nucleus_export.model.checkpoint import open_checkpoint
from nucleus_export.model.text_encoder import write_tiny_text_encoder
from nucleus_export.model.vae import VaeConfig, write_random_vae

pytest.importorskip("tensorrt_rtx")

RESOLUTIONS = [(128, 128), (96, 160)]
# The toy tokenizer is character-level: the pipeline's template prefix alone is ~280 tokens.
MAX_TEXT_LEN, OPT_TEXT_LEN = 384, 320
ALL_STAGES = ("text_encoder", "text_kv", "denoiser", "vae_decoder")
# The variant pipeline's text encoder: MHA, biases, heads x head_dim (96) != hidden (64, the tiny transformer's text
# width), every layer and the final norm (return_index -1).
MHA_TEXT = {"hidden_size": 64, "intermediate_size": 96, "num_hidden_layers": 3, "num_attention_heads": 4,
            "num_key_value_heads": 4, "head_dim": 24, "attention_bias": True,
            "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [6, 3, 3]}}
MHA_RETURN_INDEX = -1
DUMMY_4X_VAE = VaeConfig(base_dim=24, z_dim=16, dim_mult=(1, 2, 4), num_res_blocks=1, temperal_downsample=(False, True))
PROMPTS = ["a red cube", "two cats on a sofa, the left one black"]


@pytest.fixture(scope="module", autouse=True)
def processor_loads():
    with allow_processor_without_torchvision():
        yield


@pytest.fixture(scope="module")
def toy_root() -> Path:
    return ensure_toy_pipeline()


@pytest.fixture(scope="module")
def variant_root(toy_root, tmp_path_factory) -> Path:
    """The toy pipeline with its text encoder and VAE replaced (same processor, scheduler and transformer)."""
    root = tmp_path_factory.mktemp("variant") / "pipeline"
    root.mkdir()
    for name in ("model_index.json", "processor", "scheduler", "transformer"):
        (shutil.copytree if (toy_root / name).is_dir() else shutil.copy)(toy_root / name, root / name)
    vocab = json.loads((toy_root / "text_encoder" / "config.json").read_text())["text_config"]["vocab_size"]
    write_tiny_text_encoder(root / "text_encoder", {**MHA_TEXT, "vocab_size": vocab}, seed=2)
    write_random_vae(root / "vae", DUMMY_4X_VAE, seed=3)
    return root


def _options(precision: str, **kw) -> ExportOptions:
    return ExportOptions(precision=GraphPrecision(precision), resolutions=RESOLUTIONS, max_text_len=MAX_TEXT_LEN,
                         opt_text_len=OPT_TEXT_LEN, **kw)


def _build(root: Path, out: Path, precision: str, options: BuildOptions | None = None, **kw):
    options = options or BuildOptions(flavor="tensorrt-rtx", quality=False)
    manifest, reports, _ = build_bundle(open_checkpoint(root), out, _options(precision, **kw), options)
    return out, manifest, {r.graph: r for r in reports}


@pytest.fixture(scope="module")
def bf16_build(toy_root, tmp_path_factory):
    return _build(toy_root, tmp_path_factory.mktemp("stages") / "bf16", "bf16")


# A budget of 200 kB of weights per engine over the model's base: the toy text encoder's two fp32 layers (~170 kB
# each) need two engines; the denoiser is kept in one (--segments 1), which the budget alone would cut too.
SEGMENT_BUDGET = int(BUILD_BASE_BYTES + BUILD_BYTES_PER_WEIGHT_BYTE * 200e3)


@pytest.fixture(scope="module")
def fp32_segmented(toy_root, tmp_path_factory):
    options = BuildOptions(flavor="tensorrt-rtx", quality=False, max_build_memory=SEGMENT_BUDGET, segments=1)
    return _build(toy_root, tmp_path_factory.mktemp("stages") / "fp32-segmented", "fp32", options)


@pytest.fixture(scope="module")
def variant_build(variant_root, tmp_path_factory):
    return _build(variant_root, tmp_path_factory.mktemp("stages") / "variant-fp32", "fp32", return_index=MHA_RETURN_INDEX)


# ---- engines ------------------------------------------------------------------------------------------------------


def test_every_stage_gets_engines_with_profiles_from_the_manifest(bf16_build):
    out, manifest, reports = bf16_build
    assert manifest.stage_names == list(ALL_STAGES)
    assert manifest.engine_units() == list(ALL_STAGES) and set(reports) == set(ALL_STAGES)
    verify_files(out, load_manifest(out))  # the plans and engine graphs are recorded with their checksums
    for stage in ("text_encoder", "vae_decoder"):
        record = manifest.engine(stage)
        assert record.flavor == "tensorrt-rtx" and record.lowering is None and record.compute_capabilities
        assert plan_file(stage) in manifest.files and engine_onnx_file(stage) in manifest.files
        assert manifest.stage_precision(stage) == "bf16"
    assert manifest.engine("denoiser").lowering.moe == "native"
    log = json.loads((out / "build_log.json").read_text())
    assert set(log["engines"]) == set(ALL_STAGES)

    # text encoder: past_len 0 (a full forward) .. the cached template prefix; total_len = past_len + text_len
    prefix = manifest.stages["text_encoder"].config["prefix_tokens"]
    tokenizer = PromptTokenizer.from_files(out / TOKENIZER_FILE, out / PROMPT_TEMPLATE_FILE)
    assert prefix == len(tokenizer.prefix_ids) > 100
    profile = reports["text_encoder"].profile
    past = [shape[3] for shape in profile[PAST_KEY_VALUES]]
    text = [shape[1] for shape in profile[INPUT_IDS]]
    total = [shape[1] for shape in profile[ATTENTION_MASK]]
    assert past == [0, prefix, prefix] and text == [1, OPT_TEXT_LEN, MAX_TEXT_LEN]
    assert total == [p + t for p, t in zip(past, text)]
    assert [shape[0] for shape in profile[INPUT_IDS]] == [1, 2, 2]  # batch
    network = reports["text_encoder"].network
    kept = manifest.stages["text_encoder"].config["kept_layers"]
    assert network.layer_types["ATTENTION_INPUT"] == kept
    assert network.outputs == {PROMPT_EMBEDS: "FLOAT", KEY_VALUES: "BF16"}
    assert all(g.input_dtypes == ["BF16", "BF16"] for g in network.gemms if "proj" in g.name)

    # VAE decoder: the latent grid of the served resolutions (the toy VAE's scale factor is 8), opt at 128x128
    latents = reports["vae_decoder"].profile["latents"]
    assert [tuple(s[2:]) for s in latents] == [(12, 16), (16, 16), (16, 20)]
    assert reports["vae_decoder"].network.outputs == {"image": "UINT8"}


def test_profiles_are_derived_from_the_manifest(variant_build, bf16_build):
    """The 4x VAE gives a latent grid of resolution / 4; the text encoder's ranges follow the recorded prefix."""
    _, manifest, reports = variant_build
    assert manifest.stages["vae_decoder"].config["scale_factor"] == 4
    assert [tuple(s[2:]) for s in reports["vae_decoder"].profile["latents"]] == [(24, 32), (32, 32), (32, 40)]
    assert manifest.stages["text_encoder"].config["kept_layers"] == 3
    ranges = dim_ranges_from_manifest(manifest)
    stage = manifest.stages["text_encoder"]
    shifted = dataclasses.replace(manifest, stages={**manifest.stages, "text_encoder": dataclasses.replace(
        stage, config={**stage.config, "prefix_tokens": 7})})
    moved = dim_ranges_from_manifest(shifted)
    assert moved["past_len"] == (0, 7, 7) and moved["total_len"] == (1, OPT_TEXT_LEN + 7, MAX_TEXT_LEN + 7)
    assert ranges["text_len"] == moved["text_len"] == tuple(manifest.profiles.text_len)
    transformer_only = dataclasses.replace(manifest, stages={g: s for g, s in manifest.stages.items()
                                                             if g in ("text_kv", "denoiser")})
    assert set(dim_ranges_from_manifest(transformer_only)) == {"batch", "text_len", "image_tokens"}


def test_resolutions_off_the_vae_grid_are_refused(bf16_build):
    _, manifest, _ = bf16_build
    stage = manifest.stages["vae_decoder"]
    odd = dataclasses.replace(manifest, stages={**manifest.stages, "vae_decoder": dataclasses.replace(
        stage, config={**stage.config, "scale_factor": 48})})
    with pytest.raises(NucleusExportError, match="not multiples of the VAE's scale factor 48") as info:
        dim_ranges_from_manifest(odd)
    assert "--resolutions" in info.value.fix


# ---- the segmented text encoder ------------------------------------------------------------------------------------


def test_text_encoder_is_cut_to_the_budget(fp32_segmented):
    out, manifest, reports = fp32_segmented
    segments = manifest.graph_segments("text_encoder")
    kept = manifest.stages["text_encoder"].config["kept_layers"]
    assert [s.blocks for s in segments] == [(i, i + 1) for i in range(kept)]
    assert manifest.units("denoiser") == ["denoiser"]  # --segments 1 keeps the denoiser whole
    assert not (out / "text_encoder.plan").exists()
    for seg in segments:
        assert (out / plan_file(seg.name)).stat().st_size > 0 and manifest.engine(seg.name).lowering is None
        assert KEY_VALUES in seg.outputs and PAST_KEY_VALUES in seg.inputs
        past = reports[seg.name].profile[PAST_KEY_VALUES]
        assert all(shape[0] == seg.blocks[1] - seg.blocks[0] for shape in past)  # its own layers of the past
    # Only the residual stream crosses a cut, besides the stacked K/V each segment reads and writes itself.
    assert segments[1].inputs == [PAST_KEY_VALUES, INPUT_IDS, ATTENTION_MASK, "text_encoder.layers.0.output"]
    assert segments[-1].outputs == [PROMPT_EMBEDS, KEY_VALUES]


def _prefix_and_suffixes(bundle: Path, prompts: list[str]):
    """The runtime's way to encode prompts: the template prefix once (batch of len(prompts)), then the right-padded
    suffixes with the prefix's K/V as the past. Returns (prefix ids, suffix ids, full mask, full ids)."""
    tokenizer = PromptTokenizer.from_files(bundle / TOKENIZER_FILE, bundle / PROMPT_TEMPLATE_FILE)
    prefix = np.array([tokenizer.prefix_ids] * len(prompts), dtype=np.int64)
    full_ids, full_mask = tokenizer.encode(prompts)
    assert (full_ids[:, : prefix.shape[1]] == prefix).all()
    return prefix, full_ids[:, prefix.shape[1]:], full_mask, full_ids


def test_segments_give_the_full_graph_results(fp32_segmented):
    out, _, _ = fp32_segmented
    segmented = OrtBackend(out, OrtOptions(threads=2, stages=("text_encoder",)))
    whole = OrtBackend(out, OrtOptions(threads=2, stages=("text_encoder",), segments=False))
    assert len(segmented._text_encoder) == 2 and len(whole._text_encoder) == 1
    prefix, suffix, mask, full_ids = _prefix_and_suffixes(out, PROMPTS)
    for backend in (segmented, whole):
        backend.results = {"full": backend.encode_prompt(full_ids, mask, None)}
        embeds, past = backend.encode_prompt(prefix, np.ones_like(prefix), None)
        backend.results["cached"] = backend.encode_prompt(suffix, mask, past)
    for case in ("full", "cached"):
        (embeds_a, kv_a), (embeds_b, kv_b) = segmented.results[case], whole.results[case]
        assert np.array_equal(embeds_a, embeds_b) and np.array_equal(kv_a.to_numpy(), kv_b.to_numpy())
    # The cached prefix gives the full forward's outputs on the suffix (right padding: same positions).
    full, cached = segmented.results["full"][0], segmented.results["cached"][0]
    real = mask[:, prefix.shape[1]:].astype(bool)
    np.testing.assert_allclose(cached[real], full[:, prefix.shape[1]:][real], rtol=1e-5, atol=1e-5)


# ---- the ONNX Runtime backend against the pipeline's components ------------------------------------------------------


@pytest.mark.parametrize("which", ["toy", "variant"])
def test_backend_stages_equal_transformers_and_diffusers(which, fp32_segmented, variant_build, toy_root, variant_root):
    """encode_prompt with a cached prefix gives transformers' hidden_states[return_index] of the whole prompt;
    decode_image gives the pipeline's uint8 image of diffusers' decode (within one level)."""
    from diffusers import AutoencoderKLQwenImage
    from transformers import Qwen3VLForConditionalGeneration

    out, manifest, _ = fp32_segmented if which == "toy" else variant_build
    root = toy_root if which == "toy" else variant_root
    backend = OrtBackend(out, OrtOptions(threads=2, stages=("text_encoder", "vae_decoder")))
    prefix, suffix, mask, full_ids = _prefix_and_suffixes(out, PROMPTS)
    _, past = backend.encode_prompt(prefix, np.ones_like(prefix), None)
    embeds, key_values = backend.encode_prompt(suffix, mask, past)
    model = Qwen3VLForConditionalGeneration.from_pretrained(root / "text_encoder").eval()
    with torch.no_grad():
        hidden = model(input_ids=torch.from_numpy(full_ids), attention_mask=torch.from_numpy(mask),
                       output_hidden_states=True).hidden_states
    expected = hidden[manifest.stages["text_encoder"].config["return_index"]].numpy()[:, prefix.shape[1]:]
    real = mask[:, prefix.shape[1]:].astype(bool)
    assert np.abs(embeds[real] - expected[real]).max() <= 1e-5 * np.abs(expected[real]).max()
    assert key_values.shape[:4] == (manifest.stages["text_encoder"].config["kept_layers"], 2, 2, suffix.shape[1])

    vae = AutoencoderKLQwenImage.from_pretrained(root / "vae").eval()
    scale = manifest.stages["vae_decoder"].config["scale_factor"]
    latents = np.random.default_rng(0).standard_normal((2, 16, 96 // scale, 160 // scale)).astype(np.float32)
    image = backend.decode_image(latents)
    z = torch.from_numpy(latents)[:, :, None]
    mean = torch.tensor(vae.config.latents_mean).view(1, 16, 1, 1, 1)
    std = 1.0 / torch.tensor(vae.config.latents_std).view(1, 16, 1, 1, 1)
    with torch.no_grad():
        decoded = vae.decode(z / std + mean, return_dict=False)[0][:, :, 0]
    reference = ((decoded.permute(0, 2, 3, 1).numpy() * 0.5 + 0.5).clip(0, 1) * 255).round()
    assert image.shape == (2, 96, 160, 3) and image.dtype == np.uint8
    assert np.abs(image.astype(np.int16) - reference).max() <= 1


def test_backend_refuses_bad_stage_input(fp32_segmented):
    out, _, _ = fp32_segmented
    backend = OrtBackend(out, OrtOptions(threads=2, stages=("text_encoder", "vae_decoder")))
    ids = np.ones((2, 5), np.int64)
    _, past = backend.encode_prompt(ids[:1], np.ones((1, 5), np.int64), None)
    for call, needle in [
        (lambda: backend.encode_prompt(ids, np.ones((2, 4), np.int64), None), r"must be \[2, 5\]"),
        (lambda: backend.encode_prompt(ids, np.ones((2, 10), np.int64), past), "for a batch of 2"),
        (lambda: backend.decode_image(np.zeros((1, 4, 16, 16), np.float32)), r"\[batch, 16, height, width\]"),
        (lambda: backend.decode_image(np.zeros((1, 16, 16, 15), np.float32)), "not in this bundle's profiles"),
        (lambda: backend.compute_text_kv(np.zeros((1, 3, 64), np.float32), *[np.zeros((3, 16), np.float32)] * 2),
         "opened without the text_kv stage"),
    ]:
        with pytest.raises((NucleusError, TypeError), match=needle) as info:
            call()
        if isinstance(info.value, NucleusError):
            assert info.value.fix and "\n" not in str(info.value)


# ---- what a stage costs to load ------------------------------------------------------------------------------------


def test_stage_bytes(bf16_build, fp32_segmented):
    from nucleus_runtime.backends.tensorrt import TensorRTBackend, TensorRTRtxBackend

    for out, manifest, _ in (bf16_build, fp32_segmented):
        for stage in manifest.stage_names:
            plans = sum((out / plan_file(u)).stat().st_size for u in manifest.units(stage))
            assert TensorRTRtxBackend.stage_bytes(manifest, stage) == TensorRTBackend.stage_bytes(manifest, stage) == plans
            files = OrtBackend.stage_files(manifest, stage)
            assert OrtBackend.stage_bytes(manifest, stage) == sum((out / f).stat().st_size for f in files) > 0
    out, manifest, _ = fp32_segmented
    assert sorted(OrtBackend.stage_files(manifest, "text_encoder")) == [
        "text_encoder.onnx", "text_encoder.seg0.onnx", "text_encoder.seg1.onnx"]
    # A weight-stripped plan is refit at load: its engine graphs and the weights they read count too.
    stage = manifest.stages["text_encoder"]
    stripped = {u: dataclasses.replace(r, stripped=True) for u, r in stage.engines.items()}
    files = {**manifest.files, "text_encoder.onnx.data": FileRecord("0" * 64, 1000)}
    refit = dataclasses.replace(manifest, files=files, stages={
        **manifest.stages, "text_encoder": dataclasses.replace(stage, engines=stripped)})
    extra = sum(manifest.files[engine_onnx_file(u)].bytes for u in manifest.units("text_encoder")) + 1000
    assert TensorRTBackend.stage_bytes(refit, "text_encoder") == TensorRTBackend.stage_bytes(manifest, "text_encoder") + extra
    with pytest.raises(NucleusError, match="no vae stage"):
        OrtBackend.stage_bytes(manifest, "vae")


def test_tensorrt_backend_checks_only_the_stages_it_loads(bf16_build, tmp_path):
    """Opening for some stages needs only their plans: a bundle missing vae_decoder.plan is refused for that stage,
    by name, and not for the text encoder (which then goes on to need a GPU)."""
    import importlib.util

    from nucleus_runtime.backends.registry import open_backend

    if importlib.util.find_spec("cuda") is not None:
        pytest.skip("cuda-python is installed: opening would go on to the GPU")
    out = tmp_path / "bundle"
    shutil.copytree(bf16_build[0], out)
    (out / "vae_decoder.plan").unlink()
    with pytest.raises(NucleusError, match=r"no TensorRT engines \(vae_decoder.plan\)"):
        open_backend(out, "tensorrt-rtx", options=BackendOptions(stages=("vae_decoder",)))
    with pytest.raises(NucleusError) as info:
        open_backend(out, "tensorrt-rtx", options=BackendOptions(stages=("text_encoder",), verify_checksums=False))
    assert "vae_decoder.plan" not in str(info.value) and "cuda-python" in str(info.value)


def test_tensorrt_text_encoder_binds_slices_by_address(fp32_segmented):
    """The TensorRT backend's text encoder loop on stand-in engines (no GPU here): each segment binds its layers of
    the past by address (an empty past: the backend's placeholder address), writes its layers' key_values at their
    offset of one buffer, takes the residual stream from the previous segment's buffer and uploads input_ids and
    attention_mask once."""
    from nucleus_runtime.backends.tensorrt import TensorRTRtxBackend, TrtTensor
    from trt_stand_ins import Engine

    _, manifest, _ = fp32_segmented
    config = manifest.stages["text_encoder"].io.outputs[KEY_VALUES].shape  # [L, 2, batch, text_len, Hkv, Dh]

    class Cudart:
        next = 1 << 20

        def cudaMalloc(self, nbytes):
            Cudart.next += 1 << 20
            return 0, Cudart.next

        def cudaFree(self, ptr):
            return (0,)

    backend = object.__new__(TensorRTRtxBackend)
    backend.manifest, backend.cudart, backend._empty = manifest, Cudart(), None
    units = manifest.unit_records("text_encoder")
    backend._text_encoders = [(unit, Engine(10_000 * (k + 1), (2, 9, 64))) for k, unit in enumerate(units)]
    uploads, executed = [], []
    backend._upload = lambda engine, name, array: uploads.append(name) or engine.buffer(name, array.nbytes).ptr
    backend._execute = lambda engine, name: executed.append(name)
    backend.copy_to_host = lambda host, ptr: host.fill(ptr)
    ids, mask = np.ones((2, 9), np.int64), np.ones((2, 9), np.int64)
    embeds, key_values = backend.encode_prompt(ids, mask, None)
    layer = int(np.prod([2, 2, 9, *config[4:]])) * 4  # one layer of key_values, float32
    first, second = (engine.context for _, engine in backend._text_encoders)
    assert first.addresses[PAST_KEY_VALUES] == second.addresses[PAST_KEY_VALUES] == backend._empty.ptr
    assert first.shapes[PAST_KEY_VALUES] == (1, 2, 2, 0, *config[4:])
    assert first.addresses[KEY_VALUES] == key_values.buffer.ptr and second.addresses[KEY_VALUES] == key_values.buffer.ptr + layer
    assert key_values.shape == (2, 2, 2, 9, *config[4:]) and key_values.nbytes == 2 * layer
    residual = "text_encoder.layers.0.output"
    assert second.addresses[residual] == backend._text_encoders[0][1].buffers[residual].ptr
    assert uploads == [INPUT_IDS, ATTENTION_MASK] and executed == ["text_encoder.seg0", "text_encoder.seg1"]
    assert (embeds == backend._text_encoders[1][1].buffers[PROMPT_EMBEDS].ptr).all()
    # The next call binds those key_values as its past, layer by layer.
    uploads.clear()
    backend.encode_prompt(ids, np.ones((2, 18), np.int64), key_values)
    assert first.addresses[PAST_KEY_VALUES] == key_values.buffer.ptr
    assert second.addresses[PAST_KEY_VALUES] == key_values.buffer.ptr + layer
    assert second.shapes[PAST_KEY_VALUES] == (1, 2, 2, 9, *config[4:])
    with pytest.raises(TypeError, match="its own key_values"):
        backend.encode_prompt(ids, mask, OrtTensor(None))
    assert isinstance(key_values, TrtTensor)


# ---- costs and inspect -----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("which", ["toy-fp32", "toy-bf16", "variant-fp32"])
def test_text_encoder_cost_is_the_graphs(which, fp32_segmented, bf16_build, variant_build):
    """The analytic cost (costs/text_encoder.py) counts the exported graph's GEMM and attention FLOPs (costs/flops.py)
    and its weight bytes (the initializers), for GQA and MHA with biases and the final norm."""
    import math

    import onnx

    from nucleus_export.costs.flops import graph_cost
    from nucleus_export.costs.text_encoder import text_encoder_cost
    from nucleus_export.model.text_encoder import TextEncoderConfig

    out, manifest, _ = {"toy-fp32": fp32_segmented, "toy-bf16": bf16_build, "variant-fp32": variant_build}[which]
    config = TextEncoderConfig.from_fields(manifest.stages["text_encoder"].config["model_config"])
    model = onnx.load(str(out / "text_encoder.onnx"), load_external_data=False)
    batch, text_len, past_len = 2, 7, 5
    past = [config.kept_layers, 2, batch, past_len, config.num_key_value_heads, config.head_dim]
    counted = graph_cost(model, {INPUT_IDS: [batch, text_len], ATTENTION_MASK: [batch, past_len + text_len],
                                 PAST_KEY_VALUES: past})
    compute_bytes = 2 if which.endswith("bf16") else 4
    cost = text_encoder_cost(config, text_len, past_len, batch, compute_bytes)
    assert cost.attention_flops == counted["attention"].gemm_flops > 0
    assert cost.flops == sum(c.gemm_flops for c in counted.values())
    stored = sum(math.prod(i.dims) * onnx.helper.tensor_dtype_to_np_dtype(i.data_type).itemsize
                 for i in model.graph.initializer if i.name.startswith("model.language_model."))
    assert cost.weight_bytes == stored
    fp8 = text_encoder_cost(config, text_len, past_len, batch, compute_bytes, fp8=True)
    assert fp8.flops == cost.flops and fp8.weight_bytes < cost.weight_bytes


def test_inspect_shows_the_stages(bf16_build, capsys):
    from nucleus_export.cli import main

    out, manifest, reports = bf16_build
    assert main(["inspect", "--bundle", str(out), "--gpu", "rtx4090", "--json"]) == 0
    stages = {s["name"]: s for s in json.loads(capsys.readouterr().out)["stages"]}
    assert list(stages) == list(ALL_STAGES)
    for name, stage in stages.items():
        assert stage["precision"] == "bf16" and stage["files"] == OrtBackend.stage_files(manifest, name)
        assert [u["plan_bytes"] for u in stage["units"]] == [(out / plan_file(u)).stat().st_size for u in manifest.units(name)]
        assert stage["profiles"] == reports[name].profile  # what the engine was built with
    assert len(stages["vae_decoder"]["costs"]) == len(RESOLUTIONS) and stages["text_kv"]["costs"] == []
    cases = [row["case"] for row in stages["text_encoder"]["costs"]]
    prefix = manifest.stages["text_encoder"].config["prefix_tokens"]
    assert cases[0] == f"template prefix, {prefix} tokens (once)" and cases[-1] == f"{MAX_TEXT_LEN} tokens, no cache"
    assert all(row["seconds"] > 0 and row["flops"] > 0 for s in stages.values() for row in s["costs"])
    assert main(["inspect", "--bundle", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "stages" in printed and "vae_decoder: one call" in printed and "past_key_values" in printed


# ---- FP8 text encoder (opt-in) -----------------------------------------------------------------------------------------


def test_fp8_text_encoder_is_opt_in_and_calibrated(toy_root, tmp_path, capsys):
    """`build --fp8 --fp8-text-encoder`: the text encoder's seven linears per kept layer get FP8 Q/DQ with activation
    scales calibrated on transformers' forward (recorded in the recipe with the transformer's); without the flag the
    text encoder stays bf16; the flag alone, or without a text encoder, is refused."""
    from nucleus_export.cli import main
    from nucleus_export.graph.precision import QuantRecipe
    from nucleus_export.quant.calibrate import text_encoder_linears

    args = ["build", "--model", str(toy_root), "--backend", "tensorrt-rtx", "--skip-quality", "--resolutions", "128x128",
            "--max-text-len", str(MAX_TEXT_LEN), "--opt-text-len", str(OPT_TEXT_LEN), "--calibration-size", "2",
            "--stages", "text_encoder,text_kv,denoiser"]
    assert main([*args, "--fp8-text-encoder", "--out", str(tmp_path / "x")]) == 1
    assert "only apply with --fp8" in capsys.readouterr().err
    from nucleus_export.errors import UsageError
    from nucleus_export.export import plan_export

    with pytest.raises(UsageError, match="an FP8 text encoder needs an FP8 build"):  # the same rule for API callers
        plan_export(open_checkpoint(toy_root), _options("bf16", quantize_text_encoder=True))
    assert main(["build", "--model", "tiny", "--fp8", "--fp8-text-encoder", "--backend", "tensorrt-rtx",
                 "--skip-quality", "--out", str(tmp_path / "y")]) == 2
    assert "needs a text_encoder stage" in capsys.readouterr().err

    out = tmp_path / "fp8"
    assert main([*args, "--fp8", "--fp8-text-encoder", "--out", str(out)]) == 0
    manifest = load_manifest(out)
    assert manifest.stage_names == ["text_encoder", "text_kv", "denoiser"]  # --stages left the VAE out
    assert {g: manifest.stage_precision(g) for g in manifest.stage_names} == {
        "text_encoder": "bf16+fp8", "text_kv": "bf16", "denoiser": "bf16+fp8"}
    recipe = QuantRecipe.load(out / "fp8_scales.json")
    config = manifest.stages["text_encoder"].config
    linears = [name for name in recipe.activation_amax if name.startswith("model.language_model.")]
    assert len(linears) == 7 * config["kept_layers"] and all(recipe.activation_amax[n] > 0 for n in linears)
    assert recipe.calibration["text_encoder"]["count"] == 8 and "timesteps" in recipe.calibration
    log = json.loads((out / "build_log.json").read_text())["engines"]["text_encoder"]["network"]
    fp8 = [g for g in log["gemms"] if "language_model" in g["name"]]
    assert len(fp8) == 7 * config["kept_layers"] and all(g["fp8_inputs"] == [True, True] for g in fp8)
    from nucleus_export.model.text_encoder import TextEncoderConfig

    assert sorted(linears) == sorted(text_encoder_linears(TextEncoderConfig.from_fields(config["model_config"])))

    plain = tmp_path / "fp8-denoiser-only"
    assert main([*args, "--fp8", "--fp8-scales", str(out / "fp8_scales.json"), "--out", str(plain)]) == 0
    assert load_manifest(plain).stage_precision("text_encoder") == "bf16"
    log = json.loads((plain / "build_log.json").read_text())["engines"]["text_encoder"]["network"]
    assert log["num_quantize"] == 0


def test_vae_resolutions_over_tensorrts_limit_are_refused_before_work(toy_root, tmp_path):
    """The VAE decoder's single-head attention over every latent pixel: at 1280x1280 and batch 4 its scores pass
    2^31 elements (the transformer would fit), so `build` refuses before exporting anything and says what fits."""
    from nucleus_export.build import plan_build

    options = ExportOptions(precision=GraphPrecision("bf16"), resolutions=[(1024, 1024), (1280, 1280)], max_text_len=512,
                            max_batch=4)
    with pytest.raises(NucleusExportError, match=r"VAE decoder at 1280x1280 \(batch 4\)") as info:
        plan_build(open_checkpoint(toy_root), options, BuildOptions(flavor="tensorrt-rtx"))
    assert "1.48 MP at batch 4" in info.value.fix
    plan_build(open_checkpoint(toy_root), dataclasses.replace(options, resolutions=[(1024, 1024)]),
               BuildOptions(flavor="tensorrt-rtx"))
