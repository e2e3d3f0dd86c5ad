"""The vae_decoder graph: unpacked latents -> uint8 RGB images, what NucleusMoEImagePipeline's tail computes for
output_type "pil"/"np", for one frame of diffusers' AutoencoderKLQwenImage.

    latents / (1 / latents_std) + latents_mean -> post_quant_conv -> decoder (conv_in, mid block with attention,
    up blocks, norm_out, SiLU, conv_out) -> clamp(-1, 1) -> frame 0 -> (x * 0.5 + 0.5).clamp(0, 1)
    -> (x * 255).round() -> uint8, channels last

One frame with an empty feature cache is all a text-to-image pipeline decodes, and there the Wan-style causal 3D
convolutions simplify: each pads two zero frames in front of the single frame, so only the last temporal slice of a
3x3x3 kernel ever meets data, and an upsample3d Resample skips its time_conv on the first chunk (diffusers marks
the cache "Rep" and passes the frame through). Two forms compute this:

- "2d": every causal convolution is a 2D Conv with the kernel's last temporal slice, on [B, C, H, W];
- "3d": the tensors keep diffusers' time axis of length 1, [B, C, 1, H, W], and the causal convolutions are 3D
  Convs with the full kernel and diffusers' causal padding (two frames in front, none behind); the Resample's 2D
  convolution and the attention work on the frame as diffusers reshapes it.

Precision: convolutions, the attention's projections and its two products run in the compute dtype; the residual
stream, the RMS norms, SiLU, the softmax, the de-normalization and the post-processing are float32, with explicit
casts, so a strongly typed TensorRT network computes what the graph says. The attention is written out as MatMul,
float32 Softmax and MatMul: its single head is as wide as the mid block (384 channels for the real VAE), for which
TensorRT-RTX 1.7 has no dedicated attention kernel (the fused Attention op fails to build unless decomposed).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable

import numpy as np
from nucleus_runtime import contract
from nucleus_runtime.contract import (
    HEIGHT_DIM,
    IMAGE,
    LATENT_HEIGHT_DIM,
    LATENT_WIDTH_DIM,
    LATENTS,
    WIDTH_DIM,
)
from onnx import TensorProto, helper

from nucleus_export.errors import NucleusExportError
from nucleus_export.graph.builder import GraphBuilder
from nucleus_export.graph.layers import LayerEmitter
from nucleus_export.model.vae import VaeConfig

DECODED = "decoded"  # [batch, 3, height, width] float32, only with float_output: vae.decode(...)[0][:, :, 0]
FORM_2D = "2d"
FORM_3D = "3d"
FORMS = (FORM_2D, FORM_3D)

_CHANNELS = 3  # RGB: VaeConfig refuses other input_channels
_NORM_EPS = 1e-12  # F.normalize's eps: the norm is clamped below by it
_TIME_AXIS = 2


def build_vae_decoder(
    g: GraphBuilder, emit: LayerEmitter, config: VaeConfig, form: str = FORM_2D, float_output: bool = False
) -> None:
    """Fill `g` with the vae_decoder graph, reading the decoder's weights through `emit`.

    Args:
        g: the graph builder.
        emit: a LayerEmitter over the VAE's decoder weights (model.vae.VaeCheckpoint.weights) and the graph's
            precision; FP8 is refused (not offered for the VAE: see docs/vae_decoder.md).
        config: the VAE's config.
        form: "2d" or "3d" (module docstring).
        float_output: also output DECODED, the clamped float image before post-processing (for parity checks).
    """
    if form not in FORMS:
        raise NucleusExportError(f"unknown VAE decoder form '{form}'.", f"use one of {', '.join(FORMS)}.")
    if emit.precision.recipe is not None:
        raise NucleusExportError(
            "FP8 is not offered for the VAE decoder: E4M3 convolutions cost visible image quality.",
            "build the VAE decoder in bf16 (or fp32); FP8 applies to the denoiser only.",
        )
    b = contract.BATCH_DIM
    latents = g.input(LATENTS, TensorProto.FLOAT, [b, config.z_dim, LATENT_HEIGHT_DIM, LATENT_WIDTH_DIM])
    decoder = _Decoder(g, emit, config, form)
    decoded = decoder.decode(latents)
    if float_output:
        g.output(decoded, DECODED, TensorProto.FLOAT, [b, _CHANNELS, HEIGHT_DIM, WIDTH_DIM])
    postprocess(g, decoded)


def postprocess(g: GraphBuilder, decoded: str) -> None:
    """[B, C, H, W] float32 in [-1, 1] -> the graph output IMAGE [B, H, W, C] uint8, as VaeImageProcessor.postprocess
    (denormalize, pt_to_numpy) and numpy_to_pil do it: (x * 0.5 + 0.5).clamp(0, 1), then (x * 255).round() (half
    to even, as numpy's round and ONNX Round both do). The Cast writes the graph output itself: TensorRT accepts
    uint8 only at the network's edge, not on an intermediate tensor (GraphBuilder.output would add an Identity)."""
    g.scope = "postprocess"
    x = g.op("Add", [g.op("Mul", [decoded, g.const(0.5)]), g.const(0.5)])
    x = g.op("Clip", [x, g.const(0.0), g.const(1.0)])
    x = g.op("Round", [g.op("Mul", [x, g.const(255.0)])])
    x = g.op("Transpose", [x], perm=[0, 2, 3, 1])
    g.scope = ""
    g.nodes.append(helper.make_node("Cast", [x], [IMAGE], name=f"output/{IMAGE}", to=TensorProto.UINT8))
    shape = [contract.BATCH_DIM, HEIGHT_DIM, WIDTH_DIM, _CHANNELS]
    g.outputs.append(helper.make_tensor_value_info(IMAGE, TensorProto.UINT8, shape))


@dataclasses.dataclass
class _Decoder:
    """Emits the decoder of one form; values named *_f32 are float32, the others in the compute dtype."""

    g: GraphBuilder
    emit: LayerEmitter
    config: VaeConfig
    form: str

    @property
    def rank(self) -> int:
        return 4 if self.form == FORM_2D else 5

    def decode(self, latents_f32: str) -> str:
        """Latents -> the clamped first frame [B, 3, H, W] float32 (vae.decode(...)[0][:, :, 0])."""
        g, config = self.g, self.config
        g.scope = "denormalize"
        # The pipeline divides by 1 / std (computed in float32), it does not multiply by std: same rounding here.
        inv_std = np.float32(1.0) / np.asarray(config.latents_std, np.float32)
        x = g.op("Div", [latents_f32, g.const(inv_std.reshape(-1, 1, 1))])
        x = g.op("Add", [x, g.const(np.asarray(config.latents_mean, np.float32).reshape(-1, 1, 1))])
        if self.form == FORM_3D:
            x = g.op("Unsqueeze", [x, g.const([_TIME_AXIS], np.int64)])
        x = self.in_scope(self.causal_conv, x, "post_quant_conv")
        x = self.in_scope(self.causal_conv, x, "decoder.conv_in")
        mid = "decoder.mid_block"
        x = self.in_scope(self.resnet, x, f"{mid}.resnets.0")
        x = self.in_scope(self.attention, x, f"{mid}.attentions.0")
        x = self.in_scope(self.resnet, x, f"{mid}.resnets.1")
        for block in config.up_blocks:
            prefix = f"decoder.up_blocks.{block.index}"
            for j in range(config.num_res_blocks + 1):
                x = self.in_scope(self.resnet, x, f"{prefix}.resnets.{j}")
            if block.upsample is not None:
                x = self.in_scope(self.upsample, x, f"{prefix}.upsamplers.0")
        g.scope = "decoder.head"
        x = self.emit.silu(self.rms_norm(x, "decoder.norm_out.gamma"))
        x = self.in_scope(self.causal_conv, x, "decoder.conv_out")
        g.scope = "decoder.clamp"
        x = g.op("Clip", [x, g.const(-1.0), g.const(1.0)])
        if self.form == FORM_3D:
            x = g.op("Squeeze", [x, g.const([_TIME_AXIS], np.int64)], hint="frame_0")
        g.scope = ""
        return x

    def in_scope(self, layer: Callable[[str, str], str], x: str, module: str) -> str:
        """Emit `layer` for `module`, its nodes named under the module's path (what cost tools classify by)."""
        self.g.scope = module
        return layer(x, module)

    # ---- layers ---------------------------------------------------------------------------------------------------

    def rms_norm(self, x_f32: str, gamma: str) -> str:
        """QwenImageRMS_norm (channel-first): F.normalize over channels (x / max(||x||_2, 1e-12)) * sqrt(C) * gamma,
        in float32. Not the RMSNormalization op: it normalizes over trailing axes, channels here are axis 1."""
        g = self.g
        values = self.emit.weights.read(gamma).astype(np.float32)
        channels = values.shape[0]
        scaled = values.reshape((channels,) + (1,) * (self.rank - 2)) * np.float32(math.sqrt(channels))
        norm = g.op("Max", [g.op("ReduceL2", [x_f32, g.const([1], np.int64)], keepdims=1), g.const(_NORM_EPS)])
        return g.op("Mul", [g.op("Div", [x_f32, norm]), g.weight(f"{gamma}.scaled", scaled)], hint="rms_norm")

    def causal_conv(self, x_f32: str, module: str) -> str:
        """QwenImageCausalConv3d on one frame with no cache (kernel 3 with padding 1, or kernel 1)."""
        g, emit = self.g, self.emit
        cd = emit.precision.np_dtype
        kt, kh, _ = emit.weights.shape(f"{module}.weight")[2:]
        pad = (kh - 1) // 2
        if self.form == FORM_2D:
            # Two zero frames in front of the only frame: just the last temporal tap meets data.
            weight = emit.weights.read(f"{module}.weight")[:, :, kt - 1].astype(cd)
            w = g.weight(f"{module}.weight.last_frame", weight)
            pads = [pad, pad, pad, pad]
        else:
            w = emit.tensor(f"{module}.weight", cd)
            pads = [2 * pad, pad, pad, 0, pad, pad]  # diffusers' causal padding: 2 * padding frames in front, none behind
        y = g.op("Conv", [emit.to_compute(x_f32), w, emit.tensor(f"{module}.bias", cd)], pads=pads, hint=module)
        return emit.to_f32(y)

    def resnet(self, x_f32: str, prefix: str) -> str:
        """QwenImageResidualBlock (dropout is the identity at inference)."""
        shortcut = x_f32
        if f"{prefix}.conv_shortcut.weight" in self.emit.weights:
            shortcut = self.causal_conv(x_f32, f"{prefix}.conv_shortcut")
        h = self.causal_conv(self.emit.silu(self.rms_norm(x_f32, f"{prefix}.norm1.gamma")), f"{prefix}.conv1")
        h = self.causal_conv(self.emit.silu(self.rms_norm(h, f"{prefix}.norm2.gamma")), f"{prefix}.conv2")
        return self.g.op("Add", [h, shortcut], hint="residual")

    def attention(self, x_f32: str, prefix: str) -> str:
        """QwenImageAttentionBlock: one head over all H*W positions of the frame, 1x1 convs as MatMuls."""
        g, emit = self.g, self.emit
        cd = emit.precision.np_dtype
        channels = emit.weights.shape(f"{prefix}.proj.weight")[0]
        h = emit.to_compute(self.rms_norm(x_f32, f"{prefix}.norm.gamma"))
        tokens = g.op("Transpose", [g.op("Reshape", [h, g.const([0, 0, -1], np.int64)])], perm=[0, 2, 1])
        qkv = g.op("Add", [g.op("MatMul", [tokens, self.pointwise(f"{prefix}.to_qkv.weight")], hint=f"{prefix}.to_qkv"),
                           emit.tensor(f"{prefix}.to_qkv.bias", cd)])
        q, k, v = g.op("Split", [qkv], n_out=3, axis=-1, num_outputs=3, hint="qkv_split")
        scores = emit.to_f32(g.op("MatMul", [q, g.op("Transpose", [k], perm=[0, 2, 1])], hint=f"{prefix}.scores"))
        probs = g.op("Softmax", [g.op("Mul", [scores, g.const(1.0 / math.sqrt(channels))])], axis=-1)
        context = g.op("MatMul", [emit.to_compute(probs), v], hint=f"{prefix}.context")
        out = g.op("Add", [g.op("MatMul", [context, self.pointwise(f"{prefix}.proj.weight")], hint=f"{prefix}.proj"),
                           emit.tensor(f"{prefix}.proj.bias", cd)])
        out = g.op("Reshape", [g.op("Transpose", [out], perm=[0, 2, 1]), g.op("Shape", [x_f32])])
        return g.op("Add", [emit.to_f32(out), x_f32], hint="residual")

    def pointwise(self, name: str) -> str:
        """A 1x1 Conv2d weight [out, in, 1, 1] as a MatMul operand [in, out]."""
        weight = self.emit.weights.read(name)
        return self.g.weight(f"{name}.T", weight.reshape(weight.shape[:2]).T.astype(self.emit.precision.np_dtype))

    def upsample(self, x_f32: str, prefix: str) -> str:
        """QwenImageResample upsample2d/upsample3d of the first frame: nearest-exact 2x (for scale 2 that is
        pixel repetition, which Resize asymmetric/floor computes exactly), then a 3x3 Conv2d halving the channels.
        upsample3d's time_conv is skipped: diffusers does not run it on the first chunk."""
        g, emit = self.g, self.emit
        cd = emit.precision.np_dtype
        x = emit.to_compute(x_f32)  # nearest upsampling is exact in any dtype: do it on the narrower tensor
        if self.form == FORM_3D:
            x = g.op("Squeeze", [x, g.const([_TIME_AXIS], np.int64)], hint="frames_to_batch")
        x = g.op("Resize", [x, "", g.const([1.0, 1.0, 2.0, 2.0])], mode="nearest",
                 coordinate_transformation_mode="asymmetric", nearest_mode="floor", hint="upsample_nearest")
        conv = f"{prefix}.resample.1"
        weight, bias = emit.tensor(f"{conv}.weight", cd), emit.tensor(f"{conv}.bias", cd)
        y = g.op("Conv", [x, weight, bias], pads=[1, 1, 1, 1], hint=conv)
        if self.form == FORM_3D:
            y = g.op("Unsqueeze", [y, g.const([_TIME_AXIS], np.int64)], hint="batch_to_frames")
        return emit.to_f32(y)
