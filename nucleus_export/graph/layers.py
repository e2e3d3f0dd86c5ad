"""Layer emitters shared by the text_kv and denoiser graphs, each reading its weights from the checkpoint.

Conventions: "f32" values are float32; "cd" values are in the compute dtype. GEMMs take and give cd; norms, RoPE,
softmax, modulation and the residual stream are float32, with explicit casts so a strongly typed TensorRT network
computes exactly what the graph says.
"""

from __future__ import annotations

import dataclasses

import ml_dtypes
import numpy as np
from nucleus_runtime.contract import INLINE_TENSOR_MAX_BYTES, GemmMode
from onnx import TensorProto

from nucleus_export.graph.builder import NP_TO_ONNX, GraphBuilder
from nucleus_export.graph.external_data import CheckpointLinks
from nucleus_export.graph.precision import GraphPrecision, quantize_per_channel
from nucleus_export.model.checkpoint import WeightStore


@dataclasses.dataclass
class LayerEmitter:
    """Emits layers into `g`, streaming weights from `weights` in the precision of `precision`; with `links`,
    weights the graph uses as the checkpoint stores them are read from linked shards instead of copied."""

    g: GraphBuilder
    weights: WeightStore
    precision: GraphPrecision
    links: CheckpointLinks | None = None

    # ---- dtype plumbing ----------------------------------------------------------------------------------------

    def to_compute(self, value: str) -> str:
        return value if self.precision.compute == "fp32" else self.g.cast(value, self.precision.onnx_type)

    def to_f32(self, value: str) -> str:
        return value if self.precision.compute == "fp32" else self.g.cast(value, TensorProto.FLOAT)

    def tensor(self, name: str, dtype: np.dtype | type | None = None, transpose: bool = False) -> str:
        """A checkpoint tensor in `dtype` (default float32), transposed to [in, out] for MatMul when asked.

        Where the checkpoint stores it in that dtype and `links` is set, the graph reads the checkpoint's own bytes
        (graph.external_data) and a transposed weight goes through a Transpose node, which ONNX Runtime and TensorRT
        fold into the weight when they load the graph; otherwise the tensor is converted and stored with the graph."""
        dtype = np.dtype(dtype or np.float32)
        info = self.weights.info(name)
        if self.links is not None and self.weights.dtype(name) == dtype and info.nbytes >= INLINE_TENSOR_MAX_BYTES:
            linked = self.links.tensor(name, info, NP_TO_ONNX[dtype])
            if linked is not None:
                self.g.add_initializer(linked)
                return self.g.op("Transpose", [name], perm=[1, 0], hint=f"{name}.T") if transpose else name
        array = self.weights.read(name)
        if transpose:
            array = array.T
        return self.g.weight(name + (".T" if transpose else ""), array.astype(dtype))

    # ---- GEMMs -------------------------------------------------------------------------------------------------

    def _quantize_activation(self, x_cd: str, gemm: str) -> str:
        scale = self.g.const(self.precision.recipe.activation_scale(gemm), self.precision.np_dtype)  # type: ignore[union-attr]
        zero = self.g.const(0, ml_dtypes.float8_e4m3fn)
        q = self.g.op("QuantizeLinear", [x_cd, scale, zero], hint=f"{gemm}.input_quant")
        return self.g.op("DequantizeLinear", [q, scale, zero], hint=f"{gemm}.input_dequant")

    def linear(self, x_cd: str, module: str, bias: bool = False, quantize: bool = False) -> str:
        """x @ W.T (+ b) for an nn.Linear at `module`. When quantizing, as the recipe's mode of the GEMM says: FP8:
        Q/DQ on both inputs; FP8_WEIGHTS: DQ on the weight only (E4M3 storage, the GEMM in the compute precision)."""
        cd = self.precision.np_dtype
        mode = self.precision.gemm_mode(module) if quantize else GemmMode.COMPUTE
        if not mode.quantizes_weights:
            w = self.tensor(f"{module}.weight", cd, transpose=True)
        else:
            w_q, scales = quantize_per_channel(self.weights.read(f"{module}.weight").T)
            w_name = self.g.weight(f"{module}.weight.T.fp8", w_q)
            w_scale = self.g.weight(f"{module}.weight.T.scale", scales.astype(cd))
            w = self.g.op("DequantizeLinear", [w_name, w_scale], axis=1, hint=f"{module}.weight_dequant")
        if mode.quantizes_activations:
            x_cd = self._quantize_activation(x_cd, module)
        y = self.g.op("MatMul", [x_cd, w], hint=module)
        if bias:
            y = self.g.op("Add", [y, self.tensor(f"{module}.bias", cd)])
        return y

    def expert_matmul(self, x_cd: str, name: str, quantize: bool) -> str:
        """[E, N, in] @ packed expert weight [E, in, out]. FP8 weights: per-(expert, channel) scales are applied after
        the GEMM (exact, and what an FP8 GEMM epilogue does), since ONNX per-axis DQ cannot express a 2-D scale; the
        activation gets Q/DQ in FP8 mode only."""
        cd = self.precision.np_dtype
        module = name.rsplit(".", 1)[0]
        mode = self.precision.gemm_mode(name) if quantize else GemmMode.COMPUTE
        if not mode.quantizes_weights:
            return self.g.op("MatMul", [x_cd, self.tensor(name, cd)], hint=name)
        w_q, scales = quantize_per_channel(self.weights.read(name))
        w_name = self.g.weight(f"{name}.fp8", w_q)
        ones = self.g.weight(f"{name}.expert_scale", np.ones(w_q.shape[0], dtype=cd))
        w = self.g.op("DequantizeLinear", [w_name, ones], axis=0, hint=f"{name}.weight_dequant")
        x_in = self._quantize_activation(x_cd, name) if mode.quantizes_activations else x_cd
        y = self.g.op("MatMul", [x_in, w], hint=name)
        channel_scales = self.g.weight(f"{name}.channel_scale", scales[:, None, :].astype(cd))
        return self.g.op("Mul", [y, channel_scales], hint=f"{module}.channel_scale")

    def swiglu(self, h_cd: str, gate_first: bool) -> str:
        """Split the fused projection in halves; diffusers' dense SwiGLU is (up, gate), its experts are (gate, up)."""
        first, second = self.g.op("Split", [h_cd], n_out=2, hint="swiglu_split", axis=-1, num_outputs=2)
        gate, up = (first, second) if gate_first else (second, first)
        return self.g.op("Mul", [self.silu(gate), up])

    def silu(self, x: str) -> str:
        return self.g.op("Mul", [x, self.g.op("Sigmoid", [x])], hint="silu")

    def feed_forward(self, x_cd: str, module: str, quantize: bool) -> str:
        """diffusers FeedForward(activation_fn="swiglu", bias=False): net.0.proj -> (up, gate) -> net.2."""
        h = self.linear(x_cd, f"{module}.net.0.proj", quantize=quantize)
        return self.linear(self.swiglu(h, gate_first=False), f"{module}.net.2", quantize=quantize)

    # ---- float32 math --------------------------------------------------------------------------------------------

    def rms_norm(self, x_f32: str, weight: str, eps: float = 1e-6) -> str:
        """diffusers RMSNorm over the last axis, in float32, as the standard RMSNormalization op (opset 23): ONNX
        Runtime runs it as one kernel; TensorRT-RTX 1.7's parser expands it into the same reduce/elementwise layers
        a hand-written form gives (README-facts.md)."""
        return self.g.op("RMSNormalization", [x_f32, self.tensor(weight)], hint="rms_norm", axis=-1, epsilon=eps)

    def layer_norm(self, x_f32: str, width: int, eps: float = 1e-6) -> str:
        """nn.LayerNorm without affine parameters, in float32."""
        ones = self.g.const(np.ones(width, dtype=np.float32))
        return self.g.op("LayerNormalization", [x_f32, ones], axis=-1, epsilon=eps, hint="layer_norm")

    def rope(self, x_f32: str, cos: str, sin: str, heads: int, head_dim: int) -> str:
        """Rotate channel pairs (2i, 2i+1) of x [B, N, heads, head_dim] by tables [N, head_dim/2], as diffusers'
        complex multiply does: the standard RotaryEmbedding op (opset 23, interleaved), which TensorRT parses into
        its rotary-embedding layer. Position ids 0..N-1 index the tables, so the tables keep their contract shape."""
        flat = self.g.op("Reshape", [x_f32, self.g.const([0, 0, heads * head_dim], np.int64)])
        rotated = self.g.op(
            "RotaryEmbedding", [flat, cos, sin, self.positions(flat)], hint="rope", interleaved=1, num_heads=heads
        )
        return self.split_heads(rotated, heads, head_dim)

    def positions(self, x: str) -> str:
        """Position ids [B, N] = 0..N-1 per batch row for a [B, N, ...] tensor (RotaryEmbedding wants one per row)."""
        g = self.g
        tokens = g.op("Squeeze", [g.op("Shape", [x], start=1, end=2)])
        ids = g.op("Unsqueeze", [g.op("Range", [g.const(0, np.int64), tokens, g.const(1, np.int64)]), g.const([0], np.int64)])
        return g.op("Expand", [ids, g.op("Shape", [x], start=0, end=2)], hint="positions")

    def split_heads(self, x: str, heads: int, head_dim: int) -> str:
        return self.g.op("Reshape", [x, self.g.const([0, 0, heads, head_dim], np.int64)])

