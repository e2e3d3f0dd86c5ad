"""Arguments shared by several subcommands, and their translation into option dataclasses."""

from __future__ import annotations

import argparse
import re
from pathlib import Path

from nucleus_runtime.bundle import check_sha256_hex
from nucleus_runtime.contract import CHECKPOINT_LINKS_DIR, OPTIONAL_STAGES
from nucleus_runtime.errors import NucleusError

from nucleus_export.errors import NucleusExportError
from nucleus_export.export import INLINE_WEIGHTS_MAX_BYTES, ExportOptions
from nucleus_export.graph.precision import COMPUTE_DTYPES, GraphPrecision
from nucleus_export.model.components import parse_stages
from nucleus_export.model.specs import MODEL_HELP
from nucleus_export.model.text_encoder import DEFAULT_RETURN_INDEX
from nucleus_export.resolutions import (
    DEFAULT_BASE,
    aspect_resolutions,
    parse_resolutions,
)


def _sha256_argument(value: str) -> str:
    try:
        return check_sha256_hex(value)
    except NucleusError as exc:
        raise argparse.ArgumentTypeError(exc.problem) from None


def _stages_argument(value: str) -> tuple[str, ...]:
    try:
        return parse_stages(value)
    except NucleusExportError as exc:
        raise argparse.ArgumentTypeError(f"{exc.problem} {exc.fix}") from None


def add_expect_manifest_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--expect-manifest-sha256",
        type=_sha256_argument,
        metavar="HEX",
        help="refuse the bundle unless manifest.json has this sha256 (`sha256sum BUNDLE/manifest.json` where you "
        "trust it). The manifest records every file's checksum, so this pins the whole bundle, plugins included",
    )


def add_image_scores_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--skip-image-scores",
        action="store_true",
        help="skip the PSNR/SSIM of decoded images in the quality report (each case's x0 estimate decoded by the "
        "pipeline's VAE in float32: about a minute per 1024x1024 image on a CPU)",
    )


def add_model_argument(parser: argparse.ArgumentParser | argparse._MutuallyExclusiveGroup, required: bool = True) -> None:
    parser.add_argument("--model", required=required, help=MODEL_HELP)


def add_out_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--out", type=Path, help="bundle folder to create (default: ./bundle-<model>-<precision> in the current folder)"
    )
    parser.add_argument("--force", action="store_true", help="replace --out if it exists")


def bundle_path(args: argparse.Namespace, label: str) -> Path:
    """--out, or a name derived from the model and precision, so `build --fp8 --model tiny` needs nothing else."""
    if args.out:
        return args.out
    name = re.sub(r"[^A-Za-z0-9._-]+", "-", Path(str(args.model)).name).strip("-")
    return Path(f"bundle-{name}-{label}")


def add_export_arguments(parser: argparse.ArgumentParser, default_precision: str = "fp32") -> None:
    group = parser.add_argument_group("graph shapes and precision")
    group.add_argument(
        "--precision",
        choices=sorted(COMPUTE_DTYPES),
        default=default_precision,
        help=f"GEMM compute dtype; norms, softmax, router and RoPE stay fp32 (default {default_precision})",
    )
    group.add_argument(
        "--resolutions",
        type=parse_resolutions,
        help="pixel sizes HxW[,HxW...] the graphs serve (default: seven aspect ratios 1:1..16:9/9:16 at --base-resolution)",
    )
    group.add_argument(
        "--base-resolution",
        type=int,
        default=DEFAULT_BASE,
        help=f"side of the square the default aspect ratios are scaled around (default {DEFAULT_BASE})",
    )
    group.add_argument("--opt-resolution", type=lambda s: parse_resolutions(s)[0], help="HxW engines are tuned for")
    group.add_argument(
        "--stages",
        type=_stages_argument,
        help="stages to export and build, comma-separated among text_encoder,text_kv,denoiser,vae_decoder (the "
        "transformer's text_kv and denoiser always; default: every stage the model provides: a pipeline root or Hub id gives all four)",
    )
    group.add_argument("--max-batch", type=int, default=2, help="largest batch (2: prompt + negative prompt)")
    group.add_argument("--max-text-len", type=int, default=1024, help="longest prompt in tokens (default 1024)")
    group.add_argument("--opt-text-len", type=int, help="typical prompt length (default: 128, or --max-text-len if smaller)")
    group.add_argument(
        "--return-index",
        type=int,
        default=DEFAULT_RETURN_INDEX,
        help=f"the text encoder hidden state the pipeline reads (its return_index, default {DEFAULT_RETURN_INDEX})",
    )
    group.add_argument(
        "--external-data",
        choices=["auto", "always", "never"],
        default="auto",
        help=f"store weights outside the graph files (auto: when they exceed {INLINE_WEIGHTS_MAX_BYTES >> 20} MiB)",
    )
    group.add_argument(
        "--weights",
        choices=["link", "copy"],
        default="link",
        help=f"with external data, link: weights used as the checkpoint stores them (its dtype) are read from hard "
        f"links to its shards under {CHECKPOINT_LINKS_DIR}/, not copied (copied where the file system refuses a link); "
        "copy: every weight in <graph>.onnx.data",
    )


def export_options(args: argparse.Namespace, precision: GraphPrecision | None = None) -> ExportOptions:
    return ExportOptions(
        precision=precision or GraphPrecision(args.precision),
        resolutions=args.resolutions or aspect_resolutions(args.base_resolution),
        opt_resolution=args.opt_resolution,
        max_batch=args.max_batch,
        max_text_len=args.max_text_len,
        opt_text_len=args.opt_text_len,
        external_data={"auto": None, "always": True, "never": False}[args.external_data],
        link_checkpoint=args.weights == "link",
        stages=args.stages,
        return_index=args.return_index,
    )


def requested_stages(args: argparse.Namespace) -> tuple[str, ...]:
    """The optional stages an export or build asks the model for (every one unless --stages narrows them)."""
    return tuple(s for s in (args.stages or OPTIONAL_STAGES) if s in OPTIONAL_STAGES)
