"""nucleus_runtime.dlpack reads DLPack capsules (address, shape, dtype, device) without the producer's framework:
checked on torch and numpy CPU tensors, whose addresses are known."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from nucleus_runtime import dlpack
from nucleus_runtime.errors import NucleusError


@pytest.mark.parametrize(
    "tensor,dtype",
    [
        (torch.arange(24, dtype=torch.float32).reshape(2, 3, 4), "float32"),
        (torch.ones(5, 7, dtype=torch.int64), "int64"),
        (torch.zeros(3, 2, dtype=torch.bfloat16), "bfloat16"),
        (torch.zeros(1, 8, 1, dtype=torch.float16), "float16"),
    ],
)
def test_view_of_torch_tensors(tensor, dtype):
    view = dlpack.view(tensor)
    assert view.ptr == tensor.data_ptr()
    assert view.shape == tuple(tensor.shape) and view.dtype == dtype
    assert view.device_type == dlpack.KDL_CPU and view.device == "cpu"


def test_view_of_an_offset_slice_points_at_its_first_element():
    base = torch.arange(40, dtype=torch.float32).reshape(4, 10)
    part = base[2:]
    assert dlpack.view(part).ptr == part.data_ptr() == base.data_ptr() + 2 * 10 * 4


def test_view_of_numpy():
    array = np.arange(12, dtype=np.float32).reshape(3, 4)
    view = dlpack.view(array)
    assert view.ptr == array.ctypes.data and view.shape == (3, 4) and view.dtype == "float32"


def test_view_keeps_the_memory_alive():
    view = dlpack.view(torch.full((1000,), 3.0))
    import ctypes

    assert (ctypes.c_float * 3).from_address(view.ptr)[:] == [3.0, 3.0, 3.0]


def test_non_contiguous_and_foreign_objects_are_refused():
    with pytest.raises(NucleusError, match="contiguous"):
        dlpack.view(torch.zeros(4, 6).t())
    with pytest.raises(NucleusError, match="not a DLPack tensor"):
        dlpack.view([1.0, 2.0])


def test_tensorrt_device_path_refuses_host_tensors_before_binding():
    """The validation in TensorRTBackend.denoise_device runs before any TensorRT call (none exists here)."""
    from nucleus_runtime.backends.tensorrt import TensorRTBackend, TrtTensor

    backend = object.__new__(TensorRTBackend)
    inputs = {"hidden_states": torch.zeros(1, 4, 64), "timestep": torch.zeros(1), "img_rope_cos": torch.zeros(4, 16),
              "img_rope_sin": torch.zeros(4, 16), "encoder_hidden_states_mask": torch.ones(1, 3, dtype=torch.int64)}
    with pytest.raises(NucleusError, match="hidden_states is float32 in cpu memory; the engine binds float32 on the GPU"):
        backend.denoise_device(inputs, object.__new__(TrtTensor), torch.zeros(1, 4, 64), stream=0)
