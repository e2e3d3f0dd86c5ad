"""`nucleus-export check`: ONNX Runtime vs diffusers on the bundle's graphs; writes parity.json."""

from __future__ import annotations

import argparse
from pathlib import Path

from nucleus_export.model.checkpoint import open_model
from nucleus_export.parity.check import Tolerance, check_parity, write_report


def register(sub: argparse._SubParsersAction, common: argparse.ArgumentParser) -> None:
    parser = sub.add_parser(
        "check",
        parents=[common],
        help="compare the bundle's ONNX graphs (ONNX Runtime) with diffusers' forward; writes parity.json",
        description="Run text_kv then denoiser in ONNX Runtime and diffusers' forward on the same inputs: every "
        "served resolution, batch 1 and 2, padded masks, early/middle/late timesteps. Reports max abs and relative "
        "error, cosine and MoE routing agreement; exits 1 when over the tolerance.",
    )
    parser.add_argument("--model", required=True, help="the model the bundle was exported from ('tiny' or a path)")
    parser.add_argument("--bundle", type=Path, required=True, help="bundle folder")
    parser.add_argument("--max-rel-error", type=float, default=1e-4, help="relative error tolerance (default 1e-4)")
    parser.add_argument("--min-cosine", type=float, default=0.0, help="minimum cosine similarity (default: not checked)")
    parser.add_argument(
        "--min-routing-agreement", type=float, default=1.0, help="minimum routing agreement, 0..1 (default 1.0)"
    )
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    tolerance = Tolerance(args.max_rel_error, args.min_cosine, args.min_routing_agreement)
    report = check_parity(open_model(args.model), args.bundle, tolerance)
    path = write_report(args.bundle, {report.graph_precision: report})
    for line in report.summary_lines():
        print(line)
    print(f"wrote {path}")
    return 0 if report.passed else 1
