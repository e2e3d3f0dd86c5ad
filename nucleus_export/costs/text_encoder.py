"""What one text_encoder call costs, from the text encoder's config alone (no weights, no graph): the GEMM and
attention FLOPs, the weight bytes and the bytes a fused engine must move at least. `inspect --bundle` reports it;
tests check the FLOPs against the exported graph's (costs/flops.py) and the weight bytes against its initializers.
"""

from __future__ import annotations

import dataclasses

from nucleus_export.costs.roofline import Cost, Gpu
from nucleus_export.model.text_encoder import TextEncoderConfig

_NORM_BYTES = 4  # the graph keeps every norm weight in float32


@dataclasses.dataclass(frozen=True)
class TextEncoderCost:
    """Work of one text_encoder call: `batch` prompts of `text_len` new tokens after `past_len` cached ones.

    Attributes:
        gemm_flops: the seven linears of every kept layer, 2 x multiply-adds.
        attention_flops: scores and context over past + new keys, as the fused kernel computes them (dense, the causal
            mask applied to the scores: 4 * B * Hq * T * (P + T) * Dh per layer).
        weight_bytes: the embedding table and the kept layers' linears in the compute dtype, norms in float32.
        activation_bytes: every linear reads its input and writes its output once in the compute dtype, attention
            reads Q and the past + new K/V and writes its context once; the new K/V are written once.
    """

    gemm_flops: float
    attention_flops: float
    weight_bytes: float
    activation_bytes: float

    @property
    def flops(self) -> float:
        return self.gemm_flops + self.attention_flops

    @property
    def bytes(self) -> float:
        return self.weight_bytes + self.activation_bytes

    def seconds(self, gpu: Gpu, fp8: bool = False) -> float:
        """Roofline time on `gpu` (costs/roofline.py): at prompt lengths it is the weights' read time."""
        return Cost(self.flops, self.bytes).seconds(gpu, fp8)


def text_encoder_cost(config: TextEncoderConfig, text_len: int, past_len: int = 0, batch: int = 1,
                      compute_bytes: int = 2, fp8: bool = False) -> TextEncoderCost:
    """FLOPs and bytes of the text_encoder graph for `batch` x `text_len` new tokens after `past_len` cached ones.

    Args:
        config: the text encoder's config (kept layers, widths, vocabulary).
        text_len, past_len: new and cached tokens per prompt.
        batch: prompts per call.
        compute_bytes: bytes per element of the compute dtype (2 for bf16, 4 for fp32).
        fp8: the linears' weights in E4M3 (1 byte, plus a compute-dtype scale per output channel), as `--fp8-text-encoder`
            builds them; the embedding table stays in the compute dtype.
    """
    h, q, kv, inter = config.hidden_size, config.q_dim, config.kv_dim, config.intermediate_size
    # (in, out) of q, k, v, o and the MLP's gate, up, down projections.
    linears = [(h, q), (h, kv), (h, kv), (q, h), (h, inter), (h, inter), (inter, h)]
    tokens, keys, layers = batch * text_len, past_len + text_len, config.kept_layers
    gemm = 2.0 * tokens * sum(i * o for i, o in linears) * layers
    attention = 4.0 * batch * config.num_attention_heads * text_len * keys * config.head_dim * layers
    bias = (q + 2 * kv + h) if config.attention_bias else 0
    norms = 2 * h + 2 * config.head_dim
    linear_weights = sum(i * o for i, o in linears) * (1 if fp8 else compute_bytes)
    scales = sum(o for _, o in linears) * compute_bytes if fp8 else 0
    weights = config.vocab_size * h * compute_bytes + layers * (
        linear_weights + scales + bias * compute_bytes + norms * _NORM_BYTES)
    if config.final_norm:
        weights += h * _NORM_BYTES
    per_layer = sum(i + o for i, o in linears) * tokens + 2 * tokens * q + batch * keys * 2 * kv + tokens * 2 * kv
    activations = (layers * per_layer + tokens * h) * compute_bytes
    return TextEncoderCost(gemm, attention, float(weights), float(activations))
