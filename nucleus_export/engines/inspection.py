"""What TensorRT parsed: layer counts, output precision per layer type, Q/DQ layers, the FP8-ness of every GEMM input.

`ILayer.precision` does not exist in TensorRT-RTX: precision is reported from output tensor dtypes.
"""

from __future__ import annotations

import collections
import dataclasses
from typing import Any

# Layer types that only move data: a Q/DQ search walks back through them from a GEMM input.
_PASS_THROUGH = {"SHUFFLE", "IDENTITY", "SLICE", "CONCATENATION", "GATHER", "SQUEEZE", "UNSQUEEZE"}


@dataclasses.dataclass
class GemmInfo:
    """A matrix-multiply layer and what feeds it: `fp8_inputs[i]` is True when input i comes from a DEQUANTIZE of
    an FP8 tensor (through data-movement layers only)."""

    name: str
    input_dtypes: list[str]
    fp8_inputs: list[bool]


@dataclasses.dataclass
class NetworkReport:
    """The parsed network, as TensorRT sees it before optimization."""

    num_layers: int
    layer_types: dict[str, int]
    precision_per_layer_type: dict[str, dict[str, int]]
    num_quantize: int
    num_dequantize: int
    gemms: list[GemmInfo]
    plugin_layers: list[str]
    inputs: dict[str, str]
    outputs: dict[str, str]

    def gemm(self, name_contains: str) -> list[GemmInfo]:
        return [g for g in self.gemms if name_contains in g.name]


def dtype_name(dtype: Any) -> str:
    return str(dtype).rsplit(".", 1)[-1]


def type_name(layer_type: Any) -> str:
    return str(layer_type).rsplit(".", 1)[-1]


def inspect_network(network: Any) -> NetworkReport:
    """Layer count, precision (output dtype) per layer type, Q/DQ layers and the FP8-ness of every GEMM input."""
    producers: dict[str, Any] = {}
    layers = [network.get_layer(i) for i in range(network.num_layers)]
    for layer in layers:
        for j in range(layer.num_outputs):
            producers[layer.get_output(j).name] = layer
    types: collections.Counter[str] = collections.Counter()
    precision: dict[str, collections.Counter[str]] = collections.defaultdict(collections.Counter)
    gemms: list[GemmInfo] = []
    plugins: list[str] = []

    def from_fp8_dequantize(tensor: Any, depth: int = 0) -> bool:
        layer = producers.get(tensor.name) if tensor is not None else None
        if layer is None or depth > 8:
            return False
        kind = type_name(layer.type)
        if kind == "DEQUANTIZE":
            source = layer.get_input(0)
            return source is not None and dtype_name(source.dtype) == "FP8"
        if kind in _PASS_THROUGH:
            return from_fp8_dequantize(layer.get_input(0), depth + 1)
        return False

    for layer in layers:
        kind = type_name(layer.type)
        types[kind] += 1
        for j in range(layer.num_outputs):
            precision[kind][dtype_name(layer.get_output(j).dtype)] += 1
        if kind == "MATRIX_MULTIPLY":
            inputs = [layer.get_input(k) for k in range(layer.num_inputs)]
            gemms.append(
                GemmInfo(
                    name=layer.name,
                    input_dtypes=[dtype_name(t.dtype) for t in inputs],
                    fp8_inputs=[from_fp8_dequantize(t) for t in inputs],
                )
            )
        if kind.startswith("PLUGIN"):
            plugins.append(layer.name)
    return NetworkReport(
        num_layers=len(layers),
        layer_types=dict(sorted(types.items())),
        precision_per_layer_type={k: dict(sorted(v.items())) for k, v in sorted(precision.items())},
        num_quantize=types.get("QUANTIZE", 0),
        num_dequantize=types.get("DEQUANTIZE", 0),
        gemms=gemms,
        plugin_layers=plugins,
        inputs={network.get_input(i).name: dtype_name(network.get_input(i).dtype) for i in range(network.num_inputs)},
        outputs={
            network.get_output(i).name: dtype_name(network.get_output(i).dtype) for i in range(network.num_outputs)
        },
    )
