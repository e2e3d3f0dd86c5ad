"""Per-tensor activation ranges for FP8 GEMM inputs, measured on the PyTorch references.

Transformer: each calibration sample is a short denoising run (the runtime's FlowMatch schedule, so timesteps spread
from noise to image) of diffusers' model at one of the served resolutions; forward pre-hooks record the largest |x|
entering every quantized GEMM: attention projections, dense MLPs, shared experts and the routed experts' two grouped
GEMMs.

Text encoder (`--fp8-text-encoder`): transformers' Qwen3VLForConditionalGeneration, the pipeline's own text encoder,
runs on calibration prompts formatted and tokenized exactly as the pipeline does (the bundle's prompt template),
with forward pre-hooks on the seven linears of every kept layer.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from nucleus_runtime.scheduler import SchedulerConfig, make_schedule

from nucleus_export.errors import NucleusExportError
from nucleus_export.graph.precision import QuantRecipe
from nucleus_export.log import track
from nucleus_export.model.checkpoint import Checkpoint
from nucleus_export.model.config import ModelConfig
from nucleus_export.model.text_encoder import LANGUAGE_MODEL, TextEncoderCheckpoint, TextEncoderConfig, layer_prefix
from nucleus_export.quant.gemms import gemm_groups

if TYPE_CHECKING:
    import torch
    from nucleus_runtime.bundle import Profiles
    from nucleus_runtime.tokenizer import PromptTokenizer

logger = logging.getLogger("nucleus_export")

DEFAULT_STEPS = 8


def quantized_linears(config: ModelConfig) -> list[str]:
    """Module paths of the nn.Linear GEMMs that get FP8 Q/DQ (the graph builder quantizes exactly these)."""
    return [gemm for group in gemm_groups(config) if group.kind != "experts" for gemm in group.gemms]


def load_calibration_prompts(path: Path, config: ModelConfig) -> tuple[np.ndarray, np.ndarray]:
    """`prompt_embeds` [N,T,D] and optional `prompt_embeds_mask` [N,T] from a safetensors file."""
    from safetensors.numpy import load_file

    try:
        tensors = load_file(str(path))
    except Exception as exc:  # noqa: BLE001 - safetensors raises several types for bad files
        raise NucleusExportError(f"cannot read calibration prompts {path} ({exc}).", "pass a safetensors file with prompt_embeds [N,T,D].") from None
    embeds = tensors.get("prompt_embeds")
    if embeds is None or embeds.ndim != 3 or embeds.shape[2] != config.joint_attention_dim:
        shape = None if embeds is None else list(embeds.shape)
        raise NucleusExportError(
            f"calibration prompts {path}: prompt_embeds has shape {shape}, expected [N, T, {config.joint_attention_dim}].",
            "save the text encoder's hidden states for N prompts as prompt_embeds (float32).",
        )
    mask = tensors.get("prompt_embeds_mask", np.ones(embeds.shape[:2], dtype=np.int64))
    if mask.shape != embeds.shape[:2]:
        raise NucleusExportError(
            f"calibration prompts {path}: prompt_embeds_mask has shape {list(mask.shape)}, expected {list(embeds.shape[:2])}.",
            "give one mask entry per prompt token.",
        )
    return embeds.astype(np.float32), mask.astype(np.int64)


class _AmaxRecorder:
    """Forward pre-hooks that keep the running max |x| of each quantized GEMM input."""

    def __init__(self, model: torch.nn.Module, config: ModelConfig):
        import torch.nn.functional as F

        self.amax: dict[str, float] = {}
        self.handles = []
        modules = dict(model.named_modules())
        for name in quantized_linears(config):
            self.handles.append(modules[name].register_forward_pre_hook(lambda _m, args, name=name: self._record(name, args[0])))
        for idx in config.moe_layers:
            experts = modules[f"transformer_blocks.{idx}.img_mlp.experts"]
            prefix = f"transformer_blocks.{idx}.img_mlp.experts"

            def hook(module, args, prefix=prefix):
                x = args[0]
                self._record(f"{prefix}.gate_up_proj", x)
                gate, up = (x.view(module.num_experts, -1, x.shape[-1]) @ module.gate_up_proj).chunk(2, dim=-1)
                self._record(f"{prefix}.down_proj", F.silu(gate) * up)

            self.handles.append(experts.register_forward_pre_hook(hook))

    def _record(self, name: str, x: torch.Tensor) -> None:
        self.amax[name] = max(self.amax.get(name, 0.0), float(x.detach().abs().max()))

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()


def calibrate_fp8(
    checkpoint: Checkpoint,
    profiles: Profiles,
    prompts: Path | None = None,
    size: int = 8,
    steps: int = DEFAULT_STEPS,
    seed: int = 0,
    reference: torch.nn.Module | None = None,
) -> QuantRecipe:
    """Measure activation amax for every FP8 GEMM input; every GEMM of the recipe is W8A8 until a selection
    (quant/sensitivity.py) or a default recipe sets other modes.

    Args:
        checkpoint: the model.
        profiles: the bundle's profiles (served resolutions and text lengths); samples cycle through the resolutions.
        prompts: safetensors with prompt_embeds [N,T,D] (+ prompt_embeds_mask); random embeddings when None, which
            is only meaningful for random test models.
        size: number of calibration samples (each a short sampling run).
        steps: denoising steps per sample, spread over the whole schedule.
        seed: noise and random-embedding seed.
        reference: an already loaded float32 diffusers model.

    Returns:
        The scales, with a record of how they were measured.
    """
    from nucleus_export.export import scheduler_config
    from nucleus_export.model.reference import BlockwiseReference

    if size < 1 or steps < 1:
        raise NucleusExportError(f"calibration needs at least one sample and one step (got {size}, {steps}).", "pass --calibration-size 1 or more.")
    config = checkpoint.config
    rng = np.random.default_rng(seed)
    if prompts is not None:
        embeds, masks = load_calibration_prompts(prompts, config)
        if embeds.shape[1] > profiles.text_len[2]:
            raise NucleusExportError(
                f"calibration prompts are {embeds.shape[1]} tokens long, over the bundle's max text length {profiles.text_len[2]}.",
                "raise --max-text-len or trim the prompts.",
            )
        source = str(prompts)
    else:
        logger.warning("calibrating FP8 on random prompt embeddings; pass --calibration-prompts for a real checkpoint")
        embeds = rng.standard_normal((size, profiles.text_len[1], config.joint_attention_dim)).astype(np.float32)
        masks = np.ones(embeds.shape[:2], dtype=np.int64)
        source = "random"
    # Block by block: streamed from the checkpoint (one block's weights in memory: the 17B model calibrates on any
    # machine that holds a block), or a whole model already in memory; the outputs are the same.
    runner = BlockwiseReference(checkpoint, model=reference)
    scheduler = SchedulerConfig.from_dict(scheduler_config(checkpoint))
    recorder = _AmaxRecorder(runner.model, config)
    timesteps: set[float] = set()
    try:
        for sample in track(range(size), f"FP8 calibration ({size} samples x {steps} steps)"):
            grid = profiles.grids[sample % len(profiles.grids)]
            tokens = grid[0] * grid[1]
            schedule = make_schedule(scheduler, steps, tokens)
            latents = rng.standard_normal((1, tokens, config.in_channels)).astype(np.float32)
            prompt, mask = embeds[sample % len(embeds)][None], masks[sample % len(masks)][None]
            for step in range(len(schedule)):
                timestep = schedule.model_timestep(step, 1)
                timesteps.add(round(float(timestep[0]), 4))
                velocity = runner.forward(latents, grid, prompt, mask, np.asarray(timestep, dtype=np.float32))
                latents = schedule.step(-velocity, step, latents)
    finally:
        recorder.remove()
    return QuantRecipe(
        activation_amax=recorder.amax,
        calibration={
            "prompts": source,
            "samples": size,
            "steps_per_sample": steps,
            "resolutions": [f"{h}x{w}" for h, w in profiles.resolutions],
            "timesteps": sorted(timesteps),
            "seed": seed,
        },
    )


# ---- the text encoder ------------------------------------------------------------------------------------------------

# Prompts of the kinds users write (short, detailed scenes, text to render, counts and positions, other languages),
# the default when no --calibration-text is given. Held out from the prompts the FP8 error is measured on
# (benchmarks/bench_text_encoder.py).
TEXT_CALIBRATION_PROMPTS = (
    "a photo of a dog",
    "An oil painting of a stormy sea at night, a small sailboat lit by a single lantern, dramatic clouds.",
    "A neon sign above a ramen shop that reads 'OPEN 24 HOURS' in pink letters, rainy street, reflections.",
    "Three red apples and two green pears on a wooden table, soft window light from the left.",
    "isometric 3d render of a tiny cozy bedroom, pastel colors, plants on the shelf, warm evening light",
    "一座被雪覆盖的山村，炊烟袅袅，远处是日出时的群山",
    "Portrait of an elderly fisherman with a white beard, weathered skin, 85mm lens, shallow depth of field.",
    "A minimalist logo of a fox made of simple geometric shapes, orange on a white background",
)
# Prompts per forward pass (padded to the longest, as the pipeline pads a batch).
TEXT_CALIBRATION_BATCH = 4
TEXT_ENCODER_LINEARS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
                        "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")


def text_encoder_linears(config: TextEncoderConfig) -> list[str]:
    """Module paths of the text encoder's linears that get FP8 Q/DQ (graph/text_encoder.py quantizes exactly these):
    the seven of every kept layer."""
    return [f"{layer_prefix(i)}.{name}" for i in range(config.kept_layers) for name in TEXT_ENCODER_LINEARS]


def calibrate_text_encoder_fp8(
    text_encoder: TextEncoderCheckpoint, tokenizer: PromptTokenizer, prompts: Sequence[str] = TEXT_CALIBRATION_PROMPTS,
    source: str = "built-in prompts",
) -> QuantRecipe:
    """Activation amax of every quantized linear of the text encoder on `prompts`.

    The model is transformers' own class, loaded in the checkpoint's dtype with only the kept layers (later layers
    cannot change what the kept ones see); `tokenizer` renders and pads the prompts as the pipeline does.

    Returns:
        A recipe holding only the text encoder's amax (merge it into the transformer's with `QuantRecipe.merge`).
    """
    import torch
    import transformers
    from transformers import Qwen3VLConfig, Qwen3VLForConditionalGeneration

    if not prompts:
        raise NucleusExportError("no text encoder calibration prompts.", "give at least one prompt (one per line).")
    config = text_encoder.config
    model_config = Qwen3VLConfig.from_pretrained(text_encoder.folder)
    model_config.text_config.num_hidden_layers = config.kept_layers
    verbosity = transformers.logging.get_verbosity()
    transformers.logging.set_verbosity_error()  # the unread layers' weights are reported as unused: expected here
    try:
        model = Qwen3VLForConditionalGeneration.from_pretrained(text_encoder.folder, config=model_config, dtype="auto").eval()
    finally:
        transformers.logging.set_verbosity(verbosity)
    modules = dict(model.named_modules())
    amax: dict[str, float] = {}

    def record(name: str, x: torch.Tensor) -> None:
        amax[name] = max(amax.get(name, 0.0), float(x.detach().abs().max()))

    handles = [modules[name].register_forward_pre_hook(lambda _m, args, name=name: record(name, args[0]))
               for name in text_encoder_linears(config)]
    batches = range(0, len(prompts), TEXT_CALIBRATION_BATCH)
    try:
        for start in track(batches, f"text encoder FP8 calibration ({len(prompts)} prompts)"):
            ids, mask = tokenizer.encode(list(prompts[start:start + TEXT_CALIBRATION_BATCH]))
            with torch.no_grad():
                model(input_ids=torch.from_numpy(ids), attention_mask=torch.from_numpy(mask))
    finally:
        for handle in handles:
            handle.remove()
    return QuantRecipe(amax, calibration={"text_encoder": {"prompts": source, "count": len(prompts),
                                                           "model": LANGUAGE_MODEL, "kept_layers": config.kept_layers}})

