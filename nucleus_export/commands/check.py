"""`nucleus-export check`: ONNX Runtime vs diffusers (and transformers, for the text encoder) on the bundle's graphs;
writes parity.json."""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path

from nucleus_runtime.bundle import load_manifest, verify_files
from nucleus_runtime.contract import GRAPHS, OPTIONAL_STAGES, QUANT_RECIPE_NAME, onnx_file

from nucleus_export.commands.common import add_expect_manifest_argument, add_image_scores_argument
from nucleus_export.errors import NucleusExportError
from nucleus_export.graph.precision import GraphPrecision, QuantRecipe
from nucleus_export.model.specs import open_model
from nucleus_export.parity.cases import CASE_SETS, make_cases
from nucleus_export.parity.check import write_report
from nucleus_export.parity.quality import built_lowering, quality_report, tolerance_for
from nucleus_export.parity.stages import check_stages

# CLI flag -> Tolerance field it overrides
OVERRIDES = {
    "max_rel_error": "max_relative_error",
    "max_forced_rel_error": "max_forced_relative_error",
    "min_cosine": "min_cosine",
    "min_routing_agreement": "min_routing_agreement",
}


def register(sub: argparse._SubParsersAction, common: argparse.ArgumentParser) -> None:
    parser = sub.add_parser(
        "check",
        parents=[common],
        help="compare the bundle's ONNX graphs (ONNX Runtime) with diffusers' forward; writes parity.json",
        description="Run text_kv then denoiser in ONNX Runtime and diffusers' forward on the same inputs: every "
        "served resolution, batch 1 and 2, padded masks, early/middle/late timesteps. Reports routing agreement "
        "with every flip classified by its score margin (near-tie: within the float32 rounding bound of the gate "
        "logits), the error with the reference's routing forced, and the end-to-end error; exits 1 when over the "
        "tolerance. fp32 bundles: forced error <= 1e-5, only near-tie flips, end-to-end <= 1e-4 where routing "
        "agreed. bf16/FP8 bundles are checked as built (MoE lowering, bf16 emulated in float32) and held to "
        "diffusers run in bf16 on the same cases.",
    )
    parser.add_argument("--model", required=True, help="the model the bundle was exported from ('tiny' or a path)")
    parser.add_argument("--bundle", type=Path, required=True, help="bundle folder")
    parser.add_argument("--cases", choices=CASE_SETS, default="full", help="every served resolution (full) or the optimization resolution (quick)")
    parser.add_argument("--max-rel-error", type=float, help="end-to-end relative error where routing agreed")
    parser.add_argument("--max-forced-rel-error", type=float, help="relative error with routing forced")
    parser.add_argument("--min-cosine", type=float, help="minimum cosine similarity")
    parser.add_argument("--min-routing-agreement", type=float, help="minimum end-to-end routing agreement, 0..1")
    parser.add_argument(
        "--backend",
        choices=("onnxruntime", "tensorrt", "tensorrt-rtx"),
        default="onnxruntime",
        help="onnxruntime (default): the graph the engines were built from, on the CPU, with routing and forced "
        "error; tensorrt / tensorrt-rtx: the bundle's plans themselves on this machine's GPU against diffusers on "
        "the same GPU, plus a Polygraphy comparison of one engine against ONNX Runtime (needs a GPU)",
    )
    add_image_scores_argument(parser)
    parser.add_argument("--polygraphy-unit", default="text_kv", help="engine unit Polygraphy compares (default text_kv)")
    add_expect_manifest_argument(parser)
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    manifest = load_manifest(args.bundle, args.expect_manifest_sha256)
    # Checksums first: a changed or missing file is a one-line error in a second, not a slow parity failure.
    verify_files(args.bundle, manifest, sorted({*(onnx_file(g) for g in GRAPHS), *manifest.files}))
    recipe = QuantRecipe.load(args.bundle / QUANT_RECIPE_NAME) if manifest.quantization else None
    precision = GraphPrecision(manifest.precision, recipe)
    overrides = {field: getattr(args, flag) for flag, field in OVERRIDES.items() if getattr(args, flag) is not None}
    tolerance = dataclasses.replace(tolerance_for(precision), **overrides)
    if args.backend != "onnxruntime":
        return run_engines(args, manifest, precision, tolerance)
    checkpoint = open_model(args.model, tuple(s for s in manifest.stage_names if s in OPTIONAL_STAGES))
    report = quality_report(
        checkpoint, args.bundle, precision, built_lowering(manifest), tolerance=tolerance, case_set=args.cases,
        images=not args.skip_image_scores,
    )
    resolutions = [tuple(manifest.profiles.opt_resolution)] if args.cases == "quick" else manifest.profiles.resolutions
    stages = check_stages(checkpoint.pipeline_root, args.bundle, manifest, precision.exact, resolutions)
    path = write_report(args.bundle, {report.graph_precision: report}, {c.stage: c.to_dict() for c in stages})
    for line in [*report.summary_lines(), *(c.summary_line() for c in stages)]:
        print(line)
    print(f"wrote {path}")
    failures = report.failures() + [f"{c.stage} {c.metric} {c.value:.3g} > {c.limit:.3g}" for c in stages if not c.passed]
    if failures:
        raise NucleusExportError(
            f"the bundle's graphs differ from the model over tolerance ({'; '.join(failures)}; details in {path}).",
            "check that --model is the checkpoint the bundle was exported from; if it is, export the bundle again.",
        )
    return 0


def run_engines(args: argparse.Namespace, manifest, precision: GraphPrecision, tolerance) -> int:
    """`check --backend tensorrt|tensorrt-rtx`: the plans on the GPU (parity.engines; unverified without a GPU)."""
    from nucleus_export.parity.engines import check_engines, open_engine_backend, polygraphy_compare

    checkpoint = open_model(args.model)
    backend = open_engine_backend(args.bundle, args.backend)
    try:
        label = f"{precision.label} ({args.backend})"
        report = check_engines(checkpoint, args.bundle, backend, tolerance, label, case_set=args.cases,
                               images=not args.skip_image_scores)
    finally:
        backend.close()
    case = make_cases(checkpoint.config, manifest.profiles, case_set="quick")[0]
    unit_inputs = case.text_kv_inputs(checkpoint.config) if args.polygraphy_unit == "text_kv" else None
    if unit_inputs is None:
        raise NucleusExportError(f"Polygraphy compares text_kv only in this version, not {args.polygraphy_unit}.",
                                 "drop --polygraphy-unit.")
    comparison = polygraphy_compare(args.bundle, args.polygraphy_unit, args.backend, unit_inputs)
    report.note += "; " + comparison.summary_line()
    path = write_report(args.bundle, {label: report})
    for line in [*report.summary_lines(), comparison.summary_line()]:
        print(line)
    print(f"wrote {path}")
    if not report.passed or not comparison.passed:
        raise NucleusExportError(
            f"the {args.backend} engines differ from the model over tolerance "
            f"({'; '.join(report.failures()) or comparison.summary_line()}; details in {path}).",
            "check the ONNX graphs without --backend first; if they pass, rebuild the engines.",
        )
    return 0
