"""The pipeline's other components next to the transformer: the text encoder and its processor, and the VAE.

A bundle holds the stages its model root provides: a transformer folder gives the transformer's two stages; a
diffusers pipeline root (or a Hub id) adds the text encoder (`text_encoder/` with the processor's tokenizer) and the
VAE decoder (`vae/`). `--stages` chooses among them.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from nucleus_runtime.contract import GRAPHS, OPTIONAL_STAGES, STAGES, TEXT_ENCODER_GRAPH, VAE_DECODER_GRAPH

from nucleus_export.errors import NucleusExportError, UsageError
from nucleus_export.model.text_encoder import TEXT_ENCODER_FOLDER, TextEncoderCheckpoint, open_text_encoder
from nucleus_export.model.vae import VAE_FOLDER, VaeCheckpoint, open_vae

PROCESSOR_FOLDER = "processor"
# The folders each optional stage reads from a pipeline root (and a Hub snapshot fetches).
STAGE_FOLDERS = {TEXT_ENCODER_GRAPH: (TEXT_ENCODER_FOLDER, PROCESSOR_FOLDER, "tokenizer"), VAE_DECODER_GRAPH: (VAE_FOLDER,)}


@dataclasses.dataclass
class PipelineComponents:
    """What the optional stages are exported from (None where the stage is not exported)."""

    text_encoder: TextEncoderCheckpoint | None = None
    processor: Any = None
    vae: VaeCheckpoint | None = None


def parse_stages(text: str) -> tuple[str, ...]:
    """`--stages text_encoder,text_kv,denoiser,vae_decoder` (any order; the transformer's two are always in)."""
    names = [s.strip() for s in text.split(",") if s.strip()]
    unknown = [n for n in names if n not in STAGES]
    if unknown:
        raise UsageError(f"unknown stage(s) {', '.join(unknown)}.", f"choose among {', '.join(STAGES)}.")
    return tuple(s for s in STAGES if s in names or s in GRAPHS)


def available_stages(pipeline_root: Path | None) -> tuple[str, ...]:
    """The stages a model root provides: the transformer's, plus those whose folders a pipeline root holds."""
    found = [s for s in OPTIONAL_STAGES if pipeline_root is not None and (Path(pipeline_root) / STAGE_FOLDERS[s][0]).is_dir()]
    return tuple(s for s in STAGES if s in GRAPHS or s in found)


def open_components(pipeline_root: Path | None, stages: tuple[str, ...], return_index: int) -> PipelineComponents:
    """Open (headers only) the components of the requested optional stages; a clear error for a missing one."""
    missing = [s for s in stages if s in OPTIONAL_STAGES and s not in available_stages(pipeline_root)]
    if missing:
        raise UsageError(
            f"--stages asks for {', '.join(missing)}, but the model is not a pipeline root holding "
            f"{', '.join(STAGE_FOLDERS[s][0] + '/' for s in missing)}.",
            "pass a diffusers pipeline root (or a Hub id) as --model, or leave those stages out of --stages.",
        )
    parts = PipelineComponents()
    if TEXT_ENCODER_GRAPH in stages:
        parts.text_encoder = open_text_encoder(Path(pipeline_root) / TEXT_ENCODER_FOLDER, return_index)
        parts.processor = load_processor(Path(pipeline_root))
    if VAE_DECODER_GRAPH in stages:
        parts.vae = open_vae(Path(pipeline_root) / VAE_FOLDER)
    return parts


def load_processor(pipeline_root: Path) -> Any:
    """The pipeline's Qwen3VLProcessor (its tokenizer and chat template become the bundle's tokenizer files)."""
    from transformers import AutoProcessor

    folder = pipeline_root / PROCESSOR_FOLDER
    if not folder.is_dir():
        raise NucleusExportError(
            f"{pipeline_root} has no {PROCESSOR_FOLDER}/ folder, which the text_encoder stage's tokenizer comes from.",
            "pass the complete pipeline root, or leave text_encoder out of --stages.",
        )
    with loading_errors(f"the processor from {folder}", "pass the complete pipeline root (processor/ as "
                        "NucleusMoEImagePipeline saves it)."):
        return AutoProcessor.from_pretrained(folder)


@contextlib.contextmanager
def loading_errors(what: str, fix: str) -> Iterator[None]:
    """Loading a pipeline component with transformers / diffusers: an unreadable folder and the processor's
    torchvision import become one-line errors."""
    try:
        yield
    except ImportError as exc:
        if "torchvision" in str(exc).lower():
            raise NucleusExportError(
                "loading the pipeline's processor (transformers' Qwen3VLProcessor) needs torchvision.",
                "pip install torchvision (the build matching your torch).",
            ) from None
        raise
    except (OSError, ValueError) as exc:
        raise NucleusExportError(f"cannot load {what}: {str(exc).splitlines()[0]}", fix) from None
