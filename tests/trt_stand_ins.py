"""Stand-ins for TensorRT execution contexts and engines, for tests of the TensorRT backend's binding loops on a
machine without a GPU: they record shapes and tensor addresses and hand out fake device buffers."""

from __future__ import annotations

import numpy as np


class Buffer:
    def __init__(self, ptr: int, nbytes: int):
        self.ptr, self.nbytes = ptr, nbytes


class Context:
    def __init__(self) -> None:
        self.shapes: dict[str, tuple[int, ...]] = {}
        self.addresses: dict[str, int] = {}

    def set_input_shape(self, name: str, shape) -> None:
        self.shapes[name] = tuple(shape)

    def set_tensor_address(self, name: str, ptr: int) -> None:
        self.addresses[name] = ptr


class Engine:
    """An engine whose buffers lie 4096 bytes apart from `base` and whose every output has `output_shape`."""

    def __init__(self, base: int, output_shape: tuple[int, ...]):
        self.context, self.base, self.buffers = Context(), base, {}
        self._output_shape = output_shape

    def buffer(self, name: str, nbytes: int) -> Buffer:
        self.buffers[name] = Buffer(self.base + len(self.buffers) * 4096, nbytes)
        self.context.set_tensor_address(name, self.buffers[name].ptr)
        return self.buffers[name]

    def output_shape(self, name: str) -> tuple[int, ...]:
        return self._output_shape

    def output_dtype(self, name: str) -> np.dtype:
        return np.dtype(np.float32)
