"""`check` of the pipeline's other stages: the bundle's text encoder against transformers' Qwen3-VL, its VAE decoder
against diffusers' AutoencoderKLQwenImage, both as exported and run by ONNX Runtime on the CPU (bf16 graphs emulated
in float32, rewrites/bf16_emulation.py).

- text_encoder: prompts of every kind (empty, unicode, spaces at the ends, one over the truncation length) tokenized
  by the bundle's own tokenizer, in padded batches of two; the graph's `prompt_embeds` on real tokens against
  transformers' `hidden_states[return_index]`, once as a full forward and once as the runtime runs it (the template
  prefix first, the rest with the prefix as past, right padding only). fp32: relative error <= 1e-5; lower
  precision: at most (1 + margin) x the error of transformers run in bf16.
- vae_decoder: seeded latents at every served resolution (one with `--cases quick`), de-normalized and decoded by
  the graph to uint8 against the pipeline's decode and post-processing. fp32: at most one level apart per pixel (a
  value at a rounding boundary); lower precision: mean difference at most (1 + margin) x diffusers in bf16.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from nucleus_runtime.bundle import Manifest
from nucleus_runtime.contract import (
    ATTENTION_MASK,
    IMAGE,
    INPUT_IDS,
    KEY_VALUES,
    LATENTS,
    PAST_KEY_VALUES,
    PROMPT_EMBEDS,
    TEXT_ENCODER_GRAPH,
    VAE_DECODER_GRAPH,
    onnx_file,
)
from nucleus_runtime.text_to_image import load_prompt_tokenizer
from nucleus_runtime.tokenizer import common_prefix_length

from nucleus_export.graph.external_data import load_external_data
from nucleus_export.model.text_encoder import TEXT_ENCODER_FOLDER
from nucleus_export.model.vae import VAE_FOLDER
from nucleus_export.parity.images import pipeline_images
from nucleus_export.parity.quality import BASELINE_MARGIN
from nucleus_export.parity.sessions import cpu_session
from nucleus_export.rewrites.bf16_emulation import EMULATION_LABEL, emulate_bf16_in_fp32, has_bf16

PROMPTS = (
    "",
    "a red fox in fresh snow at golden hour, 85mm photograph",
    "  spaces at both ends  ",
    "Ünïcødé: 東京の夜景, ネオン 🦊 — «guillemets»",
    "\nstarts with a newline",
    "over the truncation length " * 80,
)
TEXT_ENCODER_MAX_REL_ERROR = 1e-5
VAE_MAX_LEVELS = 1.0


@dataclasses.dataclass(frozen=True)
class StageCheck:
    """One stage's comparison with its PyTorch reference."""

    stage: str
    cases: int
    metric: str
    value: float
    limit: float
    baseline: float | None  # the reference itself in bf16 vs float32 (low-precision graphs are held to it)
    note: str

    @property
    def passed(self) -> bool:
        return bool(self.value <= self.limit)

    def summary_line(self) -> str:
        base = "" if self.baseline is None else f" (reference in bf16: {self.baseline:.3g})"
        verdict = "PASS" if self.passed else "FAIL"
        return f"{self.stage}: {self.cases} cases, {self.metric} {self.value:.3g} <= {self.limit:.3g}{base}: {verdict}; {self.note}"

    def to_dict(self) -> dict[str, Any]:
        return {**dataclasses.asdict(self), "passed": self.passed}


def _stage_session(bundle_dir: Path, graph: str) -> tuple[Any, bool]:
    """A CPU session of a stage's graph as exported, and whether it is a bf16 graph emulated in float32."""
    path = Path(bundle_dir) / onnx_file(graph)
    model = onnx.load(str(path), load_external_data=False)
    if not has_bf16(model):
        return cpu_session(path, path.parent), False
    load_external_data(model, path.parent)
    return cpu_session(emulate_bf16_in_fp32(model), path.parent), True


def _limit(exact: bool, exact_limit: float, baseline: float | None) -> float:
    return exact_limit if exact else (1 + BASELINE_MARGIN) * float(baseline)  # type: ignore[arg-type]


def _rows_error(actual: np.ndarray, expected: np.ndarray, mask: np.ndarray) -> float:
    """Largest relative error (L2 over a row's real tokens) among the rows."""
    errors = []
    for row in range(mask.shape[0]):
        keep = mask[row] == 1
        a, e = actual[row][keep], expected[row][keep]
        errors.append(float(np.linalg.norm(a - e) / max(np.linalg.norm(e), 1e-30)))
    return max(errors)


def check_text_encoder(pipeline_root: Path, bundle_dir: Path, manifest: Manifest, exact: bool) -> StageCheck:
    import torch
    from transformers import Qwen3VLForConditionalGeneration

    tokenizer = load_prompt_tokenizer(bundle_dir, manifest)
    return_index = manifest.stages[TEXT_ENCODER_GRAPH].config["return_index"]
    session, emulated = _stage_session(bundle_dir, TEXT_ENCODER_GRAPH)
    past_spec = manifest.stages[TEXT_ENCODER_GRAPH].io.inputs[PAST_KEY_VALUES]
    model = Qwen3VLForConditionalGeneration.from_pretrained(pipeline_root / TEXT_ENCODER_FOLDER, dtype=torch.float32).eval()
    reference_bf16 = None if exact else Qwen3VLForConditionalGeneration.from_pretrained(
        pipeline_root / TEXT_ENCODER_FOLDER, dtype=torch.bfloat16).eval()

    def run(ids: np.ndarray, mask: np.ndarray, past: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
        if past is None:
            shape = [ids.shape[0] if d == "batch" else 0 if isinstance(d, str) else d for d in past_spec.shape]
            past = np.zeros(shape, np.float32)
        embeds, key_values = session.run([PROMPT_EMBEDS, KEY_VALUES], {INPUT_IDS: ids, ATTENTION_MASK: mask, PAST_KEY_VALUES: past})
        return embeds, key_values

    def hidden(reference: Any, ids: np.ndarray, mask: np.ndarray) -> np.ndarray:
        with torch.no_grad():
            out = reference(input_ids=torch.from_numpy(ids), attention_mask=torch.from_numpy(mask),
                            output_hidden_states=True, use_cache=False)
        return out.hidden_states[return_index].float().numpy()

    rows = [tokenizer.encode_one(p) for p in PROMPTS]
    worst, baseline, cases = 0.0, 0.0, 0
    for start in range(0, len(rows), 2):
        batch = rows[start : start + 2]
        ids, mask = tokenizer.pad(batch)
        expected = hidden(model, ids, mask)
        full, _ = run(ids, mask, None)
        worst = max(worst, _rows_error(full, expected, mask))
        if tokenizer.template.padding_side == "right":
            shared = min(min(common_prefix_length(r, tokenizer.prefix_ids), len(r) - 1) for r in batch)
            if shared:
                prefix_ids = ids[:, :shared]
                prefix, past = run(prefix_ids, np.ones_like(prefix_ids), None)
                suffix, _ = run(ids[:, shared:], mask, past)
                worst = max(worst, _rows_error(np.concatenate([prefix, suffix], axis=1), expected, mask))
        if reference_bf16 is not None:
            baseline = max(baseline, _rows_error(hidden(reference_bf16, ids, mask), expected, mask))
        cases += len(batch)
    how = "full forward and prefix + suffix" if tokenizer.template.padding_side == "right" else "full forward (left padding)"
    return StageCheck(
        TEXT_ENCODER_GRAPH, cases, f"relative error of hidden_states[{return_index}]", worst,
        _limit(exact, TEXT_ENCODER_MAX_REL_ERROR, baseline), None if exact else baseline,
        f"vs transformers float32, {how}; {EMULATION_LABEL if emulated else 'run as exported'}",
    )


def check_vae_decoder(pipeline_root: Path, bundle_dir: Path, manifest: Manifest, exact: bool,
                      resolutions: list[tuple[int, int]]) -> StageCheck:
    import torch
    from diffusers import AutoencoderKLQwenImage

    session, emulated = _stage_session(bundle_dir, VAE_DECODER_GRAPH)
    vae = AutoencoderKLQwenImage.from_pretrained(pipeline_root / VAE_FOLDER, torch_dtype=torch.float32).eval()
    vae_bf16 = None if exact else AutoencoderKLQwenImage.from_pretrained(pipeline_root / VAE_FOLDER, torch_dtype=torch.bfloat16).eval()
    scale = manifest.stages[VAE_DECODER_GRAPH].config["scale_factor"]
    worst, baseline = 0.0, 0.0
    z_dim = manifest.stages[VAE_DECODER_GRAPH].config["z_dim"]
    for k, (height, width) in enumerate(resolutions):
        latents = np.random.default_rng(k).standard_normal((1, z_dim, height // scale, width // scale)).astype(np.float32)
        expected = pipeline_images(vae, latents).astype(np.int16)
        (image,) = session.run([IMAGE], {LATENTS: latents})
        diff = np.abs(image.astype(np.int16) - expected)
        worst = max(worst, float(diff.max() if exact else diff.mean()))
        if vae_bf16 is not None:
            baseline = max(baseline, float(np.abs(pipeline_images(vae_bf16, latents).astype(np.int16) - expected).mean()))
    metric = "max difference in levels per pixel" if exact else "mean difference in levels per pixel"
    return StageCheck(
        VAE_DECODER_GRAPH, len(resolutions), metric, worst, _limit(exact, VAE_MAX_LEVELS, baseline),
        None if exact else baseline,
        f"vs diffusers float32 decode + post-processing; {EMULATION_LABEL if emulated else 'run as exported'}",
    )


def check_stages(pipeline_root: Path | None, bundle_dir: Path, manifest: Manifest, exact: bool,
                 resolutions: list[tuple[int, int]]) -> list[StageCheck]:
    """Every optional stage the bundle has, against the pipeline root it was exported from."""
    if pipeline_root is None:
        return []
    checks = []
    if TEXT_ENCODER_GRAPH in manifest.stages:
        checks.append(check_text_encoder(pipeline_root, bundle_dir, manifest, exact))
    if VAE_DECODER_GRAPH in manifest.stages:
        checks.append(check_vae_decoder(pipeline_root, bundle_dir, manifest, exact, resolutions))
    return checks
