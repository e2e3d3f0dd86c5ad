"""Peak memory of `export` on a synthetic multi-GB checkpoint (a benchmark, not a test).

Writes a random bf16 checkpoint of the real architecture with the synthetic-checkpoint writer
(nucleus_export.model.synthetic: sharded safetensors + index + config.json, tensor by tensor), then exports it in a fresh process and prints that process's peak RSS
next to the checkpoint size. Goal: peak RSS below checkpoint/4 + 1 GB, so the 34 GB checkpoint exports on a 24 GB
machine.

    python benchmarks/bench_export_memory.py --size-gb 4 [--workdir /tmp/nucleus-bench] [--precision bf16]
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import subprocess
import sys
import textwrap
import time
from pathlib import Path

from nucleus_export.model.synthetic import checkpoint_bytes, write_synthetic_checkpoint
from nucleus_export.model.tiny import TINY_CONFIG

SHARD_BYTES = 1 << 30


def synthetic_config(size_gb: float) -> dict:
    """A 1024-wide model whose MoE block count is chosen so the bf16 checkpoint is about size_gb."""
    per_moe_block = 32 * 3 * 1024 * 1024 * 2  # routed experts dominate: E x (gate_up + down) x bf16
    layers = max(4, 3 + math.ceil(size_gb * 1e9 / per_moe_block * 0.93))
    return {
        **TINY_CONFIG,
        "num_layers": layers,
        "attention_head_dim": 128,
        "num_attention_heads": 8,
        "num_key_value_heads": 2,
        "axes_dims_rope": [16, 56, 56],
        "joint_attention_dim": 1024,
        "num_experts": 32,
        "moe_intermediate_dim": 1024,
        "capacity_factors": [0.0] * 3 + [2.0] * (layers - 3),
    }


EXPORT_SCRIPT = """
import json, sys, time
from nucleus_export.export import ExportOptions, export_bundle
from nucleus_export.graph.precision import GraphPrecision
from nucleus_export.model.checkpoint import open_checkpoint
def status(field):
    return int(next(l for l in open('/proc/self/status') if l.startswith(field)).split()[1]) * 1024
checkpoint = open_checkpoint(sys.argv[1])
base = status('VmRSS')
start = time.perf_counter()
export_bundle(checkpoint, sys.argv[2], ExportOptions(GraphPrecision(sys.argv[3]), resolutions=[(1024, 1024), (768, 1360)],
              max_text_len=512), force=True)
print(json.dumps({"peak_rss": status('VmHWM'), "rss_before_export": base, "seconds": time.perf_counter() - start}))
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size-gb", type=float, default=4.0)
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/nucleus-export-bench"))
    parser.add_argument("--precision", default="bf16", choices=["bf16", "fp16", "fp32"])
    parser.add_argument("--keep", action="store_true", help="keep the synthetic checkpoint and bundle")
    args = parser.parse_args()

    checkpoint_dir, bundle_dir = args.workdir / "checkpoint", args.workdir / "bundle"
    shutil.rmtree(args.workdir, ignore_errors=True)
    start = time.perf_counter()
    write_synthetic_checkpoint(checkpoint_dir, synthetic_config(args.size_gb), shard_bytes=SHARD_BYTES)
    size = checkpoint_bytes(checkpoint_dir)
    print(f"synthetic checkpoint: {size / 1e9:.2f} GB in {len(list(checkpoint_dir.glob('*.safetensors')))} shards "
          f"({time.perf_counter() - start:.0f} s to write)")
    result = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(EXPORT_SCRIPT), str(checkpoint_dir), str(bundle_dir), args.precision],
        capture_output=True, text=True,
    )
    if result.returncode:
        sys.exit(f"export failed:\n{result.stderr}")
    stats = json.loads(result.stdout.strip().splitlines()[-1])
    bundle = sum(p.stat().st_size for p in bundle_dir.iterdir())
    goal = size / 4 + 1e9
    print(f"export ({args.precision}): {stats['seconds']:.0f} s, bundle {bundle / 1e9:.2f} GB")
    print(f"peak RSS {stats['peak_rss'] / 1e9:.2f} GB (process before export {stats['rss_before_export'] / 1e9:.2f} GB) "
          f"vs checkpoint {size / 1e9:.2f} GB: ratio {stats['peak_rss'] / size:.3f}; goal < {goal / 1e9:.2f} GB "
          f"(checkpoint/4 + 1 GB): {'met' if stats['peak_rss'] < goal else 'NOT met'}")
    if not args.keep:
        shutil.rmtree(args.workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
