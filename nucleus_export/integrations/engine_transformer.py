"""`EngineTransformer`: a bundle in place of `pipe.transformer` in diffusers' NucleusMoEImagePipeline.

    pipe = NucleusMoEImagePipeline.from_pretrained("NucleusAI/NucleusMoE-Image", transformer=None)
    pipe.transformer = EngineTransformer("bundle/")
    image = pipe("a cat", height=1024, width=1024).images[0]

The pipeline calls `transformer(hidden_states=, timestep=, encoder_hidden_states=, encoder_hidden_states_mask=,
img_shapes=, attention_kwargs=, return_dict=False)` twice per step (prompt, then negative prompt) and reads
`config.in_channels`, `config.patch_size`, `is_cache_enabled`, `device` and `dtype` (DiffusionPipeline.device/.dtype,
`.to()`). This module answers exactly that surface from a bundle through `nucleus_runtime`:

- text K/V comes from the runtime's content-keyed `TextKVCache`: computed once per (prompt embedding, mask, image
  grid), so the per-step calls only run the denoiser. Hashing needs the embedding on the host once; afterwards the
  same unmodified tensor object (checked by identity and torch's in-place version counter) maps to its key directly.
- on a GPU with the TensorRT backend, torch's CUDA tensors reach the engine through DLPack (`Backend.denoise_device`)
  and the output is a torch tensor the engine writes, all on torch's current stream: no host copy and no
  synchronization per call. ONNX Runtime takes host arrays, so its path copies inputs to the host (free on the CPU:
  torch and numpy share the memory).
- what a bundle cannot serve is refused with one line naming it: a resolution outside its profiles, a batch or
  text length outside its ranges, an input dtype other than float32/bfloat16/float16, a LoRA scale.
"""

from __future__ import annotations

import collections
import contextlib
import weakref
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from nucleus_runtime.backends import registry
from nucleus_runtime.backends.base import Backend, TensorHandle
from nucleus_runtime.backends.onnxruntime import CUDA_EP
from nucleus_runtime.bundle import Manifest, load_manifest
from nucleus_runtime.contract import (
    AUTO,
    ENCODER_HIDDEN_STATES_MASK,
    HIDDEN_STATES,
    IMG_ROPE_COS,
    IMG_ROPE_SIN,
    ONNXRUNTIME,
    TIMESTEP,
)
from nucleus_runtime.errors import NucleusError
from nucleus_runtime.pipeline import cache_namespace, check_text
from nucleus_runtime.rope import image_rope, text_rope
from nucleus_runtime.text_kv_cache import TextKVCache, text_kv_key

# Input dtypes accepted: the graphs take float32, and these widen to it exactly.
IO_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
# Identity -> content-key memo entries kept (prompt and negative prompt of a few recent calls).
_KEY_MEMO_SIZE = 8


def _config_dict(manifest: Manifest) -> Any:
    """The model config with attribute access, as diffusers' ModelMixin.config offers it."""
    from diffusers.configuration_utils import FrozenDict

    return FrozenDict(manifest.model_config)


class EngineTransformer(torch.nn.Module):
    """Drop-in for NucleusMoEImagePipeline's transformer, backed by a nucleus-export bundle.

    Args:
        bundle: bundle folder (from `nucleus-export export` or `build`).
        backend: "auto" (the TensorRT flavor that built the bundle's engines when it can run here, else ONNX
            Runtime), or a name of nucleus_runtime.backends.registry.BACKENDS.
        threads: ONNX Runtime intra-op threads (None: its default).
        cache: text K/V cache to use (e.g. shared by several transformers); a private 4 GiB one by default.
        verify_checksums: check the bundle files against the manifest before loading them.
    """

    def __init__(
        self,
        bundle: str | Path,
        backend: str = AUTO,
        *,
        threads: int | None = None,
        cache: TextKVCache | None = None,
        verify_checksums: bool = True,
    ):
        super().__init__()
        self.bundle = Path(bundle)
        self.manifest = load_manifest(self.bundle)
        self.config = _config_dict(self.manifest)
        options = registry.BackendOptions(threads=threads, verify_checksums=verify_checksums)
        self.backend: Backend = registry.open_backend(self.bundle, backend, self.manifest, options)
        self.text_kv_cache = cache if cache is not None else TextKVCache()
        self._namespace = cache_namespace(self.manifest, self.backend)
        # Where the pipeline should keep its tensors: the GPU for engines and for ONNX Runtime's CUDA provider.
        on_gpu = self.backend.name != ONNXRUNTIME or getattr(self.backend, "providers", [None])[0] == CUDA_EP
        self._device = torch.device("cuda" if on_gpu else "cpu")
        self._dtype = torch.float32
        self._key_memo: collections.OrderedDict[tuple, tuple[Any, Any, str]] = collections.OrderedDict()
        self._rope: dict[tuple[int, int], tuple[np.ndarray, np.ndarray]] = {}
        self._device_rope: dict[tuple[int, int, str], tuple[torch.Tensor, torch.Tensor]] = {}
        # Single-engine TensorRT bundles read and write device memory (denoise_device); the others take host arrays.
        self._device_path = self.backend.supports_device_io

    # ---- the surface DiffusionPipeline reads ------------------------------------------------------------------

    @property
    def device(self) -> torch.device:
        return self._device

    @property
    def dtype(self) -> torch.dtype:
        return self._dtype

    @property
    def is_cache_enabled(self) -> bool:
        # The text K/V cache is internal; diffusers' cache hooks (and their per-run reset) do not apply to engines.
        return False

    def enable_cache(self, config: Any) -> None:
        raise NucleusError(
            f"diffusers' cache hooks ({type(config).__name__}) cannot run inside engines.",
            "leave them off: EngineTransformer already caches text K/V per prompt and image size.",
        )

    @contextlib.contextmanager
    def cache_context(self, name: str, **kwargs: Any) -> Iterator[None]:
        """No-op, for pipelines that label their calls ("cond"/"uncond"); text K/V is keyed by content instead."""
        yield

    def to(self, *args: Any, **kwargs: Any) -> EngineTransformer:
        """Record the device and dtype the pipeline asks for; the engines' own precision is fixed by the bundle."""
        device, dtype, _, _ = torch._C._nn._parse_to(*args, **kwargs)
        if dtype is not None:
            self._dtype = self._check_dtype(dtype, "requested dtype")
        if device is not None:
            self._device = torch.device(device)
        return self

    # ---- forward ------------------------------------------------------------------------------------------------

    def forward(
        self,
        hidden_states: torch.Tensor,
        img_shapes: list[tuple[int, int, int]] | tuple[int, int, int] | None = None,
        encoder_hidden_states: torch.Tensor | None = None,
        encoder_hidden_states_mask: torch.Tensor | None = None,
        timestep: torch.Tensor | None = None,
        attention_kwargs: dict[str, Any] | None = None,
        return_dict: bool = True,
    ) -> Any:
        """NucleusMoEImageTransformer2DModel.forward's signature and result, computed by the bundle's graphs."""
        self._check_attention_kwargs(attention_kwargs)
        if encoder_hidden_states is None or timestep is None or img_shapes is None:
            raise NucleusError(
                "EngineTransformer needs hidden_states, timestep, encoder_hidden_states and img_shapes.",
                "call it as NucleusMoEImagePipeline does.",
            )
        out_dtype = self._check_dtype(hidden_states.dtype, HIDDEN_STATES)
        self._check_dtype(encoder_hidden_states.dtype, "encoder_hidden_states")
        batch, tokens, channels = self._check_hidden_states(hidden_states)
        grid = self._grid(img_shapes, batch, tokens)
        text_len = encoder_hidden_states.shape[1]
        self._check_profile(batch, text_len)
        text_kv = self._text_kv(encoder_hidden_states, encoder_hidden_states_mask, grid)
        mask = self._mask(encoder_hidden_states_mask, encoder_hidden_states.shape[:2], encoder_hidden_states.device)
        timestep = timestep.reshape(-1).expand(batch) if timestep.numel() == 1 else timestep.reshape(-1)

        if hidden_states.is_cuda and self._device_path:
            sample = self._denoise_device(hidden_states, timestep, mask, text_kv, grid)
            return self._result(sample.to(out_dtype), return_dict)
        sample = self._denoise_host(hidden_states, timestep, mask, text_kv, grid)
        return self._result(sample.to(hidden_states.device, out_dtype), return_dict)

    @staticmethod
    def _result(sample: torch.Tensor, return_dict: bool) -> Any:
        if not return_dict:
            return (sample,)
        from diffusers.models.modeling_outputs import Transformer2DModelOutput

        return Transformer2DModelOutput(sample=sample)

    # ---- checks -------------------------------------------------------------------------------------------------

    def _check_dtype(self, dtype: torch.dtype, what: str) -> torch.dtype:
        if dtype not in IO_DTYPES:
            names = ", ".join(str(d).removeprefix("torch.") for d in IO_DTYPES)
            raise NucleusError(
                f"{what} is {str(dtype).removeprefix('torch.')}; the engines of {self.bundle} take {names} "
                f"(they compute in {self.manifest.precision}).",
                f"load the pipeline with torch_dtype one of {names}.",
            )
        return dtype

    @staticmethod
    def _check_attention_kwargs(attention_kwargs: dict[str, Any] | None) -> None:
        extra = dict(attention_kwargs or {})
        if float(extra.pop("scale", 1.0)) != 1.0:
            raise NucleusError(
                "a LoRA scale was passed in attention_kwargs, but engines have their weights baked in.",
                "fuse the LoRA into the checkpoint (pipe.fuse_lora + save) and export that, or drop the scale.",
            )
        if extra:
            raise NucleusError(
                f"attention_kwargs {sorted(extra)} cannot be honoured by engines.",
                "drop them (the pipeline passes an empty dict by default).",
            )

    def _check_hidden_states(self, hidden_states: torch.Tensor) -> tuple[int, int, int]:
        in_channels = self.config["in_channels"]
        if hidden_states.ndim != 3 or hidden_states.shape[2] != in_channels:
            raise NucleusError(
                f"hidden_states has shape {list(hidden_states.shape)}; the engines take packed latents [batch, tokens, {in_channels}].",
                "pass the pipeline's packed latents.",
            )
        return tuple(hidden_states.shape)  # type: ignore[return-value]

    def _grid(self, img_shapes: Any, batch: int, tokens: int) -> tuple[int, int]:
        shapes = [img_shapes] if len(img_shapes) and isinstance(img_shapes[0], int) else list(img_shapes)
        grids = {(int(s[1]), int(s[2])) for s in shapes}
        if len(grids) != 1 or any(int(s[0]) != 1 for s in shapes) or len(shapes) not in (1, batch):
            raise NucleusError(
                f"img_shapes {shapes} is not one (1, rows, cols) image grid per batch row.",
                "the engines serve one image size per call: pass the same (1, rows, cols) for every row.",
            )
        grid = grids.pop()
        served = [tuple(g) for g in self.manifest.profiles.grids]
        if grid not in served:
            pixels = ", ".join(f"{h}x{w}" for h, w in self.manifest.profiles.resolutions)
            step = self.manifest.profiles.pixels_per_patch
            raise NucleusError(
                f"{grid[0] * step}x{grid[1] * step} pixels (latent grid {grid[0]}x{grid[1]}) "
                f"is not in the profiles of {self.bundle} ({pixels}).",
                "call the pipeline with one of those height x width, or export the bundle with --resolutions including it.",
            )
        if grid[0] * grid[1] != tokens:
            raise NucleusError(
                f"hidden_states has {tokens} tokens but img_shapes says a {grid[0]}x{grid[1]} grid ({grid[0] * grid[1]}).",
                "pass img_shapes that match the latents.",
            )
        return grid

    def _check_profile(self, batch: int, text_len: int) -> None:
        lo, _, hi = self.manifest.profiles.batch
        if not lo <= batch <= hi:
            raise NucleusError(
                f"batch {batch} is outside the profile of {self.bundle} ({lo}..{hi}).",
                "generate fewer images per call (num_images_per_prompt), or export the bundle with a larger --max-batch.",
            )
        lo, _, hi = self.manifest.profiles.text_len
        if not lo <= text_len <= hi:
            raise NucleusError(
                f"the prompt is {text_len} tokens; {self.bundle} serves {lo}..{hi}.",
                f"pass max_sequence_length={hi} to the pipeline (truncates), or export the bundle with --max-text-len {text_len}.",
            )

    @staticmethod
    def _mask(mask: torch.Tensor | None, shape: torch.Size, device: torch.device) -> torch.Tensor:
        # diffusers passes None when every token is real.
        if mask is None:
            return torch.ones(tuple(shape), dtype=torch.int64, device=device)
        if tuple(mask.shape) != tuple(shape):
            raise NucleusError(
                f"encoder_hidden_states_mask has shape {list(mask.shape)}; expected {list(shape)}.",
                "pass the attention mask that came with the embeddings.",
            )
        return (mask != 0).to(torch.int64)

    # ---- text K/V -----------------------------------------------------------------------------------------------

    def _rope_tables(self, grid: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
        if grid not in self._rope:
            self._rope[grid] = image_rope(tuple(self.config["axes_dims_rope"]), *grid)
        return self._rope[grid]

    def _content_key(self, embeddings: torch.Tensor, mask: torch.Tensor | None, grid: tuple[int, int]) -> str:
        """The cache key of (embeddings, mask, grid); hashed once per tensor object and version, then remembered."""
        ident = (id(embeddings), embeddings._version, id(mask), None if mask is None else mask._version, grid)
        memo = self._key_memo.get(ident)
        if memo is not None and memo[0]() is embeddings and (memo[1] is None or memo[1]() is mask):
            self._key_memo.move_to_end(ident)
            return memo[2]
        host_embeddings, host_mask = self._host_text(embeddings, mask)
        key = text_kv_key(self._namespace, host_embeddings, host_mask, grid)
        self._key_memo[ident] = (weakref.ref(embeddings), None if mask is None else weakref.ref(mask), key)
        while len(self._key_memo) > _KEY_MEMO_SIZE:
            self._key_memo.popitem(last=False)
        return key

    def _host_text(self, embeddings: torch.Tensor, mask: torch.Tensor | None) -> tuple[np.ndarray, np.ndarray]:
        host_mask = None if mask is None else mask.detach().to("cpu", torch.int64).numpy()
        return check_text(
            "encoder_hidden_states",
            embeddings.detach().to("cpu", torch.float32).numpy(),
            host_mask,
            self.config["joint_attention_dim"],
        )

    def _text_kv(self, embeddings: torch.Tensor, mask: torch.Tensor | None, grid: tuple[int, int]) -> TensorHandle:
        key = self._content_key(embeddings, mask, grid)

        def compute() -> TensorHandle:
            host_embeddings, _ = self._host_text(embeddings, mask)
            cos, sin = text_rope(tuple(self.config["axes_dims_rope"]), *grid, host_embeddings.shape[1])
            return self.backend.compute_text_kv(host_embeddings, cos, sin)

        return self.text_kv_cache.get_or_compute(key, compute)

    # ---- denoiser -----------------------------------------------------------------------------------------------

    def _denoise_host(
        self, hidden_states: torch.Tensor, timestep: torch.Tensor, mask: torch.Tensor, text_kv: TensorHandle,
        grid: tuple[int, int],
    ) -> torch.Tensor:
        cos, sin = self._rope_tables(grid)

        def host(t: torch.Tensor, dtype: torch.dtype) -> np.ndarray:
            return t.detach().to("cpu", dtype).contiguous().numpy()

        out = self.backend.denoise(
            host(hidden_states, torch.float32), host(timestep, torch.float32), cos, sin, text_kv, host(mask, torch.int64)
        )
        return torch.from_numpy(out)

    def _denoise_device(
        self, hidden_states: torch.Tensor, timestep: torch.Tensor, mask: torch.Tensor, text_kv: TensorHandle,
        grid: tuple[int, int],
    ) -> torch.Tensor:
        """The engine reads torch's CUDA tensors and writes a torch tensor, on torch's current stream."""
        device = hidden_states.device
        rope_key = (*grid, str(device))
        if rope_key not in self._device_rope:
            cos, sin = self._rope_tables(grid)
            self._device_rope[rope_key] = (torch.from_numpy(cos).to(device), torch.from_numpy(sin).to(device))
        cos_t, sin_t = self._device_rope[rope_key]
        # Kept referenced until the call has been enqueued; the caching allocator orders reuse on this stream.
        tensors = {
            HIDDEN_STATES: hidden_states.detach().to(torch.float32).contiguous(),
            TIMESTEP: timestep.detach().to(device, torch.float32).contiguous(),
            IMG_ROPE_COS: cos_t,
            IMG_ROPE_SIN: sin_t,
            ENCODER_HIDDEN_STATES_MASK: mask.to(device, torch.int64).contiguous(),
        }
        out_channels = self.config["patch_size"] ** 2 * (self.config.get("out_channels") or self.config["in_channels"])
        sample = torch.empty((*hidden_states.shape[:2], out_channels), dtype=torch.float32, device=device)
        self.backend.denoise_device(tensors, text_kv, sample, torch.cuda.current_stream(device).cuda_stream)
        return sample

    def close(self) -> None:
        """Release the backend's sessions or engines and the cached text K/V."""
        self.text_kv_cache.clear()
        self.backend.close()

    def extra_repr(self) -> str:
        return f"bundle={self.bundle}, backend={self.backend.name}, precision={self.manifest.precision}"
