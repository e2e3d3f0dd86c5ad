"""The denoising loop of diffusers' NucleusMoEImagePipeline, without torch, over any `Backend`.

Step by step, as the pipeline does it:
1. schedule: sigmas linspace(1, 1/N, N) shifted by mu (from the image token count), plus the terminal sigma;
2. text K/V once per (embeddings, mask, grid), from the cache when it has it;
3. per step: the transformer on the latents with timestep t / 1000; with guidance > 1 the prompt and the negative
   prompt run as ONE batch of 2B (texts padded to a common length, padding masked out; routing is per batch row,
   so this equals the pipeline's two separate calls), then comb = neg + g * (pos - neg) rescaled per token to the
   norm of pos;
4. the prediction is negated and the FlowMatch Euler step applied.

One request's state is a `Denoising` (`start_denoising` validates and sets it up) and a `GridStepper` takes one step
of any number of them of one image grid in one denoiser call: `generate` steps one request to the end, the Triton
pipeline model steps many, each at its own step, joining and leaving between steps (nucleus_runtime.serving). The
loop is backend-agnostic: ONNX Runtime, TensorRT and the Triton BLS model all run it.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import time
from collections.abc import Callable, Iterable, Sequence

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


def stack_texts(texts: Sequence[tuple[np.ndarray, np.ndarray]]) -> tuple[np.ndarray, np.ndarray]:
    """Stack (embeddings [B_i, T_i, D], mask [B_i, T_i]) into one batch [sum B_i, T, D], T the longest, zero-padding
    the shorter texts (mask 0).

    Padding goes at the end, so the real tokens keep their RoPE positions, and masked keys get no attention weight:
    each row's result equals running it alone at its own length (bit for bit on ONNX Runtime: tests/test_serving.py).
    It batches the prompt with the negative prompt of one request, and the rows of several requests in one step.
    """
    length = max(embeddings.shape[1] for embeddings, _ in texts)

    def pad(embeddings: np.ndarray, mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        extra = length - embeddings.shape[1]
        return np.pad(embeddings, ((0, 0), (0, extra), (0, 0))), np.pad(mask, ((0, 0), (0, extra)))

    padded = [pad(*text) for text in texts]
    return np.concatenate([e for e, _ in padded]), np.concatenate([m for _, m in padded])


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


# ---- one request's denoising, one step at a time ----------------------------------------------------------------


@dataclasses.dataclass
class Denoising:
    """One request's denoising in progress: what it feeds the denoiser at its current step, and how it takes that
    step from the denoiser's output. `generate` runs one to the end; the Triton pipeline model runs several, each at
    its own step, in one denoiser call per step (nucleus_runtime.serving).

    Attributes:
        grid: the latent patch grid (rows, cols): only requests of one grid share a denoiser call (rope tables).
        embeddings, mask: the text rows [rows, T, D] and [rows, T]: the prompts, then with CFG the negative prompts.
        latents: [B, S, C] float32, replaced by each step.
        schedule: the sigmas of this request's step count and grid; guidance: its CFG scale.
        step: the index of the next step.
    """

    grid: tuple[int, int]
    embeddings: np.ndarray
    mask: np.ndarray
    latents: np.ndarray
    schedule: Schedule
    guidance: float
    step: int = 0

    @property
    def batch(self) -> int:
        return self.latents.shape[0]

    @property
    def cfg(self) -> bool:
        return self.guidance > 1

    @property
    def rows(self) -> int:
        """Denoiser batch rows per step: the prompts, twice with CFG."""
        return self.embeddings.shape[0]

    @property
    def steps(self) -> int:
        return len(self.schedule)

    @property
    def done(self) -> bool:
        return self.step >= self.steps

    def model_input(self) -> tuple[np.ndarray, np.ndarray]:
        """hidden_states [rows, S, C] and timestep [rows] (t / 1000) of the current step."""
        hidden = np.concatenate([self.latents, self.latents]) if self.cfg else self.latents
        return hidden, self.schedule.model_timestep(self.step, hidden.shape[0])

    def advance(self, sample: np.ndarray) -> None:
        """Take the current step from the denoiser's output rows of this request ([rows, S, C])."""
        noise_pred = guidance_combine(sample[: self.batch], sample[self.batch :], self.guidance) if self.cfg else sample
        self.latents = self.schedule.step(-noise_pred, self.step, self.latents)
        self.step += 1


def start_denoising(
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
) -> Denoising:
    """Validate one request (arguments as `generate`) and set up its denoising at step 0; every refusal is a
    NucleusError naming the input and the fix, raised before any graph runs."""
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
        embeddings, mask = stack_texts([prompt, negative])
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
    schedule = make_schedule(scheduler_config, steps, tokens)
    return Denoising(grid, embeddings, mask, latents, schedule, guidance)


@dataclasses.dataclass
class StepStats:
    """What a GridStepper did: denoiser calls and their rows, text K/V computed or fetched for a new set of requests,
    and the seconds spent in each."""

    calls: int = 0
    rows: int = 0
    text_kv_builds: int = 0
    text_kv_seconds: float = 0.0
    denoise_seconds: float = 0.0


class GridStepper:
    """Runs denoising steps of requests of one image grid, all of them in one denoiser call per step.

    The rows of every request go into one batch in order (each request's prompts, then its negative prompts), the
    texts padded to the longest with mask 0 (`stack_texts`), each row with its own timestep. Routing is per batch row,
    so rows of different requests never interact: each request's latents are the ones it gets alone.

    Text K/V is computed for the batch's rows whenever the set of requests changes (a request joined or left) and
    reused for every step until then, so a stepper holds at most one batch's text K/V. A request stepped alone takes
    it from `cache` when one is given (keyed by the rows' content: the same text on the same grid is computed once
    across requests); the text K/V of several requests together is not cached: that set of rows hardly ever comes
    back, and its entries would only push out the ones that do (computing it costs one text_kv call per join or
    leave, a small fraction of one denoiser step).

    Args:
        backend, manifest: the bundle's graphs and manifest.
        grid: the latent patch grid of every request stepped here.
        cache: text K/V cache shared across calls (None: computed per set of requests).
        recompute_text_kv: compute text K/V at every step (the uncached baseline; results are identical).
    """

    def __init__(
        self,
        backend: Backend,
        manifest: Manifest,
        grid: tuple[int, int],
        cache: TextKVCache | None = None,
        recompute_text_kv: bool = False,
    ):
        self.backend = backend
        self.grid = grid
        self.cache = cache
        self.recompute_text_kv = recompute_text_kv
        self.axes = tuple(manifest.model_config["axes_dims_rope"])
        self.img_cos, self.img_sin = image_rope(self.axes, *grid)
        self.namespace = cache_namespace(manifest, backend) if cache is not None else ""
        self.stats = StepStats()
        self._members: tuple[Denoising, ...] = ()
        self._mask: np.ndarray | None = None
        self._text_kv: TensorHandle | None = None
        self._compute: Callable[[], TensorHandle] | None = None

    def step(self, states: Sequence[Denoising]) -> None:
        """Advance every request in `states` (of this grid, none done) by one step with one denoiser call."""
        if len(states) != len(self._members) or any(a is not b for a, b in zip(states, self._members)):
            self._rebuild(tuple(states))
        text_kv = self._fetch_text_kv() if self.recompute_text_kv else self._text_kv
        started = time.perf_counter()
        inputs = [state.model_input() for state in states]
        hidden = np.concatenate([h for h, _ in inputs]) if len(inputs) > 1 else inputs[0][0]
        timestep = np.concatenate([t for _, t in inputs]) if len(inputs) > 1 else inputs[0][1]
        sample = self.backend.denoise(hidden, timestep, self.img_cos, self.img_sin, text_kv, self._mask)  # type: ignore[arg-type]
        self.stats.denoise_seconds += time.perf_counter() - started
        self.stats.calls += 1
        self.stats.rows += hidden.shape[0]
        offset = 0
        for state in states:
            state.advance(sample[offset : offset + state.rows])
            offset += state.rows

    def _rebuild(self, states: tuple[Denoising, ...]) -> None:
        """Text rows, mask and text K/V for a new set of requests."""
        if len(states) == 1:
            embeddings, mask = states[0].embeddings, states[0].mask
        else:
            embeddings, mask = stack_texts([(s.embeddings, s.mask) for s in states])
        txt_cos, txt_sin = text_rope(self.axes, *self.grid, embeddings.shape[1])

        def compute() -> TensorHandle:
            return self.backend.compute_text_kv(embeddings, txt_cos, txt_sin)

        def cached() -> TensorHandle:
            return self.cache.get_or_compute(text_kv_key(self.namespace, embeddings, mask, self.grid), compute)  # type: ignore[union-attr]

        self._members, self._mask = states, mask
        self._compute = cached if self.cache is not None and len(states) == 1 and not self.recompute_text_kv else compute
        self._text_kv = None  # the previous set's K/V goes before this one is made
        if not self.recompute_text_kv:
            self._text_kv = self._fetch_text_kv()
        self.stats.text_kv_builds += 1

    def _fetch_text_kv(self) -> TensorHandle:
        started = time.perf_counter()
        text_kv = self._compute()  # type: ignore[misc]
        self.stats.text_kv_seconds += time.perf_counter() - started
        return text_kv

    def release(self) -> None:
        """Drop the batch's text K/V and the requests it was built for (the stepper is idle)."""
        self._members, self._mask, self._text_kv, self._compute = (), None, None, None


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
    state = start_denoising(
        manifest, scheduler_config, prompt_embeds, prompt_mask, negative_prompt_embeds, negative_prompt_mask,
        height=height, width=width, steps=steps, guidance=guidance, latents=latents, seed=seed,
    )  # fmt: skip
    stepper = GridStepper(backend, manifest, state.grid, cache, recompute_text_kv)
    logger.debug("denoising %d steps, grid %s, batch %d, text %d, mu %.4f", steps, state.grid, state.batch,
                 state.mask.shape[1], state.schedule.mu)  # fmt: skip
    for _ in (progress or iter)(range(state.steps)):
        stepper.step([state])
    return state.latents
