"""`nucleus-export generate` and `EngineTransformer` against diffusers' NucleusMoEImagePipeline, on a pipeline of tiny
random components of the real classes (tests/toy_pipeline.py) and an fp32 bundle of the tiny transformer in ONNX
Runtime."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from nucleus_runtime.backends.onnxruntime import OrtBackend, OrtOptions
from nucleus_runtime.bundle import load_manifest
from nucleus_runtime.contract import SCHEDULER_CONFIG_NAME
from nucleus_runtime.errors import NucleusError
from nucleus_runtime.scheduler import SchedulerConfig
from PIL import Image
from safetensors.numpy import load_file, save_file
from toy_pipeline import allow_processor_without_torchvision, ensure_toy_pipeline

from nucleus_export import EngineTransformer
from nucleus_export.cli import main
from nucleus_export.commands.generate import Request, Timings, text_to_image
from nucleus_export.export import ExportOptions, export_bundle
from nucleus_export.model.checkpoint import open_checkpoint
from nucleus_export.model.tiny import ensure_tiny_checkpoint

RESOLUTIONS = [(128, 128), (96, 160)]
STEPS = 3
# The toy tokenizer is character-level: the pipeline's system prompt alone is ~300 tokens.
MAX_TEXT_LEN = 384


@pytest.fixture(scope="module", autouse=True)
def processor_loads():
    with allow_processor_without_torchvision():
        yield


@pytest.fixture(scope="module")
def toy_pipeline_dir(processor_loads) -> Path:
    return ensure_toy_pipeline()


@pytest.fixture(scope="module")
def bundle(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("generate") / "bundle"
    options = ExportOptions(resolutions=RESOLUTIONS, max_text_len=MAX_TEXT_LEN, opt_text_len=320)
    export_bundle(open_checkpoint(ensure_tiny_checkpoint()), out, options)
    return out


@pytest.fixture(scope="module")
def reference_pipe(toy_pipeline_dir):
    """diffusers' own pipeline with the PyTorch transformer."""
    from diffusers import NucleusMoEImagePipeline

    pipe = NucleusMoEImagePipeline.from_pretrained(toy_pipeline_dir)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="module")
def engine_pipe(toy_pipeline_dir, bundle):
    """The same pipeline with the bundle in place of its transformer, as a user would write it."""
    from diffusers import NucleusMoEImagePipeline

    pipe = NucleusMoEImagePipeline.from_pretrained(toy_pipeline_dir, transformer=None)
    pipe.transformer = EngineTransformer(bundle, threads=2)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _rel(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def _reference(pipe, prompt, height, width, guidance, seed, output_type, negative_prompt=None):
    return pipe(
        prompt,
        negative_prompt=negative_prompt,
        height=height,
        width=width,
        num_inference_steps=STEPS,
        guidance_scale=guidance,
        generator=torch.Generator("cpu").manual_seed(seed),
        output_type=output_type,
    ).images


@pytest.mark.parametrize(
    "height,width,guidance,negative", [(128, 128, 4.0, None), (96, 160, 3.0, "blurry"), (128, 128, 1.0, None)]
)
def test_generate_equals_diffusers_pipeline(reference_pipe, bundle, height, width, guidance, negative):
    """Latents within 1e-4 relative and every pixel within one step of 255 of diffusers' own run."""
    manifest = load_manifest(bundle)
    backend = OrtBackend(bundle, OrtOptions(threads=2))
    request = Request("a red cat on a mat", negative, height, width, STEPS, guidance, seed=height + width)
    timings = Timings()
    latents, image = text_to_image(
        reference_pipe, backend, manifest, SchedulerConfig.from_file(bundle / SCHEDULER_CONFIG_NAME), request,
        torch.device("cpu"), timings,
    )
    ref_latents = _reference(reference_pipe, request.prompt, height, width, guidance, request.seed, "latent", negative)
    assert _rel(latents, ref_latents.numpy()) <= 1e-4
    ref_image = _reference(reference_pipe, request.prompt, height, width, guidance, request.seed, "pil", negative)[0]
    ours, ref = np.asarray(image, dtype=np.int16), np.asarray(ref_image, dtype=np.int16)
    assert ours.shape == ref.shape == (height, width, 3)
    assert np.abs(ours - ref).max() <= 1
    assert ref.std() > 1, "the toy pipeline should draw a non-constant image"
    assert len(timings.steps) == STEPS and timings.text_encoding > 0 and timings.vae_decode > 0


def test_generate_cli_writes_the_pipeline_image(toy_pipeline_dir, reference_pipe, bundle, tmp_path, capsys):
    out = tmp_path / "cat.png"
    rc = main([
        "generate", "--model", str(toy_pipeline_dir), "--bundle", str(bundle), "--prompt", "a red cat",
        "--height", "128", "--width", "128", "--steps", str(STEPS), "--guidance", "4", "--seed", "7",
        "--threads", "2", "--out", str(out),
    ])
    captured = capsys.readouterr()
    assert rc == 0, captured.err
    ref = _reference(reference_pipe, "a red cat", 128, 128, 4.0, 7, "pil")[0]
    assert np.abs(np.asarray(Image.open(out), np.int16) - np.asarray(ref, np.int16)).max() <= 1
    for stage in ("text encoding", "denoising", "VAE decode", "per step (s):", "denoiser", "text K/V"):
        assert stage in captured.out
    assert [p.name for p in tmp_path.iterdir()] == ["cat.png"], "no temporary file may be left behind"


@pytest.mark.parametrize(
    "extra,needle,code",
    [
        (["--height", "256", "--width", "256"], "not in this bundle's profiles", 1),
        (["--out", "/nonexistent-dir/x.png"], "does not exist", 2),
        (["--steps", "0"], "--steps 0", 2),
        (["--height", "128"], "go together", 2),
    ],
)
def test_generate_cli_refuses_bad_requests(toy_pipeline_dir, bundle, tmp_path, capsys, extra, needle, code):
    args = ["generate", "--model", str(toy_pipeline_dir), "--bundle", str(bundle), "--prompt", "x", "--out", str(tmp_path / "o.png")]
    assert main([*args, *extra]) == code
    err = capsys.readouterr().err
    assert needle in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "o.png").exists()


def test_generate_refuses_a_prompt_longer_than_the_bundle(toy_pipeline_dir, tiny_bundle, tmp_path, capsys):
    """tiny_bundle serves 64 text tokens; the pipeline's chat template alone is longer."""
    rc = main(["generate", "--model", str(toy_pipeline_dir), "--bundle", str(tiny_bundle), "--prompt", "x",
               "--height", "128", "--width", "128", "--steps", "1", "--out", str(tmp_path / "o.png")])
    assert rc == 1
    assert "--max-sequence-length" in capsys.readouterr().err


def test_engine_transformer_in_pipeline_equals_diffusers(engine_pipe, reference_pipe):
    """The user's own diffusers call, with pipe.transformer swapped, gives diffusers' latents; text K/V computed once
    per prompt although the pipeline calls the transformer twice per step."""
    engine = engine_pipe.transformer
    before = engine.text_kv_cache.stats
    ours = _reference(engine_pipe, "a blue dog", 96, 160, 4.0, 3, "latent")
    ref = _reference(reference_pipe, "a blue dog", 96, 160, 4.0, 3, "latent")
    assert _rel(ours.numpy(), ref.numpy()) <= 1e-4
    stats = engine.text_kv_cache.stats
    assert stats.misses - before.misses == 2  # prompt and negative prompt
    assert stats.hits - before.hits == 2 * STEPS - 2


def test_engine_transformer_gives_the_latents_of_run(engine_pipe, bundle, tmp_path):
    """Same prompt embeddings and initial latents: the pipeline with EngineTransformer (two batch-1 calls per step)
    and `nucleus-export run` (CFG as one batch of 2) agree."""
    grid = load_manifest(bundle).grid_for(128, 128)
    rng = np.random.default_rng(5)
    mask = np.ones((1, 12), np.int64)
    mask[0, 10:] = 0
    inputs = {
        "prompt_embeds": rng.standard_normal((1, 12, 64)).astype(np.float32),
        "prompt_embeds_mask": mask,
        "negative_prompt_embeds": rng.standard_normal((1, 7, 64)).astype(np.float32),
        "negative_prompt_embeds_mask": np.ones((1, 7), np.int64),
        "latents": rng.standard_normal((1, grid[0] * grid[1], 64)).astype(np.float32),
    }
    ours = engine_pipe(
        **{k: torch.from_numpy(v) for k, v in inputs.items()},
        height=128, width=128, num_inference_steps=STEPS, guidance_scale=4.0, output_type="latent",
    ).images.numpy()
    save_file({"prompt_embeds": inputs["prompt_embeds"], "prompt_embeds_mask": mask}, tmp_path / "p.safetensors")
    save_file(
        {"prompt_embeds": inputs["negative_prompt_embeds"], "prompt_embeds_mask": inputs["negative_prompt_embeds_mask"]},
        tmp_path / "n.safetensors",
    )
    save_file({"latents": inputs["latents"]}, tmp_path / "l.safetensors")
    rc = main(["run", "--bundle", str(bundle), "--prompt-embeds", str(tmp_path / "p.safetensors"),
               "--negative-prompt-embeds", str(tmp_path / "n.safetensors"), "--latents", str(tmp_path / "l.safetensors"),
               "--height", "128", "--width", "128", "--steps", str(STEPS), "--guidance", "4", "--threads", "2",
               "--out", str(tmp_path / "out.safetensors")])
    assert rc == 0
    assert _rel(ours, load_file(tmp_path / "out.safetensors")["latents"]) <= 1e-5


def test_engine_transformer_surface(engine_pipe, bundle):
    engine = engine_pipe.transformer
    config = json.loads((Path(ensure_tiny_checkpoint()) / "config.json").read_text())
    assert engine.config.in_channels == config["in_channels"] and engine.config.patch_size == config["patch_size"]
    assert engine.is_cache_enabled is False
    assert engine_pipe.device == torch.device("cpu") and engine.dtype == torch.float32
    assert engine.to(torch.bfloat16) is engine and engine.dtype == torch.bfloat16
    engine.to(torch.float32)
    with engine.cache_context("cond"):
        pass
    hidden = torch.randn(1, 64, 64)
    text = torch.randn(1, 5, 64)
    out = engine(hidden_states=hidden, timestep=torch.tensor([0.5]), encoder_hidden_states=text,
                 encoder_hidden_states_mask=None, img_shapes=[(1, 8, 8)], attention_kwargs={}, return_dict=True)
    assert out.sample.shape == (1, 64, 64) and out.sample.dtype == torch.float32
    half = engine(hidden_states=hidden.to(torch.bfloat16), timestep=torch.tensor([0.5]), encoder_hidden_states=text,
                  img_shapes=[(1, 8, 8)], return_dict=False)[0]
    assert half.dtype == torch.bfloat16


@pytest.mark.parametrize(
    "call,needle",
    [
        (lambda p: p("x", height=256, width=256, num_inference_steps=1), "256x256 pixels"),
        (lambda p: p("x", height=128, width=128, num_inference_steps=1, num_images_per_prompt=3), "batch 3"),
        (lambda p: p("x", height=128, width=128, num_inference_steps=1, attention_kwargs={"scale": 0.5}), "LoRA"),
        (lambda p: p(prompt_embeds=torch.randn(1, 5, 64, dtype=torch.float64), height=128, width=128,
                     num_inference_steps=1, guidance_scale=1.0), "float64"),
        (lambda p: p(prompt_embeds=torch.randn(1, 400, 64), height=128, width=128, num_inference_steps=1,
                     guidance_scale=1.0), "max_sequence_length"),
    ],
)
def test_engine_transformer_refuses_what_the_bundle_cannot_serve(engine_pipe, call, needle):
    with pytest.raises(NucleusError) as info:
        call(engine_pipe)
    message = str(info.value)
    assert needle in message and "\n" not in message


def test_a_4x_vae_sets_the_pixel_grid(tmp_path, capsys):
    """The "other" toy pipeline has a 4x VAE (as diffusers' own dummy pipeline): export takes the pixel grid from it,
    and EngineTransformer and `generate` serve its sizes, giving diffusers' latents and pixels."""
    from diffusers import NucleusMoEImagePipeline

    root = ensure_toy_pipeline("other")
    bundle = tmp_path / "bundle"
    assert main(["export", "--model", str(root), "--out", str(bundle), "--stages", "text_kv,denoiser",
                 "--resolutions", "32x32,32x64", "--max-text-len", str(MAX_TEXT_LEN)]) == 0
    manifest = load_manifest(bundle)
    assert manifest.profiles.pixels_per_patch == 8 and manifest.grid_for(32, 64) == (4, 8)
    reference = NucleusMoEImagePipeline.from_pretrained(root)
    engine = NucleusMoEImagePipeline.from_pretrained(root, transformer=None)
    engine.transformer = EngineTransformer(bundle, threads=2)
    for pipe in (reference, engine):
        pipe.set_progress_bar_config(disable=True)
    ours = _reference(engine, "a fox", 32, 64, 4.0, 2, "latent")
    assert _rel(ours.numpy(), _reference(reference, "a fox", 32, 64, 4.0, 2, "latent").numpy()) <= 1e-4
    out = tmp_path / "fox.png"
    assert main(["generate", "--model", str(root), "--bundle", str(bundle), "--prompt", "a fox", "--height", "32",
                 "--width", "64", "--steps", str(STEPS), "--seed", "2", "--threads", "2", "--out", str(out)]) == 0
    ref = _reference(reference, "a fox", 32, 64, 4.0, 2, "pil")[0]
    assert np.abs(np.asarray(Image.open(out), np.int16) - np.asarray(ref, np.int16)).max() <= 1
    capsys.readouterr()
    # Another pipeline (the toy one: 64-wide text, 8x VAE) is refused in one line, before any work.
    assert main(["generate", "--model", str(ensure_toy_pipeline()), "--bundle", str(bundle), "--prompt", "x",
                 "--height", "32", "--width", "32", "--steps", "1", "--out", str(tmp_path / "x.png")]) == 1
    err = capsys.readouterr().err
    assert "the bundle's model takes 48" in err and "Fix:" in err.splitlines()[-1]
