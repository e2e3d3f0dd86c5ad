"""What `inspect --bundle` reports: every stage with its profiles, precision, files and engines, the text encoder's
and the VAE decoder's costs from their configs; per served resolution, the denoiser step's FLOPs and bytes as built,
by op class, next to the model's intrinsic FLOPs, a roofline time on a named GPU, and the layers TensorRT parses."""

from __future__ import annotations

import dataclasses
import importlib.util
import logging
from pathlib import Path
from typing import Any

import onnx
from nucleus_runtime.backends.onnxruntime import OrtBackend
from nucleus_runtime.backends.tensorrt import TensorRTBackend
from nucleus_runtime.bundle import LoweringRecord, Manifest, load_manifest
from nucleus_runtime.contract import (
    AUTO,
    DENOISER_GRAPH,
    FP8_SCHEME,
    MOE_NATIVE,
    MOE_PLUGIN,
    SCHEME_SUFFIXES,
    TENSORRT,
    TENSORRT_MODULES,
    TEXT_ENCODER_GRAPH,
    VAE_DECODER_GRAPH,
    engine_onnx_file,
    onnx_file,
    plan_file,
)

from nucleus_export.costs.combine import combine_choice
from nucleus_export.costs.flops import (
    CLASSES,
    GEMM_CLASSES,
    graph_cost,
    intrinsic_flops,
)
from nucleus_export.costs.roofline import GPUS, Cost, Gpu
from nucleus_export.costs.text_encoder import text_encoder_cost
from nucleus_export.costs.vae_decoder import vae_decoder_cost
from nucleus_export.engines.profiles import dim_ranges_from_manifest, profile_shapes
from nucleus_export.errors import NucleusExportError
from nucleus_export.model.checkpoint import expected_parameter_shapes
from nucleus_export.model.config import ModelConfig
from nucleus_export.model.text_encoder import TextEncoderConfig
from nucleus_export.model.vae import VaeConfig
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
class StageUnit:
    """One engine unit of a stage (the stage, or a segment of layers [first, last)) and its plan, if built."""

    name: str
    layers: tuple[int, int] | None
    plan_bytes: int | None
    flavor: str | None


@dataclasses.dataclass
class StageCostRow:
    """One call of a stage in a given case (a served resolution, a prompt length): FLOPs, bytes, roofline time."""

    case: str
    flops: float
    weight_bytes: float
    bytes: float
    seconds: float


@dataclasses.dataclass
class StageReport:
    """A stage as the bundle holds it.

    Attributes:
        profiles: per graph input, its [min, opt, max] shapes as the engines are (or would be) built.
        onnx_bytes / engine_bytes: what ONNX Runtime / TensorRT read to load the stage (Backend.stage_bytes; None
            without engines).
        costs: per served resolution (VAE decoder) or prompt case (text encoder), from the stage's own config.
    """

    name: str
    precision: str
    files: list[str]
    onnx_bytes: int
    engine_bytes: int | None
    units: list[StageUnit]
    profiles: dict[str, list[list[int]]]
    costs: list[StageCostRow]


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
    stages: list[StageReport] = dataclasses.field(default_factory=list)

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
        stage_reports(manifest, target),
    )


def stage_reports(manifest: Manifest, gpu: Gpu) -> list[StageReport]:
    """Every stage of the bundle, in execution order (StageReport), from the manifest alone."""
    ranges = dim_ranges_from_manifest(manifest)
    built = bool(manifest.engine_flavors)
    reports = []
    for graph in manifest.stage_names:
        stage = manifest.stages[graph]
        units = [StageUnit(seg.name, seg.blocks, None, None) for seg in stage.segments] or [StageUnit(graph, None, None, None)]
        for unit in units:
            record = manifest.engine(unit.name)
            unit.flavor = record.flavor if record is not None else None
            unit.plan_bytes = manifest.files[plan_file(unit.name)].bytes if plan_file(unit.name) in manifest.files else None
        shapes = profile_shapes({name: spec.shape for name, spec in stage.io.inputs.items()}, ranges)
        reports.append(StageReport(
            name=graph,
            precision=manifest.stage_precision(graph),
            files=OrtBackend.stage_files(manifest, graph),
            onnx_bytes=OrtBackend.stage_bytes(manifest, graph),
            engine_bytes=TensorRTBackend.stage_bytes(manifest, graph) if built else None,
            units=units,
            profiles={name: [list(s) for s in triple] for name, triple in shapes.items()},
            costs=_stage_costs(manifest, graph, gpu),
        ))
    return reports


def _stage_costs(manifest: Manifest, graph: str, gpu: Gpu) -> list[StageCostRow]:
    """The text encoder per prompt (the template prefix once, then prompts with it cached, and the longest prompt
    without it) and the VAE decoder per served resolution, batch 1, in the stage's precision; [] for the
    transformer's stages (the denoiser has its own report) and for bundles that did not record the stage's config."""
    stage = manifest.stages[graph]
    raw = stage.config.get("model_config")
    precision = manifest.stage_precision(graph)
    compute_bytes = 4 if precision.startswith("fp32") else 2
    fp8 = precision.endswith(SCHEME_SUFFIXES[FP8_SCHEME])
    rows = []
    if graph == TEXT_ENCODER_GRAPH and raw is not None:
        config = TextEncoderConfig.from_fields(raw)
        prefix = int(stage.config.get("prefix_tokens", 0))
        _, opt, longest = manifest.profiles.text_len
        cases = [(f"template prefix, {prefix} tokens (once)", prefix, 0)] if prefix else []
        cases += [(f"{t} tokens ({t - prefix} new), prefix cached", t - prefix, prefix) for t in (opt, longest) if t > prefix]
        cases.append((f"{longest} tokens, no cache", longest, 0))
        for case, text_len, past_len in cases:
            cost = text_encoder_cost(config, text_len, past_len, 1, compute_bytes, fp8)
            rows.append(StageCostRow(case, cost.flops, cost.weight_bytes, cost.bytes, cost.seconds(gpu, fp8)))
    elif graph == VAE_DECODER_GRAPH and raw is not None:
        config = VaeConfig.from_dict(raw, source=f"manifest stages.{graph}.config.model_config")
        form = stage.config.get("form", "2d")
        for height, width in manifest.profiles.resolutions:
            cost = vae_decoder_cost(config, height, width, 1, form, compute_bytes)
            rows.append(StageCostRow(f"{height}x{width}", cost.flops, cost.weight_bytes, cost.bytes,
                                     Cost(cost.flops, cost.bytes).seconds(gpu)))
    return rows
