"""Quality report of a built bundle: the graph TensorRT builds, run in ONNX Runtime on the CPU against diffusers'
float32 forward, next to diffusers itself run in bf16 on the same cases; written to parity.json.

The graph under test is the one the engine was built from: MoE lowered to native layers (`--moe native`,
nucleus_export.rewrites.as_built) or, for plugin builds, the custom nodes with the combine inlined (the plugins
implement the reference bodies). ONNX Runtime's CPU provider runs FP8 QuantizeLinear/DequantizeLinear but has no
bfloat16 MatMul, so bf16 graphs run through `emulate_bf16_in_fp32` after lowering: every bf16 tensor of the lowered
graph, the combine's per-contribution rounding included, is rounded where it is produced, whatever formulation the
lowering chose.

Default gate for bf16, fp16 and FP8 graphs: against float32 truth, pooled over all cases, relative error, 1 - cosine
and 1 - routing agreement at most (1 + BASELINE_MARGIN) x those of diffusers in bf16 (parity.check.Tolerance).
When the model is a pipeline root, the report also gives PSNR and SSIM of each case's decoded x0 estimate
(parity.images), reported beside the gate.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import onnx
from nucleus_runtime.bundle import LoweringRecord, Manifest, load_manifest
from nucleus_runtime.contract import DENOISER_GRAPH as DENOISER
from nucleus_runtime.contract import MOE_PLUGIN
from nucleus_runtime.contract import TEXT_KV_GRAPH as TEXT_KV
from nucleus_runtime.contract import onnx_file

from nucleus_export.graph.precision import GraphPrecision
from nucleus_export.model.checkpoint import Checkpoint
from nucleus_export.model.vae import VAE_FOLDER, open_vae
from nucleus_export.parity.check import ParityReport, Tolerance
from nucleus_export.parity.images import ImageDecoder, decode_bytes, diffusers_decoder
from nucleus_export.parity.streamed import SegmentGraphs, parity_segments
from nucleus_export.rewrites.segments import block_weight_bytes, split_segments
from nucleus_export.rewrites.as_built import engine_graph
from nucleus_export.rewrites.bf16_emulation import EMULATION_LABEL, emulate_bf16_in_fp32, has_bf16

if TYPE_CHECKING:
    import torch

# The case set is a sample and routing flips are discrete, so one graph's pooled error moves with the inputs: on the
# tiny model's quick case set over 4 case seeds, the bf16 graph's relative error spans 1.11e-2..1.61e-2 (largest
# 1.14x the mean), FP8's and diffusers-bf16's 1.01x. A graph may exceed diffusers-bf16 by that spread before it
# counts as worse.
BASELINE_MARGIN = 0.15


# A graph of at most this many weight bytes (as the bundle stores them) is checked as one segment; a larger one is
# cut into one segment per block. Measured on the real dimensions (docs/quality.md): opening an ONNX Runtime session
# peaks at ~1.4 GB for one dense block and ~3.1 GB for three, so finer segments keep the report's peak low.
REPORT_SEGMENT_BYTES = 1 << 30
# Batch rows per run: bounds the activations of one block (the real model at 1024x1024 materializes attention scores
# of ~1.1 GB per row in ONNX Runtime and torch on the CPU).
REPORT_MAX_ROWS = 1


def report_groups(denoiser: onnx.ModelProto, segment_bytes: int = REPORT_SEGMENT_BYTES) -> list[tuple[int, int]]:
    """The report's segments: the whole graph when its weights are at most `segment_bytes`, else one block each."""
    per_block, rest = block_weight_bytes(denoiser)
    if sum(per_block) + rest <= segment_bytes:
        return [(0, len(per_block))]
    return [(i, i + 1) for i in range(len(per_block))]


# Held between the report's phases, measured on the real dimensions at 1024x1024 (docs/quality.md): libraries, the
# reference's shells in float32 and bf16, every batch's reference and graph state.
REPORT_BASE_BYTES = 2 << 30


def pipeline_vae_dir(checkpoint: Checkpoint) -> Path | None:
    """The VAE beside the transformer when the model was given as a pipeline root, else None."""
    root = checkpoint.pipeline_root
    return root / VAE_FOLDER if root is not None and (root / VAE_FOLDER / "config.json").is_file() else None


def image_decoder(checkpoint: Checkpoint, device: str = "cpu") -> tuple[Callable[[], ImageDecoder] | None, str]:
    """What opens the report's image decoder (diffusers' float32 VAE of the model's pipeline), and a note."""
    vae_dir = pipeline_vae_dir(checkpoint)
    if vae_dir is None:
        return None, "no image scores (the model has no vae/ folder beside its transformer: pass the pipeline root)"
    patch = checkpoint.config.patch_size
    return lambda: diffusers_decoder(vae_dir, patch, device), "images: x0 estimates decoded by diffusers' float32 VAE"


def decode_memory_estimate(checkpoint: Checkpoint, image_tokens: int) -> int:
    """Predicted peak bytes of decoding one image of `image_tokens` tokens with the pipeline's VAE in float32 (its
    weights and the decode's activations); 0 without a VAE."""
    vae_dir = pipeline_vae_dir(checkpoint)
    if vae_dir is None:
        return 0
    vae = open_vae(vae_dir)
    weights = sum(vae.weights.info(n).nbytes // vae.weights.dtype(n).itemsize * 4 for n in vae.weights)
    pixels = image_tokens * (checkpoint.config.patch_size * vae.config.scale_factor) ** 2
    return weights + decode_bytes(pixels, vae.config.out_dim)


def quality_memory_estimate(checkpoint: Checkpoint, image_tokens: int = 4096, text_tokens: int = 128,
                            max_rows: int = REPORT_MAX_ROWS, images: bool = True) -> int:
    """Predicted peak bytes of the streamed report (docs/quality.md has the measured parts): the base, plus the
    largest of the reference side (one block in float32 and its activations), the graph side (one block's weights
    as stored, their float32 casts while they run, and the attention scores and probabilities ONNX Runtime
    materializes: 2 x rows x heads x S x (S + T) float32) and, with `images`, the decode of one image after the
    last block."""
    config = checkpoint.config
    weights = checkpoint.weights
    per_block = [0] * config.num_layers
    stored = [0] * config.num_layers
    for name in weights:
        if name.startswith("transformer_blocks."):
            idx = int(name.split(".")[1])
            info = weights.info(name)
            per_block[idx] += info.nbytes // weights.dtype(name).itemsize
            stored[idx] += info.nbytes
    block = max(range(config.num_layers), key=lambda i: per_block[i])
    rows_tokens = max_rows * image_tokens
    activations = 8 * rows_tokens * config.hidden_size * 4
    attention = 2 * max_rows * config.num_attention_heads * image_tokens * (image_tokens + text_tokens) * 4
    reference = per_block[block] * 4 + activations
    graph = stored[block] + per_block[block] * 4 + attention + activations
    decode = decode_memory_estimate(checkpoint, image_tokens) if images else 0
    return REPORT_BASE_BYTES + max(reference, graph, decode)


def check_quality_memory(checkpoint: Checkpoint, image_tokens: int = 4096, text_tokens: int = 128,
                         max_rows: int = REPORT_MAX_ROWS, images: bool = True) -> None:
    """Fail before any work when the streamed report cannot fit in the memory available (quality_memory_estimate)."""
    import psutil

    from nucleus_export.errors import NucleusExportError

    needed = quality_memory_estimate(checkpoint, image_tokens, text_tokens, max_rows, images)
    available = psutil.virtual_memory().available
    if needed > available:
        raise NucleusExportError(
            f"the CPU quality report needs about {needed / 1e9:.1f} GB of memory for this model (one block at a time); "
            f"{available / 1e9:.1f} GB is free.",
            "free memory or build with --skip-quality, then run `nucleus-export check --cases quick` on the bundle on a "
            "machine with more memory.",
        )


def tolerance_for(precision: GraphPrecision) -> Tolerance:
    """fp32 graphs: the exact gate (Tolerance's defaults). Lower precision: no worse than diffusers in bf16."""
    if precision.exact:
        return Tolerance()
    return Tolerance(
        max_relative_error=None, max_forced_relative_error=None, near_ties_only=False, baseline_margin=BASELINE_MARGIN
    )


def built_lowering(manifest: Manifest) -> LoweringRecord | None:
    """How the bundle's denoiser engines compute the MoE ops (None for an ONNX-only bundle)."""
    records = [manifest.engine(u) for u in manifest.units(DENOISER)]
    return records[0].lowering if records and records[0] is not None else None


def moe_label(lowering: LoweringRecord | None) -> str:
    """How the report's graph computes the MoE blocks, for its note."""
    if lowering is None:
        return "MoE as custom nodes (as exported)"
    if lowering.combine is not None:
        return f"MoE lowered ({lowering.moe}, {lowering.combine} combine)"
    return "MoE as custom nodes (plugin semantics)"


def built_segments(
    bundle_dir: Path, lowering: LoweringRecord | None, groups: list[tuple[int, int]] | None = None
) -> tuple[list[SegmentGraphs], onnx.ModelProto | Path, str]:
    """The graphs the engines compute, cut into report segments (`groups`, default report_groups: one block each
    for the real model), as parity variants whose weights stay in the bundle's files until a session opens; and the
    text_kv graph to run, and a note for the report."""
    bundle_dir = Path(bundle_dir)
    manifest = load_manifest(bundle_dir)
    num_experts = manifest.model_config["num_experts"]
    denoiser = onnx.load(str(bundle_dir / onnx_file(DENOISER)), load_external_data=False)
    emulated = has_bf16(denoiser)
    computed = lowering or LoweringRecord(MOE_PLUGIN)
    groups = groups or report_groups(denoiser)
    pieces = split_segments(denoiser, groups, DENOISER)
    del denoiser

    def rewrite(model: onnx.ModelProto) -> onnx.ModelProto:
        return engine_graph(model, computed, num_experts, runnable_on_cpu=True, keep_weights=True)

    segments = parity_segments(pieces, checkpoint_config(manifest), rewrite)
    text_kv_path = bundle_dir / onnx_file(TEXT_KV)
    text_kv: onnx.ModelProto | Path = text_kv_path
    light = onnx.load(str(text_kv_path), load_external_data=False)
    if has_bf16(light):
        text_kv = emulate_bf16_in_fp32(light, keep_weights=True)
    how = moe_label(lowering)
    cut = f"{len(groups)} segments, one ONNX Runtime session at a time" if len(groups) > 1 else "one graph"
    return segments, text_kv, (
        f"ONNX Runtime CPU vs diffusers float32 (block by block); {how}; {cut}; "
        f"{EMULATION_LABEL if emulated else 'run as exported'}"
    )


def checkpoint_config(manifest: Manifest):
    from nucleus_export.model.config import ModelConfig

    return ModelConfig.from_dict(manifest.model_config)


def quality_report(
    checkpoint: Checkpoint,
    bundle_dir: Path,
    precision: GraphPrecision,
    lowering: LoweringRecord | None,
    reference: torch.nn.Module | None = None,
    tolerance: Tolerance | None = None,
    case_set: str = "full",
    groups: list[tuple[int, int]] | None = None,
    max_rows: int | None = REPORT_MAX_ROWS,
    images: bool = True,
) -> ParityReport:
    """Check the bundle's graphs as built against diffusers' float32 forward, with diffusers-bf16 as the baseline for
    low-precision graphs; segment by segment and block by block (parity.streamed), so it runs on the 17B model
    within about one block's memory.

    Args:
        precision: how the graphs compute (its label names the report; fp32 without quantization gets the exact gate).
        lowering: how the engines compute the MoE ops (None: the graphs as exported).
        reference: a whole diffusers model already in memory (small models, tests); default: streamed.
        groups: the report's segments (default report_groups).
        max_rows: batch rows per run.
        images: also score each case's decoded x0 estimate (PSNR, SSIM; parity.images) where the model's pipeline
            has a VAE.

    Returns:
        nucleus_export.parity.check.ParityReport labelled with the graph precision, lowering and emulation.
    """
    from nucleus_export.parity.check import check_parity

    segments, text_kv, note = built_segments(bundle_dir, lowering, groups)
    open_decoder, images_note = image_decoder(checkpoint) if images else (None, "image scores skipped")
    return check_parity(
        checkpoint,
        bundle_dir,
        tolerance or tolerance_for(precision),
        graph_precision=precision.label,
        reference=reference,
        case_set=case_set,
        note=f"{note}; {images_note}",
        baseline=not precision.exact,
        segments=segments,
        text_kv=text_kv,
        max_rows=max_rows,
        open_decoder=open_decoder,
    )
