"""What a generated model repository holds, and writing it: atomically, refusing to clobber, or as a dry run.

Layout (default names; `--name-prefix` prefixes all three):

    REPO/
      README.md                      how to start tritonserver on this folder (Triton ignores files at the root)
      nucleus_text_kv/config.pbtxt   1/model.plan (TensorRT) or 1/model.onnx (+ external data) (ONNX Runtime)
      nucleus_denoiser/config.pbtxt  1/model.plan or 1/model.onnx (+ external data); plugins/<lib>.so if used
      nucleus_pipeline/config.pbtxt  1/model.py, 1/manifest.json, 1/scheduler_config.json,
                                     1/nucleus_runtime/ (a copy of the runtime that made the bundle's `run` results)

The pipeline model imports the copied runtime, not an installed one: the repository is then self-contained, the
Triton Python environment needs nothing beyond numpy (which Triton's containers ship), and the loop that serves is
the same code whose results the tests compare with `nucleus-export run`.
"""

from __future__ import annotations

import dataclasses
import shutil
from pathlib import Path

import nucleus_runtime
from nucleus_export.errors import NucleusExportError, UsageError
from nucleus_runtime.errors import NucleusError
from nucleus_export.triton import configs
from nucleus_runtime.triton import model as pipeline_model
from nucleus_export.triton.names import ModelNames
from nucleus_runtime import plugins
from nucleus_runtime.atomic import atomic_dir
from nucleus_runtime.bundle import (
    DENOISER,
    MANIFEST_NAME,
    SCHEDULER_CONFIG_NAME,
    TEXT_KV,
    Manifest,
    load_manifest,
    sha256_file,
    verify_files,
)
from nucleus_runtime.text_kv_cache import DEFAULT_MAX_BYTES

CONFIG_NAME = "config.pbtxt"
VERSION = "1"
README_NAME = "README.md"
PLUGIN_DIR = "plugins"
# The engine builder's name for TensorRT-RTX in manifest.engines[graph]["backend"] (nucleus_export.engines.backends).
TENSORRT_RTX = "tensorrt-rtx"


@dataclasses.dataclass
class TritonOptions:
    """Choices of `nucleus-export triton` (see commands/triton.py for their help)."""

    platform: str = configs.TENSORRT_PLAN
    instances: int = 1
    queue_timeout_us: int = 0
    name_prefix: str = ""
    text_kv_cache_bytes: int = DEFAULT_MAX_BYTES
    verify_checksums: bool = True
    expect_manifest_sha256: str | None = None


@dataclasses.dataclass(frozen=True)
class RepoFile:
    """One file of the repository: generated `text`, or a copy of `source` (whose copy must have `sha256` if set)."""

    relpath: str
    text: str | None = None
    source: Path | None = None
    sha256: str | None = None

    @property
    def nbytes(self) -> int:
        return len(self.text.encode()) if self.text is not None else self.source.stat().st_size  # type: ignore[union-attr]


@dataclasses.dataclass
class RepositoryPlan:
    """Everything `write_repository` will write, known before anything is written (the dry run prints it)."""

    names: ModelNames
    platform: str
    files: list[RepoFile]
    plugin_library: str | None = None  # relpath inside the repository

    def configs(self) -> dict[str, str]:
        """model name -> config.pbtxt text."""
        return {f.relpath.split("/")[0]: f.text for f in self.files if f.relpath.endswith("/" + CONFIG_NAME)}  # type: ignore[misc]

    def tree(self, root: str = "REPO") -> str:
        lines = [f"{root}/"]
        for f in sorted(self.files, key=lambda f: f.relpath):
            origin = "generated" if f.text is not None else f"from {f.source}"
            lines.append(f"  {f.relpath}  ({_size(f.nbytes)}, {origin})")
        return "\n".join(lines)

    def describe(self, root: str = "REPO") -> str:
        """Tree then every config.pbtxt: the dry-run output."""
        parts = [self.tree(root)]
        for name, text in self.configs().items():
            parts.append(f"\n--- {name}/{CONFIG_NAME} ---\n{text}")
        return "\n".join(parts)


def plan_repository(bundle_dir: Path, options: TritonOptions) -> RepositoryPlan:
    """Decide every file of the repository for a bundle; reads the bundle, writes nothing.

    Raises:
        NucleusExportError: the bundle lacks what the platform needs (engines, ONNX files, plugin library).
        UsageError: bad options (model names, instance count, queue timeout).
    """
    bundle_dir = Path(bundle_dir).absolute()
    if options.instances < 1:
        raise UsageError(f"--instances must be at least 1, got {options.instances}.", "pass --instances 1 or more.")
    if options.queue_timeout_us < 0:
        raise UsageError(f"--max-queue-delay-us must be 0 or more, got {options.queue_timeout_us}.", "pass 0 for no limit.")
    if options.platform not in configs.PLATFORMS:
        raise UsageError(f"unknown platform '{options.platform}'.", f"use one of: {', '.join(configs.PLATFORMS)}.")
    names = ModelNames.with_prefix(options.name_prefix)
    manifest = load_manifest(bundle_dir, options.expect_manifest_sha256)

    files: list[RepoFile] = []
    plugin_relpath: str | None = None
    # Verified before they are parsed (for their external data), the rest of the copies once they are known.
    verified = [f"{g}.onnx" for g in (TEXT_KV, DENOISER)] if options.platform == configs.ONNXRUNTIME else []
    if options.verify_checksums:
        verify_files(bundle_dir, manifest, verified)
    for graph, name in ((TEXT_KV, names.text_kv), (DENOISER, names.denoiser)):
        config = configs.graph_model_config(manifest, graph, name, options.platform, options.instances)
        files.append(RepoFile(f"{name}/{CONFIG_NAME}", text=config.to_pbtxt()))
        if options.platform == configs.TENSORRT_PLAN:
            files.append(RepoFile(f"{name}/{VERSION}/{configs.MODEL_FILENAMES[configs.TENSORRT_PLAN]}", source=_engine(bundle_dir, manifest, graph)))
        else:
            files += _onnx_files(bundle_dir, graph, f"{name}/{VERSION}")
    if options.platform == configs.TENSORRT_PLAN:
        library = _plugin_library(bundle_dir, manifest)
        if library is not None:
            # Inside a model folder, not at the root: Triton would take a root folder without config.pbtxt for a
            # broken model. The denoiser is the graph with the MoE ops the plugins implement. The server loads this
            # copy (LD_PRELOAD), so the copy itself is verified when written.
            plugin_relpath = f"{names.denoiser}/{PLUGIN_DIR}/{library[0].name}"
            files.append(RepoFile(plugin_relpath, source=library[0], sha256=library[1]))

    pipeline_config = configs.pipeline_model_config(
        manifest, names, options.instances, options.queue_timeout_us, options.text_kv_cache_bytes
    )
    files.append(RepoFile(f"{names.pipeline}/{CONFIG_NAME}", text=pipeline_config.to_pbtxt()))
    version_dir = f"{names.pipeline}/{VERSION}"
    files.append(RepoFile(f"{version_dir}/model.py", source=Path(pipeline_model.__file__)))
    files.append(RepoFile(f"{version_dir}/{MANIFEST_NAME}", source=bundle_dir / MANIFEST_NAME))
    scheduler_config = bundle_dir / SCHEDULER_CONFIG_NAME
    if scheduler_config.is_file() or SCHEDULER_CONFIG_NAME in manifest.files:  # recorded: must be there
        files.append(RepoFile(f"{version_dir}/{SCHEDULER_CONFIG_NAME}", source=scheduler_config))
    files += _runtime_files(f"{version_dir}/nucleus_runtime")

    if options.verify_checksums:
        # Every file copied from the bundle (graphs, external data, engines, scheduler config) must be recorded.
        copied = [f.source.relative_to(bundle_dir).as_posix() for f in files if f.source is not None and f.source.is_relative_to(bundle_dir)]
        verify_files(bundle_dir, manifest, [c for c in copied if c not in (MANIFEST_NAME, *verified)])

    plan = RepositoryPlan(names=names, platform=options.platform, files=files, plugin_library=plugin_relpath)
    files.append(RepoFile(README_NAME, text=serving_notes(plan)))
    return plan


def _engine(bundle_dir: Path, manifest: Manifest, graph: str) -> Path:
    path = bundle_dir / f"{graph}.plan"
    if not path.is_file():
        raise NucleusExportError(
            f"bundle {bundle_dir} has no TensorRT engine {path.name}"
            + ("" if manifest.engines else " (its manifest records no engines)")
            + ", which --platform tensorrt_plan serves.",
            f"build the engines first (`nucleus-export build --bundle {bundle_dir}`), or serve the ONNX graphs "
            "with --platform onnxruntime.",
        )
    record = (manifest.engines or {}).get(graph)
    built_with = record.get("backend") if isinstance(record, dict) else None
    if built_with == TENSORRT_RTX:
        # Triton's tensorrt backend links full TensorRT, which cannot deserialize TensorRT-RTX engines.
        raise NucleusExportError(
            f"{path} was built with TensorRT-RTX; Triton's tensorrt_plan backend runs full TensorRT engines only.",
            "build the engines with `nucleus-export build --backend tensorrt` on a machine with the TensorRT version "
            "of your Triton release, or serve the ONNX graphs with --platform onnxruntime.",
        )
    return path


def _onnx_files(bundle_dir: Path, graph: str, version_dir: str) -> list[RepoFile]:
    """The graph as model.onnx plus every external-data file it references, under the name it references."""
    import onnx
    from onnx.external_data_helper import _get_all_tensors, uses_external_data

    path = bundle_dir / f"{graph}.onnx"
    if not path.is_file():
        raise NucleusExportError(
            f"bundle {bundle_dir} has no {path.name}, which --platform onnxruntime serves.",
            "export the bundle again (`nucleus-export export`).",
        )
    model = onnx.load(str(path), load_external_data=False)
    locations: set[str] = set()
    for tensor in _get_all_tensors(model):
        if uses_external_data(tensor):
            locations.update(e.value for e in tensor.external_data if e.key == "location")
    files = [RepoFile(f"{version_dir}/{configs.MODEL_FILENAMES[configs.ONNXRUNTIME]}", source=path)]
    for location in sorted(locations):
        # ONNX resolves external data relative to the model file, so the data keeps its name next to model.onnx.
        data = bundle_dir / location
        if not data.is_file() or Path(location).is_absolute() or ".." in Path(location).parts:
            raise NucleusExportError(
                f"{path.name} references external data '{location}', which is not a file inside {bundle_dir}.",
                "copy the complete bundle (with its .onnx.data files), or export it again.",
            )
        files.append(RepoFile(f"{version_dir}/{location}", source=data))
    return files


def _plugin_library(bundle_dir: Path, manifest: Manifest) -> tuple[Path, str] | None:
    """The verified plugin library (path, sha256) the engines need, or None when they were built without plugins."""
    try:
        return plugins.bundle_plugin_library(bundle_dir, manifest)
    except NucleusError as exc:
        raise NucleusExportError(
            f"the engines of bundle {bundle_dir} use TensorRT plugins, but their plugin library cannot be used: "
            f"{exc.problem}",
            "build the plugins and the engines again (`nucleus-export build`), which copies the library into the bundle.",
        ) from None


def _runtime_files(dest: str) -> list[RepoFile]:
    root = Path(nucleus_runtime.__file__).parent
    return [
        RepoFile(f"{dest}/{p.relative_to(root).as_posix()}", source=p)
        for p in sorted(root.rglob("*.py"))
        if "__pycache__" not in p.parts
    ]


def serving_notes(plan: RepositoryPlan) -> str:
    """README.md at the repository root: how to serve it and call it."""
    n = plan.names
    if plan.plugin_library:
        start = (
            "The engines use the nucleus TensorRT plugins. Load the library into the server process, either with\n\n"
            f"    LD_PRELOAD=$PWD/REPO/{plan.plugin_library} tritonserver --model-repository=$PWD/REPO\n\n"
            "or through the TensorRT backend's own option:\n\n"
            f"    tritonserver --model-repository=$PWD/REPO --backend-config=tensorrt,plugins=$PWD/REPO/{plan.plugin_library}\n"
        )
    else:
        start = "    tritonserver --model-repository=$PWD/REPO\n"
    return f"""# Triton model repository generated by nucleus-export triton ({plan.platform})

Models: `{n.text_kv}` and `{n.denoiser}` (the bundle's graphs), `{n.pipeline}` (whole requests, Python backend,
calling the other two with BLS). Replace REPO by this folder's path.

## Start the server

{start}
The pipeline model imports the copy of nucleus_runtime next to its model.py; the Triton Python environment needs
only numpy.

## Send a request

```python
import numpy as np
import tritonclient.http as httpclient

client = httpclient.InferenceServerClient("localhost:8000")
prompt = np.load("prompt_embeds.npy").astype(np.float32)      # [1, T, joint_attention_dim], text encoder output
negative = np.load("negative_embeds.npy").astype(np.float32)  # [1, T', joint_attention_dim], e.g. of ""
inputs = []
for name, value, dtype in [
    ("prompt_embeds", prompt, "FP32"),
    ("negative_prompt_embeds", negative, "FP32"),
    ("height", np.array([1024], np.int64), "INT64"),
    ("width", np.array([1024], np.int64), "INT64"),
    ("num_inference_steps", np.array([50], np.int64), "INT64"),
    ("guidance_scale", np.array([4.0], np.float32), "FP32"),
    ("seed", np.array([0], np.int64), "INT64"),
]:
    tensor = httpclient.InferInput(name, list(value.shape), dtype)
    tensor.set_data_from_numpy(value)
    inputs.append(tensor)
result = client.infer("{n.pipeline}", inputs)
latents = result.as_numpy("{pipeline_model.OUTPUT_LATENTS}")  # [1, S, 64] packed; unpack with nucleus_runtime.latents
```
"""


def check_target(repo: Path, force: bool) -> None:
    """Refuse a non-empty target unless --force, and even then anything that is not a model repository; refuse a
    target whose parent folder does not exist (none is created for it)."""
    if not repo.absolute().parent.is_dir():
        raise UsageError(f"the folder of --repo {repo} does not exist.", "create it first, or choose another --repo.")
    if not repo.exists():
        return
    if not repo.is_dir():
        raise UsageError(f"--repo {repo} exists and is not a folder.", "choose a folder path for the repository.")
    entries = sorted(repo.iterdir())
    if not entries:
        return
    if not force:
        raise UsageError(
            f"--repo {repo} is not empty ({len(entries)} entries).",
            "choose an empty or new folder, or pass --force to replace it.",
        )
    foreign = [e.name for e in entries if not (e.name == README_NAME or (e.is_dir() and (e / CONFIG_NAME).is_file()))]
    if foreign:
        raise UsageError(
            f"--repo {repo} holds entries that are not Triton models ({', '.join(foreign[:5])}); "
            "--force replaces only model repositories, so nothing was deleted.",
            "choose another folder, or empty this one yourself.",
        )


def write_repository(plan: RepositoryPlan, repo: Path, force: bool = False) -> None:
    """Write the plan into `repo`: into a temporary sibling first, renamed into place when complete.

    A failure part-way leaves `repo` as it was; with --force the old repository is moved aside, the new one renamed
    in, and only then the old one deleted.
    """
    repo = Path(repo).absolute()
    check_target(repo, force)
    with atomic_dir(repo) as tmp:
        for f in plan.files:
            dest = tmp / f.relpath
            dest.parent.mkdir(parents=True, exist_ok=True)
            if f.text is not None:
                dest.write_text(f.text)
                continue
            shutil.copyfile(f.source, dest)  # type: ignore[arg-type]
            if f.sha256 is not None and sha256_file(dest) != f.sha256:
                raise NucleusExportError(
                    f"{f.source} changed while the repository was written (its copy fails the recorded sha256).",
                    "copy the bundle again from its source and rerun.",
                )


def _size(nbytes: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if nbytes < 1024 or unit == "GiB":
            return f"{nbytes:.0f} {unit}" if unit == "B" else f"{nbytes:.1f} {unit}"
        nbytes /= 1024  # type: ignore[assignment]
    return f"{nbytes} B"
