"""The PyTorch reference: diffusers' own NucleusMoEImageTransformer2DModel loaded from the checkpoint."""

from __future__ import annotations

from typing import TYPE_CHECKING

from nucleus_export.errors import NucleusExportError
from nucleus_export.model.checkpoint import Checkpoint

if TYPE_CHECKING:
    import numpy as np
    import torch
    from diffusers import NucleusMoEImageTransformer2DModel

# Room left for activations and the rest of the process when checking that the reference fits.
_HEADROOM = 0.85


def reference_device() -> str:
    """A CUDA GPU when PyTorch sees one (the real 17B reference does not fit a 24 GB host in float32), else CPU."""
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def _check_memory(checkpoint: Checkpoint, dtype: torch.dtype, device: str) -> None:
    import psutil
    import torch

    needed = checkpoint.weights.num_parameters * torch.tensor([], dtype=dtype).element_size()
    available = torch.cuda.mem_get_info()[0] if device == "cuda" else psutil.virtual_memory().available
    if needed > _HEADROOM * available:
        raise NucleusExportError(
            f"the PyTorch reference needs {needed / 1e9:.1f} GB in {str(dtype).removeprefix('torch.')} on {device}, "
            f"but only {available / 1e9:.1f} GB is free.",
            "run parity checks and FP8 calibration on a machine with a large GPU (PyTorch with CUDA) or more memory; "
            "`build` can reuse stored scales (--fp8-scales) and skip the CPU report (--skip-quality).",
        )


def load_reference(
    checkpoint: Checkpoint, dtype: torch.dtype | None = None, device: str | None = None
) -> NucleusMoEImageTransformer2DModel:
    """Load the whole model on purpose (parity checks, calibration); float32, on a GPU when there is one."""
    import torch
    from diffusers import NucleusMoEImageTransformer2DModel
    from diffusers.utils import logging as diffusers_logging

    diffusers_logging.disable_progress_bar()  # stderr carries our progress and one-line errors, not tqdm bars
    dtype = dtype or torch.float32
    device = device or reference_device()
    _check_memory(checkpoint, dtype, device)
    model = NucleusMoEImageTransformer2DModel.from_pretrained(
        checkpoint.transformer_dir, torch_dtype=dtype, low_cpu_mem_usage=True, device_map=device if device != "cpu" else None
    )
    return model.eval().requires_grad_(False)


def to_model(model: torch.nn.Module, array: np.ndarray) -> torch.Tensor:
    """A numpy input on the reference model's device."""
    import torch

    return torch.from_numpy(array).to(next(model.parameters()).device)
