"""How much host memory an engine build takes, and the segmentation (of the denoiser's blocks, of the text encoder's
layers) that keeps it under a budget.

The model is measured, not assumed (benchmarks/bench_build_memory.py on real-dimension synthetic checkpoints,
tensorrt-rtx 1.7.1, 2 CPU cores): the peak RSS of `build` is a base (the Python process with torch, onnx and
the export's largest tensor) plus a multiple of the weight bytes of the largest network built at once. The
builder holds the parsed weights, its own optimized copy and, without streaming, the serialized plan.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import psutil
from nucleus_runtime.contract import DENOISER_GRAPH, TEXT_ENCODER_GRAPH

from nucleus_export.errors import UsageError

GB = 1e9
# Fitted to two measured builds of the 6-block real-dimension checkpoint (bf16, plan streamed to disk): one engine
# of 3.96 GB of weights peaked at 10.90 GB, three segments (largest 2.3 GB) at 6.77 GB (docs/findings.md, "Build memory and bundle size").
BUILD_BASE_BYTES = int(1.0 * GB)
BUILD_BYTES_PER_WEIGHT_BYTE = 2.5


# What a stage's cut points separate, for messages.
_UNITS = {DENOISER_GRAPH: "blocks", TEXT_ENCODER_GRAPH: "layers"}
# The default budget leaves a fifth of the available memory to the model's error and to the machine's other users.
DEFAULT_BUDGET_FRACTION = 0.8


def available_memory() -> int:
    """What --max-build-memory defaults to: a share of the host memory available now (the machine may be shared)."""
    return int(DEFAULT_BUDGET_FRACTION * psutil.virtual_memory().available)


def predicted_peak(weight_bytes: int) -> int:
    return int(BUILD_BASE_BYTES + BUILD_BYTES_PER_WEIGHT_BYTE * weight_bytes)


@dataclasses.dataclass(frozen=True)
class BuildMemoryPlan:
    """Block (or layer) groups [first, last) of a stage's engines and the peak the model predicts for the largest."""

    groups: list[tuple[int, int]]
    group_bytes: list[int]
    budget: int
    graph: str = DENOISER_GRAPH

    @property
    def predicted_peak(self) -> int:
        return predicted_peak(max(self.group_bytes))

    def describe(self) -> str:
        return (
            f"build memory: {len(self.groups)} {self.graph} engine(s) of {_UNITS.get(self.graph, 'blocks')} "
            + ", ".join(f"{a}-{b - 1}" for a, b in self.groups)
            + f"; largest {max(self.group_bytes) / GB:.2f} GB of weights, predicted peak "
            f"{self.predicted_peak / GB:.1f} GB of {self.budget / GB:.1f} GB allowed"
        )


def groups_by_bytes(block_bytes: Sequence[int], budget: int) -> list[tuple[int, int]]:
    """Fewest consecutive groups whose weight bytes stay within `budget` each (a block over it gets its own group)."""
    groups: list[tuple[int, int]] = []
    start, filled = 0, 0
    for idx, nbytes in enumerate(block_bytes):
        if idx > start and filled + nbytes > budget:
            groups.append((start, idx))
            start, filled = idx, 0
        filled += nbytes
    groups.append((start, len(block_bytes)))
    return groups


def plan_build_memory(block_bytes: Sequence[int], other_bytes: int, budget: int,
                      graph: str = DENOISER_GRAPH) -> BuildMemoryPlan:
    """The fewest consecutive block groups whose predicted build peak fits `budget`.

    Args:
        block_bytes: weight bytes per block (the first block's count includes what precedes the blocks, such as the
            text encoder's embedding table).
        other_bytes: weights after the last block (they go with the last group).
        budget: host memory the build may use.
        graph: the stage being cut (for messages).

    Raises:
        UsageError: even one block per engine would not fit.
    """
    per_block = list(block_bytes)
    per_block[-1] += other_bytes
    per_group = (budget - BUILD_BASE_BYTES) / BUILD_BYTES_PER_WEIGHT_BYTE
    if per_group < max(per_block):
        raise UsageError(
            f"--max-build-memory {budget / GB:.1f} GB is too small: one {graph} {_UNITS.get(graph, 'blocks')[:-1]} of "
            f"{max(per_block) / GB:.2f} GB of weights "
            f"needs about {predicted_peak(max(per_block)) / GB:.1f} GB to build.",
            "raise --max-build-memory (or free memory on this machine).",
        )
    groups = groups_by_bytes(per_block, int(per_group))
    return BuildMemoryPlan(groups, [sum(per_block[a:b]) for a, b in groups], budget, graph)
