"""Run a bundle's graphs in ONNX Runtime and diffusers' forward on the same inputs, and compare.

Routing agreement is measured on the expert-choice selections: for each MoE layer, batch row and expert, the share of
the C chosen tokens that the graph and PyTorch have in common. The graph's selections are read by exposing each
router node's `token_indices` as an extra graph output (a copy of the graph; the bundle is not modified).
"""

from __future__ import annotations

import dataclasses
import json
import os
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import onnx
from nucleus_runtime.bundle import load_manifest, write_atomic
from nucleus_runtime.contract import DENOISER_GRAPH as DENOISER
from nucleus_runtime.contract import TEXT_KV_GRAPH as TEXT_KV
from onnx import TensorProto, helper

from nucleus_export.graph.moe_ops import ROUTER_OP
from nucleus_export.log import track
from nucleus_export.model.checkpoint import Checkpoint
from nucleus_export.model.config import ModelConfig
from nucleus_export.parity.cases import ParityCase, make_cases

if TYPE_CHECKING:
    import onnxruntime
    import torch
PARITY_NAME = "parity.json"


@dataclasses.dataclass(frozen=True)
class Tolerance:
    """Pass criteria; defaults are the fp32 targets."""

    max_relative_error: float = 1e-4
    min_cosine: float = 0.0
    min_routing_agreement: float = 1.0


@dataclasses.dataclass
class Comparison:
    max_abs_error: float
    relative_error: float
    cosine: float

    @classmethod
    def of(cls, actual: np.ndarray, expected: np.ndarray) -> Comparison:
        a, e = actual.astype(np.float64).ravel(), expected.astype(np.float64).ravel()
        diff = a - e
        norm_e, norm_a = np.linalg.norm(e), np.linalg.norm(a)
        return cls(
            max_abs_error=float(np.abs(diff).max()) if diff.size else 0.0,
            relative_error=float(np.linalg.norm(diff) / max(norm_e, 1e-30)),
            cosine=float(a @ e / max(norm_a * norm_e, 1e-30)),
        )


@dataclasses.dataclass
class CaseResult:
    name: str
    text_kv: Comparison
    sample: Comparison
    routing_agreement: dict[str, float]


@dataclasses.dataclass
class ParityReport:
    """What `check` and the build's quality report write to parity.json."""

    graph_precision: str
    tolerance: Tolerance
    cases: list[CaseResult]
    note: str = ""

    @property
    def worst(self) -> dict[str, float]:
        routing = [v for c in self.cases for v in c.routing_agreement.values()]
        return {
            "sample_relative_error": max(c.sample.relative_error for c in self.cases),
            "sample_max_abs_error": max(c.sample.max_abs_error for c in self.cases),
            "sample_cosine": min(c.sample.cosine for c in self.cases),
            "text_kv_relative_error": max(c.text_kv.relative_error for c in self.cases),
            "routing_agreement": min(routing) if routing else 1.0,
        }

    @property
    def routing_by_layer(self) -> dict[str, float]:
        layers = sorted({k for c in self.cases for k in c.routing_agreement}, key=lambda k: int(k))
        return {k: float(np.mean([c.routing_agreement[k] for c in self.cases])) for k in layers}

    @property
    def passed(self) -> bool:
        w, t = self.worst, self.tolerance
        return (
            w["sample_relative_error"] <= t.max_relative_error
            and w["text_kv_relative_error"] <= t.max_relative_error
            and w["sample_cosine"] >= t.min_cosine
            and w["routing_agreement"] >= t.min_routing_agreement
        )

    def to_json(self) -> str:
        payload = {
            "graph_precision": self.graph_precision,
            "passed": self.passed,
            "tolerance": dataclasses.asdict(self.tolerance),
            "worst": self.worst,
            "routing_agreement_by_layer": self.routing_by_layer,
            "note": self.note,
            "cases": [dataclasses.asdict(c) for c in self.cases],
        }
        return json.dumps(payload, indent=2)

    def summary_lines(self) -> list[str]:
        w = self.worst
        lines = [
            f"{self.graph_precision}: {len(self.cases)} cases, worst sample rel err {w['sample_relative_error']:.3e} "
            f"(max abs {w['sample_max_abs_error']:.3e}), min cosine {w['sample_cosine']:.6f}, "
            f"text_kv rel err {w['text_kv_relative_error']:.3e}, min routing agreement {100 * w['routing_agreement']:.2f}%",
        ]
        if self.routing_by_layer:
            lines.append(
                "routing agreement per MoE layer: "
                + ", ".join(f"{k}: {100 * v:.2f}%" for k, v in self.routing_by_layer.items())
            )
        lines.append("PASS" if self.passed else f"FAIL (tolerance {dataclasses.asdict(self.tolerance)})")
        return lines


# ---- ONNX Runtime side ---------------------------------------------------------------------------------------------


def with_router_outputs(model: onnx.ModelProto) -> tuple[onnx.ModelProto, list[str]]:
    """Copy of a denoiser graph whose router selections are graph outputs; returns it and the output names, in block
    order. Works on graphs lowered to native layers too, as long as the router nodes are still present."""
    model_copy = onnx.ModelProto()
    model_copy.CopyFrom(model)
    names = []
    for node in model_copy.graph.node:
        if node.op_type == ROUTER_OP:
            names.append(node.output[0])
            model_copy.graph.output.append(helper.make_tensor_value_info(node.output[0], TensorProto.INT64, None))
    return model_copy, names


def _session(model_path: Path, threads: int | None = None) -> onnxruntime.InferenceSession:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    if threads:
        options.intra_op_num_threads = threads
    return ort.InferenceSession(str(model_path), options, providers=["CPUExecutionProvider"])


class OnnxGraphs:
    """ORT sessions for a text_kv and a denoiser graph, the denoiser instrumented with router outputs."""

    def __init__(self, text_kv_path: Path, denoiser_path: Path):
        self.text_kv = _session(text_kv_path)
        # The instrumented copy sits next to the original so relative external-data paths still resolve.
        model = onnx.load(str(denoiser_path), load_external_data=False)
        instrumented, self.router_outputs = with_router_outputs(model)
        fd, tmp = tempfile.mkstemp(suffix=".onnx", prefix=".parity-", dir=Path(denoiser_path).parent)
        os.close(fd)
        try:
            onnx.save_model(instrumented, tmp)
            self.denoiser = _session(Path(tmp))
        finally:
            Path(tmp).unlink(missing_ok=True)

    def run(self, case: ParityCase, config: ModelConfig) -> tuple[np.ndarray, np.ndarray, list[np.ndarray]]:
        (text_kv,) = self.text_kv.run(None, case.text_kv_inputs(config))
        outputs = self.denoiser.run(["sample", *self.router_outputs], case.denoiser_inputs(config, text_kv))
        return text_kv, outputs[0], outputs[1:]


# ---- PyTorch side --------------------------------------------------------------------------------------------------


class ReferenceRunner:
    """diffusers' forward on a case, with the text K/V and the router selections of every MoE layer."""

    def __init__(self, model: torch.nn.Module, config: ModelConfig):
        self.model, self.config = model, config
        self._logits: dict[int, torch.Tensor] = {}
        for idx in config.moe_layers:
            gate = model.transformer_blocks[idx].img_mlp.gate
            gate.register_forward_hook(lambda _m, _i, out, idx=idx: self._logits.__setitem__(idx, out.detach()))

    def text_kv(self, case: ParityCase) -> np.ndarray:
        """Per-block text K/V exactly as diffusers' TextKVCache hook computes them."""
        import torch
        from diffusers.models.transformers.transformer_nucleusmoe_image import (
            _apply_rotary_emb_nucleus,
        )

        from nucleus_export.model.reference import to_model

        c, m = self.config, self.model
        text = m.txt_norm(to_model(m, case.encoder_hidden_states))
        _, txt_freqs = m.pos_embed([(1, *case.grid)], max_txt_seq_len=text.shape[1], device=text.device)
        layers = []
        for block in m.transformer_blocks:
            context = block.encoder_proj(text)
            key = block.attn.add_k_proj(context).unflatten(-1, (c.kv_heads, -1))
            value = block.attn.add_v_proj(context).unflatten(-1, (c.kv_heads, -1))
            key = _apply_rotary_emb_nucleus(block.attn.norm_added_k(key), txt_freqs, use_real=False)
            layers.append(torch.stack([key, value]))
        return torch.stack(layers).float().cpu().numpy()

    def routing(self) -> list[np.ndarray]:
        """[B, E, C] token selections per MoE layer of the last forward (diffusers' own topk on its own scores)."""
        import torch

        out = []
        for idx in self.config.moe_layers:
            logits = self._logits[idx].float()
            scores = torch.sigmoid(logits) if self.config.use_sigmoid else torch.softmax(logits, dim=-1)
            capacity = self.config.capacity(idx, logits.shape[1])
            out.append(torch.topk(scores.transpose(1, 2), k=capacity, dim=-1).indices.cpu().numpy())
        return out

    def sample(self, case: ParityCase) -> np.ndarray:
        import torch

        from nucleus_export.model.reference import to_model

        with torch.no_grad():
            sample = self.model(
                hidden_states=to_model(self.model, case.hidden_states),
                img_shapes=[(1, *case.grid)] * case.batch,
                encoder_hidden_states=to_model(self.model, case.encoder_hidden_states),
                encoder_hidden_states_mask=to_model(self.model, case.mask),
                timestep=to_model(self.model, case.timestep),
                return_dict=False,
            )[0]
        return sample.float().cpu().numpy()


def routing_agreement(actual: np.ndarray, expected: np.ndarray) -> float:
    """Share of (batch row, expert, token) selections present in both [B, E, C] index sets."""
    if actual.shape != expected.shape:
        return 0.0
    batch, experts, capacity = expected.shape
    same = 0
    for b in range(batch):
        for e in range(experts):
            same += len(np.intersect1d(actual[b, e], expected[b, e], assume_unique=True))
    return same / (batch * experts * capacity)


def check_parity(
    checkpoint: Checkpoint,
    bundle_dir: Path,
    tolerance: Tolerance = Tolerance(),
    text_kv_path: Path | None = None,
    denoiser_path: Path | None = None,
    graph_precision: str | None = None,
    reference: torch.nn.Module | None = None,
    cases: list[ParityCase] | None = None,
    note: str = "",
) -> ParityReport:
    """Compare a bundle's graphs (or the given replacements, e.g. an FP8 graph) with diffusers' forward.

    Args:
        checkpoint: the model the bundle was exported from (its config hash must match the manifest).
        bundle_dir: bundle folder (profiles and default graph paths).
        tolerance: pass criteria.
        text_kv_path, denoiser_path: graphs to check instead of the bundle's own.
        graph_precision: label for the report (default: the manifest's precision).
        reference: an already loaded diffusers model (float32), to share across checks.
        cases: inputs (default: make_cases over the bundle's profiles).

    Returns:
        The report; nothing is written.
    """
    from nucleus_export.errors import NucleusExportError
    from nucleus_export.model.reference import load_reference

    bundle_dir = Path(bundle_dir)
    manifest = load_manifest(bundle_dir)
    config = checkpoint.config
    if manifest.config_hash != config.config_hash():
        raise NucleusExportError(
            f"bundle {bundle_dir} was exported from another model (config hash {manifest.config_hash}, "
            f"this model {config.config_hash()}).",
            "pass the --model the bundle was exported from.",
        )
    graphs = OnnxGraphs(text_kv_path or bundle_dir / f"{TEXT_KV}.onnx", denoiser_path or bundle_dir / f"{DENOISER}.onnx")
    runner = ReferenceRunner(reference if reference is not None else load_reference(checkpoint), config)
    results = []
    for case in track(cases or make_cases(config, manifest.profiles), "parity cases"):
        text_kv, sample, selections = graphs.run(case, config)
        expected_sample = runner.sample(case)
        agreement = {
            str(layer): routing_agreement(actual, expected)
            for layer, actual, expected in zip(config.moe_layers, selections, runner.routing())
        }
        results.append(
            CaseResult(
                case.name,
                Comparison.of(text_kv.astype(np.float32), runner.text_kv(case)),
                Comparison.of(sample, expected_sample),
                agreement,
            )
        )
    return ParityReport(graph_precision or manifest.precision, tolerance, results, note)


def write_report(bundle_dir: Path, reports: dict[str, ParityReport]) -> Path:
    """parity.json holds one report per checked graph variant (e.g. "fp32", "bf16", "bf16+fp8")."""
    path = Path(bundle_dir) / PARITY_NAME
    payload = {name: json.loads(report.to_json()) for name, report in reports.items()}
    write_atomic(path, json.dumps(payload, indent=2))
    return path
