"""Text in, picture out with the runtime alone (nucleus_runtime.text_to_image, `run --prompt`) against diffusers'
NucleusMoEImagePipeline on the same initial latents, on two pipelines of tiny random components of the real classes
(tests/toy_pipeline.py: the toy one, and "other": six sigmoid-routed experts, an MHA text encoder with biases, a 4x
VAE, left padding), exported in fp32 and run by ONNX Runtime."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from nucleus_runtime.backends.onnxruntime import OrtBackend, OrtOptions
from nucleus_runtime.bundle import load_manifest
from nucleus_runtime.contract import PARITY_NAME, TEXT_ENCODER_GRAPH, VAE_DECODER_GRAPH
from nucleus_runtime.errors import NucleusError
from nucleus_runtime.png import encode_png
from nucleus_runtime.text_to_image import (
    RESIDENT,
    RESIDENT_FRACTION,
    STAGED,
    PromptEncoder,
    TextToImage,
    choose_memory_plan,
    load_prompt_tokenizer,
)
from PIL import Image
from toy_pipeline import allow_processor_without_torchvision, ensure_toy_pipeline

from nucleus_export.cli import main

STEPS = 3
# Per variant: served resolutions (the "other" VAE is 4x: 8 pixels per latent patch) and the size the tests draw.
SIZES = {"toy": ("64x64,64x128", (64, 128)), "other": ("32x32,32x64", (32, 64))}
# The toy tokenizer is character-level: the system prompt alone is ~300 tokens.
MAX_TEXT_LEN = 512
BLOCKED = ("torch", "diffusers", "transformers")


@pytest.fixture(scope="module", autouse=True)
def processor_loads():
    with allow_processor_without_torchvision():
        yield


@pytest.fixture(scope="module", params=sorted(SIZES))
def variant(request) -> str:
    return request.param


@pytest.fixture(scope="module")
def pipeline_root(variant) -> Path:
    return ensure_toy_pipeline(variant)


@pytest.fixture(scope="module")
def bundle(pipeline_root, variant, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp(f"t2i-{variant}") / "bundle"
    assert main(["export", "--model", str(pipeline_root), "--out", str(out), "--precision", "fp32",
                 "--resolutions", SIZES[variant][0], "--max-batch", "4", "--max-text-len", str(MAX_TEXT_LEN)]) == 0
    return out


@pytest.fixture(scope="module")
def reference_pipe(pipeline_root):
    from diffusers import NucleusMoEImagePipeline

    pipe = NucleusMoEImagePipeline.from_pretrained(pipeline_root)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="module")
def text_to_image(bundle):
    with TextToImage(bundle, "onnxruntime", threads=2) as pipe:
        yield pipe


def _initial_latents(pipe, batch: int, height: int, width: int, seed: int) -> np.ndarray:
    scale, patch = pipe.vae_scale_factor, pipe.transformer.config.patch_size
    h, w = height // scale, width // scale
    noise = torch.randn(batch, 1, 16, h, w, generator=torch.Generator().manual_seed(seed))
    return pipe._pack_latents(noise, batch, 16, h, w, patch).numpy()


CASES = [
    ("a red fox in fresh snow", None, 4.0),
    ("", "", 4.0),
    (["  Über ünïcødé 🦊 ", "\nstarts with a newline"], ["blurry", "a much longer negative prompt than the prompt"], 3.0),
    (["no guidance", "second"], None, 1.0),
]


@pytest.mark.parametrize("prompt,negative,guidance", CASES)
def test_image_matches_the_diffusers_pipeline(text_to_image, reference_pipe, variant, prompt, negative, guidance):
    """Every pixel within 1/255 of diffusers' own pipeline run from the same initial latents (fp32)."""
    height, width = SIZES[variant][1]
    batch = 1 if isinstance(prompt, str) else len(prompt)
    latents = _initial_latents(reference_pipe, batch, height, width, seed=len(CASES) + batch)
    ours = text_to_image.generate(prompt, negative, height=height, width=width, steps=STEPS, guidance=guidance,
                                  latents=latents)
    expected = reference_pipe(prompt, negative_prompt=negative, height=height, width=width, num_inference_steps=STEPS,
                              guidance_scale=guidance, latents=torch.from_numpy(latents), output_type="np").images
    expected = (expected * 255).round().astype(np.int16)
    assert ours.images.shape == (batch, height, width, 3) and ours.images.dtype == np.uint8
    assert np.abs(ours.images.astype(np.int16) - expected).max() <= 1
    assert expected.std() > 1, "the toy pipeline should draw a non-constant image"
    timings = ours.timings
    assert timings.tokenize_and_encode > 0 and timings.denoise > 0 and timings.vae_decoder > 0
    assert timings.total >= timings.tokenize_and_encode + timings.denoise + timings.vae_decoder


def test_prefix_states_equal_the_full_forward(bundle, variant):
    """The runtime's prefix-cached encoding gives the full forward's states bit for bit (right padding), reuses the
    prefix on the second call, and left-padded bundles take the full forward."""
    manifest = load_manifest(bundle)
    tokenizer = load_prompt_tokenizer(bundle, manifest)
    backend = OrtBackend(bundle, OrtOptions(threads=2, stages=(TEXT_ENCODER_GRAPH,)), manifest)
    encoder = PromptEncoder(backend, tokenizer, max_batch=4)
    prompts = ["a fox", "\nnewline first", "", "ünïcødé " * 5]
    for _ in range(2):
        (embeds, mask), = encoder.encode([prompts])
        ids, full_mask = tokenizer.encode(prompts)
        full, _ = backend.encode_prompt(ids, full_mask, None)
        np.testing.assert_array_equal(mask, full_mask)
        real = mask == 1
        np.testing.assert_array_equal(embeds[real], full[real])
    if tokenizer.template.padding_side == "right":
        assert (encoder.prefix_misses, encoder.prefix_hits) == (1, 1)
    else:
        assert encoder.prefix_misses == encoder.prefix_hits == 0


def test_staged_plan_gives_the_same_pixels(text_to_image, bundle, variant):
    """Loading one stage group at a time changes nothing in the result, and keeps nothing loaded after the call."""
    height, width = SIZES[variant][1]
    kwargs = dict(height=height, width=width, steps=STEPS, guidance=4.0, seed=5)
    resident = text_to_image.generate("a lighthouse", **kwargs)
    with TextToImage(bundle, "onnxruntime", memory_plan=STAGED, threads=2) as staged:
        result = staged.generate("a lighthouse", **kwargs)
        assert result.memory_plan.plan == STAGED and staged._resident is None
    assert resident.memory_plan.plan == RESIDENT  # auto: a few MB of weights fit anywhere
    np.testing.assert_array_equal(result.images, resident.images)
    assert set(result.memory_plan.stage_bytes) == set(load_manifest(bundle).stage_names)


def test_auto_memory_plan_rule():
    stage_bytes = {TEXT_ENCODER_GRAPH: 16_000, "text_kv": 1_000, "denoiser": 30_000, VAE_DECODER_GRAPH: 500}
    total = sum(stage_bytes.values())
    assert choose_memory_plan(stage_bytes, int(total / RESIDENT_FRACTION) + 1).plan == RESIDENT
    staged = choose_memory_plan(stage_bytes, int(total / RESIDENT_FRACTION) - 100)
    assert staged.plan == STAGED and "do not fit" in staged.reason
    assert choose_memory_plan(stage_bytes, None).plan == RESIDENT


def test_run_prompt_writes_the_png_of_the_api(text_to_image, bundle, variant, tmp_path, capsys):
    height, width = SIZES[variant][1]
    out = tmp_path / "fox.png"
    rc = main(["run", "--bundle", str(bundle), "--prompt", "a red fox", "--negative-prompt", "blurry",
               "--height", str(height), "--width", str(width), "--steps", str(STEPS), "--seed", "3",
               "--backend", "onnxruntime", "--threads", "2", "--out", str(out)])
    assert rc == 0
    printed = capsys.readouterr().out
    assert "PNG" in printed and "denoise" in printed and "memory plan resident" in printed
    image = text_to_image("a red fox", "blurry", height=height, width=width, steps=STEPS, seed=3)
    assert out.read_bytes() == encode_png(image)
    np.testing.assert_array_equal(np.asarray(Image.open(out).convert("RGB")), image)  # a real decoder reads it


def test_run_prompt_defaults_to_the_optimization_resolution(bundle, tmp_path):
    out = tmp_path / "default.png"
    assert main(["run", "--bundle", str(bundle), "--prompt", "x", "--steps", "1", "--out", str(out),
                 "--memory-plan", "staged"]) == 0
    opt = load_manifest(bundle).profiles.opt_resolution
    assert Image.open(out).size == (opt[1], opt[0])


BLOCKER = f"""
import importlib.abc, sys
class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split('.')[0] in {BLOCKED!r}:
            raise ImportError('blocked: ' + name)
sys.meta_path.insert(0, Block())
"""


def test_runtime_and_run_prompt_work_where_torch_cannot_be_imported(bundle, variant, tmp_path):
    height, width = SIZES[variant][1]
    api = tmp_path / "api.png"
    script = BLOCKER + f"""
from nucleus_runtime.png import write_png
from nucleus_runtime.text_to_image import TextToImage
with TextToImage({str(bundle)!r}, threads=2) as pipe:
    write_png({str(api)!r}, pipe("a fox", height={height}, width={width}, steps=1, seed=1))
from nucleus_export.cli import main
rc = main(["run", "--bundle", {str(bundle)!r}, "--prompt", "a fox", "--height", "{height}", "--width", "{width}",
           "--steps", "1", "--seed", "1", "--threads", "2", "--out", {str(tmp_path / 'cli.png')!r}])
assert not [m for m in sys.modules if m.split('.')[0] in {BLOCKED!r}], "a blocked package was imported"
sys.exit(rc)
"""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONSTARTUP"}
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert api.read_bytes() == (tmp_path / "cli.png").read_bytes()


def test_bad_requests_get_one_line_errors(text_to_image, bundle, tmp_path, capsys, tiny_bundle):
    with pytest.raises(NucleusError, match="batch 6"):
        text_to_image(["a", "b", "c"], steps=1)  # CFG doubles 3 prompts past the profile's 4
    with pytest.raises(NucleusError, match="negative prompts for 2 prompts"):
        text_to_image(["a", "b"], ["x", "y", "z"], steps=1)
    with pytest.raises(NucleusError, match="resolution 48x48"):
        text_to_image("a", height=48, width=48, steps=1)
    assert main(["run", "--bundle", str(tiny_bundle), "--prompt", "a fox", "--out", str(tmp_path / "x.png")]) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "no text_encoder or vae_decoder stage" in err and "pipeline root" in err
    assert main(["run", "--bundle", str(bundle), "--prompt-embeds", str(tmp_path / "e.safetensors"),
                 "--negative-prompt", "x", "--out", str(tmp_path / "x.safetensors")]) == 2
    assert "--negative-prompt goes with --prompt" in capsys.readouterr().err
    assert not list(tmp_path.iterdir())


def test_check_covers_the_pipeline_stages(pipeline_root, bundle, capsys):
    assert main(["check", "--model", str(pipeline_root), "--bundle", str(bundle), "--cases", "quick"]) == 0
    printed = capsys.readouterr().out
    assert "text_encoder:" in printed and "vae_decoder:" in printed and "decoded x0 estimates" in printed
    parity = json.loads((bundle / PARITY_NAME).read_text())
    # fp32 graph: its decoded images are float32's up to a level at a rounding boundary, at most.
    graph = parity["fp32"]["images"]["graph"]
    assert (graph["psnr"] is None or graph["psnr"] > 48) and graph["ssim"] > 0.9999
    stages = parity["stages"]
    assert stages[TEXT_ENCODER_GRAPH]["passed"] and stages[TEXT_ENCODER_GRAPH]["value"] <= 1e-5
    assert stages[TEXT_ENCODER_GRAPH]["cases"] >= 6
    assert stages[VAE_DECODER_GRAPH]["passed"] and stages[VAE_DECODER_GRAPH]["value"] <= 1


def test_stages_choose_what_a_pipeline_root_exports(pipeline_root, bundle, tmp_path, capsys):
    assert load_manifest(bundle).stage_names == [TEXT_ENCODER_GRAPH, "text_kv", "denoiser", VAE_DECODER_GRAPH]
    out = tmp_path / "vae-only"
    assert main(["export", "--model", str(pipeline_root), "--out", str(out), "--stages", "vae_decoder",
                 "--resolutions", "64x64"]) == 0
    manifest = load_manifest(out)
    assert manifest.stage_names == ["text_kv", "denoiser", VAE_DECODER_GRAPH]
    assert not (out / "tokenizer.json").exists()
    with pytest.raises(SystemExit) as exit_:  # argparse refuses the value, with the usage line
        main(["export", "--model", str(pipeline_root), "--out", str(tmp_path / "x"), "--stages", "unet"])
    assert exit_.value.code == 2
    assert "unknown stage(s) unet" in capsys.readouterr().err
