"""Synthetic checkpoints: the real Nucleus-Image architecture (real dimensions, any number of blocks) with random
weights, in diffusers' checkpoint layout (config.json, sharded bf16 safetensors, index json).

They exist to measure what the real 17B model costs (memory, time, disk) without downloading it:
`--model synthetic:nucleus-image?layers=6` works wherever `--model tiny` does. The writer streams: each shard's
header is computed from the shapes first, then every tensor is drawn and written in chunks of a few MB, so writing
the 34 GB of the 32-block model needs a few MB of RAM. Values follow the tiny model's init law (init_law) drawn
from a generator seeded by tensor name and chunk, so a checkpoint is identical on every machine.
"""

from __future__ import annotations

import json
import logging
import math
import shutil
import struct
import time
import urllib.parse
from collections.abc import Callable
from pathlib import Path
from typing import Any

import ml_dtypes
import numpy as np
from nucleus_runtime.atomic import atomic_dir

from nucleus_export.cache import cache_root
from nucleus_export.errors import UsageError
from nucleus_export.model.checkpoint import INDEX_NAME, expected_parameter_shapes
from nucleus_export.model.config import ModelConfig
from nucleus_export.model.tiny import init_law, tensor_seed

logger = logging.getLogger("nucleus_export")

SYNTHETIC_PREFIX = "synthetic:"
NUCLEUS_IMAGE = "nucleus-image"

# The released transformer's architecture (NucleusAI/Nucleus-Image, transformer/config.json; /work/shared/DESIGN.md).
NUCLEUS_IMAGE_LAYERS = 32
NUCLEUS_IMAGE_CONFIG: dict[str, Any] = {
    "patch_size": 2,
    "in_channels": 64,
    "out_channels": 16,
    "num_layers": NUCLEUS_IMAGE_LAYERS,
    "attention_head_dim": 128,
    "num_attention_heads": 16,
    "num_key_value_heads": 4,
    "joint_attention_dim": 4096,
    "axes_dims_rope": [16, 56, 56],
    "mlp_ratio": 4.0,
    "moe_enabled": True,
    "dense_moe_strategy": "leave_first_three_blocks_dense",
    "num_experts": 64,
    "moe_intermediate_dim": 1344,
    "use_sigmoid": False,
    "route_scale": 2.5,
}
# Capacity factors of the released model: three dense blocks (0), two MoE blocks at 4, the rest at 2.
_LEADING_FACTORS = (0.0, 0.0, 0.0, 4.0, 4.0)
_TAIL_FACTOR = 2.0

SYNTHETIC_SEED = 0
# Bump when the writer or init_law changes, so cached synthetic checkpoints of the old kind are not reused.
SYNTHETIC_INIT_VERSION = 2
SHARD_BYTES = 2 << 30  # several shards and an index even at 6 blocks, like the released checkpoint
_CHUNK_ELEMENTS = 4 << 20


def nucleus_image_config(layers: int = NUCLEUS_IMAGE_LAYERS) -> dict[str, Any]:
    """The real architecture with `layers` blocks (capacity factors truncated or extended like the released ones)."""
    if layers < 1:
        raise UsageError(f"a synthetic model needs at least 1 block, got {layers}.", "use layers=1..32 (or more).")
    factors = list(_LEADING_FACTORS[:layers]) + [_TAIL_FACTOR] * max(0, layers - len(_LEADING_FACTORS))
    return {**NUCLEUS_IMAGE_CONFIG, "num_layers": layers, "capacity_factors": factors}


def is_synthetic_spec(spec: str) -> bool:
    return str(spec).startswith(SYNTHETIC_PREFIX)


def parse_synthetic_spec(spec: str) -> tuple[dict[str, Any], int]:
    """`synthetic:nucleus-image[?layers=N][&seed=S]` -> (config dict, seed)."""
    body = str(spec)[len(SYNTHETIC_PREFIX):]
    name, _, query = body.partition("?")
    if name != NUCLEUS_IMAGE:
        raise UsageError(f"unknown synthetic model '{name}'.", f"use --model {SYNTHETIC_PREFIX}{NUCLEUS_IMAGE}?layers=N.")
    try:
        params = {k: v for k, v in urllib.parse.parse_qsl(query, strict_parsing=bool(query))}
    except ValueError:
        raise UsageError(f"cannot read the options in '{spec}'.", "write them as ?layers=6&seed=0.") from None
    unknown = sorted(set(params) - {"layers", "seed"})
    if unknown:
        raise UsageError(f"unknown synthetic model option(s) {', '.join(unknown)} in '{spec}'.", "use layers and seed.")
    try:
        layers = int(params.get("layers", NUCLEUS_IMAGE_LAYERS))
        seed = int(params.get("seed", SYNTHETIC_SEED))
    except ValueError:
        raise UsageError(f"layers and seed must be integers in '{spec}'.", "e.g. synthetic:nucleus-image?layers=6.") from None
    return nucleus_image_config(layers), seed


def random_bf16(name: str, shape: tuple[int, ...], seed: int, out: Any) -> None:
    """Draw one tensor in chunks and write its bf16 bytes to `out`; never holds more than one chunk."""
    mean, std = init_law(name, shape)
    total = math.prod(shape)
    rng = np.random.default_rng(tensor_seed(seed, name))
    for start in range(0, total, _CHUNK_ELEMENTS):
        count = min(_CHUNK_ELEMENTS, total - start)
        chunk = rng.standard_normal(count, dtype=np.float32)
        chunk *= np.float32(std)
        chunk += np.float32(mean)
        out.write(chunk.astype(ml_dtypes.bfloat16).view(np.uint8).data)


def plan_shards(shapes: dict[str, tuple[int, ...]], shard_bytes: int) -> list[list[str]]:
    plan: list[list[str]] = [[]]
    filled = 0
    for name, shape in shapes.items():
        nbytes = math.prod(shape) * 2
        if filled and filled + nbytes > shard_bytes:
            plan.append([])
            filled = 0
        plan[-1].append(name)
        filled += nbytes
    return plan


def write_random_checkpoint(
    out_dir: Path,
    shapes: dict[str, tuple[int, ...]],
    config: dict[str, Any],
    shard_name: Callable[[int, int], str],
    index_name: str,
    what: str,
    seed: int = SYNTHETIC_SEED,
    shard_bytes: int = SHARD_BYTES,
) -> Path:
    """Write random bf16 tensors of `shapes` as a sharded safetensors checkpoint with its index and config.json,
    tensor by tensor in constant memory (random_bf16), through a temporary sibling renamed into place when complete.

    Args:
        shard_name: (shard number from 1, shard count) -> file name, the library's naming (diffusers, transformers).
        index_name: the index file written when there is more than one shard.
        what: what is written, for the log and the disk-space refusal.
    """
    plan = plan_shards(shapes, shard_bytes)
    total_bytes = sum(math.prod(s) * 2 for s in shapes.values())
    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    free = shutil.disk_usage(out_dir.parent).free
    if free < total_bytes * 1.02:
        raise UsageError(
            f"{what} of {total_bytes / 1e9:.1f} GB does not fit in the {free / 1e9:.1f} GB free under {out_dir.parent}.",
            "free disk space, or point NUCLEUS_EXPORT_CACHE at a larger disk.",
        )
    logger.info("writing %s (%.2f B parameters, %.2f GB bf16, %d shards) to %s",
                what, total_bytes / 2e9, total_bytes / 1e9, len(plan), out_dir)
    started, written = time.perf_counter(), 0
    with atomic_dir(out_dir) as tmp:
        weight_map: dict[str, str] = {}
        for k, names in enumerate(plan):
            file_name = shard_name(k + 1, len(plan))
            header, offset = {}, 0
            for name in names:
                nbytes = math.prod(shapes[name]) * 2
                header[name] = {"dtype": "BF16", "shape": list(shapes[name]), "data_offsets": [offset, offset + nbytes]}
                offset += nbytes
            header["__metadata__"] = {"format": "pt"}
            blob = json.dumps(header).encode()
            blob += b" " * (-len(blob) % 8)
            with open(tmp / file_name, "wb", buffering=8 << 20) as f:
                f.write(struct.pack("<Q", len(blob)) + blob)
                for name in names:
                    random_bf16(name, shapes[name], seed, f)
                    weight_map[name] = file_name
            written += offset
            logger.info(
                "  shard %d/%d written (%.1f of %.1f GB, %.0f s)",
                k + 1, len(plan), written / 1e9, total_bytes / 1e9, time.perf_counter() - started,
            )
        if len(plan) > 1:
            index = {"metadata": {"total_size": total_bytes}, "weight_map": dict(sorted(weight_map.items()))}
            (tmp / index_name).write_text(json.dumps(index, indent=2))
        (tmp / "config.json").write_text(json.dumps(config, indent=2))
    return out_dir


def _diffusers_shard(k: int, count: int) -> str:
    return f"diffusion_pytorch_model-{k:05d}-of-{count:05d}.safetensors" if count > 1 else "diffusion_pytorch_model.safetensors"


def write_synthetic_checkpoint(
    out_dir: Path, config: dict[str, Any], seed: int = SYNTHETIC_SEED, shard_bytes: int = SHARD_BYTES
) -> Path:
    """Write a random bf16 checkpoint of `config` (a config.json dict) in diffusers' layout (write_random_checkpoint)."""
    model_config = ModelConfig.from_dict(config)
    return write_random_checkpoint(
        out_dir, expected_parameter_shapes(model_config), model_config.to_dict(), _diffusers_shard, INDEX_NAME,
        f"a synthetic {model_config.num_layers}-block checkpoint", seed, shard_bytes,
    )


def synthetic_checkpoint_path(spec: str) -> Path:
    """The cache folder a synthetic spec resolves to (under NUCLEUS_EXPORT_CACHE, like the tiny model)."""
    config, seed = parse_synthetic_spec(spec)
    key = ModelConfig.from_dict(config).config_hash()
    return cache_root() / f"synthetic-{NUCLEUS_IMAGE}-L{config['num_layers']}-{key}-seed{seed}-init{SYNTHETIC_INIT_VERSION}"


def ensure_synthetic_checkpoint(spec: str) -> Path:
    """The cached synthetic checkpoint for `spec`, written on first use."""
    path = synthetic_checkpoint_path(spec)
    if not (path / "config.json").is_file():
        config, seed = parse_synthetic_spec(spec)
        write_synthetic_checkpoint(path, config, seed)
    return path


def checkpoint_bytes(path: Path) -> int:
    """Bytes of a checkpoint folder's safetensors shards (what the benchmarks compare against)."""
    return sum(p.stat().st_size for p in Path(path).glob("*.safetensors"))

