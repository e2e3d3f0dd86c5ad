"""What `inspect` reports: layer kinds, capacities, parameter counts (total and touched per token), storage."""

from __future__ import annotations

import dataclasses
import math

from nucleus_runtime import contract

from nucleus_export.model.checkpoint import Checkpoint
from nucleus_export.model.config import DEFAULT_VAE_SCALE_FACTOR

# Text-side weights run once per prompt (text_kv graph), not per denoising step.
TEXT_SIDE = ("txt_norm.", ".encoder_proj.", ".attn.add_k_proj.", ".attn.add_v_proj.", ".attn.norm_added_k.")
# Allocated by diffusers' Attention but never used by the Nucleus attention processor.
UNUSED = (".attn.norm_added_q.",)


@dataclasses.dataclass
class LayerSummary:
    index: int
    kind: str  # "dense" | "moe"
    capacity_factor: float
    capacity: dict[str, int]  # resolution "HxW" -> tokens per expert per batch row (MoE only)
    over_capacity: list[str]  # resolutions at which the capacity exceeds the image tokens of a row


@dataclasses.dataclass
class ModelSummary:
    config_hash: str
    layers: list[LayerSummary]
    num_experts: int
    total_parameters: int
    text_side_parameters: int
    unused_parameters: int
    routed_expert_parameters_per_layer: int | None  # None without MoE blocks
    parameters_per_token: dict[str, int]  # resolution -> parameters touched per image token per step
    bytes_by_dtype: dict[str, int]
    shards: list[tuple[str, int]]
    image_tokens: dict[str, int]  # resolution -> image tokens per batch row


def _numel(shape: tuple[int, ...]) -> int:
    return math.prod(shape)


def summarize(checkpoint: Checkpoint, resolutions: list[tuple[int, int]]) -> ModelSummary:
    config, weights = checkpoint.config, checkpoint.weights
    counts = {name: _numel(weights.shape(name)) for name in weights}
    total = sum(counts.values())
    text_side = sum(n for name, n in counts.items() if any(t in f".{name}" for t in TEXT_SIDE))
    unused = sum(n for name, n in counts.items() if any(u in name for u in UNUSED))
    routed = sum(n for name, n in counts.items() if ".img_mlp.experts." in name)
    per_layer_routed = routed // max(1, len(config.moe_layers))
    step = DEFAULT_VAE_SCALE_FACTOR * config.patch_size
    keys = [f"{h}x{w}" for h, w in resolutions]
    tokens = {key: (h // step) * (w // step) for key, (h, w) in zip(keys, resolutions)}

    layers = []
    for idx in range(config.num_layers):
        moe = config.is_moe(idx)
        capacity = {k: config.capacity(idx, s) for k, s in tokens.items()} if moe else {}
        over = [k for k, c in capacity.items() if not contract.capacity_fits(c, tokens[k])]
        layers.append(LayerSummary(idx, "moe" if moe else "dense", config.capacity_factor(idx) if moe else 0.0, capacity, over))
    always = total - text_side - unused - routed
    per_token = {}
    for key, s in tokens.items():
        # Each expert runs C tokens of every S: on average E*C/S experts per token and layer.
        activations = sum(config.num_experts * config.capacity(i, s) / s for i in config.moe_layers)
        per_token[key] = int(always + activations * (per_layer_routed / max(1, config.num_experts)))
    shard_sizes: dict[str, int] = {}
    for name in weights:
        info = weights.info(name)
        shard_sizes[info.shard.name] = shard_sizes.get(info.shard.name, 0) + info.nbytes
    return ModelSummary(
        config_hash=config.config_hash(),
        layers=layers,
        num_experts=config.num_experts,
        total_parameters=total,
        text_side_parameters=text_side,
        unused_parameters=unused,
        routed_expert_parameters_per_layer=per_layer_routed if config.moe_layers else None,
        parameters_per_token=per_token,
        bytes_by_dtype=weights.bytes_by_dtype(),
        shards=sorted(shard_sizes.items()),
        image_tokens=tokens,
    )
