"""The default FP8 recipe: each GEMM group's mode by its position and kind, what `--fp8` applies without probes.

ModelOpt's diffusion recipes (Qwen-Image, Wan) keep the edge blocks, the embedders and the output projection in high
precision and quantize the rest; nucleus-export's embedders, norms, router and output projection are never
quantized. The table below was derived from the per-GEMM-group costs `--fp8-sensitivity` measured on several
configurations (benchmarks/bench_fp8_recipe.py, docs/quality.md): the squared end-to-end error a group adds alone in
each mode, in units of the bf16 graph's own squared error, pooled by kind and position. What it found:
- routed experts are ~96% of the real model's GEMM weight bytes, and with FP8 weights only (activations bf16) they
  cost little: weight rounding alone, spread over 64 experts of which each token meets ~2;
- W8A8 costs most where it feeds a router: activation rounding in the attention GEMMs of an MoE block and in the
  block before it moves the router's input, and a routing flip costs far more than arithmetic noise;
- the first and last blocks cost most per FLOP (the first sees the raw latents, the last writes the output).
So: edge blocks bf16; routed and shared experts FP8 weights only; attention of MoE blocks FP8 weights only; dense
MLPs and the attention of the other dense blocks W8A8.
"""

from __future__ import annotations

from nucleus_runtime.contract import GemmMode

from nucleus_export.graph.precision import QuantRecipe
from nucleus_export.model.config import ModelConfig
from nucleus_export.quant.gemms import GemmGroup, gemm_groups

RECIPE_NAME = "nucleus-default-1"

# (kind, where) -> mode; where is "edge" (first or last block), "moe" (an MoE block) or "dense" (another block).
DEFAULT_RULES: dict[tuple[str, str], GemmMode] = {
    ("attn_qkv", "edge"): GemmMode.COMPUTE,
    ("attn_out", "edge"): GemmMode.COMPUTE,
    ("mlp", "edge"): GemmMode.COMPUTE,
    ("shared_expert", "edge"): GemmMode.COMPUTE,
    ("experts", "edge"): GemmMode.FP8_WEIGHTS,
    ("attn_qkv", "moe"): GemmMode.FP8_WEIGHTS,
    ("attn_out", "moe"): GemmMode.FP8_WEIGHTS,
    ("shared_expert", "moe"): GemmMode.FP8_WEIGHTS,
    ("experts", "moe"): GemmMode.FP8_WEIGHTS,
    ("attn_qkv", "dense"): GemmMode.FP8,
    ("attn_out", "dense"): GemmMode.FP8,
    ("mlp", "dense"): GemmMode.FP8,
}


def position(config: ModelConfig, group: GemmGroup) -> str:
    """"edge", "moe" or "dense" for the block of a GEMM group."""
    if group.block in (0, config.num_layers - 1):
        return "edge"
    return "moe" if config.is_moe(group.block) else "dense"


def default_modes(config: ModelConfig, rules: dict[tuple[str, str], GemmMode] | None = None) -> dict[str, GemmMode]:
    """Group name -> mode of the default recipe for this architecture."""
    rules = rules or DEFAULT_RULES
    return {g.name: rules[(g.kind, position(config, g))] for g in gemm_groups(config)}


def apply_default_recipe(recipe: QuantRecipe, config: ModelConfig,
                         rules: dict[tuple[str, str], GemmMode] | None = None) -> QuantRecipe:
    """The calibrated scales with the default recipe's modes (recorded under calibration["recipe"])."""
    import dataclasses

    from nucleus_export.quant.sensitivity import apply_modes

    groups = gemm_groups(config)
    modes = default_modes(config, rules)
    chosen = apply_modes(recipe, groups, modes)
    return dataclasses.replace(chosen, calibration={**recipe.calibration, "recipe": RECIPE_NAME})
