"""The text_encoder graph against transformers' Qwen3VLForConditionalGeneration: tiny random models of the real class
saved with save_pretrained, prompts rendered by NucleusMoEImagePipeline's own chat formatting and tokenized by the
toy pipeline's Qwen3VLProcessor (tests/toy_pipeline.py), graphs run in ONNX Runtime on the CPU and built with
TensorRT-RTX."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from nucleus_runtime.contract import (
    ATTENTION_MASK,
    BLOCK_OUTPUTS_METADATA,
    CHECKPOINT_LINKS_DIR,
    INPUT_IDS,
    KEY_VALUES,
    PAST_KEY_VALUES,
    PAST_LEN_DIM,
    PROMPT_EMBEDS,
    TEXT_ENCODER_GRAPH,
    TOTAL_LEN_DIM,
    GemmMode,
)
from toy_pipeline import _processor, allow_processor_without_torchvision

from nucleus_export.errors import NucleusExportError
from nucleus_export.export import write_graph
from nucleus_export.graph.external_data import CheckpointLinks
from nucleus_export.graph.precision import GraphPrecision, QuantRecipe
from nucleus_export.graph.text_encoder import (
    build_text_encoder,
    layer_output,
    rope_inverse_frequencies,
    text_encoder_metadata,
)
from nucleus_export.model.text_encoder import (
    INDEX_NAME,
    LANGUAGE_MODEL,
    TINY_VISION_CONFIG,
    TextEncoderConfig,
    language_model_shapes,
    open_text_encoder,
    TINY_TEXT_CONFIGS,
    qwen3_vl_8b_config,
    write_tiny_text_encoder,
)

PROMPTS = {
    "short+long": ["a red cube", "two cats on a sofa, the left one black, the right one white, under a lamp"],
    "one char+mid": ["x", "a watercolor of a lighthouse at dusk"],
}


def relative_error(actual: np.ndarray, expected: np.ndarray, rows: np.ndarray) -> float:
    """max |actual - expected| / max |expected| over the real tokens (rows: [B, T] bool)."""
    return float(np.abs(actual[rows] - expected[rows]).max() / np.abs(expected[rows]).max())


def export(checkpoint, out_dir: Path, compute: str = "fp32", fp8: QuantRecipe | None = None, external: bool = False,
           link: bool = False) -> Path:
    """The exporter's steps for this graph: write_graph with the builder, the block-output metadata and, for a
    bundle, external data and hard links to the checkpoint's shards."""
    out_dir.mkdir(parents=True, exist_ok=True)
    links = CheckpointLinks(out_dir) if link else None
    write_graph(out_dir, TEXT_ENCODER_GRAPH, checkpoint.weights, GraphPrecision(compute, fp8),
                lambda g, e: build_text_encoder(g, e, checkpoint.config), external, text_encoder_metadata(checkpoint.config),
                links)
    return out_dir / f"{TEXT_ENCODER_GRAPH}.onnx"


def empty_past(config: TextEncoderConfig, batch: int, dtype=np.float32) -> np.ndarray:
    return np.zeros((config.kept_layers, 2, batch, 0, config.num_key_value_heads, config.head_dim), dtype)


@pytest.fixture(scope="module")
def processor():
    with allow_processor_without_torchvision():
        return _processor()[0]


def encode(processor, prompts: list[str], padding_side: str = "right") -> dict[str, np.ndarray]:
    """What NucleusMoEImagePipeline.encode_prompt feeds the text encoder, as numpy."""
    from diffusers import NucleusMoEImagePipeline

    formatted = [NucleusMoEImagePipeline._format_prompt(SimpleNamespace(processor=processor), p) for p in prompts]
    processor.tokenizer.padding_side = padding_side
    inputs = processor(text=formatted, padding="longest", pad_to_multiple_of=8, max_length=1024, truncation=True,
                       return_attention_mask=True, return_tensors="np")
    return {k: np.asarray(v) for k, v in inputs.items()}


@pytest.fixture(scope="module", params=sorted(TINY_TEXT_CONFIGS))
def case(request, tmp_path_factory):
    """(checkpoint, transformers model, ORT session of the fp32 graph read from linked checkpoint shards)."""
    text_config, return_index = TINY_TEXT_CONFIGS[request.param]
    root = tmp_path_factory.mktemp(f"text-encoder-{request.param}")
    folder = write_tiny_text_encoder(root / "text_encoder", text_config, seed=1)
    checkpoint = open_text_encoder(folder, return_index)
    from transformers import Qwen3VLForConditionalGeneration

    model = Qwen3VLForConditionalGeneration.from_pretrained(folder).eval()
    path = export(checkpoint, root / "bundle", external=True, link=True)
    return checkpoint, model, ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


def run(session, input_ids: np.ndarray, mask: np.ndarray, past: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    return tuple(session.run([PROMPT_EMBEDS, KEY_VALUES], {INPUT_IDS: input_ids, ATTENTION_MASK: mask, PAST_KEY_VALUES: past}))


# ---- config ---------------------------------------------------------------------------------------------------------


def test_real_config_keeps_29_of_36_layers():
    config = TextEncoderConfig.from_dict(qwen3_vl_8b_config())
    assert (config.num_hidden_layers, config.hidden_size, config.num_key_value_heads, config.head_dim) == (36, 4096, 8, 128)
    assert config.rope_theta == 5e6 and config.mrope_section == (24, 20, 20)
    assert (config.hidden_state_index, config.kept_layers, config.final_norm) == (29, 29, False)
    last = TextEncoderConfig.from_dict(qwen3_vl_8b_config(), return_index=-1)
    assert (last.kept_layers, last.final_norm) == (36, True)
    assert TextEncoderConfig.from_dict(qwen3_vl_8b_config(), return_index=5).kept_layers == 5


def _edit(raw: dict, path: str, value) -> dict:
    raw = json.loads(json.dumps(raw))
    *parents, key = path.split(".")
    target = raw
    for p in parents:
        target = target[p]
    target[key] = value
    return raw


@pytest.mark.parametrize("path, value, message", [
    ("model_type", "qwen2_5_vl", "not Qwen3-VL"),
    ("architectures", ["Qwen3VLModel"], "not Qwen3VLForConditionalGeneration"),
    ("text_config.model_type", "qwen3_vl_moe_text", "not 'qwen3_vl_text'"),
    ("text_config.hidden_act", "gelu", "silu only"),
    ("text_config.rope_scaling", {"rope_type": "yarn", "factor": 4.0, "mrope_section": [24, 20, 20]}, "RoPE type 'yarn'"),
    ("text_config.rope_scaling", {"rope_type": "default", "factor": 2.0}, "with scaling \\(factor\\)"),
    ("text_config.num_key_value_heads", 5, "not a multiple"),
])
def test_config_refuses_what_the_graph_does_not_implement(path, value, message):
    with pytest.raises(NucleusExportError, match=message) as info:
        TextEncoderConfig.from_dict(_edit(qwen3_vl_8b_config(), path, value))
    assert info.value.fix and "\n" not in str(info.value)


@pytest.mark.parametrize("return_index", [0, 36, -36])
def test_config_refuses_return_indices_the_pipeline_refuses(return_index):
    with pytest.raises(NucleusExportError, match="return_index"):
        TextEncoderConfig.from_dict(qwen3_vl_8b_config(), return_index=return_index)


# ---- checkpoint ----------------------------------------------------------------------------------------------------


def test_language_model_names_and_shapes_are_the_real_class(case):
    checkpoint, model, _ = case
    real = {n: tuple(t.shape) for n, t in model.state_dict().items() if n.startswith(LANGUAGE_MODEL + ".")}
    assert language_model_shapes(checkpoint.config) == real
    assert set(checkpoint.weights) == set(real)  # vision tower and LM head stay out of the store


def test_sharded_checkpoint_opens_and_bad_ones_are_refused(tmp_path):
    text_config, return_index = TINY_TEXT_CONFIGS["mha"]
    folder = write_tiny_text_encoder(tmp_path / "te", text_config, dtype="bfloat16", max_shard_size="40KB")
    assert (folder / INDEX_NAME).is_file() and len(list(folder.glob("model-*.safetensors"))) > 1
    root = tmp_path / "pipeline"
    (root / "text_encoder").parent.mkdir()
    shutil.copytree(folder, root / "text_encoder")
    (root / "model_index.json").write_text("{}")
    assert len(open_text_encoder(root, return_index).weights.shards) > 1  # a pipeline root resolves to its text_encoder/

    raw = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps(_edit(raw, "text_config.num_hidden_layers", 2)))
    with pytest.raises(NucleusExportError, match="unexpected"):
        open_text_encoder(folder, return_index=-1)
    (folder / "config.json").write_text(json.dumps(_edit(raw, "text_config.intermediate_size", 64)))
    with pytest.raises(NucleusExportError, match="shape mismatches"):
        open_text_encoder(folder, return_index)
    (folder / "config.json").write_text(json.dumps(raw))
    next(folder.glob("model-00001-*.safetensors")).unlink()
    with pytest.raises(NucleusExportError, match="missing"):
        open_text_encoder(folder, return_index)


# ---- parity with transformers ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("padding_side", ["left", "right"])
@pytest.mark.parametrize("prompts", sorted(PROMPTS))
def test_prompt_embeds_and_key_values_match_transformers(case, processor, prompts, padding_side):
    """Batch 2 with padding on either side: hidden_states[return_index] of transformers' forward (called as the
    pipeline calls it) and its cache's K/V, on the real tokens."""
    checkpoint, model, session = case
    config = checkpoint.config
    inputs = encode(processor, PROMPTS[prompts], padding_side)
    mask = inputs["attention_mask"]
    assert not mask.all() and inputs["input_ids"].shape[1] % 8 == 0
    with torch.no_grad():
        out = model(**{k: torch.from_numpy(v) for k, v in inputs.items()}, use_cache=True, return_dict=True,
                    output_hidden_states=True)
    expected = out.hidden_states[config.return_index].numpy()
    embeds, key_values = run(session, inputs["input_ids"], mask, empty_past(config, 2))
    real = mask.astype(bool)
    assert embeds.shape == expected.shape and embeds.dtype == np.float32
    assert relative_error(embeds, expected, real) <= 1e-5
    assert len(out.hidden_states) == config.num_hidden_layers + 1 and key_values.shape[0] == config.kept_layers
    for i in range(config.kept_layers):
        layer = out.cache.layers[i]
        for k, reference in enumerate((layer.keys, layer.values)):  # [B, Hkv, T, Dh] -> [B, T, Hkv, Dh]
            assert relative_error(key_values[i, k], reference.numpy().transpose(0, 2, 1, 3), real) <= 1e-5


def _prefix_length(processor) -> int:
    """Tokens every prompt shares: the template up to the user's text (what a runtime caches)."""
    a, b = (encode(processor, [p])["input_ids"][0] for p in ("first prompt", "another one"))
    return int(np.argmax(a[: len(b)] != b[: len(a)]))


def test_prefix_then_suffix_equals_the_full_forward(case, processor):
    """The template prefix encoded once (batch 1, no past) and the suffixes (batch 2, right-padded) with its K/V
    give the full forward's outputs: at the end of the fixed prefix, inside the system prompt, right after the first
    token, and inside the user's text."""
    checkpoint, _, session = case
    config = checkpoint.config
    inputs = encode(processor, PROMPTS["short+long"], "right")
    ids, mask = inputs["input_ids"], inputs["attention_mask"]
    full_embeds, full_kv = run(session, ids, mask, empty_past(config, 2))
    prefix = _prefix_length(processor)
    assert prefix > 100
    for split in (prefix, prefix // 2, 1, prefix + 3):
        # Within the shared prefix one row is encoded and its K/V repeated over the batch; past it, both rows.
        rows = 1 if split <= prefix else 2
        prefix_embeds, prefix_kv = run(session, ids[:rows, :split], mask[:rows, :split], empty_past(config, rows))
        past = np.repeat(prefix_kv, 2 // rows, axis=2)
        embeds, key_values = run(session, ids[:, split:], mask, past)
        real = mask[:, split:].astype(bool)
        assert relative_error(embeds, full_embeds[:, split:], real) <= 1e-6
        for k in (0, 1):  # [L, B, T, Hkv, Dh] -> [B, T, L, Hkv, Dh], indexed by the real tokens
            assert relative_error(key_values[:, k].transpose(1, 2, 0, 3, 4),
                                  full_kv[:, k, :, split:].transpose(1, 2, 0, 3, 4), real) <= 1e-6
        assert relative_error(prefix_embeds, full_embeds[:rows, :split], mask[:rows, :split].astype(bool)) <= 1e-6


def test_multimodal_rope_reduces_to_1d_rope_for_text():
    """Qwen3-VL's interleaved multimodal RoPE with three equal position components (text) is plain rotate-half 1D
    RoPE: cos/sin of position * inverse frequency, repeated for both halves of the head, bit for bit."""
    from transformers import Qwen3VLTextConfig
    from transformers.models.qwen3_vl.modeling_qwen3_vl import Qwen3VLTextRotaryEmbedding

    for head_dim, section, theta in ((128, [24, 20, 20], 5e6), (16, [4, 2, 2], 1e4), (24, [6, 3, 3], 1e4)):
        text = Qwen3VLTextConfig(head_dim=head_dim, hidden_size=64, num_attention_heads=4,
                                 rope_parameters={"rope_type": "default", "rope_theta": theta, "mrope_section": section})
        rotary = Qwen3VLTextRotaryEmbedding(text)
        positions = torch.arange(7, 700, 9).view(1, 1, -1)
        x = torch.zeros(1, dtype=torch.float32)
        cos, sin = rotary(x, positions.expand(3, 2, -1))
        config = TextEncoderConfig.from_dict({"model_type": "qwen3_vl", "text_config": {
            "vocab_size": 8, "hidden_size": 64, "intermediate_size": 8, "num_hidden_layers": 2,
            "num_attention_heads": 4, "head_dim": head_dim, "rope_parameters": text.rope_parameters}}, return_index=1)
        angles = positions[0, 0, :, None].float() * torch.from_numpy(rope_inverse_frequencies(config))
        expected = torch.cat([angles, angles], dim=-1)
        torch.testing.assert_close(cos[0], expected.cos(), rtol=0, atol=0)
        torch.testing.assert_close(sin[1], expected.sin(), rtol=0, atol=0)
        # Not vacuous: unequal components (an image's h/w grid) do change the rotation.
        cos_3d, _ = rotary(x, torch.stack([positions[0], positions[0] + 1, positions[0] + 2]).expand(3, 2, -1))
        assert not torch.equal(cos_3d, cos)


# ---- graph structure --------------------------------------------------------------------------------------------------


def test_graph_contract_and_cut_points(case, tmp_path):
    checkpoint, _, _ = case
    config = checkpoint.config
    path = export(checkpoint, tmp_path)
    model = onnx.load(str(path))
    dims = {v.name: [d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim]
            for v in (*model.graph.input, *model.graph.output)}
    hkv, dh, n = config.num_key_value_heads, config.head_dim, config.kept_layers
    assert dims == {
        INPUT_IDS: ["batch", "text_len"],
        ATTENTION_MASK: ["batch", TOTAL_LEN_DIM],
        PAST_KEY_VALUES: [n, 2, "batch", PAST_LEN_DIM, hkv, dh],
        PROMPT_EMBEDS: ["batch", "text_len", config.hidden_size],
        KEY_VALUES: [n, 2, "batch", "text_len", hkv, dh],
    }
    metadata = {p.key: p.value for p in model.metadata_props}
    assert json.loads(metadata[BLOCK_OUTPUTS_METADATA]) == [layer_output(i) for i in range(n)]
    produced = {o for node in model.graph.node for o in node.output}
    assert all(layer_output(i) in produced for i in range(n))
    constants = {i.name: onnx.numpy_helper.to_array(i) for i in model.graph.initializer}
    reads = sorted(int(constants[node.input[1]]) for node in model.graph.node
                   if node.op_type == "Gather" and node.input[0] == PAST_KEY_VALUES)
    assert reads == list(range(n))  # one constant-index Gather on axis 0 per layer, as the denoiser reads text_kv
    used = {i for node in model.graph.node for i in node.input}
    assert not any(f".layers.{n}." in name for name in used)  # layers after the kept hidden state are never read
    assert (f"{LANGUAGE_MODEL}.norm.weight" in used) == config.final_norm
    assert sum(node.op_type == "Attention" for node in model.graph.node) == n


# ---- precision, weights, engines -------------------------------------------------------------------------------------


def test_fp8_linears_stay_close_to_fp32(case, processor, tmp_path):
    """W8A8 on every linear (activation amax measured on transformers' forward) and FP8-weight-only GEMMs, run in
    ONNX Runtime: Q/DQ where the modes say, outputs close to the float32 graph."""
    checkpoint, model, session = case
    config = checkpoint.config
    inputs = encode(processor, PROMPTS["short+long"], "right")
    amax: dict[str, float] = {}
    hooks = [module.register_forward_pre_hook(lambda m, args, name=name: amax.__setitem__(name, max(
        amax.get(name, 0.0), float(args[0].abs().max()))))
        for name, module in model.named_modules() if isinstance(module, torch.nn.Linear) and ".layers." in name]
    with torch.no_grad():
        model(**{k: torch.from_numpy(v) for k, v in inputs.items()})
    for hook in hooks:
        hook.remove()
    ids, mask = inputs["input_ids"], inputs["attention_mask"]
    expected, _ = run(session, ids, mask, empty_past(config, 2))
    real = mask.astype(bool)
    for scales, quantize_nodes in ((QuantRecipe(amax), 7 * config.kept_layers),
                                   (QuantRecipe(amax, {LANGUAGE_MODEL: GemmMode.FP8_WEIGHTS}), 0)):
        path = export(checkpoint, tmp_path / f"fp8-{quantize_nodes}", fp8=scales)
        graph = onnx.load(str(path)).graph
        assert sum(n.op_type == "QuantizeLinear" for n in graph.node) == quantize_nodes
        assert sum(n.op_type == "DequantizeLinear" for n in graph.node) == quantize_nodes + 7 * config.kept_layers
        embeds, _ = run(ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]), ids, mask,
                        empty_past(config, 2))
        assert relative_error(embeds, expected, real) <= 0.1


@pytest.fixture(scope="module")
def bf16_bundle(tmp_path_factory):
    """A bf16 sharded checkpoint exported in bf16 with external data and links: (checkpoint, graph path)."""
    text_config, return_index = TINY_TEXT_CONFIGS["gqa"]
    root = tmp_path_factory.mktemp("text-encoder-bf16")
    folder = write_tiny_text_encoder(root / "text_encoder", text_config, dtype="bfloat16", max_shard_size="100KB")
    checkpoint = open_text_encoder(folder, return_index)
    return checkpoint, export(checkpoint, root / "bundle", compute="bf16", external=True, link=True)


def test_bundle_links_the_shards_instead_of_copying_bf16_weights(bf16_bundle):
    checkpoint, path = bf16_bundle
    bundle = path.parent
    model = onnx.load(str(path), load_external_data=False)
    locations = {i.name: {e.key: e.value for e in i.external_data}.get("location") for i in model.graph.initializer}
    linked = {n for n, loc in locations.items() if loc and loc.startswith(CHECKPOINT_LINKS_DIR + "/")}
    config = checkpoint.config
    gemm_weights = {n for n in checkpoint.weights if n.endswith("proj.weight")
                    and int(n.split(".layers.")[1].split(".")[0]) < config.kept_layers}
    assert gemm_weights | {f"{LANGUAGE_MODEL}.embed_tokens.weight"} <= linked
    for shard in {bundle / locations[n] for n in linked}:
        assert shard.stat().st_nlink >= 2 and shard.stat().st_ino == (checkpoint.folder / shard.name).stat().st_ino
    # What is copied: the norm weights, converted to float32 for the float32 norms.
    norms = sum(checkpoint.weights.info(n).nbytes * 2 for n in checkpoint.weights if n.endswith("norm.weight")
                and ".layers." in n and int(n.split(".layers.")[1].split(".")[0]) < config.kept_layers)
    data = bundle / f"{TEXT_ENCODER_GRAPH}.onnx.data"
    assert not data.exists() or data.stat().st_size <= norms + 64 * len(model.graph.initializer)


def test_bf16_graph_builds_with_tensorrt_rtx(bf16_bundle, tmp_path):
    """Parsed (fused attention, rotary embedding, bf16 GEMMs) and built on the CPU from the linked bundle, over a
    profile that includes past_len = 0 (the prefix pass) and a cached prefix."""
    pytest.importorskip("tensorrt_rtx")
    from nucleus_export.engines.flavors import resolve_flavor
    from nucleus_export.engines.loaders import BuildSettings, EngineFromOnnx, NetworkFromOnnxPath
    from nucleus_export.engines.profiles import onnx_input_shapes, profile_shapes

    _, path = bf16_bundle
    ranges = {"batch": (1, 2, 2), "text_len": (1, 16, 48), PAST_LEN_DIM: (0, 32, 64), TOTAL_LEN_DIM: (1, 48, 112)}
    report = EngineFromOnnx(NetworkFromOnnxPath(resolve_flavor("tensorrt-rtx"), path),
                            BuildSettings(profile_shapes(onnx_input_shapes(path), ranges)), tmp_path / "te.plan",
                            TEXT_ENCODER_GRAPH)()
    net = report.network
    assert report.engine_bytes > 0
    assert net.layer_types.get("ATTENTION_INPUT") == 2 and net.layer_types.get("ROTARY_EMBEDDING") == 4
    assert all(g.input_dtypes == ["BF16", "BF16"] for g in net.gemms if "proj" in g.name)
    assert net.outputs == {PROMPT_EMBEDS: "FLOAT", KEY_VALUES: "BF16"}


def test_synthetic_writer_streams_the_real_layout(tmp_path):
    """The streaming writer lays out Qwen3VLForConditionalGeneration's tensors (vision tower and LM head included) in
    transformers' sharded layout; the spec resolves to the real dimensions."""
    from nucleus_export.model.text_encoder import parse_synthetic_spec, write_synthetic_text_encoder

    config, seed = parse_synthetic_spec("synthetic:qwen3-vl-text?layers=3&seed=4")
    assert config["text_config"]["num_hidden_layers"] == 3 and config["text_config"]["hidden_size"] == 4096 and seed == 4
    with pytest.raises(NucleusExportError, match="unknown synthetic text encoder"):
        parse_synthetic_spec("synthetic:nucleus-image?layers=3")
    tiny_text = {k: v for k, v in TINY_TEXT_CONFIGS["gqa"][0].items() if k != "rope_parameters"}  # keep the legacy rope form
    small = {**config, "text_config": {**config["text_config"], **tiny_text},
             "vision_config": {**config["vision_config"], **TINY_VISION_CONFIG, "out_hidden_size": 64}}
    folder = write_synthetic_text_encoder(tmp_path / "te", small, shard_bytes=64 << 10)
    checkpoint = open_text_encoder(folder)
    assert (folder / INDEX_NAME).is_file() and len(checkpoint.weights.shards) > 1
    assert checkpoint.config.rope_theta == 5e6 and checkpoint.config.kept_layers == 2
    assert {str(checkpoint.weights.dtype(n)) for n in checkpoint.weights} == {"bfloat16"}
