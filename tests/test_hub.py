"""`--model ORG/NAME`: resolution through huggingface_hub's cache, offline, on cache folders laid out here as a
download leaves them (refs/main, snapshots/<commit>/, the tree listing huggingface_hub records). Never downloads:
every test runs with HF_HUB_OFFLINE=1 and a private HF_HUB_CACHE."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from nucleus_runtime.scheduler import DEFAULT_SCHEDULER_CONFIG

from nucleus_export.cli import main
from nucleus_export.commands.generate import resolve_pipeline
from nucleus_export.errors import NucleusExportError
from nucleus_export.model.specs import open_model
from nucleus_export.model.hub import (
    PIPELINE_FOLDERS,
    TRANSFORMER_FOLDERS,
    fetch_snapshot,
    is_hub_id,
)

REPO = "NucleusAI/NucleusMoE-Image"
COMMIT = "0123456789abcdef0123456789abcdef01234567"


@pytest.fixture()
def hub_cache(tmp_path, monkeypatch) -> Path:
    cache = tmp_path / "hf-cache"
    cache.mkdir()
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return cache


def cache_snapshot(cache: Path, files: dict[str, Path | str], listed: list[str] | None = None) -> Path:
    """Lay out a cached snapshot of REPO holding `files` (repo path -> source file or text).

    `listed` are the repository's files as its tree listing names them (what a real download records, and what
    huggingface_hub checks a cached snapshot against); default: the cached files only.
    """
    from huggingface_hub._tree_cache import TreeCacheEntry, write_tree_cache

    storage = cache / f"models--{REPO.replace('/', '--')}"
    snapshot = storage / "snapshots" / COMMIT
    for repo_path, source in files.items():
        target = snapshot / repo_path
        target.parent.mkdir(parents=True, exist_ok=True)
        if isinstance(source, Path):
            shutil.copyfile(source, target)
        else:
            target.write_text(source)
    (storage / "refs").mkdir(parents=True, exist_ok=True)
    (storage / "refs" / "main").write_text(COMMIT)
    entries = {p: TreeCacheEntry(size=1, blob_id=f"{i:040x}") for i, p in enumerate(listed or files)}
    write_tree_cache(str(storage), COMMIT, entries)
    return snapshot


def pipeline_files(tiny_checkpoint_dir: Path) -> dict[str, Path | str]:
    files: dict[str, Path | str] = {f"transformer/{p.name}": p for p in tiny_checkpoint_dir.iterdir() if p.is_file()}
    files["scheduler/scheduler_config.json"] = json.dumps(DEFAULT_SCHEDULER_CONFIG)
    files["model_index.json"] = json.dumps({"_class_name": "NucleusMoEImagePipeline"})
    return files


# Files of the pipeline's other components as the repository lists them: export/build must not need them.
OTHER_COMPONENTS = ["text_encoder/config.json", "text_encoder/model.safetensors", "processor/tokenizer.json", "vae/config.json"]


def test_hub_ids_are_told_from_paths(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert is_hub_id(REPO) and is_hub_id("org/model-v1.5")
    assert not is_hub_id("tiny") and not is_hub_id("/abs/path") and not is_hub_id("../x") and not is_hub_id("a/b/c")
    (tmp_path / "local" / "folder").mkdir(parents=True)
    assert not is_hub_id("local/folder"), "an existing local folder of that name wins"


def test_cached_transformer_resolves_offline(hub_cache, tiny_checkpoint_dir):
    """Only transformer/ and scheduler/ are cached; the repository also lists the text encoder, processor and VAE,
    which huggingface_hub would report missing if export asked for them."""
    files = pipeline_files(tiny_checkpoint_dir)
    snapshot = cache_snapshot(hub_cache, files, listed=[*files, *OTHER_COMPONENTS])
    checkpoint = open_model(REPO)
    assert checkpoint.transformer_dir == snapshot / "transformer"
    assert checkpoint.scheduler_dir == snapshot / "scheduler"
    # generate needs the other components: the same cache is incomplete for it.
    with pytest.raises(NucleusExportError) as info:
        resolve_pipeline(REPO)
    message = str(info.value)
    assert "is incomplete in" in message and REPO in message and str(hub_cache) in message


def test_cli_runs_on_a_cached_hub_id(hub_cache, tiny_checkpoint_dir, capsys):
    cache_snapshot(hub_cache, pipeline_files(tiny_checkpoint_dir))
    assert main(["inspect", "--model", REPO, "--json"]) == 0
    assert json.loads(capsys.readouterr().out)


def test_not_cached_offline_is_one_line_naming_id_cache_and_fix(hub_cache, capsys):
    assert main(["inspect", "--model", REPO]) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    assert REPO in err and str(hub_cache) in err and "HF_HUB_OFFLINE" in err and "Fix:" in err
    assert "hf download" in err and "transformer/*" in err


def test_snapshot_without_a_transformer_is_refused(hub_cache):
    cache_snapshot(hub_cache, {"model_index.json": "{}", "scheduler/scheduler_config.json": "{}"})
    with pytest.raises(NucleusExportError, match="has no transformer/"):
        fetch_snapshot(REPO, TRANSFORMER_FOLDERS, "export")


def test_generate_resolves_the_pipeline_folders(hub_cache, tiny_checkpoint_dir):
    files = {k: v for k, v in pipeline_files(tiny_checkpoint_dir).items() if not k.startswith("transformer/")}
    for path in OTHER_COMPONENTS:
        files[path] = "{}"
    snapshot = cache_snapshot(hub_cache, files, listed=[*files, "transformer/config.json"])
    # transformer/ is listed by the repository but not cached: generate does not ask for it.
    assert resolve_pipeline(REPO) == snapshot
    assert set(PIPELINE_FOLDERS) >= {"text_encoder", "processor", "vae", "scheduler"} and "transformer" not in PIPELINE_FOLDERS


def test_export_stages_fetch_their_component_folders(hub_cache, tiny_checkpoint_dir):
    """export/build ask the Hub for the folders of the stages they export: the transformer-only cache above is
    incomplete for the text encoder stage, and complete once text_encoder/ and processor/ are cached too."""
    files = pipeline_files(tiny_checkpoint_dir)
    cache_snapshot(hub_cache, files, listed=[*files, *OTHER_COMPONENTS])
    with pytest.raises(NucleusExportError, match="is incomplete in"):
        open_model(REPO, ("text_encoder",))
    for path in OTHER_COMPONENTS:
        files[path] = "{}"
    snapshot = cache_snapshot(hub_cache, files)
    assert open_model(REPO, ("text_encoder", "vae_decoder")).pipeline_root == snapshot
