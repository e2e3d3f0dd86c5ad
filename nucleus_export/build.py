"""Build orchestration: export a bundle, cut the denoiser and the text encoder to the memory budget, build one engine
per unit of every stage, copy the plugin library, run the quality report, and record everything in the manifest.

Everything is written into a temporary sibling folder (nucleus_runtime.atomic.atomic_dir) and renamed into place at
the end, so a failed or interrupted build never leaves a half bundle behind. `plan_build` runs every check that needs
no export first (flavor, plugins, TensorRT's limits, the profiles), once per build.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import time
from pathlib import Path
from typing import TYPE_CHECKING

import onnx
from nucleus_runtime import contract
from nucleus_runtime.atomic import atomic_dir, write_atomic
from nucleus_runtime.bundle import EngineRecord, LoweringRecord, Manifest, PluginRecord, sha256_file
from nucleus_runtime.contract import (
    BUILD_LOG_NAME,
    DENOISER_GRAPH,
    GRAPHS,
    MANIFEST_NAME,
    MOE_NATIVE,
    MOE_PLUGIN,
    PLUGIN_LIBRARY_PATH,
    SEGMENT_SLICED_INPUTS,
    TENSORRT_RTX,
    graph_of_unit,
)

from nucleus_export.costs.build_memory import available_memory, plan_build_memory
from nucleus_export.costs.combine import CombineChoice, combine_choice
from nucleus_export.engines.flavors import TensorRTFlavor, resolve_flavor
from nucleus_export.engines.inspection import NetworkReport
from nucleus_export.engines.loaders import BuildReport, BuildSettings, EngineFromOnnx, NetworkFromOnnxPath
from nucleus_export.engines.plugins import load_plugins
from nucleus_export.engines.profiles import (
    check_profile_limits,
    check_vae_limits,
    dim_ranges_from_manifest,
    onnx_input_shapes,
    profile_shapes,
)
from nucleus_export.errors import NucleusExportError, UsageError
from nucleus_export.export import ExportOptions, ExportPlan, plan_export, refuse_existing, write_graphs, write_manifest, write_segments
from nucleus_export.graph.identity import record_bundle
from nucleus_export.log import PhaseProgress, console, logger
from nucleus_export.model.checkpoint import Checkpoint
from nucleus_export.rewrites.as_built import engine_graph
from nucleus_export.rewrites.segments import block_outputs, block_weight_bytes, segment_groups

if TYPE_CHECKING:  # parity imports torch; the build imports it only when a quality report runs
    from nucleus_export.parity.check import ParityReport

# TensorRT-RTX's default targets when none are set (docs: "CPU-Only AOT and TensorRT-RTX Engines").
RTX_DEFAULT_TARGETS = ["SM80", "SM86", "SM89", "SM120"]


@dataclasses.dataclass
class BuildOptions:
    """What `build` does beyond the export.

    Attributes:
        flavor: "auto", "tensorrt" or "tensorrt-rtx" (`--backend`).
        moe: "native" (rewrite to native layers) or "plugin" (keep the custom nodes for the plugin library).
        plugin_library: the plugin library; required for moe == "plugin".
        timing_cache: timing-cache file, read and updated (full TensorRT).
        compute_capabilities: TensorRT-RTX targets ("SM89", ...); None for its portable default.
        optimization_level: builder optimization level; None for the default.
        quality: run the CPU quality report (parity.json).
        combine: native MoE combine formulation: "auto" (costs/combine.py chooses per profile), "onehot" or "chain".
        quality_cases: its case set: "quick" (the optimization resolution, the default) or "full" (every served resolution).
        image_scores: the report also decodes each case's x0 estimate with the pipeline's VAE (PSNR, SSIM).
        segments: cut the denoiser into this many engines of consecutive blocks (None: as --max-build-memory needs).
        max_build_memory: host memory the build may use, in bytes (None: what is available when the build starts);
            picks the segmentation of the denoiser (without --segments) and of the text encoder through the measured
            model in costs/build_memory.py.
        strip_weights: weight-stripped plans, refit at load from the engine ONNX they were built from (kept in the
            bundle; it references the same external data as the exported graph).
        weight_streaming: build engines whose weights a runtime may stream (`run --weight-streaming-budget`).
    """

    flavor: str = contract.AUTO
    moe: str = MOE_NATIVE
    plugin_library: Path | None = None
    timing_cache: Path | None = None
    compute_capabilities: list[str] | None = None
    optimization_level: int | None = None
    quality: bool = True
    combine: str = contract.AUTO
    quality_cases: str = "quick"
    image_scores: bool = True
    segments: int | None = None
    max_build_memory: int | None = None
    strip_weights: bool = False
    weight_streaming: bool = False


def validate_moe_options(moe: str | None, plugin_library: Path | None) -> str:
    """Resolve --moe against --plugins: native is the default without a library, plugin needs one."""
    if moe is None:
        return MOE_PLUGIN if plugin_library is not None else MOE_NATIVE
    if moe not in contract.MOE_LOWERINGS:
        raise UsageError(f"unknown MoE lowering '{moe}'.", "use --moe native or --moe plugin.")
    if moe == MOE_PLUGIN and plugin_library is None:
        raise UsageError(
            "--moe plugin needs the plugin library that implements the nucleus ops.",
            "pass --plugins path/to/libnucleus_trt_plugins.so (build it from plugins/), or use --moe native.",
        )
    if moe == MOE_NATIVE and plugin_library is not None:
        raise UsageError("--plugins was given with --moe native, which uses no plugins.", "drop one of them.")
    return moe


def check_moe_flavor(moe: str, flavor: str) -> None:
    """Refuse --moe plugin with TensorRT-RTX: its 1.7 builder aborts the whole process ("terminate called without
    an active exception") as soon as the ONNX parser adds a plugin layer, with any IPluginV3, a minimal identity
    plugin included, and its Python network API has no add_plugin_v3 (engines/README-facts.md)."""
    if moe == MOE_PLUGIN and flavor == TENSORRT_RTX:
        raise NucleusExportError(
            "TensorRT-RTX 1.7 cannot build networks with plugin layers (adding an IPluginV3 layer aborts the process), "
            "so --moe plugin needs full TensorRT.",
            "build with --moe native (the default) for tensorrt-rtx, or use --backend tensorrt on a GPU machine.",
        )


@dataclasses.dataclass(frozen=True)
class BuildPlan:
    """What a build is checked against before any work: the resolved flavor, the export's layout and profiles, and
    how the engines compute the MoE ops (with the combine choice's reasoning, for the build log)."""

    flavor: TensorRTFlavor
    export: ExportPlan
    lowering: LoweringRecord
    combine: CombineChoice | None


def plan_build(checkpoint: Checkpoint, export_options: ExportOptions, options: BuildOptions) -> BuildPlan:
    """Resolve the flavor and refuse what it cannot build (plugins on TensorRT-RTX, stripped plans without a GPU,
    profiles over TensorRT's limits), in a second and before export or calibration. Run once per build."""
    flavor = resolve_flavor(options.flavor)
    check_moe_flavor(options.moe, flavor.name)
    if options.strip_weights and flavor.name == TENSORRT_RTX and not _gpu_present():
        # Measured with tensorrt-rtx 1.7.1 on a CPU-only machine: any REFIT / REFIT_IDENTICAL / STRIP_PLAN build
        # fails inside Myelin with "CUDA driver version is insufficient", while plain builds work.
        raise NucleusExportError(
            "tensorrt-rtx cannot build weight-stripped (refittable) engines without a GPU.",
            "build with --strip-weights on a machine with an NVIDIA GPU, or drop --strip-weights.",
        )
    export = plan_export(checkpoint, export_options)
    compute = export_options.precision.compute
    combine = None
    if options.moe == MOE_NATIVE:
        combine = combine_choice(checkpoint.config, export.profiles, compute, options.combine, flavor.name)
    check_profile_limits(checkpoint.config, export.profiles, compute == "fp32", combine and combine.formulation)
    if export.components.vae is not None:
        check_vae_limits(export.profiles, export.components.vae.config.scale_factor)
    lowering = LoweringRecord(options.moe, combine.formulation if combine else None)
    return BuildPlan(flavor, export, lowering, combine)


def _gpu_present() -> bool:
    from nucleus_runtime.gpu import cuda_device_count

    return cuda_device_count() > 0


def stage_lowering(graph: str, lowering: LoweringRecord) -> LoweringRecord | None:
    """How a stage's engines compute the MoE ops: the build's lowering for the transformer's stages (text_kv records
    it too, as it always has), none for the text encoder and the VAE decoder, which have no MoE ops."""
    return lowering if graph in GRAPHS else None


def write_engine_graph(bundle_dir: Path, unit: str, lowering: LoweringRecord | None, num_experts: int) -> Path:
    """Write the graph TensorRT parses for an engine unit (rewrites.as_built.engine_graph). It stays in the bundle
    beside the unit's own graph, whose external data it shares by relative location (not loaded here): users rebuild
    the engine from it with trtexec or Polygraphy, and a weight-stripped plan is refit from it."""
    model = onnx.load(str(bundle_dir / contract.onnx_file(unit)), load_external_data=False)
    path = bundle_dir / contract.engine_onnx_file(unit)
    onnx.save_model(engine_graph(model, lowering, num_experts), str(path))
    return path


def build_engines(bundle_dir: Path, manifest: Manifest, flavor: TensorRTFlavor, options: BuildOptions,
                  lowering: LoweringRecord) -> list[BuildReport]:
    """Build one plan per engine unit of every stage (the text encoder or its segments, text_kv, the denoiser or its
    segments, the VAE decoder) in `bundle_dir`, one at a time: each network is parsed from disk, built straight into
    its file and released before the next. Every unit's profile comes from the manifest (dim_ranges_from_manifest)."""
    ranges = dim_ranges_from_manifest(manifest)
    reports = []
    for unit in manifest.engine_units():
        unit_lowering = stage_lowering(graph_of_unit(unit), lowering)
        onnx_path = write_engine_graph(bundle_dir, unit, unit_lowering, manifest.model_config["num_experts"])
        settings = BuildSettings(
            shapes=profile_shapes(onnx_input_shapes(onnx_path), ranges),
            timing_cache=options.timing_cache,
            optimization_level=options.optimization_level,
            compute_capabilities=options.compute_capabilities,
            strip_weights=options.strip_weights,
            weight_streaming=options.weight_streaming,
        )
        with PhaseProgress(f"build {contract.plan_file(unit)}") as progress:
            report = EngineFromOnnx(
                NetworkFromOnnxPath(flavor, onnx_path, plugin_override=unit_lowering is not None and unit_lowering.moe == MOE_PLUGIN),
                settings,
                bundle_dir / contract.plan_file(unit),
                graph=unit,
                progress=progress,
                inspect=_plugin_check(unit, lowering.moe),
            )()
        if report.compute_capabilities is None and flavor.name == TENSORRT_RTX:
            report.compute_capabilities = list(RTX_DEFAULT_TARGETS)
        for line in report.summary_lines():
            console.print(line, highlight=False)
        reports.append(report)
    return reports


def _plugin_check(unit: str, moe: str):
    def check(network_report: NetworkReport) -> None:
        if moe == MOE_PLUGIN and graph_of_unit(unit) == DENOISER_GRAPH and not network_report.plugin_layers:
            raise NucleusExportError(
                "the denoiser parsed without any plugin layer although --moe plugin was requested.",
                "check that the plugin library registers ExpertChoiceRouter and MoECombine.",
            )

    return check


def copy_plugin_library(bundle_dir: Path, library: Path, sha256: str) -> PluginRecord:
    """Copy the plugin library the engines were built with into the bundle and verify the copy against the checksum
    taken before loading (the manifest's `files` then records it)."""
    target = bundle_dir / PLUGIN_LIBRARY_PATH
    target.parent.mkdir(exist_ok=True)
    shutil.copy2(library, target)
    if sha256_file(target) != sha256:
        raise NucleusExportError(
            f"the plugin library {library} changed while the engines were built (its copy has another sha256).",
            "build again, and leave the library alone while the build runs.",
        )
    return PluginRecord(PLUGIN_LIBRARY_PATH, list(contract.CUSTOM_OPS), contract.PLUGIN_NAMESPACE, contract.PLUGIN_VERSION)


def plan_segments(bundle_dir: Path, graph: str, options: BuildOptions, budget: int) -> list[tuple[int, int]] | None:
    """Layer groups of a stage's engines (the denoiser's blocks, the text encoder's layers), or None for one engine:
    for the denoiser --segments if given, else the fewest groups whose predicted build peak (costs/build_memory.py)
    fits `budget`; one mechanism for every stage that can be cut."""
    model = onnx.load(str(bundle_dir / contract.onnx_file(graph)), load_external_data=False)
    if graph == DENOISER_GRAPH and options.segments is not None:
        return segment_groups(len(block_outputs(model)), options.segments)
    per_block, rest = block_weight_bytes(model)
    del model
    plan = plan_build_memory(per_block, rest, budget, graph)
    logger.info(plan.describe())
    return None if len(plan.groups) == 1 else plan.groups


def build_bundle(checkpoint: Checkpoint, out_dir: Path, export_options: ExportOptions, options: BuildOptions,
                 force: bool = False, plan: BuildPlan | None = None) -> tuple[Manifest, list[BuildReport], ParityReport | None]:
    """Export, build and (optionally) quality-check a bundle, atomically.

    Args:
        plan: plan_build's result when the caller already ran it (the CLI does, before FP8 calibration).

    Returns:
        (manifest, engine build reports, ParityReport or None).
    """
    plan = plan or plan_build(checkpoint, export_options, options)
    if options.quality:
        from nucleus_export.parity.quality import check_quality_memory

        _, opt_tokens, max_tokens = plan.export.profiles.image_tokens
        check_quality_memory(checkpoint, max_tokens if options.quality_cases == "full" else opt_tokens,
                             max(plan.export.profiles.text_len[1], 8), images=options.image_scores)
    plugin_library = None
    if plan.lowering.moe == MOE_PLUGIN:
        assert options.plugin_library is not None
        plugin_library = load_plugins(plan.flavor, options.plugin_library)  # (path, sha256)
    started = time.perf_counter()
    refuse_existing(out_dir, force)
    with atomic_dir(out_dir) as tmp:
        io = write_graphs(tmp, checkpoint, export_options, plan.export)
        if plan.combine is not None:
            console.print(_combine_line(plan.combine), highlight=False)
        # Measured once: the budget every stage is cut to (the memory available now, unless --max-build-memory).
        budget = options.max_build_memory or available_memory()
        segments = {}
        for graph in (g for g in SEGMENT_SLICED_INPUTS if g in io):
            groups = plan_segments(tmp, graph, options, budget)
            if groups is not None:
                segments[graph] = write_segments(tmp, groups, graph)
        manifest = write_manifest(tmp, checkpoint, export_options, plan.export, io, segments)
        reports = build_engines(tmp, manifest, plan.flavor, options, plan.lowering)
        plugins = None if plugin_library is None else copy_plugin_library(tmp, *plugin_library)
        parity = run_quality_report(checkpoint, tmp, export_options, options, plan.lowering) if options.quality else None
        log = {
            "engines": {r.graph: r.to_dict() for r in reports},
            "flavor": plan.flavor.name,
            "version": plan.flavor.version,
            "lowering": dataclasses.asdict(plan.lowering),
            "combine": None if plan.combine is None else plan.combine.to_dict(),
            "precision": export_options.precision.label,
            "total_seconds": round(time.perf_counter() - started, 3),
        }
        write_atomic(tmp / BUILD_LOG_NAME, json.dumps(log, indent=2, sort_keys=True))
        manifest = record_engines(tmp, manifest, reports, plan, options, plugins)
    return manifest, reports, parity


def record_engines(bundle_dir: Path, manifest: Manifest, reports: list[BuildReport], plan: BuildPlan,
                   options: BuildOptions, plugins: PluginRecord | None) -> Manifest:
    """The manifest with an engine record per unit and every file the build added recorded (the export's files
    were hashed by this process and are untouched, so only the new ones are read)."""
    stages = dict(manifest.stages)
    for report in reports:
        graph = graph_of_unit(report.graph)
        record = EngineRecord(
            flavor=report.flavor,
            version=report.version,
            lowering=stage_lowering(graph, plan.lowering),
            compute_capabilities=report.compute_capabilities,
            stripped=options.strip_weights,
            weight_streaming=options.weight_streaming,
        )
        stages[graph] = dataclasses.replace(stages[graph], engines={**stages[graph].engines, report.graph: record})
    files, _ = record_bundle(bundle_dir, [], known=manifest.files)
    tools = {**manifest.tools, plan.flavor.name: plan.flavor.version}
    manifest = dataclasses.replace(manifest, stages=stages, files=files, plugins=plugins, tools=tools)
    write_atomic(bundle_dir / MANIFEST_NAME, manifest.to_json())
    return manifest


def _combine_line(choice: CombineChoice) -> str:
    per_tokens = ", ".join(
        f"S={s}: " + "/".join(f"{name} {choice.seconds[name][s] * 1e3:.2f} ms" for name in sorted(choice.seconds))
        for s in sorted(choice.seconds[choice.formulation])
    )
    crossover = f"crossover S={choice.crossover_tokens}" if choice.crossover_tokens else "no crossover"
    return f"MoE combine: {choice.formulation} ({choice.requested}; modeled on {choice.gpu}, {crossover}; {per_tokens})"


def run_quality_report(
    checkpoint: Checkpoint, bundle_dir: Path, export_options: ExportOptions, options: BuildOptions,
    lowering: LoweringRecord,
) -> ParityReport:
    """parity.json: the graphs as the engines compute them (MoE lowered, bf16 emulated, FP8 Q/DQ as is) in ORT vs
    diffusers' float32 forward, next to diffusers in bf16 on the same cases."""
    from nucleus_export.log import stage
    from nucleus_export.parity.check import write_report
    from nucleus_export.parity.quality import quality_report

    precision = export_options.precision
    started = time.perf_counter()
    with stage(f"quality report ({options.quality_cases} cases; ONNX Runtime CPU vs diffusers float32 and bf16)"):
        report = quality_report(checkpoint, bundle_dir, precision, lowering, case_set=options.quality_cases,
                                images=options.image_scores)
    write_report(bundle_dir, {precision.label: report})
    for line in report.summary_lines():
        console.print(line, highlight=False)
    console.print(f"quality report took {time.perf_counter() - started:.1f} s", highlight=False)
    return report

