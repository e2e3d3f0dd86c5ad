"""The interface every inference backend implements.

The pipeline never touches backend objects directly: it asks the backend for text K/V once per (prompt, mask, grid)
and keeps the returned handle in the cache; each denoising step passes that handle back. A handle may live in
device memory (TensorRT binds it as the denoiser's `text_kv` input once, no per-step copy) or be a numpy array
(ONNX Runtime). Handles report their size so the cache can bound itself in bytes.
"""

from __future__ import annotations

import abc
import dataclasses
from pathlib import Path
from typing import Any

import numpy as np

from nucleus_runtime import contract
from nucleus_runtime.bundle import Manifest
from nucleus_runtime.contract import AUTO
from nucleus_runtime.errors import NucleusError

# The denoiser inputs fed from the host each step: all but text_kv, which backends keep where they computed it.
DENOISER_HOST_INPUTS = tuple(n for n in contract.DENOISER_INPUTS if n != contract.TEXT_KV)


def host_array(name: str, array: np.ndarray) -> np.ndarray:
    """A host input by contract name, contiguous, in the contract's dtype."""
    return np.ascontiguousarray(array, dtype=contract.HOST_INPUT_DTYPES[name])


def text_kv_inputs(
    encoder_hidden_states: np.ndarray, txt_rope_cos: np.ndarray, txt_rope_sin: np.ndarray
) -> dict[str, np.ndarray]:
    """The text_kv graph's inputs by contract name, contiguous and in the contract's dtypes."""
    arrays = (encoder_hidden_states, txt_rope_cos, txt_rope_sin)
    return {name: host_array(name, a) for name, a in zip(contract.TEXT_KV_INPUTS, arrays, strict=True)}


def denoiser_host_inputs(
    hidden_states: np.ndarray,
    timestep: np.ndarray,
    img_rope_cos: np.ndarray,
    img_rope_sin: np.ndarray,
    encoder_hidden_states_mask: np.ndarray,
) -> dict[str, np.ndarray]:
    """The denoiser's host-side inputs (all but `text_kv`) by contract name, contiguous, in the contract's dtypes."""
    arrays = (hidden_states, timestep, img_rope_cos, img_rope_sin, encoder_hidden_states_mask)
    return {name: host_array(name, a) for name, a in zip(DENOISER_HOST_INPUTS, arrays, strict=True)}


def text_encoder_inputs(
    backend: Backend, input_ids: np.ndarray, attention_mask: np.ndarray, past: TensorHandle | None
) -> tuple[np.ndarray, np.ndarray, dict[str, int]]:
    """input_ids and attention_mask for the text encoder, contiguous int64, checked against each other and against
    the past K/V's shape [L, 2, B, P, Hkv, Dh] (None: no past), so a mismatch is one clear error, not a failed run;
    and the sizes of the new tokens' dynamic dims. The past must be the backend's own key_values."""
    if past is not None and not isinstance(past, backend.tensor_type):
        raise TypeError(f"{type(backend).__name__}.encode_prompt needs its own key_values as past, got {type(past).__name__}")
    manifest, past_shape = backend.manifest, None if past is None else past.shape
    ids = host_array(contract.INPUT_IDS, input_ids)
    mask = host_array(contract.ATTENTION_MASK, attention_mask)
    if ids.ndim != 2 or mask.ndim != 2:
        raise NucleusError(f"input_ids {list(ids.shape)} and attention_mask {list(mask.shape)} must both be 2-D [batch, tokens].",
                           "pass token ids [batch, text_len] and a mask [batch, past_len + text_len].")
    batch, text_len = ids.shape
    past_len = 0
    if past_shape is not None:
        layers = manifest.stages[contract.TEXT_ENCODER_GRAPH].io.inputs[contract.PAST_KEY_VALUES].shape[0]
        if len(past_shape) != 6 or past_shape[0] != layers or past_shape[2] != batch:
            raise NucleusError(
                f"the past K/V has shape {list(past_shape)}; this text encoder takes [{layers}, 2, {batch}, past_len, ...] "
                f"for a batch of {batch}.",
                "pass the key_values of an earlier encode_prompt call, repeated over the batch (axis 2), or no past.",
            )
        past_len = past_shape[3]
    if mask.shape != (batch, past_len + text_len):
        raise NucleusError(
            f"attention_mask has shape {list(mask.shape)}; with {past_len} past and {text_len} new tokens it must be "
            f"[{batch}, {past_len + text_len}].",
            "give the mask over [past ; new] tokens (1 real, 0 padding).",
        )
    return ids, mask, {contract.BATCH_DIM: batch, contract.TEXT_LEN_DIM: text_len, contract.PAST_LEN_DIM: 0}


def vae_decoder_input(manifest: Manifest, latents: np.ndarray) -> np.ndarray:
    """Latents [B, z_dim, h, w] for the VAE decoder, contiguous float32, checked against the stage's latent channels
    and the bundle's served resolutions (h, w = height, width / the VAE's scale factor)."""
    array = host_array(contract.LATENTS, latents)
    stage = manifest.stages[contract.VAE_DECODER_GRAPH]
    z_dim, scale = stage.io.inputs[contract.LATENTS].shape[1], int(stage.config["scale_factor"])
    if array.ndim != 4 or array.shape[1] != z_dim:
        raise NucleusError(f"latents have shape {list(array.shape)}; the VAE decoder takes [batch, {z_dim}, height, width].",
                           "pass the unpacked latents without their frame axis (nucleus_runtime.latents.unpack_latents(...)[:, :, 0]).")
    manifest.grid_for(array.shape[2] * scale, array.shape[3] * scale)  # a clear error for a size the bundle does not serve
    return array


def raise_stage_not_loaded(backend: Backend, graph: str) -> None:
    """The one error for a stage a backend was not opened with: the fix depends on whether the bundle has it."""
    manifest: Manifest = backend.manifest  # type: ignore[attr-defined]
    if graph in manifest.stages:
        raise NucleusError(f"this {backend.name} backend was opened without the {graph} stage.",
                           f"open a backend with {graph} in BackendOptions.stages (None loads every stage).")
    raise NucleusError(
        f"the bundle has no {graph} stage (it has {', '.join(manifest.stage_names)}).",
        f"export the bundle from a pipeline root with --stages including {graph}.",
    )


@dataclasses.dataclass(frozen=True)
class BackendOptions:
    """How to open a backend; each backend reads what applies to it.

    Attributes:
        device: ONNX Runtime's device ("auto", "cpu", "cuda"); TensorRT runs on the current CUDA device.
        threads: ONNX Runtime intra-op threads (None: one per physical core).
        verify_checksums: check the files against the manifest before loading them (a plugin library always is).
        weight_streaming_budget: TensorRT only: bytes of denoiser weights kept on the GPU (engines built with
            `build --weight-streaming`); None keeps them all.
        stages: the stages to load (None: every stage of the bundle); a runtime that loads stages one at a time on a
            small GPU opens a backend per group (nucleus_runtime.text_to_image, memory plan "staged").
    """

    device: str = AUTO
    threads: int | None = None
    verify_checksums: bool = True
    weight_streaming_budget: int | None = None
    stages: tuple[str, ...] | None = None


class TensorHandle(abc.ABC):
    """A tensor left where the backend computed it (text K/V from `compute_text_kv`, the text encoder's key_values
    from `encode_prompt`): opaque, consumed only by the same backend, sized so caches can bound themselves."""

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
    """Runs the graphs of a bundle (contract: docs/contract.md). The backends a bundle can be opened with are listed
    in nucleus_runtime.backends.registry; each says what it reads (`files`) and whether it can run here."""

    name: str = "backend"
    # The handle type compute_text_kv returns; denoise refuses any other (text K/V of another backend).
    tensor_type: type[TensorHandle] = TensorHandle

    # ---- what the registry asks before opening one --------------------------------------------------------------

    @classmethod
    def stage_files(cls, manifest: Manifest, graph: str) -> list[str]:
        """Bundle-relative paths this backend reads to load one stage of the bundle."""
        raise NotImplementedError(f"{cls.__name__} does not open bundles by itself")

    @classmethod
    def files(cls, manifest: Manifest) -> list[str]:
        """Bundle-relative paths this backend reads besides the manifest and scheduler config: every stage's."""
        return list(dict.fromkeys(f for graph in manifest.stage_names for f in cls.stage_files(manifest, graph)))

    @classmethod
    def stage_bytes(cls, manifest: Manifest, graph: str) -> int:
        """What loading one stage costs in this backend, from the manifest alone (nothing is opened): the recorded
        bytes of the files it reads for the stage (stage_files). A memory planner compares this with the free host
        or device memory before opening a backend on some stages (BackendOptions.stages). Activations and
        workspaces come on top."""
        if graph not in manifest.stages:
            raise NucleusError(f"the bundle has no {graph} stage (it has {', '.join(manifest.stage_names)}).",
                               "ask for one of its stages, or export the bundle with --stages including it.")
        return sum(manifest.files[f].bytes for f in cls.stage_files(manifest, graph) if f in manifest.files)

    @classmethod
    def memory_available(cls, options: BackendOptions) -> int | None:
        """Bytes free now where this backend would load a bundle with `options` (None: it cannot tell)."""
        return None

    @classmethod
    def available(cls) -> bool:
        """Whether its libraries are importable (and, for GPU backends, a GPU is visible)."""
        return False

    @classmethod
    def serves(cls, bundle_dir: Path, manifest: Manifest) -> bool:
        """Whether the bundle holds what this backend runs (e.g. engines of its flavor)."""
        return False

    @classmethod
    def open(cls, bundle_dir: Path, manifest: Manifest, options: BackendOptions) -> Backend:
        """The bundle's graphs in this backend."""
        raise NotImplementedError(f"{cls.__name__} does not open bundles by itself")

    def unit_identity(self, manifest: Manifest, unit: str) -> str:
        """The identity of exactly the bytes this backend reads for one engine unit of the bundle (cache keys use
        it): by default the unit's ONNX graph and the weight ranges it reads."""
        return manifest.unit_digest(unit)

    @abc.abstractmethod
    def compute_text_kv(
        self, encoder_hidden_states: np.ndarray, txt_rope_cos: np.ndarray, txt_rope_sin: np.ndarray
    ) -> TensorHandle:
        """encoder_hidden_states [B,T,D] float32, rope tables [T, head_dim/2] -> text_kv [L,2,B,T,Hkv,Dh]."""

    def denoise(
        self,
        hidden_states: np.ndarray,
        timestep: np.ndarray,
        img_rope_cos: np.ndarray,
        img_rope_sin: np.ndarray,
        text_kv: TensorHandle,
        encoder_hidden_states_mask: np.ndarray,
    ) -> np.ndarray:
        """One transformer forward: hidden_states [B,S,C_in], timestep [B] (t/1000) -> sample [B,S,C_out]."""
        if not isinstance(text_kv, self.tensor_type):
            raise TypeError(f"{type(self).__name__}.denoise needs its own text K/V, got {type(text_kv).__name__}")
        inputs = denoiser_host_inputs(hidden_states, timestep, img_rope_cos, img_rope_sin, encoder_hidden_states_mask)
        return self._denoise(inputs, text_kv)

    def _denoise(self, inputs: dict[str, np.ndarray], text_kv: TensorHandle) -> np.ndarray:
        """`denoise` with the host inputs by contract name (denoiser_host_inputs) and this backend's own text K/V.
        Graph backends implement this; wrappers (timing, test doubles) may override `denoise` itself instead."""
        raise NotImplementedError(f"{type(self).__name__} implements neither denoise nor _denoise")

    def run_denoiser_unit(self, index: int, inputs: dict[str, np.ndarray], text_kv: TensorHandle) -> dict[str, np.ndarray]:
        """One unit of the denoiser (Manifest.unit_records order: a segment, or the whole graph) on host inputs by
        the unit record's names (all but text_kv, of which it binds its layers' slice) -> its outputs on the host.

        For checks that place an error in one segment (`check --backend`): chaining the units, each fed what the ones
        before returned, computes what `denoise` does, with host round trips between them. Outputs keep the unit's
        own dtypes; a float type numpy lacks comes back as raw bits of its width (bfloat16 as uint16), and an input
        is taken in the same form.
        """
        if not isinstance(text_kv, self.tensor_type):
            raise TypeError(f"{type(self).__name__}.run_denoiser_unit needs its own text K/V, got {type(text_kv).__name__}")
        return self._run_denoiser_unit(index, inputs, text_kv)

    def _run_denoiser_unit(self, index: int, inputs: dict[str, np.ndarray], text_kv: TensorHandle) -> dict[str, np.ndarray]:
        """`run_denoiser_unit` with this backend's own text K/V."""
        raise NotImplementedError(f"the {self.name} backend runs the denoiser only whole")

    def encode_prompt(
        self, input_ids: np.ndarray, attention_mask: np.ndarray, past: TensorHandle | None
    ) -> tuple[np.ndarray, TensorHandle]:
        """The text_encoder stage: input_ids [B, T] int64 and attention_mask [B, P + T] over [past ; new], with the K/V
        of the P tokens before them (None: P = 0) -> prompt_embeds [B, T, D] float32 on the host and the new tokens'
        key_values (contract.PAST_KEY_VALUES layout), left where they were computed."""
        raise NotImplementedError(f"the {self.name} backend did not load a text_encoder stage")

    def decode_image(self, latents: np.ndarray) -> np.ndarray:
        """The vae_decoder stage: latents [B, z_dim, h, w] float32 (unpacked, normalized) -> image [B, H, W, 3] uint8."""
        raise NotImplementedError(f"the {self.name} backend did not load a vae_decoder stage")

    def denoise_device(self, inputs: dict[str, Any], text_kv: TensorHandle, sample: Any, stream: int) -> None:
        """One transformer forward on caller-owned GPU tensors, enqueued on the caller's CUDA `stream`.

        `inputs` holds the denoiser inputs other than `text_kv` by contract name and `sample` receives the output, all
        contiguous DLPack tensors (torch, CuPy, JAX) on the GPU in the contract's dtypes. Nothing is copied to the host
        and nothing waits: DLPack's stream protocol orders the producer's pending work before `stream`, and the
        caller orders its later work on `stream`. Backends that take host arrays only do not override this (callers
        use `denoise`).
        """
        raise NotImplementedError(f"the {self.name} backend takes host arrays only")

    @property
    def supports_device_io(self) -> bool:
        """Whether `denoise_device` serves this backend's bundle (callers fall back to host arrays otherwise)."""
        return False

    def close(self) -> None:  # noqa: B027 - optional hook
        """Release device memory and sessions."""

    def describe(self) -> dict[str, Any]:
        return {"backend": self.name}
