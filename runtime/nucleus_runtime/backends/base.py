"""The interface every inference backend implements.

The pipeline never touches backend objects directly: it asks the backend for text K/V once per (prompt, mask, grid)
and keeps the returned handle in the cache; each denoising step passes that handle back. A handle may live in
device memory (TensorRT binds it as the denoiser's `text_kv` input once, no per-step copy) or be a numpy array
(ONNX Runtime). Handles report their size so the cache can bound itself in bytes.
"""

from __future__ import annotations

import abc
from typing import Any

import numpy as np


def text_kv_inputs(
    encoder_hidden_states: np.ndarray, txt_rope_cos: np.ndarray, txt_rope_sin: np.ndarray
) -> dict[str, np.ndarray]:
    """The text_kv graph's inputs by contract name, contiguous and in the contract's dtypes."""
    return {
        "encoder_hidden_states": np.ascontiguousarray(encoder_hidden_states, dtype=np.float32),
        "txt_rope_cos": np.ascontiguousarray(txt_rope_cos, dtype=np.float32),
        "txt_rope_sin": np.ascontiguousarray(txt_rope_sin, dtype=np.float32),
    }


def denoiser_host_inputs(
    hidden_states: np.ndarray,
    timestep: np.ndarray,
    img_rope_cos: np.ndarray,
    img_rope_sin: np.ndarray,
    encoder_hidden_states_mask: np.ndarray,
) -> dict[str, np.ndarray]:
    """The denoiser's host-side inputs (all but `text_kv`) by contract name, contiguous, in the contract's dtypes."""
    return {
        "hidden_states": np.ascontiguousarray(hidden_states, dtype=np.float32),
        "timestep": np.ascontiguousarray(timestep, dtype=np.float32),
        "img_rope_cos": np.ascontiguousarray(img_rope_cos, dtype=np.float32),
        "img_rope_sin": np.ascontiguousarray(img_rope_sin, dtype=np.float32),
        "encoder_hidden_states_mask": np.ascontiguousarray(encoder_hidden_states_mask, dtype=np.int64),
    }


class TextKVHandle(abc.ABC):
    """Opaque text K/V as produced by `Backend.compute_text_kv`; consumed only by the same backend."""

    @property
    @abc.abstractmethod
    def nbytes(self) -> int: ...

    @property
    @abc.abstractmethod
    def shape(self) -> tuple[int, ...]: ...

    def to_numpy(self) -> np.ndarray:
        """Host copy, for tests and debugging."""
        raise NotImplementedError


class Backend(abc.ABC):
    """Runs the two graphs of a bundle (contract: docs/contract.md)."""

    name: str = "backend"

    @abc.abstractmethod
    def compute_text_kv(
        self, encoder_hidden_states: np.ndarray, txt_rope_cos: np.ndarray, txt_rope_sin: np.ndarray
    ) -> TextKVHandle:
        """encoder_hidden_states [B,T,D] float32, rope tables [T, head_dim/2] -> text_kv [L,2,B,T,Hkv,Dh]."""

    @abc.abstractmethod
    def denoise(
        self,
        hidden_states: np.ndarray,
        timestep: np.ndarray,
        img_rope_cos: np.ndarray,
        img_rope_sin: np.ndarray,
        text_kv: TextKVHandle,
        encoder_hidden_states_mask: np.ndarray,
    ) -> np.ndarray:
        """One transformer forward: hidden_states [B,S,C_in], timestep [B] (t/1000) -> sample [B,S,C_out]."""

    def denoise_device(self, inputs: dict[str, Any], text_kv: TextKVHandle, sample: Any, stream: int) -> None:
        """One transformer forward on caller-owned GPU tensors, enqueued on the caller's CUDA `stream`.

        `inputs` holds the denoiser inputs other than `text_kv` by contract name and `sample` receives the output, all
        contiguous DLPack tensors (torch, CuPy, JAX) on the GPU in the contract's dtypes. Nothing is copied to the host
        and nothing waits: DLPack's stream protocol orders the producer's pending work before `stream`, and the
        caller orders its later work on `stream`. Backends that take host arrays only do not override this (callers
        use `denoise`).
        """
        raise NotImplementedError(f"the {self.name} backend takes host arrays only")

    def close(self) -> None:  # noqa: B027 - optional hook
        """Release device memory and sessions."""

    def describe(self) -> dict[str, Any]:
        return {"backend": self.name}
