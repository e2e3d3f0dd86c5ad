"""Peak memory, wall time and disk of `export`, the bf16 build and the FP8 build on a real-architecture checkpoint.

A benchmark, not a test. The checkpoint is a synthetic one (nucleus_export.model.synthetic: the released model's
dimensions with N blocks and random bf16 weights, written tensor by tensor), so the numbers are those of the real
model's shapes. Every step runs the CLI in a fresh child process; its peak RSS comes from the kernel's accounting of
that child (os.wait4's rusage, the high-water mark of the process, sampled by nothing). The FP8 build takes
`--fp8-scales` from a scales file written here with one plausible amax per quantized GEMM input, since calibrating a
17B reference needs a GPU; the scales change values, not the graph, so memory and time are those of a calibrated
build.

    python benchmarks/bench_build_memory.py --layers 6 [--workdir /tmp/nucleus-bench] [--steps export,bf16,fp8]
        [--keep] [-- extra build arguments, e.g. --max-build-memory 6]

Goals (issue 11): build peak RSS <= 0.5 x checkpoint bytes + 2 GB; bundle bytes <= 1.25 x checkpoint bytes. The bundle
column counts what the bundle adds to the disk; the checkpoint shards it holds as hard links (export's default
`--weights link`) are listed apart, since they are the checkpoint's own bytes.
Progress lines (the child's log plus a heartbeat with the child's current RSS every 30 s) go to stderr, so a piped
log shows where a long run is; the table goes to stdout.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import psutil

from nucleus_export.model.checkpoint import open_checkpoint
from nucleus_export.model.config import ModelConfig
from nucleus_export.model.synthetic import (
    NUCLEUS_IMAGE,
    SYNTHETIC_PREFIX,
    checkpoint_bytes,
    ensure_synthetic_checkpoint,
)

STEPS = ("export", "bf16", "fp8")
HEARTBEAT_SECONDS = 30.0
# A plausible per-tensor activation amax for every quantized GEMM input (post-norm activations of a DiT reach a few
# units; SwiGLU outputs are smaller). Only the scale values depend on it, never the graph or the engine size.
PLAUSIBLE_AMAX = {"down_proj": 4.0, "net.2": 4.0, "to_out.0": 6.0}
DEFAULT_AMAX = 12.0


@dataclasses.dataclass
class StepResult:
    step: str
    wall_seconds: float
    peak_rss_bytes: int
    bundle_bytes: int  # new on disk
    linked_bytes: int  # hard links to the checkpoint's shards (no new disk)
    returncode: int


def inodes(folder: Path) -> set[tuple[int, int]]:
    return {(st.st_dev, st.st_ino) for st in (p.lstat() for p in folder.rglob("*") if p.is_file())}


def disk_bytes(folder: Path, shared: set[tuple[int, int]]) -> tuple[int, int]:
    """(bytes the folder adds to the disk, bytes it holds as hard links to the `shared` inodes: the checkpoint's
    shards). Each inode counts once."""
    seen: set[tuple[int, int]] = set()
    new = linked = 0
    for path in folder.rglob("*"):
        st = path.lstat()
        key = (st.st_dev, st.st_ino)
        if path.is_file() and key not in seen:
            seen.add(key)
            if key in shared:
                linked += st.st_size
            else:
                new += st.st_size
    return new, linked


def write_plausible_scales(config: ModelConfig, path: Path) -> None:
    """An fp8_scales.json naming every GEMM input the FP8 graph quantizes, with plausible amax values."""
    from nucleus_export.graph.precision import QuantRecipe
    from nucleus_export.quant.gemms import gemm_groups

    names = [gemm for group in gemm_groups(config) for gemm in group.gemms]
    amax = {n: next((v for k, v in PLAUSIBLE_AMAX.items() if n.endswith(k)), DEFAULT_AMAX) for n in names}
    calibration = {"source": "bench_build_memory.py: plausible values, not calibrated"}
    path.write_text(QuantRecipe(amax, calibration=calibration).to_json())


def run_step(step: str, argv: list[str], out: Path, env: dict[str, str], shared: set[tuple[int, int]]) -> StepResult:
    """Run one CLI call, relay its output with a heartbeat, and read its peak RSS from the kernel."""
    print(f"[bench] {step}: {' '.join(argv)}", file=sys.stderr, flush=True)
    started = time.perf_counter()
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env, text=True, bufsize=1)
    done = threading.Event()

    def heartbeat() -> None:
        child = psutil.Process(proc.pid)
        while not done.wait(HEARTBEAT_SECONDS):
            try:
                rss = child.memory_info().rss
            except psutil.Error:
                return
            avail = psutil.virtual_memory().available
            print(
                f"[bench] {step}: {time.perf_counter() - started:6.0f} s, RSS {rss / 1e9:5.2f} GB, "
                f"machine available {avail / 1e9:5.1f} GB",
                file=sys.stderr,
                flush=True,
            )

    beat = threading.Thread(target=heartbeat, daemon=True)
    beat.start()
    assert proc.stdout is not None
    for line in proc.stdout:
        print(f"[{step}] {line.rstrip()}", file=sys.stderr, flush=True)
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    done.set()
    wall = time.perf_counter() - started
    new, linked = disk_bytes(out, shared) if out.is_dir() else (0, 0)
    return StepResult(step, wall, usage.ru_maxrss * 1024, new, linked, proc.returncode)


def table(results: list[StepResult], ckpt_bytes: int, params: int, layers: int) -> str:
    gb = 1e9
    lines = [
        f"checkpoint: synthetic real-architecture, {layers} blocks, {params / 1e9:.2f} B parameters, "
        f"{ckpt_bytes / gb:.2f} GB bf16; machine: {os.cpu_count()} cores, {psutil.virtual_memory().total / 2**30:.0f} GiB",
        "",
        "| step | wall | peak RSS | RSS / ckpt | RSS goal (0.5 x ckpt + 2 GB) | bundle: new on disk | new / ckpt "
        "| bundle: linked checkpoint shards | exit |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    goal = 0.5 * ckpt_bytes + 2e9
    for r in results:
        lines.append(
            f"| {r.step} | {r.wall_seconds:.0f} s | {r.peak_rss_bytes / gb:.2f} GB | {r.peak_rss_bytes / ckpt_bytes:.2f} "
            f"| {'met' if r.peak_rss_bytes <= goal else 'missed'} ({goal / gb:.1f} GB) | {r.bundle_bytes / gb:.2f} GB "
            f"| {r.bundle_bytes / ckpt_bytes:.2f} | {r.linked_bytes / gb:.2f} GB | {r.returncode} |"
        )
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--layers", type=int, default=6, help="blocks of the synthetic model (32 = the real model)")
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/nucleus-bench"))
    parser.add_argument("--steps", default=",".join(STEPS), help=f"comma-separated subset of {','.join(STEPS)}")
    parser.add_argument("--backend", default="tensorrt-rtx")
    parser.add_argument("--resolutions", default=None, help="passed to every step (default: the CLI's default)")
    parser.add_argument("--keep", action="store_true", help="keep the bundles (the checkpoint cache is always kept)")
    parser.add_argument("--json", type=Path, help="also write the results as JSON")
    parser.add_argument("extra", nargs="*", help="extra arguments for the build steps (after --)")
    args = parser.parse_args()
    steps = [s for s in args.steps.split(",") if s]
    unknown = sorted(set(steps) - set(STEPS))
    if unknown:
        parser.error(f"unknown steps {unknown}; choose from {STEPS}")

    # The synthetic writer logs a line per shard: long runs show progress in a piped log too.
    logging.basicConfig(level=logging.INFO, format="[bench] %(message)s", stream=sys.stderr)
    args.workdir.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ)
    env.setdefault("NUCLEUS_EXPORT_CACHE", str(args.workdir / "cache"))
    os.environ["NUCLEUS_EXPORT_CACHE"] = env["NUCLEUS_EXPORT_CACHE"]
    spec = f"{SYNTHETIC_PREFIX}{NUCLEUS_IMAGE}?layers={args.layers}"
    started = time.perf_counter()
    ckpt_dir = ensure_synthetic_checkpoint(spec)
    print(f"[bench] checkpoint ready in {time.perf_counter() - started:.0f} s: {ckpt_dir}", file=sys.stderr, flush=True)
    ckpt_bytes = checkpoint_bytes(ckpt_dir)
    shared = inodes(ckpt_dir)
    checkpoint = open_checkpoint(ckpt_dir)
    params = checkpoint.weights.num_parameters

    cli = [sys.executable, "-c", "import sys; from nucleus_export.cli import main; sys.exit(main())"]
    shape_args = ["--resolutions", args.resolutions] if args.resolutions else []
    results = []
    for step in steps:
        out = args.workdir / f"bundle-{step}"
        if step == "export":
            argv = cli + ["export", "--model", str(ckpt_dir), "--precision", "bf16", "--out", str(out), "--force"]
        else:
            argv = cli + ["build", "--model", str(ckpt_dir), "--backend", args.backend, "--skip-quality",
                          "--out", str(out), "--force"] + list(args.extra)
            if step == "fp8":
                scales = args.workdir / "fp8_scales.json"
                write_plausible_scales(checkpoint.config, scales)
                argv += ["--fp8", "--fp8-scales", str(scales)]
        result = run_step(step, argv + shape_args, out, env, shared)
        results.append(result)
        print(table([result], ckpt_bytes, params, args.layers).splitlines()[-1], file=sys.stderr, flush=True)
        if not args.keep:
            shutil.rmtree(out, ignore_errors=True)
    print(table(results, ckpt_bytes, params, args.layers))
    if args.json:
        payload = {"layers": args.layers, "checkpoint_bytes": ckpt_bytes, "parameters": params,
                   "steps": [dataclasses.asdict(r) for r in results]}
        args.json.write_text(json.dumps(payload, indent=2))
    return 0 if all(r.returncode == 0 for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
