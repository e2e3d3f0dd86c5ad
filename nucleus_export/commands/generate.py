"""`nucleus-export generate`: prompt to PNG with a bundle's engines for the transformer and diffusers for the rest.

Stages, each timed:
1. load the diffusers pipeline without its transformer (text encoder, processor, VAE, scheduler) and the bundle;
2. text encoding with the pipeline's own `encode_prompt` (Qwen3-VL in PyTorch), prompt and negative prompt;
3. the denoising loop through the runtime (`nucleus_runtime.generate`): text K/V once per prompt, CFG as one batch
   of 2, the pipeline's schedule; initial noise is the pipeline's own `prepare_latents` from a CPU torch generator,
   so a seed gives the image diffusers gives with `generator=torch.Generator("cpu").manual_seed(seed)`;
4. VAE decode and post-processing exactly as the pipeline's tail does, then an atomic PNG write.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
from nucleus_runtime.atomic import atomic_file
from nucleus_runtime.backends import registry
from nucleus_runtime.backends.base import Backend, TensorHandle
from nucleus_runtime.bundle import Manifest, load_manifest, verify_files
from nucleus_runtime.contract import AUTO, SCHEDULER_CONFIG_NAME
from nucleus_runtime.pipeline import generate
from nucleus_runtime.scheduler import SchedulerConfig

from nucleus_export.errors import NucleusExportError, UsageError
from nucleus_export.log import track
from nucleus_export.model.components import loading_errors
from nucleus_export.model.hub import (
    MODEL_INDEX,
    PIPELINE_FOLDERS,
    fetch_snapshot,
    is_hub_id,
)

logger = logging.getLogger("nucleus_export")

TORCH_DTYPES = ("auto", "float32", "bfloat16", "float16")
# NucleusMoEImagePipeline's default max_sequence_length.
PIPELINE_MAX_SEQUENCE_LENGTH = 1024


def register(sub: argparse._SubParsersAction, common: argparse.ArgumentParser) -> None:
    parser = sub.add_parser(
        "generate",
        parents=[common],
        help="prompt to PNG: diffusers' text encoder and VAE, the bundle's engines for the denoising loop",
        description="Generate an image: the text encoder, processor and VAE of a diffusers NucleusMoEImagePipeline run "
        "in PyTorch, the denoising loop runs the bundle through nucleus_runtime (CFG as one batch of 2, text K/V "
        "cached). Prints the time of each stage.",
    )
    parser.add_argument(
        "--model",
        required=True,
        help="diffusers pipeline folder (model_index.json, text_encoder/, processor/, vae/, scheduler/) or a Hugging Face "
        "Hub id such as NucleusAI/NucleusMoE-Image (its transformer/ is not downloaded: the bundle replaces it)",
    )
    parser.add_argument("--bundle", type=Path, required=True, help="bundle folder (from `export` or `build`)")
    parser.add_argument("--prompt", required=True)
    parser.add_argument("--negative-prompt", help="negative prompt for CFG (default: '' as the pipeline uses)")
    parser.add_argument("--height", type=int, help="pixels; one of the bundle's resolutions (default: its opt resolution)")
    parser.add_argument("--width", type=int, help="pixels (default: the bundle's opt resolution)")
    parser.add_argument("--steps", type=int, default=50, help="denoising steps (default 50)")
    parser.add_argument("--guidance", type=float, default=4.0, help="CFG scale; CFG runs when > 1 (default 4.0)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the CPU torch generator for the initial noise")
    parser.add_argument("--out", type=Path, required=True, help="PNG file to write")
    parser.add_argument("--backend", choices=registry.CHOICES, default=AUTO, help="runtime backend (default auto)")
    parser.add_argument("--threads", type=int, help="ONNX Runtime intra-op threads (default: one per core)")
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto", help="torch device of the text encoder and VAE")
    parser.add_argument(
        "--torch-dtype", choices=TORCH_DTYPES, default="auto", help="text encoder and VAE dtype (auto: bfloat16 on CUDA, else float32)"
    )
    parser.add_argument(
        "--max-sequence-length",
        type=int,
        default=PIPELINE_MAX_SEQUENCE_LENGTH,
        help=f"prompt tokens kept (the pipeline's truncation; default {PIPELINE_MAX_SEQUENCE_LENGTH})",
    )
    parser.add_argument("--skip-checksums", action="store_true", help="do not check bundle files against the manifest")
    parser.set_defaults(func=run)


# ---- timing --------------------------------------------------------------------------------------------------------


@dataclasses.dataclass
class Timings:
    """Seconds per stage of one `generate` run."""

    load_pipeline: float = 0.0
    load_engines: float = 0.0
    text_encoding: float = 0.0
    steps: list[float] = dataclasses.field(default_factory=list)
    text_kv: float = 0.0
    denoiser: float = 0.0
    vae_decode: float = 0.0
    save: float = 0.0

    @property
    def denoising(self) -> float:
        """The runtime's loop: text K/V (before the first step) and the steps."""
        return self.text_kv + sum(self.steps)

    @property
    def total(self) -> float:
        return self.load_pipeline + self.load_engines + self.text_encoding + self.denoising + self.vae_decode + self.save


class TimedBackend(Backend):
    """Delegates to a backend and adds up the seconds spent in text K/V and in the denoiser."""

    def __init__(self, inner: Backend, timings: Timings):
        self.inner = inner
        self.name = inner.name
        self.timings = timings

    def compute_text_kv(self, encoder_hidden_states: np.ndarray, txt_rope_cos: np.ndarray, txt_rope_sin: np.ndarray) -> TensorHandle:
        start = time.perf_counter()
        try:
            return self.inner.compute_text_kv(encoder_hidden_states, txt_rope_cos, txt_rope_sin)
        finally:
            self.timings.text_kv += time.perf_counter() - start

    def denoise(self, *args: Any) -> np.ndarray:
        start = time.perf_counter()
        try:
            return self.inner.denoise(*args)
        finally:
            self.timings.denoiser += time.perf_counter() - start

    def close(self) -> None:
        self.inner.close()

    def describe(self) -> dict[str, Any]:
        return self.inner.describe()


def step_timer(timings: Timings) -> Any:
    """A `progress` for nucleus_runtime.generate that shows a bar and records each step's seconds."""

    def progress(steps: range) -> Iterator[int]:
        for i in track(steps, "denoising", total=len(steps)):
            start = time.perf_counter()
            yield i
            timings.steps.append(time.perf_counter() - start)

    return progress


def format_report(t: Timings) -> str:
    """Seconds and share of the total per stage, then where the denoising time went."""
    total = t.total or 1e-12
    rows = [
        ("load pipeline (torch)", t.load_pipeline, ""),
        ("load engines", t.load_engines, ""),
        ("text encoding", t.text_encoding, ""),
        ("denoising", t.denoising, f"{len(t.steps)} steps, {sum(t.steps) / max(len(t.steps), 1):.3f} s/step + text K/V"),
        ("VAE decode", t.vae_decode, ""),
        ("save PNG", t.save, ""),
    ]
    lines = [f"{'stage':<22}{'seconds':>9}{'share':>8}"]
    lines += [f"{name:<22}{sec:>9.3f}{sec / total:>8.1%}  {note}".rstrip() for name, sec, note in rows]
    lines.append(f"{'total':<22}{t.total:>9.3f}")
    lines.append("per step (s): " + " ".join(f"{s:.3f}" for s in t.steps))
    loop = max(sum(t.steps) - t.denoiser, 0.0)
    share = t.denoising or 1e-12
    lines.append(
        f"denoising time: text K/V {t.text_kv:.3f} s ({t.text_kv / share:.0%}, once for both prompts), "
        f"denoiser {t.denoiser:.3f} s ({t.denoiser / share:.0%}), CFG combine + scheduler {loop:.3f} s ({loop / share:.0%})"
    )
    return "\n".join(lines)


# ---- pipeline ------------------------------------------------------------------------------------------------------


def resolve_pipeline(spec: str) -> Path:
    """A diffusers pipeline root: a local folder, or the Hub snapshot of everything generate needs."""
    path = Path(spec).expanduser()
    if path.exists():
        if not (path / MODEL_INDEX).is_file():
            raise NucleusExportError(
                f"{path} is not a diffusers pipeline folder (no {MODEL_INDEX}).",
                "pass the pipeline root holding model_index.json, text_encoder/, processor/, vae/ and scheduler/.",
            )
        return path
    if is_hub_id(spec):
        return fetch_snapshot(spec, PIPELINE_FOLDERS, "generate")
    raise NucleusExportError(
        f"model {spec} is neither a folder nor a Hugging Face Hub id.",
        "pass a diffusers pipeline folder or an id such as NucleusAI/NucleusMoE-Image.",
    )


def torch_settings(device: str, dtype: str) -> tuple[Any, Any]:
    import torch

    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    elif device == "cuda" and not torch.cuda.is_available():
        raise NucleusExportError("--device cuda, but torch sees no CUDA GPU.", "run with --device cpu.")
    if dtype == "auto":
        dtype = "bfloat16" if device == "cuda" else "float32"
    return torch.device(device), getattr(torch, dtype)


def load_pipeline(root: Path, device: Any, dtype: Any) -> Any:
    """NucleusMoEImagePipeline without its transformer (the bundle replaces it)."""
    from diffusers import NucleusMoEImagePipeline

    with loading_errors(f"the diffusers pipeline from {root}",
                        "pass a complete NucleusMoEImagePipeline folder (text_encoder/, processor/, vae/, scheduler/)."):
        pipe = NucleusMoEImagePipeline.from_pretrained(root, transformer=None, dtype=dtype)
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(device)


def check_pipeline(pipe: Any, model_config: dict[str, Any], pixels_per_patch: int, root: Path) -> None:
    """The text encoder and VAE must fit the bundle's transformer."""
    text_dim = pipe.text_encoder.config.text_config.hidden_size
    if text_dim != model_config["joint_attention_dim"]:
        raise NucleusExportError(
            f"the text encoder in {root} outputs {text_dim}-wide states; the bundle's model takes "
            f"{model_config['joint_attention_dim']}.",
            "use the pipeline the bundle's checkpoint belongs to.",
        )
    channels = model_config["in_channels"] // model_config["patch_size"] ** 2
    step = pipe.vae_scale_factor * model_config["patch_size"]
    if step != pixels_per_patch:
        raise NucleusExportError(
            f"the VAE in {root} makes {step} pixels per latent patch; the bundle's profiles were made for {pixels_per_patch}.",
            "export the bundle from this pipeline root (--model PIPELINE), so its resolutions follow this VAE.",
        )
    if pipe.vae.config.z_dim != channels:
        raise NucleusExportError(
            f"the VAE in {root} has {pipe.vae.config.z_dim} latent channels; the bundle's model takes {channels}.",
            "use the pipeline the bundle's checkpoint belongs to.",
        )


def encode(pipe: Any, prompt: str, device: Any, max_sequence_length: int) -> tuple[np.ndarray, np.ndarray | None]:
    """The pipeline's own encode_prompt, as float32 numpy (mask None when every token is real, as diffusers returns)."""
    import torch

    with torch.no_grad():
        embeds, mask = pipe.encode_prompt(prompt=prompt, device=device, max_sequence_length=max_sequence_length)
    return embeds.to(torch.float32).cpu().numpy(), None if mask is None else mask.cpu().numpy()


def decode(pipe: Any, latents: np.ndarray, height: int, width: int, patch_size: int) -> Any:
    """Packed latents -> PIL image, as the tail of NucleusMoEImagePipeline.__call__ does it."""
    import torch

    vae = pipe.vae
    x = torch.from_numpy(latents).to(vae.device)
    x = pipe._unpack_latents(x, height, width, patch_size, pipe.vae_scale_factor).to(vae.dtype)
    z_dim = vae.config.z_dim
    latents_mean = torch.tensor(vae.config.latents_mean).view(1, z_dim, 1, 1, 1).to(x.device, x.dtype)
    latents_std = 1.0 / torch.tensor(vae.config.latents_std).view(1, z_dim, 1, 1, 1).to(x.device, x.dtype)
    x = x / latents_std + latents_mean
    with torch.no_grad():
        image = vae.decode(x, return_dict=False)[0][:, :, 0]
    return pipe.image_processor.postprocess(image, output_type="pil")[0]


def initial_latents(pipe: Any, model_config: dict[str, Any], height: int, width: int, seed: int) -> np.ndarray:
    """The pipeline's prepare_latents from a CPU generator: the noise diffusers draws for this seed."""
    import torch

    latents = pipe.prepare_latents(
        1,
        model_config["in_channels"] // model_config["patch_size"] ** 2,
        model_config["patch_size"],
        height,
        width,
        torch.float32,
        torch.device("cpu"),
        torch.Generator("cpu").manual_seed(seed),
    )
    return latents.numpy()


def save_png(image: Any, path: Path) -> None:
    """Never a half-written PNG, also on SIGTERM (the runtime's atomic writer)."""
    with atomic_file(path) as tmp:
        image.save(tmp, format="PNG")


@dataclasses.dataclass(frozen=True)
class Request:
    """What to generate."""

    prompt: str
    negative_prompt: str | None
    height: int
    width: int
    steps: int
    guidance: float
    seed: int
    max_sequence_length: int = PIPELINE_MAX_SEQUENCE_LENGTH


def text_to_image(
    pipe: Any, backend: Backend, manifest: Manifest, scheduler: SchedulerConfig, request: Request, device: Any,
    timings: Timings,
) -> tuple[np.ndarray, Any]:
    """Text encoding (torch), the denoising loop (runtime), VAE decode (torch); returns (packed latents, PIL image)."""
    config = manifest.model_config
    start = time.perf_counter()
    prompt, prompt_mask = encode(pipe, request.prompt, device, request.max_sequence_length)
    negative = negative_mask = None
    if request.guidance > 1:
        negative_text = "" if request.negative_prompt is None else request.negative_prompt
        negative, negative_mask = encode(pipe, negative_text, device, request.max_sequence_length)
    timings.text_encoding = time.perf_counter() - start
    longest, served = max(prompt.shape[1], 0 if negative is None else negative.shape[1]), manifest.profiles.text_len[2]
    if longest > served:
        raise NucleusExportError(
            f"the prompt encodes to {longest} tokens; the bundle serves up to {served}.",
            f"pass --max-sequence-length {served - served % 8} (truncates; the tokenizer pads to a multiple of 8), "
            f"or export the bundle with --max-text-len {longest}.",
        )

    latents = generate(
        TimedBackend(backend, timings),
        manifest,
        scheduler,
        prompt,
        prompt_mask,
        negative,
        negative_mask,
        height=request.height,
        width=request.width,
        steps=request.steps,
        guidance=request.guidance,
        latents=initial_latents(pipe, config, request.height, request.width, request.seed),
        progress=step_timer(timings),
    )

    start = time.perf_counter()
    image = decode(pipe, latents, request.height, request.width, config["patch_size"])
    timings.vae_decode = time.perf_counter() - start
    return latents, image


def _check_request(args: argparse.Namespace) -> None:
    if args.steps < 1:
        raise UsageError(f"--steps {args.steps} is not a positive number of steps.", "pass --steps 1 or more.")
    if not np.isfinite(args.guidance) or args.guidance < 0:
        raise UsageError(f"--guidance {args.guidance} is not a usable CFG scale.", "pass a finite scale >= 0 (1 = no CFG).")
    if not args.out.parent.is_dir():
        raise UsageError(f"the folder of --out ({args.out.parent}) does not exist.", "create it, or write elsewhere.")
    if (args.height is None) != (args.width is None):
        raise UsageError("--height and --width go together.", "pass both, or neither for the bundle's opt resolution.")


def run(args: argparse.Namespace) -> int:
    _check_request(args)
    manifest = load_manifest(args.bundle)
    if not args.skip_checksums:
        verify_files(args.bundle, manifest, [SCHEDULER_CONFIG_NAME])
    scheduler = SchedulerConfig.from_file(args.bundle / SCHEDULER_CONFIG_NAME)
    height, width = (args.height, args.width) if args.height is not None else manifest.profiles.opt_resolution
    manifest.grid_for(height, width)  # refuse an unserved size before loading anything
    config = manifest.model_config
    root = resolve_pipeline(args.model)
    device, dtype = torch_settings(args.device, args.torch_dtype)
    timings = Timings()

    start = time.perf_counter()
    pipe = load_pipeline(root, device, dtype)
    check_pipeline(pipe, config, manifest.profiles.pixels_per_patch, root)
    if SchedulerConfig.from_dict(dict(pipe.scheduler.config), f"{root}/scheduler") != scheduler:
        logger.warning("the scheduler settings of %s differ from the bundle's; the bundle's are used", root)
    timings.load_pipeline = time.perf_counter() - start

    start = time.perf_counter()
    options = registry.BackendOptions(threads=args.threads, verify_checksums=not args.skip_checksums)
    backend = registry.open_backend(args.bundle, args.backend, manifest, options)
    timings.load_engines = time.perf_counter() - start

    request = Request(args.prompt, args.negative_prompt, height, width, args.steps, args.guidance, args.seed, args.max_sequence_length)
    try:
        _, image = text_to_image(pipe, backend, manifest, scheduler, request, device, timings)
    finally:
        backend.close()

    start = time.perf_counter()
    save_png(image, args.out)
    timings.save = time.perf_counter() - start

    print(
        f"wrote {args.out}: {width}x{height} pixels, {args.steps} steps, guidance {args.guidance}, seed {args.seed} "
        f"({backend.name}; text encoder and VAE on {device}, {str(dtype).removeprefix('torch.')})"
    )
    print(format_report(timings))
    return 0
