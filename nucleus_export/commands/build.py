"""`nucleus-export build`: export the bundle and build an engine per stage (text_encoder.plan, text_kv.plan,
denoiser.plan, vae_decoder.plan, or their segments) with TensorRT or TensorRT-RTX."""

from __future__ import annotations

import argparse
from pathlib import Path

from nucleus_runtime.bundle import Profiles
from nucleus_runtime.contract import MOE_NATIVE, MOE_PLUGIN, QUANT_RECIPE_NAME, TEXT_ENCODER_GRAPH

from nucleus_export.build import BuildOptions, build_bundle, plan_build, validate_moe_options
from nucleus_export.cache import cache_root
from nucleus_export.commands.common import (
    add_export_arguments,
    add_image_scores_argument,
    add_model_argument,
    add_out_argument,
    bundle_path,
    export_options,
    requested_stages,
)
from nucleus_export.costs.combine import COMBINE_CHOICES
from nucleus_export.engines.flavors import FLAVOR_CHOICES
from nucleus_export.errors import NucleusExportError, UsageError
from nucleus_export.export import ExportPlan, refuse_existing
from nucleus_export.graph.precision import GraphPrecision, QuantRecipe
from nucleus_export.model.checkpoint import Checkpoint
from nucleus_export.model.specs import open_model


def register(sub: argparse._SubParsersAction, common: argparse.ArgumentParser) -> None:
    parser = sub.add_parser(
        "build",
        parents=[common],
        help="export the bundle and build TensorRT / TensorRT-RTX engines (bf16, or --fp8), with a quality report",
        description="Export the bundle's stages (text_kv.onnx and denoiser.onnx; from a pipeline root also "
        "text_encoder.onnx and vae_decoder.onnx, as --stages says), lower the MoE ops (native layers or plugins), "
        "build one plan per stage (the denoiser and the text encoder cut into segments where --max-build-memory needs) "
        "with one optimization profile each over the served resolutions, batch 1..2, the text length range and the "
        "text encoder's cached prefix, and compare the transformer's graphs with diffusers' float32 forward "
        "(parity.json). Written to a temporary folder and renamed into place.",
    )
    add_model_argument(parser)
    add_out_argument(parser)
    add_export_arguments(parser, default_precision="bf16")
    group = parser.add_argument_group("engines")
    group.add_argument(
        "--backend",
        choices=FLAVOR_CHOICES,
        default="auto",
        help="tensorrt (datacenter GPUs, needs a GPU to build), tensorrt-rtx (RTX GPUs, builds on the CPU), or auto: "
        "tensorrt when installed with a GPU visible, else tensorrt-rtx",
    )
    group.add_argument(
        "--moe",
        choices=[MOE_NATIVE, MOE_PLUGIN],
        help="MoE routing/combine: native TensorRT layers (default without --plugins) or the plugin library "
        "(default with --plugins)",
    )
    group.add_argument("--plugins", type=Path, help="libnucleus_trt_plugins.so for --moe plugin")
    group.add_argument(
        "--combine",
        choices=COMBINE_CHOICES,
        default="auto",
        help="native MoE combine: one-hot GEMM (fast at low resolution, quadratic in image tokens), per-expert "
        "gather-add-scatter chain (linear), or auto: the cheaper over the served resolutions by the cost model",
    )
    group.add_argument(
        "--timing-cache",
        type=Path,
        help="timing cache file to reuse and update (full TensorRT; default: in the nucleus-export cache folder)",
    )
    group.add_argument(
        "--compute-capability",
        action="append",
        dest="compute_capabilities",
        metavar="SMxx",
        help="TensorRT-RTX target (repeatable, e.g. SM89); default: its portable set SM80/86/89/120",
    )
    group.add_argument("--optimization-level", type=int, choices=range(0, 6), help="builder optimization level 0..5")
    memory = parser.add_argument_group("memory and bundle size")
    memory.add_argument(
        "--max-build-memory",
        type=float,
        metavar="GB",
        help="host memory the build may use; the denoiser is cut into as few engines of consecutive blocks "
        "(segments) as keep the measured build peak under it (default: 80%% of the memory available when the build starts)",
    )
    memory.add_argument("--segments", type=int, metavar="N", help="cut the denoiser into N segments (overrides --max-build-memory)")
    memory.add_argument(
        "--strip-weights",
        action="store_true",
        help="weight-stripped plans (STRIP_PLAN + REFIT_IDENTICAL): the weights stay only in the ONNX external data "
        "and the runtime refits the engines at load, so the bundle holds them once",
    )
    memory.add_argument(
        "--weight-streaming",
        action="store_true",
        help="build engines whose weights can stream from host memory (`run --weight-streaming-budget`)",
    )
    quant = parser.add_argument_group("FP8")
    quant.add_argument(
        "--fp8",
        action="store_true",
        help="FP8 (E4M3) GEMMs with the default recipe (quant/default_recipe.py: edge blocks bf16, experts and MoE "
        "attention FP8 weights, dense blocks W8A8; router and norms stay high); add --fp8-sensitivity to choose "
        "per GEMM group by measurement (within 1.25x bf16's error)",
    )
    quant.add_argument("--fp8-scales", type=Path, help=f"reuse a quantization recipe ({QUANT_RECIPE_NAME} of an earlier bundle) instead of calibrating")
    quant.add_argument("--calibration-prompts", type=Path, help="safetensors with prompt_embeds [N,T,D] (+ optional prompt_embeds_mask) for FP8 calibration (docs/fp8.md)")
    quant.add_argument("--calibration-size", type=int, default=8, help="calibration samples (default 8)")
    quant.add_argument(
        "--fp8-text-encoder",
        action="store_true",
        help="with --fp8, also E4M3 Q/DQ on the text encoder's linears, activations calibrated on transformers' "
        "forward of calibration prompts (opt-in: several times the bf16 text encoder's error, docs/text_encoder.md)",
    )
    quant.add_argument(
        "--calibration-text",
        type=Path,
        help="a UTF-8 text file of prompts, one per line, for --fp8-text-encoder's calibration (default: 8 built-in prompts)",
    )
    quant.add_argument(
        "--fp8-sensitivity",
        action="store_true",
        help="measure each GEMM group's FP8 cost (error and routing agreement) and choose W8A8, FP8 weights only "
        f"or bf16 per group so FP8 stays within 1.25x bf16's error (recorded in {QUANT_RECIPE_NAME}; ~2 min on the tiny model)",
    )
    parser.add_argument("--skip-quality", action="store_true", help="skip the CPU quality report (parity.json)")
    parser.add_argument(
        "--quality",
        choices=("quick", "full"),
        default="quick",
        help="quality report cases: the optimization resolution (quick, default) or every served resolution (full)",
    )
    add_image_scores_argument(parser)
    parser.set_defaults(func=run)


def quant_recipe(args: argparse.Namespace, checkpoint: Checkpoint, profiles: Profiles) -> QuantRecipe:
    """A stored recipe (reproducible builds) or a fresh calibration."""
    if args.fp8_scales:
        return QuantRecipe.load(args.fp8_scales)
    try:
        from nucleus_export.quant import calibrate_fp8
    except ImportError as exc:
        raise NucleusExportError(
            f"FP8 calibration is unavailable in this installation ({exc}).",
            "pass --fp8-scales with a stored fp8_scales.json.",
        ) from None
    recipe = calibrate_fp8(checkpoint, profiles, prompts=args.calibration_prompts, size=args.calibration_size)
    if not args.fp8_sensitivity:
        from nucleus_export.quant.default_recipe import apply_default_recipe

        return apply_default_recipe(recipe, checkpoint.config)  # per-GEMM modes by position and kind, no probes
    from nucleus_export.quant.sensitivity import select_fp8_modes

    recipe, sensitivity = select_fp8_modes(checkpoint, recipe, compute=args.precision)
    print(sensitivity.summary())
    return recipe


def text_encoder_recipe(path: Path | None, plan: ExportPlan) -> QuantRecipe:
    """The text encoder's activation amax on the prompts of `path` (one per line) or the built-in ones."""
    from nucleus_export.quant.calibrate import TEXT_CALIBRATION_PROMPTS, calibrate_text_encoder_fp8

    prompts, source = TEXT_CALIBRATION_PROMPTS, "built-in prompts"
    if path is not None:
        try:
            prompts = tuple(line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip())
        except (OSError, UnicodeDecodeError) as exc:
            raise UsageError(f"cannot read --calibration-text {path} ({exc}).", "pass a UTF-8 text file, one prompt per line.") from None
        source = str(path)
    return calibrate_text_encoder_fp8(plan.components.text_encoder, plan.prompt_tokenizer(), prompts, source)  # type: ignore[arg-type]


def run(args: argparse.Namespace) -> int:
    moe = validate_moe_options(args.moe, args.plugins)
    if args.fp8_sensitivity and args.fp8_scales:
        raise NucleusExportError(
            "--fp8-sensitivity chooses GEMM modes for fresh scales; --fp8-scales reuses stored ones (with their choice).",
            "drop one of them.",
        )
    if (args.fp8_scales or args.calibration_prompts or args.fp8_sensitivity or args.fp8_text_encoder) and not args.fp8:
        raise NucleusExportError("--fp8-scales / --calibration-prompts / --fp8-sensitivity / --fp8-text-encoder only "
                                 "apply with --fp8.", "add --fp8 or drop them.")
    if args.calibration_text and (not args.fp8_text_encoder or args.fp8_scales):
        raise NucleusExportError("--calibration-text calibrates a fresh --fp8-text-encoder.",
                                 "add --fp8-text-encoder (without --fp8-scales), or drop --calibration-text.")
    build = BuildOptions(
        flavor=args.backend,
        moe=moe,
        plugin_library=args.plugins,
        timing_cache=args.timing_cache,
        compute_capabilities=args.compute_capabilities,
        optimization_level=args.optimization_level,
        quality=not args.skip_quality,
        combine=args.combine,
        quality_cases=args.quality,
        image_scores=not args.skip_image_scores,
        segments=args.segments,
        max_build_memory=None if args.max_build_memory is None else int(args.max_build_memory * 1e9),
        strip_weights=args.strip_weights,
        weight_streaming=args.weight_streaming,
    )
    if moe == MOE_PLUGIN and args.combine != "auto":
        raise NucleusExportError("--combine chooses the native combine; --moe plugin uses the plugin's.", "drop --combine.")
    if args.segments is not None and args.segments < 1:
        raise UsageError(f"--segments {args.segments} is below 1.", "use --segments 1 (one engine) or more.")
    if args.max_build_memory is not None and args.max_build_memory <= 0:
        raise UsageError(f"--max-build-memory {args.max_build_memory} is not positive.", "give it in GB, e.g. 16.")
    out = bundle_path(args, args.precision + ("-fp8" if args.fp8 else ""))
    refuse_existing(out, args.force)
    checkpoint = open_model(args.model, requested_stages(args))
    options = export_options(args)
    # Fail fast (backend, plugins, TensorRT's limits) before export and calibration, which take the longest.
    plan = plan_build(checkpoint, options, build)
    flavor = plan.flavor
    if build.timing_cache is None:
        build.timing_cache = cache_root() / "timing" / f"{flavor.name}-{flavor.version}.cache"
        build.timing_cache.parent.mkdir(parents=True, exist_ok=True)
    if args.fp8_text_encoder and TEXT_ENCODER_GRAPH not in plan.export.stages:
        raise UsageError("--fp8-text-encoder needs a text_encoder stage, and this model has none.",
                         "build from a pipeline root with the text encoder, or drop --fp8-text-encoder.")
    if args.fp8:
        recipe = quant_recipe(args, checkpoint, plan.export.profiles)
        if args.fp8_text_encoder and not args.fp8_scales:
            recipe = recipe.merge(text_encoder_recipe(args.calibration_text, plan.export))
        options.precision = GraphPrecision(args.precision, recipe)
        options.quantize_text_encoder = args.fp8_text_encoder
    manifest, reports, parity = build_bundle(checkpoint, out, options, build, force=args.force, plan=plan)
    total = sum(r.build_seconds for r in reports)
    print(
        f"built {out}: {manifest.precision_label}, MoE {moe}, "
        f"{', '.join(f'{r.graph}.plan {r.engine_bytes / 2**20:.1f} MiB' for r in reports)}, engine build {total:.1f} s"
    )
    if parity is not None and not parity.passed:
        print(f"quality report over tolerance: see {out}/parity.json")
        return 1
    return 0
