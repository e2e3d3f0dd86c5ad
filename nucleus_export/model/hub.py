"""`--model ORG/NAME`: fetch only the folders a command needs from the Hugging Face Hub, through its cache.

A 17B pipeline repository holds ~50 GB (transformer, an 8B text encoder, the VAE); `export`/`build` need the
transformer and the scheduler config, `generate` needs everything but the transformer (the bundle replaces it).
`snapshot_download` with `allow_patterns` fetches just those, with huggingface_hub's progress bars, into its shared
cache (`HF_HUB_CACHE`, default ~/.cache/huggingface/hub), so a second command and other tools reuse the files.
Offline (`HF_HUB_OFFLINE=1`) the cached snapshot is used as is; what is missing is one error line.
"""

from __future__ import annotations

import logging
import os
import re
from pathlib import Path

from nucleus_export.errors import NucleusExportError

logger = logging.getLogger("nucleus_export")

MODEL_INDEX = "model_index.json"
# What `export`, `build`, `check` and `inspect` read: the transformer and the scheduler config the bundle copies.
TRANSFORMER_FOLDERS = ("transformer", "scheduler")
# What `generate` reads: everything of the diffusers pipeline but the transformer. Qwen-Image-style repositories keep
# the processor in processor/ and some also ship tokenizer/; both are fetched when present.
PIPELINE_FOLDERS = ("scheduler", "text_encoder", "processor", "tokenizer", "vae")
# Folders without which a pipeline snapshot is unusable (tokenizer/ is optional).
_REQUIRED = {"transformer", "scheduler", "text_encoder", "processor", "vae"}

# ORG/NAME as the Hub spells repository ids (no leading dot or dash, at most 96 characters per part).
_HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,95}/[A-Za-z0-9][A-Za-z0-9_.-]{0,95}$")

_TRUTHY = {"1", "true", "yes", "on"}


def is_hub_id(spec: str) -> bool:
    """True for ORG/NAME that is not an existing local path (a local folder of that name wins)."""
    return bool(_HUB_ID.match(spec)) and ".." not in spec and not Path(spec).expanduser().exists()


def hub_cache_dir() -> Path:
    """huggingface_hub's cache folder, read at call time so HF_HUB_CACHE / HF_HOME set after import count."""
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"]).expanduser()
    if os.environ.get("HF_HOME"):
        return Path(os.environ["HF_HOME"]).expanduser() / "hub"
    from huggingface_hub import constants

    return Path(constants.HF_HUB_CACHE)


def hub_offline() -> bool:
    """HF_HUB_OFFLINE as set now (huggingface_hub reads it once, at import)."""
    from huggingface_hub import constants

    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in _TRUTHY or bool(constants.HF_HUB_OFFLINE)


def allow_patterns(folders: tuple[str, ...]) -> list[str]:
    return [MODEL_INDEX, *(f"{folder}/*" for folder in folders)]


def fetch_snapshot(repo_id: str, folders: tuple[str, ...], purpose: str) -> Path:
    """Download (or find in the cache) the named folders of a Hub repository; return the snapshot folder.

    Args:
        repo_id: ORG/NAME.
        folders: top-level folders to fetch (plus model_index.json).
        purpose: what they are for, for messages ("export", "generate").

    Returns:
        The snapshot folder: a diffusers pipeline root holding at least `folders` that the repository has.
    """
    try:
        from huggingface_hub import snapshot_download
        from huggingface_hub.errors import (
            GatedRepoError,
            HfHubHTTPError,
            IncompleteSnapshotError,
            LocalEntryNotFoundError,
            RepositoryNotFoundError,
            RevisionNotFoundError,
        )
    except ImportError:
        raise NucleusExportError(
            f"--model {repo_id} names a Hugging Face Hub repository, but huggingface_hub is not installed.",
            "pip install huggingface_hub, or pass a local checkpoint folder.",
        ) from None
    cache, offline = hub_cache_dir(), hub_offline()
    listing = ", ".join(f"{f}/" for f in folders)
    fetch_hint = f"hf download {repo_id} --include " + " ".join(f"'{f}/*'" for f in folders)
    # Offline nothing is fetched, so there is nothing to announce.
    level = logging.DEBUG if offline else logging.INFO
    logger.log(level, "%s: %s of %s from the Hugging Face Hub (cache %s)", purpose, listing, repo_id, cache)
    try:
        path = Path(
            snapshot_download(repo_id, allow_patterns=allow_patterns(folders), cache_dir=cache, local_files_only=offline)
        )
    except (LocalEntryNotFoundError, IncompleteSnapshotError) as exc:
        state = "is incomplete in" if isinstance(exc, IncompleteSnapshotError) else "is not in"
        if offline:
            raise NucleusExportError(
                f"{repo_id} ({listing}) {state} the Hugging Face cache {cache} and HF_HUB_OFFLINE=1 forbids downloading.",
                f"unset HF_HUB_OFFLINE to download it, or fetch it where there is network (`{fetch_hint}`) and copy the "
                "cache folder here (or set HF_HUB_CACHE to it), or pass a local folder as --model.",
            ) from None
        raise NucleusExportError(
            f"{repo_id} ({listing}) {state} the Hugging Face cache {cache} and the Hub could not be reached.",
            f"check the network (or HF_ENDPOINT), or fetch it elsewhere (`{fetch_hint}`) into that cache, "
            "or pass a local folder as --model.",
        ) from None
    except GatedRepoError:
        raise NucleusExportError(
            f"{repo_id} is gated on the Hugging Face Hub: its files need an accepted license and a token.",
            "accept the license on the model page, then `hf auth login` (or set HF_TOKEN) and rerun.",
        ) from None
    except RepositoryNotFoundError:
        raise NucleusExportError(
            f"{repo_id} is neither a local folder nor a Hugging Face Hub repository this account can see.",
            "check the id (e.g. NucleusAI/NucleusMoE-Image); for a private repository log in (`hf auth login` or HF_TOKEN).",
        ) from None
    except RevisionNotFoundError:
        raise NucleusExportError(f"{repo_id} has no 'main' revision on the Hub.", "check the repository id.") from None
    except HfHubHTTPError as exc:
        raise NucleusExportError(
            f"downloading {repo_id} from the Hugging Face Hub failed: {str(exc).splitlines()[0]}",
            "retry later, or pass a local folder as --model.",
        ) from None
    missing = [f for f in folders if f in _REQUIRED and not (path / f).is_dir()]
    if missing:
        raise NucleusExportError(
            f"the snapshot of {repo_id} in {path} has no {', '.join(f'{m}/' for m in missing)}: "
            f"it is not a diffusers pipeline repository{' or the cached copy is partial' if offline else ''}.",
            "pass the Nucleus-Image pipeline repository (e.g. NucleusAI/NucleusMoE-Image)"
            + (f", or fetch it: `{fetch_hint}`." if offline else "."),
        )
    return path
