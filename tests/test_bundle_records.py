"""The manifest's typed records: every earlier bundle layout still loads, records refuse what they cannot hold, and
graph identities hash exactly the bytes a graph reads, so caches keyed by them never mix two fine-tunes."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from nucleus_runtime.backends.onnxruntime import OrtBackend
from nucleus_runtime.bundle import Manifest, load_manifest, verify_files
from nucleus_runtime.errors import NucleusError
from nucleus_runtime.pipeline import generate
from nucleus_runtime.scheduler import SchedulerConfig
from nucleus_runtime.text_kv_cache import TextKVCache

from nucleus_export.export import ExportOptions, export_bundle
from nucleus_export.model.checkpoint import open_checkpoint
from nucleus_export.model.tiny import write_checkpoint

LEGACY = Path(__file__).parent / "data" / "legacy_v1"
# The checkpoint the format-1 bundles were exported from (tests/data/legacy_v1/README-generator.py.txt).
MICRO = {"num_layers": 2, "attention_head_dim": 32, "num_attention_heads": 2, "num_key_value_heads": 1,
         "joint_attention_dim": 32, "axes_dims_rope": [8, 12, 12], "dense_moe_strategy": "leave_first_block_dense",
         "num_experts": 4, "moe_intermediate_dim": 16, "capacity_factors": [0.0, 2.0]}
MICRO_SEED = 7


# ---- earlier layouts --------------------------------------------------------------------------------------------


def test_every_format_1_layout_loads_into_typed_records():
    export = load_manifest(LEGACY / "export-fp32")
    assert export.precision_label == "fp32" and export.engine_units() == ["text_kv", "denoiser"]
    assert export.engine("denoiser") is None and export.plugins is None and export.quantization is None
    assert export.stages["denoiser"].io.outputs["sample"].shape == ["batch", "image_tokens", 64]

    segmented = load_manifest(LEGACY / "export-bf16-linked-segments")
    assert segmented.engine_units() == ["text_kv", "denoiser.seg0", "denoiser.seg1"]
    assert [s.blocks for s in segmented.graph_segments("denoiser")] == [(0, 1), (1, 2)]
    assert any(f.startswith("checkpoint/") for f in segmented.files)

    native = load_manifest(LEGACY / "build-bf16-native")
    record = native.engine("denoiser.seg1")
    assert (record.flavor, record.lowering.moe, record.compute_capabilities) == ("tensorrt-rtx", "native", ["SM80", "SM86", "SM89", "SM120"])
    assert record.lowering.combine in ("onehot", "chain") and native.engine("text_kv") is not None

    fp8 = load_manifest(LEGACY / "build-fp8")
    assert fp8.precision_label == "bf16+fp8" and fp8.quantization.scheme == "fp8_e4m3"
    assert fp8.engine("denoiser").lowering.combine == "chain"

    plugin = load_manifest(LEGACY / "build-plugin")
    assert plugin.plugins.library == "plugins/libnucleus_trt_plugins.so" and plugin.plugins.version == "1"
    assert all(plugin.engine(u).lowering.moe == "plugin" and plugin.engine(u).lowering.combine is None
               for u in plugin.engine_units())
    # Format 1 knew no graph identities: they stand for every file a graph may read.
    assert all(plugin.unit_digest(u).startswith("files:") for u in plugin.engine_units())
    for manifest in (export, segmented, native, fp8, plugin):
        assert Manifest.from_dict(json.loads(manifest.to_json())) == manifest  # written back as format 2


def test_a_format_1_recipe_loads_with_its_modes():
    from nucleus_runtime.contract import GemmMode

    from nucleus_export.graph.precision import QuantRecipe

    recipe = QuantRecipe.load(LEGACY / "build-fp8" / "fp8_scales.json")
    assert recipe.mode("transformer_blocks.0.attn.to_q") == GemmMode.COMPUTE
    assert recipe.mode("transformer_blocks.1.attn.to_q") == GemmMode.FP8_WEIGHTS
    assert recipe.mode("transformer_blocks.1.attn.to_k") == GemmMode.FP8


def _denoise_once(bundle: Path, cache: TextKVCache | None = None, seed: int = 0) -> np.ndarray:
    manifest = load_manifest(bundle)
    text = np.random.default_rng(seed).standard_normal((1, 8, manifest.model_config["joint_attention_dim"])).astype(np.float32)
    backend = OrtBackend(bundle, manifest=manifest)
    try:
        return generate(backend, manifest, SchedulerConfig.from_file(bundle / "scheduler_config.json"), text, None,
                        np.zeros_like(text), None, height=64, width=64, steps=2, guidance=4.0, seed=1, cache=cache)
    finally:
        backend.close()


def _legacy_timestep_frequencies() -> np.ndarray:
    """The timestep frequencies the format-1 bundle holds (the constant its time embedding multiplies by)."""
    import onnx
    from onnx import numpy_helper

    graph = onnx.load(str(LEGACY / "export-fp32" / "denoiser.onnx")).graph
    (node,) = [n for n in graph.node if n.name == "time_text_embed/Mul_3"]
    (init,) = [i for i in graph.initializer if i.name in node.input]
    return numpy_helper.to_array(init)[0]


def test_a_format_1_bundle_runs_as_the_same_model_exported_today(tmp_path, monkeypatch):
    """The fp32 bundle written by the format-1 exporter verifies its checksums and denoises exactly as a bundle this
    exporter writes from the same checkpoint. The exporter computes the timestep frequencies with torch.exp, as
    diffusers does, on the machine that exports, and torch's float32 exp rounds a few of them differently on other
    CPUs (1 ulp: an AMD EPYC against the Xeon that wrote the bundle): today's bundle takes the format-1 bundle's, once they are shown that
    close, so the rest is compared bit for bit."""
    from nucleus_export.graph import denoiser

    verify_files(LEGACY / "export-fp32", load_manifest(LEGACY / "export-fp32"))
    legacy = _legacy_timestep_frequencies()
    np.testing.assert_array_max_ulp(legacy, denoiser.timestep_frequencies(2 * legacy.size), maxulp=1)
    monkeypatch.setattr(denoiser, "timestep_frequencies", lambda dim: legacy.copy())
    checkpoint = open_checkpoint(write_checkpoint(tmp_path / "ckpt", MICRO, seed=MICRO_SEED))
    export_bundle(checkpoint, tmp_path / "now", ExportOptions(resolutions=[(64, 64), (32, 96)], max_text_len=16, opt_text_len=8))
    assert load_manifest(tmp_path / "now").config_hash == load_manifest(LEGACY / "export-fp32").config_hash
    np.testing.assert_array_equal(_denoise_once(LEGACY / "export-fp32"), _denoise_once(tmp_path / "now"))


# ---- records refuse what they cannot hold ----------------------------------------------------------------------


def _edited(edit) -> dict:
    raw = json.loads(load_manifest(LEGACY / "build-fp8").to_json())
    edit(raw)
    return raw


@pytest.mark.parametrize(
    ("edit", "words"),
    [
        (lambda m: m["stages"]["denoiser"]["engines"]["denoiser"].update(flavor="tensorflow"), "engine flavor 'tensorflow'"),
        (lambda m: m["stages"]["denoiser"]["engines"]["denoiser"]["lowering"].update(combine=None), "native lowerings name"),
        (lambda m: m["stages"]["denoiser"]["engines"]["denoiser"]["lowering"].update(moe="functions"), "MoE lowering 'functions'"),
        (lambda m: m["stages"]["denoiser"]["engines"]["denoiser"].update(stripped="no"), "stripped is 'no'"),
        (lambda m: m["stages"]["denoiser"]["engines"].update({"text_kv": m["stages"]["denoiser"]["engines"]["denoiser"]}),
         "another stage"),
        (lambda m: m["stages"].update(vae=m["stages"]["text_kv"]), "stages are"),
        (lambda m: m.update(quantization={"scheme": "int4"}), "scheme 'int4'"),
        (lambda m: m["stages"]["denoiser"].update(segments=[{"name": "denoiser.seg0", "blocks": [2, 1], "inputs": [],
                                                               "outputs": [], "digest": "x"}]), "first < last"),
    ],
)
def test_records_refuse_what_they_cannot_hold(edit, words):
    with pytest.raises(NucleusError, match=words.replace("(", r"\(")) as info:
        Manifest.from_dict(_edited(edit))
    assert info.value.fix


# ---- identity of what a graph reads ----------------------------------------------------------------------------


def _scale_tensor(checkpoint_dir: Path, name: str) -> None:
    """Change one tensor in place in a (copied, not linked) shard: a fine-tune that differs only there."""
    weights = open_checkpoint(checkpoint_dir).weights
    info = weights.info(name)
    data = np.memmap(info.shard, dtype=weights.dtype(name), mode="r+", offset=info.begin, shape=info.shape)
    data *= 1.5
    data.flush()


@pytest.fixture(scope="module")
def fine_tunes(tiny_checkpoint_dir, tmp_path_factory) -> dict[str, Path]:
    """Bundles with linked weights of the tiny model and of two fine-tunes of it: one differs in a text_kv tensor,
    one in a denoiser tensor."""
    root = tmp_path_factory.mktemp("fine-tunes")
    changed = {"base": None, "text_kv": "transformer_blocks.1.attn.add_k_proj.weight",
               "denoiser": "transformer_blocks.1.attn.to_q.weight"}
    bundles = {}
    for label, tensor in changed.items():
        folder = Path(shutil.copytree(tiny_checkpoint_dir, root / f"ckpt-{label}"))
        if tensor is not None:
            _scale_tensor(folder, tensor)
        options = ExportOptions(resolutions=[(64, 64)], max_text_len=16, opt_text_len=8, external_data=True,
                                link_checkpoint=True)
        export_bundle(open_checkpoint(folder), root / label, options)
        bundles[label] = root / label
    return bundles


def test_identities_hash_the_linked_bytes_each_graph_reads(fine_tunes):
    base, text_kv, denoiser = (load_manifest(fine_tunes[k]) for k in ("base", "text_kv", "denoiser"))
    assert any(f.startswith("checkpoint/") for f in base.files)
    # The graph files are byte for byte the same: every weight lives in the linked shards.
    assert base.files["text_kv.onnx"] == text_kv.files["text_kv.onnx"]
    assert base.files["denoiser.onnx"] == denoiser.files["denoiser.onnx"]
    assert base.unit_digest("text_kv") != text_kv.unit_digest("text_kv")
    assert base.unit_digest("denoiser") == text_kv.unit_digest("denoiser")
    assert base.unit_digest("denoiser") != denoiser.unit_digest("denoiser")
    assert base.unit_digest("text_kv") == denoiser.unit_digest("text_kv")
    assert len({m.identity for m in (base, text_kv, denoiser)}) == 3  # "the same bundle?" tells all three apart


@pytest.mark.parametrize("changed", ["text_kv", "denoiser"])
def test_one_shared_cache_never_serves_another_fine_tune(fine_tunes, changed):
    """A text K/V cache shared by two bundles misses for the second one (it once returned the first bundle's output
    bit for bit), and each bundle's output equals its own uncached one."""
    cache = TextKVCache()
    first = _denoise_once(fine_tunes["base"], cache)
    second = _denoise_once(fine_tunes[changed], cache)
    assert (cache.stats.hits, cache.stats.misses) == (0, 2)
    np.testing.assert_array_equal(second, _denoise_once(fine_tunes[changed]))
    assert not np.array_equal(first, second)
    again = _denoise_once(fine_tunes[changed], cache)
    assert cache.stats.hits == 1 and np.array_equal(again, second)
