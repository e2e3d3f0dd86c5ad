"""`nucleus-export inspect`: what a checkpoint holds and what it costs per token."""

from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path

from rich.console import Console
from rich.table import Table

from nucleus_export.commands.common import add_model_argument
from nucleus_export.costs.roofline import GPUS
from nucleus_export.model.specs import open_model
from nucleus_export.model.summary import summarize
from nucleus_export.resolutions import (
    DEFAULT_BASE,
    aspect_resolutions,
    parse_resolutions,
    patch_grid,
)


def register(sub: argparse._SubParsersAction, common: argparse.ArgumentParser) -> None:
    parser = sub.add_parser(
        "inspect",
        parents=[common],
        help="a checkpoint (layers, experts, capacities, parameters, shards) or a bundle (FLOPs, bytes, roofline time)",
        description="With --model: validate a checkpoint (headers only, no weights loaded) and summarize it. With "
        "--bundle: every stage with its precision, files, engines and profiles, the text encoder's and the VAE "
        "decoder's FLOPs and bytes per prompt case and served resolution; per served resolution, the denoiser step's "
        "FLOPs and bytes as built, by op class, next to the "
        "model's intrinsic FLOPs, a roofline step time on --gpu from its published peaks, and the layer types "
        "TensorRT parses (fused attention layers counted) when tensorrt or tensorrt_rtx is importable.",
    )
    source = parser.add_mutually_exclusive_group(required=True)
    add_model_argument(source, required=False)
    source.add_argument("--bundle", type=Path, help="a bundle folder (from export or build)")
    parser.add_argument("--gpu", choices=sorted(GPUS), default="h100", help="GPU for the roofline estimate (default h100)")
    parser.add_argument(
        "--resolutions",
        type=parse_resolutions,
        help=f"pixel sizes for capacities and per-token cost (default: seven aspect ratios at {DEFAULT_BASE})",
    )
    parser.add_argument("--json", action="store_true", help="print the summary as JSON")
    parser.set_defaults(func=run)


def _fmt(n: float) -> str:
    for unit, size in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= size:
            return f"{n / size:.2f}{unit}"
    return str(int(n))


def _capacity_cell(capacity: int | None, over: bool) -> str:
    if capacity is None:
        return "-"
    return f"[bold red]{capacity} > S[/bold red]" if over else str(capacity)


def run(args: argparse.Namespace) -> int:
    if args.bundle is not None:
        return run_bundle(args)
    checkpoint = open_model(args.model)
    resolutions = args.resolutions or aspect_resolutions()
    for h, w in resolutions:
        patch_grid(checkpoint.config, h, w)
    summary = summarize(checkpoint, resolutions)
    if args.json:
        print(json.dumps(dataclasses.asdict(summary), indent=2))
        return 0
    out = Console()
    c = checkpoint.config
    out.print(f"[bold]{checkpoint.transformer_dir}[/bold] (config hash {summary.config_hash})")
    out.print(
        f"{c.num_layers} blocks, hidden {c.hidden_size} ({c.num_attention_heads} heads x {c.attention_head_dim}), "
        f"{c.kv_heads} K/V heads, text dim {c.joint_attention_dim}, patch {c.patch_size}, "
        f"in {c.in_channels} / out {c.output_channels} channels per token"
    )
    if c.moe_layers:
        out.print(
            f"{len(c.moe_layers)} MoE blocks ({c.dense_moe_strategy}): {c.num_experts} routed experts + 1 shared, "
            f"intermediate {c.moe_intermediate_dim}, {c.score_function} routing, route scale {c.route_scale}"
        )
    else:
        out.print(f"no MoE blocks ({c.dense_moe_strategy}, moe_enabled {c.moe_enabled}): every block is dense")
    layers = Table(title="blocks (capacity = tokens per expert per batch row)")
    layers.add_column("block")
    layers.add_column("kind")
    layers.add_column("cf")
    for h, w in resolutions:
        layers.add_column(f"{h}x{w}")
    for layer in summary.layers:
        layers.add_row(
            str(layer.index),
            layer.kind,
            f"{layer.capacity_factor:g}" if layer.kind == "moe" else "-",
            *[_capacity_cell(layer.capacity.get(f"{h}x{w}"), f"{h}x{w}" in layer.over_capacity) for h, w in resolutions],
        )
    out.print(layers)
    for layer in summary.layers:
        for key in layer.over_capacity:
            out.print(
                f"[bold red]block {layer.index} at {key}: capacity {layer.capacity[key]} exceeds the "
                f"{summary.image_tokens[key]} image tokens of a row[/bold red] (each expert must pick distinct tokens: "
                "diffusers' topk fails there, and export refuses that resolution)"
            )
    params = Table(title="parameters")
    params.add_column("what")
    params.add_column("count", justify="right")
    params.add_row("total", _fmt(summary.total_parameters))
    params.add_row("text side (once per prompt)", _fmt(summary.text_side_parameters))
    if c.moe_layers:
        params.add_row("routed experts per MoE block", _fmt(summary.routed_expert_parameters_per_layer))
    params.add_row("unused (norm_added_q)", _fmt(summary.unused_parameters))
    for key, value in summary.parameters_per_token.items():
        params.add_row(f"touched per image token per step at {key}", _fmt(value))
    out.print(params)
    storage = Table(title="storage")
    storage.add_column("what")
    storage.add_column("bytes", justify="right")
    for dtype, size in summary.bytes_by_dtype.items():
        storage.add_row(f"weights in {dtype}", f"{size / 1e6:.1f} MB")
    for shard, size in summary.shards:
        storage.add_row(shard, f"{size / 1e6:.1f} MB")
    out.print(storage)
    return 0


def _shape(shape: list[int]) -> str:
    return "x".join(map(str, shape))


def print_stages(out: Console, stages: list, gpu: str) -> None:
    """The stage table, each stage's profile per input and the text encoder's / VAE decoder's costs."""
    table = Table(title="stages")
    for column in ("stage", "precision", "engine units", "ONNX Runtime loads", "TensorRT loads"):
        table.add_column(column, justify="left" if column in ("stage", "precision", "engine units") else "right")
    for stage in stages:
        units = ", ".join(
            f"{u.name}" + (f" (layers {u.layers[0]}-{u.layers[1] - 1})" if u.layers else "")
            + (f" {u.plan_bytes / 2**20:.1f} MiB {u.flavor}" if u.plan_bytes is not None else " (no plan)")
            for u in stage.units
        )
        engine = "-" if stage.engine_bytes is None else f"{stage.engine_bytes / 1e6:.1f} MB"
        table.add_row(stage.name, stage.precision, units, f"{stage.onnx_bytes / 1e6:.1f} MB in {len(stage.files)} files", engine)
    out.print(table)
    for stage in stages:
        profile = "; ".join(f"{name} {_shape(lo)} / {_shape(opt)} / {_shape(hi)}" for name, (lo, opt, hi) in stage.profiles.items())
        out.print(f"  {stage.name} profile (min / opt / max): {profile}", highlight=False)
    for stage in (s for s in stages if s.costs):
        table = Table(title=f"{stage.name}: one call, batch 1, {stage.precision} (from its config)")
        for column in ("case", "GFLOP", "weights GB", "GB moved", f"ms on {gpu}"):
            table.add_column(column, justify="left" if column == "case" else "right")
        for row in stage.costs:
            table.add_row(row.case, f"{row.flops / 1e9:.2f}", f"{row.weight_bytes / 1e9:.3f}", f"{row.bytes / 1e9:.3f}",
                          f"{row.seconds * 1e3:.3f}")
        out.print(table)


def run_bundle(args: argparse.Namespace) -> int:
    from nucleus_export.costs.bundle_cost import bundle_cost

    report = bundle_cost(args.bundle, args.gpu)
    if args.json:
        print(json.dumps(report.to_dict(), indent=2))
        return 0
    out = Console()
    out.print(f"[bold]{report.bundle}[/bold]: {report.precision}, combine {report.combine}, counted on {report.engine_onnx}")
    print_stages(out, report.stages, args.gpu)
    for r in report.resolutions:
        table = Table(
            title=f"{r.resolution[0]}x{r.resolution[1]}: one denoiser step, batch {r.batch}, {r.tokens} image tokens, "
            f"{r.text_len} text tokens"
        )
        for column in ("op class", "GEMM+attn GFLOP", "intrinsic GFLOP", "other GFLOP", "GB moved", f"ms on {args.gpu}"):
            table.add_column(column, justify="right" if column != "op class" else "left")
        for row in r.rows:
            table.add_row(row.name, f"{row.gemm_flops / 1e9:.3f}", f"{row.intrinsic_flops / 1e9:.3f}",
                          f"{row.other_flops / 1e9:.3f}", f"{row.bytes / 1e9:.3f}", f"{row.seconds * 1e3:.3f}")
        out.print(table)
        out.print(
            f"  built GEMM+attention FLOPs = {r.gemm_ratio:.3f} x intrinsic; combine ({report.combine}) "
            f"{100 * r.combine_share:.1f}% of built FLOPs; roofline {r.roofline_seconds * 1e3:.2f} ms per step, "
            f"compute floor {r.compute_floor_seconds * 1e3:.2f} ms ({report.gpu}, {report.gpu_source})"
        )
    if report.tensorrt_layers is not None:
        layers = ", ".join(f"{k} {v}" for k, v in report.tensorrt_layers.items())
        out.print(f"TensorRT parsed layers: {layers}")
        out.print(f"fused attention layers: {report.fused_attention_layers} for {report.blocks} blocks")
    for note in report.notes:
        out.print(f"note: {note}")
    return 0
