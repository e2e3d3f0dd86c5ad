"""`nucleus-export export`: write the ONNX bundle."""

from __future__ import annotations

import argparse

from nucleus_runtime.contract import CHECKPOINT_LINKS_DIR

from nucleus_export.commands.common import (
    add_export_arguments,
    add_model_argument,
    add_out_argument,
    bundle_path,
    export_options,
    requested_stages,
)
from nucleus_export.export import export_bundle
from nucleus_export.model.specs import open_model


def register(sub: argparse._SubParsersAction, common: argparse.ArgumentParser) -> None:
    parser = sub.add_parser(
        "export",
        parents=[common],
        help="export text_kv.onnx and denoiser.onnx (MoE as nucleus custom ops) into a bundle folder",
        description="Export the transformer into a bundle: text_kv.onnx, denoiser.onnx, scheduler_config.json, "
        "manifest.json. Written to a temporary folder and renamed into place.",
    )
    add_model_argument(parser)
    add_out_argument(parser)
    add_export_arguments(parser)
    parser.add_argument(
        "--segments",
        type=int,
        metavar="N",
        help="also cut denoiser.onnx into N graphs of consecutive blocks (denoiser.seg<k>.onnx, same weights file); "
        "runtimes run them in sequence with the same results",
    )
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    checkpoint = open_model(args.model, requested_stages(args))
    options = export_options(args)
    options.segments = args.segments
    out = bundle_path(args, options.precision.label)
    manifest = export_bundle(checkpoint, out, options, force=args.force)
    total = sum(f.bytes for f in manifest.files.values())
    linked = sum(f.bytes for name, f in manifest.files.items() if name.startswith(CHECKPOINT_LINKS_DIR + "/"))
    shared = f", of which {linked / 1e6:.1f} MB are the checkpoint's shards, hard-linked" if linked else ""
    print(f"exported {out} ({manifest.precision}, {len(manifest.profiles.resolutions)} resolutions, {total / 1e6:.1f} MB{shared})")
    return 0
