"""Build a TensorRT engine from an ONNX file: one code path for full TensorRT and TensorRT-RTX.

Why the TensorRT API directly and not Polygraphy's loaders: Polygraphy picks its TensorRT module once per process
from the POLYGRAPHY_USE_TENSORRT_RTX environment variable at import time, while `--backend` is a per-call choice and
the tests build with both settings in one process. The two modules expose the same builder API (Builder, OnnxParser,
IBuilderConfig, IOptimizationProfile, IProgressMonitor, plugin registry), so passing the module around as
`Backend.trt` gives one code path. The loaders below keep Polygraphy's shape: small callables composed lazily,
`EngineFromOnnx(NetworkFromOnnxPath(...), BuildSettings(...))`.

Facts this code relies on (TensorRT-RTX 1.7.1 on a CPU-only machine; see README-facts.md):
- `parse_from_file` resolves external data next to the ONNX file; `parse(bytes)` would not.
- TensorRT-RTX networks are always strongly typed; full TensorRT needs NetworkDefinitionCreationFlag.STRONGLY_TYPED
  to honour the ONNX dtypes (BF16 GEMMs, FP32 router/norms, FP8 via Q/DQ) instead of choosing precisions itself.
- `ILayer.precision` does not exist in TensorRT-RTX: layer precision is reported from output tensor dtypes.
- Timing-cache calls are deprecated no-ops in TensorRT-RTX >= 1.2 (no tactic timing on the CPU); the cache is only
  written and reused for full TensorRT.
- An IOptimizationProfile with min > opt is invalid and `add_optimization_profile` returns -1; ranges are validated
  first so the user gets the input name and the numbers.
- Default TensorRT-RTX targets: compute capability 8.0, 8.6, 8.9, 12.0 (no 9.0: H100/H200 need full TensorRT).
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import json
import logging
import os
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import onnx
from nucleus_runtime import contract
from nucleus_runtime.atomic import atomic_file
from nucleus_runtime.bundle import Profiles, sha256_file, write_atomic
from nucleus_runtime.errors import NucleusError
from nucleus_runtime.plugins import find_plugin_library, load_plugin_library

from nucleus_export.engines.backends import Backend
from nucleus_export.errors import NucleusExportError
from nucleus_export.model.config import ModelConfig

logger = logging.getLogger("nucleus_export")

ShapeTriple = tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]
DimRange = tuple[int, int, int]

# Layer types that only move data: a Q/DQ search walks back through them from a GEMM input.
_PASS_THROUGH = {"SHUFFLE", "IDENTITY", "SLICE", "CONCATENATION", "GATHER", "SQUEEZE", "UNSQUEEZE"}


# ---- profiles ---------------------------------------------------------------------------------------------------


def validate_dim_ranges(ranges: dict[str, DimRange]) -> None:
    """Every symbolic dim range must satisfy 1 <= min <= opt <= max."""
    for dim, rng in ranges.items():
        if len(rng) != 3 or any(int(v) != v for v in rng):
            raise NucleusExportError(f"profile range for '{dim}' must be three integers (min, opt, max), got {rng}.")
        lo, opt, hi = rng
        if not 1 <= lo <= opt <= hi:
            raise NucleusExportError(
                f"impossible profile range for '{dim}': min={lo}, opt={opt}, max={hi} (need 1 <= min <= opt <= max).",
                "fix the range (--max-batch, --max-text-len, --resolutions) so the opt value lies inside it.",
            )


def onnx_input_shapes(onnx_path: Path) -> dict[str, list[int | str]]:
    """Graph input shapes (ints for static dims, names for symbolic ones), read without loading external data."""
    model = onnx.load(str(onnx_path), load_external_data=False)
    initializers = {i.name for i in model.graph.initializer}
    shapes: dict[str, list[int | str]] = {}
    for value in model.graph.input:
        if value.name in initializers:
            continue
        dims = value.type.tensor_type.shape.dim
        shapes[value.name] = [d.dim_param if d.dim_param else int(d.dim_value) for d in dims]
    return shapes


def profile_shapes(input_shapes: dict[str, list[int | str]], ranges: dict[str, DimRange]) -> dict[str, ShapeTriple]:
    """Min/opt/max shape per graph input: static dims as they are, symbolic dims from `ranges` (batch, text_len, ...),
    which dim_ranges_from_profiles has validated.

    Raises:
        NucleusExportError: an input has a symbolic dim with no range.
    """
    shapes: dict[str, ShapeTriple] = {}
    for name, dims in input_shapes.items():
        triple: list[list[int]] = [[], [], []]
        for dim in dims:
            if isinstance(dim, str):
                if dim not in ranges:
                    raise NucleusExportError(
                        f"graph input '{name}' has the symbolic dim '{dim}', which no profile range covers "
                        f"(known: {', '.join(sorted(ranges))}).",
                        "export the graph again with this version of nucleus-export (dims are named batch, text_len, "
                        "image_tokens).",
                    )
                for k in range(3):
                    triple[k].append(int(ranges[dim][k]))
            else:
                if dim <= 0:
                    raise NucleusExportError(f"graph input '{name}' has an unnamed dynamic dim.", "name every dynamic dim.")
                for k in range(3):
                    triple[k].append(dim)
        shapes[name] = (tuple(triple[0]), tuple(triple[1]), tuple(triple[2]))
    return shapes


def dim_ranges_from_profiles(profiles: Profiles) -> dict[str, DimRange]:
    """The symbolic-dim ranges of a bundle's Manifest.profiles (batch, text_len, image_tokens), validated once here
    for every graph built from them.

    Raises:
        NucleusExportError: a range is impossible.
    """
    ranges = {
        contract.BATCH_DIM: tuple(int(v) for v in profiles.batch),
        contract.TEXT_LEN_DIM: tuple(int(v) for v in profiles.text_len),
        contract.IMAGE_TOKENS_DIM: tuple(int(v) for v in profiles.image_tokens),
    }
    validate_dim_ranges(ranges)
    return ranges


# ---- limits of TensorRT a profile must respect ---------------------------------------------------------------------

# TopK's largest K ("K exceeds the maximum value allowed (3840)"); the router's K is the expert capacity C.
TOPK_MAX_K = 3840
# Largest element count of one tensor (int32 volume).
MAX_TENSOR_ELEMENTS = 2**31 - 1


def profile_limit_problems(config: ModelConfig, batch: int, tokens: int, text_len: int, float32: bool,
                           combine: str | None) -> list[str]:
    """What TensorRT cannot build at this size (empty when it fits). `combine` is the native combine formulation
    (None for plugins); `float32` engines decompose attention and so materialize its scores."""
    problems = []
    experts = config.num_experts
    for idx in config.moe_layers:
        c = config.capacity(idx, tokens)
        if combine is not None and c > TOPK_MAX_K:  # the native router's TopK (plugins route without it)
            problems.append(f"block {idx}: expert capacity C={c} exceeds TensorRT's TopK limit K <= {TOPK_MAX_K}")
        if combine == "onehot" and batch * tokens * experts * c > MAX_TENSOR_ELEMENTS:
            problems.append(f"block {idx}: the one-hot combine tensor [{batch}, {tokens}, {experts * c}] exceeds 2^31 elements")
        if experts * batch * c * 2 * config.moe_intermediate_dim > MAX_TENSOR_ELEMENTS:
            problems.append(f"block {idx}: the expert activations [{experts}, {batch * c}, {2 * config.moe_intermediate_dim}] "
                            "exceed 2^31 elements")
    scores = batch * config.num_attention_heads * tokens * (tokens + text_len)
    if float32 and scores > MAX_TENSOR_ELEMENTS:
        problems.append(f"float32 attention (decomposed) scores [{batch}, {config.num_attention_heads}, {tokens}, "
                        f"{tokens + text_len}] exceed 2^31 elements")
    return problems


def check_profile_limits(config: ModelConfig, profiles: Profiles, float32: bool, combine: str | None) -> None:
    """Refuse, before any export or build work, a profile TensorRT cannot build: the reason at the largest served
    resolution and the largest served resolution (and square size) that fits.

    Raises:
        NucleusExportError: some served resolution exceeds a limit.
    """
    batch, text_len = profiles.batch[2], profiles.text_len[2]

    def problems(tokens: int) -> list[str]:
        return profile_limit_problems(config, batch, tokens, text_len, float32, combine)

    failing = [(r, g) for r, g in zip(profiles.resolutions, profiles.grids) if problems(g[0] * g[1])]
    if not failing:
        return
    (height, width), grid = max(failing, key=lambda item: item[1][0] * item[1][1])
    fitting = [r for r, g in zip(profiles.resolutions, profiles.grids) if not problems(g[0] * g[1])]
    side = max((n for n in range(1, 4096) if not problems(n * n)), default=0)  # problems grow with S: one boundary
    step = 8 * config.patch_size
    best = max(fitting, key=lambda r: r[0] * r[1], default=None)
    served = f"the largest served resolution that fits is {best[0]}x{best[1]}; " if best else ""
    raise NucleusExportError(
        f"TensorRT cannot build {height}x{width} (batch {batch}): " + "; ".join(problems(grid[0] * grid[1])[:3]) + ".",
        f"{served}square sizes fit up to {side * step}x{side * step}: drop the larger --resolutions"
        + ("" if combine != "onehot" else ", or use --combine chain") + ".",
    )


# ---- network inspection -----------------------------------------------------------------------------------------


@dataclasses.dataclass
class GemmInfo:
    """A matrix-multiply layer and what feeds it: `fp8_inputs[i]` is True when input i comes from a DEQUANTIZE of
    an FP8 tensor (through data-movement layers only)."""

    name: str
    input_dtypes: list[str]
    fp8_inputs: list[bool]


@dataclasses.dataclass
class NetworkReport:
    """The parsed network, as TensorRT sees it before optimization."""

    num_layers: int
    layer_types: dict[str, int]
    precision_per_layer_type: dict[str, dict[str, int]]
    num_quantize: int
    num_dequantize: int
    gemms: list[GemmInfo]
    plugin_layers: list[str]
    inputs: dict[str, str]
    outputs: dict[str, str]

    def gemm(self, name_contains: str) -> list[GemmInfo]:
        return [g for g in self.gemms if name_contains in g.name]


def _dtype_name(dtype: Any) -> str:
    return str(dtype).rsplit(".", 1)[-1]


def _type_name(layer_type: Any) -> str:
    return str(layer_type).rsplit(".", 1)[-1]


def inspect_network(network: Any) -> NetworkReport:
    """Layer count, precision (output dtype) per layer type, Q/DQ layers and the FP8-ness of every GEMM input."""
    producers: dict[str, Any] = {}
    layers = [network.get_layer(i) for i in range(network.num_layers)]
    for layer in layers:
        for j in range(layer.num_outputs):
            producers[layer.get_output(j).name] = layer
    types: collections.Counter[str] = collections.Counter()
    precision: dict[str, collections.Counter[str]] = collections.defaultdict(collections.Counter)
    gemms: list[GemmInfo] = []
    plugins: list[str] = []

    def from_fp8_dequantize(tensor: Any, depth: int = 0) -> bool:
        layer = producers.get(tensor.name) if tensor is not None else None
        if layer is None or depth > 8:
            return False
        kind = _type_name(layer.type)
        if kind == "DEQUANTIZE":
            source = layer.get_input(0)
            return source is not None and _dtype_name(source.dtype) == "FP8"
        if kind in _PASS_THROUGH:
            return from_fp8_dequantize(layer.get_input(0), depth + 1)
        return False

    for layer in layers:
        kind = _type_name(layer.type)
        types[kind] += 1
        for j in range(layer.num_outputs):
            precision[kind][_dtype_name(layer.get_output(j).dtype)] += 1
        if kind == "MATRIX_MULTIPLY":
            inputs = [layer.get_input(k) for k in range(layer.num_inputs)]
            gemms.append(
                GemmInfo(
                    name=layer.name,
                    input_dtypes=[_dtype_name(t.dtype) for t in inputs],
                    fp8_inputs=[from_fp8_dequantize(t) for t in inputs],
                )
            )
        if kind.startswith("PLUGIN"):
            plugins.append(layer.name)
    return NetworkReport(
        num_layers=len(layers),
        layer_types=dict(sorted(types.items())),
        precision_per_layer_type={k: dict(sorted(v.items())) for k, v in sorted(precision.items())},
        num_quantize=types.get("QUANTIZE", 0),
        num_dequantize=types.get("DEQUANTIZE", 0),
        gemms=gemms,
        plugin_layers=plugins,
        inputs={network.get_input(i).name: _dtype_name(network.get_input(i).dtype) for i in range(network.num_inputs)},
        outputs={
            network.get_output(i).name: _dtype_name(network.get_output(i).dtype) for i in range(network.num_outputs)
        },
    )


# ---- plugins ----------------------------------------------------------------------------------------------------


def load_plugins(backend: Backend, library: Path) -> tuple[Path, str]:
    """Check the nucleus plugin library and register its creators with the backend's plugin registry.

    The checks and the loading are the runtime's (nucleus_runtime.plugins), so a library the build accepts is one
    the runtime accepts. Its errors say how to build the library; the build adds its alternative, the native lowering.
    The checksum taken here, before loading, is the one the bundle records: the copy shipped in the bundle is then
    verified against it, so the bundle carries exactly the bytes the engines were built with.

    Returns:
        The resolved library path and its sha256.
    """
    try:
        path = find_plugin_library(library)
        sha256 = sha256_file(path)
        return load_plugin_library(path, backend.trt, sha256=sha256), sha256
    except NucleusError as exc:
        fix = f"{exc.fix.rstrip('.')}; or use --moe native." if exc.fix else "use --moe native."
        raise NucleusExportError(exc.problem, fix) from exc


# ---- progress ---------------------------------------------------------------------------------------------------


def make_progress_monitor(backend: Backend, on_event: Callable[[str, str, int, int], None]) -> Any:
    """An IProgressMonitor of the backend's module that reports (event, phase, step, total) to `on_event`.

    The builder calls it from its own threads; `on_event` must be thread-safe. Returning True keeps building.
    """
    base = backend.trt.IProgressMonitor

    class _Monitor(base):  # type: ignore[misc, valid-type]
        def __init__(self) -> None:
            base.__init__(self)
            self._lock = threading.Lock()
            self._totals: dict[str, int] = {}

        def phase_start(self, phase_name: str, parent_phase: str | None, num_steps: int) -> None:
            with self._lock:
                self._totals[phase_name] = num_steps
                on_event("start", phase_name, 0, num_steps)

        def step_complete(self, phase_name: str, step: int) -> bool:
            with self._lock:
                on_event("step", phase_name, step + 1, self._totals.get(phase_name, 0))
            return True

        def phase_finish(self, phase_name: str) -> None:
            with self._lock:
                on_event("finish", phase_name, self._totals.get(phase_name, 0), self._totals.get(phase_name, 0))

    return _Monitor()


# ---- loaders ----------------------------------------------------------------------------------------------------


# TensorRT warnings that the exported graphs trigger by design (int64 mask input, empty shape constants).
_BENIGN_WARNINGS = ("has Int64 binding", "Empty initializer")


@functools.lru_cache(maxsize=None)
def make_logger(backend: Backend) -> Any:
    """A TensorRT ILogger that forwards to the nucleus_export logger (known-benign warnings only with --verbose).

    One per backend for the whole process: TensorRT registers the first logger it is given and ignores (with a
    warning, logged through the first one) any other, so a second build with a fresh logger object called back into
    a logger Python had already freed; measured as a deadlock when builds run one after another (segments)."""
    trt = backend.trt

    class _Logger(trt.ILogger):  # type: ignore[misc, name-defined]
        def __init__(self) -> None:
            trt.ILogger.__init__(self)

        def log(self, severity: Any, msg: str) -> None:
            if severity in (trt.ILogger.INTERNAL_ERROR, trt.ILogger.ERROR):
                logger.error("[%s] %s", backend.name, msg)
            elif severity == trt.ILogger.WARNING and not any(b in msg for b in _BENIGN_WARNINGS):
                logger.warning("[%s] %s", backend.name, msg)
            else:
                logger.debug("[%s] %s", backend.name, msg)

    return _Logger()


@dataclasses.dataclass
class ParsedNetwork:
    """A parsed network with the objects that must stay alive while it is used."""

    backend: Backend
    builder: Any
    network: Any
    parser: Any
    parse_seconds: float


@dataclasses.dataclass
class NetworkFromOnnxPath:
    """Loader: parse an ONNX file (external data beside it) into a strongly typed network.

    Args:
        backend: the resolved backend.
        path: ONNX file.
        plugin_override: set OnnxParserFlag.ENABLE_PLUGIN_OVERRIDE (a registered plugin takes a node that also has a
            function body). Harmless without plugins.
    """

    backend: Backend
    path: Path
    plugin_override: bool = False

    def __call__(self) -> ParsedNetwork:
        trt = self.backend.trt
        logger_ = make_logger(self.backend)
        builder = trt.Builder(logger_)
        flags = 0
        if hasattr(trt.NetworkDefinitionCreationFlag, "STRONGLY_TYPED"):
            flags |= 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED)
        network = builder.create_network(flags)
        parser = trt.OnnxParser(network, logger_)
        if self.plugin_override and hasattr(trt.OnnxParserFlag, "ENABLE_PLUGIN_OVERRIDE"):
            parser.set_flag(trt.OnnxParserFlag.ENABLE_PLUGIN_OVERRIDE)
        start = time.perf_counter()
        ok = parser.parse_from_file(str(self.path))
        seconds = time.perf_counter() - start
        if not ok:
            errors = [str(parser.get_error(i)) for i in range(parser.num_errors)]
            raise NucleusExportError(
                f"{self.backend.name} could not parse {self.path}: " + " | ".join(e.splitlines()[0] for e in errors[:5]),
                _parse_fix(errors),
            )
        allow_float32_attention_decomposition(self.backend, network)
        return ParsedNetwork(self.backend, builder, network, parser, seconds)


def allow_float32_attention_decomposition(backend: Backend, network: Any) -> int:
    """Mark float32 fused attentions decomposable; returns how many.

    TensorRT-RTX 1.7 has dedicated attention kernels for bf16/fp16 only: a float32 IAttention fails the build
    ("Attention operation was not supported by a dedicated kernel") unless it may be decomposed into MatMul/Softmax
    layers. Deployment engines (bf16, FP8) keep the fused kernel.
    """
    trt = backend.trt
    if not hasattr(trt, "IAttentionInputLayer"):
        return 0
    marked = 0
    for i in range(network.num_layers):
        layer = network.get_layer(i)
        if _type_name(layer.type) == "ATTENTION_INPUT" and _dtype_name(layer.get_input(0).dtype) == "FLOAT":
            layer.__class__ = trt.IAttentionInputLayer  # the binding returns the base ILayer; downcast as Polygraphy does
            layer.attention.decomposable = True
            marked += 1
    return marked


def _parse_fix(errors: list[str]) -> str:
    text = " ".join(errors)
    if "Plugin not found" in text:
        return "load the plugin library that provides these ops (--plugins), or build with --moe native."
    if "reduction" in text.lower():
        return "the graph still holds scatter-add reference bodies: build with --moe native or --moe plugin."
    return "run `nucleus-export check` on the bundle, or rerun with --verbose and report the failing node."


@dataclasses.dataclass
class BuildSettings:
    """Builder settings for one engine.

    Attributes:
        shapes: min/opt/max per graph input (one optimization profile).
        timing_cache: file read before and written after the build (full TensorRT only; see module docstring).
        optimization_level: builder optimization level (None: the backend's default, 3).
        compute_capabilities: TensorRT-RTX target names such as "SM89" (None: its portable default).
        strip_weights: build a weight-stripped plan (STRIP_PLAN + REFIT_IDENTICAL): the plan holds no weights and
            the runtime refits it from the ONNX graph it was built from.
        weight_streaming: mark the engine's weights streamable (WEIGHT_STREAMING), so a runtime may keep only a
            budget of them on the GPU.
    """

    shapes: dict[str, ShapeTriple]
    timing_cache: Path | None = None
    optimization_level: int | None = None
    compute_capabilities: list[str] | None = None
    strip_weights: bool = False
    weight_streaming: bool = False


@dataclasses.dataclass
class BuildReport:
    """What one engine build did; stored in build_log.json and printed on screen."""

    graph: str
    backend: str
    backend_version: str
    onnx: str
    engine: str
    engine_bytes: int
    parse_seconds: float
    build_seconds: float
    profile: dict[str, list[list[int]]]
    timing_cache: dict[str, Any]
    network: NetworkReport
    compute_capabilities: list[str] | None = None

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def summary_lines(self) -> list[str]:
        net = self.network
        precisions = ", ".join(
            f"{kind}: " + "/".join(f"{d} x{n}" for d, n in dtypes.items())
            for kind, dtypes in net.precision_per_layer_type.items()
            if kind in ("MATRIX_MULTIPLY", "NORMALIZATION", "SOFTMAX", "TOPK", "QUANTIZE", "DEQUANTIZE", "PLUGIN_V3")
        )
        fp8 = sum(1 for g in net.gemms if all(g.fp8_inputs))
        return [
            f"{self.graph}: {self.backend} {self.backend_version}, {net.num_layers} layers, "
            f"{len(net.gemms)} GEMMs ({fp8} FP8), {net.num_quantize} Q / {net.num_dequantize} DQ, "
            f"engine {self.engine_bytes / 2**20:.1f} MiB, parse {self.parse_seconds:.1f} s, build {self.build_seconds:.1f} s",
            f"  precision per layer type: {precisions}",
        ]


def _make_config(parsed: ParsedNetwork, settings: BuildSettings) -> tuple[Any, Any]:
    """Builder config with one optimization profile and, for full TensorRT, the timing cache. Returns (config, cache)."""
    backend, builder, network = parsed.backend, parsed.builder, parsed.network
    trt = backend.trt
    config = builder.create_builder_config()
    network_inputs = {network.get_input(i).name for i in range(network.num_inputs)}
    missing = sorted(network_inputs - set(settings.shapes))
    if missing:
        raise NucleusExportError(f"no profile shapes for network inputs {missing}.", "export the bundle again.")
    profile = builder.create_optimization_profile()
    for name in sorted(network_inputs):
        lo, opt, hi = settings.shapes[name]
        if not all(a <= b <= c for a, b, c in zip(lo, opt, hi)):
            raise NucleusExportError(
                f"impossible profile for input '{name}': min {lo}, opt {opt}, max {hi}.",
                "each dim needs min <= opt <= max.",
            )
        profile.set_shape(name, lo, opt, hi)
    if config.add_optimization_profile(profile) < 0:
        raise NucleusExportError(
            f"{backend.name} rejected the optimization profile {settings.shapes}.", "check the profile ranges."
        )
    if settings.optimization_level is not None:
        config.builder_optimization_level = settings.optimization_level
    if settings.compute_capabilities and hasattr(trt, "ComputeCapability"):
        config.num_compute_capabilities = len(settings.compute_capabilities)
        for i, name in enumerate(settings.compute_capabilities):
            try:
                config.set_compute_capability(getattr(trt.ComputeCapability, name.upper()), i)
            except AttributeError:
                choices = [m for m in trt.ComputeCapability.__members__ if m.startswith("SM")]
                raise NucleusExportError(f"unknown compute capability '{name}'.", f"use one of {choices}.") from None
    for wanted, flags in ((settings.strip_weights, ("STRIP_PLAN", "REFIT_IDENTICAL")), (settings.weight_streaming, ("WEIGHT_STREAMING",))):
        for flag in flags if wanted else ():
            if not hasattr(trt.BuilderFlag, flag):
                raise NucleusExportError(f"{backend.name} {backend.version} has no BuilderFlag.{flag}.", "upgrade it, or drop the option.")
            config.set_flag(getattr(trt.BuilderFlag, flag))
    cache = None
    if backend.uses_timing_cache and settings.timing_cache is not None:
        blob = settings.timing_cache.read_bytes() if settings.timing_cache.is_file() else b""
        cache = config.create_timing_cache(blob)
        config.set_timing_cache(cache, ignore_mismatch=False)
    return config, cache


@dataclasses.dataclass
class EngineFromOnnx:
    """Loader: parse, configure, build and atomically write one engine; returns its BuildReport.

    Args:
        network: a NetworkFromOnnxPath (or any callable returning a ParsedNetwork).
        settings: BuildSettings.
        engine_path: where the plan goes.
        graph: graph name for reports ("text_kv" / "denoiser").
        progress: callable(event, phase, step, total) for IProgressMonitor events, or None.
        inspect: optional callback receiving the NetworkReport before building (e.g. to check Q/DQ placement).
    """

    network: Callable[[], ParsedNetwork]
    settings: BuildSettings
    engine_path: Path
    graph: str = ""
    progress: Callable[[str, str, int, int], None] | None = None
    inspect: Callable[[NetworkReport], None] | None = None

    def __call__(self) -> BuildReport:
        parsed = self.network()
        backend = parsed.backend
        report = inspect_network(parsed.network)
        if self.inspect is not None:
            self.inspect(report)
        config, cache = _make_config(parsed, self.settings)
        if self.progress is not None and hasattr(config, "progress_monitor"):
            config.progress_monitor = make_progress_monitor(backend, self.progress)
        parse_seconds = parsed.parse_seconds
        start = time.perf_counter()
        engine_bytes = _build_to_file(parsed, config, self.engine_path)
        seconds = time.perf_counter() - start
        if engine_bytes is None:
            raise NucleusExportError(
                f"{backend.name} failed to build {self.graph or self.engine_path.name} (see the TensorRT errors above).",
                "rerun with --verbose; check the profile ranges and, for full TensorRT, free GPU memory.",
            )
        cache_info: dict[str, Any] = {"used": False, "reason": f"{backend.name} does no tactic timing"}
        if cache is not None and self.settings.timing_cache is not None:
            existed = self.settings.timing_cache.is_file()
            write_atomic(self.settings.timing_cache, memoryview(config.get_timing_cache().serialize()))
            cache_info = {"used": True, "path": str(self.settings.timing_cache), "reused": existed}
        # The network holds the parsed weights: release it (and the builder) before the caller builds the next one.
        del config, cache, parsed
        return BuildReport(
            graph=self.graph,
            backend=backend.name,
            backend_version=backend.version,
            onnx=Path(getattr(self.network, "path", "")).name,
            engine=str(self.engine_path),
            engine_bytes=engine_bytes,
            parse_seconds=round(parse_seconds, 3),
            build_seconds=round(seconds, 3),
            profile={k: [list(s) for s in v] for k, v in self.settings.shapes.items()},
            timing_cache=cache_info,
            network=report,
            compute_capabilities=self.settings.compute_capabilities,
        )


def _build_to_file(parsed: ParsedNetwork, config: Any, path: Path) -> int | None:
    """Build and write the plan atomically; returns its size, or None when the build failed.

    With build_serialized_network_to_stream (TensorRT >= 10.x, TensorRT-RTX 1.7) the plan goes to disk as the
    builder produces it, so the serialized engine is never held in host memory next to the builder's own copy of
    the weights; older versions fall back to one in-memory buffer."""
    builder, trt = parsed.builder, parsed.backend.trt
    if not hasattr(builder, "build_serialized_network_to_stream"):
        serialized = builder.build_serialized_network(parsed.network, config)
        if serialized is None:
            return None
        write_atomic(path, memoryview(serialized))
        return serialized.nbytes

    class _FileWriter(trt.IStreamWriter):  # type: ignore[misc, name-defined]
        def __init__(self, f: Any) -> None:
            trt.IStreamWriter.__init__(self)
            self.f, self.written = f, 0

        def write(self, data: Any) -> int:
            n = self.f.write(data)
            self.written += n
            return n

    try:
        with atomic_file(path) as tmp, open(tmp, "wb") as f:
            writer = _FileWriter(f)
            if not builder.build_serialized_network_to_stream(parsed.network, config, writer):
                raise _BuildFailed  # inside the block: atomic_file removes the partial plan instead of renaming it
            f.flush()
            os.fsync(f.fileno())
    except _BuildFailed:
        return None
    return writer.written


class _BuildFailed(Exception):
    """The builder returned False: TensorRT has logged why."""


def write_build_log(path: Path, reports: Sequence[BuildReport], extra: dict[str, Any] | None = None) -> None:
    payload = {"engines": {r.graph: r.to_dict() for r in reports}, **(extra or {})}
    write_atomic(path, json.dumps(payload, indent=2, sort_keys=True))
