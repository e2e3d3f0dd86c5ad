"""`nucleus-export inspect`: what a checkpoint holds and what it costs per token."""

from __future__ import annotations

import argparse
import dataclasses
import json

from rich.console import Console
from rich.table import Table

from nucleus_export.commands.common import add_model_argument
from nucleus_export.model.checkpoint import open_model
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
        help="layers, experts, capacities, parameters (total and per token), weight bytes, shards",
        description="Validate a checkpoint (headers only, no weights loaded) and summarize it.",
    )
    add_model_argument(parser)
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


def run(args: argparse.Namespace) -> int:
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
    out.print(
        f"{len(c.moe_layers)} MoE blocks ({c.dense_moe_strategy}): {c.num_experts} routed experts + 1 shared, "
        f"intermediate {c.moe_intermediate_dim}, {'sigmoid' if c.use_sigmoid else 'softmax'} routing, "
        f"route scale {c.route_scale}"
    )
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
            *[str(layer.capacity.get(f"{h}x{w}", "-")) for h, w in resolutions],
        )
    out.print(layers)
    params = Table(title="parameters")
    params.add_column("what")
    params.add_column("count", justify="right")
    params.add_row("total", _fmt(summary.total_parameters))
    params.add_row("text side (once per prompt)", _fmt(summary.text_side_parameters))
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
