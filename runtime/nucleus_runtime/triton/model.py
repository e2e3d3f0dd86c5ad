"""Triton Python-backend model `nucleus_pipeline`: whole requests (prompts or prompt embeddings in; latents, pixels
and PNG bytes out), many at once, batched per denoising step across requests.

This file is copied verbatim into a generated repository as `nucleus_pipeline/1/model.py`, next to a copy of
`nucleus_runtime`, so it imports only the standard library, numpy and nucleus_runtime (never nucleus_export).

Two layers, so that almost all of it runs without Triton:
- the core, `PipelineCore`: request tensors and parameters -> a validated `nucleus_runtime.serving.Job` -> the
  `StepBatcher`, which runs the denoising of every admitted request with one denoiser call per step and grid (the
  runtime's `GridStepper`, the loop `nucleus-export run` runs) -> response tensors. The tests run it with the
  runtime's ONNX Runtime backend and compare it with `nucleus-export run`.
- the Triton adapter, kept small: `TritonPythonModel` (reads requests, hands each to the core with a `TritonReply`
  over its response sender and returns at once; the batcher's worker thread sends the responses, in the default
  mode one final response, in the decoupled mode also one progress response per step; custom metrics) and the
  backend it gives the core, chosen by the config's `layout` parameter:
  - `inprocess`: the runtime's own backend (`nucleus_runtime.backends.registry.open_backend`: TensorRT on the GPU,
    ONNX Runtime on the CPU) over the bundle files placed in this version folder, every stage the bundle has (text
    encoder and VAE decoder included). Text K/V stays where that backend put it (device memory for TensorRT).
  - `bls`: `BlsBackend`, the runtime's `Backend` interface over BLS calls to the `nucleus_text_kv` and
    `nucleus_denoiser` models; the text K/V tensor travels through Triton at every step. Embeddings in only.
  `triton_python_backend_utils` exists only inside Triton's Python backend, so it is imported in `initialize`.

Text K/V is computed once per set of requests of a grid and reused for every step until a request joins or leaves;
the per-instance cache keeps it across requests up to `text_kv_cache_bytes`.
"""

from __future__ import annotations

import dataclasses
import json
import math
import sys
import threading
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

_HERE = Path(__file__).resolve().parent
if (_HERE / "nucleus_runtime").is_dir():
    # In a generated repository: import the runtime copied next to this file, whatever else is installed. No
    # bytecode is written next to it: the repository stays as generated, whatever the server does (only the stub's
    # own import of this file may cache it in __pycache__/ before this line runs).
    sys.dont_write_bytecode = True
    if sys.path[:1] != [str(_HERE)]:
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
    TEXT_ENCODER_GRAPH,
    VAE_DECODER_GRAPH,
)
from nucleus_runtime.contract import TEXT_KV_GRAPH as TEXT_KV  # noqa: E402
from nucleus_runtime.errors import NucleusError  # noqa: E402
from nucleus_runtime.pipeline import check_batch, check_guidance, start_denoising  # noqa: E402
from nucleus_runtime.scheduler import DEFAULT_SCHEDULER_CONFIG, SchedulerConfig  # noqa: E402
from nucleus_runtime.serving import (  # noqa: E402
    BatchSettings,
    Failure,
    Job,
    Reply,
    Result,
    ServingError,
    ServingStats,
    StepBatcher,
    TextRequest,
    WaitingReply,
)
from nucleus_runtime.text_kv_cache import DEFAULT_MAX_BYTES, TextKVCache  # noqa: E402
from nucleus_runtime.text_to_image import PromptEncoder, load_prompt_tokenizer, prompt_groups  # noqa: E402
from nucleus_runtime.tokenizer import PromptTokenizer  # noqa: E402

# How the pipeline model reaches the graphs (config parameter `layout`; see the module docstring).
LAYOUT_INPROCESS = "inprocess"
LAYOUT_BLS = "bls"
LAYOUTS = (LAYOUT_INPROCESS, LAYOUT_BLS)

# config.pbtxt parameters of the pipeline model (written by nucleus_export.triton.configs).
PARAM_LAYOUT = "layout"
PARAM_TEXT_KV_CACHE_BYTES = "text_kv_cache_bytes"
# admission (nucleus_runtime.serving.BatchSettings): requests per denoiser call (0: as the batch profile allows),
# queued requests, the longest wait for admission (microseconds, 0: none), the default deadline (seconds, 0: none)
PARAM_MAX_BATCH_REQUESTS = "max_batch_requests"
PARAM_MAX_PENDING = "max_pending_requests"
PARAM_QUEUE_DELAY_US = "max_queue_delay_us"
PARAM_REQUEST_TIMEOUT_S = "request_timeout_s"
# bls: the graph models it calls
PARAM_TEXT_KV_MODEL = "text_kv_model"
PARAM_DENOISER_MODEL = "denoiser_model"
# inprocess: the runtime backend over the files in the version folder, ONNX Runtime's threads, load-time checksums
PARAM_BACKEND = "backend"
PARAM_THREADS = "onnxruntime_threads"
PARAM_VERIFY_CHECKSUMS = "verify_checksums"

OUTPUT_LATENTS = "latents"
OUTPUT_IMAGE = "image"
OUTPUT_PNG = "png"
# Decoupled mode: the outputs of the progress response sent after every step.
OUTPUT_STEP = "step"
OUTPUT_TOTAL_STEPS = "total_steps"
OUTPUT_ELAPSED = "elapsed_seconds"

# Request defaults: the model's recommended settings (README); height/width default to the bundle's opt resolution.
DEFAULT_STEPS = 50
DEFAULT_GUIDANCE = 4.0
DEFAULT_SEED = 0
DEFAULT_MAX_PENDING = 64


@dataclasses.dataclass(frozen=True)
class IOSpec:
    """A pipeline input/output. A string in `dims` names a model_config field (e.g. joint_attention_dim); `stage` is
    the bundle stage it needs (the config declares it only where the model serves that stage); `optional_with`, a
    stage whose inputs replace this one where it is served (prompt_embeds is optional where prompt is taken)."""

    name: str
    dtype: str
    dims: tuple[int | str, ...]
    optional: bool = False
    doc: str = ""
    stage: str | None = None
    optional_with: str | None = None

    def dims_for(self, model_config: Mapping[str, Any]) -> tuple[int, ...]:
        return tuple(int(model_config[d]) if isinstance(d, str) else d for d in self.dims)


# Names follow diffusers' pipeline arguments. Scalars are [1] tensors; each may instead come as a request parameter
# of the same name (an input tensor wins), else the default applies. A request sends `prompt` or `prompt_embeds`.
PIPELINE_INPUTS: tuple[IOSpec, ...] = (
    IOSpec("prompt", "string", (-1,), True, "[B] prompts (UTF-8 text), instead of prompt_embeds", TEXT_ENCODER_GRAPH),
    IOSpec("negative_prompt", "string", (-1,), True, "[B] or [1] CFG negative prompts (default '', as the pipeline)",
           TEXT_ENCODER_GRAPH),  # fmt: skip
    IOSpec("prompt_embeds", "float32", (-1, -1, "joint_attention_dim"), doc="[B, T, D] text encoder hidden states",
           optional_with=TEXT_ENCODER_GRAPH),
    IOSpec("prompt_embeds_mask", "int64", (-1, -1), True, "[B, T] 1 = token, 0 = padding (default all 1)"),
    IOSpec("negative_prompt_embeds", "float32", (-1, -1, "joint_attention_dim"), True, "[B, T', D], needed for guidance > 1"),
    IOSpec("negative_prompt_embeds_mask", "int64", (-1, -1), True, "[B, T']"),
    IOSpec("initial_latents", "float32", (-1, -1, "in_channels"), True, "[B, S, C] packed noise (instead of seed)"),
    IOSpec("height", "int64", (1,), True, "pixels (default: the bundle's opt resolution)"),
    IOSpec("width", "int64", (1,), True, "pixels"),
    IOSpec("num_inference_steps", "int64", (1,), True, f"default {DEFAULT_STEPS}"),
    IOSpec("guidance_scale", "float32", (1,), True, f"default {DEFAULT_GUIDANCE}; CFG runs when > 1"),
    IOSpec("seed", "int64", (1,), True, f"numpy noise seed, default {DEFAULT_SEED}"),
    IOSpec("return_png", "bool", (1,), True, "also return each image as PNG bytes (output png)", VAE_DECODER_GRAPH),
)
PIPELINE_OUTPUTS: tuple[IOSpec, ...] = (
    IOSpec(OUTPUT_LATENTS, "float32", (-1, -1, "in_channels"), doc="[B, S, C] final packed latents"),
    IOSpec(OUTPUT_IMAGE, "uint8", (-1, -1, -1, 3), doc="[B, H, W, 3] RGB pixels", stage=VAE_DECODER_GRAPH),
    IOSpec(OUTPUT_PNG, "string", (-1,), doc="[B] PNG files (with return_png)", stage=VAE_DECODER_GRAPH),
)
PROGRESS_OUTPUTS: tuple[IOSpec, ...] = (
    IOSpec(OUTPUT_STEP, "int64", (1,), doc="steps done"),
    IOSpec(OUTPUT_TOTAL_STEPS, "int64", (1,), doc="steps of the request"),
    IOSpec(OUTPUT_ELAPSED, "float32", (1,), doc="seconds since the request arrived"),
)


def served_specs(specs: tuple[IOSpec, ...], stages: set[str]) -> list[IOSpec]:
    """The specs a model that serves `stages` declares."""
    return [
        dataclasses.replace(spec, optional=True) if spec.optional_with in stages else spec
        for spec in specs
        if spec.stage is None or spec.stage in stages
    ]


@dataclasses.dataclass
class PipelineRequest:
    """One request, parsed and validated: the arguments of `start_denoising`, or prompts to encode first."""

    prompt_embeds: np.ndarray | None
    prompt_mask: np.ndarray | None
    negative_prompt_embeds: np.ndarray | None
    negative_prompt_mask: np.ndarray | None
    latents: np.ndarray | None
    height: int
    width: int
    steps: int
    guidance: float
    seed: int
    prompts: list[str] | None = None
    negative_prompts: list[str] | None = None
    png: bool = False


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


def _texts(name: str, value: np.ndarray | None) -> list[str] | None:
    """A TYPE_STRING input (numpy object array of bytes) as a list of str."""
    if value is None:
        return None
    texts = []
    for item in np.asarray(value, dtype=object).reshape(-1):
        try:
            texts.append(item.decode("utf-8") if isinstance(item, bytes) else str(item))
        except UnicodeDecodeError:
            raise NucleusError(f"input {name} is not UTF-8 text.", f"send {name} as UTF-8 encoded strings.") from None
    if not texts:
        raise NucleusError(f"input {name} holds no strings.", f"send one string per image in {name}.")
    return texts


def parse_request(
    tensors: Mapping[str, np.ndarray], parameters: Mapping[str, Any], manifest: Manifest, inputs: tuple[str, ...]
) -> PipelineRequest:
    """Request tensors (name -> array) and parameters -> a validated PipelineRequest.

    Args:
        inputs: the input names this model serves (served_specs of PIPELINE_INPUTS).

    Shapes of the embeddings, masks and latents are checked by `start_denoising`, against the bundle's profiles too.
    """
    unknown = sorted(set(tensors) - set(inputs))
    if unknown:
        text = "" if "prompt" in inputs else " (text in needs an inprocess repository of a bundle with a text encoder)"
        raise NucleusError(f"unknown inputs {unknown}{text}.", f"this pipeline takes: {', '.join(sorted(inputs))}.")
    if "prompt" in tensors and "prompt_embeds" in tensors:
        raise NucleusError("the request has both prompt and prompt_embeds.", "send one of them.")
    if "prompt" not in tensors and "prompt_embeds" not in tensors:
        text = "prompt (text) or " if "prompt" in inputs else ""
        raise NucleusError("the request has no prompt_embeds" + (" and no prompt" if text else "") + ".",
                           f"send {text}the text encoder's hidden states as prompt_embeds.")
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
    png = _scalar("return_png", tensors, parameters, False)
    if isinstance(png, str):
        png = png.lower() in ("1", "true", "yes")
    if png and "return_png" not in inputs:
        raise NucleusError("return_png asks for PNG bytes, but this model has no vae_decoder stage.",
                           "serve a bundle exported from a pipeline root (with the VAE) in the inprocess layout.")
    negatives = _texts("negative_prompt", tensors.get("negative_prompt"))
    return PipelineRequest(
        prompt_embeds=tensors.get("prompt_embeds"),
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
        prompts=_texts("prompt", tensors.get("prompt")),
        negative_prompts=negatives[0] if negatives is not None and len(negatives) == 1 else negatives,  # type: ignore[arg-type]
        png=bool(png),
    )


class PipelineCore:
    """Serves requests with the runtime's step batcher over a given Backend (in Triton, or in-process in tests).

    Args:
        backend: runs the bundle's graphs.
        manifest: the bundle's manifest; scheduler_config: its scheduler settings.
        cache_bytes: bound of the text K/V cache shared by this instance's requests (0: no reuse across requests).
        settings: admission rules (default: as many requests per denoiser call as the batch profile holds).
        tokenizer: the bundle's prompt tokenizer, where the backend runs its text encoder (text requests).
        images: whether the backend runs the bundle's VAE decoder (image and png outputs).
    """

    def __init__(
        self,
        backend: Backend,
        manifest: Manifest,
        scheduler_config: SchedulerConfig,
        cache_bytes: int = DEFAULT_MAX_BYTES,
        settings: BatchSettings | None = None,
        tokenizer: PromptTokenizer | None = None,
        images: bool = False,
    ):
        self.backend = backend
        self.manifest = manifest
        self.scheduler_config = scheduler_config
        self.stages = {stage for stage, served in ((TEXT_ENCODER_GRAPH, tokenizer), (VAE_DECODER_GRAPH, images)) if served}
        self.input_specs = served_specs(PIPELINE_INPUTS, self.stages)
        self.inputs = tuple(spec.name for spec in self.input_specs)
        # With a zero bound every entry is "larger than the bound": computed once per set of requests, never kept.
        self.cache = TextKVCache(max_bytes=cache_bytes)
        max_rows = manifest.profiles.batch[2]
        encoder = PromptEncoder(backend, tokenizer, max_rows) if tokenizer is not None else None
        self.batcher = StepBatcher(backend, manifest, scheduler_config, settings or BatchSettings(max_rows), self.cache, encoder)

    @staticmethod
    def load_bundle_files(model_dir: Path) -> tuple[Manifest, SchedulerConfig]:
        """Manifest and scheduler config from a folder holding manifest.json (+ scheduler_config.json)."""
        manifest = load_manifest(model_dir)
        path = Path(model_dir) / SCHEDULER_CONFIG_NAME
        scheduler = SchedulerConfig.from_file(path) if path.is_file() else SchedulerConfig.from_dict(DEFAULT_SCHEDULER_CONFIG)
        return manifest, scheduler

    def job(self, request: PipelineRequest, reply: Reply, outputs: set[str] | None = None,
            timeout: float | None = None) -> Job:
        """A Job for the batcher; every check that needs no graph runs here, so a bad request fails at once.

        Args:
            outputs: the output names the client asked for (None: all); pixels are decoded only when it wants them.
            timeout: the request's own deadline in seconds (None: the model's default).
        """
        grid = self.manifest.grid_for(request.height, request.width)
        wants_pixels = outputs is None or bool({OUTPUT_IMAGE, OUTPUT_PNG} & outputs) or request.png
        common = dict(reply=reply, grid=grid, steps=request.steps, height=request.height, width=request.width,
                      images=wants_pixels and VAE_DECODER_GRAPH in self.stages, pngs=request.png, timeout=timeout)  # fmt: skip
        if request.prompts is None:
            state = start_denoising(
                self.manifest, self.scheduler_config, request.prompt_embeds,  # type: ignore[arg-type]
                request.prompt_mask, request.negative_prompt_embeds, request.negative_prompt_mask,
                height=request.height, width=request.width, steps=request.steps, guidance=request.guidance,
                latents=request.latents, seed=None if request.latents is not None else request.seed,
            )  # fmt: skip
            return Job(rows=state.rows, state=state, **common)  # type: ignore[arg-type]
        prompts, negatives = prompt_groups(request.prompts, request.negative_prompts, check_guidance(request.guidance))
        rows = len(prompts) * (2 if negatives else 1)
        check_batch(self.manifest, rows, bool(negatives))
        text = TextRequest([prompts] + ([negatives] if negatives else []), request.height, request.width,
                           request.steps, request.guidance, request.seed, request.latents)  # fmt: skip
        return Job(rows=rows, text=text, **common)  # type: ignore[arg-type]

    def submit(self, tensors: Mapping[str, np.ndarray], parameters: Mapping[str, Any], reply: Reply,
               outputs: set[str] | None = None, timeout: float | None = None) -> None:
        """Validate a request and queue it; raises NucleusError (nothing queued) for a bad or refused request."""
        try:
            job = self.job(parse_request(tensors, parameters, self.manifest, self.inputs), reply, outputs, timeout)
        except NucleusError:
            self.batcher.refused(Failure.INVALID)
            raise
        self.batcher.submit(job)

    def __call__(self, tensors: Mapping[str, np.ndarray], parameters: Mapping[str, Any] | None = None) -> dict[str, np.ndarray]:
        """One request served on the calling thread (in-process use and tests; not while the batcher's worker thread
        runs): its response tensors."""
        reply = WaitingReply()
        self.submit(tensors, parameters or {}, reply)
        self.batcher.run_until_idle()
        return output_tensors(reply.wait(0))


def output_tensors(result: Result) -> dict[str, np.ndarray]:
    """A finished request's response tensors by output name."""
    outputs = {OUTPUT_LATENTS: np.ascontiguousarray(result.latents, dtype=np.float32)}
    if result.images is not None:
        outputs[OUTPUT_IMAGE] = np.ascontiguousarray(result.images, dtype=np.uint8)
    if result.pngs is not None:
        outputs[OUTPUT_PNG] = np.array(result.pngs, dtype=np.object_)
    return outputs


# ---- Triton adapter (runs only inside Triton's Python backend) -------------------------------------------------------

_ITEMSIZE = {"float32": 4, "float16": 2, "bfloat16": 2}


# How host tensors cross the Python backend stub depends on the numpy in its environment (both found with the real
# 2.51 stub): its pybind11 reads numpy 1's dtype layout, so under numpy 2 `Tensor(name, array)` produced empty
# outputs; DLPack views the same memory under any numpy, but the stub renames a consumed capsule "used_dlpack" where
# numpy 1's deleter expects "used_dltensor", which broke the stub under numpy 1. So: the stub's own numpy path under
# numpy 1, DLPack under numpy 2.
_DLPACK = int(np.__version__.split(".")[0]) >= 2


def from_triton(tensor: Any, text: bool = False) -> np.ndarray:
    """A host pb_utils.Tensor as a numpy array (a TYPE_STRING one, `text`, as an object array of bytes: DLPack has no
    string type)."""
    return np.from_dlpack(tensor) if _DLPACK and not text else tensor.as_numpy()


def to_triton(pb_utils: Any, name: str, array: np.ndarray) -> Any:
    """A numpy array as a pb_utils.Tensor (an object array of bytes as TYPE_STRING, through the stub's numpy path)."""
    array = np.ascontiguousarray(array)
    return pb_utils.Tensor.from_dlpack(name, array) if _DLPACK and array.dtype != np.object_ else pb_utils.Tensor(name, array)


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


class TritonReply:
    """A request's response sender as the batcher's Reply; called on the batcher's worker thread.

    Default mode: one final response (the result or the error). Decoupled mode: also, after every step, a response
    holding only the progress outputs, then the result with the final flag.
    """

    def __init__(self, model: TritonPythonModel, request: Any):
        self.model = model
        self.sender = request.get_response_sender()

    def cancelled(self) -> bool:
        # True too when the client went away (gRPC): Triton cancels the requests of a closed connection.
        return bool(self.sender.is_cancelled())

    def progress(self, step: int, total: int, elapsed: float) -> None:
        if self.model.decoupled:
            pb = self.model.pb
            tensors = [to_triton(pb, OUTPUT_STEP, np.array([step], np.int64)),
                       to_triton(pb, OUTPUT_TOTAL_STEPS, np.array([total], np.int64)),
                       to_triton(pb, OUTPUT_ELAPSED, np.array([elapsed], np.float32))]  # fmt: skip
            self.sender.send(pb.InferenceResponse(output_tensors=tensors))

    def done(self, result: Result) -> None:
        pb = self.model.pb
        tensors = [to_triton(pb, name, array) for name, array in output_tensors(result).items()]
        self.sender.send(pb.InferenceResponse(output_tensors=tensors), flags=pb.TRITONSERVER_RESPONSE_COMPLETE_FINAL)
        self.model.request_ended()

    def failed(self, error: ServingError) -> None:
        pb = self.model.pb
        code = getattr(pb.TritonError, _ERROR_CODES[error.failure], None)
        triton_error = pb.TritonError(str(error)) if code is None else pb.TritonError(str(error), code)
        self.sender.send(pb.InferenceResponse(output_tensors=[], error=triton_error),
                         flags=pb.TRITONSERVER_RESPONSE_COMPLETE_FINAL)  # fmt: skip
        self.model.request_ended(error)


# pb_utils.TritonError codes (since 23.09; older stubs take the message only). Triton has no deadline code.
_ERROR_CODES = {
    Failure.INVALID: "INVALID_ARG",
    Failure.CANCELLED: "CANCELLED",
    Failure.DEADLINE: "UNAVAILABLE",
    Failure.UNAVAILABLE: "UNAVAILABLE",
    Failure.INTERNAL: "INTERNAL",
}

# Custom metrics on Triton's metrics endpoint (--metrics-port, default 8002), labelled with the model instance: the
# load benchmark reads them, and they show that the caches stay bounded (hits, misses, evictions, bytes).
METRIC_REQUESTS = "nucleus_requests_total"  # label outcome: received, completed, and each serving.Failure
METRIC_DENOISER_CALLS = "nucleus_denoiser_calls_total"
METRIC_DENOISER_ROWS = "nucleus_denoiser_rows_total"  # rows / calls = the mean batch of a denoiser call
METRIC_STAGE_SECONDS = "nucleus_stage_seconds_total"  # label stage: serving.STAGES
METRIC_TEXT_KV_CACHE = "nucleus_text_kv_cache_total"  # label event: hits, misses, evictions
METRIC_TEXT_KV_CACHE_BYTES = "nucleus_text_kv_cache_bytes"
METRIC_TEXT_KV_CACHE_ENTRIES = "nucleus_text_kv_cache_entries"
METRIC_BATCH_TEXT_KV = "nucleus_batch_text_kv_total"  # text K/V built for a new set of requests of a grid
METRIC_PREFIX_CACHE = "nucleus_prompt_prefix_cache_total"  # label event: hits, misses
METRIC_ACTIVE = "nucleus_requests_active"
METRIC_PENDING = "nucleus_requests_pending"


class TritonMetrics:
    """The batcher's ServingStats as Triton custom metrics (counters advanced by their change since the last call),
    published from the batcher's worker at most every PUBLISH_INTERVAL_S and whenever it goes idle (and after a
    refusal while it is idle): each metric update is a round trip to the server process, too slow for every step or
    request."""

    PUBLISH_INTERVAL_S = 0.25

    def __init__(self, pb_utils: Any, instance: str):
        counter, gauge = pb_utils.MetricFamily.COUNTER, pb_utils.MetricFamily.GAUGE
        self._families: dict[str, Any] = {}
        self._metrics: dict[tuple[str, str, str], Any] = {}
        self._last: dict[tuple[str, str, str], float] = {}
        self._lock = threading.Lock()
        self._pb, self._instance = pb_utils, instance
        self._published = 0.0
        for name, kind, what in (
            (METRIC_REQUESTS, counter, "requests by outcome"),
            (METRIC_DENOISER_CALLS, counter, "denoiser calls"),
            (METRIC_DENOISER_ROWS, counter, "denoiser batch rows, summed over calls"),
            (METRIC_STAGE_SECONDS, counter, "seconds spent per pipeline stage"),
            (METRIC_TEXT_KV_CACHE, counter, "text K/V cache hits, misses and evictions"),
            (METRIC_TEXT_KV_CACHE_BYTES, gauge, "bytes held by the text K/V cache"),
            (METRIC_TEXT_KV_CACHE_ENTRIES, gauge, "entries of the text K/V cache"),
            (METRIC_BATCH_TEXT_KV, counter, "text K/V built for a new set of batched requests"),
            (METRIC_PREFIX_CACHE, counter, "prompt template prefix cache hits and misses"),
            (METRIC_ACTIVE, gauge, "requests being denoised"),
            (METRIC_PENDING, gauge, "requests waiting for a place in a batch"),
        ):
            self._families[name] = pb_utils.MetricFamily(name=name, description=f"nucleus_pipeline: {what}", kind=kind)

    def due(self) -> bool:
        return time.monotonic() - self._published >= self.PUBLISH_INTERVAL_S

    def publish(self, stats: ServingStats) -> None:
        self._published = time.monotonic()
        values: list[tuple[str, str, str, float]] = [
            *((METRIC_REQUESTS, "outcome", k, v) for k, v in stats.requests.items()),
            (METRIC_DENOISER_CALLS, "", "", stats.denoiser_calls),
            (METRIC_DENOISER_ROWS, "", "", stats.denoiser_rows),
            *((METRIC_STAGE_SECONDS, "stage", k, v) for k, v in stats.stage_seconds.items()),
            *((METRIC_TEXT_KV_CACHE, "event", k, stats.text_kv_cache[k]) for k in ("hits", "misses", "evictions")),
            (METRIC_TEXT_KV_CACHE_BYTES, "", "", stats.text_kv_cache["bytes"]),
            (METRIC_TEXT_KV_CACHE_ENTRIES, "", "", stats.text_kv_cache["entries"]),
            (METRIC_BATCH_TEXT_KV, "", "", stats.batch_text_kv),
            *((METRIC_PREFIX_CACHE, "event", k, v) for k, v in stats.prefix_cache.items()),
            (METRIC_ACTIVE, "", "", stats.active),
            (METRIC_PENDING, "", "", stats.pending),
        ]
        with self._lock:
            for name, label, value_label, value in values:
                key = (name, label, value_label)
                metric = self._metrics.get(key)
                if metric is None:
                    labels = {"instance": self._instance, **({label: value_label} if label else {})}
                    metric = self._metrics[key] = self._families[name].Metric(labels=labels)
                if name.endswith("_total"):
                    # Two threads publish (the worker, and execute after a refusal): an older snapshot arriving
                    # second must not lower the mark, or the next one would count its difference twice.
                    delta = float(value) - self._last.get(key, 0.0)
                    if delta > 0:
                        metric.increment(delta)
                        self._last[key] = float(value)
                else:
                    metric.set(float(value))


class TritonPythonModel:
    """Triton's entry point: hands every request to the core's batcher and returns; the batcher's worker replies."""

    def initialize(self, args: dict[str, str]) -> None:
        import triton_python_backend_utils as pb_utils

        self.pb = pb_utils
        model_config = json.loads(args["model_config"])
        params = {k: v.get("string_value", "") for k, v in model_config.get("parameters", {}).items()}
        self.decoupled = bool(model_config.get("model_transaction_policy", {}).get("decoupled", False))
        manifest, scheduler = PipelineCore.load_bundle_files(_HERE)
        layout = params.get(PARAM_LAYOUT, LAYOUT_BLS)
        tokenizer = None
        if layout == LAYOUT_INPROCESS:
            device_id = int(args["model_instance_device_id"]) if args.get("model_instance_kind") == "GPU" else None
            backend = open_inprocess_backend(_HERE, manifest, params, device_id)
            if TEXT_ENCODER_GRAPH in manifest.stages:
                tokenizer = load_prompt_tokenizer(_HERE, manifest, params.get(PARAM_VERIFY_CHECKSUMS, "true") != "false")
        elif layout == LAYOUT_BLS:
            backend = BlsBackend(
                pb_utils,
                manifest,
                params.get(PARAM_TEXT_KV_MODEL, "nucleus_text_kv"),
                params.get(PARAM_DENOISER_MODEL, "nucleus_denoiser"),
            )
        else:
            raise NucleusError(f"config parameter {PARAM_LAYOUT} is '{layout}'.", f"use one of: {', '.join(LAYOUTS)}.")
        settings = BatchSettings(
            max_rows=manifest.profiles.batch[2],
            max_requests=int(params.get(PARAM_MAX_BATCH_REQUESTS) or 0),
            max_pending=int(params.get(PARAM_MAX_PENDING) or DEFAULT_MAX_PENDING),
            queue_delay=int(params.get(PARAM_QUEUE_DELAY_US) or 0) / 1e6,
            timeout=float(params.get(PARAM_REQUEST_TIMEOUT_S) or 0),
        )
        cache_bytes = int(params.get(PARAM_TEXT_KV_CACHE_BYTES) or DEFAULT_MAX_BYTES)
        images = layout == LAYOUT_INPROCESS and VAE_DECODER_GRAPH in manifest.stages
        self.core = PipelineCore(backend, manifest, scheduler, cache_bytes, settings, tokenizer, images)
        self.instance = args.get("model_instance_name", "nucleus_pipeline")
        self.metrics = TritonMetrics(pb_utils, self.instance)
        self.core.batcher.on_round = self._round_done
        self.core.batcher.start()

    def _round_done(self, idle: bool) -> None:
        if idle or self.metrics.due():
            self.metrics.publish(self.core.batcher.stats())

    def execute(self, requests: list[Any]) -> None:
        """Queue every request (a bad one gets its error response now) and return: responses come from the worker.

        Inputs are copied: Triton frees a request's tensors when execute returns (the response sender stays valid).
        """
        pb = self.pb
        queued = 0
        for request in requests:
            reply = TritonReply(self, request)
            try:
                tensors = {}
                for spec in self.core.input_specs:
                    tensor = pb.get_input_tensor_by_name(request, spec.name)
                    if tensor is not None:
                        tensors[spec.name] = np.array(from_triton(tensor, text=spec.dtype == "string"), copy=True)
                parameters = json.loads(request.parameters() or "{}")
                timeout_us = request.timeout()  # the client's request timeout, microseconds (0: none)
                outputs = set(request.requested_output_names())
                self.core.submit(tensors, parameters, reply, outputs or None, timeout_us / 1e6 if timeout_us else None)
                queued += 1
            except ServingError as exc:
                reply.failed(exc)
            except NucleusError as exc:
                reply.failed(ServingError(Failure.INVALID, exc.problem, exc.fix))
            except Exception as exc:  # noqa: BLE001 - one failed request must not take the instance down
                reply.failed(ServingError(Failure.INTERNAL, f"{type(exc).__name__}: {exc}"))
        if queued < len(requests):
            # A refusal never reaches the worker, whose rounds publish the metrics: when it has gone idle already,
            # no round would publish this one.
            stats = self.core.batcher.stats()
            if not stats.active and not stats.pending:
                self.metrics.publish(stats)
        return None

    def request_ended(self, error: ServingError | None = None) -> None:
        """After each response (tritonserver --log-verbose=1): the caches and batching in the log."""
        stats = self.core.batcher.stats()
        cache = stats.text_kv_cache
        self.pb.Logger.log_verbose(
            f"{self.instance}: text K/V cache hits {cache['hits']}, misses {cache['misses']}, evictions "
            f"{cache['evictions']}, {cache['entries']} entries, {cache['bytes']} bytes; denoiser calls "
            f"{stats.denoiser_calls}, mean rows {stats.mean_rows:.2f}; requests {stats.requests}"
            + (f"; failed: {error}" if error is not None else "")
        )

    def finalize(self) -> None:
        self.core.batcher.stop()
        self.core.cache.clear()
        self.core.backend.close()
