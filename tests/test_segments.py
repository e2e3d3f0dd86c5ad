"""Segments (rewrites/segments.py) of the denoiser and the text encoder, the build-memory plan and synthetic
real-architecture checkpoints.

The contract under test: a graph cut into segments computes exactly what the full graph computes (ONNX Runtime
fp32, chained by the runtime backend), on several architectures of the real model at tiny size.
"""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
from nucleus_runtime.bundle import FileRecord, SegmentRecord, load_manifest
from nucleus_runtime.contract import CHECKPOINT_LINKS_DIR

from nucleus_export.cli import main
from nucleus_export.costs.build_memory import (
    BUILD_BASE_BYTES,
    BUILD_BYTES_PER_WEIGHT_BYTE,
    groups_by_bytes,
    plan_build_memory,
)
from nucleus_export.rewrites.segments import block_outputs, even_groups, split_segments
from nucleus_export.errors import NucleusExportError, UsageError
from nucleus_export.export import ExportOptions, export_bundle
from nucleus_export.model.checkpoint import open_checkpoint
from nucleus_export.model.tiny import write_checkpoint

RESOLUTIONS = [(64, 64), (64, 128)]

# Architectures of the configuration space: GQA ratios, routing functions, dense strategies, expert counts, depths.
VARIANTS = {
    "tiny": {},
    "mha-sigmoid-all-moe": {"num_key_value_heads": 4, "use_sigmoid": True, "dense_moe_strategy": "all_moe",
                            "num_layers": 4, "capacity_factors": [2.0, 4.0, 2.0, 1.0]},
    "gqa4-first-dense-16e": {"num_attention_heads": 8, "num_key_value_heads": 2, "attention_head_dim": 16,
                             "axes_dims_rope": [4, 6, 6], "dense_moe_strategy": "leave_first_block_dense",
                             "num_experts": 16, "num_layers": 6, "capacity_factors": [0.0, 2.0, 4.0, 2.0, 8.0, 2.0]},
}


@pytest.fixture(scope="module", params=sorted(VARIANTS))
def variant_checkpoint(request, tmp_path_factory):
    if not VARIANTS[request.param]:
        from nucleus_export.model.tiny import ensure_tiny_checkpoint

        return open_checkpoint(ensure_tiny_checkpoint())
    folder = tmp_path_factory.mktemp("ckpt") / request.param
    return open_checkpoint(write_checkpoint(folder, VARIANTS[request.param]))


def _inputs(manifest, rng, batch=2, text_len=8):
    config = manifest.model_config
    rows, cols = manifest.profiles.grids[-1]
    tokens = rows * cols
    head_dim = config["attention_head_dim"]
    return {
        "ehs": rng.standard_normal((batch, text_len, config["joint_attention_dim"])).astype(np.float32),
        "txt_rope": rng.standard_normal((text_len, head_dim // 2)).astype(np.float32),
        "hidden": rng.standard_normal((batch, tokens, config["in_channels"])).astype(np.float32),
        "timestep": np.array([0.9, 0.35][:batch], dtype=np.float32),
        "img_rope": rng.standard_normal((tokens, head_dim // 2)).astype(np.float32),
        "mask": np.array([[1] * text_len, [1] * (text_len // 2) + [0] * (text_len - text_len // 2)][:batch], dtype=np.int64),
    }


def _denoise(backend, x):
    kv = backend.compute_text_kv(x["ehs"], x["txt_rope"], x["txt_rope"])
    return backend.denoise(x["hidden"], x["timestep"], x["img_rope"], x["img_rope"], kv, x["mask"])


@pytest.mark.parametrize("external", [False, True], ids=["inline", "external-data"])
def test_segmented_bundle_matches_single_graph(variant_checkpoint, tmp_path, external):
    from nucleus_runtime.backends.onnxruntime import OrtBackend, OrtOptions

    layers = variant_checkpoint.config.num_layers
    out = tmp_path / "bundle"
    export_bundle(
        variant_checkpoint,
        out,
        ExportOptions(resolutions=RESOLUTIONS, max_text_len=16, external_data=external, segments=min(3, layers)),
    )
    manifest = load_manifest(out)
    segments = manifest.graph_segments("denoiser")
    assert [tuple(s.blocks) for s in segments] == even_groups(layers, min(3, layers))
    x = _inputs(manifest, np.random.default_rng(0))
    chained = _denoise(OrtBackend(out, OrtOptions(segments=True)), x)
    single = _denoise(OrtBackend(out, OrtOptions(segments=False)), x)
    assert np.isfinite(single).all() and np.abs(single).max() > 0
    scale = np.abs(single).max()
    assert np.array_equal(chained, single) or np.abs(chained - single).max() <= 1e-6 * scale
    if external:
        # Every segment reads the full graph's weights (here fp32 weights from an fp32 checkpoint: its linked
        # shards) where they are: no new data file, no copied weight.
        def locations(graph: str) -> set[str]:
            model = onnx.load(str(out / graph), load_external_data=False)
            return {e.value for init in model.graph.initializer for e in init.external_data if e.key == "location"}

        full = locations("denoiser.onnx")
        assert full and all(loc.startswith(CHECKPOINT_LINKS_DIR + "/") for loc in full)
        assert not list(out.glob("*.data"))
        for seg in segments:
            assert locations(f"{seg.name}.onnx") <= full


def test_segment_graphs_take_their_text_kv_slice(tiny_checkpoint, tmp_path):
    export_bundle(tiny_checkpoint, tmp_path / "b", ExportOptions(resolutions=RESOLUTIONS, max_text_len=16))
    model = onnx.load(str(tmp_path / "b" / "denoiser.onnx"), load_external_data=False)
    assert len(block_outputs(model)) == tiny_checkpoint.config.num_layers
    pieces = split_segments(model, [(0, 2), (2, 3), (3, 5)], "denoiser")
    for seg_model, seg in pieces:
        text_kv = next(v for v in seg_model.graph.input if v.name == "text_kv")
        assert text_kv.type.tensor_type.shape.dim[0].dim_value == seg.blocks[1] - seg.blocks[0]
        # Only float tensors with profile dims cross a cut: the attention bias over S + T is recomputed.
        for value in list(seg_model.graph.input) + list(seg_model.graph.output):
            dims = value.type.tensor_type.shape.dim
            assert all(d.dim_param in ("batch", "image_tokens", "text_len") or d.dim_value > 0 for d in dims)
        onnx.checker.check_model(seg_model)
    assert pieces[0][1].inputs[0] == "hidden_states" and pieces[-1][1].outputs == ["sample"]
    with pytest.raises(NucleusExportError, match="do not cover"):
        split_segments(model, [(0, 2), (3, 5)], "denoiser")


def test_groups_by_bytes_and_memory_plan():
    assert groups_by_bytes([5, 5, 5, 5], 10) == [(0, 2), (2, 4)]
    assert groups_by_bytes([5, 20, 5], 10) == [(0, 1), (1, 2), (2, 3)]
    assert even_groups(5, 2) == [(0, 2), (2, 5)] or even_groups(5, 2) == [(0, 3), (3, 5)]
    blocks = [10**9] * 6
    roomy = plan_build_memory(blocks, 0, BUILD_BASE_BYTES + int(BUILD_BYTES_PER_WEIGHT_BYTE * 6e9) + 1)
    assert roomy.groups == [(0, 6)]
    tight = plan_build_memory(blocks, 0, BUILD_BASE_BYTES + int(BUILD_BYTES_PER_WEIGHT_BYTE * 2e9) + 1)
    assert tight.groups == [(0, 2), (2, 4), (4, 6)]
    assert tight.predicted_peak <= tight.budget
    with pytest.raises(UsageError, match="too small"):
        plan_build_memory(blocks, 0, BUILD_BASE_BYTES + int(BUILD_BYTES_PER_WEIGHT_BYTE * 0.5e9))


def test_segmented_tensorrt_rtx_build(tmp_path):
    pytest.importorskip("tensorrt_rtx")
    out = tmp_path / "b"
    code = main(["build", "--model", "tiny", "--backend", "tensorrt-rtx", "--skip-quality", "--out", str(out),
                 "--resolutions", "64x64,64x128", "--max-text-len", "16", "--segments", "2"])
    assert code == 0
    manifest = load_manifest(out)
    names = [s.name for s in manifest.graph_segments("denoiser")]
    assert names == ["denoiser.seg0", "denoiser.seg1"]
    for name in ["text_kv", *names]:
        assert (out / f"{name}.plan").stat().st_size > 0
        assert manifest.engine(name).flavor == "tensorrt-rtx"
        assert f"{name}.plan" in manifest.files
    assert not (out / "denoiser.plan").exists()
    log = json.loads((out / "build_log.json").read_text())
    assert set(log["engines"]) == {"text_kv", *names}


def test_memory_budget_picks_segments(tmp_path):
    pytest.importorskip("tensorrt_rtx")
    out = tmp_path / "b"
    # A budget 2 MB of weights over the base: the tiny fp32 denoiser (about 1 MB per block) needs several engines.
    budget_gb = (BUILD_BASE_BYTES + BUILD_BYTES_PER_WEIGHT_BYTE * 2.0e6) / 1e9
    code = main(["build", "--model", "tiny", "--backend", "tensorrt-rtx", "--skip-quality", "--out", str(out),
                 "--resolutions", "64x64", "--max-text-len", "16", "--precision", "fp32",
                 "--max-build-memory", f"{budget_gb:.6f}"])
    assert code == 0
    segments = load_manifest(out).graph_segments("denoiser")
    assert len(segments) > 1
    assert [s.blocks[0] for s in segments] == sorted(s.blocks[0] for s in segments)


def test_strip_weights_without_gpu_is_a_clear_error(tmp_path, capsys, monkeypatch):
    pytest.importorskip("tensorrt_rtx")
    from nucleus_runtime.gpu import cuda_device_count

    if cuda_device_count() > 0:
        pytest.skip("a GPU is visible: stripped builds may work here")
    code = main(["build", "--model", "tiny", "--backend", "tensorrt-rtx", "--skip-quality", "--out", str(tmp_path / "b"),
                 "--strip-weights"])
    assert code == 1
    err = capsys.readouterr().err
    assert "without a GPU" in err and "Traceback" not in err
    assert not (tmp_path / "b").exists()


def test_synthetic_spec_and_streamed_writer(tmp_path):
    from nucleus_export.model.synthetic import (
        NUCLEUS_IMAGE_CONFIG,
        nucleus_image_config,
        parse_synthetic_spec,
        write_synthetic_checkpoint,
    )
    from nucleus_export.model.tiny import TINY_CONFIG

    config, seed = parse_synthetic_spec("synthetic:nucleus-image?layers=6&seed=3")
    assert (config["num_layers"], seed, config["capacity_factors"]) == (6, 3, [0.0, 0.0, 0.0, 4.0, 4.0, 2.0])
    assert nucleus_image_config()["num_layers"] == NUCLEUS_IMAGE_CONFIG["num_layers"] == 32
    for bad in ("synthetic:flux", "synthetic:nucleus-image?layers=x", "synthetic:nucleus-image?depth=3"):
        with pytest.raises(UsageError):
            parse_synthetic_spec(bad)
    # The writer on a tiny architecture (the real one is GBs): several shards, an index, diffusers' loader agrees.
    small = {**TINY_CONFIG, "num_layers": 4, "capacity_factors": [0.0, 0.0, 0.0, 2.0]}
    a = write_synthetic_checkpoint(tmp_path / "a", small, seed=1, shard_bytes=200_000)
    b = write_synthetic_checkpoint(tmp_path / "b", small, seed=1, shard_bytes=200_000)
    ckpt = open_checkpoint(a)
    assert len(ckpt.weights.shards) > 1 and (a / "diffusion_pytorch_model.safetensors.index.json").is_file()
    assert all(ckpt.weights.dtype(n).name == "bfloat16" for n in ckpt.weights)
    for shard_a, shard_b in zip(sorted(a.glob("*.safetensors")), sorted(b.glob("*.safetensors"))):
        assert shard_a.read_bytes() == shard_b.read_bytes()
    gate = ckpt.weights.read("transformer_blocks.3.img_mlp.gate.weight").astype(np.float32)
    assert 0.5 < gate.std() * np.sqrt(gate.shape[1]) / 4.0 < 2.0  # init_law's router scale

    import torch
    from diffusers import NucleusMoEImageTransformer2DModel

    model = NucleusMoEImageTransformer2DModel.from_pretrained(a, torch_dtype=torch.bfloat16)
    assert model.config.num_layers == 4


def test_tensorrt_backend_chains_segments_on_device():
    """The TensorRT backend's segment loop (no GPU here): each segment binds its text_kv slice by address, takes
    earlier outputs from their device buffers and uploads only host inputs; the weight-streaming budget is shared
    in proportion to the plans."""
    from nucleus_runtime.backends.tensorrt import (
        TensorRTBackend,
        TrtTensor,
        _split_budget,
    )
    from nucleus_runtime.bundle import Manifest
    from trt_stand_ins import Buffer, Engine

    backend = object.__new__(TensorRTBackend)
    backend.segments = [
        SegmentRecord("denoiser.seg0", (0, 2), ["hidden_states", "text_kv"], ["x"], "sha256:0"),
        SegmentRecord("denoiser.seg1", (2, 5), ["x", "timestep", "text_kv"], ["sample"], "sha256:1"),
    ]
    backend._denoisers = [Engine(10_000, (2, 16, 8)), Engine(20_000, (2, 16, 8))]
    uploads, executed = [], []
    backend._upload = lambda engine, name, array: uploads.append((engine, name))
    backend._execute = lambda engine, name: executed.append(name)
    backend.copy_to_host = lambda host, ptr: host.fill(ptr)
    kv_shape = (5, 2, 2, 8, 2, 4)
    kv = TrtTensor(Buffer(1_000_000, int(np.prod(kv_shape)) * 2), kv_shape, np.dtype(np.uint16), backend)
    inputs = {"hidden_states": np.zeros(1), "timestep": np.zeros(1)}
    out = backend._denoise_segments(inputs, kv)
    seg0, seg1 = (e.context for e in backend._denoisers)
    layer = int(np.prod(kv_shape[1:])) * 2
    assert seg0.addresses["text_kv"] == 1_000_000 and seg0.shapes["text_kv"] == (2, *kv_shape[1:])
    assert seg1.addresses["text_kv"] == 1_000_000 + 2 * layer and seg1.shapes["text_kv"] == (3, *kv_shape[1:])
    assert seg1.addresses["x"] == backend._denoisers[0].buffers["x"].ptr  # device to device, no host trip
    assert [(e is backend._denoisers[1], n) for e, n in uploads] == [(False, "hidden_states"), (True, "timestep")]
    assert executed == ["denoiser.seg0", "denoiser.seg1"]
    assert (out == backend._denoisers[1].buffers["sample"].ptr).all()

    manifest = object.__new__(Manifest)
    object.__setattr__(manifest, "files", {"denoiser.seg0.plan": FileRecord("0" * 64, 100),
                                          "denoiser.seg1.plan": FileRecord("0" * 64, 300)})
    assert _split_budget(manifest, ["denoiser.seg0", "denoiser.seg1"], 4000) == [1000, 3000]
    assert _split_budget(manifest, ["denoiser.seg0"], None) == [None]


def test_tensorrt_backend_runs_one_denoiser_unit_from_the_host():
    """run_denoiser_unit (check --backend's per-segment comparison): one segment's engine with every input uploaded
    from the host, its text_kv slice bound by address, each output copied back; the whole graph's cached text_kv
    binding is dropped, since the unit's run rebinds it."""
    from nucleus_runtime.backends.tensorrt import TensorRTBackend, TrtTensor
    from trt_stand_ins import Buffer, Engine

    backend = object.__new__(TensorRTBackend)
    backend.segments = [
        SegmentRecord("denoiser.seg0", (0, 2), ["hidden_states", "text_kv"], ["x"], "sha256:0"),
        SegmentRecord("denoiser.seg1", (2, 5), ["x", "timestep", "text_kv"], ["sample"], "sha256:1"),
    ]
    backend._denoisers = [Engine(10_000, (2, 16, 8)), Engine(20_000, (2, 16, 8))]
    backend._bound_text_kv = object()
    uploads, executed = [], []
    backend._upload = lambda engine, name, array: uploads.append((engine, name)) or 7_000_000 + len(uploads)
    backend._execute = lambda engine, name: executed.append(name)
    backend.copy_to_host = lambda host, ptr: host.fill(ptr)
    kv_shape = (5, 2, 2, 8, 2, 4)
    kv = TrtTensor(Buffer(1_000_000, int(np.prod(kv_shape)) * 2), kv_shape, np.dtype(np.uint16), backend)
    out = backend.run_denoiser_unit(1, {"x": np.zeros((2, 16, 8), np.float32), "timestep": np.zeros(2, np.float32)}, kv)
    seg1 = backend._denoisers[1]
    assert [(e is seg1, n) for e, n in uploads] == [(True, "x"), (True, "timestep")] and executed == ["denoiser.seg1"]
    layer = int(np.prod(kv_shape[1:])) * 2
    assert seg1.context.addresses["text_kv"] == 1_000_000 + 2 * layer and seg1.context.shapes["text_kv"] == (3, *kv_shape[1:])
    assert list(out) == ["sample"] and (out["sample"] == seg1.buffers["sample"].ptr).all()
    assert backend._bound_text_kv is None


@pytest.mark.parametrize("groups", [[(0, 1), (1, 3)], [(0, 1), (1, 2), (2, 3)]], ids=["1+2", "1+1+1"])
def test_text_encoder_segments_slice_the_past_and_their_key_values(tmp_path, groups):
    """The text encoder (MHA with biases, every layer and the final norm) cut at its layer outputs: each segment reads
    past_key_values[first:last] and outputs key_values of its own layers; run in order, they give the full graph's
    prompt_embeds and (concatenated) key_values exactly, with a past and without."""
    import onnxruntime as ort

    from nucleus_export.export import write_graph
    from nucleus_export.graph.precision import GraphPrecision
    from nucleus_export.graph.text_encoder import build_text_encoder, text_encoder_metadata
    from nucleus_export.model.text_encoder import open_text_encoder, write_tiny_text_encoder

    text = {"vocab_size": 64, "hidden_size": 48, "intermediate_size": 96, "num_hidden_layers": 3,
            "num_attention_heads": 3, "num_key_value_heads": 3, "head_dim": 24, "attention_bias": True,
            "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [6, 3, 3]}}
    checkpoint = open_text_encoder(write_tiny_text_encoder(tmp_path / "te", text, seed=3), return_index=-1)
    config = checkpoint.config
    write_graph(tmp_path, "text_encoder", checkpoint.weights, GraphPrecision("fp32"),
                lambda g, e: build_text_encoder(g, e, config), False, text_encoder_metadata(config))
    model = onnx.load(str(tmp_path / "text_encoder.onnx"))
    pieces = split_segments(model, groups, "text_encoder")
    full = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    rng = np.random.default_rng(0)
    for past_len in (0, 6):
        ids = rng.integers(0, 64, (2, 5))
        mask = np.ones((2, past_len + 5), np.int64)
        mask[1, -2:] = 0
        past = rng.standard_normal((3, 2, 2, past_len, 3, 24)).astype(np.float32)
        feeds = {"input_ids": ids, "attention_mask": mask, "past_key_values": past}
        embeds, key_values = full.run(["prompt_embeds", "key_values"], feeds)
        values, parts = dict(feeds), []
        for seg_model, seg in pieces:
            first, last = seg.blocks
            dims = {v.name: v.type.tensor_type.shape.dim for v in (*seg_model.graph.input, *seg_model.graph.output)}
            assert dims["past_key_values"][0].dim_value == dims["key_values"][0].dim_value == last - first
            session = ort.InferenceSession(seg_model.SerializeToString(), providers=["CPUExecutionProvider"])
            inputs = {n: past[first:last] if n == "past_key_values" else values[n] for n in seg.inputs}
            outputs = dict(zip(seg.outputs, session.run(seg.outputs, inputs)))
            parts.append(outputs.pop("key_values"))
            values.update(outputs)
        assert np.array_equal(values["prompt_embeds"], embeds)
        assert np.array_equal(np.concatenate(parts), key_values)
    with pytest.raises(NucleusExportError, match="vae_decoder stage cannot be cut"):
        split_segments(model, groups, "vae_decoder")
