"""TensorRT backend: the bundle's engines (`<unit>.plan` of the text encoder, text_kv, the denoiser, the VAE decoder,
or their segments) on one GPU.

Works with full TensorRT (`tensorrt`) or TensorRT-RTX (`tensorrt_rtx`), same Python API; device memory and the
stream come from cuda-python (`cuda.bindings.runtime`). Tensors are bound by address (`set_tensor_address`) and run
with `execute_async_v3`. The text_kv engine writes its output into a device buffer that becomes the cache handle;
the denoiser binds that same buffer as its `text_kv` input, rebinding only when the handle changes, so the K/V is
never copied per step. The text encoder writes the new tokens' key_values into a device buffer that becomes a
handle too, and a later call binds it as its past (a cached template prefix) in place. The nucleus plugin library is
loaded when the engines were built with plugins. A backend loads only the stages it is opened with, and `close`
frees their engines, so stages can take turns on a small GPU.

Import-guarded and untested in CI (no GPU there): nothing here is imported until `TensorRTBackend` is constructed,
and the logic is kept to binding and copying; the loop, cache and checks are shared with the ONNX Runtime backend.
"""

from __future__ import annotations

import dataclasses
import importlib
import importlib.util
import logging
import math
from pathlib import Path
from typing import Any

import numpy as np

from nucleus_runtime import dlpack
from nucleus_runtime.backends.base import (
    Backend,
    BackendOptions,
    TensorHandle,
    raise_stage_not_loaded,
    text_encoder_inputs,
    text_kv_inputs,
    vae_decoder_input,
)
from nucleus_runtime.bundle import EngineRecord, Manifest, SegmentRecord, load_manifest, stage_files, verify_files
from nucleus_runtime.contract import DENOISER_GRAPH as DENOISER
from nucleus_runtime.contract import (
    ATTENTION_MASK,
    HOST_INPUT_DTYPES,
    IMAGE,
    INPUT_IDS,
    KEY_VALUES,
    LATENTS,
    MOE_PLUGIN,
    PAST_KEY_VALUES,
    PROMPT_EMBEDS,
    RUNTIME_DISTRIBUTION,
    SAMPLE,
    TENSORRT,
    TENSORRT_MODULES,
    TENSORRT_RTX,
    TEXT_ENCODER_GRAPH,
    VAE_DECODER_GRAPH,
    engine_onnx_file,
    plan_file,
)
from nucleus_runtime.contract import TEXT_KV as TEXT_KV_TENSOR
from nucleus_runtime.contract import TEXT_KV_GRAPH as TEXT_KV
from nucleus_runtime.errors import NucleusError
from nucleus_runtime.gpu import cuda_device_count

logger = logging.getLogger("nucleus_runtime")


def _import_tensorrt(flavor: str) -> Any:
    """The module of the TensorRT flavor the engines were built with (a plan only deserializes in that library)."""
    module = TENSORRT_MODULES[flavor]
    try:
        return importlib.import_module(module)
    except ImportError:
        raise NucleusError(
            f"{module} is not installed, and the engines were built with {flavor}.",
            f"pip install '{RUNTIME_DISTRIBUTION}[{flavor}]', or use --backend onnxruntime.",
        ) from None


def _import_cudart() -> Any:
    try:
        from cuda.bindings import runtime as cudart
    except ImportError:
        try:
            from cuda import cudart  # cuda-python < 12.6 layout
        except ImportError:
            raise NucleusError("cuda-python is not installed.", "pip install cuda-python.") from None
    return cudart


def _check(result: Any, what: str) -> Any:
    """cuda-python returns (error, *values); raise on error, return the value(s)."""
    err, *values = result if isinstance(result, tuple) else (result,)
    if int(err) != 0:
        raise NucleusError(f"CUDA call {what} failed with {err}.", "check that a CUDA GPU is visible and has free memory.")
    return values[0] if len(values) == 1 else values


def select_cuda_device(device_id: int) -> None:
    """Make `device_id` the current CUDA device of this process, before a TensorRT backend is opened on it."""
    cudart = _import_cudart()
    _check(cudart.cudaSetDevice(device_id), f"cudaSetDevice({device_id})")


def parse_compute_capability(value: Any) -> tuple[int, int]:
    """"SM89", "sm_89", "8.9", "89" or [8, 9] -> (8, 9)."""
    if isinstance(value, (list, tuple)):
        return int(value[0]), int(value[1])
    text = str(value).lower().removeprefix("sm").lstrip("_")
    if "." in text:
        major, minor = text.split(".", 1)
        return int(major), int(minor)
    return int(text[:-1]), int(text[-1])


def engine_compute_capabilities(manifest: Manifest, unit: str) -> list[tuple[int, int]]:
    """Compute capabilities the build targeted (the unit's engine record; none recorded: the builder's GPU)."""
    record = manifest.engine(unit)
    return [parse_compute_capability(v) for v in (record.compute_capabilities if record else None) or []]


class DeviceBuffer:
    """A cudaMalloc'ed block, freed with its last reference."""

    def __init__(self, cudart: Any, nbytes: int):
        self._cudart = cudart
        self.nbytes = nbytes
        self.ptr = int(_check(cudart.cudaMalloc(max(nbytes, 1)), f"cudaMalloc({nbytes})"))

    def __del__(self) -> None:
        if getattr(self, "ptr", 0):
            self._cudart.cudaFree(self.ptr)
            self.ptr = 0


class TrtTensor(TensorHandle):
    """A tensor in device memory: text K/V written by the text_kv engine and read in place by the denoiser, or the
    text encoder's key_values, read in place as the past of a later encode_prompt."""

    def __init__(self, buffer: DeviceBuffer, shape: tuple[int, ...], dtype: np.dtype, backend: TensorRTBackend):
        self.buffer = buffer
        self._shape = shape
        self._dtype = dtype
        self._backend = backend

    @property
    def nbytes(self) -> int:
        return self.buffer.nbytes

    @property
    def shape(self) -> tuple[int, ...]:
        return self._shape

    def to_numpy(self) -> np.ndarray:
        host = np.empty(self._shape, dtype=self._dtype)
        self._backend.copy_to_host(host, self.buffer.ptr)
        return host


def _refit(trt: Any, engine: Any, onnx_path: Path, logger: Any) -> None:
    """Load the weights of a weight-stripped plan from the ONNX graph it was built from (its external data)."""
    if not onnx_path.is_file():
        raise NucleusError(
            f"{onnx_path.name} is missing: the engine was built without weights and is refit from it.",
            "copy the complete bundle (with its .onnx and .onnx.data files).",
        )
    refitter = trt.Refitter(engine, logger)
    parser_refitter = trt.OnnxParserRefitter(refitter, logger)
    if not parser_refitter.refit_from_file(str(onnx_path)) or not refitter.refit_cuda_engine():
        raise NucleusError(
            f"TensorRT could not refit {onnx_path.stem} from {onnx_path.name}.",
            "the ONNX files do not belong to these engines: copy the bundle again, or build it again.",
        )


class _Engine:
    """One deserialized engine with its execution context and per-input device buffers (grown, never shrunk).

    Args:
        record: the manifest's engine record: `stripped` plans are refit from their engine ONNX before use.
        streaming_budget: bytes of weights kept on the GPU (weight streaming), None for all of them.
    """

    def __init__(
        self,
        trt: Any,
        runtime: Any,
        path: Path,
        cudart: Any,
        record: EngineRecord,
        streaming_budget: int | None = None,
        logger: Any = None,
    ):
        engine = runtime.deserialize_cuda_engine(path.read_bytes())
        if engine is None:
            raise NucleusError(
                f"TensorRT could not load {path}: it was built for another GPU or another TensorRT version.",
                "build the engines again on (or for) this GPU with `nucleus-export build`.",
            )
        if record.stripped:
            _refit(trt, engine, path.parent / engine_onnx_file(path.stem), logger)
        if streaming_budget is not None:
            # Documented API (TensorRT >= 10.1, TensorRT-RTX): the budget is set before the context is created.
            if int(getattr(engine, "streamable_weights_size", 0)) <= 0:
                raise NucleusError(
                    f"{path.name} was not built with streamable weights.",
                    "build the bundle with `nucleus-export build --weight-streaming`, or drop --weight-streaming-budget.",
                )
            engine.weight_streaming_budget_v2 = int(streaming_budget)
        self.trt = trt
        self.engine = engine
        self.context = engine.create_execution_context()
        self.cudart = cudart
        self.buffers: dict[str, DeviceBuffer] = {}

    def release(self) -> None:
        """Free the buffers, then the execution context, then the engine (its weights on the GPU)."""
        self.buffers.clear()
        self.context = None
        self.engine = None

    def buffer(self, name: str, nbytes: int) -> DeviceBuffer:
        current = self.buffers.get(name)
        if current is None or current.nbytes < nbytes:
            current = self.buffers[name] = DeviceBuffer(self.cudart, nbytes)
        # Bound every time: a `denoise_device` run may have pointed the context at the caller's tensors.
        self.context.set_tensor_address(name, current.ptr)
        return current

    def output_shape(self, name: str) -> tuple[int, ...]:
        return tuple(self.context.get_tensor_shape(name))

    def output_dtype(self, name: str) -> np.dtype:
        dtype = self.engine.get_tensor_dtype(name)
        try:
            return np.dtype(self.trt.nptype(dtype))
        except TypeError:  # bfloat16 / fp8 have no numpy type: keep the raw bits (same itemsize)
            return np.dtype(f"u{dtype.itemsize}")


def _split_budget(manifest: Manifest, units: list[str], budget: int | None) -> list[int | None]:
    """Share a weight-streaming budget among the denoiser's engines in proportion to their plan sizes."""
    if budget is None:
        return [None] * len(units)
    if budget < 0:
        raise NucleusError(f"weight streaming budget {budget} is negative.", "give a size in bytes (GB on the CLI).")
    sizes = [manifest.files[plan_file(u)].bytes if plan_file(u) in manifest.files else 1 for u in units]
    return [budget * size // sum(sizes) for size in sizes]


@dataclasses.dataclass(frozen=True)
class _Stacked:
    """A device tensor stacked over layers on axis 0 (contract.SEGMENT_SLICED_INPUTS / _OUTPUTS): its address, shape
    and element size. Layers are contiguous, so a unit's slice [first:last] is a pointer offset."""

    ptr: int
    shape: tuple[int, ...]
    itemsize: int

    def layers(self, first: int, last: int) -> tuple[int, tuple[int, ...]]:
        layer_bytes = math.prod(self.shape[1:]) * self.itemsize
        return self.ptr + first * layer_bytes, (last - first, *self.shape[1:])


def _stacked_of(tensor: TrtTensor) -> _Stacked:
    """A handle's K/V (text_kv, past_key_values) as the layer-stacked tensor units slice."""
    return _Stacked(tensor.buffer.ptr, tensor.shape, tensor.nbytes // max(1, math.prod(tensor.shape)))


# Bytes of the buffer whose address empty tensors (an empty past) are bound to: TensorRT wants a valid address for
# every input, whatever its volume.
_EMPTY_BUFFER_BYTES = 256


class TensorRTBackend(Backend):
    """Runs a bundle's TensorRT engines: the text encoder, text_kv, the denoiser and the VAE decoder, or the stages
    `stages` names (so a caller short of GPU memory can load the text encoder, close it, then load the denoiser).

    Args:
        bundle_dir: the bundle folder, holding `<unit>.plan` for every engine unit.
        manifest: the bundle's manifest, when the caller has it loaded already.
        verify_checksums: check the engine files against the manifest before loading them.
        weight_streaming_budget: bytes of denoiser weights to keep on the GPU (TensorRT weight streaming, engines
            built with --weight-streaming), shared among its segments in proportion to their streamable weights;
            None keeps all weights resident. Written against the documented API; not run on a GPU here.
        stages: the stages to load (None: every stage of the bundle).

    A segmented stage (manifest `segments`: the denoiser, the text encoder) runs its engines in order: every tensor
    one segment hands to the next stays in that segment's device buffer; a tensor stacked over layers is bound by
    address, each segment its slice (text_kv[first:last], past_key_values[first:last]) or its layers' part of one
    output buffer (key_values), so nothing crosses to the host between segments.
    """

    tensor_type = TrtTensor
    name = TENSORRT

    @property
    def supports_device_io(self) -> bool:
        # Segments pass hidden states between engines in the backend's own buffers.
        return bool(self._denoisers) and not self.segments

    @classmethod
    def stage_files(cls, manifest: Manifest, graph: str) -> list[str]:
        """The plan of each of the stage's units; for weight-stripped plans the engine graphs they are refit from and
        the weights those read; the plugin library when the stage's engines use it."""
        units = manifest.units(graph)
        records = [manifest.engine(u) for u in units]
        names = [plan_file(u) for u in units]
        if any(r is not None and r.stripped for r in records):
            names += [engine_onnx_file(u) for u in units]
            names += [f for f in stage_files(manifest, graph) if not f.endswith(".onnx")]
        if manifest.plugins is not None and any(r is not None and r.lowering is not None and r.lowering.moe == MOE_PLUGIN
                                                for r in records):
            names.append(manifest.plugins.library)
        return names

    @classmethod
    def memory_available(cls, options: BackendOptions) -> int | None:
        """Free memory of the current CUDA device (cudaMemGetInfo)."""
        free, _total = _check(_import_cudart().cudaMemGetInfo(), "cudaMemGetInfo")
        return int(free)

    @classmethod
    def available(cls) -> bool:
        module = TENSORRT_MODULES[cls.name]
        found = importlib.util.find_spec(module) is not None and importlib.util.find_spec("cuda") is not None
        return found and cuda_device_count() > 0

    @classmethod
    def serves(cls, bundle_dir: Path, manifest: Manifest) -> bool:
        units = manifest.engine_units()
        records = [manifest.engine(u) for u in units]
        return all(r is not None and r.flavor == cls.name for r in records) and all(
            (Path(bundle_dir) / plan_file(u)).is_file() for u in units
        )

    @classmethod
    def open(cls, bundle_dir: Path, manifest: Manifest, options: BackendOptions) -> TensorRTBackend:
        return cls(bundle_dir, manifest, options.verify_checksums, options.weight_streaming_budget, options.stages)

    def unit_identity(self, manifest: Manifest, unit: str) -> str:
        """The plan's bytes (and, for a weight-stripped plan, the weights it is refit from)."""
        identity = f"plan:{manifest.files[plan_file(unit)].sha256}"
        record = manifest.engine(unit)
        return identity + (f"+{manifest.unit_digest(unit)}" if record is not None and record.stripped else "")

    def __init__(
        self,
        bundle_dir: Path,
        manifest: Manifest | None = None,
        verify_checksums: bool = True,
        weight_streaming_budget: int | None = None,
        stages: tuple[str, ...] | None = None,
    ):
        self.bundle_dir = Path(bundle_dir)
        self.manifest = manifest or load_manifest(self.bundle_dir)
        self.stages = [g for g in self.manifest.stage_names if stages is None or g in stages]
        # Nothing is loaded yet: close() (and a failed open) find empty slots.
        self._text_encoders: list[tuple[SegmentRecord, _Engine]] = []
        self._text_kv: _Engine | None = None
        self._denoisers: list[_Engine] = []
        self._vae_decoder: _Engine | None = None
        self._empty: DeviceBuffer | None = None
        self._stream = None
        self._bound_text_kv: TrtTensor | None = None
        self.segments = self.manifest.graph_segments(DENOISER) if DENOISER in self.stages else []
        units = self.manifest.engine_units(tuple(self.stages))
        records = [self.manifest.engine(unit) for unit in units]
        missing = [plan_file(u) for u, r in zip(units, records) if r is None or not (self.bundle_dir / plan_file(u)).is_file()]
        if missing:
            raise NucleusError(
                f"bundle {self.bundle_dir} has no TensorRT engines ({', '.join(missing)}).",
                "build them with `nucleus-export build`, or run with --backend onnxruntime.",
            )
        flavors = sorted({r.flavor for r in records if r is not None})
        if flavors != [self.name]:
            raise NucleusError(
                f"the engines of {self.bundle_dir} were built with {', '.join(flavors)}; a plan loads only in the "
                "library that built it.",
                f"run with --backend {flavors[0]} (or --backend auto).",
            )
        files = list(dict.fromkeys(f for graph in self.stages for f in self.stage_files(self.manifest, graph)))
        # The plugin library is native code that runs in this process: verified whatever verify_checksums says,
        # before TensorRT is even imported, and loaded from the path the manifest records (only for stages using it).
        from nucleus_runtime import plugins

        library = plugins.bundle_plugin_library(self.bundle_dir, self.manifest)
        if library is not None and self.manifest.plugins is not None and self.manifest.plugins.library not in files:
            library = None
        if verify_checksums:
            verify_files(self.bundle_dir, self.manifest, [f for f in files if f in self.manifest.files])
        self.trt = _import_tensorrt(self.name)
        self.cudart = _import_cudart()
        self._check_gpu()
        if library is not None:
            plugins.load_plugin_library(library[0], self.trt, sha256=library[1], record=self.manifest.plugins)
        self._logger = self.trt.Logger(self.trt.Logger.WARNING)
        self._runtime = self.trt.Runtime(self._logger)

        def engine(unit: str, budget: int | None = None) -> _Engine:
            return _Engine(self.trt, self._runtime, self.bundle_dir / plan_file(unit), self.cudart,
                           self.manifest.engine(unit), budget, self._logger)  # type: ignore[arg-type]

        if TEXT_ENCODER_GRAPH in self.stages:
            self._text_encoders = [(unit, engine(unit.name)) for unit in self.manifest.unit_records(TEXT_ENCODER_GRAPH)]
        if TEXT_KV in self.stages:
            self._text_kv = engine(TEXT_KV)
        if DENOISER in self.stages:
            denoiser_units = self.manifest.units(DENOISER)
            budgets = _split_budget(self.manifest, denoiser_units, weight_streaming_budget)
            self._denoisers = [engine(unit, budget) for unit, budget in zip(denoiser_units, budgets)]
        if VAE_DECODER_GRAPH in self.stages:
            self._vae_decoder = engine(VAE_DECODER_GRAPH)
        self._stream = _check(self.cudart.cudaStreamCreate(), "cudaStreamCreate")

    def _check_gpu(self) -> None:
        device = _check(self.cudart.cudaGetDevice(), "cudaGetDevice")
        props = _check(self.cudart.cudaGetDeviceProperties(device), "cudaGetDeviceProperties")
        gpu = (int(props.major), int(props.minor))
        self.gpu_name = props.name.decode(errors="replace") if isinstance(props.name, bytes) else str(props.name)
        stages = getattr(self, "stages", None)
        for graph in self.manifest.engine_units(None if stages is None else tuple(stages)):
            targets = engine_compute_capabilities(self.manifest, graph)
            if targets and gpu not in targets:
                built = ", ".join(f"SM{a}{b}" for a, b in targets)
                raise NucleusError(
                    f"{plan_file(graph)} was built for {built}, but this GPU ({self.gpu_name}) is SM{gpu[0]}{gpu[1]}.",
                    f"build the engines for SM{gpu[0]}{gpu[1]} (`nucleus-export build` on this GPU or with its target).",
                )

    def _loaded(self, engines: Any, graph: str) -> Any:
        """The engine(s) of a stage, or the one error for a stage this backend was not opened with."""
        if not engines:
            raise_stage_not_loaded(self, graph)
        return engines

    # ---- host <-> device ----------------------------------------------------------------------------------------

    def _upload(self, engine: _Engine, name: str, array: np.ndarray) -> int:
        """Copy a contiguous host array (see backends.base input helpers) into the engine's input buffer; returns
        the buffer's device address."""
        engine.context.set_input_shape(name, array.shape)
        buf = engine.buffer(name, array.nbytes)
        kind = self.cudart.cudaMemcpyKind.cudaMemcpyHostToDevice
        _check(self.cudart.cudaMemcpyAsync(buf.ptr, array.ctypes.data, array.nbytes, kind, self._stream), "cudaMemcpyAsync")
        return buf.ptr

    def copy_to_host(self, host: np.ndarray, ptr: int) -> None:
        kind = self.cudart.cudaMemcpyKind.cudaMemcpyDeviceToHost
        _check(self.cudart.cudaMemcpyAsync(host.ctypes.data, ptr, host.nbytes, kind, self._stream), "cudaMemcpyAsync")
        _check(self.cudart.cudaStreamSynchronize(self._stream), "cudaStreamSynchronize")

    def _execute(self, engine: _Engine, graph: str) -> None:
        if not engine.context.execute_async_v3(int(self._stream)):
            raise NucleusError(f"TensorRT failed to run {graph}.plan (see the TensorRT log above).", "rerun with --verbose.")

    def _empty_address(self) -> int:
        if self._empty is None:
            self._empty = DeviceBuffer(self.cudart, _EMPTY_BUFFER_BYTES)
        return self._empty.ptr

    def _run_units(
        self,
        units: list[tuple[SegmentRecord, _Engine]],
        host: dict[str, np.ndarray],
        stacked_inputs: dict[str, _Stacked],
        stacked_outputs: dict[str, _Stacked],
    ) -> dict[str, tuple[int, tuple[int, ...]]]:
        """Enqueue a stage's units on the stream, in order (its segments, or the whole graph as one unit).

        Args:
            units: (unit record, engine) pairs.
            host: inputs fed from numpy, uploaded once each (later units reading the same input bind that copy: one
                stream, so it stays valid until the caller's synchronize).
            stacked_inputs: device tensors stacked over all layers: each unit binds the slice of its layers.
            stacked_outputs: device buffers of all layers: each unit writes its layers at their offset.

        Returns:
            name -> (device address, shape) of every tensor the units produced or uploaded.
        """
        produced: dict[str, tuple[int, tuple[int, ...]]] = {}
        for unit, engine in units:
            for name in unit.inputs:
                if name in stacked_inputs:
                    ptr, shape = stacked_inputs[name].layers(*unit.blocks)
                    engine.context.set_input_shape(name, shape)
                    engine.context.set_tensor_address(name, ptr if math.prod(shape) else self._empty_address())
                elif name in produced:
                    ptr, shape = produced[name]
                    engine.context.set_input_shape(name, shape)
                    engine.context.set_tensor_address(name, ptr)
                else:
                    produced[name] = (self._upload(engine, name, host[name]), host[name].shape)
            for name in unit.outputs:
                if name in stacked_outputs:
                    ptr, _ = stacked_outputs[name].layers(*unit.blocks)
                    engine.context.set_tensor_address(name, ptr)
                    continue
                shape, dtype = engine.output_shape(name), engine.output_dtype(name)
                produced[name] = (engine.buffer(name, int(np.prod(shape)) * dtype.itemsize).ptr, shape)
            self._execute(engine, unit.name)
        return produced

    def _host_output(self, engine: _Engine, name: str, ptr: int) -> np.ndarray:
        """Copy an output to the host (waits for the stream)."""
        host = np.empty(engine.output_shape(name), dtype=engine.output_dtype(name))
        self.copy_to_host(host, ptr)
        return host

    # ---- Backend ------------------------------------------------------------------------------------------------

    def encode_prompt(
        self, input_ids: np.ndarray, attention_mask: np.ndarray, past: TensorHandle | None
    ) -> tuple[np.ndarray, TrtTensor]:
        units = self._loaded(self._text_encoders, TEXT_ENCODER_GRAPH)
        ids, mask, sizes = text_encoder_inputs(self, input_ids, attention_mask, past)
        io = self.manifest.stages[TEXT_ENCODER_GRAPH].io
        shape = tuple(sizes[d] if isinstance(d, str) else d for d in io.outputs[KEY_VALUES].shape)
        dtype = units[0][1].output_dtype(KEY_VALUES)
        # A fresh buffer per call: the handle outlives it (a cached prefix), the engines' own buffers do not.
        key_values = DeviceBuffer(self.cudart, math.prod(shape) * dtype.itemsize)
        if past is None:
            empty = tuple(sizes[d] if isinstance(d, str) else d for d in io.inputs[PAST_KEY_VALUES].shape)
            past_stacked = _Stacked(self._empty_address(), empty, dtype.itemsize)
        else:
            past_stacked = _stacked_of(past)
        produced = self._run_units(units, {INPUT_IDS: ids, ATTENTION_MASK: mask}, {PAST_KEY_VALUES: past_stacked},
                                   {KEY_VALUES: _Stacked(key_values.ptr, shape, dtype.itemsize)})
        embeds = self._host_output(units[-1][1], PROMPT_EMBEDS, produced[PROMPT_EMBEDS][0])
        return embeds.astype(np.float32, copy=False), TrtTensor(key_values, shape, dtype, self)

    def decode_image(self, latents: np.ndarray) -> np.ndarray:
        engine = self._loaded(self._vae_decoder, VAE_DECODER_GRAPH)
        array = vae_decoder_input(self.manifest, latents)
        self._upload(engine, LATENTS, array)
        shape = engine.output_shape(IMAGE)
        out = engine.buffer(IMAGE, int(np.prod(shape)) * engine.output_dtype(IMAGE).itemsize)
        self._execute(engine, VAE_DECODER_GRAPH)
        return self._host_output(engine, IMAGE, out.ptr)

    def compute_text_kv(
        self, encoder_hidden_states: np.ndarray, txt_rope_cos: np.ndarray, txt_rope_sin: np.ndarray
    ) -> TrtTensor:
        engine = self._loaded(self._text_kv, TEXT_KV)
        for name, array in text_kv_inputs(encoder_hidden_states, txt_rope_cos, txt_rope_sin).items():
            self._upload(engine, name, array)
        shape, dtype = engine.output_shape(TEXT_KV_TENSOR), engine.output_dtype(TEXT_KV_TENSOR)
        # A fresh buffer per handle: it outlives this call in the cache, the engine's own buffers do not.
        out = DeviceBuffer(self.cudart, int(np.prod(shape)) * dtype.itemsize)
        engine.context.set_tensor_address(TEXT_KV_TENSOR, out.ptr)
        self._execute(engine, TEXT_KV)
        _check(self.cudart.cudaStreamSynchronize(self._stream), "cudaStreamSynchronize")
        return TrtTensor(out, shape, dtype, self)

    def _denoise(self, inputs: dict[str, np.ndarray], text_kv: TrtTensor) -> np.ndarray:  # type: ignore[override]
        self._loaded(self._denoisers, DENOISER)
        if self.segments:
            return self._denoise_segments(inputs, text_kv)
        engine = self._denoisers[0]
        for name, array in inputs.items():
            self._upload(engine, name, array)
        engine.context.set_input_shape(TEXT_KV_TENSOR, text_kv.shape)
        if self._bound_text_kv is not text_kv:
            engine.context.set_tensor_address(TEXT_KV_TENSOR, text_kv.buffer.ptr)
            self._bound_text_kv = text_kv
        shape, dtype = engine.output_shape(SAMPLE), engine.output_dtype(SAMPLE)
        out = engine.buffer(SAMPLE, int(np.prod(shape)) * dtype.itemsize)
        self._execute(engine, DENOISER)
        host = np.empty(shape, dtype=dtype)
        self.copy_to_host(host, out.ptr)
        return host.astype(np.float32, copy=False)

    def denoise_device(self, inputs: dict[str, Any], text_kv: TensorHandle, sample: Any, stream: int) -> None:
        if not isinstance(text_kv, TrtTensor):
            raise TypeError(f"TensorRTBackend.denoise_device needs text K/V from TensorRTBackend, got {type(text_kv).__name__}")
        # The views hold the DLPack capsules, and with them the tensors, until the run is enqueued.
        views = {name: dlpack.view(tensor, stream) for name, tensor in {**inputs, SAMPLE: sample}.items()}
        for name, view in views.items():
            if view.device_type != dlpack.KDL_CUDA or view.dtype != HOST_INPUT_DTYPES[name]:
                raise NucleusError(
                    f"{name} is {view.dtype} in {view.device} memory; the engine binds {HOST_INPUT_DTYPES[name]} on the GPU.",
                    "pass contiguous CUDA tensors in the contract's dtypes, or use `denoise` with host arrays.",
                )
        self._loaded(self._denoisers, DENOISER)
        if self.segments:
            raise NucleusError(
                "denoise_device serves single-engine bundles; this bundle's denoiser is segmented.",
                "use `denoise` with host arrays (supports_device_io is False for this backend).",
            )
        engine = self._denoisers[0]
        for name, view in views.items():
            if name != SAMPLE:
                engine.context.set_input_shape(name, view.shape)
            engine.context.set_tensor_address(name, view.ptr)
        engine.context.set_input_shape(TEXT_KV_TENSOR, text_kv.shape)
        engine.context.set_tensor_address(TEXT_KV_TENSOR, text_kv.buffer.ptr)
        self._bound_text_kv = text_kv
        shape = engine.output_shape(SAMPLE)
        if tuple(shape) != views[SAMPLE].shape:
            raise NucleusError(
                f"the denoiser's output is {list(shape)} but the sample tensor is {list(views[SAMPLE].shape)}.",
                "pass a sample tensor of the hidden states' batch and tokens and the model's output width.",
            )
        if not engine.context.execute_async_v3(int(stream)):
            raise NucleusError(f"TensorRT failed to run {DENOISER}.plan (see the TensorRT log above).", "rerun with --verbose.")

    def _denoise_segments(self, inputs: dict[str, np.ndarray], text_kv: TrtTensor) -> np.ndarray:
        produced = self._run_units(list(zip(self.segments, self._denoisers)), inputs, {TEXT_KV_TENSOR: _stacked_of(text_kv)}, {})
        return self._host_output(self._denoisers[-1], SAMPLE, produced[SAMPLE][0]).astype(np.float32, copy=False)

    def _run_denoiser_unit(self, index: int, inputs: dict[str, np.ndarray], text_kv: TrtTensor) -> dict[str, np.ndarray]:  # type: ignore[override]
        engine = self._loaded(self._denoisers, DENOISER)[index]
        # The engines' own segment records (those `denoise` chains); a denoiser in one engine is one unit of all layers.
        unit = (self.segments or self.manifest.unit_records(DENOISER))[index]
        produced = self._run_units([(unit, engine)], inputs, {TEXT_KV_TENSOR: _stacked_of(text_kv)}, {})
        # The whole graph's context now points at this handle's K/V, whatever `denoise` last bound.
        self._bound_text_kv = None
        return {name: self._host_output(engine, name, produced[name][0]) for name in unit.outputs}

    def close(self) -> None:
        """Free every engine, execution context and device buffer of this backend, and its stream (handles it
        returned keep their own buffers until they are dropped)."""
        self._bound_text_kv = None
        engines = [e for _, e in self._text_encoders] + self._denoisers + [e for e in (self._text_kv, self._vae_decoder) if e]
        for engine in engines:
            engine.release()
        self._text_encoders, self._denoisers, self._text_kv, self._vae_decoder = [], [], None, None
        self._empty = None
        if getattr(self, "_stream", None) is not None:
            self.cudart.cudaStreamDestroy(self._stream)
            self._stream = None
        self._runtime = None

    def describe(self) -> dict[str, Any]:
        return {"backend": self.name, "version": self.trt.__version__, "gpu": self.gpu_name, "stages": list(self.stages)}


class TensorRTRtxBackend(TensorRTBackend):
    """The same backend for engines built with TensorRT-RTX (module `tensorrt_rtx`, RTX GPUs)."""

    name = TENSORRT_RTX
