"""The runtime's full loop on an exported tiny bundle (ONNX Runtime, fp32) against diffusers' NucleusMoEImagePipeline,
the text K/V cache, the `run` CLI with safetensors files, and its errors on bad input."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from nucleus_runtime.backends.onnxruntime import OrtBackend, OrtOptions
from nucleus_runtime.bundle import load_manifest
from nucleus_runtime.contract import SCHEDULER_CONFIG_NAME
from nucleus_runtime.errors import NucleusError
from nucleus_runtime.pipeline import generate
from nucleus_runtime.scheduler import SchedulerConfig
from nucleus_runtime.text_kv_cache import TextKVCache
from safetensors.numpy import load_file, save_file

from nucleus_export.cli import main
from nucleus_export.export import ExportOptions, export_bundle
from nucleus_export.model.checkpoint import open_checkpoint
from nucleus_export.model.reference import load_reference
from nucleus_export.model.tiny import ensure_tiny_checkpoint

RESOLUTIONS = [(128, 128), (160, 96)]
STEPS = 3
TEXT_DIM = 64  # the tiny model's joint_attention_dim


@pytest.fixture(scope="module")
def bundle(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("runtime") / "bundle"
    options = ExportOptions(resolutions=RESOLUTIONS, max_text_len=32, opt_text_len=16)
    export_bundle(open_checkpoint(ensure_tiny_checkpoint()), out, options)
    return out


@pytest.fixture(scope="module")
def backend(bundle) -> OrtBackend:
    return OrtBackend(bundle, OrtOptions(threads=2))


@pytest.fixture(scope="module")
def scheduler_raw(bundle) -> dict:
    return json.loads((bundle / SCHEDULER_CONFIG_NAME).read_text())


@pytest.fixture(scope="module")
def diffusers_pipe(scheduler_raw):
    from diffusers import FlowMatchEulerDiscreteScheduler, NucleusMoEImagePipeline

    transformer = load_reference(open_checkpoint(ensure_tiny_checkpoint()))
    pipe = NucleusMoEImagePipeline(
        transformer=transformer,
        scheduler=FlowMatchEulerDiscreteScheduler.from_config(scheduler_raw),
        vae=None,
        text_encoder=None,
        processor=None,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def make_inputs(grid: tuple[int, int], seed: int = 0) -> dict[str, np.ndarray]:
    """A 9-token prompt whose last 2 tokens are padding and a 5-token negative prompt: CFG pads to 9."""
    rng = np.random.default_rng(seed)
    mask = np.ones((1, 9), np.int64)
    mask[0, 7:] = 0
    return {
        "prompt_embeds": rng.standard_normal((1, 9, TEXT_DIM)).astype(np.float32),
        "prompt_embeds_mask": mask,
        "negative_prompt_embeds": rng.standard_normal((1, 5, TEXT_DIM)).astype(np.float32),
        "negative_prompt_embeds_mask": np.ones((1, 5), np.int64),
        "latents": rng.standard_normal((1, grid[0] * grid[1], 64)).astype(np.float32),
    }


def run_runtime(backend, bundle, inputs, height, width, guidance, **kw) -> np.ndarray:
    manifest = load_manifest(bundle)
    return generate(
        backend,
        manifest,
        SchedulerConfig.from_file(bundle / SCHEDULER_CONFIG_NAME),
        inputs["prompt_embeds"],
        inputs["prompt_embeds_mask"],
        inputs["negative_prompt_embeds"],
        inputs["negative_prompt_embeds_mask"],
        height=height,
        width=width,
        steps=STEPS,
        guidance=guidance,
        latents=inputs["latents"],
        **kw,
    )


@pytest.mark.parametrize("guidance", [1.0, 4.0])
@pytest.mark.parametrize("height,width", RESOLUTIONS)
def test_full_loop_matches_diffusers_pipeline(bundle, backend, diffusers_pipe, height, width, guidance):
    inputs = make_inputs(load_manifest(bundle).grid_for(height, width), seed=height + int(guidance))
    ref = diffusers_pipe(
        **{k: torch.from_numpy(v) for k, v in inputs.items()},
        height=height,
        width=width,
        num_inference_steps=STEPS,
        guidance_scale=guidance,
        output_type="latent",
        return_dict=False,
    )[0].numpy()
    out = run_runtime(backend, bundle, inputs, height, width, guidance, cache=TextKVCache())
    rel = float(np.linalg.norm(out - ref) / np.linalg.norm(ref))
    assert rel <= 1e-4, f"relative error {rel:.2e} at {height}x{width}, guidance {guidance}"


def test_cached_and_uncached_runs_are_identical(bundle, backend):
    inputs = make_inputs(load_manifest(bundle).grid_for(160, 96), seed=3)
    cache = TextKVCache()
    cached = run_runtime(backend, bundle, inputs, 160, 96, 4.0, cache=cache)
    again = run_runtime(backend, bundle, inputs, 160, 96, 4.0, cache=cache)
    uncached = run_runtime(backend, bundle, inputs, 160, 96, 4.0, recompute_text_kv=True)
    np.testing.assert_array_equal(cached, uncached)
    np.testing.assert_array_equal(cached, again)
    stats = cache.stats
    assert (stats.hits, stats.misses, stats.entries) == (1, 1, 1)
    # The same prompt at another resolution has other text RoPE positions: a new entry, not a hit.
    other = make_inputs(load_manifest(bundle).grid_for(128, 128), seed=3)
    run_runtime(backend, bundle, {**other, **{k: inputs[k] for k in inputs if k != "latents"}}, 128, 128, 4.0, cache=cache)
    assert cache.stats.misses == 2


def test_cache_never_shares_text_kv_between_checkpoints(bundle, backend, tmp_path):
    """Same architecture (config hash), other weights: a shared cache must miss, and results must differ."""
    from nucleus_export.model.tiny import write_checkpoint

    other_bundle = tmp_path / "other"
    options = ExportOptions(resolutions=RESOLUTIONS, max_text_len=32, opt_text_len=16)
    export_bundle(open_checkpoint(write_checkpoint(tmp_path / "ckpt", seed=7)), other_bundle, options)
    assert load_manifest(other_bundle).config_hash == load_manifest(bundle).config_hash
    inputs = make_inputs(load_manifest(bundle).grid_for(128, 128), seed=4)
    cache = TextKVCache()
    first = run_runtime(backend, bundle, inputs, 128, 128, 4.0, cache=cache)
    second = run_runtime(OrtBackend(other_bundle, OrtOptions(threads=2)), other_bundle, inputs, 128, 128, 4.0, cache=cache)
    assert cache.stats.misses == 2 and cache.stats.hits == 0
    assert not np.allclose(first, second)


def _write_inputs(tmp_path: Path, inputs: dict[str, np.ndarray]) -> dict[str, Path]:
    paths = {"prompt": tmp_path / "p.safetensors", "negative": tmp_path / "n.safetensors", "latents": tmp_path / "l.safetensors"}
    save_file({"prompt_embeds": inputs["prompt_embeds"], "prompt_embeds_mask": inputs["prompt_embeds_mask"]}, paths["prompt"])
    save_file(
        {"prompt_embeds": inputs["negative_prompt_embeds"], "prompt_embeds_mask": inputs["negative_prompt_embeds_mask"]},
        paths["negative"],
    )
    save_file({"latents": inputs["latents"]}, paths["latents"])
    return paths


def test_cli_round_trip(bundle, backend, tmp_path, capsys):
    inputs = make_inputs(load_manifest(bundle).grid_for(128, 128), seed=5)
    paths = _write_inputs(tmp_path, inputs)
    out = tmp_path / "out.safetensors"
    base = ["run", "--bundle", str(bundle), "--prompt-embeds", str(paths["prompt"]), "--height", "128", "--width", "128",
            "--steps", str(STEPS), "--threads", "2"]
    rc = main([*base, "--negative-prompt-embeds", str(paths["negative"]), "--guidance", "4",
               "--latents", str(paths["latents"]), "--out", str(out)])
    assert rc == 0, capsys.readouterr().err
    written = load_file(out)["latents"]
    np.testing.assert_array_equal(written, run_runtime(backend, bundle, inputs, 128, 128, 4.0))
    assert "s/step" in capsys.readouterr().out

    # Seeded, without CFG and without the cache: deterministic, and the same as with the cache.
    seeded = [tmp_path / "s1.safetensors", tmp_path / "s2.safetensors"]
    assert main([*base, "--guidance", "1", "--seed", "11", "--out", str(seeded[0])]) == 0
    assert main([*base, "--guidance", "1", "--seed", "11", "--no-text-kv-cache", "--out", str(seeded[1])]) == 0
    np.testing.assert_array_equal(load_file(seeded[0])["latents"], load_file(seeded[1])["latents"])


@pytest.mark.parametrize(
    "tensors,extra,needle",
    [
        ({"prompt_embeds": np.zeros((1, 4, 32), np.float32)}, [], "width 32"),
        ({"prompt_embeds": np.zeros((1, 4, TEXT_DIM), np.float32), "prompt_embeds_mask": np.ones((1, 5), np.int64)}, [], "prompt_embeds_mask has shape"),
        ({"embeds": np.zeros((1, 4, TEXT_DIM), np.float32)}, [], "no tensor 'prompt_embeds'"),
        ({"prompt_embeds": np.zeros((1, 4, TEXT_DIM), np.float32)}, ["--height", "256"], "not in this bundle's profiles"),
        ({"prompt_embeds": np.zeros((1, 4, TEXT_DIM), np.float32)}, ["--guidance", "4"], "negative prompt"),
    ],
)
def test_cli_bad_input(bundle, tmp_path, capsys, tensors, extra, needle):
    save_file(tensors, tmp_path / "p.safetensors")
    args = ["run", "--bundle", str(bundle), "--prompt-embeds", str(tmp_path / "p.safetensors"), "--height", "128",
            "--width", "128", "--steps", "1", "--guidance", "1", "--out", str(tmp_path / "o.safetensors"), *extra]
    assert main(args) == 1
    assert needle in capsys.readouterr().err


@pytest.mark.parametrize("damage,needle", [("truncate", "does not match its checksum"), ("delete", "is missing")])
def test_damaged_bundle_is_refused(bundle, tmp_path, damage, needle):
    copy = tmp_path / "bundle"
    shutil.copytree(bundle, copy)
    target = copy / "denoiser.onnx"
    if damage == "truncate":
        target.write_bytes(target.read_bytes()[:-10])
    else:
        target.unlink()
    with pytest.raises(NucleusError, match=needle):
        OrtBackend(copy)


def test_tensorrt_backend_refuses_bundle_without_engines(bundle):
    from nucleus_runtime.backends.tensorrt import TensorRTBackend

    with pytest.raises(NucleusError, match="no TensorRT engines"):
        TensorRTBackend(bundle)
