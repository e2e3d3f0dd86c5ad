"""`nucleus-export check`: ONNX Runtime vs diffusers on the bundle's graphs; writes parity.json."""

from __future__ import annotations

import argparse
from pathlib import Path

from nucleus_runtime.bundle import load_manifest, verify_files
from nucleus_runtime.contract import GRAPHS, precision_label

from nucleus_export.commands.common import add_expect_manifest_argument
from nucleus_export.errors import NucleusExportError
from nucleus_export.model.checkpoint import open_model
from nucleus_export.parity.check import Tolerance, write_report
from nucleus_export.parity.quality import quality_report, tolerance_for


def register(sub: argparse._SubParsersAction, common: argparse.ArgumentParser) -> None:
    parser = sub.add_parser(
        "check",
        parents=[common],
        help="compare the bundle's ONNX graphs (ONNX Runtime) with diffusers' forward; writes parity.json",
        description="Run text_kv then denoiser in ONNX Runtime and diffusers' forward on the same inputs: every "
        "served resolution, batch 1 and 2, padded masks, early/middle/late timesteps. Reports max abs and relative "
        "error, cosine and MoE routing agreement; exits 1 when over the tolerance. bf16 graphs run emulated in "
        "float32 with bf16 rounding (ONNX Runtime's CPU provider has no bf16 MatMul); FP8 Q/DQ runs as is. Default "
        "tolerances depend on the bundle's precision (fp32: rel err 1e-4, 100%% routing agreement).",
    )
    parser.add_argument("--model", required=True, help="the model the bundle was exported from ('tiny' or a path)")
    parser.add_argument("--bundle", type=Path, required=True, help="bundle folder")
    parser.add_argument("--max-rel-error", type=float, help="relative error tolerance (default by precision)")
    parser.add_argument("--min-cosine", type=float, help="minimum cosine similarity (default by precision)")
    parser.add_argument("--min-routing-agreement", type=float, help="minimum routing agreement, 0..1 (default by precision)")
    add_expect_manifest_argument(parser)
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    manifest = load_manifest(args.bundle, args.expect_manifest_sha256)
    # Checksums first: a changed or missing file is a one-line error in a second, not a slow parity failure.
    verify_files(args.bundle, manifest, sorted({*(f"{g}.onnx" for g in GRAPHS), *manifest.files}))
    fp8 = manifest.quantization is not None
    defaults = tolerance_for(manifest.precision, fp8)
    tolerance = Tolerance(
        defaults["max_relative_error"] if args.max_rel_error is None else args.max_rel_error,
        defaults["min_cosine"] if args.min_cosine is None else args.min_cosine,
        defaults["min_routing_agreement"] if args.min_routing_agreement is None else args.min_routing_agreement,
    )
    label = precision_label(manifest.precision, fp8)
    report = quality_report(open_model(args.model), args.bundle, label, manifest.precision, fp8, tolerance=tolerance)
    path = write_report(args.bundle, {report.graph_precision: report})
    for line in report.summary_lines():
        print(line)
    print(f"wrote {path}")
    if not report.passed:
        w = report.worst
        raise NucleusExportError(
            f"the bundle's graphs differ from the model over tolerance (worst rel err {w['sample_relative_error']:.3e} "
            f"vs {tolerance.max_relative_error:g}, min cosine {w['sample_cosine']:.6f} vs {tolerance.min_cosine:g}, "
            f"routing agreement {100 * w['routing_agreement']:.2f}% vs {100 * tolerance.min_routing_agreement:g}%; "
            f"details in {path}).",
            "check that --model is the checkpoint the bundle was exported from; if it is, export the bundle again.",
        )
    return 0
