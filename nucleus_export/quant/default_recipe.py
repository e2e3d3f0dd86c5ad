"""The default FP8 recipe: each GEMM group's mode by its position and kind, what `--fp8` applies without probes.

ModelOpt's diffusion recipes (Qwen-Image, Wan) keep the edge blocks, the embedders and the output projection in high
precision and quantize the rest; nucleus-export's embedders, norms, router and output projection are never
quantized. The table below was read from the per-GEMM-group costs `--fp8-sensitivity` measured on four
configurations (benchmarks/bench_fp8_recipe.py costs; docs/quality.md has the table): the squared end-to-end error a
group adds alone in each mode, in units of that configuration's bf16 squared error (the 1.35x goal allows 0.82 in
all). What it found:
- the FFN GEMMs cost most: a dense MLP 0.30 (FP8 weights) to 0.61 (W8A8), a block's routed experts 0.15 to 1.0;
  the attention GEMMs cost little (mean 0.005 to 0.056), except where they feed the routers of the first MoE blocks;
- the experts' cost falls with depth: the first MoE block's experts cost ~4x the last block's (their error moves the
  routers of every later block), e.g. 0.98 / 0.66 / 0.25 / 0.10 for the four MoE blocks of one configuration;
- W8A8 costs about twice FP8 weights only (activation rounding adds about as much as weight rounding).
So: the first block and the early half of the MoE blocks stay bf16; the late half of the MoE blocks and the last
block run their routed experts with FP8 weights (the bytes: the experts are ~96% of the real model's GEMM weight
bytes); attention of the dense middle blocks and of the late MoE blocks runs W8A8; dense MLPs and shared experts stay
bf16. On the real 32-block model that puts the experts of blocks 17..31 in FP8 (about half of all GEMM weight bytes).
"""

from __future__ import annotations

from nucleus_runtime.contract import GemmMode

from nucleus_export.graph.precision import QuantRecipe
from nucleus_export.model.config import ModelConfig
from nucleus_export.quant.gemms import GemmGroup, gemm_groups

RECIPE_NAME = "nucleus-default-1"

C, W, F = GemmMode.COMPUTE, GemmMode.FP8_WEIGHTS, GemmMode.FP8
# (kind, where) -> mode; where is position()'s answer. Missing pairs (e.g. an MLP in an MoE block) cannot occur.
DEFAULT_RULES: dict[tuple[str, str], GemmMode] = {
    **{(kind, "first"): C for kind in ("attn_qkv", "attn_out", "mlp", "shared_expert", "experts")},
    ("attn_qkv", "last"): C, ("attn_out", "last"): C, ("mlp", "last"): C, ("shared_expert", "last"): C,
    ("experts", "last"): W,
    ("attn_qkv", "dense"): F, ("attn_out", "dense"): F, ("mlp", "dense"): C,
    ("attn_qkv", "early-moe"): C, ("attn_out", "early-moe"): C, ("shared_expert", "early-moe"): C,
    ("experts", "early-moe"): C,
    ("attn_qkv", "late-moe"): F, ("attn_out", "late-moe"): F, ("shared_expert", "late-moe"): C,
    ("experts", "late-moe"): W,
}


def position(config: ModelConfig, group: GemmGroup) -> str:
    """Where a GEMM group's block is: "first", "last", "dense" (another dense block), or for an MoE block
    "early-moe" / "late-moe" (the first floor(n / 2) of the n MoE blocks are early)."""
    if group.block == 0:
        return "first"
    if group.block == config.num_layers - 1:
        return "last"
    if not config.is_moe(group.block):
        return "dense"
    moe = list(config.moe_layers)
    return "early-moe" if moe.index(group.block) < len(moe) // 2 else "late-moe"


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
