"""What `inspect --bundle` reports: per served resolution, the denoiser step's FLOPs and bytes as built, by op
class, next to the model's intrinsic FLOPs, a roofline time on a named GPU, and the layers TensorRT parses."""

from __future__ import annotations

import dataclasses
import importlib.util
import logging
from pathlib import Path
from typing import Any

import onnx
from nucleus_runtime.bundle import LoweringRecord, Manifest, load_manifest
from nucleus_runtime.contract import (
    AUTO,
    DENOISER_GRAPH,
    MOE_NATIVE,
    MOE_PLUGIN,
    TENSORRT,
    TENSORRT_MODULES,
    engine_onnx_file,
    onnx_file,
)

from nucleus_export.costs.combine import combine_choice
from nucleus_export.costs.flops import (
    CLASSES,
    GEMM_CLASSES,
    graph_cost,
    intrinsic_flops,
)
from nucleus_export.costs.roofline import GPUS, Cost
from nucleus_export.errors import NucleusExportError
from nucleus_export.model.checkpoint import expected_parameter_shapes
from nucleus_export.model.config import ModelConfig
from nucleus_export.rewrites.as_built import engine_graph

logger = logging.getLogger("nucleus_export")

# GEMMs that get E4M3 Q/DQ with --fp8 (graph/layers.py); attention, router and combine stay in the compute dtype.
FP8_CLASSES = ("projections", "dense and shared MLP", "routed experts")


@dataclasses.dataclass
class ClassRow:
    """One op class at one resolution: built GEMM/attention FLOPs, other FLOPs, bytes, intrinsic FLOPs, roofline s."""

    name: str
    gemm_flops: float
    other_flops: float
    bytes: float
    intrinsic_flops: float
    seconds: float


@dataclasses.dataclass
class ResolutionCost:
    resolution: tuple[int, int]
    tokens: int
    batch: int
    text_len: int
    rows: list[ClassRow]
    gemm_ratio: float  # built GEMM + attention FLOPs / intrinsic
    combine_share: float  # combine FLOPs / all built FLOPs
    compute_floor_seconds: float  # intrinsic FLOPs at the dense peak
    roofline_seconds: float


@dataclasses.dataclass
class BundleCost:
    bundle: str
    gpu: str
    gpu_source: str
    precision: str
    combine: str
    engine_onnx: str
    resolutions: list[ResolutionCost]
    tensorrt_layers: dict[str, int] | None
    fused_attention_layers: int | None
    blocks: int
    notes: list[str]

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _counted_graph(bundle: Path, manifest: Manifest) -> tuple[onnx.ModelProto, str, Path | None]:
    """The denoiser as its engine computes it (rewrites.as_built), with the combine it was built with; plugin
    engines and ONNX-only bundles are counted with the native lowering `build` would choose. Also the engine ONNX
    TensorRT parsed, when the denoiser is one built engine."""
    config = ModelConfig.from_dict(manifest.model_config)
    records = [manifest.engine(u) for u in manifest.units(DENOISER_GRAPH)]
    built = [r.lowering for r in records if r is not None and r.lowering.moe == MOE_NATIVE]
    lowering = built[0] if built else LoweringRecord(
        MOE_NATIVE, combine_choice(config, manifest.profiles, manifest.precision, AUTO, TENSORRT).formulation
    )
    model = engine_graph(onnx.load(str(bundle / onnx_file(DENOISER_GRAPH)), load_external_data=False), lowering, config.num_experts)
    parsed = bundle / engine_onnx_file(DENOISER_GRAPH)
    return model, str(lowering.combine), parsed if records[0] is not None and parsed.is_file() else None


def _input_shapes(model: onnx.ModelProto, sizes: dict[str, int]) -> dict[str, list[int]]:
    return {
        v.name: [sizes[d.dim_param] if d.dim_param else d.dim_value for d in v.type.tensor_type.shape.dim]
        for v in model.graph.input
    }


def tensorrt_layers(path: Path) -> dict[str, int] | None:
    """Layer types of the parsed network, with whichever TensorRT is importable (None without one)."""
    from nucleus_export.engines.flavors import resolve_flavor
    from nucleus_export.engines.inspection import inspect_network
    from nucleus_export.engines.loaders import NetworkFromOnnxPath

    for name, module in TENSORRT_MODULES.items():
        if importlib.util.find_spec(module) is None:
            continue
        try:
            flavor = resolve_flavor(name)  # full TensorRT refuses without a GPU: then try TensorRT-RTX
        except NucleusExportError:
            continue
        try:
            parsed = NetworkFromOnnxPath(flavor, path)()
        except NucleusExportError as exc:  # reported, not fatal, for an inspection
            logger.warning("%s could not parse %s: %s", name, path, exc)
            return None
        return inspect_network(parsed.network).layer_types
    return None


def bundle_cost(bundle: Path, gpu: str = "h100", parse: bool = True) -> BundleCost:
    """Cost report of a bundle's denoiser at every served resolution (batch = the profile's largest, text = its opt).

    Raises:
        NucleusExportError: unknown GPU name.
    """
    if gpu not in GPUS:
        raise NucleusExportError(f"unknown GPU '{gpu}'.", f"use one of {', '.join(GPUS)}.")
    target = GPUS[gpu]
    manifest = load_manifest(bundle)
    config = ModelConfig.from_dict(manifest.model_config)
    shapes = expected_parameter_shapes(config)
    model, combine, path = _counted_graph(bundle, manifest)
    description = path.name if path is not None else f"{onnx_file(DENOISER_GRAPH)} lowered as `build` would"
    fp8 = manifest.quantization is not None
    batch, text_len = manifest.profiles.batch[2], manifest.profiles.text_len[1]
    results = []
    for resolution, (rows, cols) in zip(manifest.profiles.resolutions, manifest.profiles.grids):
        tokens = rows * cols
        sizes = {"batch": batch, "image_tokens": tokens, "text_len": text_len}
        built = graph_cost(model, _input_shapes(model, sizes))
        intrinsic = intrinsic_flops(config, shapes, batch, tokens, text_len)
        class_rows = []
        for name in CLASSES:
            c = built[name]
            seconds = Cost(c.gemm_flops + c.other_flops, c.bytes).seconds(target, fp8 and name in FP8_CLASSES)
            class_rows.append(ClassRow(name, c.gemm_flops, c.other_flops, c.bytes, intrinsic[name], seconds))
        total_flops = sum(r.gemm_flops + r.other_flops for r in class_rows)
        gemm = sum(r.gemm_flops for r in class_rows if r.name in GEMM_CLASSES)
        wanted = sum(intrinsic.values())
        floor = sum(Cost(intrinsic[n]).seconds(target, fp8 and n in FP8_CLASSES) for n in CLASSES)
        results.append(ResolutionCost(
            tuple(resolution), tokens, batch, text_len, class_rows, gemm / wanted,
            (built["combine"].gemm_flops + built["combine"].other_flops) / total_flops,
            floor, sum(r.seconds for r in class_rows),
        ))
    layers = tensorrt_layers(path) if parse and path is not None else None
    notes = []
    if path is None:
        notes.append("no engine ONNX in the bundle: costs are of the graph `build` would make; TensorRT layers need a built bundle")
    if any(r is not None and r.lowering.moe == MOE_PLUGIN for r in map(manifest.engine, manifest.units(DENOISER_GRAPH))):
        notes.append("engines use the MoE plugins: router and combine are counted in their native lowering")
    return BundleCost(
        str(bundle), target.name, target.source, manifest.precision_label, combine, description,
        results, layers, None if layers is None else layers.get("ATTENTION_INPUT", 0), config.num_layers, notes,
    )
