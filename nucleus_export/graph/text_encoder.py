"""The text_encoder graph: token ids -> the pipeline's prompt embeddings (hidden_states[return_index]) and the new
tokens' K/V of every kept layer, continuing from the K/V of tokens already encoded.

The encoder is causal, so a fixed prefix (the chat template's system prompt) has hidden states and K/V that do not
depend on what follows: a runtime encodes it once (past_len = 0), keeps its `key_values`, and encodes each prompt's
suffix with them as `past_key_values`; the suffix's outputs equal those of the full forward.

What transformers does for text-only input, and so the graph:
- position ids are past_len + 0..text_len-1 for every row, whatever the attention mask (Qwen3VLTextModel's default
  positions; get_rope_index runs only with image or video grids). Padding therefore shifts a left-padded row's
  positions, exactly as in transformers.
- the three multimodal RoPE components are equal, so the interleaved (t, h, w) sections pick the same frequencies
  and the rotation is plain 1D rotate-half RoPE over the whole head (tests/test_text_encoder.py shows it).
- attention is causal over [past ; new] and skips keys whose attention_mask is 0.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable

import ml_dtypes
import numpy as np
from nucleus_runtime import contract
from nucleus_runtime.contract import (
    ATTENTION_MASK,
    BLOCK_OUTPUTS_METADATA,
    INPUT_IDS,
    KEY_VALUES,
    PAST_KEY_VALUES,
    PAST_LEN_DIM,
    PROMPT_EMBEDS,
    TOTAL_LEN_DIM,
)
from onnx import TensorProto

from nucleus_export.graph.builder import GraphBuilder
from nucleus_export.graph.layers import LayerEmitter
from nucleus_export.model.text_encoder import (
    LANGUAGE_MODEL,
    TextEncoderConfig,
    layer_prefix,
)

B, T = contract.BATCH_DIM, contract.TEXT_LEN_DIM
MASK_BIAS = -1e30  # exp underflows to exactly 0 in float32, like SDPA's boolean mask (lowest finite where smaller)


def layer_output(index: int) -> str:
    """The residual stream [B, T, hidden] float32 after kept layer `index`: where the graph may be cut."""
    return f"text_encoder.layers.{index}.output"


def key_values_shape(config: TextEncoderConfig, tokens: str | int) -> list[str | int]:
    """[L, 2, B, tokens, Hkv, Dh]: per kept layer the keys (index 0 of axis 1, after k_norm and RoPE) and values."""
    return [config.kept_layers, 2, B, tokens, config.num_key_value_heads, config.head_dim]


def text_encoder_metadata(config: TextEncoderConfig) -> dict[str, str]:
    """The graph's metadata_props: the residual stream after each kept layer, as the denoiser records its blocks."""
    return {BLOCK_OUTPUTS_METADATA: json.dumps([layer_output(i) for i in range(config.kept_layers)])}


def rope_inverse_frequencies(config: TextEncoderConfig) -> np.ndarray:
    """[head_dim / 2] float32, computed by torch as transformers' default RoPE does, for bit-equal angles."""
    import torch

    dim = config.head_dim
    return (1.0 / (config.rope_theta ** (torch.arange(0, dim, 2, dtype=torch.float) / dim))).numpy()


def build_text_encoder(g: GraphBuilder, emit: LayerEmitter, config: TextEncoderConfig,
                       on_layer: Callable[[int], None] = lambda i: None) -> None:
    """Fill `g` with the text_encoder graph (module docstring); `on_layer(i)` is called after each kept layer."""
    TextEncoderBuilder(g, emit, config).build(on_layer)


class TextEncoderBuilder:
    """Emits the text_encoder graph: residual stream and norms in float32, GEMMs in the compute dtype, FP8 Q/DQ on
    the seven linears of every layer when the precision has FP8 scales (module paths as in the checkpoint)."""

    def __init__(self, g: GraphBuilder, emit: LayerEmitter, config: TextEncoderConfig):
        self.g, self.emit, self.config = g, emit, config
        self.quantize = emit.precision.recipe is not None

    def build(self, on_layer: Callable[[int], None]) -> None:
        g, emit, c = self.g, self.emit, self.config
        cd = emit.precision.onnx_type
        ids = g.input(INPUT_IDS, TensorProto.INT64, [B, T])
        mask = g.input(ATTENTION_MASK, TensorProto.INT64, [B, TOTAL_LEN_DIM])
        self.past = g.input(PAST_KEY_VALUES, cd, key_values_shape(c, PAST_LEN_DIM))

        g.scope = "positions"
        scalar = g.const([], np.int64)
        past_len = g.op("Reshape", [g.op("Shape", [self.past], start=3, end=4), scalar])
        text_len = g.op("Reshape", [g.op("Shape", [ids], start=1, end=2), scalar])
        total_len = g.op("Add", [past_len, text_len])
        positions = g.op("Range", [past_len, total_len, g.const(1, np.int64)], hint="positions")  # [T]
        self.cos, self.sin = self.rope_tables(positions)
        self.table_rows = emit.positions(ids)  # [B, T] = 0..T-1: the rows of the tables RotaryEmbedding reads
        self.bias = self.attention_bias(mask, positions, total_len)

        g.scope = f"{LANGUAGE_MODEL}.embed_tokens"
        table = emit.tensor(f"{LANGUAGE_MODEL}.embed_tokens.weight", emit.precision.np_dtype)
        x = emit.to_f32(g.op("Gather", [table, ids], axis=0, hint="embed_tokens"))
        key_values = []
        for idx in range(c.kept_layers):
            g.scope = layer_prefix(idx)
            x, kv = self.layer(x, idx)
            # The residual stream after each layer, named so the graph may be cut there (engines/segments.py).
            x = g.named(x, layer_output(idx))
            key_values.append(kv)
            on_layer(idx)
        if c.final_norm:
            g.scope = f"{LANGUAGE_MODEL}.norm"
            x = emit.rms_norm(x, f"{LANGUAGE_MODEL}.norm.weight", c.rms_norm_eps)
        g.scope = ""
        g.output(x, PROMPT_EMBEDS, TensorProto.FLOAT, [B, T, c.hidden_size])
        g.output(g.op("Concat", key_values, axis=0, hint=KEY_VALUES), KEY_VALUES, cd, key_values_shape(c, T))

    # ---- shared by every layer -----------------------------------------------------------------------------------

    def rope_tables(self, positions: str) -> tuple[str, str]:
        """cos/sin [T, head_dim / 2] float32 of the new tokens' positions (angles = position * inverse frequency in
        float32, as transformers multiplies them)."""
        g = self.g
        inv_freq = g.const(rope_inverse_frequencies(self.config)[None, :])
        angles = g.op("Mul", [g.op("Unsqueeze", [g.cast(positions, TensorProto.FLOAT), g.const([1], np.int64)]), inv_freq])
        return g.op("Cos", [angles], hint="rope_cos"), g.op("Sin", [angles], hint="rope_sin")

    def attention_bias(self, mask: str, positions: str, total_len: str) -> str:
        """[B, 1, T, past_len + T] additive mask in the compute dtype: 0 where query t may see key k (k at or before
        t's position and attention_mask[b, k] == 1), the mask bias elsewhere. Causality makes it per query, so it is
        built at that size (no Expand over queries for the engine lowering to undo)."""
        g, emit = self.g, self.emit
        bias = max(MASK_BIAS, float(ml_dtypes.finfo(emit.precision.np_dtype).min))  # finite in float16 too
        keys = g.op("Range", [g.const(0, np.int64), total_len, g.const(1, np.int64)], hint="key_positions")
        future = g.op("Greater", [g.op("Unsqueeze", [keys, g.const([0], np.int64)]),
                                  g.op("Unsqueeze", [positions, g.const([1], np.int64)])])  # [T, P+T]
        padding = g.op("Unsqueeze", [g.op("Equal", [mask, g.const(0, np.int64)]), g.const([1, 2], np.int64)])  # [B,1,1,P+T]
        blocked = g.op("Or", [padding, future])
        return emit.to_compute(g.op("Mul", [g.cast(blocked, TensorProto.FLOAT), g.const(bias)], hint="attention_bias"))

    # ---- one decoder layer -------------------------------------------------------------------------------------

    def layer(self, x: str, idx: int) -> tuple[str, str]:
        """Qwen3VLTextDecoderLayer: x + attn(norm(x)), then + mlp(norm(.)). Returns (stream, [1, 2, B, T, Hkv, Dh])."""
        g, emit, c = self.g, self.emit, self.config
        p = layer_prefix(idx)
        attn, kv = self.attention(emit.to_compute(emit.rms_norm(x, f"{p}.input_layernorm.weight", c.rms_norm_eps)), idx)
        x = g.op("Add", [x, emit.to_f32(attn)], hint="attn_residual")
        h = emit.to_compute(emit.rms_norm(x, f"{p}.post_attention_layernorm.weight", c.rms_norm_eps))
        gate = emit.linear(h, f"{p}.mlp.gate_proj", quantize=self.quantize)
        up = emit.linear(h, f"{p}.mlp.up_proj", quantize=self.quantize)
        mlp = emit.linear(g.op("Mul", [emit.silu(gate), up]), f"{p}.mlp.down_proj", quantize=self.quantize)
        return g.op("Add", [x, emit.to_f32(mlp)], hint="mlp_residual"), kv

    def attention(self, h_cd: str, idx: int) -> tuple[str, str]:
        """Causal GQA self-attention over [past ; new] as one standard Attention op (opset 23) with the additive mask.
        Returns (o_proj output, this layer's new K/V [1, 2, B, T, Hkv, Dh] in the compute dtype)."""
        g, emit, c = self.g, self.emit, self.config
        attn = f"{layer_prefix(idx)}.self_attn"
        heads, kv_heads, dim = c.num_attention_heads, c.num_key_value_heads, c.head_dim

        def projected(name: str, n_heads: int, norm: str) -> str:
            """q/k: projection, RMSNorm over each head (float32), RoPE; [B, T, n_heads * Dh] in the compute dtype."""
            h = emit.linear(h_cd, f"{attn}.{name}", bias=c.attention_bias, quantize=self.quantize)
            h = emit.rms_norm(emit.split_heads(emit.to_f32(h), n_heads, dim), f"{attn}.{norm}.weight", c.rms_norm_eps)
            return emit.to_compute(self.rope(h, n_heads))

        query = projected("q_proj", heads, "q_norm")
        key = projected("k_proj", kv_heads, "k_norm")
        value = emit.linear(h_cd, f"{attn}.v_proj", bias=c.attention_bias, quantize=self.quantize)

        layer_past = g.op("Gather", [self.past, g.const(idx, np.int64)], axis=0)  # [2, B, P, Hkv, Dh]
        past_key, past_value = (
            self.merge_heads(g.op("Gather", [layer_past, g.const(k, np.int64)], axis=0), kv_heads) for k in (0, 1)
        )
        context = g.op(
            "Attention",
            [query, g.op("Concat", [past_key, key], axis=1), g.op("Concat", [past_value, value], axis=1), self.bias],
            hint="attention",
            q_num_heads=heads,
            kv_num_heads=kv_heads,
            scale=1.0 / math.sqrt(dim),
        )
        out = emit.linear(context, f"{attn}.o_proj", bias=c.attention_bias, quantize=self.quantize)
        axis0 = g.const([0], np.int64)
        new_kv = g.op("Concat", [g.op("Unsqueeze", [emit.split_heads(t, kv_heads, dim), axis0]) for t in (key, value)], axis=0)
        return out, g.op("Unsqueeze", [new_kv, axis0], hint="key_values")

    def rope(self, x_f32: str, heads: int) -> str:
        """Rotate-half RoPE of [B, T, heads, Dh] -> [B, T, heads * Dh]: the standard RotaryEmbedding op (opset 23,
        interleaved=0), its tables indexed by 0..T-1 since they already hold the new tokens' positions."""
        flat = self.merge_heads(x_f32, heads)
        return self.g.op("RotaryEmbedding", [flat, self.cos, self.sin, self.table_rows], hint="rope",
                         interleaved=0, num_heads=heads)

    def merge_heads(self, x: str, heads: int) -> str:
        """[B, N, heads, Dh] -> [B, N, heads * Dh], the Attention and RotaryEmbedding ops' 3-D layout."""
        return self.g.op("Reshape", [x, self.g.const([0, 0, heads * self.config.head_dim], np.int64)])
