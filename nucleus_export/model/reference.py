"""The PyTorch reference: diffusers' own NucleusMoEImageTransformer2DModel loaded from the checkpoint, whole
(`load_reference`) or one block at a time (`BlockwiseReference`: the 17B model with one block's weights in memory)."""

from __future__ import annotations

import dataclasses
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


# ---- the reference one block at a time -----------------------------------------------------------------------------


def _torch_tensor(array: np.ndarray) -> torch.Tensor:
    """A checkpoint tensor (numpy, bf16 as ml_dtypes) as a torch tensor sharing its buffer."""
    import ml_dtypes
    import numpy as np
    import torch

    if array.dtype == ml_dtypes.bfloat16:
        return torch.from_numpy(array.view(np.uint16)).view(torch.bfloat16)
    return torch.from_numpy(array)


@dataclasses.dataclass
class BlockInputs:
    """What diffusers' forward hands every transformer block, and the residual stream between blocks.

    Attributes:
        hidden_states: [B, S, H] the residual stream (the input of the next block).
        encoder_hidden_states: [B, T, D] the text after `txt_norm`.
        temb: [B, H] the time embedding.
        image_rotary_emb: (image, text) rope frequencies as `pos_embed` returns them.
        attention_kwargs: the per-block kwargs (the joint attention mask).
    """

    hidden_states: torch.Tensor
    encoder_hidden_states: torch.Tensor
    temb: torch.Tensor
    image_rotary_emb: tuple[torch.Tensor, torch.Tensor]
    attention_kwargs: dict


class BlockwiseReference:
    """diffusers' NucleusMoEImageTransformer2DModel.forward written out in three parts (prologue, one block, epilogue)
    so the blocks can run one at a time: with `streamed` only the block being run holds weights, read from the
    safetensors (float32 or bf16, converted by torch exactly as `from_pretrained(torch_dtype=...)` and `.to(dtype)`
    convert), so the 17B model runs with one block's weights in memory. The parts are diffusers' own modules called
    in the order of its forward, so the outputs are those of the whole model (bitwise on the same device, with a
    BLAS that rounds independently of alignment: MKL_CBWR=AUTO,STRICT for MKL).

    Args:
        checkpoint: the model.
        dtype: float32 (truth) or bfloat16 (diffusers served in bf16).
        device: "cpu" or "cuda" (default: reference_device()).
        model: an already loaded whole model to run block by block instead of streaming (its dtype and device win).
    """

    def __init__(self, checkpoint: Checkpoint, dtype: torch.dtype | None = None, device: str | None = None,
                 model: torch.nn.Module | None = None):
        import torch

        self.checkpoint = checkpoint
        self.streamed = model is None
        if model is not None:
            if isinstance(model, BlockwiseReference):
                raise TypeError("pass the whole diffusers model, not a BlockwiseReference")
            self.model = model
            first = next(model.parameters())
            self.dtype, self.device = first.dtype, first.device
            return
        from accelerate import init_empty_weights
        from diffusers import NucleusMoEImageTransformer2DModel
        from diffusers.utils import logging as diffusers_logging

        diffusers_logging.disable_progress_bar()
        self.dtype = dtype or torch.float32
        self.device = torch.device(device or reference_device())
        # Parameters on the meta device (no memory); plain tensors such as the rope tables are real.
        with init_empty_weights(include_buffers=False):
            self.model = NucleusMoEImageTransformer2DModel.from_config(checkpoint.config.to_dict())
        self.model.eval().requires_grad_(False)
        shell = [n for n in self.model.state_dict() if not n.startswith("transformer_blocks.")]
        self._assign(self.model, "", shell)

    # -- weights --

    def _assign(self, module: torch.nn.Module, prefix: str, names: list[str]) -> None:
        state = {}
        for name in names:
            tensor = _torch_tensor(self.checkpoint.weights.read(prefix + name))
            state[name] = tensor.to(device=self.device, dtype=self.dtype) if tensor.is_floating_point() else tensor.to(self.device)
        module.load_state_dict(state, strict=False, assign=True)

    def block_module(self, idx: int) -> torch.nn.Module:
        return self.model.transformer_blocks[idx]

    def load_block(self, idx: int) -> torch.nn.Module:
        """Block `idx` with its weights (read from the checkpoint when streamed)."""
        block = self.block_module(idx)
        if self.streamed:
            self._assign(block, f"transformer_blocks.{idx}.", list(block.state_dict()))
        return block

    def release_block(self, idx: int) -> None:
        """Free block `idx`'s weights (streamed only; a whole model keeps them)."""
        if self.streamed:
            self.block_module(idx).to_empty(device="meta")

    # -- forward, in diffusers' order --

    def tensor(self, array: np.ndarray) -> torch.Tensor:
        """A numpy input on the reference's device; float inputs in its dtype (a bf16 reference takes bf16 inputs, as
        diffusers served in bf16 does)."""
        import torch

        tensor = torch.from_numpy(array).to(self.device)
        return tensor.to(self.dtype) if tensor.is_floating_point() else tensor

    def prologue(self, hidden_states: torch.Tensor, img_shapes: list, encoder_hidden_states: torch.Tensor,
                 encoder_hidden_states_mask: torch.Tensor | None, timestep: torch.Tensor) -> BlockInputs:
        """Everything diffusers' forward computes before its first block."""
        import torch
        from diffusers.models.transformers.transformer_nucleusmoe_image import _compute_text_seq_len_from_mask

        m = self.model
        with torch.no_grad():
            hidden_states = m.img_in(hidden_states)
            timestep = timestep.to(hidden_states.dtype)
            encoder_hidden_states = m.txt_norm(encoder_hidden_states)
            text_seq_len, _, mask = _compute_text_seq_len_from_mask(encoder_hidden_states, encoder_hidden_states_mask)
            temb = m.time_text_embed(timestep, hidden_states)
            image_rotary_emb = m.pos_embed(img_shapes, max_txt_seq_len=text_seq_len, device=hidden_states.device)
            kwargs = {}
            if mask is not None:
                batch_size, image_seq_len = hidden_states.shape[:2]
                image_mask = torch.ones((batch_size, image_seq_len), dtype=torch.bool, device=hidden_states.device)
                kwargs["attention_mask"] = torch.cat([image_mask, mask], dim=1)
        return BlockInputs(hidden_states, encoder_hidden_states, temb, image_rotary_emb, kwargs)

    def run_block(self, idx: int, inputs: BlockInputs) -> BlockInputs:
        """Block `idx` (loaded) on `inputs`; returns the inputs of the next block."""
        import torch

        with torch.no_grad():
            hidden = self.block_module(idx)(
                hidden_states=inputs.hidden_states,
                encoder_hidden_states=inputs.encoder_hidden_states,
                temb=inputs.temb,
                image_rotary_emb=inputs.image_rotary_emb,
                attention_kwargs=inputs.attention_kwargs,
            )
        return dataclasses.replace(inputs, hidden_states=hidden)

    def epilogue(self, inputs: BlockInputs) -> torch.Tensor:
        """The output projection after the last block: the sample."""
        import torch

        with torch.no_grad():
            return self.model.proj_out(self.model.norm_out(inputs.hidden_states, inputs.temb))

    def forward(self, hidden_states: np.ndarray, grid: tuple[int, int], encoder_hidden_states: np.ndarray,
                mask: np.ndarray | None, timestep: np.ndarray) -> np.ndarray:
        """The whole forward, block by block (each loaded, run and released in turn); the sample in float32."""
        state = self.prologue(self.tensor(hidden_states), [(1, *grid)] * hidden_states.shape[0],
                              self.tensor(encoder_hidden_states), None if mask is None else self.tensor(mask),
                              self.tensor(timestep))
        for idx in range(len(self.model.transformer_blocks)):
            self.load_block(idx)
            try:
                state = self.run_block(idx, state)
            finally:
                self.release_block(idx)
        return self.epilogue(state).float().cpu().numpy()
