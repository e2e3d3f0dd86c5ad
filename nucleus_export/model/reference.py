"""The PyTorch reference: diffusers' own NucleusMoEImageTransformer2DModel loaded from the checkpoint."""

from __future__ import annotations

from typing import TYPE_CHECKING

from nucleus_export.model.checkpoint import Checkpoint

if TYPE_CHECKING:
    import torch
    from diffusers import NucleusMoEImageTransformer2DModel


def load_reference(checkpoint: Checkpoint, dtype: torch.dtype | None = None) -> NucleusMoEImageTransformer2DModel:
    """Load the whole model into memory on purpose (parity checks, calibration). Defaults to float32."""
    import torch
    from diffusers import NucleusMoEImageTransformer2DModel

    model = NucleusMoEImageTransformer2DModel.from_pretrained(
        checkpoint.transformer_dir, torch_dtype=dtype or torch.float32, low_cpu_mem_usage=True
    )
    return model.eval().requires_grad_(False)
