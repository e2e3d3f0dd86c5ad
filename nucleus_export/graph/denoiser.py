"""The denoiser graph: one transformer forward with the text K/V given as an input (no text projections)."""

from __future__ import annotations

import math
from collections.abc import Callable

import ml_dtypes
import numpy as np
from nucleus_runtime import contract
from nucleus_runtime.contract import block_output
from onnx import TensorProto

from nucleus_export.graph.builder import GraphBuilder
from nucleus_export.graph.layers import LayerEmitter
from nucleus_export.model.config import ModelConfig
from nucleus_export.moe.combine import emit_combine
from nucleus_export.moe.expert_choice import emit_router

B, S, T = contract.BATCH_DIM, contract.IMAGE_TOKENS_DIM, contract.TEXT_LEN_DIM
MASK_BIAS = -1e30  # exp underflows to exactly 0 in float32, like SDPA's boolean mask (lowest finite where smaller)


def timestep_frequencies(dim: int) -> np.ndarray:
    """diffusers' get_timestep_embedding frequencies (flip_sin_to_cos, shift 0), computed by torch for bit-equality."""
    import torch

    half = dim // 2
    exponent = -math.log(10000) * torch.arange(0, half, dtype=torch.float32) / half
    return torch.exp(exponent).numpy()


class DenoiserBuilder:
    """Emits the denoiser graph of the artifact contract (docs/contract.md).

    Args:
        g: graph to fill.
        emit: layer emitter bound to the checkpoint and precision.
        config: architecture.
        max_image_tokens: largest S the graph must serve (capacity fractions are checked up to it).
    """

    def __init__(self, g: GraphBuilder, emit: LayerEmitter, config: ModelConfig, max_image_tokens: int):
        self.g, self.emit, self.config = g, emit, config
        self.max_image_tokens = max_image_tokens
        self.quantize = emit.precision.recipe is not None

    def build(self, on_block: Callable[[int], None] = lambda idx: None) -> None:
        g, emit, c = self.g, self.emit, self.config
        hidden = g.input(contract.HIDDEN_STATES, TensorProto.FLOAT, [B, S, c.in_channels])
        timestep = g.input(contract.TIMESTEP, TensorProto.FLOAT, [B])
        self.img_cos = g.input(contract.IMG_ROPE_COS, TensorProto.FLOAT, [S, c.rope_dim])
        self.img_sin = g.input(contract.IMG_ROPE_SIN, TensorProto.FLOAT, [S, c.rope_dim])
        self.text_kv = g.input(
            contract.TEXT_KV,
            emit.precision.onnx_type,
            list(contract.text_kv_shape(c.num_layers, B, T, c.kv_heads, c.attention_head_dim)),
        )
        mask = g.input(contract.ENCODER_HIDDEN_STATES_MASK, TensorProto.INT64, [B, T])

        x = emit.to_f32(emit.linear(emit.to_compute(hidden), "img_in", bias=True))
        self.temb = self.time_embedding(timestep)
        self.temb_silu_cd = emit.to_compute(emit.silu(self.temb))
        self.mask_bias = self.attention_bias(x, mask)
        for idx in range(c.num_layers):
            g.scope = f"transformer_blocks.{idx}"
            # The residual stream after each block, named so the graph may be cut there (rewrites/segments.py).
            x = g.named(self.block(x, idx), block_output(idx))
            on_block(idx)
        g.scope = "norm_out"
        shift_scale = emit.to_f32(emit.linear(self.temb_silu_cd, "norm_out.linear", bias=True))
        scale, shift = g.op("Split", [shift_scale], n_out=2, axis=-1, num_outputs=2)
        axis1 = g.const([1], np.int64)
        normed = emit.layer_norm(x, c.hidden_size)
        x = g.op("Add", [self.modulate(normed, g.op("Unsqueeze", [scale, axis1])), g.op("Unsqueeze", [shift, axis1])])
        sample = emit.to_f32(emit.linear(emit.to_compute(x), "proj_out"))
        g.scope = ""
        g.output(sample, contract.SAMPLE, TensorProto.FLOAT, [B, S, c.output_channels])

    # ---- pieces ------------------------------------------------------------------------------------------------

    def time_embedding(self, timestep: str) -> str:
        g, emit = self.g, self.emit
        g.scope = "time_text_embed"
        freqs = g.const(timestep_frequencies(self.config.hidden_size)[None, :])
        angles = g.op("Mul", [g.op("Mul", [g.op("Unsqueeze", [timestep, g.const([1], np.int64)]), freqs]), g.const(1000.0)])
        proj = g.op("Concat", [g.op("Cos", [angles]), g.op("Sin", [angles])], axis=-1, hint="time_proj")
        h = emit.linear(emit.to_compute(proj), "time_text_embed.timestep_embedder.linear_1", bias=True)
        h = emit.linear(emit.silu(h), "time_text_embed.timestep_embedder.linear_2", bias=True)
        return emit.rms_norm(emit.to_f32(h), "time_text_embed.norm.weight")

    def attention_bias(self, x: str, mask: str) -> str:
        """[B, 1, S, S+T] additive mask in the compute dtype: 0 for image tokens and real text tokens, the mask bias
        for padding. Expanded over the queries because ONNX Runtime 1.32's Attention does not broadcast the mask's
        query axis; the engine lowering feeds TensorRT the unexpanded [B, 1, 1, S+T] (lowering.broadcast_attention_masks).
        """
        g, emit = self.g, self.emit
        bias = max(MASK_BIAS, float(ml_dtypes.finfo(emit.precision.np_dtype).min))  # finite in float16 too
        text_bias = g.op("Mul", [g.op("Cast", [g.op("Equal", [mask, g.const(0, np.int64)])], to=TensorProto.FLOAT), g.const(bias)])
        image_zeros = g.op("ConstantOfShape", [g.op("Shape", [x], start=0, end=2)])
        joint = g.op("Concat", [image_zeros, text_bias], axis=1)
        per_key = emit.to_compute(g.op("Unsqueeze", [joint, g.const([1, 2], np.int64)]))  # [B, 1, 1, S+T]
        shape = g.op("Concat", [g.op("Shape", [x], start=0, end=1), g.const([1], np.int64), g.op("Shape", [x], start=1, end=2),
                                g.op("Shape", [joint], start=1, end=2)], axis=0)
        return g.op("Expand", [per_key, shape], hint="attention_bias")

    def modulate(self, normed: str, scale: str) -> str:
        return self.g.op("Mul", [normed, self.g.op("Add", [scale, self.g.const(1.0)])])

    def block(self, x: str, idx: int) -> str:
        g, emit, c = self.g, self.emit, self.config
        block = f"transformer_blocks.{idx}"
        mod = emit.to_f32(emit.linear(self.temb_silu_cd, f"{block}.img_mod.1", bias=True))
        axis1 = g.const([1], np.int64)
        scale1, gate1, scale2, gate2 = (
            g.op("Unsqueeze", [part, axis1]) for part in g.op("Split", [mod], n_out=4, axis=-1, num_outputs=4)
        )
        gate1, gate2 = (g.op("Tanh", [g.op("Clip", [gate, g.const(-2.0), g.const(2.0)])]) for gate in (gate1, gate2))

        attn = emit.to_f32(self.attention(self.modulate(emit.layer_norm(x, c.hidden_size), scale1), idx))
        x = g.op("Add", [x, g.op("Mul", [gate1, attn])], hint="attn_residual")

        normed = emit.layer_norm(x, c.hidden_size)
        modulated = self.modulate(normed, scale2)
        if c.is_moe(idx):
            mlp = self.moe(modulated, normed, idx)
        else:
            mlp = emit.feed_forward(emit.to_compute(modulated), f"{block}.img_mlp", self.quantize)
        return g.op("Add", [x, g.op("Mul", [gate2, emit.to_f32(mlp)])], hint="mlp_residual")

    def attention(self, x_f32: str, idx: int) -> str:
        """Joint attention of the image queries over [image K/V ; text K/V] as one standard Attention op (opset 23):
        GQA through kv_num_heads, the text padding as an additive mask. TensorRT parses it into its fused attention
        layer, whose kernels keep the scores in float32 before the softmax."""
        g, emit, c = self.g, self.emit, self.config
        attn = f"transformer_blocks.{idx}.attn"
        heads, kv_heads, dim = c.num_attention_heads, c.kv_heads, c.attention_head_dim
        x = emit.to_compute(x_f32)

        def projected(name: str, n_heads: int, norm: str) -> str:
            h = emit.split_heads(emit.to_f32(emit.linear(x, f"{attn}.{name}", quantize=self.quantize)), n_heads, dim)
            h = emit.rope(emit.rms_norm(h, f"{attn}.{norm}.weight"), self.img_cos, self.img_sin, n_heads, dim)
            return emit.to_compute(self.merge_heads(h, n_heads))

        query = projected("to_q", heads, "norm_q")
        key = projected("to_k", kv_heads, "norm_k")
        value = emit.linear(x, f"{attn}.to_v", quantize=self.quantize)

        layer_kv = g.op("Gather", [self.text_kv, g.const(idx, np.int64)], axis=0)
        text_key = self.merge_heads(g.op("Gather", [layer_kv, g.const(0, np.int64)], axis=0), kv_heads)
        text_value = self.merge_heads(g.op("Gather", [layer_kv, g.const(1, np.int64)], axis=0), kv_heads)
        joint_key = g.op("Concat", [key, text_key], axis=1)
        joint_value = g.op("Concat", [value, text_value], axis=1)
        context = g.op(
            "Attention",
            [query, joint_key, joint_value, self.mask_bias],
            hint="attention",
            q_num_heads=heads,
            kv_num_heads=kv_heads,
            scale=1.0 / math.sqrt(dim),
        )
        return emit.linear(context, f"{attn}.to_out.0", quantize=self.quantize)

    def merge_heads(self, x: str, heads: int) -> str:
        """[B, N, heads, D] -> [B, N, heads * D], the Attention op's 3-D layout."""
        return self.g.op("Reshape", [x, self.g.const([0, 0, heads * self.config.attention_head_dim], np.int64)])

    def moe(self, modulated_f32: str, normed_f32: str, idx: int) -> str:
        g, emit, c = self.g, self.emit, self.config
        mlp = f"transformer_blocks.{idx}.img_mlp"
        temb = g.op("Expand", [g.op("Unsqueeze", [self.temb, g.const([1], np.int64)]), g.op("Shape", [normed_f32])])
        router_input = g.op("Concat", [temb, normed_f32], axis=-1, hint="router_input")
        logits = g.op("MatMul", [router_input, emit.tensor(f"{mlp}.gate.weight", transpose=True)], hint=f"{mlp}.gate")
        indices, gating = emit_router(
            g, logits, c.capacity_fraction(idx, self.max_image_tokens), c.score_function, c.route_scale
        )

        x = emit.to_compute(modulated_f32)
        hidden = c.hidden_size
        batch = g.op("Shape", [x], start=0, end=1)
        tokens = g.op("Shape", [x], start=1, end=2)
        scalar = g.const([], np.int64)
        batch_offsets = g.op(
            "Mul",
            [g.op("Range", [g.const(0, np.int64), g.op("Reshape", [batch, scalar]), g.const(1, np.int64)]), tokens],
        )
        global_indices = g.op(
            "Transpose",
            [g.op("Add", [indices, g.op("Reshape", [batch_offsets, g.const([-1, 1, 1], np.int64)])])],
            perm=[1, 0, 2],
        )
        rows = g.op("Reshape", [global_indices, g.const([c.num_experts, -1], np.int64)])
        dispatched = g.op("Gather", [g.op("Reshape", [x, g.const([-1, hidden], np.int64)]), rows], axis=0, hint="dispatch")

        up = emit.expert_matmul(dispatched, f"{mlp}.experts.gate_up_proj", self.quantize)
        down = emit.expert_matmul(emit.swiglu(up, gate_first=True), f"{mlp}.experts.down_proj", self.quantize)
        per_row = g.op("Concat", [g.const([c.num_experts], np.int64), batch, g.const([-1, hidden], np.int64)], axis=0)
        expert_output = g.op("Reshape", [down, per_row], hint="expert_output")

        shared = emit.feed_forward(x, f"{mlp}.shared_expert", self.quantize)
        return emit_combine(g, shared, expert_output, indices, gating, c.num_experts)
