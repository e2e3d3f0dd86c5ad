"""Loaders that build a TensorRT engine from an ONNX file: one code path for full TensorRT and TensorRT-RTX.

Why the TensorRT API directly and not Polygraphy's loaders: Polygraphy picks its TensorRT module once per process
from the POLYGRAPHY_USE_TENSORRT_RTX environment variable at import time, while `--backend` is a per-call choice and
the tests build with both settings in one process. The two modules expose the same builder API (Builder, OnnxParser,
IBuilderConfig, IOptimizationProfile, IProgressMonitor, plugin registry), so passing the module around as
`TensorRTFlavor.trt` gives one code path. The loaders below keep Polygraphy's shape: small callables composed lazily,
`EngineFromOnnx(NetworkFromOnnxPath(...), BuildSettings(...))`.

Facts this code relies on (TensorRT-RTX 1.7.1 on a CPU-only machine; see README-facts.md):
- `parse_from_file` resolves external data next to the ONNX file; `parse(bytes)` would not.
- TensorRT-RTX networks are always strongly typed; full TensorRT needs NetworkDefinitionCreationFlag.STRONGLY_TYPED
  to honour the ONNX dtypes (BF16 GEMMs, FP32 router/norms, FP8 via Q/DQ) instead of choosing precisions itself.
- Timing-cache calls are deprecated no-ops in TensorRT-RTX >= 1.2 (no tactic timing on the CPU); the cache is only
  written and reused for full TensorRT.
- Default TensorRT-RTX targets: compute capability 8.0, 8.6, 8.9, 12.0 (no 9.0: H100/H200 need full TensorRT).
"""

from __future__ import annotations

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

from nucleus_runtime.atomic import atomic_file, write_atomic

from nucleus_export.engines.flavors import TensorRTFlavor
from nucleus_export.engines.inspection import NetworkReport, dtype_name, inspect_network, type_name
from nucleus_export.engines.profiles import ShapeTriple
from nucleus_export.errors import NucleusExportError

logger = logging.getLogger("nucleus_export")


def make_progress_monitor(flavor: TensorRTFlavor, on_event: Callable[[str, str, int, int], None]) -> Any:
    """An IProgressMonitor of the flavor's module that reports (event, phase, step, total) to `on_event`.

    The builder calls it from its own threads; `on_event` must be thread-safe. Returning True keeps building.
    """
    base = flavor.trt.IProgressMonitor

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


# TensorRT warnings that the exported graphs trigger by design (int64 mask input, empty shape constants, a text
# encoder segment after the first reading input_ids only for its shape).
_BENIGN_WARNINGS = ("has Int64 binding", "Empty initializer", "is unused or used only at compile-time")


@functools.lru_cache(maxsize=None)
def make_logger(flavor: TensorRTFlavor) -> Any:
    """A TensorRT ILogger that forwards to the nucleus_export logger (known-benign warnings only with --verbose).

    One per flavor for the whole process: TensorRT registers the first logger it is given and ignores (with a
    warning, logged through the first one) any other, so a second build with a fresh logger object called back into
    a logger Python had already freed; measured as a deadlock when builds run one after another (segments)."""
    trt = flavor.trt

    class _Logger(trt.ILogger):  # type: ignore[misc, name-defined]
        def __init__(self) -> None:
            trt.ILogger.__init__(self)

        def log(self, severity: Any, msg: str) -> None:
            if severity in (trt.ILogger.INTERNAL_ERROR, trt.ILogger.ERROR):
                logger.error("[%s] %s", flavor.name, msg)
            elif severity == trt.ILogger.WARNING and not any(b in msg for b in _BENIGN_WARNINGS):
                logger.warning("[%s] %s", flavor.name, msg)
            else:
                logger.debug("[%s] %s", flavor.name, msg)

    return _Logger()


@dataclasses.dataclass
class ParsedNetwork:
    """A parsed network with the objects that must stay alive while it is used."""

    flavor: TensorRTFlavor
    builder: Any
    network: Any
    parser: Any
    parse_seconds: float


@dataclasses.dataclass
class NetworkFromOnnxPath:
    """Loader: parse an ONNX file (external data beside it) into a strongly typed network.

    Args:
        flavor: the resolved TensorRT flavor.
        path: ONNX file.
        plugin_override: set OnnxParserFlag.ENABLE_PLUGIN_OVERRIDE (a registered plugin takes a node that also has a
            function body). Harmless without plugins.
    """

    flavor: TensorRTFlavor
    path: Path
    plugin_override: bool = False

    def __call__(self) -> ParsedNetwork:
        trt = self.flavor.trt
        logger_ = make_logger(self.flavor)
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
                f"{self.flavor.name} could not parse {self.path}: " + " | ".join(e.splitlines()[0] for e in errors[:5]),
                _parse_fix(errors),
            )
        allow_float32_attention_decomposition(self.flavor, network)
        return ParsedNetwork(self.flavor, builder, network, parser, seconds)


def allow_float32_attention_decomposition(flavor: TensorRTFlavor, network: Any) -> int:
    """Mark float32 fused attentions decomposable; returns how many.

    TensorRT-RTX 1.7 has dedicated attention kernels for bf16/fp16 only: a float32 IAttention fails the build
    ("Attention operation was not supported by a dedicated kernel") unless it may be decomposed into MatMul/Softmax
    layers. Deployment engines (bf16, FP8) keep the fused kernel.
    """
    trt = flavor.trt
    if not hasattr(trt, "IAttentionInputLayer"):
        return 0
    marked = 0
    for i in range(network.num_layers):
        layer = network.get_layer(i)
        if type_name(layer.type) == "ATTENTION_INPUT" and dtype_name(layer.get_input(0).dtype) == "FLOAT":
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
        optimization_level: builder optimization level (None: the flavor's default, 3).
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
    flavor: str
    version: str
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
            f"{self.graph}: {self.flavor} {self.version}, {net.num_layers} layers, "
            f"{len(net.gemms)} GEMMs ({fp8} FP8), {net.num_quantize} Q / {net.num_dequantize} DQ, "
            f"engine {self.engine_bytes / 2**20:.1f} MiB, parse {self.parse_seconds:.1f} s, build {self.build_seconds:.1f} s",
            f"  precision per layer type: {precisions}",
        ]


def _make_config(parsed: ParsedNetwork, settings: BuildSettings) -> tuple[Any, Any]:
    """Builder config with one optimization profile and, for full TensorRT, the timing cache. Returns (config, cache)."""
    flavor, builder, network = parsed.flavor, parsed.builder, parsed.network
    trt = flavor.trt
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
            f"{flavor.name} rejected the optimization profile {settings.shapes}.", "check the profile ranges."
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
                raise NucleusExportError(f"{flavor.name} {flavor.version} has no BuilderFlag.{flag}.", "upgrade it, or drop the option.")
            config.set_flag(getattr(trt.BuilderFlag, flag))
    cache = None
    if flavor.uses_timing_cache and settings.timing_cache is not None:
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
        flavor = parsed.flavor
        report = inspect_network(parsed.network)
        if self.inspect is not None:
            self.inspect(report)
        config, cache = _make_config(parsed, self.settings)
        if self.progress is not None and hasattr(config, "progress_monitor"):
            config.progress_monitor = make_progress_monitor(flavor, self.progress)
        parse_seconds = parsed.parse_seconds
        start = time.perf_counter()
        engine_bytes = _build_to_file(parsed, config, self.engine_path)
        seconds = time.perf_counter() - start
        if engine_bytes is None:
            raise NucleusExportError(
                f"{flavor.name} failed to build {self.graph or self.engine_path.name} (see the TensorRT errors above).",
                "rerun with --verbose; check the profile ranges and, for full TensorRT, free GPU memory.",
            )
        cache_info: dict[str, Any] = {"used": False, "reason": f"{flavor.name} does no tactic timing"}
        if cache is not None and self.settings.timing_cache is not None:
            existed = self.settings.timing_cache.is_file()
            write_atomic(self.settings.timing_cache, memoryview(config.get_timing_cache().serialize()))
            cache_info = {"used": True, "path": str(self.settings.timing_cache), "reused": existed}
        # The network holds the parsed weights: release it (and the builder) before the caller builds the next one.
        del config, cache, parsed
        return BuildReport(
            graph=self.graph,
            flavor=flavor.name,
            version=flavor.version,
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
    builder, trt = parsed.builder, parsed.flavor.trt
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
