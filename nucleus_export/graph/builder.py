"""A small ONNX graph builder whose initializers can stream straight to an external-data file.

Weights never accumulate in memory: in external mode each initializer is written to `<model>.onnx.data` as soon as it
is added (nucleus_export.graph.external_data) and only its (name, offset, length) record stays in the graph proto.
"""

from __future__ import annotations

import dataclasses
import itertools
from collections.abc import Sequence
from typing import Any

import ml_dtypes
import numpy as np
import onnx
from nucleus_runtime.contract import DOMAIN as NUCLEUS_DOMAIN
from nucleus_runtime.contract import INLINE_TENSOR_MAX_BYTES, ONNX_OPSET
from nucleus_runtime.contract import DOMAIN_VERSION as NUCLEUS_DOMAIN_VERSION
from onnx import TensorProto, helper

from nucleus_export.graph.external_data import ExternalDataWriter

NP_TO_ONNX: dict[np.dtype, int] = {
    np.dtype(np.float32): TensorProto.FLOAT,
    np.dtype(np.float16): TensorProto.FLOAT16,
    np.dtype(ml_dtypes.bfloat16): TensorProto.BFLOAT16,
    np.dtype(ml_dtypes.float8_e4m3fn): TensorProto.FLOAT8E4M3FN,
    np.dtype(np.int64): TensorProto.INT64,
    np.dtype(np.int32): TensorProto.INT32,
    np.dtype(np.bool_): TensorProto.BOOL,
}
ONNX_TYPE_NAMES = {
    TensorProto.FLOAT: "float32",
    TensorProto.FLOAT16: "float16",
    TensorProto.BFLOAT16: "bfloat16",
    TensorProto.INT64: "int64",
    TensorProto.UINT8: "uint8",
}


def tensor_proto(name: str, array: np.ndarray) -> TensorProto:
    """A raw-data TensorProto for any dtype in NP_TO_ONNX (bfloat16 and float8 included)."""
    array = np.asarray(array, order="C")  # keeps 0-d scalars 0-d, unlike ascontiguousarray
    proto = TensorProto(name=name, data_type=NP_TO_ONNX[array.dtype], dims=list(array.shape))
    proto.raw_data = array.tobytes()
    return proto


@dataclasses.dataclass
class GraphBuilder:
    """Accumulates nodes, inputs, outputs and initializers of one graph.

    Args:
        name: graph name.
        external_data: when set, initializers stream to this writer instead of living in the proto.
    """

    name: str
    external_data: ExternalDataWriter | None = None
    nodes: list[onnx.NodeProto] = dataclasses.field(default_factory=list)
    inputs: list[onnx.ValueInfoProto] = dataclasses.field(default_factory=list)
    outputs: list[onnx.ValueInfoProto] = dataclasses.field(default_factory=list)
    initializers: list[TensorProto] = dataclasses.field(default_factory=list)
    functions: dict[str, onnx.FunctionProto] = dataclasses.field(default_factory=dict)
    _counter: itertools.count = dataclasses.field(default_factory=itertools.count)
    _constants: dict[tuple, str] = dataclasses.field(default_factory=dict)
    scope: str = ""

    def unique(self, hint: str) -> str:
        prefix = f"{self.scope}/" if self.scope else ""
        return f"{prefix}{hint}_{next(self._counter)}"

    def input(self, name: str, elem_type: int, shape: Sequence[int | str]) -> str:
        self.inputs.append(helper.make_tensor_value_info(name, elem_type, list(shape)))
        return name

    def output(self, value: str, name: str, elem_type: int, shape: Sequence[int | str]) -> str:
        self.nodes.append(helper.make_node("Identity", [value], [name], name=f"output/{name}"))
        self.outputs.append(helper.make_tensor_value_info(name, elem_type, list(shape)))
        return name

    def weight(self, name: str, array: np.ndarray) -> str:
        """Add an initializer (streamed to external data when configured); returns its name."""
        if self.external_data is not None and array.nbytes >= INLINE_TENSOR_MAX_BYTES:
            array = np.asarray(array, order="C")
            # a byte view: memoryview knows no bfloat16/float8
            data = array.reshape(-1).view(np.uint8).data
            return self.add_initializer(self.external_data.write(name, NP_TO_ONNX[array.dtype], array.shape, data))
        return self.add_initializer(tensor_proto(name, array))

    def add_initializer(self, tensor: TensorProto) -> str:
        """Add a ready initializer (e.g. one reading a linked checkpoint shard); returns its name."""
        self.initializers.append(tensor)
        return tensor.name

    def const(self, value: Any, dtype: np.dtype | type = np.float32) -> str:
        """A small constant initializer, shared by value."""
        array = np.asarray(value, dtype=dtype)
        key = (array.dtype.str, array.shape, array.tobytes())
        if key not in self._constants:
            self._constants[key] = self.weight(f"const_{len(self._constants)}", array)
        return self._constants[key]

    def op(
        self,
        op_type: str,
        inputs: Sequence[str],
        n_out: int = 1,
        domain: str = "",
        hint: str | None = None,
        **attrs: Any,
    ) -> Any:
        """Add a node; returns its output name, or a list of names when n_out > 1."""
        base = self.unique(hint or op_type)
        outputs = [base] if n_out == 1 else [f"{base}:{i}" for i in range(n_out)]
        self.nodes.append(helper.make_node(op_type, list(inputs), outputs, name=base, domain=domain, **attrs))
        return outputs[0] if n_out == 1 else outputs

    def named(self, value: str, name: str) -> str:
        """Give `value` a fixed name (an Identity node), for tensors other tools address by name."""
        self.nodes.append(helper.make_node("Identity", [value], [name], name=name))
        return name

    def cast(self, value: str, to: int) -> str:
        return self.op("Cast", [value], to=to)

    def add_function(self, function: onnx.FunctionProto) -> None:
        self.functions[function.name] = function

    def make_model(self, producer_version: str) -> onnx.ModelProto:
        graph = helper.make_graph(self.nodes, self.name, self.inputs, self.outputs, initializer=self.initializers)
        opsets = [helper.make_opsetid("", ONNX_OPSET)]
        if self.functions:
            opsets.append(helper.make_opsetid(NUCLEUS_DOMAIN, NUCLEUS_DOMAIN_VERSION))
        model = helper.make_model(
            graph,
            opset_imports=opsets,
            functions=list(self.functions.values()),
            producer_name="nucleus-export",
            producer_version=producer_version,
        )
        model.ir_version = 10
        return model
