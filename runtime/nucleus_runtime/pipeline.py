"""The denoising loop of diffusers' NucleusMoEImagePipeline, without torch, over any `Backend`.

Step by step, as the pipeline does it:
1. schedule: sigmas linspace(1, 1/N, N) shifted by mu (from the image token count), plus the terminal sigma;
2. text K/V once per (embeddings, mask, grid), from the cache when it has it;
3. per step: the transformer on the latents with timestep t / 1000; with guidance > 1 the prompt and the negative
   prompt run as ONE batch of 2B (texts padded to a common length, padding masked out; routing is per batch row,
   so this equals the pipeline's two separate calls), then comb = neg + g * (pos - neg) rescaled per token to the
   norm of pos;
4. the prediction is negated and the FlowMatch Euler step applied.

The loop is backend-agnostic: ONNX Runtime, TensorRT and the Triton BLS model all call `generate`.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Iterable

import numpy as np

from nucleus_runtime.backends.base import Backend, TensorHandle
from nucleus_runtime.bundle import Manifest
from nucleus_runtime.contract import DENOISER_GRAPH as DENOISER
from nucleus_runtime.contract import TEXT_KV_GRAPH as TEXT_KV
from nucleus_runtime.errors import NucleusError
from nucleus_runtime.latents import initial_noise
from nucleus_runtime.rope import image_rope, text_rope
from nucleus_runtime.scheduler import Schedule, SchedulerConfig, make_schedule
from nucleus_runtime.text_kv_cache import TextKVCache, text_kv_key

logger = logging.getLogger("nucleus_runtime")

# Wraps the step range, e.g. in a progress bar; must yield the indices unchanged.
Progress = Callable[[range], Iterable[int]]


def _float32(name: str, array: np.ndarray, what: str) -> np.ndarray:
    """Floating data as float32: 16-bit and 64-bit floats are converted (with a warning), integers refused, and
    NaN or Inf refused (they would silently turn every output latent into NaN)."""
    dtype = array.dtype
    if dtype.kind != "f" and dtype.name != "bfloat16":  # bfloat16 (ml_dtypes) is a floating type numpy calls void
        raise NucleusError(
            f"{name} has dtype {dtype.name}; {what} are floating point (integers look like token ids, not {what}).",
            f"pass the {what} as float32.",
        )
    if dtype != np.float32:
        logger.warning("%s is %s; converting it to float32 (the graphs take float32 inputs)", name, dtype.name)
        array = array.astype(np.float32)
    bad = int(array.size - np.count_nonzero(np.isfinite(array)))
    if bad:
        raise NucleusError(
            f"{name} holds {bad} NaN or infinite values; the output would be NaN.",
            f"check what produced the {what} (a text encoder run in float16 can overflow; run it in bfloat16 or float32).",
        )
    return array


def check_text(
    name: str, embeddings: np.ndarray, mask: np.ndarray | None, text_dim: int
) -> tuple[np.ndarray, np.ndarray]:
    """Validate [B, T, D] embeddings and a [B, T] mask; return float32 embeddings and an int64 0/1 mask.

    Shared by every caller of `generate` (the CLI, the Triton pipeline model), so every front end refuses the same
    inputs with the same message.
    """
    embeddings = np.asarray(embeddings)
    if embeddings.ndim != 3:
        raise NucleusError(
            f"{name} has shape {list(embeddings.shape)}; expected [batch, text_len, {text_dim}].",
            "pass the text encoder's hidden states for the prompt, with a batch axis.",
        )
    if embeddings.shape[2] != text_dim:
        raise NucleusError(
            f"{name} has width {embeddings.shape[2]}; this model takes {text_dim}-wide text embeddings.",
            "pass embeddings from the model's text encoder (Qwen3-VL hidden states for Nucleus-Image).",
        )
    if embeddings.shape[0] == 0 or embeddings.shape[1] == 0:
        raise NucleusError(
            f"{name} has shape {list(embeddings.shape)}: no {'prompts' if embeddings.shape[0] == 0 else 'tokens'}.",
            "pass at least one prompt of at least one token (the empty prompt '' still encodes to tokens).",
        )
    embeddings = _float32(name, embeddings, "text encoder hidden states")
    if mask is None:
        mask = np.ones(embeddings.shape[:2], dtype=np.int64)
    mask = np.asarray(mask)
    if mask.shape != embeddings.shape[:2]:
        raise NucleusError(
            f"{name}_mask has shape {list(mask.shape)} but {name} has shape {list(embeddings.shape)}; "
            "the mask must be [batch, text_len] of the embeddings.",
            "pass the attention mask that came with these embeddings.",
        )
    if mask.dtype.kind not in "biuf" or (mask.dtype.kind == "f" and not np.isfinite(mask).all()):
        raise NucleusError(f"{name}_mask has dtype {mask.dtype.name} or non-finite values.", "pass a 0/1 integer mask.")
    # A row that masks out every text token is served as diffusers serves it: the image tokens are always among the
    # keys, so its attention runs over them alone.
    return embeddings, (mask != 0).astype(np.int64)


def check_guidance(guidance: float) -> float:
    """The CFG scale: finite and >= 0 (CFG runs when > 1, as in the pipeline)."""
    try:
        value = float(guidance)
    except (TypeError, ValueError):
        raise NucleusError(f"guidance {guidance!r} is not a number.", "pass a guidance scale such as 4.0.") from None
    if not math.isfinite(value) or value < 0:
        raise NucleusError(
            f"guidance {value} is not a finite number >= 0.",
            "pass a guidance scale such as 4.0 (values <= 1 run without classifier-free guidance).",
        )
    return value


def batch_for_cfg(
    prompt: tuple[np.ndarray, np.ndarray], negative: tuple[np.ndarray, np.ndarray]
) -> tuple[np.ndarray, np.ndarray]:
    """Stack prompt and negative prompt into one batch [2B, T, D], zero-padding the shorter text (mask 0).

    Padding goes at the end, so the real tokens keep their RoPE positions, and masked keys get no attention weight:
    each row's result equals running it alone at its own length.
    """
    length = max(prompt[0].shape[1], negative[0].shape[1])

    def pad(embeddings: np.ndarray, mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        extra = length - embeddings.shape[1]
        return np.pad(embeddings, ((0, 0), (0, extra), (0, 0))), np.pad(mask, ((0, 0), (0, extra)))

    (pe, pm), (ne, nm) = pad(*prompt), pad(*negative)
    return np.concatenate([pe, ne]), np.concatenate([pm, nm])


def guidance_combine(pos: np.ndarray, neg: np.ndarray, guidance: float) -> np.ndarray:
    """neg + g * (pos - neg), rescaled per token to the norm of pos (the pipeline's CFG)."""
    comb = neg + np.float32(guidance) * (pos - neg)
    cond_norm = np.linalg.norm(pos, axis=-1, keepdims=True)
    comb_norm = np.linalg.norm(comb, axis=-1, keepdims=True)
    return (comb * (cond_norm / comb_norm)).astype(np.float32)


def check_batch(manifest: Manifest, batch: int, cfg: bool) -> None:
    """Refuse a denoiser batch (2 x the prompts with CFG) outside the bundle's batch profile."""
    lo, _, hi = manifest.profiles.batch
    if not lo <= batch <= hi:
        raise NucleusError(
            f"this run needs batch {batch}{' (prompt and negative prompt as one batch)' if cfg else ''}, "
            f"but the bundle's profile serves batch {lo}..{hi}.",
            "export/build the bundle with a larger batch range, or pass fewer prompts.",
        )


def _check_profile(manifest: Manifest, batch: int, text_len: int, cfg: bool) -> None:
    check_batch(manifest, batch, cfg)
    lo, _, hi = manifest.profiles.text_len
    if not lo <= text_len <= hi:
        raise NucleusError(
            f"text length {text_len} is outside the bundle's profile ({lo}..{hi} tokens).",
            "truncate or pad the prompt embeddings into that range, or export the bundle with a wider text range.",
        )


def cache_namespace(manifest: Manifest, backend: Backend) -> str:
    """What text K/V cache keys share for one bundle on one backend (the `namespace` of `text_kv_key`): the identity of
    exactly the bytes the backend reads to produce an entry (text_kv) and to consume it (the denoiser's units), so
    two fine-tunes that differ in any weight either graph reads never share an entry, linked weights included."""
    units = [TEXT_KV, *manifest.units(DENOISER)]
    return "|".join([backend.name, *(f"{u}={backend.unit_identity(manifest, u)}" for u in units)])


def generate(
    backend: Backend,
    manifest: Manifest,
    scheduler_config: SchedulerConfig,
    prompt_embeds: np.ndarray,
    prompt_mask: np.ndarray | None = None,
    negative_prompt_embeds: np.ndarray | None = None,
    negative_prompt_mask: np.ndarray | None = None,
    *,
    height: int,
    width: int,
    steps: int,
    guidance: float,
    latents: np.ndarray | None = None,
    seed: int | None = None,
    cache: TextKVCache | None = None,
    recompute_text_kv: bool = False,
    progress: Progress | None = None,
) -> np.ndarray:
    """Denoise latents for prompt embeddings, as NucleusMoEImagePipeline(..., output_type="latent") does.

    Args:
        backend: runs the bundle's text_kv and denoiser graphs.
        manifest: the bundle's manifest (model config, profiles).
        scheduler_config: the bundle's scheduler settings.
        prompt_embeds: [B, T, D] text encoder hidden states; prompt_mask [B, T] (1 = token, 0 = padding; None = all).
        negative_prompt_embeds: [B, T', D] for classifier-free guidance; needed when guidance > 1, ignored otherwise.
        height, width: image size in pixels; must be one of the bundle's resolutions.
        steps: denoising steps.
        guidance: CFG scale; CFG runs when it is > 1, as in the pipeline.
        latents: initial packed latents [B, S, in_channels]; or `seed` for numpy-seeded noise (not torch's randn).
        cache: text K/V cache shared across calls; None computes text K/V once for this call.
        recompute_text_kv: recompute text K/V at every step (the uncached baseline; results are identical).
        progress: wraps the step range, e.g. in a progress bar.

    Returns:
        Final packed latents [B, S, in_channels], float32.
    """
    config = manifest.model_config
    text_dim, patch, in_channels = config["joint_attention_dim"], config["patch_size"], config["in_channels"]
    grid = manifest.grid_for(height, width)
    tokens = grid[0] * grid[1]

    guidance = check_guidance(guidance)
    prompt = check_text("prompt_embeds", prompt_embeds, prompt_mask, text_dim)
    batch = prompt[0].shape[0]
    cfg = guidance > 1
    if cfg:
        if negative_prompt_embeds is None:
            raise NucleusError(
                f"guidance {guidance} > 1 needs negative prompt embeddings (diffusers encodes the empty prompt '').",
                "pass --negative-prompt-embeds (e.g. the embedding of ''), or --guidance 1 to run without CFG.",
            )
        negative = check_text("negative_prompt_embeds", negative_prompt_embeds, negative_prompt_mask, text_dim)
        if negative[0].shape[0] != batch:
            raise NucleusError(
                f"negative_prompt_embeds has batch {negative[0].shape[0]} but prompt_embeds has batch {batch}.",
                "pass one negative prompt per prompt.",
            )
        embeddings, mask = batch_for_cfg(prompt, negative)
    else:
        embeddings, mask = prompt
    _check_profile(manifest, embeddings.shape[0], embeddings.shape[1], cfg)

    if latents is None:
        if seed is None:
            raise NucleusError("neither initial latents nor a seed were given.", "pass --latents or --seed.")
        latents = initial_noise(seed, batch, in_channels, grid, patch)
    latents = np.asarray(latents)
    if latents.shape != (batch, tokens, in_channels):
        raise NucleusError(
            f"latents have shape {list(latents.shape)}; {height}x{width} pixels with batch {batch} needs "
            f"[{batch}, {tokens}, {in_channels}] (packed layout).",
            "pass packed latents for this resolution, or a --seed.",
        )
    latents = _float32("latents", latents, "initial latents")

    axes = tuple(config["axes_dims_rope"])
    img_cos, img_sin = image_rope(axes, *grid)
    txt_cos, txt_sin = text_rope(axes, *grid, embeddings.shape[1])
    schedule: Schedule = make_schedule(scheduler_config, steps, tokens)

    def compute_text_kv() -> TensorHandle:
        return backend.compute_text_kv(embeddings, txt_cos, txt_sin)

    if recompute_text_kv:
        text_kv = None
    elif cache is not None:
        text_kv = cache.get_or_compute(text_kv_key(cache_namespace(manifest, backend), embeddings, mask, grid), compute_text_kv)
    else:
        text_kv = compute_text_kv()

    logger.debug("denoising %d steps, grid %s, batch %d, text %d, mu %.4f", steps, grid, batch, mask.shape[1], schedule.mu)
    for i in (progress or iter)(range(len(schedule))):
        step_kv = compute_text_kv() if recompute_text_kv else text_kv
        model_in = np.concatenate([latents, latents]) if cfg else latents
        out = backend.denoise(model_in, schedule.model_timestep(i, model_in.shape[0]), img_cos, img_sin, step_kv, mask)
        noise_pred = guidance_combine(out[:batch], out[batch:], guidance) if cfg else out
        latents = schedule.step(-noise_pred, i, latents)
    return latents
