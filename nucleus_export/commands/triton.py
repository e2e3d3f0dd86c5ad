"""`triton`: bundle -> Triton Inference Server model repository (see nucleus_export/triton)."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from nucleus_runtime.text_kv_cache import DEFAULT_MAX_BYTES

from nucleus_export.commands.common import add_expect_manifest_argument
from nucleus_export.triton import configs, schema, serving
from nucleus_export.triton.repository import (
    TritonOptions,
    check_target,
    plan_repository,
    write_repository,
)

logger = logging.getLogger("nucleus_export")


def register(subparsers: argparse._SubParsersAction, common: argparse.ArgumentParser) -> None:
    p = subparsers.add_parser(
        "triton",
        parents=[common],
        help="write a Triton model repository for a bundle",
        description="Turn a bundle into a model repository that `tritonserver --model-repository REPO` serves: "
        "nucleus_pipeline (whole requests through the runtime's denoising loop, Python backend) owning the engines "
        "or graphs itself (--layout inprocess), or calling nucleus_text_kv and nucleus_denoiser served by Triton's "
        "TensorRT / ONNX Runtime backends (--layout bls).",
    )
    p.add_argument("--bundle", type=Path, required=True, help="bundle folder (manifest.json, graphs, engines)")
    p.add_argument("--repo", type=Path, required=True, help="model repository folder to write (new or empty)")
    p.add_argument(
        "--platform",
        choices=configs.PLATFORMS,
        default=configs.TENSORRT_PLAN,
        help="serve the TensorRT engines (GPU, default) or the ONNX graphs with ONNX Runtime (CPU, debugging)",
    )
    p.add_argument(
        "--layout",
        choices=configs.LAYOUTS,
        default=configs.DEFAULT_LAYOUT,
        help="inprocess (default): one Python model runs the graphs with nucleus_runtime, text K/V stays in it; "
        "bls: the graphs are Triton models called per step (text K/V crosses Triton every step). docs/triton.md",
    )
    p.add_argument(
        "--onnxruntime-threads",
        type=int,
        default=0,
        metavar="N",
        help="inprocess on ONNX Runtime: intra-op threads per instance (0 = one per core)",
    )
    p.add_argument("--instances", type=int, default=1, help="instances of each model (default 1)")
    p.add_argument(
        "--max-queue-delay-us",
        type=int,
        default=0,
        metavar="N",
        help="longest a pipeline request may wait, in Triton's queue and then for a place in a batch, before it is "
        "rejected, in microseconds (0 = no limit)",
    )
    p.add_argument(
        "--max-batch-requests",
        type=int,
        default=0,
        metavar="N",
        help="requests whose rows share one denoiser call per step (0 = as many as the bundle's batch profile holds, "
        "default; 1 = one request at a time, no batching across requests)",
    )
    p.add_argument(
        "--max-pending-requests",
        type=int,
        default=configs.PipelineSettings.max_pending_requests,
        metavar="N",
        help="requests an instance holds waiting for a place in a batch; more are refused at once "
        f"(default {configs.PipelineSettings.max_pending_requests})",
    )
    p.add_argument(
        "--request-timeout-s",
        type=float,
        default=0.0,
        metavar="S",
        help="default deadline of a request from its arrival, in seconds; a request past it fails with an error "
        "naming it (0 = none, default; a client's own request timeout takes precedence)",
    )
    p.add_argument(
        "--stream-progress",
        action="store_true",
        help="decoupled pipeline model: a progress response (step, total_steps, elapsed_seconds) after every step, "
        "then the result; clients use gRPC streaming",
    )
    p.add_argument("--name-prefix", default="", help="prefix for the three model names, to serve several bundles at once")
    p.add_argument(
        "--text-kv-cache-mib",
        type=int,
        default=DEFAULT_MAX_BYTES >> 20,
        help="per pipeline instance, text K/V kept across requests (MiB, LRU; 0 = only while its requests run)",
    )
    p.add_argument("--dry-run", action="store_true", help="print the tree and every config.pbtxt; write nothing")
    p.add_argument("--force", action="store_true", help="replace an existing model repository at --repo")
    add_expect_manifest_argument(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    options = TritonOptions(
        layout=args.layout,
        platform=args.platform,
        onnxruntime_threads=args.onnxruntime_threads,
        instances=args.instances,
        queue_timeout_us=args.max_queue_delay_us,
        name_prefix=args.name_prefix,
        text_kv_cache_bytes=max(0, args.text_kv_cache_mib) << 20,
        max_batch_requests=args.max_batch_requests,
        max_pending_requests=args.max_pending_requests,
        request_timeout_s=args.request_timeout_s,
        stream_progress=args.stream_progress,
        expect_manifest_sha256=args.expect_manifest_sha256,
    )
    # Refuse a non-empty --repo before reading (and checksumming) a possibly large bundle.
    if not args.dry_run:
        check_target(args.repo.absolute(), args.force)
    plan = plan_repository(args.bundle, options)
    if schema.available():
        for name, text in plan.configs().items():
            schema.parse_model_config(text, f"{name}/config.pbtxt")
    if args.dry_run:
        print(plan.describe(str(args.repo)))
        return 0
    write_repository(plan, args.repo, force=args.force)
    logger.info("wrote %s (%s, %s): %s", args.repo, args.layout, args.platform, ", ".join(plan.configs()))
    print(serving.server_command(str(args.repo.absolute()), plan.plugin_library).shell())
    return 0
