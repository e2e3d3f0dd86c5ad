"""TensorRT backend: the bundle's `text_kv.plan` and `denoiser.plan` on one GPU.

Works with full TensorRT (`tensorrt`) or TensorRT-RTX (`tensorrt_rtx`), same Python API; device memory and the
stream come from cuda-python (`cuda.bindings.runtime`). Tensors are bound by address (`set_tensor_address`) and run
with `execute_async_v3`. The text_kv engine writes its output into a device buffer that becomes the cache handle;
the denoiser binds that same buffer as its `text_kv` input, rebinding only when the handle changes, so the K/V is
never copied per step. The nucleus plugin library is loaded when the engines were built with plugins.

Import-guarded and untested in CI (no GPU there): nothing here is imported until `TensorRTBackend` is constructed,
and the logic is kept to binding and copying; the loop, cache and checks are shared with the ONNX Runtime backend.
"""

from __future__ import annotations

import importlib
import importlib.util
import logging
from pathlib import Path
from typing import Any

import numpy as np

from nucleus_runtime import dlpack
from nucleus_runtime.backends.base import (
    Backend,
    BackendOptions,
    TensorHandle,
    text_kv_inputs,
)
from nucleus_runtime.bundle import EngineRecord, Manifest, load_manifest, stage_files, verify_files
from nucleus_runtime.contract import DENOISER_GRAPH as DENOISER
from nucleus_runtime.contract import (
    HOST_INPUT_DTYPES,
    RUNTIME_DISTRIBUTION,
    SAMPLE,
    TENSORRT,
    TENSORRT_MODULES,
    TENSORRT_RTX,
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
    """Text K/V in device memory, written by the text_kv engine and read in place by the denoiser."""

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


class TensorRTBackend(Backend):
    """Runs a bundle's TensorRT engines.

    Args:
        bundle_dir: the bundle folder, holding text_kv.plan and denoiser.plan.
        manifest: the bundle's manifest, when the caller has it loaded already.
        verify_checksums: check the engine files against the manifest before loading them.
        weight_streaming_budget: bytes of denoiser weights to keep on the GPU (TensorRT weight streaming, engines
            built with --weight-streaming), shared among its segments in proportion to their streamable weights;
            None keeps all weights resident. Written against the documented API; not run on a GPU here.

    A segmented bundle (manifest `segments`) runs its denoiser engines in order: every tensor one segment hands to
    the next stays in that segment's device buffer, and each segment binds its slice of the cached text K/V by
    address (text_kv[first:last] is contiguous), so nothing crosses to the host between segments.
    """

    tensor_type = TrtTensor
    name = TENSORRT

    @property
    def supports_device_io(self) -> bool:
        return not self.segments  # segments pass hidden states between engines in the backend's own buffers

    @classmethod
    def files(cls, manifest: Manifest) -> list[str]:
        """Every stage's `stage_files` and the plugin library when the engines use one."""
        names = [f for stage in manifest.stage_names for f in cls.stage_files(manifest, stage)]
        if manifest.plugins is not None:
            names.append(manifest.plugins.library)
        return list(dict.fromkeys(names))

    @classmethod
    def stage_files(cls, manifest: Manifest, stage: str) -> list[str]:
        """The stage's plans, and for weight-stripped plans the engine graphs they are refit from with the weights
        those read."""
        units = manifest.units(stage)
        names = [plan_file(u) for u in units]
        if any((r := manifest.engine(u)) is not None and r.stripped for u in units):
            names += [engine_onnx_file(u) for u in units]
            names += [f for f in stage_files(manifest, stage) if not f.endswith(".onnx")]
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
        return cls(bundle_dir, manifest, options.verify_checksums, options.weight_streaming_budget)

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
    ):
        self.bundle_dir = Path(bundle_dir)
        self.manifest = manifest or load_manifest(self.bundle_dir)
        self.segments = self.manifest.graph_segments(DENOISER)
        units = self.manifest.engine_units()
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
        # The plugin library is native code that runs in this process: verified whatever verify_checksums says,
        # before TensorRT is even imported, and loaded from the path the manifest records.
        from nucleus_runtime import plugins

        library = plugins.bundle_plugin_library(self.bundle_dir, self.manifest)
        if verify_checksums:
            verify_files(self.bundle_dir, self.manifest, [f for f in self.files(self.manifest) if f in self.manifest.files])
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

        denoiser_units = self.manifest.units(DENOISER)
        self._text_kv = engine(TEXT_KV)
        budgets = _split_budget(self.manifest, denoiser_units, weight_streaming_budget)
        self._denoisers = [engine(unit, budget) for unit, budget in zip(denoiser_units, budgets)]
        self._stream = _check(self.cudart.cudaStreamCreate(), "cudaStreamCreate")
        self._bound_text_kv: TrtTensor | None = None

    def _check_gpu(self) -> None:
        device = _check(self.cudart.cudaGetDevice(), "cudaGetDevice")
        props = _check(self.cudart.cudaGetDeviceProperties(device), "cudaGetDeviceProperties")
        gpu = (int(props.major), int(props.minor))
        self.gpu_name = props.name.decode(errors="replace") if isinstance(props.name, bytes) else str(props.name)
        for graph in self.manifest.engine_units():
            targets = engine_compute_capabilities(self.manifest, graph)
            if targets and gpu not in targets:
                built = ", ".join(f"SM{a}{b}" for a, b in targets)
                raise NucleusError(
                    f"{plan_file(graph)} was built for {built}, but this GPU ({self.gpu_name}) is SM{gpu[0]}{gpu[1]}.",
                    f"build the engines for SM{gpu[0]}{gpu[1]} (`nucleus-export build` on this GPU or with its target).",
                )

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

    # ---- Backend ------------------------------------------------------------------------------------------------

    def compute_text_kv(
        self, encoder_hidden_states: np.ndarray, txt_rope_cos: np.ndarray, txt_rope_sin: np.ndarray
    ) -> TrtTensor:
        engine = self._text_kv
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
        produced: dict[str, tuple[int, tuple[int, ...]]] = {}  # name -> (device address, shape)
        layer_bytes = text_kv.nbytes // text_kv.shape[0]
        for seg, engine in zip(self.segments, self._denoisers):
            for name in seg.inputs:
                if name == TEXT_KV_TENSOR:
                    first, last = seg.blocks
                    engine.context.set_input_shape(name, (last - first, *text_kv.shape[1:]))
                    engine.context.set_tensor_address(name, text_kv.buffer.ptr + first * layer_bytes)
                elif name in produced:
                    ptr, shape = produced[name]
                    engine.context.set_input_shape(name, shape)
                    engine.context.set_tensor_address(name, ptr)
                else:
                    # Uploaded once per step: later segments reading the same host input bind this copy (one
                    # stream, so it stays valid until the step's final synchronize).
                    produced[name] = (self._upload(engine, name, inputs[name]), inputs[name].shape)
            for name in seg.outputs:
                shape, dtype = engine.output_shape(name), engine.output_dtype(name)
                produced[name] = (engine.buffer(name, int(np.prod(shape)) * dtype.itemsize).ptr, shape)
            self._execute(engine, seg.name)
        last = self._denoisers[-1]
        shape, dtype = last.output_shape(SAMPLE), last.output_dtype(SAMPLE)
        host = np.empty(shape, dtype=dtype)
        self.copy_to_host(host, produced[SAMPLE][0])
        return host.astype(np.float32, copy=False)

    def close(self) -> None:
        self._bound_text_kv = None
        for engine in (self._text_kv, *self._denoisers):
            engine.buffers.clear()
        if getattr(self, "_stream", None) is not None:
            self.cudart.cudaStreamDestroy(self._stream)
            self._stream = None

    def describe(self) -> dict[str, Any]:
        return {"backend": self.name, "version": self.trt.__version__, "gpu": self.gpu_name}


class TensorRTRtxBackend(TensorRTBackend):
    """The same backend for engines built with TensorRT-RTX (module `tensorrt_rtx`, RTX GPUs)."""

    name = TENSORRT_RTX
