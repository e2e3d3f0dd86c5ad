"""Graph precision: the GEMM compute dtype and optional FP8 (E4M3) quantization with its scales."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import ml_dtypes
import numpy as np
from nucleus_runtime.contract import precision_label
from onnx import TensorProto

from nucleus_export.errors import NucleusExportError

COMPUTE_DTYPES: dict[str, tuple[int, np.dtype]] = {
    "fp32": (TensorProto.FLOAT, np.dtype(np.float32)),
    "bf16": (TensorProto.BFLOAT16, np.dtype(ml_dtypes.bfloat16)),
    "fp16": (TensorProto.FLOAT16, np.dtype(np.float16)),
}

FP8_MAX = float(ml_dtypes.finfo(ml_dtypes.float8_e4m3fn).max)  # 448


# How one GEMM computes in an FP8 build (Fp8Scales.mode):
FP8 = "fp8"  # E4M3 weights (per-channel scales) and E4M3 activations (per-tensor scale): W8A8
FP8_WEIGHTS = "fp8-weights"  # E4M3 weights, activations in the compute precision: W8A16, weight bytes halved
COMPUTE = "compute"  # weights and activations in the compute precision (bf16)


@dataclasses.dataclass(frozen=True)
class Fp8Scales:
    """Per-tensor activation amax for each quantized GEMM input, keyed by the GEMM's module path
    (e.g. "transformer_blocks.3.attn.to_q", "transformer_blocks.3.img_mlp.experts.down_proj"), and how each GEMM
    computes: module paths (a GEMM, or a prefix such as "transformer_blocks.4" for a whole block) that stay in the
    compute precision (`keep`) or get FP8 weights only (`weight_only`); every other GEMM is W8A8. Both are chosen by
    nucleus_export.quant.sensitivity; scales files written before `weight_only` existed load with it empty."""

    activation_amax: dict[str, float]
    calibration: dict = dataclasses.field(default_factory=dict)
    keep: tuple[str, ...] = ()
    weight_only: tuple[str, ...] = ()

    def mode(self, gemm: str) -> str:
        """FP8, FP8_WEIGHTS or COMPUTE for the GEMM at this module path (`keep` wins over `weight_only`)."""
        if _covered(gemm, self.keep):
            return COMPUTE
        return FP8_WEIGHTS if _covered(gemm, self.weight_only) else FP8

    def activation_scale(self, gemm: str) -> float:
        if gemm not in self.activation_amax:
            raise NucleusExportError(
                f"FP8 scales have no calibration entry for '{gemm}'.",
                "recalibrate (drop --fp8-scales) for this checkpoint; the scales file belongs to another model.",
            )
        return max(self.activation_amax[gemm], 1e-12) / FP8_MAX

    def to_json(self) -> str:
        return json.dumps(
            {
                "format": "nucleus-fp8-scales/1",
                "activation_amax": self.activation_amax,
                "keep": list(self.keep),
                "weight_only": list(self.weight_only),
                "calibration": self.calibration,
            },
            indent=2,
            sort_keys=True,
        )

    @classmethod
    def load(cls, path: Path) -> Fp8Scales:
        try:
            raw = json.loads(Path(path).read_text())
            return cls(
                {k: float(v) for k, v in raw["activation_amax"].items()},
                raw.get("calibration", {}),
                tuple(str(k) for k in raw.get("keep", [])),
                tuple(str(k) for k in raw.get("weight_only", [])),
            )
        except (OSError, json.JSONDecodeError, KeyError, TypeError, ValueError) as exc:
            raise NucleusExportError(f"cannot read FP8 scales from {path} ({exc}).", "recalibrate without --fp8-scales.") from None


def _covered(gemm: str, paths: tuple[str, ...]) -> bool:
    return any(gemm == p or gemm.startswith(p + ".") for p in paths)


@dataclasses.dataclass(frozen=True)
class GraphPrecision:
    """How a graph computes: `compute` for GEMMs and the stream between them; norms, softmax, router and RoPE are
    always float32. With `fp8`, attention, dense MLP and expert GEMMs get E4M3 Q/DQ as `fp8.mode` says."""

    compute: str = "fp32"
    fp8: Fp8Scales | None = None

    def __post_init__(self) -> None:
        if self.compute not in COMPUTE_DTYPES:
            raise NucleusExportError(f"unknown precision '{self.compute}'.", f"use one of {', '.join(COMPUTE_DTYPES)}.")

    @property
    def onnx_type(self) -> int:
        return COMPUTE_DTYPES[self.compute][0]

    @property
    def np_dtype(self) -> np.dtype:
        return COMPUTE_DTYPES[self.compute][1]

    def gemm_mode(self, gemm: str) -> str:
        """How the GEMM at this module path computes (FP8, FP8_WEIGHTS or COMPUTE; COMPUTE without FP8)."""
        return COMPUTE if self.fp8 is None else self.fp8.mode(gemm)

    @property
    def label(self) -> str:
        return precision_label(self.compute, self.fp8)


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
