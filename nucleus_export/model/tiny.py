"""The embedded tiny model: the real architecture at a toy size, written once in the real checkpoint layout.

`--model tiny` resolves to a cached folder holding config.json, sharded safetensors and the index json, made by
diffusers' own `save_pretrained`, so every command runs through the same loading code as the 17B checkpoint.
Weights are drawn from a seeded numpy generator per tensor name, so the checkpoint is identical on every machine.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
from nucleus_runtime.atomic import atomic_dir

from nucleus_export.cache import cache_root
from nucleus_export.model.config import ModelConfig

TINY_SPEC = "tiny"

# GQA (4 query heads on 2 K/V heads), three dense blocks then two MoE blocks with different capacity factors,
# eight experts; the same in/out channel layout and patch size as the real model.
TINY_CONFIG: dict[str, Any] = {
    "patch_size": 2,
    "in_channels": 64,
    "out_channels": 16,
    "num_layers": 5,
    "attention_head_dim": 32,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "joint_attention_dim": 64,
    "axes_dims_rope": [8, 12, 12],
    "mlp_ratio": 4.0,
    "moe_enabled": True,
    "dense_moe_strategy": "leave_first_three_blocks_dense",
    "num_experts": 8,
    "moe_intermediate_dim": 64,
    "capacity_factors": [0.0, 0.0, 0.0, 4.0, 2.0],
    "use_sigmoid": False,
    "route_scale": 2.5,
}

# A scaled-down Nucleus-Image with its proportions, for benchmarks: GQA 4:1, text width 2x hidden, 3 dense blocks then
# MoE blocks, 2 routed experts per token on average; ~72M parameters (overrides of TINY_CONFIG).
MEDIUM_CONFIG: dict[str, Any] = {
    "num_layers": 8,
    "attention_head_dim": 64,
    "num_attention_heads": 8,
    "num_key_value_heads": 2,
    "joint_attention_dim": 1024,
    "axes_dims_rope": [8, 28, 28],
    "num_experts": 16,
    "moe_intermediate_dim": 320,
    "capacity_factors": [0.0, 0.0, 0.0, 4.0, 4.0, 2.0, 2.0, 2.0],
}

TINY_SEED = 0
# Bump when random_weight changes, so cached tiny checkpoints of the old init are not reused.
TINY_INIT_VERSION = 3


def tensor_seed(seed: int, name: str) -> int:
    return int.from_bytes(hashlib.sha256(f"{seed}:{name}".encode()).digest()[:8], "little")


def init_law(name: str, shape: tuple[int, ...]) -> tuple[float, float]:
    """(mean, standard deviation) of a tensor's random init, by its diffusers name: an init that keeps activations
    O(1) through the blocks and gives the router distinct scores. Shared by the tiny and the synthetic checkpoints."""
    if ".img_mod." in name or name.startswith("norm_out."):
        # adaLN modulation stays small in trained DiTs (adaLN-Zero starts it at 0): scales and gates of ~0.1-0.3.
        return 0.0, (0.25 / np.sqrt(shape[-1]) if name.endswith("weight") else 0.0)
    if name.endswith("norm.weight") or ".norm_" in name or name.startswith("txt_norm"):
        return 1.0, 0.1
    if name.endswith("bias"):
        return 0.0, 0.05
    if name.endswith("img_mlp.gate.weight"):
        # Router logits of a few units: softmax scores well apart, so top-C choices are not decided by rounding.
        return 0.0, 4.0 / np.sqrt(shape[1])
    fan_in = shape[1] if name.endswith(("gate_up_proj", "down_proj")) else shape[-1]
    return 0.0, 1.0 / np.sqrt(fan_in)


def random_weight(name: str, shape: tuple[int, ...], seed: int) -> np.ndarray:
    """Deterministic float32 init of one tensor (init_law drawn from a generator seeded by the tensor name)."""
    mean, std = init_law(name, shape)
    normal = np.random.default_rng(tensor_seed(seed, name)).standard_normal(shape)
    return (mean + std * normal).astype(np.float32)


def write_checkpoint(
    out_dir: Path,
    config: dict[str, Any] | None = None,
    seed: int = TINY_SEED,
    max_shard_size: str = "2MB",
    dtype: str = "float32",
    init: Callable[[str, tuple[int, ...], int], np.ndarray] = random_weight,
) -> Path:
    """Write a random checkpoint of the real architecture in diffusers' layout (config, shards, index).

    Args:
        out_dir: destination folder (its parent must exist); written through a temporary sibling, renamed into place.
        config: architecture overrides on top of TINY_CONFIG.
        seed: weight seed.
        max_shard_size: diffusers' shard size limit; small by default so the tiny model has several shards.
        dtype: "float32" or "bfloat16" weights.
        init: weight per (name, shape, seed); `random_weight` by default.

    Returns:
        out_dir.
    """
    import torch
    from diffusers import NucleusMoEImageTransformer2DModel

    model_config = ModelConfig.from_dict({**TINY_CONFIG, **(config or {})})
    with torch.device("meta"):
        meta = NucleusMoEImageTransformer2DModel.from_config(model_config.to_dict())
    model = NucleusMoEImageTransformer2DModel.from_config(model_config.to_dict())
    state = {
        name: torch.from_numpy(init(name, tuple(p.shape), seed)) for name, p in meta.state_dict().items()
    }
    model.load_state_dict(state, strict=True)
    if dtype != "float32":
        model = model.to(getattr(torch, dtype))
    out_dir = Path(out_dir)
    with atomic_dir(out_dir) as tmp:
        model.save_pretrained(tmp, max_shard_size=max_shard_size, safe_serialization=True)
    return out_dir


def ensure_tiny_checkpoint() -> Path:
    """The cached tiny checkpoint, written on first use."""
    key = ModelConfig.from_dict(TINY_CONFIG).config_hash()
    path = cache_root() / f"tiny-{key}-seed{TINY_SEED}-init{TINY_INIT_VERSION}"
    if not (path / "config.json").is_file():
        path.parent.mkdir(parents=True, exist_ok=True)  # the cache root is ours to create
        write_checkpoint(path)
    return path
