"""`--model` as every command takes it: the embedded tiny model, a synthetic real-architecture checkpoint, a Hugging
Face Hub id, or a local transformer folder / pipeline root."""

from __future__ import annotations

from pathlib import Path

from nucleus_export.model.checkpoint import Checkpoint, open_checkpoint
from nucleus_export.model.components import STAGE_FOLDERS
from nucleus_export.model.hub import TRANSFORMER_FOLDERS, fetch_snapshot, is_hub_id
from nucleus_export.model.synthetic import ensure_synthetic_checkpoint, is_synthetic_spec
from nucleus_export.model.tiny import TINY_SPEC, ensure_tiny_checkpoint

MODEL_HELP = (
    "'tiny' (embedded tiny model, generated offline), 'synthetic:nucleus-image?layers=N' (random weights, real "
    "dimensions, N blocks, cached on first use), a diffusers transformer folder, a pipeline root, or a Hugging Face Hub "
    "id such as NucleusAI/NucleusMoE-Image (only the folders the command's stages read are downloaded)"
)


def model_folder(spec: str | Path, stages: tuple[str, ...] = ()) -> Path:
    """The local folder a `--model` spec names (generated or downloaded on first use); from the Hub, the
    transformer's folders and those the optional `stages` read (text encoder and processor, VAE)."""
    text = str(spec)
    if text == TINY_SPEC:
        return ensure_tiny_checkpoint()
    if is_synthetic_spec(text):
        return ensure_synthetic_checkpoint(text)
    if is_hub_id(text):
        folders = TRANSFORMER_FOLDERS + tuple(f for s in stages if s in STAGE_FOLDERS for f in STAGE_FOLDERS[s])
        return fetch_snapshot(text, folders, "transformer" if not stages else "pipeline stages")
    return Path(spec)


def open_model(spec: str | Path, stages: tuple[str, ...] = ()) -> Checkpoint:
    """The validated transformer checkpoint a `--model` spec names (its pipeline root holding `stages`' folders)."""
    return open_checkpoint(model_folder(spec, stages))
