"""Text in, picture out with the runtime alone: NucleusMoEImagePipeline.__call__ from prompts to uint8 RGB pixels.

The stages, as the pipeline runs them:
1. tokenize: the chat template around each prompt, the processor's ids and mask (nucleus_runtime.tokenizer);
2. text_encoder: hidden_states[return_index] of every token. The encoder is causal, so the states of the template's
   fixed prefix never depend on the prompt: PromptEncoder computes them (and their K/V) once per (prefix length,
   batch) and runs each prompt's suffix only, with the prefix as past. Exact for right padding (the pad ids come
   after every real token, positions are 0..T-1 on every row); left-padded batches run the full forward, since
   their pads sit between prefix and prompt;
3. text_kv + denoiser: nucleus_runtime.pipeline.generate (schedule, CFG as one batch, text K/V cached);
4. vae_decoder: the final latents unpacked to [B, z_dim, h, w] and decoded, de-normalization and the pipeline's
   post-processing to uint8 inside the graph.

Memory plans: "resident" keeps every stage loaded across calls (fastest: nothing reloads, caches stay warm);
"staged" loads the stages one group at a time (text encoder; text_kv + denoiser; VAE decoder) and frees each
before the next, so the peak is the largest group, not their sum, like demoDiffusion's low-VRAM mode; "auto" takes
resident when every stage's weights fit in a share of the memory free where the backend runs, else staged.
"""

from __future__ import annotations

import collections
import dataclasses
import gc
import logging
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np

from nucleus_runtime.backends import registry
from nucleus_runtime.backends.base import Backend, BackendOptions, TensorHandle
from nucleus_runtime.bundle import Manifest, load_manifest, verify_files
from nucleus_runtime.contract import (
    AUTO,
    DENOISER_GRAPH,
    PROMPT_TEMPLATE_FILE,
    SCHEDULER_CONFIG_NAME,
    TEXT_ENCODER_GRAPH,
    TEXT_KV_GRAPH,
    TOKENIZER_FILE,
    VAE_DECODER_GRAPH,
)
from nucleus_runtime.errors import NucleusError
from nucleus_runtime.latents import unpack_latents
from nucleus_runtime.pipeline import Progress, check_batch, check_guidance, generate
from nucleus_runtime.scheduler import SchedulerConfig
from nucleus_runtime.text_kv_cache import TextKVCache
from nucleus_runtime.tokenizer import PromptTokenizer, common_prefix_length

logger = logging.getLogger("nucleus_runtime")

RESIDENT = "resident"
STAGED = "staged"
MEMORY_PLANS = (AUTO, RESIDENT, STAGED)
# The groups a staged run loads in turn: text_kv goes with the denoiser, whose every step reads its output in place.
STAGE_GROUPS = ((TEXT_ENCODER_GRAPH,), (TEXT_KV_GRAPH, DENOISER_GRAPH), (VAE_DECODER_GRAPH,))
# "auto" keeps the stages resident when their weights take at most this share of the free memory: activations,
# workspaces and the allocator's slack need the rest.
RESIDENT_FRACTION = 0.8
# Prefix states kept per PromptEncoder: one per (prefix length, batch) seen, a handful in practice.
PREFIX_CACHE_ENTRIES = 8


def _gb(nbytes: int | None) -> str:
    return "unknown" if nbytes is None else f"{nbytes / 1e9:.2f} GB"


# ---- prompts -> text encoder hidden states ----------------------------------------------------------------------


class PromptEncoder:
    """Prompts to the hidden states and masks the pipeline's `encode_prompt` gives, on a backend that loaded the
    text_encoder stage.

    Args:
        backend: runs the text_encoder stage.
        tokenizer: the bundle's prompt tokenizer.
        max_batch: rows per text encoder call (the stage's batch profile).
        prefix_cache: reuse the fixed prefix's states across calls (False: every call computes them, as a staged
            run whose backend closes after one call does anyway).
    """

    def __init__(self, backend: Backend, tokenizer: PromptTokenizer, max_batch: int, prefix_cache: bool = True):
        self.backend = backend
        self.tokenizer = tokenizer
        self.max_batch = max_batch
        self._prefix_cache = prefix_cache
        self._prefixes: collections.OrderedDict[tuple[int, int], tuple[np.ndarray, TensorHandle]] = collections.OrderedDict()
        self.prefix_hits = 0
        self.prefix_misses = 0

    def encode(self, groups: Sequence[Sequence[str]]) -> list[tuple[np.ndarray, np.ndarray]]:
        """Each group of prompts (e.g. the prompts, then the negative prompts) as one `encode_prompt` call of the
        pipeline: embeddings [B, T, D] float32 and mask [B, T] int64, T the group's longest prompt rounded up to the
        padding multiple. Right-padded groups share text encoder calls (a row's states do not depend on the others
        or on the padding); left-padded groups run alone, since there the padding moves every real token."""
        ids = [[self.tokenizer.encode_one(p) for p in group] for group in groups]
        if self.tokenizer.template.padding_side != "right":
            return [self._encode_rows(rows, use_prefix=False) for rows in ids]
        rows = [row for group in ids for row in group]
        embeddings = [e for chunk in _chunks(rows, self.max_batch) for e in self._unpad(chunk, self._encode_rows(chunk, True)[0])]
        out, start = [], 0
        for group in ids:
            _, mask = self.tokenizer.pad(group)
            width = mask.shape[1]
            stacked = np.zeros((len(group), width, embeddings[start].shape[-1]), np.float32)
            for i, row in enumerate(embeddings[start : start + len(group)]):
                stacked[i, : len(row)] = row[:width]
            out.append((stacked, mask))
            start += len(group)
        return out

    @staticmethod
    def _unpad(rows: Sequence[Sequence[int]], embeddings: np.ndarray) -> list[np.ndarray]:
        return [embeddings[i, : len(row)] for i, row in enumerate(rows)]

    def _encode_rows(self, rows: Sequence[Sequence[int]], use_prefix: bool) -> tuple[np.ndarray, np.ndarray]:
        """One text encoder batch of unpadded id rows, padded the processor's way; with `use_prefix` (right padding
        only) the leading ids every row shares with the template prefix come from the prefix states."""
        ids, mask = self.tokenizer.pad(rows)
        shared = 0
        if use_prefix:
            # At least one new token per row: the encoder's text_len is never 0.
            shared = min(min(common_prefix_length(r, self.tokenizer.prefix_ids), len(r) - 1) for r in rows)
        if shared == 0:
            embeddings, _ = self.backend.encode_prompt(ids, mask, None)
            return embeddings, mask
        prefix_embeds, past = self._prefix(shared, len(rows))
        suffix_embeds, _ = self.backend.encode_prompt(ids[:, shared:], mask, past)
        return np.concatenate([prefix_embeds, suffix_embeds], axis=1), mask

    def _prefix(self, length: int, batch: int) -> tuple[np.ndarray, TensorHandle]:
        key = (length, batch)
        if key in self._prefixes:
            self._prefixes.move_to_end(key)
            self.prefix_hits += 1
            return self._prefixes[key]
        self.prefix_misses += 1
        ids = np.tile(np.asarray(self.tokenizer.prefix_ids[:length], np.int64), (batch, 1))
        entry = self.backend.encode_prompt(ids, np.ones_like(ids), None)
        if self._prefix_cache:
            self._prefixes[key] = entry
            while len(self._prefixes) > PREFIX_CACHE_ENTRIES:
                self._prefixes.popitem(last=False)
        return entry

    def clear(self) -> None:
        self._prefixes.clear()


def _chunks(rows: list, size: int) -> Iterator[list]:
    for start in range(0, len(rows), size):
        yield rows[start : start + size]


def load_prompt_tokenizer(bundle_dir: Path, manifest: Manifest, verify_checksums: bool = True) -> PromptTokenizer:
    """The tokenizer a bundle's text_encoder stage was exported with (its two files checked against the manifest)."""
    if TEXT_ENCODER_GRAPH not in manifest.stages:
        raise NucleusError(
            f"bundle {bundle_dir} has no {TEXT_ENCODER_GRAPH} stage, so it cannot take text.",
            "export it from a pipeline root (--model with text_encoder/ and processor/), or pass prompt embeddings.",
        )
    if verify_checksums:
        verify_files(bundle_dir, manifest, [TOKENIZER_FILE, PROMPT_TEMPLATE_FILE])
    return PromptTokenizer.from_files(Path(bundle_dir) / TOKENIZER_FILE, Path(bundle_dir) / PROMPT_TEMPLATE_FILE)


def prompt_groups(prompt: str | Sequence[str], negative: str | Sequence[str] | None,
                  guidance: float) -> tuple[list[str], list[str] | None]:
    """The prompts, and the negative prompts the pipeline encodes for them: none without CFG (guidance <= 1), else
    one per prompt ("" where none is given, as the pipeline does)."""
    prompts = [prompt] if isinstance(prompt, str) else list(prompt)
    if not prompts or not all(isinstance(p, str) for p in prompts):
        raise NucleusError("prompt must be a string or a non-empty list of strings.", "pass the prompt as text.")
    if guidance <= 1:
        return prompts, None  # the pipeline encodes no negative prompt without CFG
    negatives = [""] * len(prompts) if negative is None else [negative] * len(prompts) if isinstance(negative, str) else list(negative)
    if len(negatives) != len(prompts) or not all(isinstance(n, str) for n in negatives):
        raise NucleusError(
            f"{len(negatives)} negative prompts for {len(prompts)} prompts.",
            "pass one negative prompt for all, or one string per prompt.",
        )
    return prompts, negatives


# ---- latents -> pixels ------------------------------------------------------------------------------------------


def decode_images(backend: Backend, manifest: Manifest, latents: np.ndarray, height: int, width: int) -> np.ndarray:
    """Packed final latents [B, S, C * p * p] -> uint8 RGB [B, H, W, 3] through the vae_decoder stage."""
    patch = manifest.model_config["patch_size"]
    vae_latents = unpack_latents(np.asarray(latents, np.float32), manifest.grid_for(height, width), patch)
    return backend.decode_image(vae_latents[:, :, 0])


# ---- the whole pipeline ------------------------------------------------------------------------------------------


@dataclasses.dataclass
class StageTimings:
    """Wall seconds per stage of one call (load: opening backends, which a resident plan pays once)."""

    load: float = 0.0
    tokenize_and_encode: float = 0.0
    denoise: float = 0.0
    vae_decoder: float = 0.0
    total: float = 0.0

    def summary(self) -> str:
        parts = [f"{name.replace('_', ' ')} {seconds:.2f} s" for name, seconds in dataclasses.asdict(self).items()
                 if name != "total"]
        return f"{', '.join(parts)}; total {self.total:.2f} s"


@dataclasses.dataclass(frozen=True)
class MemoryPlan:
    """How the stages are loaded, and why."""

    plan: str  # RESIDENT or STAGED
    reason: str
    stage_bytes: dict[str, int]
    available_bytes: int | None


@dataclasses.dataclass
class TextToImageResult:
    images: np.ndarray  # [B, H, W, 3] uint8
    latents: np.ndarray  # the final packed latents [B, S, C * p * p], float32
    timings: StageTimings
    memory_plan: MemoryPlan
    backend: str


def plan_memory(choice: str, manifest: Manifest, backend_name: str, options: BackendOptions) -> MemoryPlan:
    """Resolve --memory-plan: RESIDENT or STAGED as asked, or for "auto" by the stages' weights against the memory
    free where the backend runs (choose_memory_plan)."""
    if choice not in MEMORY_PLANS:
        raise NucleusError(f"memory plan {choice!r} is not one of {', '.join(MEMORY_PLANS)}.", "pass auto, resident or staged.")
    cls = registry.backend_class(backend_name)
    stage_bytes = {stage: cls.stage_bytes(manifest, stage) for stage in manifest.stage_names}
    if choice != AUTO:
        return MemoryPlan(choice, "asked for", stage_bytes, None)
    return choose_memory_plan(stage_bytes, cls.memory_available(options))


def choose_memory_plan(stage_bytes: dict[str, int], available: int | None) -> MemoryPlan:
    """"auto": resident when every stage's weights fit in RESIDENT_FRACTION of the free memory (or when the backend
    cannot tell what is free), else staged."""
    total = sum(stage_bytes.values())
    if available is None:
        return MemoryPlan(RESIDENT, f"free memory unknown; weights {_gb(total)}", stage_bytes, None)
    if total <= RESIDENT_FRACTION * available:
        return MemoryPlan(RESIDENT, f"weights {_gb(total)} fit in {_gb(available)} free", stage_bytes, available)
    largest = max(sum(stage_bytes.get(s, 0) for s in group) for group in STAGE_GROUPS)
    if largest > RESIDENT_FRACTION * available:
        logger.warning("the largest stage group needs %s of weights and %s is free: loading it may fail",
                       _gb(largest), _gb(available))
    return MemoryPlan(STAGED, f"weights {_gb(total)} do not fit in {_gb(available)} free; the largest group "
                      f"({_gb(largest)}) loads alone", stage_bytes, available)


class TextToImage:
    """A bundle with every stage as a text-to-image pipeline: `TextToImage(bundle)("a red fox")` -> [H, W, 3] uint8.

    Args:
        bundle: the bundle folder (export/build with --model a pipeline root: text_encoder, text_kv, denoiser and
            vae_decoder stages).
        backend: "auto", "onnxruntime", "tensorrt" or "tensorrt-rtx" (registry.resolve_backend).
        memory_plan: "auto", "resident" or "staged" (module docstring).
        device, threads, verify_checksums, weight_streaming_budget: as BackendOptions.
        text_kv_cache: text K/V cache shared across calls (resident plan; default: a fresh bounded one).
    """

    def __init__(
        self,
        bundle: str | Path,
        backend: str = AUTO,
        *,
        memory_plan: str = AUTO,
        device: str = AUTO,
        threads: int | None = None,
        verify_checksums: bool = True,
        weight_streaming_budget: int | None = None,
        text_kv_cache: TextKVCache | None = None,
        manifest: Manifest | None = None,
    ):
        self.bundle_dir = Path(bundle)
        self.manifest = manifest or load_manifest(self.bundle_dir)
        missing = [s for s in (TEXT_ENCODER_GRAPH, VAE_DECODER_GRAPH) if s not in self.manifest.stages]
        if missing:
            raise NucleusError(
                f"bundle {self.bundle_dir} has no {' or '.join(missing)} stage, so it cannot turn text into pictures.",
                "export or build it with --model a pipeline root (text_encoder/, processor/, vae/ beside transformer/), "
                "or use `run --prompt-embeds` for the denoiser alone.",
            )
        if verify_checksums:
            verify_files(self.bundle_dir, self.manifest, [SCHEDULER_CONFIG_NAME])
        self.scheduler = SchedulerConfig.from_file(self.bundle_dir / SCHEDULER_CONFIG_NAME)
        self.tokenizer = load_prompt_tokenizer(self.bundle_dir, self.manifest, verify_checksums)
        self.backend_name = registry.resolve_backend(backend, self.bundle_dir, self.manifest)
        self.options = BackendOptions(device, threads, verify_checksums, weight_streaming_budget)
        self.memory = plan_memory(memory_plan, self.manifest, self.backend_name, self.options)
        logger.info("memory plan %s (%s)", self.memory.plan, self.memory.reason)
        self.text_kv_cache = text_kv_cache if text_kv_cache is not None else TextKVCache()
        self._resident: Backend | None = None
        self._encoder: PromptEncoder | None = None

    # ---- backends ---------------------------------------------------------------------------------------------

    def _open(self, stages: tuple[str, ...]) -> Backend:
        options = dataclasses.replace(self.options, stages=stages)
        return registry.open_backend(self.bundle_dir, self.backend_name, self.manifest, options)

    @property
    def resident_backend(self) -> Backend:
        """Every stage in one backend, opened on first use (resident plan)."""
        if self._resident is None:
            self._resident = self._open(tuple(self.manifest.stage_names))
            self._encoder = PromptEncoder(self._resident, self.tokenizer, self.manifest.profiles.batch[2])
        return self._resident

    def _stages(self, group: tuple[str, ...], timings: StageTimings) -> _StageScope:
        return _StageScope(self, group, timings)

    def close(self) -> None:
        if self._resident is not None:
            self.text_kv_cache.clear()  # its handles belong to the backend being closed
            self._encoder = None
            self._resident.close()
            self._resident = None

    def __enter__(self) -> TextToImage:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ---- calls ------------------------------------------------------------------------------------------------

    def __call__(self, prompt: str | Sequence[str], negative_prompt: str | Sequence[str] | None = None,
                 **kwargs: object) -> np.ndarray:
        """The image of one prompt [H, W, 3], or of a list of prompts [B, H, W, 3]; keywords as `generate`."""
        images = self.generate(prompt, negative_prompt, **kwargs).images  # type: ignore[arg-type]
        return images[0] if isinstance(prompt, str) else images

    def generate(
        self,
        prompt: str | Sequence[str],
        negative_prompt: str | Sequence[str] | None = None,
        *,
        height: int | None = None,
        width: int | None = None,
        steps: int = 50,
        guidance: float = 4.0,
        seed: int | None = 0,
        latents: np.ndarray | None = None,
        progress: Progress | None = None,
    ) -> TextToImageResult:
        """Prompts to pixels as NucleusMoEImagePipeline.__call__ (output_type="np" rounded to uint8) does.

        Args:
            prompt: one prompt or a list.
            negative_prompt: for CFG (guidance > 1): one for all prompts or one per prompt; None: "" as the pipeline.
            height, width: pixels, one of the bundle's resolutions (default: its optimization resolution).
            steps, guidance: denoising steps and CFG scale (the pipeline's defaults 50 and 4.0).
            seed: numpy-seeded initial noise (not torch's randn), or `latents`: initial packed latents
                [B, S, C * p * p] (to reproduce a diffusers run, pass its latents).
            progress: wraps the denoising step range, e.g. in a progress bar.
        """
        started = time.perf_counter()
        prompts, negatives = prompt_groups(prompt, negative_prompt, check_guidance(guidance))
        height, width = (height, width) if height and width else self.manifest.profiles.opt_resolution
        self.manifest.grid_for(height, width)
        check_batch(self.manifest, len(prompts) * (2 if negatives else 1), bool(negatives))
        timings = StageTimings()
        groups = [prompts] + ([negatives] if negatives else [])
        with self._stages(STAGE_GROUPS[0], timings) as (backend, encoder):
            t0 = time.perf_counter()
            encoded = encoder.encode(groups)
            timings.tokenize_and_encode = time.perf_counter() - t0
            logger.info("text encoder: %d prompts in %.2f s", sum(len(g) for g in groups), timings.tokenize_and_encode)
        (embeds, mask), negative = encoded[0], (encoded[1] if negatives else (None, None))
        with self._stages(STAGE_GROUPS[1], timings) as (backend, _):
            t0 = time.perf_counter()
            final = generate(
                backend, self.manifest, self.scheduler, embeds, mask, *negative, height=height, width=width,
                steps=steps, guidance=guidance, latents=latents, seed=None if latents is not None else (seed or 0),
                cache=self.text_kv_cache if self.memory.plan == RESIDENT else None, progress=progress,
            )
            timings.denoise = time.perf_counter() - t0
        with self._stages(STAGE_GROUPS[2], timings) as (backend, _):
            t0 = time.perf_counter()
            images = decode_images(backend, self.manifest, final, height, width)
            timings.vae_decoder = time.perf_counter() - t0
        timings.total = time.perf_counter() - started
        logger.info("%s", timings.summary())
        return TextToImageResult(images, final, timings, self.memory, self.backend_name)


class _StageScope:
    """The backend (and prompt encoder) for one stage group of a call: the resident one, or, staged, one opened for
    the group and closed, with every reference dropped, before the next group loads."""

    def __init__(self, pipe: TextToImage, group: tuple[str, ...], timings: StageTimings):
        self.pipe, self.group, self.timings = pipe, group, timings
        self.backend: Backend | None = None

    def __enter__(self) -> tuple[Backend, PromptEncoder]:
        t0 = time.perf_counter()
        pipe = self.pipe
        if pipe.memory.plan == RESIDENT:
            backend, encoder = pipe.resident_backend, pipe._encoder
        else:
            logger.info("loading %s", ", ".join(self.group))
            self.backend = backend = pipe._open(self.group)
            encoder = PromptEncoder(backend, pipe.tokenizer, pipe.manifest.profiles.batch[2], prefix_cache=False)
        self.timings.load += time.perf_counter() - t0
        return backend, encoder  # type: ignore[return-value]

    def __exit__(self, *exc: object) -> None:
        if self.backend is not None:
            self.backend.close()
            self.backend = None
            gc.collect()  # sessions and device buffers go now, before the next group allocates its own

