"""A roofline cost model: FLOPs, bytes and kernel launches, timed on published GPU peaks.

It decides what cannot be timed on the build machines: which MoE combine formulation an engine gets
(costs/combine.py), and the step-time estimate of `nucleus-export inspect`. Time of a piece of work =
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

# Share of the dense tensor-core peak a large bf16 GEMM reaches (fit to the one-hot timings above).
GEMM_EFFICIENCY = 0.42
# Fixed cost of one kernel inside an engine (launch and the tail of a short kernel); an assumption, see above.
LAUNCH_SECONDS = 5e-6
# The same for one PyTorch eager op, fit to the chain timings above (2.85 ms / 192 ops).
EAGER_LAUNCH_SECONDS = 15e-6


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
