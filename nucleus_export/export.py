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
from collections.abc import Callable, Sequence
from pathlib import Path

import onnx
from nucleus_runtime import contract, rope
from nucleus_runtime.atomic import atomic_dir, write_atomic
from nucleus_runtime.bundle import GraphIO, Manifest, Profiles, QuantizationRecord, SegmentRecord, StageRecord, TensorSpec
from nucleus_runtime.contract import (
    BLOCK_OUTPUTS_METADATA,
    MANIFEST_NAME,
    PROMPT_TEMPLATE_FILE,
    QUANT_RECIPE_NAME,
    SCHEDULER_CONFIG_NAME,
    TEXT_ENCODER_GRAPH,
    TOKENIZER_FILE,
    VAE_DECODER_GRAPH,
    block_output,
    external_data_file,
    onnx_file,
)
from nucleus_runtime.contract import DENOISER_GRAPH as DENOISER
from nucleus_runtime.contract import TEXT_KV_GRAPH as TEXT_KV
from nucleus_runtime.scheduler import DEFAULT_SCHEDULER_CONFIG
from nucleus_runtime.tokenizer import PromptTemplate, PromptTokenizer
from rich.progress import Progress

from nucleus_export import __version__
from nucleus_export.errors import NucleusExportError, UsageError
from nucleus_export.graph.builder import ONNX_TYPE_NAMES, GraphBuilder
from nucleus_export.graph.denoiser import DenoiserBuilder
from nucleus_export.graph.external_data import CheckpointLinks, ExternalDataWriter, check_model
from nucleus_export.graph.identity import record_bundle
from nucleus_export.graph.layers import LayerEmitter
from nucleus_export.graph.precision import GraphPrecision
from nucleus_export.graph.text_encoder import build_text_encoder, text_encoder_metadata
from nucleus_export.graph.text_kv import build_text_kv
from nucleus_export.graph.vae_decoder import FORM_2D, build_vae_decoder
from nucleus_export.log import console, stage
from nucleus_export.model.checkpoint import Checkpoint, WeightStore
from nucleus_export.model.components import PipelineComponents, available_stages, open_components
from nucleus_export.model.config import DEFAULT_VAE_SCALE_FACTOR, ModelConfig
from nucleus_export.model.prompt_template import tokenizer_json
from nucleus_export.model.text_encoder import DEFAULT_RETURN_INDEX
from nucleus_export.model.vae import VAE_FOLDER, open_vae
from nucleus_export.resolutions import aspect_resolutions, patch_grid
from nucleus_export.rewrites.segments import Segment, segment_groups, split_segments

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
        segments: also cut the denoiser into this many segment graphs (rewrites/segments.py); None or 1: no cut.
        link_checkpoint: with external data, read weights the graphs use as the checkpoint stores them (same dtype)
            from hard links to its shards instead of copying them (graph.external_data).
        stages: the stages to export (contract.STAGES; the transformer's two always); None: every stage the model
            root provides (model.components).
        return_index: the text encoder's hidden state the pipeline reads (its `return_index`).
        quantize_text_encoder: with an FP8 recipe (`precision.recipe`), also give the text encoder's linears FP8 Q/DQ
            (opt-in: docs/text_encoder.md has the error it costs); the recipe must hold their activation scales.
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
    stages: tuple[str, ...] | None = None
    return_index: int = DEFAULT_RETURN_INDEX
    quantize_text_encoder: bool = False


def stage_precision(options: ExportOptions, graph: str) -> GraphPrecision:
    """How a stage's graph computes: the transformer's denoiser as the options say; text_kv (once per prompt) and the
    VAE decoder (FP8 costs visible quality, docs/vae_decoder.md) never quantized; the text encoder quantized only
    when asked (quantize_text_encoder)."""
    precision = options.precision
    if graph == DENOISER or (graph == TEXT_ENCODER_GRAPH and options.quantize_text_encoder):
        return precision
    return precision.unquantized()


def build_profiles(config: ModelConfig, options: ExportOptions, vae_scale_factor: int = DEFAULT_VAE_SCALE_FACTOR) -> Profiles:
    """The shape ranges the graphs serve, every request the options make checked against the model."""
    if not options.resolutions:
        raise UsageError("no resolutions given.", "pass --resolutions HxW[,HxW...].")
    resolutions = list(dict.fromkeys(tuple(r) for r in options.resolutions))
    grids = [patch_grid(config, h, w, vae_scale_factor) for h, w in resolutions]
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
    for dist in ("onnx", "onnxruntime", "torch", "diffusers", "numpy", "tensorrt", "tensorrt-rtx", contract.RUNTIME_DISTRIBUTION):
        with contextlib.suppress(importlib.metadata.PackageNotFoundError):
            versions[dist] = importlib.metadata.version(dist)
    return versions


# `--external-data auto` writes weights inline only below this: an inline graph is held in memory, serialized and
# re-read by the full checker, about 6x its weights at peak (measured: 4.9 GB for a 0.79 GB model), while streamed
# external data keeps the peak flat (0.67 GB for 4.4 GB). Far below protobuf's hard 2 GB limit on purpose.
INLINE_WEIGHTS_MAX_BYTES = 256 << 20
# The decoder's form of its causal 3D convolutions for one frame: 2D with each kernel's last temporal slice, exactly
# what they compute with zero history, 2.4-2.8x faster than the 3D form and a third of its plan (docs/vae_decoder.md).
VAE_FORM = FORM_2D
# Where each component's linked shards go in the bundle (checkpoint/<component>/).
COMPONENT_LINKS = (TEXT_ENCODER_GRAPH, VAE_DECODER_GRAPH)


@dataclasses.dataclass(frozen=True)
class ExportPlan:
    """What an export decides before writing anything, once per export or build: the stages and the components they
    come from, the profiles, whether weights go to external data, and the text encoder's prompt template."""

    profiles: Profiles
    external: bool
    stages: tuple[str, ...]
    components: PipelineComponents
    template: PromptTemplate | None = None

    def prompt_tokenizer(self) -> PromptTokenizer:
        """The runtime's tokenizer of the bundle's tokenizer files (the pipeline's processor and chat template)."""
        if self.template is None:
            raise UsageError("the model has no text encoder stage, so there is no prompt tokenizer.",
                             "export from a pipeline root with --stages including text_encoder.")
        from tokenizers import Tokenizer

        return PromptTokenizer(Tokenizer.from_str(tokenizer_json(self.components.processor)), self.template)

    @property
    def prefix_tokens(self) -> int:
        """Tokens of the template's fixed prefix: what a runtime encodes once and reuses (the text encoder's past),
        counted by the runtime's own tokenizer."""
        return 0 if self.template is None else len(self.prompt_tokenizer().prefix_ids)


def plan_export(checkpoint: Checkpoint, options: ExportOptions) -> ExportPlan:
    """Check the options against the model and decide the layout (cheap; refuses bad requests before any work)."""
    root = checkpoint.pipeline_root
    stages = options.stages or available_stages(root)
    if options.quantize_text_encoder and (options.precision.recipe is None or TEXT_ENCODER_GRAPH not in stages):
        raise UsageError(
            "an FP8 text encoder needs an FP8 build (--fp8) of a bundle with a text_encoder stage.",
            "add --fp8 and build from a pipeline root with the text encoder, or drop --fp8-text-encoder.",
        )
    components = open_components(root, stages, options.return_index)
    # The pipeline's pixel grid follows its VAE, exported or not.
    vae = components.vae or (open_vae(root / VAE_FOLDER) if root is not None and (root / VAE_FOLDER).is_dir() else None)
    profiles = build_profiles(checkpoint.config, options, vae.config.scale_factor if vae else DEFAULT_VAE_SCALE_FACTOR)
    weights = [checkpoint.weights, *(c.weights for c in (components.text_encoder, components.vae) if c is not None)]
    estimated = sum(w.num_parameters for w in weights) * options.precision.np_dtype.itemsize
    external = options.external_data if options.external_data is not None else estimated > INLINE_WEIGHTS_MAX_BYTES
    template = None
    if components.processor is not None:
        from nucleus_export.model.prompt_template import prompt_template_from_processor

        # The pipeline truncates at max_sequence_length, a multiple of 8: the longest the bundle serves.
        template = prompt_template_from_processor(components.processor, max_sequence_length=options.max_text_len // 8 * 8)
    return ExportPlan(profiles, external, stages, components, template)


def _io_specs(model: onnx.ModelProto) -> GraphIO:
    def spec(value: onnx.ValueInfoProto) -> TensorSpec:
        tensor = value.type.tensor_type
        dims = [d.dim_param or d.dim_value for d in tensor.shape.dim]
        return TensorSpec(ONNX_TYPE_NAMES[tensor.elem_type], dims)

    return GraphIO({v.name: spec(v) for v in model.graph.input}, {v.name: spec(v) for v in model.graph.output})


GraphFiller = Callable[[GraphBuilder, LayerEmitter], None]


def write_graph(
    out_dir: Path,
    name: str,
    weights: WeightStore,
    precision: GraphPrecision,
    build: GraphFiller,
    external: bool,
    metadata: dict[str, str] | None = None,
    links: CheckpointLinks | None = None,
) -> GraphIO:
    """Build one graph with `build(builder, emitter)`, save it as `<name>.onnx` (+ `.onnx.data`, + tensors read from
    linked checkpoint shards when `links` is set), check it. `metadata` becomes the model's metadata_props."""
    writer = ExternalDataWriter(out_dir / external_data_file(name)) if external else None
    g = GraphBuilder(name, external_data=writer)
    try:
        build(g, LayerEmitter(g, weights, precision, links))
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
    logger.info("wrote %s (%d nodes)", path.name, len(model.graph.node))
    return _io_specs(model)


def refuse_existing(out_dir: Path, force: bool) -> None:
    """Refuse an output folder that exists (unless force) or whose parent does not (no folder is created for it)."""
    if not Path(out_dir).absolute().parent.is_dir():
        raise UsageError(f"the folder of --out {out_dir} does not exist.", "create it first, or choose another --out.")
    if Path(out_dir).exists() and not force:
        raise UsageError(f"output folder {out_dir} already exists.", "pass --force to overwrite it, or choose another --out.")


def scheduler_config(checkpoint: Checkpoint) -> dict:
    """The pipeline's scheduler config when the model is a pipeline root, else the Nucleus default."""
    if checkpoint.scheduler_dir and (checkpoint.scheduler_dir / SCHEDULER_CONFIG_NAME).is_file():
        return json.loads((checkpoint.scheduler_dir / SCHEDULER_CONFIG_NAME).read_text())
    return dict(DEFAULT_SCHEDULER_CONFIG)


def write_graphs(out_dir: Path, checkpoint: Checkpoint, options: ExportOptions, plan: ExportPlan) -> dict[str, GraphIO]:
    """Write the stages' graphs, the scheduler config and the quantization recipe into an existing (temporary)
    folder; returns each graph's io."""
    config, precision = checkpoint.config, options.precision
    logger.info(
        "exporting %s layers (%d MoE) at %s, %d resolutions, external data: %s",
        config.num_layers, len(config.moe_layers), precision.label, len(plan.profiles.resolutions),
        "yes" if plan.external else "no",
    )
    links = CheckpointLinks(out_dir) if plan.external and options.link_checkpoint else None
    # The residual stream after each block (named by the contract): where the denoiser may be cut.
    metadata = {BLOCK_OUTPUTS_METADATA: json.dumps([block_output(i) for i in range(config.num_layers)])}
    io = {}
    with Progress(console=console, transient=True) as progress:
        for name in (TEXT_KV, DENOISER):
            task = progress.add_task(f"export {onnx_file(name)}", total=config.num_layers)

            def advance(_idx: int, task=task) -> None:
                progress.advance(task)

            if name == TEXT_KV:
                io[name] = write_graph(out_dir, name, checkpoint.weights, stage_precision(options, name),
                                       lambda g, e: build_text_kv(g, e, config, advance), plan.external, links=links)
            else:
                def build_denoiser(g: GraphBuilder, e: LayerEmitter, advance=advance) -> None:
                    DenoiserBuilder(g, e, config, plan.profiles.image_tokens[2]).build(advance)

                io[name] = write_graph(out_dir, name, checkpoint.weights, stage_precision(options, name),
                                       build_denoiser, plan.external, metadata, links)
    io.update(_write_component_stages(out_dir, options, plan))
    if links is not None:
        logger.info("graph weights stored as the checkpoint stores them: read from %d hard-linked shards", len(links.files))
    write_atomic(out_dir / SCHEDULER_CONFIG_NAME, json.dumps(scheduler_config(checkpoint), indent=2))
    if precision.recipe is not None:
        write_atomic(out_dir / QUANT_RECIPE_NAME, precision.recipe.to_json())
    return io


def _write_component_stages(out_dir: Path, options: ExportOptions, plan: ExportPlan) -> dict[str, GraphIO]:
    """The text encoder (with the tokenizer files) and the VAE decoder, where the plan has them, each in its
    stage_precision."""
    parts, io = plan.components, {}
    links = {c: CheckpointLinks(out_dir, c) if plan.external and options.link_checkpoint else None for c in COMPONENT_LINKS}
    if parts.text_encoder is not None:
        config = parts.text_encoder.config
        with Progress(console=console, transient=True) as progress:
            task = progress.add_task(f"export {onnx_file(TEXT_ENCODER_GRAPH)}", total=config.kept_layers)
            io[TEXT_ENCODER_GRAPH] = write_graph(
                out_dir, TEXT_ENCODER_GRAPH, parts.text_encoder.weights, stage_precision(options, TEXT_ENCODER_GRAPH),
                lambda g, e: build_text_encoder(g, e, config, lambda _i: progress.advance(task)), plan.external,
                text_encoder_metadata(config), links[TEXT_ENCODER_GRAPH],
            )
        write_atomic(out_dir / TOKENIZER_FILE, tokenizer_json(parts.processor))
        write_atomic(out_dir / PROMPT_TEMPLATE_FILE, plan.template.to_json())  # type: ignore[union-attr]
    if parts.vae is not None:
        vae = parts.vae
        with stage(f"export {onnx_file(VAE_DECODER_GRAPH)}"):
            io[VAE_DECODER_GRAPH] = write_graph(
                out_dir, VAE_DECODER_GRAPH, vae.weights, stage_precision(options, VAE_DECODER_GRAPH),
                lambda g, e: build_vae_decoder(g, e, vae.config, VAE_FORM), plan.external, links=links[VAE_DECODER_GRAPH],
            )
    return io


def stage_config(plan: ExportPlan, graph: str) -> dict:
    """What a runtime needs to know about a component stage (StageRecord.config, docs/contract.md), and the
    component's own config (`model_config`: what its engine profiles and `inspect`'s costs are computed from)."""
    if graph == TEXT_ENCODER_GRAPH:
        config = plan.components.text_encoder.config  # type: ignore[union-attr]
        return {"return_index": config.return_index, "kept_layers": config.kept_layers, "hidden_size": config.hidden_size,
                "prefix_tokens": plan.prefix_tokens, "config_hash": config.config_hash(), "model_config": config.to_dict()}
    if graph == VAE_DECODER_GRAPH:
        config = plan.components.vae.config  # type: ignore[union-attr]
        return {"scale_factor": config.scale_factor, "z_dim": config.z_dim, "form": VAE_FORM,
                "model_config": config.to_dict()}
    return {}


def write_segments(out_dir: Path, groups: Sequence[tuple[int, int]], graph: str = DENOISER) -> list[Segment]:
    """Cut `<graph>.onnx` of a bundle (the denoiser, or the text encoder) into `<graph>.seg<k>.onnx` files beside it
    (same external data, no copy); returns the segments in execution order."""
    model = onnx.load(str(Path(out_dir) / onnx_file(graph)), load_external_data=False)
    segments = []
    for seg_model, seg in split_segments(model, groups, graph):
        onnx.save_model(seg_model, str(Path(out_dir) / onnx_file(seg.name)))
        segments.append(seg)
    return segments


def write_manifest(
    out_dir: Path,
    checkpoint: Checkpoint,
    options: ExportOptions,
    plan: ExportPlan,
    io: dict[str, GraphIO],
    segments: dict[str, list[Segment]],
) -> Manifest:
    """Hash the bundle (every file, and the identity of exactly what each graph reads, in one pass) and write its
    manifest."""
    graphs = [onnx_file(g) for g in io] + [onnx_file(s.name) for segs in segments.values() for s in segs]
    files, digests = record_bundle(out_dir, graphs)
    stages = {
        graph: StageRecord(
            io=io[graph],
            digest=digests[onnx_file(graph)],
            segments=[SegmentRecord(s.name, s.blocks, s.inputs, s.outputs, digests[onnx_file(s.name)])
                      for s in segments.get(graph, [])],
            config=stage_config(plan, graph),
            precision=stage_precision(options, graph).label,
        )
        for graph in io
    }
    precision = options.precision
    manifest = Manifest(
        model_config=checkpoint.config.to_dict(),
        config_hash=checkpoint.config.config_hash(),
        precision=precision.compute,
        profiles=plan.profiles,
        stages=stages,
        files=files,
        quantization=QuantizationRecord(precision.scheme) if precision.scheme else None,
        tools=_tool_versions(),
    )
    write_atomic(out_dir / MANIFEST_NAME, manifest.to_json())
    return manifest


def export_bundle(checkpoint: Checkpoint, out_dir: Path, options: ExportOptions, force: bool = False) -> Manifest:
    """Export a checkpoint into a new bundle folder (atomically; refuses an existing folder unless force)."""
    plan = plan_export(checkpoint, options)
    refuse_existing(out_dir, force)
    with atomic_dir(out_dir) as tmp:
        io = write_graphs(tmp, checkpoint, options, plan)
        groups = segment_groups(checkpoint.config.num_layers, options.segments)
        segments = {} if groups is None else {DENOISER: write_segments(tmp, groups)}
        manifest = write_manifest(tmp, checkpoint, options, plan, io, segments)
    logger.info("bundle written to %s", out_dir)
    return manifest
