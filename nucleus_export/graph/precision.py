"""Graph precision: the GEMM compute dtype and an optional quantization recipe (how each GEMM computes, and its
scales).

A recipe maps GEMM module paths (or prefixes such as "transformer_blocks.4" for a whole block) to a
`nucleus_runtime.contract.GemmMode`, the longest matching prefix winning, with `default_mode` for the rest. A new mode
is a `GemmMode` member, its emission in graph/layers.py and its candidates in quant/sensitivity.py; costs/bundle_cost.py
prices every quantized GEMM at the FP8 peak, so a mode with another peak extends it there (docs/architecture.md).
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import ml_dtypes
import numpy as np
from nucleus_runtime.contract import COMPUTE_PRECISIONS, FP8_SCHEME, GemmMode, precision_label
from onnx import TensorProto

from nucleus_export.errors import NucleusExportError

COMPUTE_DTYPES: dict[str, tuple[int, np.dtype]] = {
    "fp32": (TensorProto.FLOAT, np.dtype(np.float32)),
    "bf16": (TensorProto.BFLOAT16, np.dtype(ml_dtypes.bfloat16)),
    "fp16": (TensorProto.FLOAT16, np.dtype(np.float16)),
}
assert tuple(COMPUTE_DTYPES) == COMPUTE_PRECISIONS

FP8_MAX = float(ml_dtypes.finfo(ml_dtypes.float8_e4m3fn).max)  # 448
RECIPE_FORMAT = "nucleus-fp8-scales/2"
# Written before per-GEMM modes had a map of their own: `keep` (compute) and `weight_only` (FP8 weights) lists.
_RECIPE_FORMAT_1 = "nucleus-fp8-scales/1"


@dataclasses.dataclass(frozen=True)
class QuantRecipe:
    """How each quantizable GEMM computes, and the calibrated per-tensor activation amax of each quantized GEMM input
    (keyed by the GEMM's module path, e.g. "transformer_blocks.3.attn.to_q",
    "transformer_blocks.3.img_mlp.experts.down_proj").

    Attributes:
        activation_amax: module path -> largest |x| entering it along calibration runs.
        modes: module path or prefix -> mode; the longest matching path wins.
        default_mode: the mode of every GEMM no path in `modes` covers.
        calibration: how the amax were measured (and, when chosen by measurement, the measurements).
    """

    activation_amax: dict[str, float]
    modes: dict[str, GemmMode] = dataclasses.field(default_factory=dict)
    default_mode: GemmMode = GemmMode.FP8
    calibration: dict = dataclasses.field(default_factory=dict)

    def mode(self, gemm: str) -> GemmMode:
        covering = [p for p in self.modes if gemm == p or gemm.startswith(p + ".")]
        return self.modes[max(covering, key=len)] if covering else self.default_mode

    def activation_scale(self, gemm: str) -> float:
        if gemm not in self.activation_amax:
            raise NucleusExportError(
                f"the quantization recipe has no calibration entry for '{gemm}'.",
                "recalibrate (drop --fp8-scales) for this checkpoint; the recipe file belongs to another model.",
            )
        return max(self.activation_amax[gemm], 1e-12) / FP8_MAX

    def with_modes(self, modes: dict[str, GemmMode]) -> QuantRecipe:
        return dataclasses.replace(self, modes=dict(modes))

    def merge(self, other: QuantRecipe) -> QuantRecipe:
        """One recipe with both recipes' activation amax and calibration records (for GEMMs of different models:
        the transformer's and the text encoder's); this recipe's modes and default mode are kept."""
        overlap = sorted(set(self.activation_amax) & set(other.activation_amax))
        if overlap:
            raise NucleusExportError(f"two quantization recipes both calibrate {overlap[0]}.", "report this as a bug.")
        return dataclasses.replace(self, activation_amax={**self.activation_amax, **other.activation_amax},
                                   calibration={**self.calibration, **other.calibration})

    def to_json(self) -> str:
        return json.dumps(
            {
                "format": RECIPE_FORMAT,
                "activation_amax": self.activation_amax,
                "default_mode": self.default_mode.value,
                "modes": {k: v.value for k, v in self.modes.items()},
                "calibration": self.calibration,
            },
            indent=2,
            sort_keys=True,
        )

    @classmethod
    def load(cls, path: Path) -> QuantRecipe:
        try:
            raw = json.loads(Path(path).read_text())
            amax = {k: float(v) for k, v in raw["activation_amax"].items()}
            if raw.get("format", _RECIPE_FORMAT_1) == _RECIPE_FORMAT_1:
                keep = [str(k) for k in raw.get("keep", [])]
                # Format 1: `keep` won over `weight_only` whatever their lengths.
                modes = {str(k): GemmMode.FP8_WEIGHTS for k in raw.get("weight_only", [])
                         if not any(str(k) == p or str(k).startswith(p + ".") for p in keep)}
                modes.update(dict.fromkeys(keep, GemmMode.COMPUTE))
                return cls(amax, modes, GemmMode.FP8, raw.get("calibration", {}))
            modes = {str(k): GemmMode(v) for k, v in raw.get("modes", {}).items()}
            return cls(amax, modes, GemmMode(raw.get("default_mode", GemmMode.FP8.value)), raw.get("calibration", {}))
        except (OSError, json.JSONDecodeError, KeyError, TypeError, ValueError) as exc:
            raise NucleusExportError(f"cannot read the quantization recipe {path} ({exc}).", "recalibrate without --fp8-scales.") from None


@dataclasses.dataclass(frozen=True)
class GraphPrecision:
    """How a graph computes: `compute` for GEMMs and the stream between them; norms, softmax, router and RoPE are
    always float32. With a `recipe`, the quantizable GEMMs compute as its modes say."""

    compute: str = "fp32"
    recipe: QuantRecipe | None = None

    def __post_init__(self) -> None:
        if self.compute not in COMPUTE_DTYPES:
            raise NucleusExportError(f"unknown precision '{self.compute}'.", f"use one of {', '.join(COMPUTE_DTYPES)}.")

    @property
    def onnx_type(self) -> int:
        return COMPUTE_DTYPES[self.compute][0]

    @property
    def np_dtype(self) -> np.dtype:
        return COMPUTE_DTYPES[self.compute][1]

    @property
    def scheme(self) -> str | None:
        """The quantization scheme a manifest records (None: not quantized)."""
        return FP8_SCHEME if self.recipe is not None else None

    @property
    def exact(self) -> bool:
        """float32 without quantization: held to the exact parity gate instead of diffusers-bf16's."""
        return self.compute == "fp32" and self.recipe is None

    def gemm_mode(self, gemm: str) -> GemmMode:
        """How the GEMM at this module path computes (COMPUTE without a recipe)."""
        return GemmMode.COMPUTE if self.recipe is None else self.recipe.mode(gemm)

    def unquantized(self) -> GraphPrecision:
        return GraphPrecision(self.compute)

    @property
    def label(self) -> str:
        return precision_label(self.compute, self.scheme)


def quantize_per_channel(weight: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """E4M3 weights with one scale per output channel (last axis), per expert for 3-D [E, in, out] weights.

    Returns (fp8 weight, float32 scales of shape weight.shape without the input axis).
    Packed expert weights are quantized one expert at a time (the scales are per expert anyway): float32
    temporaries of one expert, not of all 64 (measured: the FP8 export of a real-size MoE block peaked at 4.3 GB)."""
    if weight.ndim == 3:
        quantized = np.empty(weight.shape, dtype=ml_dtypes.float8_e4m3fn)
        scales = np.empty((weight.shape[0], weight.shape[2]), dtype=np.float32)
        for e in range(weight.shape[0]):
            quantized[e], scales[e] = quantize_per_channel(weight[e])
        return quantized, scales
    w = weight.astype(np.float32)
    amax = np.abs(w).max(axis=-2)
    scales = np.maximum(amax, 1e-12) / FP8_MAX
    quantized = (w / np.expand_dims(scales, -2)).astype(ml_dtypes.float8_e4m3fn)
    return quantized, scales.astype(np.float32)
