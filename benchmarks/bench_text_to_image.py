"""Prompt to PNG on the CPU: the runtime alone (`TextToImage`, ONNX Runtime, fp32) against diffusers'
NucleusMoEImagePipeline on the same medium pipeline, per stage and end to end, as ratios measured in one run; then
the peak RSS of the resident and the staged memory plans, each in a fresh child process. Not a test: it prints
tables (and --json writes them).

    python benchmarks/bench_text_to_image.py [--size 256x256] [--steps 4] [--rounds 3] [--threads 2]

The pipeline is tests/toy_pipeline.py's "medium" variant (random weights): the medium transformer of
nucleus_export.model.tiny, a 12-layer Qwen3-VL text encoder at a quarter of the real width (real head_dim, 151936-token
vocabulary), the real QwenImage VAE, a Qwen-like byte-level BPE processor with Qwen3-VL's chat template. Both sides
get the same prompt, the default negative prompt (""), the same initial latents and the same thread count; each
round times one full call of each, after one untimed warm-up call of each (model loading is not timed). Stage
times: diffusers' encode_prompt, transformer calls and vae.decode (+ post-processing) by wrapping them; the runtime's
own per-stage timings (its text encoder runs the template prefix once and then only each prompt's suffix).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))  # the toy pipeline writer
PROMPT = ("A cozy reading nook by a rain-streaked window, a ginger cat asleep on a knitted blanket, warm lamp light, "
          "a stack of three old books on the left and a steaming mug of tea on the right.")
MAX_TEXT_LEN = 512
STAGES = ("text encoder", "denoise", "vae decoder", "total")


def prepare(workdir: Path, size: tuple[int, int]) -> tuple[Path, Path]:
    """The medium pipeline root and its fp32 bundle serving `size` (both cached in workdir)."""
    from toy_pipeline import VARIANTS, allow_processor_without_torchvision, write_toy_pipeline

    from nucleus_export.cli import main

    root = workdir / "medium-pipeline"
    if not (root / "model_index.json").is_file():
        print(f"writing {root} ...", flush=True)
        write_toy_pipeline(root, VARIANTS["medium"])
    bundle = workdir / f"medium-bundle-{size[0]}x{size[1]}"
    if not (bundle / "manifest.json").is_file():
        print(f"exporting {bundle} ...", flush=True)
        with allow_processor_without_torchvision():
            rc = main(["export", "--model", str(root), "--out", str(bundle), "--precision", "fp32", "--force",
                       "--resolutions", f"{size[0]}x{size[1]}", "--max-text-len", str(MAX_TEXT_LEN)])
        if rc:
            sys.exit(rc)
    return root, bundle


class StageClock:
    """Wall time of wrapped callables, summed per stage name."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}

    def wrap(self, name: str, fn):
        def timed(*args, **kwargs):
            start = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - start

        return timed


def compare(root: Path, bundle: Path, size: tuple[int, int], steps: int, rounds: int, threads: int) -> dict:
    import torch
    from diffusers import NucleusMoEImagePipeline
    from nucleus_runtime.text_to_image import TextToImage
    from toy_pipeline import allow_processor_without_torchvision

    torch.set_num_threads(threads)
    height, width = size
    with allow_processor_without_torchvision():
        pipe = NucleusMoEImagePipeline.from_pretrained(root)
    pipe.set_progress_bar_config(disable=True)
    clock = StageClock()
    pipe.encode_prompt = clock.wrap("text encoder", pipe.encode_prompt)
    pipe.transformer.forward = clock.wrap("denoise", pipe.transformer.forward)
    pipe.vae.decode = clock.wrap("vae decoder", pipe.vae.decode)
    h, w = height // pipe.vae_scale_factor, width // pipe.vae_scale_factor
    noise = torch.randn(1, 1, 16, h, w, generator=torch.Generator().manual_seed(0))
    latents = pipe._pack_latents(noise, 1, 16, h, w, pipe.transformer.config.patch_size)
    runtime = TextToImage(bundle, "onnxruntime", threads=threads, memory_plan="resident")

    def run_diffusers() -> tuple[dict[str, float], np.ndarray]:
        clock.seconds = {}
        start = time.perf_counter()
        image = pipe(PROMPT, height=height, width=width, num_inference_steps=steps, latents=latents.clone(),
                     output_type="np").images
        clock.seconds["total"] = time.perf_counter() - start
        return dict(clock.seconds), (image * 255).round().astype(np.uint8)

    def run_runtime() -> tuple[dict[str, float], np.ndarray]:
        result = runtime.generate(PROMPT, height=height, width=width, steps=steps, latents=latents.numpy())
        t = result.timings
        return {"text encoder": t.tokenize_and_encode, "denoise": t.denoise, "vae decoder": t.vae_decoder,
                "total": t.total - t.load}, result.images

    with torch.inference_mode():
        run_diffusers()
        run_runtime()
        samples: dict[str, list[dict[str, float]]] = {"diffusers": [], "runtime": []}
        for r in range(rounds):
            d, d_image = run_diffusers()
            o, o_image = run_runtime()
            samples["diffusers"].append(d)
            samples["runtime"].append(o)
            print(f"round {r + 1}/{rounds}: diffusers {d['total']:.2f} s, runtime {o['total']:.2f} s", flush=True)
    runtime.close()
    median = {side: {s: statistics.median(x[s] for x in runs) for s in STAGES} for side, runs in samples.items()}
    return {
        "median_seconds": median,
        "speedup": {s: median["diffusers"][s] / median["runtime"][s] for s in STAGES},
        "max_pixel_difference": int(np.abs(d_image.astype(np.int16) - o_image.astype(np.int16)).max()),
        "text_tokens": int(runtime.tokenizer.encode([PROMPT])[0].shape[1]),
        "prefix_tokens": len(runtime.tokenizer.prefix_ids),
    }


CHILD = """
import json, sys, time
from nucleus_runtime.text_to_image import TextToImage
bundle, plan, steps, threads, height, width = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5]), int(sys.argv[6])
start = time.perf_counter()
with TextToImage(bundle, "onnxruntime", memory_plan=plan, threads=threads) as pipe:
    result = pipe.generate(%r, height=height, width=width, steps=steps, seed=0)
# VmHWM, not ru_maxrss: Linux carries ru_maxrss over from the forked parent (this benchmark's, holding diffusers).
peak = next(int(l.split()[1]) * 1024 for l in open("/proc/self/status") if l.startswith("VmHWM:"))
print(json.dumps({"seconds": time.perf_counter() - start, "peak_rss": peak, "stage_bytes": result.memory_plan.stage_bytes}))
"""


def memory_plans(bundle: Path, size: tuple[int, int], steps: int, threads: int) -> dict:
    """Peak RSS of one prompt-to-pixels call per memory plan, each in a fresh child process (its own VmHWM)."""
    out = {}
    for plan in ("resident", "staged"):
        proc = subprocess.run([sys.executable, "-c", CHILD % PROMPT, str(bundle), plan, str(steps), str(threads),
                               str(size[0]), str(size[1])], stdout=subprocess.PIPE, text=True)
        if proc.returncode:
            sys.exit(f"the {plan} child failed ({proc.returncode})")
        result = json.loads(proc.stdout.strip().splitlines()[-1])
        out[plan] = {"peak_rss_gb": round(result["peak_rss"] / 1e9, 3), "seconds": round(result["seconds"], 2),
                     "stage_weights_gb": {k: round(v / 1e9, 3) for k, v in result["stage_bytes"].items()}}
        print(f"memory plan {plan}: peak RSS {out[plan]['peak_rss_gb']} GB, {out[plan]['seconds']} s", flush=True)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", default="256x256", help="HxW in pixels")
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/bench-text-to-image"))
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args()
    size = tuple(int(v) for v in args.size.lower().split("x"))
    args.workdir.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("NUCLEUS_EXPORT_CACHE", str(args.workdir / "cache"))
    root, bundle = prepare(args.workdir, size)
    speed = compare(root, bundle, size, args.steps, args.rounds, args.threads)
    print(f"\nprompt to pixels, {size[0]}x{size[1]}, {args.steps} steps, CFG 4.0, {args.threads} threads, median of "
          f"{args.rounds} rounds; {speed['text_tokens']} text tokens of which {speed['prefix_tokens']} template prefix")
    print(f"{'stage':<14}{'diffusers s':>12}{'runtime s':>11}{'speedup':>9}")
    for s in STAGES:
        print(f"{s:<14}{speed['median_seconds']['diffusers'][s]:>12.3f}{speed['median_seconds']['runtime'][s]:>11.3f}"
              f"{speed['speedup'][s]:>8.2f}x")
    print(f"largest pixel difference between the two images: {speed['max_pixel_difference']}")
    memory = memory_plans(bundle, size, args.steps, args.threads)
    print(f"staged / resident peak RSS: {memory['staged']['peak_rss_gb'] / memory['resident']['peak_rss_gb']:.2f}")
    if args.json:
        args.json.write_text(json.dumps({"speed": speed, "memory": memory, "size": size, "steps": args.steps,
                                         "threads": args.threads, "rounds": args.rounds}, indent=2))


if __name__ == "__main__":
    main()
