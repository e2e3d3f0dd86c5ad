"""Which transformer blocks stay in bf16 in an FP8 build, chosen by measurement.

Each probe exports the denoiser at a small probe resolution with FP8 Q/DQ on one set of blocks and runs it in ONNX
Runtime (bf16 emulated) against diffusers' float32 forward on the same inputs (parity.check, quick cases), giving the
pooled relative error and routing agreement. Steps:
1. the bf16 graph (no FP8) and the all-FP8 graph: the floor and the starting point;
2. one block quantized at a time: the block's sensitivity is its share of the error increase over bf16 plus its
   share of the routing agreement lost (a flipped selection is the largest single error an MoE layer makes, so
   routing ranks blocks alongside the error);
3. the most sensitive blocks are kept in bf16, one more at a time, until the FP8 graph's error is within `target`
   x the bf16 graph's, or half the blocks are kept (beyond that FP8 would no longer pay).
The result is written into fp8_scales.json (`keep`, and the measurements under calibration["sensitivity"]), so a
rebuild from stored scales is reproducible without probing again.
"""

from __future__ import annotations

import dataclasses
import json
import math
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

from nucleus_export.graph.precision import Fp8Scales, GraphPrecision
from nucleus_export.log import track

if TYPE_CHECKING:
    import torch

    from nucleus_export.model.checkpoint import Checkpoint

# FP8 may cost this much over bf16 in relative error (measured on the probe cases) before blocks are kept in bf16.
FP8_ERROR_TARGET = 1.25
PROBE_RESOLUTION = (512, 512)


@dataclasses.dataclass
class Probe:
    """One measured graph: FP8 on every block but `keep`."""

    keep: tuple[int, ...]
    relative_error: float
    routing_agreement: float


@dataclasses.dataclass
class Sensitivity:
    """What the selection measured (stored in fp8_scales.json)."""

    bf16: Probe
    all_fp8: Probe
    per_block: dict[int, Probe]  # block -> probe with FP8 on that block only
    ranking: list[int]  # most sensitive first
    chosen: Probe
    target: float
    met: bool

    def to_dict(self) -> dict[str, Any]:
        return json.loads(json.dumps(dataclasses.asdict(self)))  # JSON-shaped: string keys, lists

    def summary(self) -> str:
        ratio = self.chosen.relative_error / max(self.bf16.relative_error, 1e-30)
        kept = ", ".join(str(b) for b in self.chosen.keep) or "none"
        return (
            f"FP8 sensitivity: blocks kept in bf16: {kept}; FP8 rel err {self.chosen.relative_error:.3e} = "
            f"{ratio:.2f} x bf16's {self.bf16.relative_error:.3e} (target {self.target:g}x: "
            f"{'met' if self.met else 'NOT met'}); all-FP8 {self.all_fp8.relative_error:.3e}; "
            f"ranking (most sensitive first) {self.ranking}"
        )


def _keep_paths(blocks: tuple[int, ...]) -> tuple[str, ...]:
    return tuple(f"transformer_blocks.{b}" for b in blocks)


def _probe(checkpoint: Checkpoint, compute: str, scales: Fp8Scales | None, keep: tuple[int, ...], reference: Any,
           workdir: Path) -> Probe:

    from nucleus_export.export import ExportOptions, export_bundle
    from nucleus_export.parity.check import check_parity
    from nucleus_export.parity.quality import built_variants

    fp8 = None if scales is None else dataclasses.replace(scales, keep=_keep_paths(keep))
    out = Path(tempfile.mkdtemp(prefix="probe-", dir=workdir)) / "bundle"
    export_bundle(checkpoint, out, ExportOptions(GraphPrecision(compute, fp8), resolutions=[PROBE_RESOLUTION], max_text_len=16))
    variants, _ = built_variants(out, None)
    report = check_parity(checkpoint, out, variants=variants, reference=reference)
    pooled = report.pooled["graph"]
    return Probe(keep, pooled["relative_error"], pooled["routing_agreement"])


def _shares(values: list[float]) -> list[float]:
    clipped = [max(v, 0.0) for v in values]
    total = sum(clipped)
    return [v / total if total > 0 else 0.0 for v in clipped]


def select_bf16_blocks(
    checkpoint: Checkpoint,
    scales: Fp8Scales,
    compute: str = "bf16",
    reference: torch.nn.Module | None = None,
    target: float = FP8_ERROR_TARGET,
) -> tuple[Fp8Scales, Sensitivity]:
    """Measure per-block FP8 sensitivity and keep the most sensitive blocks in `compute` (see module docstring).

    Returns:
        The scales with `keep` set and the measurements under calibration["sensitivity"], and the measurements.
    """
    from nucleus_export.model.reference import load_reference

    reference = reference if reference is not None else load_reference(checkpoint)
    blocks = list(range(checkpoint.config.num_layers))
    everything = tuple(blocks)
    with tempfile.TemporaryDirectory(prefix="nucleus-fp8-sensitivity-") as tmp:
        work = Path(tmp)
        bf16 = _probe(checkpoint, compute, None, (), reference, work)
        all_fp8 = _probe(checkpoint, compute, scales, (), reference, work)
        per_block = {
            b: _probe(checkpoint, compute, scales, tuple(x for x in everything if x != b), reference, work)
            for b in track(blocks, "FP8 sensitivity, one block at a time")
        }
        error_share = _shares([per_block[b].relative_error - bf16.relative_error for b in blocks])
        routing_share = _shares([bf16.routing_agreement - per_block[b].routing_agreement for b in blocks])
        score = {b: e + r for b, e, r in zip(blocks, error_share, routing_share)}
        ranking = sorted(blocks, key=lambda b: -score[b])
        chosen = all_fp8
        for count in range(1, math.ceil(len(blocks) / 2) + 1):
            if chosen.relative_error <= target * bf16.relative_error:
                break
            chosen = _probe(checkpoint, compute, scales, tuple(sorted(ranking[:count])), reference, work)
    sensitivity = Sensitivity(
        bf16, all_fp8, per_block, ranking, chosen, target, chosen.relative_error <= target * bf16.relative_error
    )
    calibration = {**scales.calibration, "sensitivity": sensitivity.to_dict()}
    return dataclasses.replace(scales, keep=_keep_paths(chosen.keep), calibration=calibration), sensitivity
