"""Seconds per denoising step: the runtime (ONNX Runtime CPU) with and without the text K/V cache, against
diffusers' own NucleusMoEImagePipeline loop (CFG as two calls, TextKVCacheConfig enabled, fp32) on the same model,
with the same thread count. Not a test: it prints a table.

    python benchmarks/bench_runtime.py                      # tiny model and the ~70M-parameter config
    python benchmarks/bench_runtime.py --configs medium --steps 6 --threads 4

Per-step times exclude the one-off text K/V computation of the cached run; the uncached run recomputes it inside
every step. Every run starts with one untimed warm-up step; the runs are repeated in turns (--rounds) and the best
and the median step are reported, the best being the one least disturbed by other load on the machine.
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

from nucleus_export.model.tiny import MEDIUM_CONFIG

ROOT = Path(__file__).resolve().parents[1]

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
    """Step times of one way of running, over all rounds (warm-up steps dropped)."""

    label: str
    steps: list[float] = dataclasses.field(default_factory=list)

    @property
    def best(self) -> float:
        return min(self.steps)

    @property
    def median(self) -> float:
        return float(np.median(self.steps))


# A runner does one run of `steps` steps and returns the step durations, the first (warm-up) step dropped.
Runner = Callable[[int], list[float]]


def stamped(times: list[float]) -> Callable[[range], Iterator[int]]:
    """Progress hook that records the time at each step boundary."""

    def wrap(steps: range) -> Iterator[int]:
        for i in steps:
            times.append(time.perf_counter())
            yield i
        times.append(time.perf_counter())

    return wrap


def checkpoint_for(case: Case, workdir: Path) -> Path:
    from nucleus_export.model.tiny import ensure_tiny_checkpoint, write_checkpoint

    if case.config is None:
        return ensure_tiny_checkpoint()
    path = workdir / f"{case.name}-checkpoint"
    return path if (path / "config.json").is_file() else write_checkpoint(path, config=case.config)


def runtime_runners(bundle: Path, inputs: dict[str, np.ndarray], case: Case, threads: int, optimization: str) -> dict[str, Runner]:
    from nucleus_runtime.backends.onnxruntime import OrtBackend, OrtOptions
    from nucleus_runtime.bundle import load_manifest
    from nucleus_runtime.contract import SCHEDULER_CONFIG_NAME
    from nucleus_runtime.pipeline import generate
    from nucleus_runtime.scheduler import SchedulerConfig
    from nucleus_runtime.text_kv_cache import TextKVCache

    manifest = load_manifest(bundle)
    scheduler = SchedulerConfig.from_file(bundle / SCHEDULER_CONFIG_NAME)
    backend = OrtBackend(bundle, OrtOptions(threads=threads, optimization=optimization), manifest=manifest)

    def runner(cached: bool) -> Runner:
        def run(steps: int) -> list[float]:
            times: list[float] = []
            generate(
                backend, manifest, scheduler,
                inputs["prompt_embeds"], None, inputs["negative_prompt_embeds"], None,
                height=case.height, width=case.width, steps=steps, guidance=4.0, latents=inputs["latents"],
                cache=TextKVCache() if cached else None, recompute_text_kv=not cached, progress=stamped(times),
            )
            return np.diff(times)[1:].tolist()

        return run

    return {f"runtime ORT ({optimization}), cached": runner(True), f"runtime ORT ({optimization}), uncached": runner(False)}


def diffusers_runner(checkpoint: Path, inputs: dict[str, np.ndarray], case: Case, threads: int, scheduler_raw: dict) -> Runner:
    import torch
    from diffusers import FlowMatchEulerDiscreteScheduler, NucleusMoEImagePipeline
    from diffusers.hooks import TextKVCacheConfig

    from nucleus_export.model.checkpoint import open_checkpoint
    from nucleus_export.model.reference import load_reference

    torch.set_num_threads(threads)
    transformer = load_reference(open_checkpoint(checkpoint))
    transformer.enable_cache(TextKVCacheConfig())
    pipe = NucleusMoEImagePipeline(
        transformer=transformer, scheduler=FlowMatchEulerDiscreteScheduler.from_config(scheduler_raw),
        vae=None, text_encoder=None, processor=None,
    )
    pipe.set_progress_bar_config(disable=True)
    text = {k: torch.from_numpy(v) for k, v in inputs.items()}

    def run(steps: int) -> list[float]:
        times = [time.perf_counter()]

        def on_step_end(_pipe, _i, _t, kwargs):
            times.append(time.perf_counter())
            return kwargs

        with torch.inference_mode():
            pipe(
                prompt_embeds=text["prompt_embeds"],
                prompt_embeds_mask=torch.ones(text["prompt_embeds"].shape[:2], dtype=torch.long),
                negative_prompt_embeds=text["negative_prompt_embeds"],
                negative_prompt_embeds_mask=torch.ones(text["negative_prompt_embeds"].shape[:2], dtype=torch.long),
                latents=text["latents"], height=case.height, width=case.width, num_inference_steps=steps,
                guidance_scale=4.0, output_type="latent", callback_on_step_end=on_step_end,
            )
        return np.diff(times)[1:].tolist()  # the first difference also holds the pipeline's setup

    return run


def measure(runners: dict[str, Runner], steps: int, rounds: int) -> list[Timing]:
    """Run each way `rounds` times, interleaved so that load from elsewhere falls on all of them alike."""
    timings = {label: Timing(label) for label in runners}
    for _ in range(rounds):
        for label, run in runners.items():
            timings[label].steps.extend(run(steps + 1))
    return list(timings.values())


def run_case(case: Case, args: argparse.Namespace, workdir: Path) -> dict[str, Any]:
    from nucleus_export.export import ExportOptions, export_bundle
    from nucleus_export.model.checkpoint import open_checkpoint

    checkpoint = checkpoint_for(case, workdir)
    opened = open_checkpoint(checkpoint)
    params = sum(int(np.prod(opened.weights.shape(n))) for n in opened.weights)
    bundle = workdir / f"{case.name}-bundle"
    options = ExportOptions(resolutions=[(case.height, case.width)], max_text_len=case.text_len, opt_text_len=case.text_len)
    if not (bundle / "manifest.json").is_file():
        export_bundle(opened, bundle, options)
    config = opened.config.to_dict()
    grid = (case.height // 16, case.width // 16)
    rng = np.random.default_rng(0)
    inputs = {
        "prompt_embeds": rng.standard_normal((1, case.text_len, config["joint_attention_dim"])).astype(np.float32),
        "negative_prompt_embeds": rng.standard_normal((1, case.negative_len, config["joint_attention_dim"])).astype(np.float32),
        "latents": rng.standard_normal((1, grid[0] * grid[1], config["in_channels"])).astype(np.float32),
    }
    runners = runtime_runners(bundle, inputs, case, args.threads, args.optimization)
    scheduler_raw = json.loads((bundle / "scheduler_config.json").read_text())
    runners["diffusers pipeline (2 calls/step, TextKVCache)"] = diffusers_runner(checkpoint, inputs, case, args.threads, scheduler_raw)
    if args.compare_optimization and args.optimization != "disabled":
        # The same cached run without ONNX Runtime's graph optimizations: what fusions and layout changes buy.
        label, run = next(iter(runtime_runners(bundle, inputs, case, args.threads, "disabled").items()))
        runners[label] = run
    return {"case": case, "params": params, "timings": measure(runners, args.steps, args.rounds)}


def report(result: dict[str, Any], threads: int) -> None:
    case, timings = result["case"], result["timings"]
    cached, uncached, reference = timings[:3]
    print(
        f"\n{case.name}: {result['params'] / 1e6:.1f}M parameters, {case.height}x{case.width} px "
        f"({case.height // 16 * case.width // 16} image tokens), text {case.text_len} + negative {case.negative_len} "
        f"tokens, CFG 4.0, {threads} threads, load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs"
    )
    print(f"  {'ms per step':<48} {'best':>9} {'median':>9}")
    for t in timings:
        print(f"  {t.label:<48} {t.best * 1000:9.1f} {t.median * 1000:9.1f}")
    print(f"  cache speed-up (uncached / cached):              {uncached.best / cached.best:6.2f}x {uncached.median / cached.median:8.2f}x")
    print(f"  runtime vs diffusers (diffusers / cached):       {reference.best / cached.best:6.2f}x {reference.median / cached.median:8.2f}x")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--configs", default="tiny,medium", help="comma-separated: " + ", ".join(CASES))
    parser.add_argument("--steps", type=int, default=4, help="timed steps per run (plus one warm-up)")
    parser.add_argument("--threads", type=int, default=2, help="threads for ONNX Runtime and torch alike")
    parser.add_argument("--rounds", type=int, default=2, help="interleaved repetitions of every run (default 2)")
    parser.add_argument("--optimization", default="all", choices=("all", "extended", "basic", "disabled"))
    parser.add_argument("--compare-optimization", action="store_true", help="also time the cached runtime with graph optimizations off")
    parser.add_argument("--workdir", type=Path, help="keep checkpoints and bundles here (default: a temporary folder)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="nucleus-bench-") as tmp:
        workdir = args.workdir or Path(tmp)
        workdir.mkdir(parents=True, exist_ok=True)
        for name in args.configs.split(","):
            report(run_case(CASES[name.strip()], args, workdir), args.threads)
    return 0


if __name__ == "__main__":
    sys.exit(main())
