"""How one output compares with the reference's, and one case's comparisons: what every parity report pools."""

from __future__ import annotations

import dataclasses

import numpy as np

from nucleus_export.parity.cases import ParityCase
from nucleus_export.parity.images import ImageDecoder, psnr_of_mse, ssim, x0_estimate
from nucleus_export.parity.routing import LayerRouting

# The sides every report compares with diffusers float32: the graph (or engines) under test, and diffusers in bf16.
GRAPH_LABEL = "graph"
BASELINE_LABEL = "diffusers bf16"


@dataclasses.dataclass
class Comparison:
    max_abs_error: float
    relative_error: float
    cosine: float
    # Norms, so comparisons pool over cases exactly (relative error and cosine of all cases' outputs together).
    actual_norm: float = 0.0
    expected_norm: float = 0.0

    @classmethod
    def of(cls, actual: np.ndarray, expected: np.ndarray) -> Comparison:
        a, e = actual.astype(np.float64).ravel(), expected.astype(np.float64).ravel()
        diff = a - e
        norm_e, norm_a = float(np.linalg.norm(e)), float(np.linalg.norm(a))
        return cls(
            max_abs_error=float(np.abs(diff).max()) if diff.size else 0.0,
            relative_error=float(np.linalg.norm(diff) / max(norm_e, 1e-30)),
            cosine=float(a @ e / max(norm_a * norm_e, 1e-30)),
            actual_norm=norm_a,
            expected_norm=norm_e,
        )

    @staticmethod
    def pooled(parts: list[Comparison]) -> dict[str, float]:
        """Relative error and cosine of the concatenation of all parts."""
        sq_e = sum(p.expected_norm**2 for p in parts)
        sq_diff = sum((p.relative_error * p.expected_norm) ** 2 for p in parts)
        dot = sum(p.cosine * p.actual_norm * p.expected_norm for p in parts)
        sq_a = sum(p.actual_norm**2 for p in parts)
        return {
            "relative_error": float(np.sqrt(sq_diff / max(sq_e, 1e-30))),
            "cosine": float(dot / max(np.sqrt(sq_a * sq_e), 1e-30)),
        }


@dataclasses.dataclass
class ImageScore:
    """Decoded 8-bit images [B, H, W, 3] of one side against float32's (parity.images): PSNR in dB (None: identical)
    and mean SSIM, with what pools them over cases exactly."""

    psnr: float | None
    ssim: float
    mse: float  # in levels squared
    values: int  # pixel values compared

    @classmethod
    def of(cls, image: np.ndarray, reference: np.ndarray) -> ImageScore:
        mse = float(np.mean((image.astype(np.float64) - reference.astype(np.float64)) ** 2))
        channels_first = (np.moveaxis(x, -1, -3) for x in (image, reference))
        return cls(psnr_of_mse(mse), ssim(*channels_first), mse, int(image.size))

    @staticmethod
    def pooled(parts: list[ImageScore]) -> dict[str, float | None]:
        """PSNR of all parts' pixels together, and SSIM averaged over them."""
        values = sum(p.values for p in parts)
        return {
            "psnr": psnr_of_mse(sum(p.mse * p.values for p in parts) / values),
            "ssim": float(sum(p.ssim * p.values for p in parts) / values),
        }


@dataclasses.dataclass
class SegmentComparison:
    """One engine segment's output (the residual stream after its last block; the sample for the last segment)
    against diffusers float32 at the same point: with the segments run in sequence up to it, and with it run alone
    on float32's residual stream entering it (what places an error in one segment rather than upstream)."""

    name: str
    blocks: tuple[int, int]  # [first, last)
    in_sequence: Comparison
    alone: Comparison


@dataclasses.dataclass
class CaseResult:
    name: str
    text_kv: Comparison
    sample: Comparison  # end to end
    forced: Comparison  # with the reference's routing forced
    routing: dict[str, LayerRouting]
    baseline: Comparison | None = None  # diffusers bf16 against the same float32 truth
    baseline_routing: dict[str, float] | None = None
    images: dict[str, ImageScore] | None = None  # per side (GRAPH_LABEL, BASELINE_LABEL), when a decoder ran
    segments: list[SegmentComparison] | None = None  # per engine segment (`check --backend` on a cut denoiser)

    @property
    def routing_agreed(self) -> bool:
        return all(r.flips == 0 and r.agreement == 1.0 for r in self.routing.values())


def case_image_scores(decode: ImageDecoder, batch: ParityCase, rows: list[slice], truth: np.ndarray,
                      sides: dict[str, np.ndarray]) -> list[dict[str, ImageScore]]:
    """Each side's decoded x0 estimate against float32 truth's, per case (`rows` of the stacked `batch`)."""

    def images(output: np.ndarray) -> np.ndarray:
        return decode(x0_estimate(batch.hidden_states, output, batch.timestep), batch.grid)

    reference = images(truth)
    decoded = {label: images(output) for label, output in sides.items()}
    return [{label: ImageScore.of(image[r], reference[r]) for label, image in decoded.items()} for r in rows]
