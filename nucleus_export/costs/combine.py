"""The MoE combine's cost per formulation (nucleus_export.moe.combine) and the choice `build --combine auto` makes:
the one-hot GEMM is quadratic in the image tokens, the per-expert chain linear but launch-bound."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterable, Sequence

from nucleus_runtime.bundle import Profiles
from nucleus_runtime.contract import AUTO, COMBINE_CHAIN, COMBINE_ONEHOT, TENSORRT, TENSORRT_RTX

from nucleus_export.costs.roofline import GPUS, LAUNCH_SECONDS, Cost, Gpu
from nucleus_export.engines.profiles import profile_limit_problems
from nucleus_export.model.config import ModelConfig

COMBINE_CHOICES = (AUTO, COMBINE_ONEHOT, COMBINE_CHAIN)
# Kernels of one chain step (gather, add, scatter) and of the one-hot combine (compare, cast, GEMM, add).
CHAIN_KERNELS_PER_EXPERT = 3
ONEHOT_KERNELS = 4
F32_BYTES = 4
# The GPU the choice is modeled on per flavor: TensorRT-RTX engines run on RTX cards, full TensorRT on datacenter GPUs.
COMBINE_COST_GPU = {TENSORRT: "h100", TENSORRT_RTX: "rtx5090"}


@dataclasses.dataclass(frozen=True)
class CombineShape:
    """Dimensions of one MoE combine: batch rows, image tokens, experts, capacity, hidden width, element bytes."""

    batch: int
    tokens: int
    experts: int
    capacity: int
    hidden: int
    element_bytes: int = 2


def onehot_cost(d: CombineShape) -> Cost:
    """[B, S, E*C] 0/1 matrix x [B, E*C, H] contributions, plus the shared add: quadratic in S."""
    slots = d.experts * d.capacity
    flops = 2.0 * d.batch * d.tokens * slots * d.hidden
    one_hot = d.batch * d.tokens * slots * (1 + 2 * d.element_bytes)  # bool written, cast written and read
    rows = d.batch * (slots + 3 * d.tokens) * d.hidden * d.element_bytes  # contributions, shared, product, output
    return Cost(flops, one_hot + rows, ONEHOT_KERNELS)


def chain_cost(d: CombineShape) -> Cost:
    """Per expert: gather B*C float32 running sums, add the contributions, scatter them back (in place): linear in
    S. If a backend copied the [B*S, H] buffer at every scatter, bytes would grow by 2*E*B*S*H*4."""
    rows = d.batch * d.capacity * d.hidden
    per_expert = Cost(rows, rows * (3 * F32_BYTES + d.element_bytes), CHAIN_KERNELS_PER_EXPERT)
    edges = Cost(0, d.batch * d.tokens * d.hidden * (2 * d.element_bytes + 2 * F32_BYTES), 2)  # to float32 and back
    return per_expert.scaled(d.experts) + edges


COMBINE_COSTS = {COMBINE_ONEHOT: onehot_cost, COMBINE_CHAIN: chain_cost}


def combine_shapes(config: ModelConfig, batch: int, tokens: int, element_bytes: int = 2) -> list[CombineShape]:
    """One CombineShape per MoE block of a ModelConfig at `tokens` image tokens."""
    return [
        CombineShape(batch, tokens, config.num_experts, config.capacity(idx, tokens), config.hidden_size, element_bytes)
        for idx in config.moe_layers
    ]


def combine_seconds(formulation: str, shapes: Iterable[CombineShape], gpu: Gpu,
                    launch_seconds: float = LAUNCH_SECONDS) -> float:
    cost = COMBINE_COSTS[formulation]
    return sum(cost(d).seconds(gpu, launch_seconds=launch_seconds) for d in shapes)


@dataclasses.dataclass(frozen=True)
class CombineChoice:
    """The formulation an engine gets and why: modeled seconds per step of every formulation at each served token
    count (all MoE blocks), and the crossover token count above which the chain is cheaper."""

    formulation: str
    requested: str
    gpu: str
    seconds: dict[str, dict[int, float]]
    crossover_tokens: int | None

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def crossover_tokens(config: ModelConfig, batch: int, gpu: Gpu, element_bytes: int = 2, limit: int = 1 << 20,
                     launch_seconds: float = LAUNCH_SECONDS) -> int | None:
    """Smallest token count from which the chain is modeled cheaper than the one-hot GEMM (None below `limit`)."""

    def chain_wins(tokens: int) -> bool:
        shapes = combine_shapes(config, batch, tokens, element_bytes)
        return combine_seconds(COMBINE_CHAIN, shapes, gpu, launch_seconds) < combine_seconds(COMBINE_ONEHOT, shapes, gpu, launch_seconds)

    if not config.moe_layers or not chain_wins(limit):
        return None
    lo, hi = 1, limit  # one-hot is quadratic, the chain linear: the comparison flips once
    while lo < hi:
        mid = (lo + hi) // 2
        lo, hi = (lo, mid) if chain_wins(mid) else (mid + 1, hi)
    return lo


def choose_combine(requested: str, config: ModelConfig, batch: int, token_counts: Sequence[int], element_bytes: int = 2,
                   gpu: str = "h200", candidates: Sequence[str] = (COMBINE_ONEHOT, COMBINE_CHAIN)) -> CombineChoice:
    """Resolve --combine: "auto" takes, among `candidates` (those the backend can build), the formulation with the
    least modeled time summed over the served token counts (one engine serves them all); "onehot" / "chain" are
    kept as asked and the model is reported anyway."""
    if requested not in COMBINE_CHOICES:
        raise ValueError(f"unknown combine {requested!r}; use one of {COMBINE_CHOICES}")
    target = GPUS[gpu]
    seconds = {
        name: {s: combine_seconds(name, combine_shapes(config, batch, s, element_bytes), target) for s in token_counts}
        for name in COMBINE_COSTS
    }
    if requested == AUTO:
        formulation = min(candidates, key=lambda name: (math.fsum(seconds[name].values()), name != COMBINE_ONEHOT))
    else:
        formulation = requested
    return CombineChoice(formulation, requested, gpu, seconds, crossover_tokens(config, batch, target, element_bytes))


def combine_choice(config: ModelConfig, profiles: Profiles, compute: str, requested: str, flavor: str) -> CombineChoice:
    """The combine formulation for this profile (all served resolutions at the largest batch); "auto" leaves out
    the one-hot GEMM where TensorRT could not build it (engines.profiles.profile_limit_problems)."""
    tokens = sorted({h * w for h, w in profiles.grids})
    batch, text_len = profiles.batch[2], profiles.text_len[2]
    buildable = [
        name for name in (COMBINE_ONEHOT, COMBINE_CHAIN)
        if not profile_limit_problems(config, batch, max(tokens), text_len, compute == "fp32", name)
    ]
    return choose_combine(requested, config, batch, tokens, 4 if compute == "fp32" else 2,
                          COMBINE_COST_GPU.get(flavor, "h100"), candidates=buildable or [COMBINE_CHAIN])
