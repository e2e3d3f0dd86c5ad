"""Seconds per denoising step: the runtime (ONNX Runtime CPU) with and without the text K/V cache, against
diffusers' own NucleusMoEImagePipeline loop (CFG as two calls, TextKVCacheConfig enabled, fp32) on the same model,
with the same thread count. Not a test: it prints a table.

    python benchmarks/bench_runtime.py                      # tiny model and the ~70M-parameter config
    python benchmarks/bench_runtime.py --configs medium --steps 6 --threads 4

Per-step times exclude the one-off text K/V computation of the cached runs (it is reported as "text K/V once");
the uncached run recomputes it inside every step. Each run starts with one untimed warm-up step; the median step time is reported.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))  # the helper that imports diffusers' pipeline without transformers

# A scaled-down Nucleus-Image with its proportions: GQA 4:1, text width 2x hidden, 3 dense blocks then MoE blocks,
# 2 routed experts per token on average; ~72M parameters.
MEDIUM_CONFIG: dict[str, Any] = {
    "num_layers": 8,
    "attention_head_dim": 64,
    "num_attention_heads": 8,
    "num_key_value_heads": 2,
    "joint_attention_dim": 1024,
    "axes_dims_rope": [8, 28, 28],
    "num_experts": 16,
    "moe_intermediate_dim": 320,
    "capacity_factors": [0.0, 0.0, 0.0, 4.0, 4.0, 2.0, 2.0, 2.0],
}


@dataclasses.dataclass
class Case:
    name: str
    config: dict[str, Any] | None  # overrides on the tiny config; None = the tiny model itself
    height: int
    width: int
    text_len: int
    negative_len: int


CASES = {
    "tiny": Case("tiny", None, 256, 256, 32, 8),
    # 512x512 -> 1024 image tokens next to 128 text tokens: the 8:1 ratio of 1024x1024 with a typical prompt.
    "medium": Case("medium", MEDIUM_CONFIG, 512, 512, 128, 16),
}


@dataclasses.dataclass
class Timing:
    label: str
    seconds_per_step: float
    text_kv_seconds: float | None = None


def stamped(times: list[float]) -> Callable[[range], Iterator[int]]:
    """Progress hook that records the time at each step boundary."""

    def wrap(steps: range) -> Iterator[int]:
        for i in steps:
            times.append(time.perf_counter())
            yield i
        times.append(time.perf_counter())

    return wrap


def per_step(times: list[float]) -> float:
    # Drop the first step (warm-up: allocations, first-run kernels) on both sides; the median resists the noise of
    # a shared machine.
    return float(np.median(np.diff(times)[1:]))


def checkpoint_for(case: Case, workdir: Path) -> Path:
    from nucleus_export.model.tiny import ensure_tiny_checkpoint, write_checkpoint

    if case.config is None:
        return ensure_tiny_checkpoint()
    return write_checkpoint(workdir / f"{case.name}-checkpoint", config=case.config)


def bench_runtime(bundle: Path, inputs: dict[str, np.ndarray], case: Case, steps: int, threads: int, optimization: str) -> list[Timing]:
    from nucleus_runtime.backends.onnxruntime import OrtBackend, OrtOptions
    from nucleus_runtime.bundle import SCHEDULER_CONFIG_NAME, load_manifest
    from nucleus_runtime.pipeline import generate
    from nucleus_runtime.scheduler import SchedulerConfig
    from nucleus_runtime.text_kv_cache import TextKVCache

    manifest = load_manifest(bundle)
    scheduler = SchedulerConfig.from_file(bundle / SCHEDULER_CONFIG_NAME)
    backend = OrtBackend(bundle, OrtOptions(threads=threads, optimization=optimization), manifest=manifest)
    results = []
    for cached in (True, False):
        times: list[float] = []
        start = time.perf_counter()
        generate(
            backend, manifest, scheduler,
            inputs["prompt_embeds"], None, inputs["negative_prompt_embeds"], None,
            height=case.height, width=case.width, steps=steps + 1, guidance=4.0, latents=inputs["latents"],
            cache=TextKVCache() if cached else None, recompute_text_kv=not cached, progress=stamped(times),
        )
        label = f"runtime ORT ({optimization}), {'cached' if cached else 'uncached'}"
        results.append(Timing(label, per_step(times), times[0] - start if cached else None))
    return results


def bench_diffusers(checkpoint: Path, inputs: dict[str, np.ndarray], case: Case, steps: int, threads: int, scheduler_raw: dict) -> Timing:
    import torch
    from diffusers import FlowMatchEulerDiscreteScheduler
    from diffusers.hooks import TextKVCacheConfig
    from test_runtime_units import diffusers_pipeline_class

    from nucleus_export.model.checkpoint import open_checkpoint
    from nucleus_export.model.reference import load_reference

    torch.set_num_threads(threads)
    transformer = load_reference(open_checkpoint(checkpoint))
    transformer.enable_cache(TextKVCacheConfig())
    pipe = diffusers_pipeline_class()(
        transformer=transformer, scheduler=FlowMatchEulerDiscreteScheduler.from_config(scheduler_raw),
        vae=None, text_encoder=None, processor=None,
    )
    pipe.set_progress_bar_config(disable=True)
    times: list[float] = []

    def on_step_end(_pipe, _i, _t, kwargs):
        times.append(time.perf_counter())
        return kwargs

    text = {k: torch.from_numpy(v) for k, v in inputs.items()}
    with torch.inference_mode():
        times.append(time.perf_counter())
        pipe(
            prompt_embeds=text["prompt_embeds"],
            prompt_embeds_mask=torch.ones(text["prompt_embeds"].shape[:2], dtype=torch.long),
            negative_prompt_embeds=text["negative_prompt_embeds"],
            negative_prompt_embeds_mask=torch.ones(text["negative_prompt_embeds"].shape[:2], dtype=torch.long),
            latents=text["latents"], height=case.height, width=case.width, num_inference_steps=steps + 1,
            guidance_scale=4.0, output_type="latent", callback_on_step_end=on_step_end,
        )
    return Timing("diffusers pipeline (2 calls/step, TextKVCache)", per_step(times))


def run_case(case: Case, steps: int, threads: int, optimization: str, workdir: Path) -> dict[str, Any]:
    from nucleus_export.export import ExportOptions, export_bundle
    from nucleus_export.model.checkpoint import open_checkpoint

    checkpoint = checkpoint_for(case, workdir)
    opened = open_checkpoint(checkpoint)
    params = sum(int(np.prod(opened.weights.shape(n))) for n in opened.weights)
    bundle = workdir / f"{case.name}-bundle"
    options = ExportOptions(resolutions=[(case.height, case.width)], max_text_len=case.text_len, opt_text_len=case.text_len)
    export_bundle(opened, bundle, options, force=True)
    config = opened.config.to_dict()
    grid = (case.height // 16, case.width // 16)
    rng = np.random.default_rng(0)
    inputs = {
        "prompt_embeds": rng.standard_normal((1, case.text_len, config["joint_attention_dim"])).astype(np.float32),
        "negative_prompt_embeds": rng.standard_normal((1, case.negative_len, config["joint_attention_dim"])).astype(np.float32),
        "latents": rng.standard_normal((1, grid[0] * grid[1], config["in_channels"])).astype(np.float32),
    }
    timings = bench_runtime(bundle, inputs, case, steps, threads, optimization)
    scheduler_raw = json.loads((bundle / "scheduler_config.json").read_text())
    timings.append(bench_diffusers(checkpoint, inputs, case, steps, threads, scheduler_raw))
    return {"case": case, "params": params, "timings": timings}


def report(result: dict[str, Any], threads: int) -> None:
    case, timings = result["case"], result["timings"]
    cached, uncached, reference = timings
    print(
        f"\n{case.name}: {result['params'] / 1e6:.1f}M parameters, {case.height}x{case.width} px "
        f"({case.height // 16 * case.width // 16} image tokens), text {case.text_len} + negative {case.negative_len} "
        f"tokens, CFG 4.0, {threads} threads, load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs"
    )
    for t in timings:
        extra = f"   (text K/V once: {t.text_kv_seconds * 1000:.1f} ms)" if t.text_kv_seconds is not None else ""
        print(f"  {t.label:<48} {t.seconds_per_step * 1000:9.1f} ms/step{extra}")
    print(f"  cache speed-up (uncached / cached):             {uncached.seconds_per_step / cached.seconds_per_step:6.2f}x")
    print(f"  runtime vs diffusers (diffusers / cached):      {reference.seconds_per_step / cached.seconds_per_step:6.2f}x")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--configs", default="tiny,medium", help="comma-separated: " + ", ".join(CASES))
    parser.add_argument("--steps", type=int, default=4, help="timed steps per run (plus one warm-up)")
    parser.add_argument("--threads", type=int, default=2, help="threads for ONNX Runtime and torch alike")
    parser.add_argument("--optimization", default="all", choices=("all", "extended", "basic", "disabled"))
    parser.add_argument("--workdir", type=Path, help="keep checkpoints and bundles here (default: a temporary folder)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="nucleus-bench-") as tmp:
        workdir = args.workdir or Path(tmp)
        workdir.mkdir(parents=True, exist_ok=True)
        for name in args.configs.split(","):
            report(run_case(CASES[name.strip()], args.steps, args.threads, args.optimization, workdir), args.threads)
    return 0


if __name__ == "__main__":
    sys.exit(main())
