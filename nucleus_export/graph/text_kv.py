"""The text_kv graph: prompt embeddings -> per-block text K (normed, rotated) and V for every block."""

from __future__ import annotations

import numpy as np
from nucleus_runtime import contract
from onnx import TensorProto

from nucleus_export.graph.builder import GraphBuilder
from nucleus_export.graph.layers import LayerEmitter
from nucleus_export.model.config import ModelConfig

B, T = contract.BATCH_DIM, contract.TEXT_LEN_DIM


def build_text_kv(g: GraphBuilder, emit: LayerEmitter, config: ModelConfig, on_block=lambda idx: None) -> None:
    """Fill `g` with the text_kv graph of the artifact contract (docs/contract.md)."""
    half = config.rope_dim
    text = g.input(contract.ENCODER_HIDDEN_STATES, TensorProto.FLOAT, [B, T, config.joint_attention_dim])
    cos = g.input(contract.TXT_ROPE_COS, TensorProto.FLOAT, [T, half])
    sin = g.input(contract.TXT_ROPE_SIN, TensorProto.FLOAT, [T, half])
    text_cd = emit.to_compute(emit.rms_norm(text, "txt_norm.weight"))
    axis0 = g.const([0], np.int64)
    per_block = []
    for idx in range(config.num_layers):
        block = f"transformer_blocks.{idx}"
        g.scope = block
        context = emit.linear(text_cd, f"{block}.encoder_proj", bias=True)
        key = emit.split_heads(emit.to_f32(emit.linear(context, f"{block}.attn.add_k_proj")), config.kv_heads, config.attention_head_dim)
        key = emit.rope(emit.rms_norm(key, f"{block}.attn.norm_added_k.weight"), cos, sin, config.kv_heads, config.attention_head_dim)
        value = emit.split_heads(emit.linear(context, f"{block}.attn.add_v_proj"), config.kv_heads, config.attention_head_dim)
        kv = g.op("Concat", [g.op("Unsqueeze", [emit.to_compute(key), axis0]), g.op("Unsqueeze", [value, axis0])], axis=0)
        per_block.append(g.op("Unsqueeze", [kv, axis0]))
        on_block(idx)
    g.scope = ""
    stacked = g.op("Concat", per_block, axis=0, hint=contract.TEXT_KV)
    g.output(
        stacked,
        contract.TEXT_KV,
        emit.precision.onnx_type,
        list(contract.text_kv_shape(config.num_layers, B, T, config.kv_heads, config.attention_head_dim)),
    )
