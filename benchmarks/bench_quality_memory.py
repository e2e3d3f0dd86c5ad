"""Peak memory and wall time of the quality report (and of `check --cases quick`) on a real-architecture checkpoint.

A benchmark, not a test. The checkpoint is synthetic (the released model's dimensions with N blocks, random bf16
weights; nucleus_export.model.synthetic). The bundle is a bf16 export at the default seven aspect ratios around
1024 (what `build` exports); the report runs the graph the engine is built from (MoE lowered to native layers with
the chain combine, bf16 emulated) against diffusers float32, with diffusers bf16 as the baseline, on the quick cases
(1024x1024: batch 1 early, batch 2 middle, batch 2 late; T = 128), segment by segment and block by block
(parity.streamed). The report runs in a child process whose peak RSS is the kernel's high-water mark (os.wait4).

    python benchmarks/bench_quality_memory.py --layers 6 [--workdir /tmp/nucleus-bench] [--precision bf16]
        [--combine chain] [--cases quick] [--images]

With --images the model is given as a pipeline root (the checkpoint as transformer/, a random VAE of the released
Qwen-Image dimensions as vae/), so the report also decodes every case's x0 estimate for PSNR/SSIM (parity.images).

Goal (issue 22): peak RSS <= 0.5 x checkpoint bytes + 2 GB, like the build.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from nucleus_export.model.synthetic import NUCLEUS_IMAGE, SYNTHETIC_PREFIX, checkpoint_bytes, ensure_synthetic_checkpoint


def _sample_memory(seconds: float = 15.0) -> None:
    """Log this process's RSS with the report's current phase (its debug lines) every few seconds, to stderr."""
    import logging
    import threading

    import psutil

    phase = {"now": "start"}

    class _Phase(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            phase["now"] = record.getMessage()

    log = logging.getLogger("nucleus_export")
    handler = _Phase(level=logging.DEBUG)
    log.addHandler(handler)
    log.setLevel(logging.DEBUG)
    for other in log.handlers:
        if other is not handler:
            other.setLevel(logging.INFO)
    process = psutil.Process()

    def beat() -> None:
        while True:
            time.sleep(seconds)
            print(f"[memory] {process.memory_info().rss / 1e9:.2f} GB RSS during: {phase['now']}", file=sys.stderr, flush=True)

    threading.Thread(target=beat, daemon=True).start()


def child(args: argparse.Namespace) -> int:
    from nucleus_runtime.bundle import LoweringRecord

    from nucleus_export.graph.precision import GraphPrecision
    from nucleus_export.log import setup_logging
    from nucleus_export.model.checkpoint import open_checkpoint
    from nucleus_export.parity.check import write_report
    from nucleus_export.parity.quality import quality_report

    setup_logging()
    _sample_memory()
    checkpoint = open_checkpoint(args.checkpoint)
    started = time.perf_counter()
    report = quality_report(checkpoint, args.bundle, GraphPrecision(args.precision), LoweringRecord("native", args.combine),
                            case_set=args.cases, images=args.images)
    write_report(args.bundle, {report.graph_precision: report})
    for line in report.summary_lines():
        print(line, flush=True)
    print(json.dumps({"report_seconds": time.perf_counter() - started, "passed": report.passed,
                      "pooled": report.pooled, "images": report.images}), flush=True)
    return 0


def pipeline_root(workdir: Path, transformer: Path) -> Path:
    """A pipeline root around the synthetic transformer: transformer/ links to it, vae/ is a random VAE of the
    released dimensions (written once)."""
    from nucleus_export.model.vae import QWEN_IMAGE_VAE, write_random_vae

    vae = workdir / "vae-qwen-image"
    if not (vae / "config.json").is_file():
        write_random_vae(vae, QWEN_IMAGE_VAE)
    root = workdir / f"pipeline-{transformer.name}"
    root.mkdir(parents=True, exist_ok=True)
    (root / "model_index.json").write_text(json.dumps({"_class_name": "NucleusMoEImagePipeline"}))
    for name, target in (("transformer", transformer), ("vae", vae)):
        if not (root / name).exists():
            (root / name).symlink_to(target.resolve())
    return root


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=6)
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/nucleus-bench"))
    parser.add_argument("--precision", default="bf16")
    parser.add_argument("--combine", default="chain")
    parser.add_argument("--cases", default="quick")
    parser.add_argument("--images", action="store_true", help="give the model as a pipeline root with a real-size VAE")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--checkpoint", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--bundle", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        return child(args)
    spec = f"{SYNTHETIC_PREFIX}{NUCLEUS_IMAGE}?layers={args.layers}"
    ckpt = ensure_synthetic_checkpoint(spec)
    bundle = args.workdir / f"L{args.layers}-{args.precision}"
    if not bundle.is_dir():
        args.workdir.mkdir(parents=True, exist_ok=True)
        subprocess.run([sys.executable, "-m", "nucleus_export.cli", "export", "--model", spec, "--precision",
                        args.precision, "--out", str(bundle)], check=True)
    model = pipeline_root(args.workdir, ckpt) if args.images else ckpt
    argv = [sys.executable, __file__, "--child", "--checkpoint", str(model), "--bundle", str(bundle), "--precision",
            args.precision, "--combine", args.combine, "--cases", args.cases, *(["--images"] if args.images else [])]
    started = time.perf_counter()
    proc = subprocess.Popen(argv)
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - started
    ckpt_bytes = checkpoint_bytes(ckpt)
    peak = usage.ru_maxrss * 1024
    budget = 0.5 * ckpt_bytes + 2e9
    print("| blocks | checkpoint GB | report wall s | peak RSS GB | budget GB (0.5 x ckpt + 2) | exit |")
    print(f"| {args.layers} | {ckpt_bytes / 1e9:.2f} | {wall:.0f} | {peak / 1e9:.2f} | {budget / 1e9:.2f} | "
          f"{os.waitstatus_to_exitcode(status)} |")
    return 0 if peak <= budget and status == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
