"""How one output compares with the reference's, and one case's comparisons: what every parity report pools."""

from __future__ import annotations

import dataclasses

import numpy as np

from nucleus_export.parity.routing import LayerRouting


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
class CaseResult:
    name: str
    text_kv: Comparison
    sample: Comparison  # end to end
    forced: Comparison  # with the reference's routing forced
    routing: dict[str, LayerRouting]
    baseline: Comparison | None = None  # diffusers bf16 against the same float32 truth
    baseline_routing: dict[str, float] | None = None

    @property
    def routing_agreed(self) -> bool:
        return all(r.flips == 0 and r.agreement == 1.0 for r in self.routing.values())
