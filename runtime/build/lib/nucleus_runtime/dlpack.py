"""Read a DLPack tensor (any framework's `__dlpack__`) as address, shape and dtype, without importing that framework.

The runtime binds device memory by address (TensorRT's `set_tensor_address`); DLPack is how a torch, CuPy or JAX tensor
says where its memory is and orders the producer's pending work before the consumer's stream. Only the legacy
`dltensor` capsule is read (every producer still offers it); the capsule is kept with the result, so the producer's
memory stays alive until the caller drops it, and its deleter runs when it is collected (the capsule is not
consumed).
"""

from __future__ import annotations

import ctypes
import dataclasses
from typing import Any

from nucleus_runtime.errors import NucleusError

# DLDeviceType codes (dlpack.h).
KDL_CPU, KDL_CUDA, KDL_CUDA_HOST, KDL_CUDA_MANAGED = 1, 2, 3, 13
_DEVICE_NAMES = {KDL_CPU: "cpu", KDL_CUDA: "cuda", KDL_CUDA_HOST: "cuda_host", KDL_CUDA_MANAGED: "cuda_managed"}
# (DLDataTypeCode, bits) -> contract dtype name.
_DTYPES = {
    (0, 8): "int8", (0, 32): "int32", (0, 64): "int64",
    (1, 8): "uint8",
    (2, 16): "float16", (2, 32): "float32", (2, 64): "float64",
    (4, 16): "bfloat16",
    (6, 8): "bool",
}


class _DLDevice(ctypes.Structure):
    _fields_ = [("device_type", ctypes.c_int32), ("device_id", ctypes.c_int32)]


class _DLDataType(ctypes.Structure):
    _fields_ = [("code", ctypes.c_uint8), ("bits", ctypes.c_uint8), ("lanes", ctypes.c_uint16)]


class _DLTensor(ctypes.Structure):
    _fields_ = [
        ("data", ctypes.c_void_p),
        ("device", _DLDevice),
        ("ndim", ctypes.c_int32),
        ("dtype", _DLDataType),
        ("shape", ctypes.POINTER(ctypes.c_int64)),
        ("strides", ctypes.POINTER(ctypes.c_int64)),
        ("byte_offset", ctypes.c_uint64),
    ]


class _DLManagedTensor(ctypes.Structure):
    _fields_ = [("dl_tensor", _DLTensor), ("manager_ctx", ctypes.c_void_p), ("deleter", ctypes.c_void_p)]


_get_pointer = ctypes.pythonapi.PyCapsule_GetPointer
_get_pointer.restype = ctypes.c_void_p
_get_pointer.argtypes = [ctypes.py_object, ctypes.c_char_p]


@dataclasses.dataclass(frozen=True)
class DLPackView:
    """Where a DLPack tensor's elements are. `owner` is the capsule: keep the view while the memory is in use."""

    ptr: int
    shape: tuple[int, ...]
    dtype: str
    device_type: int
    device_id: int
    owner: Any = dataclasses.field(repr=False, compare=False)

    @property
    def device(self) -> str:
        name = _DEVICE_NAMES.get(self.device_type, f"device_type {self.device_type}")
        return f"{name}:{self.device_id}" if self.device_type != KDL_CPU else name


def view(tensor: Any, stream: int | None = None) -> DLPackView:
    """The DLPack view of a contiguous tensor.

    Args:
        tensor: an object with `__dlpack__` and `__dlpack_device__` (torch, CuPy, JAX, numpy >= 1.23).
        stream: for CUDA tensors, the CUDA stream (address) the memory will be used on; the producer makes that
            stream wait for its pending work on the tensor (DLPack's stream protocol). Ignored on the CPU.
    """
    if not hasattr(tensor, "__dlpack__"):
        raise NucleusError(f"a {type(tensor).__name__} is not a DLPack tensor.", "pass a torch, CuPy or JAX tensor.")
    device_type, _ = tensor.__dlpack_device__()
    if int(device_type) in (KDL_CUDA, KDL_CUDA_MANAGED) and stream is not None:
        # DLPack reserves 0 (ambiguous); 1 names CUDA's legacy default stream, which is what address 0 means.
        capsule = tensor.__dlpack__(stream=stream or 1)
    else:
        capsule = tensor.__dlpack__()
    managed = _DLManagedTensor.from_address(_get_pointer(capsule, b"dltensor"))
    dl = managed.dl_tensor
    shape = tuple(dl.shape[i] for i in range(dl.ndim))
    key = (dl.dtype.code, dl.dtype.bits)
    if key not in _DTYPES or dl.dtype.lanes != 1:
        raise NucleusError(f"DLPack dtype code {key[0]} with {key[1]} bits is not supported.", "pass float32 or int64 tensors.")
    if dl.strides:
        expected, stride = [], 1
        for size in reversed(shape):
            expected.append(stride)
            stride *= size
        actual = [dl.strides[i] for i in range(dl.ndim)]
        # Strides of size-1 axes carry no information; compare the others only.
        if any(a != e for a, e, n in zip(actual, reversed(expected), shape, strict=True) if n != 1):
            raise NucleusError(
                f"a tensor of shape {list(shape)} has strides {actual}: the engines read contiguous memory.",
                "pass a contiguous tensor (torch: .contiguous()).",
            )
    return DLPackView(
        ptr=(dl.data or 0) + dl.byte_offset,
        shape=shape,
        dtype=_DTYPES[key],
        device_type=dl.device.device_type,
        device_id=dl.device.device_id,
        owner=capsule,
    )
