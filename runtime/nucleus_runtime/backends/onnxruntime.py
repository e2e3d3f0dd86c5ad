"""ONNX Runtime backend: the bundle's ONNX graphs in sessions, CPU or CUDA.

Text K/V stays an `OrtValue` where the text_kv session put it (host memory on CPU, device memory on the CUDA EP)
and is bound to the denoiser with IOBinding, so it is neither copied nor converted per step; a bfloat16/float16
text_kv passes through as is. The custom MoE ops run through their model-local function bodies.

Segmented stages (the denoiser, the text encoder) run their segment graphs one after the other with the same
binding the TensorRT backend uses: a tensor stacked over layers is bound by address, each segment its slice
[first:last] of it (the cached text K/V, the past K/V) or its layers' part of one output buffer (the new tokens'
key_values), and what one segment hands to the next stays an OrtValue on the session's device.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import logging
from pathlib import Path
from typing import Any

import numpy as np

from nucleus_runtime.backends.base import (
    Backend,
    BackendOptions,
    TensorHandle,
    raise_stage_not_loaded,
    text_encoder_inputs,
    text_kv_inputs,
    vae_decoder_input,
)
from nucleus_runtime.bundle import Manifest, SegmentRecord, TensorSpec, load_manifest, stage_files, verify_files
from nucleus_runtime.contract import DENOISER_GRAPH as DENOISER
from nucleus_runtime.contract import (
    DENOISER_INPUTS,
    ATTENTION_MASK,
    GRAPHS,
    IMAGE,
    INPUT_IDS,
    KEY_VALUES,
    LATENTS,
    ONNXRUNTIME,
    PAST_KEY_VALUES,
    PROMPT_EMBEDS,
    SAMPLE,
    TEXT_ENCODER_GRAPH,
    TEXT_ENCODER_INPUTS,
    TEXT_KV_INPUTS,
    VAE_DECODER_GRAPH,
    onnx_file,
)
from nucleus_runtime.contract import TEXT_KV as TEXT_KV_TENSOR
from nucleus_runtime.contract import TEXT_KV_GRAPH as TEXT_KV
from nucleus_runtime.errors import NucleusError
from nucleus_runtime.memory import host_available_bytes

logger = logging.getLogger("nucleus_runtime")

CUDA_EP = "CUDAExecutionProvider"
CPU_EP = "CPUExecutionProvider"
# onnx.TensorProto element types of the compute dtypes a manifest names, without importing onnx (numpy has no
# bfloat16, so buffers are made from the ONNX type).
ONNX_ELEMENT_TYPES = {"float32": 1, "float16": 10, "bfloat16": 16}


@dataclasses.dataclass
class OrtOptions:
    """Session settings.

    Attributes:
        threads: intra-op threads (None: ONNX Runtime's default, one per physical core). Results are bitwise the
            same on any thread count (measured on 1, 2 and 4 threads, tests/test_parity.py): the sequential
            executor fixes the node order, and the one kernel found to race, ScatterND with reduction="add" (lost
            updates on repeated indices, microsoft/onnxruntime#18048), is only ever given distinct indices by the
            MoECombine body. No session option is needed for it (use_deterministic_compute does not cure the race).
        device: "auto" (CUDA EP when onnxruntime-gpu provides it, else CPU), "cpu" or "cuda".
        optimization: graph optimization level: "all", "extended", "basic" or "disabled".
        verify_checksums: check the ONNX files against the manifest before loading them.
        segments: run the segment graphs of the denoiser and the text encoder in sequence when the bundle has them
            (False: the full graphs).
        stages: the stages to load (None: every stage of the bundle).
    """

    threads: int | None = None
    device: str = "auto"
    optimization: str = "all"
    verify_checksums: bool = True
    segments: bool = True
    stages: tuple[str, ...] | None = None


class OrtTensor(TensorHandle):
    """An OrtValue on the device its session ran on (text K/V, the text encoder's key_values)."""

    def __init__(self, value: Any):
        self.value = value

    @property
    def nbytes(self) -> int:
        return int(self.value.tensor_size_in_bytes())

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.value.shape())

    def to_numpy(self) -> np.ndarray:
        return self.value.numpy()


def _import_ort() -> Any:
    try:
        import onnxruntime
    except ImportError:
        raise NucleusError(
            "onnxruntime is not installed.", "pip install onnxruntime (CPU) or onnxruntime-gpu (CUDA)."
        ) from None
    return onnxruntime


def _providers(ort: Any, device: str) -> list[str]:
    available = ort.get_available_providers()
    if device == "cpu":
        return [CPU_EP]
    if CUDA_EP in available:
        return [CUDA_EP, CPU_EP]
    if device == "cuda":
        raise NucleusError(
            f"ONNX Runtime has no {CUDA_EP} here (available: {', '.join(available)}).",
            "pip install onnxruntime-gpu in place of onnxruntime, or run with --device cpu.",
        )
    return [CPU_EP]


class OrtBackend(Backend):
    """Runs a bundle's ONNX graphs with ONNX Runtime: text_kv and the denoiser (or its segments), and the text encoder
    and the VAE decoder where the bundle has them.

    Args:
        bundle_dir: the bundle folder.
        options: session settings.
        manifest: the bundle's manifest, when the caller has it loaded already.
    """

    tensor_type = OrtTensor

    name = ONNXRUNTIME

    @classmethod
    def stage_files(cls, manifest: Manifest, graph: str) -> list[str]:
        """The stage's exported graph, its segments and weights (data files, linked checkpoint shards); not the
        engines' graphs (*.engine.onnx). The contract's graph files always: a manifest that lost their records must
        not silently serve without them. (Linked shards count whole: they may hold tensors no graph reads, such as
        the text encoder's vision tower, so stage_bytes is an upper bound for them.)"""
        return stage_files(manifest, graph)

    @classmethod
    def memory_available(cls, options: BackendOptions) -> int | None:
        """Host memory when the sessions would run on the CPU; on the CUDA provider, unknown here."""
        if options.device == "cpu" or CUDA_EP not in _import_ort().get_available_providers():
            return host_available_bytes()
        return None

    @classmethod
    def available(cls) -> bool:
        return importlib.util.find_spec("onnxruntime") is not None

    @classmethod
    def serves(cls, bundle_dir: Path, manifest: Manifest) -> bool:
        return all((Path(bundle_dir) / onnx_file(g)).is_file() for g in GRAPHS)

    @classmethod
    def open(cls, bundle_dir: Path, manifest: Manifest, options: BackendOptions) -> OrtBackend:
        ort_options = OrtOptions(options.threads, options.device, verify_checksums=options.verify_checksums, stages=options.stages)
        return cls(bundle_dir, ort_options, manifest)

    def __init__(self, bundle_dir: Path, options: OrtOptions | None = None, manifest: Manifest | None = None):
        ort = _import_ort()
        self.bundle_dir = Path(bundle_dir)
        self.options = options or OrtOptions()
        self.manifest = manifest or load_manifest(self.bundle_dir)
        self.stages = [g for g in self.manifest.stage_names if self.options.stages is None or g in self.options.stages]
        if self.options.verify_checksums:
            # The graphs, their segments and external data (what this backend reads), each of which must be recorded.
            names = dict.fromkeys(f for graph in self.stages for f in self.stage_files(self.manifest, graph))
            verify_files(self.bundle_dir, self.manifest, list(names))
        self.providers = _providers(ort, self.options.device)
        self._device = "cuda" if self.providers[0] == CUDA_EP else "cpu"
        session_options = ort.SessionOptions()
        levels = {
            "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
            "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
            "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
            "disabled": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
        }
        session_options.graph_optimization_level = levels[self.options.optimization]
        if self.options.threads:
            session_options.intra_op_num_threads = self.options.threads
        # One graph runs at a time: a second inter-op pool would only compete for the same cores.
        session_options.inter_op_num_threads = 1
        session_options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        self._ort = ort

        def session(graph: str, inputs: tuple[str, ...]) -> Any:
            return self._session(graph, session_options, inputs) if graph in self.stages else None

        def units(graph: str) -> list[tuple[SegmentRecord, Any]] | None:
            """A stage that can be cut runs as units (its segments in order, or the whole graph as one unit of all its
            layers) through `_run_units`: same weights, same results (tests/test_segments.py); intermediates stay
            OrtValues on the session's device between them."""
            if graph not in self.stages:
                return None
            records = self.manifest.unit_records(graph, self.options.segments)
            # A whole graph must have the contract's inputs; a segment, those its record names.
            contract_inputs = {DENOISER: DENOISER_INPUTS, TEXT_ENCODER_GRAPH: TEXT_ENCODER_INPUTS}[graph]
            return [
                (unit, self._session(unit.name, session_options, contract_inputs if unit.name == graph else tuple(unit.inputs)))
                for unit in records
            ]

        self._text_encoder = units(TEXT_ENCODER_GRAPH)
        self._denoiser = units(DENOISER)
        self._vae_decoder = session(VAE_DECODER_GRAPH, (LATENTS,))
        self._text_kv = session(TEXT_KV, TEXT_KV_INPUTS)
        logger.debug("onnxruntime %s, providers %s, stages %s", ort.__version__, self.providers, ", ".join(self.stages))

    def _session(self, graph: str, session_options: Any, expected: tuple[str, ...]) -> Any:
        path = self.bundle_dir / onnx_file(graph)
        if not path.is_file():
            raise NucleusError(f"bundle file {path} is missing.", "copy the complete bundle, or export it again.")
        try:
            session = self._ort.InferenceSession(str(path), session_options, providers=self.providers)
        except Exception as exc:  # noqa: BLE001 - ORT raises its own exception types for unreadable graphs
            if "NOT_IMPLEMENTED" in str(exc):
                # Typically a bf16/fp16 bundle on the CPU provider, which lacks low-precision MatMul kernels.
                fix = (
                    f"{' / '.join(self.providers)} has no kernel for an op of this {self.manifest.precision} bundle: "
                    "export an fp32 bundle (--precision fp32) for CPU runs, or run on CUDA (onnxruntime-gpu) or TensorRT."
                )
            else:
                fix = "export the bundle again."
            raise NucleusError(f"ONNX Runtime cannot load {path}: {exc}", fix) from None
        names = {i.name for i in session.get_inputs()}
        if names != set(expected):
            raise NucleusError(
                f"{path} has inputs {sorted(names)}; the bundle contract expects {sorted(expected)}.",
                "export the bundle again with this version of nucleus-export.",
            )
        return session

    def compute_text_kv(
        self, encoder_hidden_states: np.ndarray, txt_rope_cos: np.ndarray, txt_rope_sin: np.ndarray
    ) -> OrtTensor:
        binding = self._stage(self._text_kv, TEXT_KV).io_binding()
        for name, array in text_kv_inputs(encoder_hidden_states, txt_rope_cos, txt_rope_sin).items():
            binding.bind_cpu_input(name, array)
        binding.bind_output(TEXT_KV_TENSOR, self._device)
        self._text_kv.run_with_iobinding(binding)
        return OrtTensor(binding.get_outputs()[0])

    def encode_prompt(
        self, input_ids: np.ndarray, attention_mask: np.ndarray, past: OrtTensor | None
    ) -> tuple[np.ndarray, OrtTensor]:  # type: ignore[override]
        units = self._stage(self._text_encoder, TEXT_ENCODER_GRAPH)
        ids, mask, sizes = text_encoder_inputs(self, input_ids, attention_mask, past)
        io = self.manifest.stages[TEXT_ENCODER_GRAPH].io
        past_value = past.value if past is not None else self._buffer(io.inputs[PAST_KEY_VALUES], sizes)
        key_values = self._buffer(io.outputs[KEY_VALUES], sizes)  # every segment writes its layers into it
        values = self._run_units(units, {INPUT_IDS: ids, ATTENTION_MASK: mask}, {PAST_KEY_VALUES: past_value},
                                 {KEY_VALUES: key_values})
        return values[PROMPT_EMBEDS].numpy(), OrtTensor(key_values)

    def _buffer(self, spec: TensorSpec, sizes: dict[str, int]) -> Any:
        """An OrtValue of a graph tensor's dtype on the session's device, its symbolic dims given by `sizes`."""
        shape = [sizes[d] if isinstance(d, str) else d for d in spec.shape]
        return self._ort.OrtValue.ortvalue_from_shape_and_type(shape, ONNX_ELEMENT_TYPES[spec.dtype], self._device)

    def _run_units(
        self,
        units: list[tuple[SegmentRecord, Any]],
        host: dict[str, np.ndarray],
        stacked_inputs: dict[str, Any],
        stacked_outputs: dict[str, Any],
    ) -> dict[str, Any]:
        """Run a stage's units (its segments in order, or the whole graph as one unit of all its layers).

        Args:
            units: (unit record, session) pairs.
            host: inputs fed from numpy, by name (bound again for every unit that reads them).
            stacked_inputs: OrtValues stacked over all layers on axis 0 (contract.SEGMENT_SLICED_INPUTS): each unit
                binds the slice of its layers by address.
            stacked_outputs: preallocated OrtValues of all layers: each unit writes its layers at their offset.

        Returns:
            every other output of every unit, as OrtValues on the session's device.
        """
        values: dict[str, Any] = {}  # tensors produced by earlier units
        for unit, session in units:
            binding = session.io_binding()
            for name in unit.inputs:
                if name in stacked_inputs:
                    binding.bind_input(name, *self._layers(stacked_inputs[name], *unit.blocks))
                elif name in values:
                    binding.bind_ortvalue_input(name, values[name])
                else:
                    binding.bind_cpu_input(name, host[name])
            for name in unit.outputs:
                if name in stacked_outputs:
                    binding.bind_output(name, *self._layers(stacked_outputs[name], *unit.blocks))
                else:
                    binding.bind_output(name, self._device)
            session.run_with_iobinding(binding)
            values.update((n, v) for n, v in zip(unit.outputs, binding.get_outputs()) if n not in stacked_outputs)
        return values

    def _layers(self, value: Any, first: int, last: int) -> tuple[Any, ...]:
        """IOBinding's (device, device id, element type, shape, address) of value[first:last]: layers are contiguous
        on axis 0, so the slice is a pointer offset (an empty past has address 0 and no bytes, which ORT accepts)."""
        shape = list(value.shape())
        layer_bytes = value.tensor_size_in_bytes() // shape[0]
        return self._device, 0, value.element_type(), [last - first, *shape[1:]], value.data_ptr() + first * layer_bytes

    def decode_image(self, latents: np.ndarray) -> np.ndarray:
        session = self._stage(self._vae_decoder, VAE_DECODER_GRAPH)
        return session.run([IMAGE], {LATENTS: vae_decoder_input(self.manifest, latents)})[0]

    def _stage(self, session: Any, graph: str) -> Any:
        if session is None:
            raise_stage_not_loaded(self, graph)
        return session

    def _denoise(self, inputs: dict[str, np.ndarray], text_kv: OrtTensor) -> np.ndarray:  # type: ignore[override]
        units = self._stage(self._denoiser, DENOISER)
        return self._run_units(units, inputs, {TEXT_KV_TENSOR: text_kv.value}, {})[SAMPLE].numpy()

    def _run_denoiser_unit(self, index: int, inputs: dict[str, np.ndarray], text_kv: OrtTensor) -> dict[str, np.ndarray]:  # type: ignore[override]
        unit = self._stage(self._denoiser, DENOISER)[index]
        produced = self._run_units([unit], inputs, {TEXT_KV_TENSOR: text_kv.value}, {})
        return {name: value.numpy() for name, value in produced.items()}

    def close(self) -> None:
        """Drop every session: their weights are freed now, not when this object is collected."""
        self._text_encoder = self._vae_decoder = self._text_kv = self._denoiser = None

    def describe(self) -> dict[str, Any]:
        return {
            "backend": self.name,
            "onnxruntime": self._ort.__version__,
            "providers": self.providers,
            "threads": self.options.threads,
            "optimization": self.options.optimization,
        }
