"""Triton Python-backend model `nucleus_pipeline`: whole requests (prompt embeddings in, latents out).

This file is copied verbatim into a generated repository as `nucleus_pipeline/1/model.py`, next to a copy of
`nucleus_runtime`, so it imports only the standard library, numpy and nucleus_runtime (never nucleus_export).

Two layers, so that almost all of it runs without Triton:
- the core, `PipelineCore`: request tensors and parameters -> `nucleus_runtime.pipeline.generate` with any
  `Backend` -> response tensors. The tests run it with the runtime's ONNX Runtime backend and compare it with
  `nucleus-export run`.
- the Triton adapter, kept small: `TritonPythonModel` (reads requests, writes responses) and the backend it gives
  the core, chosen by the config's `layout` parameter:
  - `inprocess`: the runtime's own backend (`nucleus_runtime.backends.registry.open_backend`: TensorRT on the GPU,
    ONNX Runtime on the CPU) over the bundle files placed in this version folder. Text K/V stays where that backend
    put it (device memory for TensorRT) for every step and, through the cache, for later requests.
  - `bls`: `BlsBackend`, the runtime's `Backend` interface over BLS calls to the `nucleus_text_kv` and
    `nucleus_denoiser` models; the text K/V tensor travels through Triton at every step.
  `triton_python_backend_utils` exists only inside Triton's Python backend, so it is imported in `initialize`.

The denoising loop and the text K/V cache are the runtime's: text K/V is computed once per (prompt, mask, image grid)
and reused for every step, and the per-instance cache keeps it across requests up to `text_kv_cache_bytes`.
"""

from __future__ import annotations

import dataclasses
import json
import math
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

_HERE = Path(__file__).resolve().parent
if (_HERE / "nucleus_runtime").is_dir() and str(_HERE) not in sys.path:
    # In a generated repository: import the runtime copied next to this file, whatever else is installed.
    sys.path.insert(0, str(_HERE))

import numpy as np  # noqa: E402

from nucleus_runtime.backends import registry  # noqa: E402
from nucleus_runtime.backends.base import (  # noqa: E402
    Backend,
    TensorHandle,
    text_kv_inputs,
)
from nucleus_runtime.bundle import Manifest, load_manifest  # noqa: E402
from nucleus_runtime.contract import (  # noqa: E402
    ONNXRUNTIME,
    SAMPLE,
    SCHEDULER_CONFIG_NAME,
)
from nucleus_runtime.contract import TEXT_KV_GRAPH as TEXT_KV  # noqa: E402
from nucleus_runtime.errors import NucleusError  # noqa: E402
from nucleus_runtime.pipeline import generate  # noqa: E402
from nucleus_runtime.scheduler import DEFAULT_SCHEDULER_CONFIG, SchedulerConfig  # noqa: E402
from nucleus_runtime.text_kv_cache import DEFAULT_MAX_BYTES, TextKVCache  # noqa: E402

# How the pipeline model reaches the graphs (config parameter `layout`; see the module docstring).
LAYOUT_INPROCESS = "inprocess"
LAYOUT_BLS = "bls"
LAYOUTS = (LAYOUT_INPROCESS, LAYOUT_BLS)

# config.pbtxt parameters of the pipeline model (written by nucleus_export.triton.configs).
PARAM_LAYOUT = "layout"
PARAM_TEXT_KV_CACHE_BYTES = "text_kv_cache_bytes"
# bls: the graph models it calls
PARAM_TEXT_KV_MODEL = "text_kv_model"
PARAM_DENOISER_MODEL = "denoiser_model"
# inprocess: the runtime backend over the files in the version folder, ONNX Runtime's threads, load-time checksums
PARAM_BACKEND = "backend"
PARAM_THREADS = "onnxruntime_threads"
PARAM_VERIFY_CHECKSUMS = "verify_checksums"

OUTPUT_LATENTS = "latents"

# Request defaults: the model's recommended settings (README); height/width default to the bundle's opt resolution.
DEFAULT_STEPS = 50
DEFAULT_GUIDANCE = 4.0
DEFAULT_SEED = 0


@dataclasses.dataclass(frozen=True)
class IOSpec:
    """A pipeline input/output. A string in `dims` names a model_config field (e.g. joint_attention_dim)."""

    name: str
    dtype: str
    dims: tuple[int | str, ...]
    optional: bool = False
    doc: str = ""

    def dims_for(self, model_config: Mapping[str, Any]) -> tuple[int, ...]:
        return tuple(int(model_config[d]) if isinstance(d, str) else d for d in self.dims)


# Names follow diffusers' pipeline arguments. Scalars are [1] tensors; each may instead come as a request parameter
# of the same name (an input tensor wins), else the default applies.
PIPELINE_INPUTS: tuple[IOSpec, ...] = (
    IOSpec("prompt_embeds", "float32", (-1, -1, "joint_attention_dim"), doc="[B, T, D] text encoder hidden states"),
    IOSpec("prompt_embeds_mask", "int64", (-1, -1), True, "[B, T] 1 = token, 0 = padding (default all 1)"),
    IOSpec("negative_prompt_embeds", "float32", (-1, -1, "joint_attention_dim"), True, "[B, T', D], needed for guidance > 1"),
    IOSpec("negative_prompt_embeds_mask", "int64", (-1, -1), True, "[B, T']"),
    IOSpec("initial_latents", "float32", (-1, -1, "in_channels"), True, "[B, S, C] packed noise (instead of seed)"),
    IOSpec("height", "int64", (1,), True, "pixels (default: the bundle's opt resolution)"),
    IOSpec("width", "int64", (1,), True, "pixels"),
    IOSpec("num_inference_steps", "int64", (1,), True, f"default {DEFAULT_STEPS}"),
    IOSpec("guidance_scale", "float32", (1,), True, f"default {DEFAULT_GUIDANCE}; CFG runs when > 1"),
    IOSpec("seed", "int64", (1,), True, f"numpy noise seed, default {DEFAULT_SEED}"),
)
PIPELINE_OUTPUTS: tuple[IOSpec, ...] = (
    IOSpec(OUTPUT_LATENTS, "float32", (-1, -1, "in_channels"), doc="[B, S, C] final packed latents"),
)


@dataclasses.dataclass
class PipelineRequest:
    """One request, parsed and validated; the arguments of `generate`."""

    prompt_embeds: np.ndarray
    prompt_mask: np.ndarray | None
    negative_prompt_embeds: np.ndarray | None
    negative_prompt_mask: np.ndarray | None
    latents: np.ndarray | None
    height: int
    width: int
    steps: int
    guidance: float
    seed: int


def _scalar(name: str, tensors: Mapping[str, np.ndarray], parameters: Mapping[str, Any], default: Any) -> Any:
    if name in tensors:
        array = np.asarray(tensors[name])
        if array.size != 1:
            raise NucleusError(f"input {name} has {array.size} values; it takes one.", f"send {name} as a [1] tensor.")
        return array.reshape(-1)[0].item()
    if name in parameters:
        return parameters[name]
    return default


def _int(name: str, value: Any, minimum: int) -> int:
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise NucleusError(f"{name} is {value!r}, not a number.", f"send {name} as an integer.") from None
    if not number.is_integer() or number < minimum:
        raise NucleusError(f"{name} is {value!r}; it must be an integer >= {minimum}.", f"send a valid {name}.")
    return int(number)


def parse_request(tensors: Mapping[str, np.ndarray], parameters: Mapping[str, Any], manifest: Manifest) -> PipelineRequest:
    """Request tensors (name -> array) and parameters -> a validated PipelineRequest.

    Shapes of the embeddings, masks and latents are checked by `generate`, against the bundle's profiles too.
    """
    known = {spec.name for spec in PIPELINE_INPUTS}
    unknown = sorted(set(tensors) - known)
    if unknown:
        raise NucleusError(f"unknown inputs {unknown}.", f"the pipeline takes: {', '.join(sorted(known))}.")
    if "prompt_embeds" not in tensors:
        raise NucleusError("the request has no prompt_embeds.", "send the text encoder's hidden states as prompt_embeds.")
    for spec in PIPELINE_INPUTS:
        value = tensors.get(spec.name)
        # A NaN or inf would flow through every step into latents that look like an answer: refuse it up front.
        if spec.dtype == "float32" and value is not None and not np.isfinite(value).all():
            raise NucleusError(
                f"input {spec.name} holds NaN or infinite values.", f"send finite values in {spec.name}."
            )
    opt_h, opt_w = manifest.profiles.opt_resolution
    guidance = _scalar("guidance_scale", tensors, parameters, DEFAULT_GUIDANCE)
    try:
        guidance = float(guidance)
    except (TypeError, ValueError):
        raise NucleusError(f"guidance_scale is {guidance!r}, not a number.", "send guidance_scale as a float.") from None
    if not math.isfinite(guidance):
        raise NucleusError(f"guidance_scale is {guidance}.", "send a finite guidance_scale.")
    return PipelineRequest(
        prompt_embeds=tensors["prompt_embeds"],
        prompt_mask=tensors.get("prompt_embeds_mask"),
        negative_prompt_embeds=tensors.get("negative_prompt_embeds"),
        negative_prompt_mask=tensors.get("negative_prompt_embeds_mask"),
        latents=tensors.get("initial_latents"),
        height=_int("height", _scalar("height", tensors, parameters, opt_h), 1),
        width=_int("width", _scalar("width", tensors, parameters, opt_w), 1),
        steps=_int("num_inference_steps", _scalar("num_inference_steps", tensors, parameters, DEFAULT_STEPS), 1),
        guidance=guidance,
        # numpy's default_rng takes non-negative seeds only.
        seed=_int("seed", _scalar("seed", tensors, parameters, DEFAULT_SEED), 0),
    )


class PipelineCore:
    """Serves requests with the runtime's loop over a given Backend (BLS in Triton, ONNX Runtime in tests).

    Args:
        backend: runs the bundle's text_kv and denoiser graphs.
        manifest: the bundle's manifest; scheduler_config: its scheduler settings.
        cache_bytes: bound of the text K/V cache shared by this instance's requests (0: no reuse across requests).
    """

    def __init__(self, backend: Backend, manifest: Manifest, scheduler_config: SchedulerConfig, cache_bytes: int = DEFAULT_MAX_BYTES):
        self.backend = backend
        self.manifest = manifest
        self.scheduler_config = scheduler_config
        # With a zero bound every entry is "larger than the bound": computed once per request, never kept.
        self.cache = TextKVCache(max_bytes=cache_bytes)

    @staticmethod
    def load_bundle_files(model_dir: Path) -> tuple[Manifest, SchedulerConfig]:
        """Manifest and scheduler config from a folder holding manifest.json (+ scheduler_config.json)."""
        manifest = load_manifest(model_dir)
        path = Path(model_dir) / SCHEDULER_CONFIG_NAME
        scheduler = SchedulerConfig.from_file(path) if path.is_file() else SchedulerConfig.from_dict(DEFAULT_SCHEDULER_CONFIG)
        return manifest, scheduler

    def __call__(self, tensors: Mapping[str, np.ndarray], parameters: Mapping[str, Any] | None = None) -> dict[str, np.ndarray]:
        request = parse_request(tensors, parameters or {}, self.manifest)
        latents = generate(
            self.backend,
            self.manifest,
            self.scheduler_config,
            request.prompt_embeds,
            request.prompt_mask,
            request.negative_prompt_embeds,
            request.negative_prompt_mask,
            height=request.height,
            width=request.width,
            steps=request.steps,
            guidance=request.guidance,
            latents=request.latents,
            seed=None if request.latents is not None else request.seed,
            cache=self.cache,
        )
        return {OUTPUT_LATENTS: np.ascontiguousarray(latents, dtype=np.float32)}


# ---- Triton adapter (runs only inside Triton's Python backend) -------------------------------------------------------

_ITEMSIZE = {"float32": 4, "float16": 2, "bfloat16": 2}


# How host tensors cross the Python backend stub depends on the numpy in its environment (both found with the real
# 2.51 stub): its pybind11 reads numpy 1's dtype layout, so under numpy 2 `Tensor(name, array)` produced empty
# outputs; DLPack views the same memory under any numpy, but the stub renames a consumed capsule "used_dlpack" where
# numpy 1's deleter expects "used_dltensor", which broke the stub under numpy 1. So: the stub's own numpy path under
# numpy 1, DLPack under numpy 2.
_DLPACK = int(np.__version__.split(".")[0]) >= 2


def from_triton(tensor: Any) -> np.ndarray:
    """A host pb_utils.Tensor as a numpy array."""
    return np.from_dlpack(tensor) if _DLPACK else tensor.as_numpy()


def to_triton(pb_utils: Any, name: str, array: np.ndarray) -> Any:
    """A numpy array as a pb_utils.Tensor."""
    array = np.ascontiguousarray(array)
    return pb_utils.Tensor.from_dlpack(name, array) if _DLPACK else pb_utils.Tensor(name, array)


def open_inprocess_backend(model_dir: Path, manifest: Manifest, params: Mapping[str, str], device_id: int | None) -> Backend:
    """The runtime backend the config names, over the bundle files in `model_dir` (the model's version folder).

    Args:
        params: the config's parameters (`backend`, `onnxruntime_threads`, `verify_checksums`).
        device_id: the GPU Triton gave this instance (KIND_GPU), made current before TensorRT loads the engines.
    """
    name = params.get(PARAM_BACKEND, ONNXRUNTIME)
    if name != ONNXRUNTIME and device_id is not None:
        from nucleus_runtime.backends.tensorrt import select_cuda_device

        select_cuda_device(device_id)
    threads = int(params.get(PARAM_THREADS) or 0)
    options = registry.BackendOptions(
        # The instance group is KIND_CPU for ONNX Runtime: stay on the CPU even where onnxruntime-gpu is installed.
        device="cpu" if name == ONNXRUNTIME else "auto",
        threads=threads or None,
        verify_checksums=params.get(PARAM_VERIFY_CHECKSUMS, "true") != "false",
    )
    return registry.open_backend(model_dir, name, manifest, options)


class BlsTensor(TensorHandle):
    """Text K/V as the pb_utils.Tensor that nucleus_text_kv returned, left where Triton put it (GPU for TensorRT).

    It is passed back unchanged as the denoiser's `text_kv` input (same name), so it is never converted to numpy,
    which has no bfloat16, and never copied to the host between steps.
    """

    def __init__(self, tensor: Any, shape: tuple[int, ...], itemsize: int):
        self.tensor = tensor
        self._shape = shape
        self._itemsize = itemsize

    @property
    def nbytes(self) -> int:
        return math.prod(self._shape) * self._itemsize

    @property
    def shape(self) -> tuple[int, ...]:
        return self._shape


class BlsBackend(Backend):
    """The runtime's Backend over BLS calls to the two graph models.

    Args:
        pb_utils: the `triton_python_backend_utils` module.
        manifest: for the text_kv output's shape and element type.
        text_kv_model, denoiser_model: the model names in the repository.
    """

    tensor_type = BlsTensor

    name = "triton_bls"

    def __init__(self, pb_utils: Any, manifest: Manifest, text_kv_model: str, denoiser_model: str):
        self.pb = pb_utils
        self.text_kv_model = text_kv_model
        self.denoiser_model = denoiser_model
        spec = manifest.stages[TEXT_KV].io.outputs[TEXT_KV]
        self._text_kv_dims = list(spec.shape)
        self._text_kv_itemsize = _ITEMSIZE.get(spec.dtype, 4)
        # Since Triton 23.04 a BLS call can ask for host outputs; the denoiser's sample is needed on the host.
        self._host = (
            pb_utils.PreferredMemory(pb_utils.TRITONSERVER_MEMORY_CPU, 0) if hasattr(pb_utils, "PreferredMemory") else None
        )

    def _exec(self, model: str, inputs: list[Any], output: str, host: bool) -> Any:
        kwargs = {"preferred_memory": self._host} if host and self._host is not None else {}
        request = self.pb.InferenceRequest(model_name=model, requested_output_names=[output], inputs=inputs, **kwargs)
        response = request.exec()
        if response.has_error():
            raise NucleusError(
                f"Triton model {model} failed: {response.error().message()}",
                f"check the server log for {model}; the request's shapes must be within the bundle's profiles.",
            )
        return self.pb.get_output_tensor_by_name(response, output)

    def compute_text_kv(self, encoder_hidden_states: np.ndarray, txt_rope_cos: np.ndarray, txt_rope_sin: np.ndarray) -> BlsTensor:
        host = text_kv_inputs(encoder_hidden_states, txt_rope_cos, txt_rope_sin)
        inputs = [to_triton(self.pb, name, array) for name, array in host.items()]
        tensor = self._exec(self.text_kv_model, inputs, TEXT_KV, host=False)
        batch, text_len = encoder_hidden_states.shape[:2]
        sizes = {"batch": batch, "text_len": text_len}
        shape = tuple(sizes.get(d, d) if isinstance(d, str) else d for d in self._text_kv_dims)
        return BlsTensor(tensor, shape, self._text_kv_itemsize)  # type: ignore[arg-type]

    def _denoise(self, host: dict[str, np.ndarray], text_kv: BlsTensor) -> np.ndarray:  # type: ignore[override]
        inputs = [to_triton(self.pb, name, array) for name, array in host.items()] + [text_kv.tensor]
        sample = self._exec(self.denoiser_model, inputs, SAMPLE, host=True)
        if not sample.is_cpu():
            raise NucleusError(
                f"{self.denoiser_model} returned 'sample' in GPU memory and this Triton cannot ask BLS for host outputs.",
                "use Triton 23.04 or newer (pb_utils.PreferredMemory).",
            )
        return from_triton(sample)


class TritonPythonModel:
    """Triton's entry point; everything but tensor plumbing is in PipelineCore."""

    def initialize(self, args: dict[str, str]) -> None:
        import triton_python_backend_utils as pb_utils

        self.pb = pb_utils
        params = {k: v.get("string_value", "") for k, v in json.loads(args["model_config"]).get("parameters", {}).items()}
        manifest, scheduler = PipelineCore.load_bundle_files(_HERE)
        layout = params.get(PARAM_LAYOUT, LAYOUT_BLS)
        if layout == LAYOUT_INPROCESS:
            device_id = int(args["model_instance_device_id"]) if args.get("model_instance_kind") == "GPU" else None
            backend = open_inprocess_backend(_HERE, manifest, params, device_id)
        elif layout == LAYOUT_BLS:
            backend = BlsBackend(
                pb_utils,
                manifest,
                params.get(PARAM_TEXT_KV_MODEL, "nucleus_text_kv"),
                params.get(PARAM_DENOISER_MODEL, "nucleus_denoiser"),
            )
        else:
            raise NucleusError(f"config parameter {PARAM_LAYOUT} is '{layout}'.", f"use one of: {', '.join(LAYOUTS)}.")
        cache_bytes = int(params.get(PARAM_TEXT_KV_CACHE_BYTES) or DEFAULT_MAX_BYTES)
        self.core = PipelineCore(backend, manifest, scheduler, cache_bytes)
        self.instance = args.get("model_instance_name", "nucleus_pipeline")

    def execute(self, requests: list[Any]) -> list[Any]:
        pb = self.pb
        responses = []
        for request in requests:
            try:
                tensors = {}
                for spec in PIPELINE_INPUTS:
                    tensor = pb.get_input_tensor_by_name(request, spec.name)
                    if tensor is not None:
                        tensors[spec.name] = from_triton(tensor)
                parameters = json.loads(request.parameters() or "{}")
                outputs = self.core(tensors, parameters)
                responses.append(pb.InferenceResponse(output_tensors=[to_triton(pb, k, v) for k, v in outputs.items()]))
                stats = self.core.cache.stats
                # tritonserver --log-verbose=1 shows it: whether text K/V was reused across requests.
                pb.Logger.log_verbose(
                    f"{self.instance}: text K/V cache hits {stats.hits}, misses {stats.misses}, "
                    f"{stats.entries} entries, {stats.bytes} bytes"
                )
            except NucleusError as exc:
                responses.append(pb.InferenceResponse(output_tensors=[], error=pb.TritonError(str(exc))))
            except Exception as exc:  # noqa: BLE001 - one failed request must not take the instance down
                responses.append(pb.InferenceResponse(output_tensors=[], error=pb.TritonError(f"{type(exc).__name__}: {exc}")))
        return responses

    def finalize(self) -> None:
        self.core.cache.clear()
        self.core.backend.close()
