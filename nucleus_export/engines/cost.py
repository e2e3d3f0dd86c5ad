"""A cost model of FLOPs, bytes and kernel launches, and a roofline estimate of time on published GPU peaks.

It decides what cannot be timed on the build machines: which MoE combine formulation an engine gets
(`choose_combine`), and the step-time estimate of `nucleus-export inspect`. Time of a piece of work =
max(FLOPs / (peak * GEMM_EFFICIENCY), bytes / bandwidth) + launches * LAUNCH_SECONDS.

Checked against the H200 timings in issue 12 (bf16, B=2, E=64, H=2048, capacity factor 2, the equivalent PyTorch
ops): the one-hot combine took 0.70 ms at S=4096 and 10.39 ms at S=16384, i.e. 40-43% of the H200's dense bf16
peak, hence GEMM_EFFICIENCY; the per-expert chain took 2.95 / 2.75 ms, flat in S, i.e. launch-bound at ~15 us per
PyTorch op (3 ops per expert): EAGER_LAUNCH_SECONDS. An engine launches its kernels without Python in between;
LAUNCH_SECONDS assumes 5 us per kernel, which puts the crossover for the real model between 1024x1024 and
1536x1536 (tests/test_cost.py checks both calibrations).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterable, Sequence

ONEHOT = "onehot"
CHAIN = "chain"
COMBINE_CHOICES = ("auto", ONEHOT, CHAIN)

# Share of the dense tensor-core peak a large bf16 GEMM reaches (fit to the one-hot timings above).
GEMM_EFFICIENCY = 0.42
# Fixed cost of one kernel inside an engine (launch and the tail of a short kernel); an assumption, see above.
LAUNCH_SECONDS = 5e-6
# The same for one PyTorch eager op, fit to the chain timings above (2.85 ms / 192 ops).
EAGER_LAUNCH_SECONDS = 15e-6
# Kernels of one chain step (gather, add, scatter) and of the one-hot combine (compare, cast, GEMM, add).
CHAIN_KERNELS_PER_EXPERT = 3
ONEHOT_KERNELS = 4
F32_BYTES = 4


@dataclasses.dataclass(frozen=True)
class Gpu:
    """Published dense (no sparsity) tensor-core peaks and memory bandwidth."""

    name: str
    bf16_tflops: float
    fp8_tflops: float
    bandwidth_tbps: float
    source: str


# Datasheet numbers: SXM parts for H100/H200; GeForce tensor peaks with FP32 accumulation (what bf16 GEMMs use).
GPUS: dict[str, Gpu] = {
    "h100": Gpu("NVIDIA H100 SXM", 989.4, 1978.9, 3.35, "NVIDIA H100 Tensor Core GPU datasheet"),
    "h200": Gpu("NVIDIA H200 SXM", 989.4, 1978.9, 4.8, "NVIDIA H200 Tensor Core GPU datasheet"),
    "l40s": Gpu("NVIDIA L40S", 362.05, 733.0, 0.864, "NVIDIA L40S datasheet"),
    "rtx4090": Gpu("GeForce RTX 4090", 165.2, 330.3, 1.008, "NVIDIA Ada Lovelace architecture whitepaper, appendix A"),
    "rtx5090": Gpu("GeForce RTX 5090", 209.5, 419.0, 1.792, "NVIDIA RTX Blackwell GPU architecture whitepaper"),
}


@dataclasses.dataclass(frozen=True)
class Cost:
    """Work of a piece of a graph: floating-point operations, bytes moved to and from memory, kernel launches."""

    flops: float = 0.0
    bytes: float = 0.0
    launches: int = 0

    def __add__(self, other: Cost) -> Cost:
        return Cost(self.flops + other.flops, self.bytes + other.bytes, self.launches + other.launches)

    def scaled(self, factor: float) -> Cost:
        return Cost(self.flops * factor, self.bytes * factor, int(self.launches * factor))

    def seconds(self, gpu: Gpu, fp8: bool = False, launch_seconds: float = LAUNCH_SECONDS) -> float:
        peak = (gpu.fp8_tflops if fp8 else gpu.bf16_tflops) * 1e12 * GEMM_EFFICIENCY
        return max(self.flops / peak, self.bytes / (gpu.bandwidth_tbps * 1e12)) + self.launches * launch_seconds


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


COMBINE_COSTS = {ONEHOT: onehot_cost, CHAIN: chain_cost}


def combine_shapes(config, batch: int, tokens: int, element_bytes: int = 2) -> list[CombineShape]:
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


def crossover_tokens(config, batch: int, gpu: Gpu, element_bytes: int = 2, limit: int = 1 << 20,
                     launch_seconds: float = LAUNCH_SECONDS) -> int | None:
    """Smallest token count from which the chain is modeled cheaper than the one-hot GEMM (None below `limit`)."""

    def chain_wins(tokens: int) -> bool:
        shapes = combine_shapes(config, batch, tokens, element_bytes)
        return combine_seconds(CHAIN, shapes, gpu, launch_seconds) < combine_seconds(ONEHOT, shapes, gpu, launch_seconds)

    if not config.moe_layers or not chain_wins(limit):
        return None
    lo, hi = 1, limit  # one-hot is quadratic, the chain linear: the comparison flips once
    while lo < hi:
        mid = (lo + hi) // 2
        lo, hi = (lo, mid) if chain_wins(mid) else (mid + 1, hi)
    return lo


def choose_combine(requested: str, config, batch: int, token_counts: Sequence[int], element_bytes: int = 2,
                   gpu: str = "h200", candidates: Sequence[str] = (ONEHOT, CHAIN)) -> CombineChoice:
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
    if requested == "auto":
        formulation = min(candidates, key=lambda name: (math.fsum(seconds[name].values()), name != ONEHOT))
    else:
        formulation = requested
    return CombineChoice(formulation, requested, gpu, seconds, crossover_tokens(config, batch, target, element_bytes))
