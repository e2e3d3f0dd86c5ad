"""`nucleus-export run`: a bundle's pipeline with the runtime alone (ONNX Runtime or TensorRT).

Two interfaces:
- text in, picture out: `--prompt` (and `--negative-prompt`) through every stage (tokenizer, text encoder, text K/V,
  denoiser, VAE decoder; nucleus_runtime.text_to_image), a PNG written to `--out`;
- prompt embeddings in, latents out: `--prompt-embeds` [B,T,D] (+ `prompt_embeds_mask` [B,T]) from safetensors
  files, the final packed latents [B, S, in_channels] written as `latents` (the denoiser alone).

Neither imports torch, diffusers or transformers.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
from nucleus_runtime.atomic import atomic_file
from nucleus_runtime.backends import registry
from nucleus_runtime.bundle import Manifest, load_manifest, verify_files
from nucleus_runtime.contract import AUTO, ONNXRUNTIME, SCHEDULER_CONFIG_NAME
from nucleus_runtime.errors import NucleusError
from nucleus_runtime.pipeline import check_guidance, check_text, generate
from nucleus_runtime.png import write_png
from nucleus_runtime.scheduler import SchedulerConfig
from nucleus_runtime.text_kv_cache import TextKVCache
from nucleus_runtime.text_to_image import MEMORY_PLANS, TextToImage

from nucleus_export.commands.common import add_expect_manifest_argument
from nucleus_export.errors import UsageError
from nucleus_export.log import track
from nucleus_export.model.checkpoint import WeightStore, read_safetensors_header


def register(sub: argparse._SubParsersAction, common: argparse.ArgumentParser) -> None:
    parser = sub.add_parser(
        "run",
        parents=[common],
        help="denoise latents from prompt embeddings with a bundle (the pipeline's loop, text K/V cached)",
        description="Run the NucleusMoEImagePipeline denoising loop on a bundle: FlowMatch Euler schedule, CFG as one "
        "batch of 2, text K/V computed once. Inputs and output are safetensors files.",
    )
    parser.add_argument("--bundle", type=Path, required=True, help="bundle folder (from `export` or `build`)")
    text = parser.add_mutually_exclusive_group(required=True)
    text.add_argument("--prompt", help="the prompt: run every stage and write the picture (a bundle exported from a pipeline root)")
    text.add_argument("--prompt-embeds", type=Path, help="safetensors with prompt_embeds [B,T,D] (+ prompt_embeds_mask [B,T]): denoise only")
    parser.add_argument("--negative-prompt", help="with --prompt: the CFG negative prompt (default: the empty prompt, as the pipeline)")
    parser.add_argument("--negative-prompt-embeds", type=Path, help="with --prompt-embeds: the same for the negative prompt; needed when --guidance > 1")
    parser.add_argument("--height", type=int, help="image height in pixels (one of the bundle's resolutions; default: its optimization resolution)")
    parser.add_argument("--width", type=int, help="image width in pixels")
    parser.add_argument("--steps", type=int, default=50, help="denoising steps (default 50)")
    parser.add_argument("--guidance", type=float, default=4.0, help="CFG scale; CFG runs when > 1 (default 4.0)")
    start = parser.add_mutually_exclusive_group()
    start.add_argument("--latents", type=Path, help="safetensors with initial packed `latents` [B, S, in_channels]")
    start.add_argument("--seed", type=int, help="seed for numpy initial noise (default 0; not torch's randn)")
    parser.add_argument("--out", type=Path, required=True,
                        help="with --prompt: the PNG picture; with --prompt-embeds: safetensors file for the final `latents`")
    parser.add_argument("--memory-plan", choices=MEMORY_PLANS, default=AUTO,
                        help="with --prompt: keep every stage loaded (resident), load them one at a time and free each "
                        "(staged, for small GPUs), or auto (default): resident when the weights fit the free memory")
    parser.add_argument(
        "--backend",
        choices=registry.CHOICES,
        default=AUTO,
        help="auto (default): the TensorRT flavor that built the bundle's engines when it can run here (installed, GPU "
        "visible), else onnxruntime",
    )
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto", help="ONNX Runtime device (default auto)")
    parser.add_argument("--threads", type=int, help="ONNX Runtime intra-op threads (default: one per core)")
    parser.add_argument("--no-text-kv-cache", action="store_true", help="recompute text K/V at every step (same result, slower)")
    parser.add_argument(
        "--skip-checksums",
        action="store_true",
        help="do not check the graphs and engines against the manifest (a plugin library is always checked)",
    )
    parser.add_argument(
        "--weight-streaming-budget",
        type=float,
        metavar="GB",
        help="TensorRT weight streaming: keep only this much of the denoiser's weights on the GPU and stream the "
        "rest from host memory (engines built with `build --weight-streaming`; untested on a GPU here)",
    )
    add_expect_manifest_argument(parser)
    parser.set_defaults(func=run)


def read_tensors(path: Path, required: tuple[str, ...], optional: tuple[str, ...] = ()) -> dict[str, np.ndarray]:
    """Named tensors from a safetensors file (any dtype the checkpoint reader knows, bf16 included)."""
    if not path.is_file():
        raise UsageError(f"input file {path} does not exist.", "pass an existing .safetensors file.")
    store = WeightStore(read_safetensors_header(path, role="input file"))
    missing = [name for name in required if name not in store]
    if missing:
        raise NucleusError(
            f"{path} has no tensor {', '.join(repr(m) for m in missing)} (it holds: {', '.join(sorted(store)) or 'nothing'}).",
            f"save the tensors under the names {', '.join(required + optional)}.",
        )
    return {name: store.read(name) for name in required + optional if name in store}


def check_out_path(path: Path) -> None:
    """Refuse an --out that cannot be written before any work is done (its folder must exist: none is created)."""
    if path.is_dir():
        raise UsageError(f"--out {path} is a folder.", "pass a file path such as latents.safetensors.")
    if not path.absolute().parent.is_dir():
        raise UsageError(f"the folder of --out {path} does not exist.", "create it first, or choose another --out.")


def write_latents(path: Path, latents: np.ndarray, metadata: dict[str, str]) -> None:
    from safetensors.numpy import save_file

    with atomic_file(path) as tmp:
        save_file({"latents": np.ascontiguousarray(latents)}, str(tmp), metadata=metadata)


def backend_options(args: argparse.Namespace, name: str) -> registry.BackendOptions:
    if args.weight_streaming_budget is not None and name == ONNXRUNTIME:
        raise UsageError(
            "--weight-streaming-budget applies to the TensorRT backends only.", "add --backend tensorrt or drop it."
        )
    budget = None if args.weight_streaming_budget is None else int(args.weight_streaming_budget * 1e9)
    return registry.BackendOptions(args.device, args.threads, not args.skip_checksums, budget)


def check_mode(args: argparse.Namespace) -> None:
    """Refuse options of the other interface, and half a resolution."""
    if args.prompt is not None and args.negative_prompt_embeds is not None:
        raise UsageError("--negative-prompt-embeds goes with --prompt-embeds.", "with --prompt, pass --negative-prompt TEXT.")
    if args.prompt is None and args.negative_prompt is not None:
        raise UsageError("--negative-prompt goes with --prompt.", "with --prompt-embeds, pass --negative-prompt-embeds FILE.")
    if args.prompt is None and args.memory_plan != AUTO:
        raise UsageError("--memory-plan applies to --prompt runs (every stage).", "drop it, or run with --prompt.")
    if (args.height is None) != (args.width is None):
        raise UsageError("--height and --width go together.", "pass both, or neither for the bundle's optimization resolution.")


def run(args: argparse.Namespace) -> int:
    check_mode(args)
    check_out_path(args.out)
    manifest = load_manifest(args.bundle, args.expect_manifest_sha256)
    height, width = (args.height, args.width) if args.height else manifest.profiles.opt_resolution
    manifest.grid_for(height, width)
    latents = read_tensors(args.latents, ("latents",))["latents"] if args.latents else None
    seed = None if latents is not None else (args.seed if args.seed is not None else 0)
    check_guidance(args.guidance)
    if args.prompt is not None:
        return run_prompt(args, manifest, height, width, latents, seed)
    return run_embeddings(args, manifest, height, width, latents, seed)


def _progress(steps: range):
    return track(steps, "denoising", total=len(steps))


def run_prompt(args: argparse.Namespace, manifest: Manifest, height: int, width: int, latents: np.ndarray | None,
               seed: int | None) -> int:
    name = registry.resolve_backend(args.backend, args.bundle, manifest)
    options = backend_options(args, name)
    with TextToImage(args.bundle, name, memory_plan=args.memory_plan, device=options.device, threads=options.threads,
                     verify_checksums=options.verify_checksums, weight_streaming_budget=options.weight_streaming_budget,
                     manifest=manifest) as pipe:
        result = pipe.generate(args.prompt, args.negative_prompt, height=height, width=width, steps=args.steps,
                               guidance=args.guidance, seed=seed, latents=latents, progress=_progress)
    write_png(args.out, result.images[0])
    print(f"wrote {args.out}: {width}x{height} PNG, {args.steps} steps ({result.backend}, memory plan "
          f"{result.memory_plan.plan}): {result.timings.summary()}")
    return 0


def run_embeddings(args: argparse.Namespace, manifest: Manifest, height: int, width: int, latents: np.ndarray | None,
                   seed: int | None) -> int:
    if not args.skip_checksums:
        verify_files(args.bundle, manifest, [SCHEDULER_CONFIG_NAME])
    scheduler = SchedulerConfig.from_file(args.bundle / SCHEDULER_CONFIG_NAME)
    # Check everything about the request that needs no graph before loading the (possibly large) backend.
    prompt = read_tensors(args.prompt_embeds, ("prompt_embeds",), ("prompt_embeds_mask",))
    negative: dict[str, np.ndarray] = {}
    if args.negative_prompt_embeds is not None:
        negative = read_tensors(args.negative_prompt_embeds, ("prompt_embeds",), ("prompt_embeds_mask",))
    # The runtime's own checks (generate repeats them), run before the backend loads so bad inputs fail in a moment.
    text_dim = manifest.model_config["joint_attention_dim"]
    for tensors, name in ((prompt, "prompt_embeds"), (negative, "negative_prompt_embeds")):
        if tensors:
            tensors["prompt_embeds"], tensors["prompt_embeds_mask"] = check_text(
                name, tensors["prompt_embeds"], tensors.get("prompt_embeds_mask"), text_dim
            )
    name = registry.resolve_backend(args.backend, args.bundle, manifest)
    backend = registry.open_backend(args.bundle, name, manifest, backend_options(args, name))
    cache = None if args.no_text_kv_cache else TextKVCache()
    start = time.perf_counter()
    try:
        out = generate(
            backend,
            manifest,
            scheduler,
            prompt["prompt_embeds"],
            prompt.get("prompt_embeds_mask"),
            negative.get("prompt_embeds"),
            negative.get("prompt_embeds_mask"),
            height=height,
            width=width,
            steps=args.steps,
            guidance=args.guidance,
            latents=latents,
            seed=seed,
            cache=cache,
            recompute_text_kv=args.no_text_kv_cache,
            progress=_progress,
        )
    finally:
        backend.close()
    seconds = time.perf_counter() - start
    metadata = {
        "height": str(height),
        "width": str(width),
        "steps": str(args.steps),
        "guidance": str(args.guidance),
        "seed": "" if seed is None else str(seed),
        "bundle_identity": manifest.identity,
        "backend": backend.name,
    }
    write_latents(args.out, out, metadata)
    print(
        f"wrote {args.out}: latents {list(out.shape)}, {args.steps} steps in {seconds:.2f} s "
        f"({seconds / args.steps:.3f} s/step, {backend.name})"
    )
    return 0
