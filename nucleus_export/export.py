"""`export`: checkpoint -> bundle (text_kv.onnx, denoiser.onnx, scheduler_config.json, manifest.json).

The graphs are built directly from the checkpoint's tensors (nucleus_export.graph), streamed one at a time, and
written into a temporary folder that is renamed into place only once everything, the ONNX checker included, passed.
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib.metadata
import json
import logging
from pathlib import Path

import onnx
from nucleus_runtime import contract, rope
from nucleus_runtime.atomic import atomic_dir
from nucleus_runtime.bundle import (
    Manifest,
    Profiles,
    TensorSpec,
    bundle_files,
    file_record,
    write_atomic,
)
from nucleus_runtime.contract import (
    BLOCK_OUTPUTS_METADATA,
    MANIFEST_NAME,
    SCHEDULER_CONFIG_NAME,
    block_output,
    external_data_file,
    onnx_file,
)
from nucleus_runtime.contract import DENOISER_GRAPH as DENOISER
from nucleus_runtime.contract import TEXT_KV_GRAPH as TEXT_KV
from nucleus_runtime.scheduler import DEFAULT_SCHEDULER_CONFIG
from rich.progress import Progress

from nucleus_export import __version__
from nucleus_export.engines.segments import segment_groups, write_segments
from nucleus_export.errors import NucleusExportError, UsageError
from nucleus_export.graph.builder import ONNX_TYPE_NAMES, GraphBuilder
from nucleus_export.graph.denoiser import DenoiserBuilder
from nucleus_export.graph.external_data import (
    CheckpointLinks,
    ExternalDataWriter,
    check_model,
)
from nucleus_export.graph.layers import LayerEmitter
from nucleus_export.graph.precision import GraphPrecision
from nucleus_export.graph.text_kv import build_text_kv
from nucleus_export.log import console
from nucleus_export.model.checkpoint import Checkpoint
from nucleus_export.resolutions import aspect_resolutions, patch_grid

logger = logging.getLogger("nucleus_export")


@dataclasses.dataclass
class ExportOptions:
    """What to export.

    Attributes:
        precision: GEMM compute dtype and optional FP8 scales.
        resolutions: (height, width) pixel sizes the graphs must serve; default: seven aspect ratios at 1024.
        opt_resolution: the size engines are tuned for (default 1024x1024 if served, else the first).
        max_batch: largest batch (2 = prompt and negative prompt as one batch).
        max_text_len: longest prompt in tokens; opt_text_len: typical prompt length (default min(128, max)).
        external_data: force (True) or forbid (False) ONNX external data; None decides by size.
        segments: also cut the denoiser into this many segment graphs (engines/segments.py); None or 1: no cut.
        link_checkpoint: with external data, read weights the graphs use as the checkpoint stores them (same dtype)
            from hard links to its shards instead of copying them (graph.external_data).
    """

    precision: GraphPrecision = dataclasses.field(default_factory=GraphPrecision)
    resolutions: list[tuple[int, int]] = dataclasses.field(default_factory=aspect_resolutions)
    opt_resolution: tuple[int, int] | None = None
    max_batch: int = 2
    max_text_len: int = 1024
    opt_text_len: int | None = None
    external_data: bool | None = None
    segments: int | None = None
    link_checkpoint: bool = True


def build_profiles(checkpoint: Checkpoint, options: ExportOptions) -> Profiles:
    config = checkpoint.config
    if not options.resolutions:
        raise UsageError("no resolutions given.", "pass --resolutions HxW[,HxW...].")
    resolutions = list(dict.fromkeys(tuple(r) for r in options.resolutions))
    grids = [patch_grid(config, h, w) for h, w in resolutions]
    opt = tuple(options.opt_resolution) if options.opt_resolution else ((1024, 1024) if (1024, 1024) in resolutions else resolutions[0])
    if opt not in resolutions:
        raise UsageError(f"optimization resolution {opt[0]}x{opt[1]} is not among the served resolutions.", "add it to --resolutions.")
    if options.max_batch < 1:
        raise UsageError(f"max batch {options.max_batch} is below 1.", "use --max-batch 2 for CFG as one batch.")
    opt_text_len = options.opt_text_len or min(128, options.max_text_len)
    if not 1 <= opt_text_len <= options.max_text_len:
        raise UsageError(
            f"text length profile 1..{opt_text_len}..{options.max_text_len} is impossible.",
            "use 1 <= --opt-text-len <= --max-text-len.",
        )
    for (h, w), (rows, cols) in zip(resolutions, grids):
        too_full = [i for i in config.moe_layers if not contract.capacity_fits(config.capacity(i, rows * cols), rows * cols)]
        if too_full:
            raise UsageError(
                f"at {h}x{w} ({rows * cols} image tokens) MoE blocks {too_full} would give each expert more tokens "
                f"than exist (capacity factor over the {config.num_experts} experts).",
                "serve larger resolutions only, or use a checkpoint whose capacity factors are at most num_experts.",
            )
        if rope.text_position_offset(rows, cols) + options.max_text_len > rope.MAX_POSITIONS:
            raise UsageError(
                f"text length {options.max_text_len} at {h}x{w} runs past the model's {rope.MAX_POSITIONS} rope positions.",
                "lower --max-text-len or drop that resolution.",
            )
    return Profiles(
        batch=(1, min(2, options.max_batch), options.max_batch),
        text_len=(1, opt_text_len, options.max_text_len),
        resolutions=resolutions,
        grids=grids,
        opt_resolution=opt,
    )


def _tool_versions() -> dict[str, str]:
    versions = {"nucleus-export": __version__}
    for dist in ("onnx", "onnxruntime", "torch", "diffusers", "numpy", "tensorrt", "tensorrt-rtx", "polygraphy"):
        with contextlib.suppress(importlib.metadata.PackageNotFoundError):
            versions[dist] = importlib.metadata.version(dist)
    return versions


# `--external-data auto` writes weights inline only below this: an inline graph is held in memory, serialized and
# re-read by the full checker, about 6x its weights at peak (measured: 4.9 GB for a 0.79 GB model), while streamed
# external data keeps the peak flat (0.67 GB for 4.4 GB). Far below protobuf's hard 2 GB limit on purpose.
INLINE_WEIGHTS_MAX_BYTES = 256 << 20


def _estimated_weight_bytes(checkpoint: Checkpoint, precision: GraphPrecision) -> int:
    itemsize = precision.np_dtype.itemsize
    return checkpoint.weights.num_parameters * itemsize


def _io_specs(model: onnx.ModelProto) -> dict[str, dict[str, TensorSpec]]:
    def spec(value: onnx.ValueInfoProto) -> TensorSpec:
        tensor = value.type.tensor_type
        dims = [d.dim_param or d.dim_value for d in tensor.shape.dim]
        return TensorSpec(ONNX_TYPE_NAMES[tensor.elem_type], dims)

    return {
        "inputs": {v.name: spec(v) for v in model.graph.input},
        "outputs": {v.name: spec(v) for v in model.graph.output},
    }


def write_graph(
    out_dir: Path,
    name: str,
    checkpoint: Checkpoint,
    precision: GraphPrecision,
    build,
    external: bool,
    metadata: dict[str, str] | None = None,
    links: CheckpointLinks | None = None,
) -> onnx.ModelProto:
    """Build one graph with `build(builder, emitter)`, save it as `<name>.onnx` (+ `.onnx.data`, + tensors read from
    linked checkpoint shards when `links` is set), check it. `metadata` becomes the model's metadata_props."""
    writer = ExternalDataWriter(out_dir / external_data_file(name)) if external else None
    g = GraphBuilder(name, external_data=writer)
    try:
        build(g, LayerEmitter(g, checkpoint.weights, precision, links))
    finally:
        if writer:
            writer.close()
    if writer and writer.bytes_written == 0:  # every weight linked or inline: no empty data file in the bundle
        writer.data_path.unlink()
    model = g.make_model(__version__)
    if metadata:
        onnx.helper.set_model_props(model, metadata)
    path = out_dir / onnx_file(name)
    onnx.save_model(model, path)
    try:
        check_model(path)
    except onnx.checker.ValidationError as exc:
        raise NucleusExportError(f"the exported {name}.onnx fails the ONNX checker: {exc}", "report this as a bug.") from None
    return model


def refuse_existing(out_dir: Path, force: bool) -> None:
    """Refuse an output folder that exists (unless force) or whose parent does not (no folder is created for it)."""
    if not Path(out_dir).absolute().parent.is_dir():
        raise UsageError(f"the folder of --out {out_dir} does not exist.", "create it first, or choose another --out.")
    if Path(out_dir).exists() and not force:
        raise UsageError(f"output folder {out_dir} already exists.", "pass --force to overwrite it, or choose another --out.")


def atomic_output_dir(out_dir: Path, force: bool) -> contextlib.AbstractContextManager[Path]:
    """A temporary sibling folder that replaces out_dir on success and is removed on failure or a signal (see
    nucleus_runtime.atomic); an existing out_dir is refused unless force."""
    refuse_existing(out_dir, force)
    return atomic_dir(out_dir)


def scheduler_config(checkpoint: Checkpoint) -> dict:
    """The pipeline's scheduler config when the model is a pipeline root, else the Nucleus default."""
    if checkpoint.scheduler_dir and (checkpoint.scheduler_dir / SCHEDULER_CONFIG_NAME).is_file():
        return json.loads((checkpoint.scheduler_dir / SCHEDULER_CONFIG_NAME).read_text())
    return dict(DEFAULT_SCHEDULER_CONFIG)


def write_bundle_files(out_dir: Path, checkpoint: Checkpoint, options: ExportOptions) -> Manifest:
    """Write graphs, scheduler config and manifest into an existing (temporary) folder."""
    config = checkpoint.config
    profiles = build_profiles(checkpoint, options)
    precision = options.precision
    external = (
        options.external_data
        if options.external_data is not None
        else _estimated_weight_bytes(checkpoint, precision) > INLINE_WEIGHTS_MAX_BYTES
    )
    logger.info(
        "exporting %s layers (%d MoE) at %s, %d resolutions, external data: %s",
        config.num_layers,
        len(config.moe_layers),
        precision.label,
        len(profiles.resolutions),
        "yes" if external else "no",
    )
    io = {}
    links = CheckpointLinks(out_dir) if external and options.link_checkpoint else None
    with Progress(console=console, transient=True) as progress:
        for name in (TEXT_KV, DENOISER):
            task = progress.add_task(f"export {name}.onnx", total=config.num_layers)

            def advance(_idx: int, task=task) -> None:
                progress.advance(task)

            if name == TEXT_KV:
                # text_kv runs once per prompt: never quantized.
                model = write_graph(
                    out_dir, name, checkpoint, GraphPrecision(precision.compute), lambda g, e: build_text_kv(g, e, config, advance), external,
                    links=links,
                )
            else:
                # The residual stream after each block (named by the contract): where the graph may be cut.
                metadata = {BLOCK_OUTPUTS_METADATA: json.dumps([block_output(i) for i in range(config.num_layers)])}

                def build_denoiser(g: GraphBuilder, e: LayerEmitter, advance=advance) -> None:
                    DenoiserBuilder(g, e, config, profiles.image_tokens[2]).build(advance)

                model = write_graph(out_dir, name, checkpoint, precision, build_denoiser, external, metadata, links)
            io[name] = _io_specs(model)
            logger.info("wrote %s.onnx (%d nodes)", name, len(model.graph.node))
            del model
    groups = segment_groups(config.num_layers, options.segments)
    segments = None if groups is None else {DENOISER: write_segments(out_dir, groups)}
    write_atomic(out_dir / SCHEDULER_CONFIG_NAME, json.dumps(scheduler_config(checkpoint), indent=2))
    if links is not None:
        logger.info("graph weights stored as the checkpoint stores them: read from %d hard-linked shards", len(links.files))
    quantization = None
    if precision.fp8:
        write_atomic(out_dir / "fp8_scales.json", precision.fp8.to_json())
        quantization = {
            "scheme": "fp8_e4m3",
            "weights": "per output channel (per expert and channel for routed experts), from the weights",
            "activations": "per tensor, calibrated (W8A8 GEMMs; FP8-weight-only GEMMs take activations in the compute precision)",
            "scales_file": "fp8_scales.json",
            "calibration": precision.fp8.calibration,
            "fp8_weights_only": list(precision.fp8.weight_only),
            "not_quantized": [
                *precision.fp8.keep,
                "router gate", "norms", "softmax", "rope", "timestep/modulation/io projections", "text_kv",
            ],
        }
    manifest = Manifest(
        model_config=config.to_dict(),
        config_hash=config.config_hash(),
        precision=precision.compute,
        moe_lowering=contract.MOE_FUNCTIONS,
        profiles=profiles,
        io=io,
        files={f: file_record(out_dir, f) for f in bundle_files(out_dir)},
        quantization=quantization,
        tools=_tool_versions(),
        segments=segments,
    )
    write_atomic(out_dir / MANIFEST_NAME, manifest.to_json())
    return manifest


def export_bundle(checkpoint: Checkpoint, out_dir: Path, options: ExportOptions, force: bool = False) -> Manifest:
    """Export a checkpoint into a new bundle folder (atomically; refuses an existing folder unless force)."""
    with atomic_output_dir(out_dir, force) as tmp:
        manifest = write_bundle_files(tmp, checkpoint, options)
    logger.info("bundle written to %s", out_dir)
    return manifest
