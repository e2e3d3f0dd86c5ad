"""Run a bundle's graphs in ONNX Runtime and diffusers' forward on the same inputs, and compare, routing-aware.

Three numbers per case (docs/commands.md, `check`):
- routing: per MoE block the share of the reference's (row, expert, token) selections the graph made, end to end,
  and the graph's own choice with the reference's routing forced upstream, every disagreement classified by its
  score margin (nucleus_export.parity.routing: a near-tie is a flip that float32 rounding of the gate logits alone
  can explain);
- the error with routing forced: the graph run with the reference's token selections (rewrites/forced_routing.py), which
  isolates everything but routing;
- the end-to-end error;
and, with an image decoder (a pipeline root's VAE), PSNR and SSIM of each case's decoded x0 estimate (parity.images).
fp32 bundles pass when the forced error is float32 noise, every flip is a near-tie and the end-to-end error is
within tolerance wherever routing agreed. Low-precision graphs (the build's quality report) are held, in the same
report, against diffusers itself run in bf16 on the same cases (`baseline`).

All cases of one resolution run as one batch (parity.cases.batch_by_resolution), in one ONNX Runtime session per
graph variant, and the float32 reference forward of a batch is shared by every comparison made against it.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import onnx
from nucleus_runtime.atomic import write_atomic
from nucleus_runtime.bundle import load_manifest
from nucleus_runtime.contract import DENOISER_GRAPH as DENOISER
from nucleus_runtime.contract import PARITY_NAME, SAMPLE, onnx_file
from nucleus_runtime.contract import TEXT_KV_GRAPH as TEXT_KV

from nucleus_export.graph.external_data import load_model
from nucleus_export.model.checkpoint import Checkpoint
from nucleus_export.model.config import ModelConfig
from nucleus_export.parity.cases import ParityCase, batch_by_resolution, make_cases
from nucleus_export.parity.compare import BASELINE_LABEL, GRAPH_LABEL, CaseResult, Comparison, ImageScore
from nucleus_export.parity.sessions import cpu_session
from nucleus_export.rewrites.forced_routing import RoutingNames, with_forced_routing, with_router_outputs

if TYPE_CHECKING:
    import torch

    from nucleus_export.parity.images import ImageDecoder
    from nucleus_export.parity.streamed import SegmentGraphs, TruthCache


@dataclasses.dataclass(frozen=True)
class Tolerance:
    """Pass criteria; defaults are the fp32 targets.

    Attributes:
        max_relative_error: end-to-end relative error of every case, or with near_ties_only of every case whose
            routing agreed with the reference (None: not held; low-precision graphs are held to the baseline).
        max_forced_relative_error: relative error with the reference's routing forced (every case), and of text K/V
            (None: reported only).
        min_cosine: end-to-end cosine of every case.
        min_routing_agreement: end-to-end routing agreement of every case and block.
        near_ties_only: fail on a forced-run flip that rounding cannot explain.
        baseline_margin: when set, hold the pooled end-to-end error, 1 - cosine and 1 - routing agreement to at most
            (1 + margin) x those of diffusers run in bf16 on the same cases (the build's default gate).
    """

    max_relative_error: float | None = 1e-4
    max_forced_relative_error: float | None = 1e-5
    min_cosine: float = 0.0
    min_routing_agreement: float = 0.0
    near_ties_only: bool = True
    baseline_margin: float | None = None


def _pooled_agreement(per_case: list[dict[str, float]]) -> float:
    values = [v for layers in per_case for v in layers.values()]
    return float(np.mean(values)) if values else 1.0


@dataclasses.dataclass
class ParityReport:
    """What `check` and the build's quality report write to parity.json."""

    graph_precision: str
    tolerance: Tolerance
    cases: list[CaseResult]
    note: str = ""

    @property
    def worst(self) -> dict[str, float]:
        routing = [r for c in self.cases for r in c.routing.values()]
        return {
            "sample_relative_error": max(c.sample.relative_error for c in self.cases),
            "sample_max_abs_error": max(c.sample.max_abs_error for c in self.cases),
            "sample_cosine": min(c.sample.cosine for c in self.cases),
            "forced_relative_error": max(c.forced.relative_error for c in self.cases),
            "agreed_cases_relative_error": max(
                (c.sample.relative_error for c in self.cases if c.routing_agreed), default=0.0
            ),
            "text_kv_relative_error": max(c.text_kv.relative_error for c in self.cases),
            "routing_agreement": min((r.agreement for r in routing), default=1.0),
            "forced_routing_agreement": min((r.forced_agreement for r in routing), default=1.0),
        }

    @property
    def flips(self) -> dict[str, float]:
        routing = [r for c in self.cases for r in c.routing.values()]
        return {
            "flips": sum(r.flips for r in routing),
            "near_ties": sum(r.near_ties for r in routing),
            "decided_flips": sum(r.decided_flips for r in routing),
            "max_flip_margin": max((r.max_flip_margin for r in routing), default=0.0),
            "max_margin_ratio": max((r.max_margin_ratio for r in routing), default=0.0),
        }

    @property
    def pooled(self) -> dict[str, dict[str, float]]:
        """Over all cases: the graph, and diffusers bf16 where measured, against float32 truth."""
        out = {
            GRAPH_LABEL: {
                **Comparison.pooled([c.sample for c in self.cases]),
                "routing_agreement": _pooled_agreement(
                    [{k: r.agreement for k, r in c.routing.items()} for c in self.cases]
                ),
            }
        }
        if all(c.baseline is not None for c in self.cases) and self.cases:
            out[BASELINE_LABEL] = {
                **Comparison.pooled([c.baseline for c in self.cases]),
                "routing_agreement": _pooled_agreement([c.baseline_routing or {} for c in self.cases]),
            }
        return out

    @property
    def images(self) -> dict[str, dict[str, float | None]]:
        """PSNR and SSIM of each side's decoded images against float32's, over all cases (empty: not decoded)."""
        if not self.cases or any(c.images is None for c in self.cases):
            return {}
        labels = self.cases[0].images or {}
        return {label: ImageScore.pooled([c.images[label] for c in self.cases if c.images]) for label in labels}

    @property
    def segments(self) -> list[dict]:
        """Per engine segment, over all cases: its output in sequence and alone against float32 (empty: not
        measured, e.g. a graph report or a denoiser in one engine)."""
        if not self.cases or any(c.segments is None for c in self.cases):
            return []
        pooled = []
        for k, seg in enumerate(self.cases[0].segments or []):
            parts = [c.segments[k] for c in self.cases if c.segments]
            pooled.append({"name": seg.name, "blocks": list(seg.blocks),
                           "in_sequence": Comparison.pooled([p.in_sequence for p in parts]),
                           "alone": Comparison.pooled([p.alone for p in parts])})
        return pooled

    @property
    def routing_by_layer(self) -> dict[str, float]:
        layers = sorted({k for c in self.cases for k in c.routing}, key=lambda k: int(k))
        return {k: float(np.mean([c.routing[k].agreement for c in self.cases])) for k in layers}

    def failures(self) -> list[str]:
        """Why the report fails; empty when it passes."""
        t, w, f = self.tolerance, self.worst, self.flips
        out = []
        if t.max_forced_relative_error is not None:
            if w["forced_relative_error"] > t.max_forced_relative_error:
                out.append(f"error with routing forced {w['forced_relative_error']:.3e} > {t.max_forced_relative_error:g}")
            if w["text_kv_relative_error"] > t.max_forced_relative_error:
                out.append(f"text_kv error {w['text_kv_relative_error']:.3e} > {t.max_forced_relative_error:g}")
        if t.max_relative_error is not None:
            # Under the near-tie rule a case with a (near-tie) flip is judged by its forced error instead.
            scope, worst = (
                ("where routing agreed", w["agreed_cases_relative_error"])
                if t.near_ties_only
                else ("", w["sample_relative_error"])
            )
            if worst > t.max_relative_error:
                out.append(f"end-to-end error {worst:.3e} > {t.max_relative_error:g} {scope}".rstrip())
        if w["sample_cosine"] < t.min_cosine:
            out.append(f"cosine {w['sample_cosine']:.6f} < {t.min_cosine}")
        if w["routing_agreement"] < t.min_routing_agreement:
            out.append(f"routing agreement {w['routing_agreement']:.4f} < {t.min_routing_agreement}")
        if t.near_ties_only and f["decided_flips"]:
            out.append(f"{f['decided_flips']} routing flips beyond rounding (largest margin/bound {f['max_margin_ratio']:.3g})")
        if t.baseline_margin is not None:
            pooled = self.pooled
            if BASELINE_LABEL not in pooled:
                out.append("no diffusers bf16 baseline to compare with")
            else:
                g, b, k = pooled[GRAPH_LABEL], pooled[BASELINE_LABEL], 1 + t.baseline_margin
                for name, gv, bv in (
                    ("relative error", g["relative_error"], b["relative_error"]),
                    ("1 - cosine", 1 - g["cosine"], 1 - b["cosine"]),
                    ("1 - routing agreement", 1 - g["routing_agreement"], 1 - b["routing_agreement"]),
                ):
                    if gv > k * bv:
                        out.append(f"{name} {gv:.3e} > {k:g} x {BASELINE_LABEL}'s {bv:.3e}")
        return out

    @property
    def passed(self) -> bool:
        return not self.failures()

    def to_json(self) -> str:
        payload = {
            "graph_precision": self.graph_precision,
            "passed": self.passed,
            "failures": self.failures(),
            "tolerance": dataclasses.asdict(self.tolerance),
            "worst": self.worst,
            "routing_flips": self.flips,
            "pooled": self.pooled,
            "images": self.images,
            "segments": self.segments,
            "routing_agreement_by_layer": self.routing_by_layer,
            "note": self.note,
            "cases": [dataclasses.asdict(c) for c in self.cases],
        }
        return json.dumps(payload, indent=2)

    def summary_lines(self) -> list[str]:
        w, f = self.worst, self.flips
        measured_routing = any(c.routing for c in self.cases)
        forced = f"routing forced {w['forced_relative_error']:.3e}, " if measured_routing else ""
        errors = (
            f"{self.graph_precision}: {len(self.cases)} cases, worst end-to-end rel err {w['sample_relative_error']:.3e} "
            f"(max abs {w['sample_max_abs_error']:.3e}, cosine {w['sample_cosine']:.6f}), {forced}"
            f"text_kv {w['text_kv_relative_error']:.3e}"
        )
        if measured_routing:
            routing = (
                f"routing: min agreement {100 * w['routing_agreement']:.2f}% end to end, "
                f"{100 * w['forced_routing_agreement']:.2f}% with upstream routing forced; {f['flips']} flips, "
                f"{f['near_ties']} near-ties (largest flip margin {f['max_flip_margin']:.3e}, {f['max_margin_ratio']:.3g} x bound)"
            )
        else:  # a model without MoE blocks, or engines: a plan keeps its routing inside
            routing = "routing: not measured (no MoE block, or engines, whose routing stays inside the plans)"
        lines = [errors, routing]
        for label, p in self.pooled.items():
            agreement = f", routing agreement {100 * p['routing_agreement']:.2f}%" if measured_routing else ""
            lines.append(f"vs float32, all cases: {label}: rel err {p['relative_error']:.3e}, cosine {p['cosine']:.6f}{agreement}")
        if self.images:
            lines.append(
                "decoded x0 estimates vs float32's, all cases: "
                + "; ".join(f"{label}: {_image_line(score)}" for label, score in self.images.items())
            )
        segments = self.segments
        if segments:
            lines.append(
                "per segment vs float32, rel err in sequence / alone on float32's input: "
                + "; ".join(f"{s['name']} (blocks {s['blocks'][0]}..{s['blocks'][1] - 1}) "
                            f"{s['in_sequence']['relative_error']:.3e} / {s['alone']['relative_error']:.3e}"
                            for s in segments)
            )
        if self.routing_by_layer:
            lines.append(
                "routing agreement per MoE layer: "
                + ", ".join(f"{k}: {100 * v:.2f}%" for k, v in self.routing_by_layer.items())
            )
        failures = self.failures()
        lines.append("PASS" if not failures else "FAIL: " + "; ".join(failures))
        return lines


def _image_line(score: dict[str, float | None]) -> str:
    psnr = "identical" if score["psnr"] is None else f"PSNR {score['psnr']:.2f} dB"
    return f"{psnr}, SSIM {score['ssim']:.5f}"


# ---- ONNX Runtime side ---------------------------------------------------------------------------------------------


@dataclasses.dataclass
class GraphVariants:
    """The graphs parity runs: text_kv, the denoiser end to end (selections exposed), the denoiser with routing
    forced. Models are loaded with their weights, or are paths of runnable files."""

    directory: Path
    text_kv: onnx.ModelProto | Path
    free: onnx.ModelProto
    free_routing: list[str]
    forced: onnx.ModelProto
    forced_routing: RoutingNames


def variants_of(text_kv: Path, denoiser: onnx.ModelProto, rewrite=lambda m: m) -> GraphVariants:
    """Both denoiser variants of an exported denoiser graph; `rewrite` (e.g. MoE lowering plus bf16 emulation) is
    applied after the parity rewrites, so it runs on exactly the graph it would otherwise get."""
    free, names = with_router_outputs(denoiser)
    forced, forced_names = with_forced_routing(denoiser)
    return GraphVariants(Path(text_kv).parent, text_kv, rewrite(free), names, rewrite(forced), forced_names)


class OnnxGraphs:
    """One ORT session per graph variant, reused for every batch."""

    def __init__(self, variants: GraphVariants, threads: int | None = None):
        self.variants = variants
        self.text_kv = cpu_session(variants.text_kv, variants.directory, threads)
        self.free = cpu_session(variants.free, variants.directory, threads)
        self.forced = cpu_session(variants.forced, variants.directory, threads)

    def run(self, case: ParityCase, config: ModelConfig, reference_routing: list[np.ndarray]) -> GraphOutput:
        (text_kv,) = self.text_kv.run(None, case.text_kv_inputs(config))
        inputs = case.denoiser_inputs(config, text_kv)
        free = self.free.run([SAMPLE, *self.variants.free_routing], inputs)
        names = self.variants.forced_routing
        forced_inputs = dict(zip(names.forced_inputs, reference_routing))
        forced = self.forced.run([SAMPLE, *names.selections, *names.gate_inputs], {**inputs, **forced_inputs})
        layers = len(names.selections)
        return GraphOutput(text_kv, free[0], free[1:], forced[0], forced[1 : 1 + layers], forced[1 + layers :])


@dataclasses.dataclass
class GraphOutput:
    """One batch through the graphs: end to end, and with the reference's routing forced."""

    text_kv: np.ndarray
    sample: np.ndarray
    selections: list[np.ndarray]  # per MoE block [B, E, C]
    forced_sample: np.ndarray
    own_selections: list[np.ndarray]  # the graph's own choice per block in the forced run
    gate_inputs: list[np.ndarray]  # the router input features per block in the forced run


# ---- PyTorch side --------------------------------------------------------------------------------------------------
# diffusers' forward runs block by block (model.reference.BlockwiseReference, the router captured per block by
# parity.streamed): streamed from the checkpoint, or a whole model already in memory.


def bf16_copy(model: torch.nn.Module) -> torch.nn.Module:
    """diffusers' model in bfloat16 (the low-precision baseline: what serving diffusers itself in bf16 gives)."""
    import copy

    import torch
    from diffusers.utils import logging as diffusers_logging

    # diffusers warns on .to(dtype) about modules to keep in float32; this model lists none.
    verbosity = diffusers_logging.get_verbosity()
    diffusers_logging.set_verbosity_error()
    try:
        return copy.deepcopy(model).to(torch.bfloat16)
    finally:
        diffusers_logging.set_verbosity(verbosity)


def whole_graph_segment(variants: GraphVariants, config: ModelConfig) -> SegmentGraphs:
    """Whole-graph variants as the one segment of the segment-by-segment loop."""
    from nucleus_export.parity.streamed import SegmentGraphs
    from nucleus_export.rewrites.segments import Segment

    inputs = [i.name for i in variants.free.graph.input]
    segment = Segment(0, DENOISER, (0, config.num_layers), inputs, [SAMPLE])
    return SegmentGraphs(segment, variants.free, variants.free_routing, variants.forced, variants.forced_routing,
                         list(config.moe_layers), sliced_text_kv=False)


def check_parity(
    checkpoint: Checkpoint,
    bundle_dir: Path,
    tolerance: Tolerance = Tolerance(),
    variants: GraphVariants | None = None,
    graph_precision: str | None = None,
    reference: torch.nn.Module | None = None,
    cases: list[ParityCase] | None = None,
    case_set: str = "full",
    note: str = "",
    baseline: bool = False,
    threads: int | None = None,
    truth: TruthCache | None = None,
    segments: list[SegmentGraphs] | None = None,
    text_kv: onnx.ModelProto | Path | None = None,
    max_rows: int | None = None,
    open_decoder: Callable[[], ImageDecoder] | None = None,
) -> ParityReport:
    """Compare a bundle's graphs (or the given variants, e.g. lowered and emulated) with diffusers' forward.

    Args:
        checkpoint: the model the bundle was exported from (its config hash must match the manifest).
        bundle_dir: bundle folder (profiles and default graph paths).
        tolerance: pass criteria.
        variants: whole-graph variants to check instead of the bundle's own (as exported).
        graph_precision: label for the report (default: the manifest's precision).
        reference: an already loaded diffusers model (float32), to share across checks; without it diffusers runs
            streamed from the checkpoint, one block's weights at a time (model.reference.BlockwiseReference).
        cases: inputs (default: make_cases over the bundle's profiles, `case_set` "full" or "quick").
        baseline: also run diffusers in bf16 on every case and report it against the same float32 truth.
        threads: ONNX Runtime intra-op threads (results do not depend on it).
        truth: float32 reference traces to reuse across checks of the same cases (filled on first use).
        segments: the denoiser as segment variants run one session at a time (parity.streamed.parity_segments)
            instead of `variants`; `text_kv` is then the text_kv graph to run (default: the bundle's).
        max_rows: at most this many batch rows per run (bounds activation memory; results do not depend on it).
        open_decoder: opens the image decoder that also scores each case's decoded x0 estimate (parity.images).

    Returns:
        The report; nothing is written.
    """
    from nucleus_export.errors import NucleusExportError
    from nucleus_export.model.reference import BlockwiseReference
    from nucleus_export.parity.streamed import run_segmented_parity, session_opener

    bundle_dir = Path(bundle_dir)
    manifest = load_manifest(bundle_dir)
    config = checkpoint.config
    if manifest.config_hash != config.config_hash():
        raise NucleusExportError(
            f"bundle {bundle_dir} was exported from another model (config hash {manifest.config_hash}, "
            f"this model {config.config_hash()}).",
            "pass the --model the bundle was exported from.",
        )
    if segments is None:
        if variants is None:
            variants = variants_of(bundle_dir / onnx_file(TEXT_KV), load_model(bundle_dir / onnx_file(DENOISER)))
        segments = [whole_graph_segment(variants, config)]
        text_kv, directory = variants.text_kv, variants.directory
    else:
        text_kv, directory = (text_kv if text_kv is not None else bundle_dir / onnx_file(TEXT_KV)), bundle_dir
    if reference is not None:
        truth_model = BlockwiseReference(checkpoint, model=reference)
        low = BlockwiseReference(checkpoint, model=bf16_copy(reference)) if baseline else None
    else:
        import torch

        truth_model = BlockwiseReference(checkpoint)
        low = BlockwiseReference(checkpoint, dtype=torch.bfloat16) if baseline else None
    opener = session_opener(directory, threads)
    batches = batch_by_resolution(cases or make_cases(config, manifest.profiles, case_set=case_set), max_rows)
    results = run_segmented_parity(config, batches, lambda: opener(text_kv), segments, opener, truth_model, low, truth,
                                   open_decoder=open_decoder)
    return ParityReport(graph_precision or manifest.precision, tolerance, results, note)


def write_report(bundle_dir: Path, reports: dict[str, ParityReport], stages: dict[str, dict] | None = None) -> Path:
    """parity.json holds one report per checked graph variant (e.g. "fp32", "bf16", "bf16+fp8") and, under "stages",
    the checks of the pipeline's other stages (parity/stages.py)."""
    path = Path(bundle_dir) / PARITY_NAME
    payload = {name: json.loads(report.to_json()) for name, report in reports.items()}
    if stages:
        payload["stages"] = stages
    write_atomic(path, json.dumps(payload, indent=2))
    return path
