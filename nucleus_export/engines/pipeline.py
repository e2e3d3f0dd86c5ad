"""`build`: export a bundle, lower the MoE ops, build text_kv.plan and denoiser.plan, report quality.

Everything is written into a temporary sibling folder (nucleus_export.export.atomic_output_dir) and renamed into
place at the end, so a failed or interrupted build never leaves a half bundle behind.
"""

from __future__ import annotations

import dataclasses
import shutil
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import onnx
from nucleus_runtime import contract
from nucleus_runtime.bundle import (
    Manifest,
    Profiles,
    bundle_files,
    file_record,
    sha256_file,
    write_atomic,
)
from nucleus_runtime.contract import (
    DENOISER_GRAPH,
    MANIFEST_NAME,
    MOE_NATIVE,
    MOE_PLUGIN,
    PLUGIN_LIBRARY_PATH,
    TENSORRT,
    TENSORRT_RTX,
)

from nucleus_export.engines.backends import Backend, cuda_device_count, resolve_backend
from nucleus_export.engines.cost import CHAIN, ONEHOT, CombineChoice, choose_combine
from nucleus_export.engines.engine import (
    BuildReport,
    BuildSettings,
    EngineFromOnnx,
    NetworkFromOnnxPath,
    check_profile_limits,
    dim_ranges_from_profiles,
    load_plugins,
    onnx_input_shapes,
    profile_limit_problems,
    profile_shapes,
    write_build_log,
)
from nucleus_export.engines.lowering import (
    broadcast_attention_masks,
    lower_moe_native,
    prepare_for_plugins,
)
from nucleus_export.engines.memory import available_memory, plan_build_memory
from nucleus_export.engines.segments import (
    block_weight_bytes,
    segment_groups,
    write_segments,
)
from nucleus_export.errors import NucleusExportError, UsageError
from nucleus_export.export import (
    ExportOptions,
    atomic_output_dir,
    build_profiles,
    write_bundle_files,
)
from nucleus_export.log import PhaseProgress, console, logger
from nucleus_export.model.checkpoint import Checkpoint
from nucleus_export.model.config import ModelConfig

if TYPE_CHECKING:  # parity imports torch; the build imports it only when a quality report runs
    from nucleus_export.parity.check import ParityReport

BUILD_LOG_NAME = "build_log.json"
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
        combine: native MoE combine formulation: "auto" (engines/cost.py chooses per profile), "onehot" or "chain".
        quality_cases: its case set: "quick" (the optimization resolution, the default) or "full" (every served resolution).
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
    combine: str = "auto"
    quality_cases: str = "quick"
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


# The cost model's GPU per backend when choosing the combine: TensorRT-RTX engines run on RTX cards, full TensorRT
# engines on datacenter GPUs.
COMBINE_COST_GPU = {TENSORRT: "h100", TENSORRT_RTX: "rtx5090"}


def combine_choice(config: ModelConfig, profiles: Profiles, compute: str, requested: str, backend: str) -> CombineChoice:
    """The combine formulation for this profile (all served resolutions at the largest batch); "auto" leaves out
    the one-hot GEMM where TensorRT could not build it (engine.profile_limit_problems)."""
    tokens = sorted({h * w for h, w in profiles.grids})
    batch, text_len = profiles.batch[2], profiles.text_len[2]
    buildable = [
        name for name in (ONEHOT, CHAIN)
        if not profile_limit_problems(config, batch, max(tokens), text_len, compute == "fp32", name)
    ]
    return choose_combine(requested, config, batch, tokens, 4 if compute == "fp32" else 2,
                          COMBINE_COST_GPU.get(backend, "h100"), candidates=buildable or [CHAIN])


def check_moe_backend(moe: str, backend: str) -> None:
    """Refuse --moe plugin with TensorRT-RTX: its 1.7 builder aborts the whole process ("terminate called without
    an active exception") as soon as the ONNX parser adds a plugin layer, with any IPluginV3, a minimal identity
    plugin included, and its Python network API has no add_plugin_v3 (README-facts.md)."""
    if moe == MOE_PLUGIN and backend == TENSORRT_RTX:
        raise NucleusExportError(
            "TensorRT-RTX 1.7 cannot build networks with plugin layers (adding an IPluginV3 layer aborts the process), "
            "so --moe plugin needs full TensorRT.",
            "build with --moe native (the default) for tensorrt-rtx, or use --backend tensorrt on a GPU machine.",
        )


def preflight(checkpoint: Checkpoint, export_options: ExportOptions, options: BuildOptions, backend: str) -> CombineChoice | None:
    """Checks that need no export: the profile is one TensorRT can build (engine.check_profile_limits). Returns the
    combine formulation for --moe native (None for plugins). Cheap; run before export and calibration."""
    profiles = build_profiles(checkpoint, export_options)
    compute = export_options.precision.compute
    combine = None
    if options.moe == MOE_NATIVE:
        combine = combine_choice(checkpoint.config, profiles, compute, options.combine, backend)
    check_profile_limits(checkpoint.config, profiles, compute == "fp32", combine and combine.formulation)
    return combine


def prepare_graph(bundle_dir: Path, unit: str, moe: str, combine: str = "onehot", num_experts: int | None = None) -> Path:
    """Write the graph TensorRT parses for an engine unit (text_kv, the denoiser or one of its segments): MoE lowered
    or prepared for plugins, attention masks unexpanded. It stays in the bundle beside the unit's own graph, whose
    external data it shares by relative location (not loaded here): users rebuild the engine from it with trtexec or
    Polygraphy, and a weight-stripped plan is refit from it. Returns its path, contract.engine_onnx_file(unit)."""
    source = bundle_dir / contract.onnx_file(unit)
    model = onnx.load(str(source), load_external_data=False)
    prepared = lower_moe_native(model, combine, num_experts) if moe == MOE_NATIVE else prepare_for_plugins(model)
    del model
    path = bundle_dir / contract.engine_onnx_file(unit)
    onnx.save_model(broadcast_attention_masks(prepared), str(path))
    return path


def build_engines(bundle_dir: Path, manifest: Manifest, backend: Backend, options: BuildOptions,
                  combine: CombineChoice | None = None) -> list[BuildReport]:
    """Build one plan per engine unit (text_kv, the denoiser or each of its segments) in `bundle_dir`, one at a
    time: each network is parsed from disk, built straight into its file and released before the next."""
    ranges = dim_ranges_from_profiles(manifest.profiles)
    formulation = combine.formulation if combine is not None else "onehot"
    reports = []
    for unit in manifest.engine_units():
        onnx_path = prepare_graph(bundle_dir, unit, options.moe, formulation, manifest.model_config.get("num_experts"))
        settings = BuildSettings(
            shapes=profile_shapes(onnx_input_shapes(onnx_path), ranges),
            timing_cache=options.timing_cache,
            optimization_level=options.optimization_level,
            compute_capabilities=options.compute_capabilities,
            strip_weights=options.strip_weights,
            weight_streaming=options.weight_streaming,
        )
        with PhaseProgress(f"build {unit}.plan") as progress:
            report = EngineFromOnnx(
                NetworkFromOnnxPath(backend, onnx_path, plugin_override=options.moe == MOE_PLUGIN),
                settings,
                bundle_dir / contract.plan_file(unit),
                graph=unit,
                progress=progress,
                inspect=_plugin_check(unit, options.moe),
            )()
        if report.compute_capabilities is None and backend.name == TENSORRT_RTX:
            report.compute_capabilities = list(RTX_DEFAULT_TARGETS)
        for line in report.summary_lines():
            console.print(line, highlight=False)
        reports.append(report)
    return reports


def _plugin_check(graph: str, moe: str):
    def check(network_report) -> None:
        if moe == MOE_PLUGIN and contract.graph_of_unit(graph) == DENOISER_GRAPH and not network_report.plugin_layers:
            raise NucleusExportError(
                "the denoiser parsed without any plugin layer although --moe plugin was requested.",
                "check that the plugin library registers ExpertChoiceRouter and MoECombine.",
            )

    return check


def _engine_records(reports: list[BuildReport], options: BuildOptions,
                    combine: CombineChoice | None) -> dict[str, Any]:
    """One record per engine unit (segments under their own names, e.g. "denoiser.seg0")."""
    records = {
        r.graph: {
            "file": contract.plan_file(r.graph),
            "onnx": r.onnx,
            "stripped": options.strip_weights,
            "refit_onnx": r.onnx if options.strip_weights else None,
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
    if combine is not None:
        for name, record in records.items():
            if contract.graph_of_unit(name) == DENOISER_GRAPH:
                record["combine"] = combine.to_dict()
    return records


def bundle_plugin_library(bundle_dir: Path, library: Path, sha256: str) -> dict[str, Any]:
    """Copy the plugin library the engines were built with into the bundle and verify the copy against the checksum
    taken before loading; returns the manifest's `plugins` record (the file's sha256 is also in `files`)."""
    target = bundle_dir / PLUGIN_LIBRARY_PATH
    target.parent.mkdir(exist_ok=True)
    shutil.copy2(library, target)
    if sha256_file(target) != sha256:
        raise NucleusExportError(
            f"the plugin library {library} changed while the engines were built (its copy has another sha256).",
            "build again, and leave the library alone while the build runs.",
        )
    return {
        "library": PLUGIN_LIBRARY_PATH,
        "sha256": sha256,
        "ops": list(contract.CUSTOM_OPS),
        "namespace": contract.PLUGIN_NAMESPACE,
        "version": contract.PLUGIN_VERSION,
    }


def refresh_manifest(bundle_dir: Path, manifest: Manifest, **changes: Any) -> Manifest:
    """Apply changes and record every file of the bundle (subfolders included, hidden files excluded). Files the
    manifest already records keep their record when their size is unchanged: a build only adds files next to the
    exported ones, and re-hashing the exported weights would read them all again."""
    known = manifest.files
    manifest = dataclasses.replace(manifest, **changes)
    files = bundle_files(bundle_dir)
    manifest.files = {
        f: known[f] if f in known and known[f]["bytes"] == (bundle_dir / f).stat().st_size else file_record(bundle_dir, f)
        for f in files
    }
    write_atomic(bundle_dir / MANIFEST_NAME, manifest.to_json())
    return manifest


@dataclasses.dataclass(frozen=True)
class BuildPlan:
    """What a build is checked against before any work: the resolved backend and the combine formulation."""

    backend: Backend
    combine: CombineChoice | None


def plan_build(checkpoint: Checkpoint, export_options: ExportOptions, options: BuildOptions) -> BuildPlan:
    """Resolve the backend and refuse what it cannot build (plugins on TensorRT-RTX, stripped plans without a GPU,
    profiles over TensorRT's limits), in a second and before export or calibration. Run once per build."""
    backend = resolve_backend(options.backend)
    check_moe_backend(options.moe, backend.name)
    if options.strip_weights and backend.name == TENSORRT_RTX and cuda_device_count() == 0:
        # Measured with tensorrt-rtx 1.7.1 on a CPU-only machine: any REFIT / REFIT_IDENTICAL / STRIP_PLAN build
        # fails inside Myelin with "CUDA driver version is insufficient", while plain builds work.
        raise NucleusExportError(
            "tensorrt-rtx cannot build weight-stripped (refittable) engines without a GPU.",
            "build with --strip-weights on a machine with an NVIDIA GPU, or drop --strip-weights.",
        )
    return BuildPlan(backend, preflight(checkpoint, export_options, options, backend.name))


def build_bundle(checkpoint: Checkpoint, out_dir: Path, export_options: ExportOptions, options: BuildOptions,
                 force: bool = False, plan: BuildPlan | None = None) -> tuple[Manifest, list[BuildReport], ParityReport | None]:
    """Export, build and (optionally) quality-check a bundle, atomically.

    Args:
        plan: plan_build's result when the caller already ran it (the CLI does, before FP8 calibration).

    Returns:
        (manifest, engine build reports, ParityReport or None).
    """
    plan = plan or plan_build(checkpoint, export_options, options)
    backend, combine = plan.backend, plan.combine
    if options.quality:
        from nucleus_export.parity.quality import check_quality_memory

        check_quality_memory(checkpoint)
    plugin_library = None
    if options.moe == MOE_PLUGIN:
        assert options.plugin_library is not None
        plugin_library = load_plugins(backend, options.plugin_library)  # (path, sha256)
    started = time.perf_counter()
    with atomic_output_dir(out_dir, force) as tmp:
        manifest = write_bundle_files(tmp, checkpoint, export_options)
        if combine is not None:
            console.print(_combine_line(combine), highlight=False)
        groups = plan_segments(tmp, checkpoint.config.num_layers, options)
        if groups is not None:
            manifest = dataclasses.replace(manifest, segments={DENOISER_GRAPH: write_segments(tmp, groups)})
        reports = build_engines(tmp, manifest, backend, options, combine)
        plugin_info = None if plugin_library is None else bundle_plugin_library(tmp, *plugin_library)
        parity = None
        if options.quality:
            parity = run_quality_report(checkpoint, tmp, export_options, options, combine)
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
            engines=_engine_records(reports, options, combine),
            plugins=plugin_info,
            tools=tools,
        )
    return manifest, reports, parity


def _combine_line(choice: CombineChoice) -> str:
    per_tokens = ", ".join(
        f"S={s}: " + "/".join(f"{name} {choice.seconds[name][s] * 1e3:.2f} ms" for name in sorted(choice.seconds))
        for s in sorted(choice.seconds[choice.formulation])
    )
    crossover = f"crossover S={choice.crossover_tokens}" if choice.crossover_tokens else "no crossover"
    return f"MoE combine: {choice.formulation} ({choice.requested}; modeled on {choice.gpu}, {crossover}; {per_tokens})"


def plan_segments(bundle_dir: Path, num_blocks: int, options: BuildOptions) -> list[tuple[int, int]] | None:
    """Block groups of the denoiser's engines, or None for one engine: --segments if given, else the fewest groups
    whose predicted build peak (engines/memory.py) fits --max-build-memory."""
    if options.segments is not None:
        return segment_groups(num_blocks, options.segments)
    model = onnx.load(str(bundle_dir / contract.onnx_file(DENOISER_GRAPH)), load_external_data=False)
    per_block, rest = block_weight_bytes(model)
    del model
    budget = options.max_build_memory or available_memory()
    plan = plan_build_memory(per_block, rest, budget)
    logger.info(plan.describe())
    return None if len(plan.groups) == 1 else plan.groups


def run_quality_report(
    checkpoint: Checkpoint, bundle_dir: Path, export_options: ExportOptions, options: BuildOptions,
    combine: CombineChoice | None,
) -> ParityReport:
    """parity.json: the graphs as the engines were built from them (MoE lowered, bf16 emulated, FP8 Q/DQ as is) in
    ORT vs diffusers' float32 forward, next to diffusers in bf16 on the same cases."""
    from nucleus_export.log import stage
    from nucleus_export.parity.check import write_report
    from nucleus_export.parity.quality import quality_report

    precision = export_options.precision
    started = time.perf_counter()
    with stage(f"quality report ({options.quality_cases} cases; ONNX Runtime CPU vs diffusers float32 and bf16)"):
        report = quality_report(
            checkpoint,
            bundle_dir,
            precision.label,
            precision.compute,
            precision.fp8 is not None,
            moe_lowering=options.moe,
            case_set=options.quality_cases,
            combine=combine.formulation if combine is not None else None,
        )
    write_report(bundle_dir, {precision.label: report})
    for line in report.summary_lines():
        console.print(line, highlight=False)
    console.print(f"quality report took {time.perf_counter() - started:.1f} s", highlight=False)
    return report
