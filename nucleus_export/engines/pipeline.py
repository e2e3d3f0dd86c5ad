"""`build`: export a bundle, lower the MoE ops, build text_kv.plan and denoiser.plan, report quality.

Everything is written into a temporary sibling folder (nucleus_export.export.atomic_output_dir) and renamed into
place at the end, so a failed or interrupted build never leaves a half bundle behind.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import shutil
import time
from pathlib import Path
from typing import Any

import onnx

from nucleus_export.engines.backends import TENSORRT_RTX, Backend, cuda_device_count, resolve_backend
from nucleus_export.engines.engine import (
    BuildReport,
    BuildSettings,
    EngineFromOnnx,
    NetworkFromOnnxPath,
    RichBuildProgress,
    dim_ranges_from_profiles,
    load_plugins,
    onnx_input_shapes,
    profile_shapes,
    write_build_log,
)
from nucleus_export.engines.lowering import lower_moe_native, prepare_for_plugins
from nucleus_export.engines.memory import available_memory, plan_build_memory
from nucleus_export.engines.segments import block_weight_bytes, even_groups, write_segments
from nucleus_export.errors import NucleusExportError, UsageError
from nucleus_export.export import ExportOptions, atomic_output_dir, write_bundle_files
from nucleus_export.log import console
from nucleus_runtime.bundle import DENOISER, GRAPHS, MANIFEST_NAME, Manifest, file_record, sha256_file, write_atomic
from nucleus_runtime.plugins import LIBRARY_NAME, PLUGIN_NAMES, PLUGIN_NAMESPACE, PLUGIN_VERSION

logger = logging.getLogger("nucleus_export")

MOE_NATIVE = "native"
MOE_PLUGIN = "plugin"
BUILD_LOG_NAME = "build_log.json"
# Where nucleus_runtime.plugins.find_plugin_library looks in a bundle, whatever the name of the file passed in.
PLUGIN_LIBRARY = f"plugins/{LIBRARY_NAME}"
# TensorRT-RTX's default targets when none are set (docs: "CPU-Only AOT and TensorRT-RTX Engines").
RTX_DEFAULT_TARGETS = ["SM80", "SM86", "SM89", "SM120"]


@dataclasses.dataclass
class BuildOptions:
    """What `build` does beyond the export.

    Attributes:
        backend: "auto", "tensorrt" or "tensorrt-rtx".
        moe: "native" (rewrite to native layers) or "plugin" (keep the custom nodes for the plugin library).
        plugin_library: the plugin library; required for moe == "plugin".
        timing_cache: timing-cache file, read and updated (full TensorRT).
        compute_capabilities: TensorRT-RTX targets ("SM89", ...); None for its portable default.
        optimization_level: builder optimization level; None for the default.
        quality: run the CPU quality report (parity.json).
        segments: cut the denoiser into this many engines of consecutive blocks (None: as --max-build-memory needs).
        max_build_memory: host memory the build may use, in bytes (None: what is available when the build starts);
            picks the segmentation through the measured model in engines/memory.py.
        strip_weights: weight-stripped plans, refit at load from the ONNX graph they were built from (kept in the
            bundle; it references the same external data file as the exported graph).
        weight_streaming: build engines whose weights a runtime may stream (`run --weight-streaming-budget`).
    """

    backend: str = "auto"
    moe: str = MOE_NATIVE
    plugin_library: Path | None = None
    timing_cache: Path | None = None
    compute_capabilities: list[str] | None = None
    optimization_level: int | None = None
    quality: bool = True
    segments: int | None = None
    max_build_memory: int | None = None
    strip_weights: bool = False
    weight_streaming: bool = False


def validate_moe_options(moe: str | None, plugin_library: Path | None) -> str:
    """Resolve --moe against --plugins: native is the default without a library, plugin needs one."""
    if moe is None:
        return MOE_PLUGIN if plugin_library is not None else MOE_NATIVE
    if moe not in (MOE_NATIVE, MOE_PLUGIN):
        raise UsageError(f"unknown MoE lowering '{moe}'.", "use --moe native or --moe plugin.")
    if moe == MOE_PLUGIN and plugin_library is None:
        raise UsageError(
            "--moe plugin needs the plugin library that implements the nucleus ops.",
            "pass --plugins path/to/libnucleus_trt_plugins.so (build it from plugins/), or use --moe native.",
        )
    if moe == MOE_NATIVE and plugin_library is not None:
        raise UsageError("--plugins was given with --moe native, which uses no plugins.", "drop one of them.")
    return moe


def prepared_graph_name(graph: str, moe: str) -> str:
    """The graph TensorRT parsed, kept in the bundle for refitting weight-stripped plans: `<graph>.<moe>.onnx`."""
    return f"{graph}.{moe}.onnx"


def prepare_graph(bundle_dir: Path, graph: str, moe: str, keep: bool = False) -> Path:
    """Write the graph TensorRT parses: MoE lowered or prepared for plugins, next to the original so its external
    data (referenced by relative location, not loaded here) still resolves. Returns its path: a hidden file, or
    with `keep` the bundle file `prepared_graph_name` (a stripped plan is refit from it)."""
    source = bundle_dir / f"{graph}.onnx"
    model = onnx.load(str(source), load_external_data=False)
    prepared = lower_moe_native(model) if moe == MOE_NATIVE else prepare_for_plugins(model)
    del model
    path = bundle_dir / (prepared_graph_name(graph, moe) if keep else f".{graph}.{moe}.onnx")
    onnx.save_model(prepared, str(path))
    return path


def engine_units(manifest: Manifest) -> list[str]:
    """What gets its own engine, in build order: text_kv, then the denoiser or its segments."""
    units = []
    for graph in GRAPHS:
        segments = manifest.graph_segments(graph)
        units += [seg["name"] for seg in segments] if segments else [graph]
    return units


def build_engines(bundle_dir: Path, manifest: Manifest, backend: Backend, options: BuildOptions) -> list[BuildReport]:
    """Build one plan per engine unit (text_kv, the denoiser or each of its segments) in `bundle_dir`, one at a
    time: each network is parsed from disk, built straight into its file and released before the next."""
    ranges = dim_ranges_from_profiles(manifest.profiles)
    reports = []
    for unit in engine_units(manifest):
        onnx_path = prepare_graph(bundle_dir, unit, options.moe, keep=options.strip_weights)
        try:
            settings = BuildSettings(
                shapes=profile_shapes(onnx_input_shapes(onnx_path), ranges),
                timing_cache=options.timing_cache,
                optimization_level=options.optimization_level,
                compute_capabilities=options.compute_capabilities,
                strip_weights=options.strip_weights,
                weight_streaming=options.weight_streaming,
            )
            with RichBuildProgress(f"build {unit}.plan") as progress:
                report = EngineFromOnnx(
                    NetworkFromOnnxPath(backend, onnx_path, plugin_override=options.moe == MOE_PLUGIN),
                    settings,
                    bundle_dir / f"{unit}.plan",
                    graph=unit,
                    progress=progress,
                    inspect=_plugin_check(unit, options.moe),
                )()
        finally:
            if not options.strip_weights:
                onnx_path.unlink(missing_ok=True)
        if report.compute_capabilities is None and backend.name == "tensorrt-rtx":
            report.compute_capabilities = list(RTX_DEFAULT_TARGETS)
        for line in report.summary_lines():
            console.print(line, highlight=False)
        reports.append(report)
    return reports


def _plugin_check(graph: str, moe: str):
    def check(network_report) -> None:
        if moe == MOE_PLUGIN and graph.startswith(DENOISER) and not network_report.plugin_layers:
            raise NucleusExportError(
                "the denoiser parsed without any plugin layer although --moe plugin was requested.",
                "check that the plugin library registers ExpertChoiceRouter and MoECombine.",
            )

    return check


def _engine_records(reports: list[BuildReport], options: BuildOptions) -> dict[str, Any]:
    """One record per engine unit (segments under their own names, e.g. "denoiser.seg0")."""
    return {
        r.graph: {
            "file": f"{r.graph}.plan",
            "stripped": options.strip_weights,
            "refit_onnx": prepared_graph_name(r.graph, options.moe) if options.strip_weights else None,
            "weight_streaming": options.weight_streaming,
            "backend": r.backend,
            "backend_version": r.backend_version,
            "bytes": r.engine_bytes,
            "build_seconds": r.build_seconds,
            "strongly_typed": True,
            "compute_capabilities": r.compute_capabilities,
            "profile": r.profile,
            "moe_lowering": options.moe,
        }
        for r in reports
    }


def bundle_plugin_library(bundle_dir: Path, library: Path) -> dict[str, Any]:
    """Copy the plugin library into the bundle; returns the manifest's `plugins` record (its sha256 is also in
    `files`, so verify_files covers it like any other bundle file)."""
    target = bundle_dir / PLUGIN_LIBRARY
    target.parent.mkdir(exist_ok=True)
    shutil.copy2(library, target)
    return {
        "library": PLUGIN_LIBRARY,
        "sha256": sha256_file(target),
        "ops": list(PLUGIN_NAMES),
        "namespace": PLUGIN_NAMESPACE,
        "version": PLUGIN_VERSION,
    }


def refresh_manifest(bundle_dir: Path, manifest: Manifest, **changes: Any) -> Manifest:
    """Apply changes and re-record every file's checksum (subfolders included, hidden files excluded)."""
    manifest = dataclasses.replace(manifest, **changes)
    files = sorted(
        str(p.relative_to(bundle_dir))
        for p in bundle_dir.rglob("*")
        if p.is_file() and p.name != MANIFEST_NAME and not p.name.startswith(".")
    )
    manifest.files = {f: file_record(bundle_dir, f) for f in files}
    write_atomic(bundle_dir / MANIFEST_NAME, manifest.to_json())
    return manifest


def build_bundle(checkpoint: Any, out_dir: Path, export_options: ExportOptions, options: BuildOptions,
                 force: bool = False) -> tuple[Manifest, list[BuildReport], Any]:
    """Export, build and (optionally) quality-check a bundle, atomically.

    Returns:
        (manifest, engine build reports, ParityReport or None).
    """
    backend = resolve_backend(options.backend)  # before any work: a missing TensorRT fails in a second
    if options.strip_weights and backend.name == TENSORRT_RTX and cuda_device_count() == 0:
        # Measured with tensorrt-rtx 1.7.1 on a CPU-only machine: any REFIT / REFIT_IDENTICAL / STRIP_PLAN build
        # fails inside Myelin with "CUDA driver version is insufficient", while plain builds work.
        raise NucleusExportError(
            "tensorrt-rtx cannot build weight-stripped (refittable) engines without a GPU.",
            "build with --strip-weights on a machine with an NVIDIA GPU, or drop --strip-weights.",
        )
    if options.quality:
        from nucleus_export.parity.quality import check_quality_memory

        check_quality_memory(checkpoint)
    plugin_library = None
    if options.moe == MOE_PLUGIN:
        assert options.plugin_library is not None
        plugin_library = load_plugins(backend, options.plugin_library)
    started = time.perf_counter()
    with atomic_output_dir(out_dir, force) as tmp:
        manifest = write_bundle_files(tmp, checkpoint, export_options)
        groups = plan_segments(tmp, checkpoint.config.num_layers, options)
        if groups is not None:
            manifest = dataclasses.replace(manifest, segments={DENOISER: write_segments(tmp, groups)})
        reports = build_engines(tmp, manifest, backend, options)
        plugin_info = None if plugin_library is None else bundle_plugin_library(tmp, plugin_library)
        parity = None
        if options.quality:
            parity = run_quality_report(checkpoint, tmp, export_options)
        write_build_log(
            tmp / BUILD_LOG_NAME,
            reports,
            {
                "backend": backend.name,
                "backend_version": backend.version,
                "moe_lowering": options.moe,
                "precision": export_options.precision.label,
                "total_seconds": round(time.perf_counter() - started, 3),
            },
        )
        tools = dict(manifest.tools)
        tools[backend.name] = backend.version
        manifest = refresh_manifest(
            tmp,
            manifest,
            moe_lowering=options.moe,
            engines=_engine_records(reports, options),
            plugins=plugin_info,
            tools=tools,
        )
    return manifest, reports, parity


def plan_segments(bundle_dir: Path, num_blocks: int, options: BuildOptions) -> list[tuple[int, int]] | None:
    """Block groups of the denoiser's engines, or None for one engine: --segments if given, else the fewest groups
    whose predicted build peak (engines/memory.py) fits --max-build-memory."""
    if options.segments is not None:
        return None if options.segments == 1 else even_groups(num_blocks, options.segments)
    model = onnx.load(str(bundle_dir / f"{DENOISER}.onnx"), load_external_data=False)
    per_block, rest = block_weight_bytes(model)
    del model
    budget = options.max_build_memory or available_memory()
    plan = plan_build_memory(per_block, rest, budget)
    logger.info(plan.describe())
    return None if len(plan.groups) == 1 else plan.groups


def run_quality_report(checkpoint: Any, bundle_dir: Path, export_options: ExportOptions) -> Any:
    """parity.json: the bundle's graphs (bf16 emulated, FP8 Q/DQ as is) in ORT vs diffusers' fp32 forward."""
    from nucleus_export.parity.quality import quality_report
    from nucleus_export.log import stage
    from nucleus_export.parity.check import write_report

    precision = export_options.precision
    with stage("quality report (ONNX Runtime CPU vs diffusers float32)"):
        report = quality_report(checkpoint, bundle_dir, precision.label, precision.compute, precision.fp8 is not None)
    write_report(bundle_dir, {precision.label: report})
    for line in report.summary_lines():
        console.print(line, highlight=False)
    return report


def load_build_log(bundle_dir: Path) -> dict[str, Any]:
    return json.loads((Path(bundle_dir) / BUILD_LOG_NAME).read_text())
