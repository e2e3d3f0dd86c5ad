"""The GEMMs an FP8 build may quantize, grouped by block and kind, with their sizes and the FP8 share of a plan.

Shapes come from the config alone, so the share can be stated for a model that is not at hand (the real config).
"""

from __future__ import annotations

import dataclasses


from nucleus_export.graph.precision import QuantRecipe
from nucleus_export.model.config import ModelConfig

# Kinds, in block order. "attn_qkv" and "attn_out" run before an MoE block's router, the others after it.
KINDS = ("attn_qkv", "attn_out", "mlp", "shared_expert", "experts")


@dataclasses.dataclass(frozen=True)
class GemmGroup:
    """The GEMMs of one kind in one block, selected together.

    Attributes:
        block: transformer block index.
        kind: one of KINDS ("mlp": a dense block's MLP).
        gemms: module paths (the activation_amax keys of these GEMMs).
        weight_params: weight elements (FP8 stores one byte each instead of two).
        flops_per_token: GEMM FLOPs per image token (routed experts: each token is processed capacity-factor times).
    """

    block: int
    kind: str
    gemms: tuple[str, ...]
    weight_params: int
    flops_per_token: float

    @property
    def name(self) -> str:
        return f"transformer_blocks.{self.block}/{self.kind}"


def gemm_groups(config: ModelConfig) -> list[GemmGroup]:
    """Every FP8-quantizable GEMM of the denoiser, grouped by (block, kind), in graph order."""
    hidden, dim = config.hidden_size, config.attention_head_dim
    q, kv = config.num_attention_heads * dim, config.kv_heads * dim
    groups = []
    for idx in range(config.num_layers):
        attn, mlp = f"transformer_blocks.{idx}.attn", f"transformer_blocks.{idx}.img_mlp"
        qkv = hidden * (q + 2 * kv)
        groups.append(GemmGroup(idx, "attn_qkv", (f"{attn}.to_q", f"{attn}.to_k", f"{attn}.to_v"), qkv, 2.0 * qkv))
        groups.append(GemmGroup(idx, "attn_out", (f"{attn}.to_out.0",), q * hidden, 2.0 * q * hidden))
        if config.is_moe(idx):
            inner = config.moe_intermediate_dim
            ffn = 3 * hidden * inner  # fused gate+up [H, 2I] and down [I, H]
            shared = (f"{mlp}.shared_expert.net.0.proj", f"{mlp}.shared_expert.net.2")
            groups.append(GemmGroup(idx, "shared_expert", shared, ffn, 2.0 * ffn))
            experts = (f"{mlp}.experts.gate_up_proj", f"{mlp}.experts.down_proj")
            cf = config.capacity_factor(idx)
            groups.append(GemmGroup(idx, "experts", experts, config.num_experts * ffn, 2.0 * ffn * cf))
        else:
            ffn = 3 * hidden * config.dense_mlp_dim
            groups.append(GemmGroup(idx, "mlp", (f"{mlp}.net.0.proj", f"{mlp}.net.2"), ffn, 2.0 * ffn))
    return groups


@dataclasses.dataclass(frozen=True)
class Fp8Share:
    """How much of the quantizable GEMMs' weight bytes are stored in FP8, and of their FLOPs run in FP8 (W8A8)."""

    weight_bytes: float
    gemm_flops: float

    def __str__(self) -> str:
        return f"{100 * self.weight_bytes:.1f}% of GEMM weight bytes in FP8, {100 * self.gemm_flops:.1f}% of GEMM FLOPs in FP8"


def fp8_share(config: ModelConfig, recipe: QuantRecipe) -> Fp8Share:
    """The share of `config`'s quantizable GEMMs that `recipe` runs in FP8 (by each group's first GEMM's mode)."""
    groups = gemm_groups(config)
    modes = [recipe.mode(g.gemms[0]) for g in groups]
    params = sum(g.weight_params for g in groups)
    flops = sum(g.flops_per_token for g in groups)
    return Fp8Share(
        sum(g.weight_params for g, m in zip(groups, modes) if m.quantizes_weights) / params,
        sum(g.flops_per_token for g, m in zip(groups, modes) if m.quantizes_activations) / flops,
    )
