"""Check the engines themselves: the bundle's plans through the runtime's TensorRT backend on a GPU, against diffusers
on the same GPU (float32 truth, bf16 baseline), and a Polygraphy comparison of one engine against ONNX Runtime.

UNVERIFIED without a GPU: everything here needs a CUDA GPU with TensorRT or TensorRT-RTX installed; on machines
without one it is tested with stand-ins for the backend and the runners (tests/test_quality_streamed.py), which
exercise the control flow, not TensorRT.

What the engine report holds (the same ParityReport as `check`): per case the end-to-end error of the sample and the
text K/V against diffusers float32, next to diffusers bf16 on the same cases, and the default gate (no worse than
diffusers bf16 by BASELINE_MARGIN). A denoiser cut into segments is also compared per segment: each segment's output
with the engines run in sequence up to it, and with it run alone on float32's residual stream entering it, so an
error is placed in the segment that makes it. A plan exposes only its contract and boundary outputs, so routing
agreement and the error with routing forced are measured on the graph the engine was built from (`check` without
--backend), not on the plan.
"""

from __future__ import annotations

import dataclasses
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import ml_dtypes
import numpy as np
from nucleus_runtime.bundle import load_manifest
from nucleus_runtime.contract import DENOISER_GRAPH as DENOISER
from nucleus_runtime.contract import SAMPLE, TENSORRT_RTX, block_output, onnx_file, plan_file
from nucleus_runtime.contract import TEXT_KV as TEXT_KV_TENSOR

from nucleus_export.errors import NucleusExportError
from nucleus_export.log import track
from nucleus_export.model.checkpoint import Checkpoint
from nucleus_export.parity.cases import ParityCase, batch_by_resolution, make_cases
from nucleus_export.parity.check import ParityReport, Tolerance
from nucleus_export.parity.compare import (
    BASELINE_LABEL,
    GRAPH_LABEL,
    CaseResult,
    Comparison,
    SegmentComparison,
    case_image_scores,
)
from nucleus_export.parity.quality import image_decoder
from nucleus_export.parity.streamed import _Accumulated, _prologue, _text_kv_of_block

if TYPE_CHECKING:
    from nucleus_runtime.backends.base import Backend, TensorHandle
    from nucleus_runtime.bundle import SegmentRecord

    from nucleus_export.model.reference import BlockInputs

ENGINE_NOTE = (
    "engines via the runtime's {backend} backend vs diffusers float32 on {device}; routing and the forced error are "
    "measured on the engine's ONNX graph (`check` without --backend), not observable from plans"
)


def open_engine_backend(bundle_dir: Path, backend: str) -> Backend:
    """The bundle's plans in the runtime's TensorRT or TensorRT-RTX backend, with a one-line error where it cannot
    run (no library, no GPU, no engines of that flavor)."""
    from nucleus_runtime.backends.registry import backend_class, open_backend

    manifest = load_manifest(bundle_dir)
    cls = backend_class(backend)
    if not cls.serves(Path(bundle_dir), manifest):
        raise NucleusExportError(f"bundle {bundle_dir} holds no {backend} engines.",
                                 f"build it with `nucleus-export build --backend {backend}`, or check its ONNX graphs without --backend.")
    if not cls.available():
        raise NucleusExportError(f"the {backend} backend cannot run here (its library or a CUDA GPU is missing).",
                                 f"run `check --backend {backend}` on a machine with an NVIDIA GPU and "
                                 f"`pip install 'nucleus-export[{backend}]'`.")
    return open_backend(bundle_dir, backend, manifest)


def check_engines(
    checkpoint: Checkpoint,
    bundle_dir: Path,
    backend: Backend,
    tolerance: Tolerance,
    label: str,
    cases: list[ParityCase] | None = None,
    case_set: str = "quick",
    max_rows: int | None = 1,
    device: str | None = None,
    images: bool = True,
) -> ParityReport:
    """The engines (an opened backend) against diffusers float32 and bf16 (block by block, on `device`: the GPU
    by default where PyTorch sees one) on the parity cases; a denoiser cut into segments is also compared segment by
    segment (parity.compare.SegmentComparison).

    Args:
        backend: an opened runtime backend (open_engine_backend), any backend with compute_text_kv/denoise (and
            run_denoiser_unit, for a segmented denoiser).
        tolerance: pass criteria (quality.tolerance_for).
        label: the report's graph precision label.
        images: also score each case's decoded x0 estimate (PSNR, SSIM; parity.images) with the pipeline's VAE on
            the reference's device, where the model's pipeline has one.
    """
    import torch

    from nucleus_export.model.reference import BlockwiseReference

    bundle_dir = Path(bundle_dir)
    manifest = load_manifest(bundle_dir)
    config = checkpoint.config
    if manifest.config_hash != config.config_hash():
        raise NucleusExportError(f"bundle {bundle_dir} was exported from another model.", "pass the --model the bundle was exported from.")
    truth = BlockwiseReference(checkpoint, device=device)
    low = BlockwiseReference(checkpoint, dtype=torch.bfloat16, device=device)
    batches = batch_by_resolution(cases or make_cases(config, manifest.profiles, case_set=case_set), max_rows)
    units = manifest.unit_records(DENOISER)
    # The engines end to end on every batch first (the GPU then holds only the reference's one block at a time).
    engine_out, traces = [], []
    for case, rows in track(batches, f"engines ({backend.name})"):
        kv_inputs = case.text_kv_inputs(config)
        handle = backend.compute_text_kv(*kv_inputs.values())
        inputs = case.denoiser_inputs(config, np.zeros(0, np.float32))
        sample = backend.denoise(inputs["hidden_states"], inputs["timestep"], inputs["img_rope_cos"], inputs["img_rope_sin"],
                                 handle, inputs["encoder_hidden_states_mask"])
        engine_out.append((np.asarray(handle.to_numpy(), np.float32), np.asarray(sample, np.float32)))
        if len(units) > 1:
            traces.append(_SegmentTrace(backend, units, {n: v for n, v in inputs.items() if n != TEXT_KV_TENSOR}, handle, rows))
        del handle
    starts = {unit.blocks[0]: k for k, unit in enumerate(units)} if traces else {}
    ends = {unit.blocks[1] - 1: k for k, unit in enumerate(units[:-1])} if traces else {}
    states = [(_prologue(truth, case), _prologue(low, case), [_Accumulated() for _ in rows]) for case, rows in batches]
    for idx in track(range(config.num_layers), "diffusers float32 and bf16, block by block"):
        if idx in starts:
            for trace, state in zip(traces, states):
                trace.start(starts[idx], _stream(state[0]) if idx else None)
        for ref, which in ((truth, 0), (low, 1)):
            ref.load_block(idx)
            try:
                for b, (case, rows) in enumerate(batches):
                    state = states[b][which]
                    if which == 0:
                        expected = _text_kv_of_block(ref, idx, state, config)
                        for c, (_case, r) in enumerate(rows):
                            states[b][2][c].add(engine_out[b][0][idx][:, r], expected[:, r])
                    new = ref.run_block(idx, state)
                    states[b] = (new, states[b][1], states[b][2]) if which == 0 else (states[b][0], new, states[b][2])
            finally:
                ref.release_block(idx)
        if idx in ends:
            for trace, state in zip(traces, states):
                trace.finish(ends[idx], _stream(state[0]))
    open_decoder, images_note = image_decoder(checkpoint, str(truth.device)) if images else (None, "image scores skipped")
    decode = open_decoder() if open_decoder is not None else None
    results = []
    for b, (case, rows) in enumerate(batches):
        sample = truth.epilogue(states[b][0]).float().cpu().numpy()
        base = low.epilogue(states[b][1]).float().cpu().numpy()
        if traces:
            traces[b].finish(len(units) - 1, sample)
        images = None if decode is None else case_image_scores(
            decode, case, [r for _m, r in rows], sample, {GRAPH_LABEL: engine_out[b][1], BASELINE_LABEL: base})
        for c, (member, r) in enumerate(rows):
            end_to_end = Comparison.of(engine_out[b][1][r], sample[r])
            results.append(CaseResult(member.name, states[b][2][c].comparison(), end_to_end, end_to_end, {},
                                      Comparison.of(base[r], sample[r]), {}, None if images is None else images[c],
                                      traces[b].results[c] if traces else None))
    note = ENGINE_NOTE.format(backend=backend.name, device=truth.device)
    return ParityReport(label, tolerance, results, f"{note}; {images_note}")


def _stream(state: BlockInputs) -> np.ndarray:
    """The reference's residual stream between blocks, as the graph's block outputs carry it."""
    return state.hidden_states.float().cpu().numpy()


class _SegmentTrace:
    """One batch's denoiser segments against the float32 reference, advanced as the reference reaches each segment:
    the units chained on the host (each fed what the ones before returned: what `denoise` computes) and each unit
    run alone on the reference's residual stream entering it."""

    def __init__(self, backend: Backend, units: list[SegmentRecord], inputs: dict[str, np.ndarray], text_kv: TensorHandle,
                 rows: list[tuple[ParityCase, slice]]):
        self.backend, self.units, self.values, self.text_kv, self.rows = backend, units, inputs, text_kv, rows
        # What the units after each one read: the rest of the chain's values is dropped as it goes.
        self.later = [set().union(*(u.inputs for u in units[k + 1:])) for k in range(len(units))]
        self.pending: tuple[np.ndarray, np.ndarray] | None = None
        self.results: list[list[SegmentComparison]] = [[] for _ in rows]

    def start(self, k: int, stream: np.ndarray | None) -> None:
        """Run unit k in sequence and alone (`stream`: the reference's residual stream entering it; None for the
        first unit, whose inputs are the case's own)."""
        unit = self.units[k]
        feeds = {n: self.values[n] for n in unit.inputs if n != TEXT_KV_TENSOR}
        chained = self.backend.run_denoiser_unit(k, feeds, self.text_kv)
        alone = chained
        if stream is not None:
            name = block_output(unit.blocks[0] - 1)
            alone = self.backend.run_denoiser_unit(k, {**feeds, name: _in_form_of(stream, feeds[name])}, self.text_kv)
        output = _unit_output(unit, k == len(self.units) - 1)
        self.pending = (_as_float32(chained[output]), _as_float32(alone[output]))
        self.values.update(chained)
        self.values = {n: v for n, v in self.values.items() if n in self.later[k]}

    def finish(self, k: int, expected: np.ndarray) -> None:
        """Compare unit k's pending outputs with the reference's at its end (the stream after its last block, or the
        sample)."""
        assert self.pending is not None, "finish() follows start() of the same unit"
        chained, alone = self.pending
        unit = self.units[k]
        for c, (_case, r) in enumerate(self.rows):
            self.results[c].append(SegmentComparison(unit.name, tuple(unit.blocks), Comparison.of(chained[r], expected[r]),
                                                     Comparison.of(alone[r], expected[r])))
        self.pending = None


def _unit_output(unit: SegmentRecord, last: bool) -> str:
    name = SAMPLE if last else block_output(unit.blocks[1] - 1)
    if name not in unit.outputs:
        raise NucleusExportError(f"segment {unit.name} of the bundle does not output {name}.",
                                 "export the bundle again with this version of nucleus-export.")
    return name


def _as_float32(array: np.ndarray) -> np.ndarray:
    """A unit's output as float32: bfloat16 comes back from a plan as its raw 16 bits (Backend.run_denoiser_unit)."""
    if array.dtype == np.uint16:
        return array.view(ml_dtypes.bfloat16).astype(np.float32)
    return array.astype(np.float32, copy=False)


def _in_form_of(values: np.ndarray, like: np.ndarray) -> np.ndarray:
    """float32 `values` in the form the unit takes `like` in (bfloat16 as raw bits, rounded to nearest even)."""
    if like.dtype == np.uint16:
        return np.ascontiguousarray(values, ml_dtypes.bfloat16).view(np.uint16)
    return np.ascontiguousarray(values, like.dtype)


# ---- Polygraphy: one engine against ONNX Runtime on the same inputs -------------------------------------------------


@dataclasses.dataclass
class PolygraphyComparison:
    """What Polygraphy's Comparator found for one engine unit against ONNX Runtime."""

    unit: str
    passed: bool
    atol: float
    rtol: float
    outputs: dict[str, dict[str, float]]  # output -> max abs / relative error

    def summary_line(self) -> str:
        parts = ", ".join(f"{k}: max abs {v['max_abs_error']:.3e}, rel {v['relative_error']:.3e}" for k, v in self.outputs.items())
        return f"polygraphy {self.unit}: {'PASS' if self.passed else 'FAIL'} (atol {self.atol:g}, rtol {self.rtol:g}; {parts})"


def _polygraphy(flavor: str) -> Any:
    if flavor == TENSORRT_RTX:
        os.environ.setdefault("POLYGRAPHY_USE_TENSORRT_RTX", "1")  # Polygraphy drives tensorrt-rtx through this
    try:
        import polygraphy  # noqa: F401
        from polygraphy import comparator
    except ImportError:
        raise NucleusExportError("Polygraphy is not installed.", "pip install 'nucleus-export[check]'") from None
    return comparator


def cpu_runnable_onnx(bundle_dir: Path, unit: str, lowering, num_experts: int, directory: Path) -> Path:
    """The engine's graph in the form ONNX Runtime's CPU provider runs (bf16 emulated, weights left in the bundle's
    files), saved into `directory` inside the bundle so its relative external data resolves."""
    import onnx
    from nucleus_runtime.bundle import LoweringRecord
    from nucleus_runtime.contract import MOE_PLUGIN

    from nucleus_export.rewrites.as_built import engine_graph

    model = onnx.load(str(Path(bundle_dir) / onnx_file(unit)), load_external_data=False)
    path = Path(directory) / onnx_file(unit)
    onnx.save_model(engine_graph(model, lowering or LoweringRecord(MOE_PLUGIN), num_experts, runnable_on_cpu=True,
                                 keep_weights=True), str(path))
    return path


def polygraphy_compare(
    bundle_dir: Path,
    unit: str,
    flavor: str,
    inputs: dict[str, np.ndarray],
    atol: float = 1e-2,
    rtol: float = 5e-2,
    runners: Callable[[Path], list[Any]] | None = None,
) -> PolygraphyComparison:
    """Run one engine unit (e.g. text_kv) in TensorRT and its graph in ONNX Runtime with Polygraphy's Comparator on
    the same inputs, and compare every output (`polygraphy run --trt --onnxrt` as an API).

    Args:
        unit: the engine unit (text_kv, denoiser or a segment such as denoiser.seg0).
        flavor: tensorrt or tensorrt-rtx (POLYGRAPHY_USE_TENSORRT_RTX for the latter).
        inputs: the unit's inputs by name.
        runners: (CPU-runnable ONNX path) -> the runners to compare; default: [TrtRunner(the plan),
            OnnxrtRunner(the ONNX)]. Tests pass CPU runners here.
    """
    comparator = _polygraphy(flavor)
    bundle_dir = Path(bundle_dir)
    manifest = load_manifest(bundle_dir)
    engine = manifest.engine(unit)
    lowering = getattr(engine, "lowering", None)
    with tempfile.TemporaryDirectory(prefix=".polygraphy-", dir=bundle_dir) as tmp:
        onnx_path = cpu_runnable_onnx(bundle_dir, unit, lowering, manifest.model_config["num_experts"], Path(tmp))
        if runners is None:
            from polygraphy.backend.common import BytesFromPath
            from polygraphy.backend.onnxrt import OnnxrtRunner, SessionFromOnnx
            from polygraphy.backend.trt import EngineFromBytes, TrtRunner

            chosen = [TrtRunner(EngineFromBytes(BytesFromPath(str(bundle_dir / plan_file(unit))))),
                      OnnxrtRunner(SessionFromOnnx(str(onnx_path), providers=["CPUExecutionProvider"]))]
        else:
            chosen = runners(onnx_path)
        results = comparator.Comparator.run(chosen, data_loader=[inputs])
        simple = getattr(comparator, "SimpleCompareFunc", None)
        compare = simple(atol=atol, rtol=rtol) if simple is not None else comparator.CompareFunc.simple(atol=atol, rtol=rtol)
        passed = bool(comparator.Comparator.compare_accuracy(results, compare_func=compare))
        first, second = results[0][1][0], results[1][1][0]  # (runner name, [iteration results]) per runner
        outputs = {}
        for name in first.keys():
            a, e = np.asarray(first[name], np.float64), np.asarray(second[name], np.float64)
            outputs[name] = {
                "max_abs_error": float(np.abs(a - e).max()) if a.size else 0.0,
                "relative_error": float(np.linalg.norm(a - e) / max(np.linalg.norm(e), 1e-30)),
            }
    return PolygraphyComparison(unit, passed, atol, rtol, outputs)


__all__ = ["PolygraphyComparison", "check_engines", "open_engine_backend", "polygraphy_compare"]
