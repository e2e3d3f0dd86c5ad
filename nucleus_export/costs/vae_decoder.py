"""What one vae_decoder call costs, from the VAE's config alone (no weights, no graph): FLOPs by kind, weight bytes
and the bytes a fused engine must move at least. `inspect --bundle` reports it per served resolution; tests check
the convolution count against hooks on diffusers' modules and the weight bytes against the exported graph.
"""

from __future__ import annotations

import dataclasses

from nucleus_export.errors import NucleusExportError
from nucleus_export.graph.vae_decoder import FORM_2D, FORM_3D
from nucleus_export.model.vae import VaeConfig


@dataclasses.dataclass(frozen=True)
class VaeDecoderCost:
    """Work of one vae_decoder call.

    Attributes:
        conv_flops: 2 x multiply-adds of the convolutions as the form computes them ("3d" also multiplies the
            kernel taps that meet the zero padding: 3x for 3x3x3 kernels).
        attention_flops: the mid block's attention: qkv and output projections, scores and context.
        other_flops: one per element and elementwise op (RMS norm 4, SiLU 2, residual add 1, softmax 3 per score,
            upsampling 1, de-normalization and post-processing): small next to the convolutions.
        weight_bytes: the decoder's parameters in the compute dtype (norm scales in float32).
        activation_bytes: what a fused engine must move at least: every convolution and projection reads its input
            and writes its output once in the compute dtype (norms, SiLU and residual adds fused into them), and
            the attention probabilities are written and read once in float32 (no fused kernel for a head this
            wide).
    """

    conv_flops: float
    attention_flops: float
    other_flops: float
    weight_bytes: float
    activation_bytes: float

    @property
    def flops(self) -> float:
        return self.conv_flops + self.attention_flops + self.other_flops

    @property
    def bytes(self) -> float:
        return self.weight_bytes + self.activation_bytes


def vae_decoder_cost(config: VaeConfig, height: int, width: int, batch: int = 1, form: str = FORM_2D,
                     compute_bytes: int = 2) -> VaeDecoderCost:
    """FLOPs and bytes of the vae_decoder graph at an image size, from the config alone (no weights, no graph).

    Args:
        config: the VAE's config.
        height, width: image size in pixels (multiples of config.scale_factor).
        batch: images per call.
        form: "2d" or "3d".
        compute_bytes: bytes per element of the compute dtype (2 for bf16, 4 for fp32).
    """
    if height % config.scale_factor or width % config.scale_factor:
        raise NucleusExportError(
            f"image size {height}x{width} is not a multiple of the VAE's scale factor {config.scale_factor}.",
            f"round height and width to multiples of {config.scale_factor}.",
        )
    conv = other = weights = moved = 0.0
    pixels = batch * (height // config.scale_factor) * (width // config.scale_factor)

    def conv_layer(c_in: int, c_out: int, kernel: int, causal: bool = True) -> None:
        nonlocal conv, weights, moved
        taps = kernel * kernel * (kernel if causal and form == FORM_3D else 1)
        conv += 2.0 * pixels * c_out * c_in * taps
        weights += (c_out * c_in * taps + c_out) * compute_bytes
        moved += pixels * (c_in + c_out) * compute_bytes

    def norm_silu(channels: int) -> None:
        nonlocal other, weights
        other += 6.0 * pixels * channels
        weights += 4 * channels

    def resnet(c_in: int, c_out: int) -> None:
        nonlocal other
        if c_in != c_out:
            conv_layer(c_in, c_out, 1)
        norm_silu(c_in)
        conv_layer(c_in, c_out, 3)
        norm_silu(c_out)
        conv_layer(c_out, c_out, 3)
        other += pixels * c_out

    z, mid = config.z_dim, config.mid_dim
    other += 2.0 * pixels * z
    conv_layer(z, z, 1)
    conv_layer(z, mid, 3)
    resnet(mid, mid)
    # attention: qkv [mid -> 3 mid] and proj [mid -> mid] on every position, scores and context over all positions
    tokens = pixels // batch
    attention = 2.0 * pixels * mid * 4 * mid + 4.0 * batch * tokens * tokens * mid
    weights += (4 * mid * mid + 4 * mid) * compute_bytes + 4 * mid
    moved += pixels * (mid + 3 * mid + 3 * mid + 2 * mid) * compute_bytes + 2.0 * batch * tokens * tokens * 4
    other += 4.0 * pixels * mid + 3.0 * batch * tokens * tokens + pixels * mid
    resnet(mid, mid)
    for block in config.up_blocks:
        c_in = block.in_dim
        for _ in range(config.num_res_blocks + 1):
            resnet(c_in, block.out_dim)
            c_in = block.out_dim
        if block.upsample is not None:
            pixels *= 4
            other += pixels * block.out_dim
            conv_layer(block.out_dim, block.out_dim // 2, 3, causal=False)
    norm_silu(config.out_dim)
    conv_layer(config.out_dim, config.input_channels, 3)
    other += 7.0 * pixels * config.input_channels
    return VaeDecoderCost(conv, attention, other, weights, moved)
