"""What a generated model repository holds, and writing it: atomically, refusing to clobber, or as a dry run.

Layouts (default names; `--name-prefix` prefixes all of them):

    --layout inprocess (default)
    REPO/
      README.md                      how to start tritonserver on this folder (Triton ignores files at the root)
      nucleus_pipeline/config.pbtxt  1/model.py, 1/nucleus_runtime/ (a copy of the runtime), and the bundle files
                                     the runtime backend reads under their bundle names: 1/manifest.json,
                                     1/scheduler_config.json, 1/text_kv.plan + 1/denoiser.plan (+ plugins/<lib>.so)
                                     or 1/text_kv.onnx + 1/denoiser.onnx (+ external data)

    --layout bls
    REPO/
      README.md
      nucleus_text_kv/config.pbtxt   1/model.plan (TensorRT) or 1/model.onnx (+ external data) (ONNX Runtime)
      nucleus_denoiser/config.pbtxt  1/model.plan or 1/model.onnx (+ external data); plugins/<lib>.so if used
      nucleus_pipeline/config.pbtxt  1/model.py, 1/manifest.json, 1/scheduler_config.json, 1/nucleus_runtime/

The pipeline model imports the copied runtime, not an installed one: the loop that serves is the same code whose
results the tests compare with `nucleus-export run`. Bundle files are hard-linked into the repository where the
file system allows (same file system, no copy of multi-GB graphs), copied otherwise; they are checked against the
manifest's checksums before, and copies again after writing.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
from pathlib import Path

import nucleus_runtime
from nucleus_runtime import plugins
from nucleus_runtime.atomic import atomic_dir
from nucleus_runtime.backends import registry
from nucleus_runtime.bundle import Manifest, load_manifest, sha256_file, verify_files
from nucleus_runtime.contract import (
    DENOISER_GRAPH as DENOISER,
)
from nucleus_runtime.contract import (
    MANIFEST_NAME,
    PLUGIN_LIBRARY_NAME,
    SCHEDULER_CONFIG_NAME,
    TENSORRT_RTX,
    onnx_file,
    plan_file,
)
from nucleus_runtime.contract import (
    TEXT_KV_GRAPH as TEXT_KV,
)
from nucleus_runtime.errors import NucleusError
from nucleus_runtime.triton import model as pipeline_model

from nucleus_export.errors import NucleusExportError, UsageError
from nucleus_export.triton import configs, serving
from nucleus_export.triton.names import ModelNames

CONFIG_NAME = "config.pbtxt"
VERSION = "1"
README_NAME = "README.md"
PLUGIN_DIR = "plugins"
# The commands a Fix: asks for (tests/test_triton_repository.py parses every one with the real CLI parser).
BUILD = "build --model MODEL --out BUNDLE"
EXPORT = "export --model MODEL --out BUNDLE"


def _cli(arguments: str) -> str:
    return f"`nucleus-export {arguments}`"


@dataclasses.dataclass(frozen=True)
class TritonOptions(configs.PipelineSettings):
    """Choices of `nucleus-export triton` (see commands/triton.py for their help)."""

    name_prefix: str = ""
    expect_manifest_sha256: str | None = None


@dataclasses.dataclass(frozen=True)
class RepoFile:
    """One file of the repository: generated `text`, or `source` copied (or hard-linked, for bundle files).

    `bundle_name` is the file's name in the bundle when the manifest records its checksum; `sha256`, where set, is
    what the written file must hash to (the plugin library, which the server loads from the repository).
    """

    relpath: str
    text: str | None = None
    source: Path | None = None
    bundle_name: str | None = None
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
    # bls: the library's relpath inside the repository, which Triton's TensorRT backend must load (in-process, the
    # pipeline model loads the bundle's copy itself, so the server needs none)
    plugin_library: str | None = None
    layout: str = configs.DEFAULT_LAYOUT

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
    if options.max_batch_requests < 0:
        raise UsageError(f"--max-batch-requests must be 0 or more, got {options.max_batch_requests}.",
                         "pass 0 to batch as many requests as the bundle's batch profile holds, 1 for one at a time.")
    if options.max_pending_requests < 1:
        raise UsageError(f"--max-pending-requests must be at least 1, got {options.max_pending_requests}.",
                         "pass how many requests an instance may hold waiting, e.g. 64.")
    if options.request_timeout_s < 0:
        raise UsageError(f"--request-timeout-s must be 0 or more, got {options.request_timeout_s}.", "pass 0 for no deadline.")
    if options.onnxruntime_threads < 0:
        raise UsageError(f"--onnxruntime-threads must be 0 or more, got {options.onnxruntime_threads}.", "pass 0 for one per core.")
    if options.platform not in configs.PLATFORMS:
        raise UsageError(f"unknown platform '{options.platform}'.", f"use one of: {', '.join(configs.PLATFORMS)}.")
    if options.layout not in configs.LAYOUTS:
        raise UsageError(f"unknown layout '{options.layout}'.", f"use one of: {', '.join(configs.LAYOUTS)}.")
    names = ModelNames.with_prefix(options.name_prefix)
    manifest = load_manifest(bundle_dir, options.expect_manifest_sha256)

    files: list[RepoFile] = []
    plugin_relpath: str | None = None
    verified: set[str] = set()  # checked already: each bundle file is read and hashed once
    version_dir = f"{names.pipeline}/{VERSION}"
    if options.layout == configs.BLS:
        if options.verify_checksums and options.platform == configs.ONNXRUNTIME:
            # The graphs are parsed (for their external data) before the other files are verified.
            graphs = [onnx_file(g) for g in (TEXT_KV, DENOISER)]
            verify_files(bundle_dir, manifest, graphs)
            verified.update(graphs)
        files, plugin_relpath = _graph_models(bundle_dir, manifest, names, options)
        if plugin_relpath is not None:
            verified.add(manifest.plugins.library)  # _plugin_library verified it (always, before anything else)
        files.append(RepoFile(f"{version_dir}/{MANIFEST_NAME}", source=bundle_dir / MANIFEST_NAME))
        scheduler_config = bundle_dir / SCHEDULER_CONFIG_NAME
        if scheduler_config.is_file():
            files.append(_bundle_file(bundle_dir, manifest, SCHEDULER_CONFIG_NAME, f"{version_dir}/{SCHEDULER_CONFIG_NAME}"))
    else:
        served = registry.serving_files(manifest, configs.runtime_backend(manifest, options.platform))
        if options.verify_checksums:
            verified.update(n for n in served if n in manifest.files)
            verify_files(bundle_dir, manifest, sorted(verified))
        files = _inprocess_files(bundle_dir, manifest, options.platform, served, version_dir)
        # Files the backend reads must be recorded (the scheduler config only where recorded: older bundles have
        # none and the model falls back to the default settings).
        unrecorded = [n for n in served if n not in manifest.files and n not in (MANIFEST_NAME, SCHEDULER_CONFIG_NAME)]
        if options.verify_checksums and unrecorded:
            verify_files(bundle_dir, manifest, unrecorded)

    pipeline_config = configs.pipeline_model_config(manifest, names, options)
    files.append(RepoFile(f"{names.pipeline}/{CONFIG_NAME}", text=pipeline_config.to_pbtxt()))
    files.append(RepoFile(f"{version_dir}/model.py", source=Path(pipeline_model.__file__)))
    files += _runtime_files(f"{version_dir}/nucleus_runtime")

    if options.verify_checksums:
        recorded = [f.bundle_name for f in files if f.bundle_name is not None and f.bundle_name not in verified]
        if recorded:
            verify_files(bundle_dir, manifest, recorded)

    plan = RepositoryPlan(
        names=names, platform=options.platform, files=files, plugin_library=plugin_relpath, layout=options.layout
    )
    files.append(RepoFile(README_NAME, text=serving.serving_notes(names, options.layout, options.platform, plugin_relpath,
                                                                manifest, options.stream_progress)))
    return plan


def _bundle_file(bundle_dir: Path, manifest: Manifest, name: str, relpath: str) -> RepoFile:
    return RepoFile(relpath, source=bundle_dir / name, bundle_name=name if name in manifest.files else None)


def _graph_models(
    bundle_dir: Path, manifest: Manifest, names: ModelNames, options: TritonOptions
) -> tuple[list[RepoFile], str | None]:
    """bls layout: the two graph models (config + graph file each) and the plugin library's place, if any."""
    files: list[RepoFile] = []
    for graph, name in ((TEXT_KV, names.text_kv), (DENOISER, names.denoiser)):
        config = configs.graph_model_config(manifest, graph, name, options.platform, options.instances)
        files.append(RepoFile(f"{name}/{CONFIG_NAME}", text=config.to_pbtxt()))
        if options.platform == configs.TENSORRT_PLAN:
            engine = _engine(bundle_dir, manifest, graph)
            model_file = f"{name}/{VERSION}/{configs.MODEL_FILENAMES[configs.TENSORRT_PLAN]}"
            files.append(_bundle_file(bundle_dir, manifest, engine.name, model_file))
        else:
            files += _onnx_files(bundle_dir, manifest, graph, f"{name}/{VERSION}")
    if options.platform != configs.TENSORRT_PLAN:
        return files, None
    library = _plugin_library(bundle_dir, manifest)
    if library is None:
        return files, None
    # Inside a model folder, not at the root: Triton would take a root folder without config.pbtxt for a broken
    # model. The denoiser is the graph with the MoE ops the plugins implement.
    path, sha256 = library
    plugin_relpath = f"{names.denoiser}/{PLUGIN_DIR}/{path.name}"
    files.append(RepoFile(plugin_relpath, source=path, bundle_name=_recorded_name(bundle_dir, manifest, path), sha256=sha256))
    return files, plugin_relpath


def _inprocess_files(bundle_dir: Path, manifest: Manifest, platform: str, served: list[str], version_dir: str) -> list[RepoFile]:
    """inprocess layout: the files the runtime backend reads (`served`, registry.serving_files; load_manifest has
    refused any path leading outside the bundle), under their bundle names in the version folder."""
    # Any engine the runtime loads is fine here, TensorRT-RTX ones included: the runtime's TensorRT backend loads
    # them with the library that built them (tensorrt_rtx), not with Triton's TensorRT backend.
    backend = configs.runtime_backend(manifest, platform)
    files = []
    for name in served:
        path = bundle_dir / name
        if name == SCHEDULER_CONFIG_NAME and not path.is_file():
            continue  # older bundles: the model falls back to the default scheduler settings
        if not path.is_file():
            if platform == configs.TENSORRT_PLAN:
                fix = f"build the engines ({_cli(BUILD)}), or serve the ONNX graphs with --platform onnxruntime."
            else:
                fix = f"copy the complete bundle, or export it again ({_cli(EXPORT)})."
            raise NucleusExportError(f"bundle {bundle_dir} has no file {name}, which the {backend} backend reads.", fix)
        files.append(_bundle_file(bundle_dir, manifest, name, f"{version_dir}/{name}"))
    return files


def _recorded_name(bundle_dir: Path, manifest: Manifest, path: Path) -> str | None:
    try:
        name = path.resolve().relative_to(bundle_dir.resolve()).as_posix()
    except ValueError:
        return None
    return name if name in manifest.files else None


def _engine(bundle_dir: Path, manifest: Manifest, graph: str) -> Path:
    """bls: the engine Triton's TensorRT backend serves; TensorRT-RTX engines are refused (it links full TensorRT)."""
    segments = manifest.graph_segments(graph)
    if segments:
        raise NucleusExportError(
            f"the {graph} of bundle {bundle_dir} is split into {len(segments)} segment engines; Triton's tensorrt_plan "
            "backend serves one engine per model.",
            "serve it with --layout inprocess (the runtime chains the segments), or build one engine "
            f"({_cli(BUILD + ' --segments 1')}) if it fits the build machine's memory.",
        )
    path = bundle_dir / plan_file(graph)
    if not path.is_file():
        raise NucleusExportError(
            f"bundle {bundle_dir} has no TensorRT engine {path.name}"
            + ("" if manifest.engine_flavors else " (its manifest records no engines)")
            + ", which --platform tensorrt_plan serves.",
            f"build the engines first ({_cli(BUILD)}), or serve the ONNX graphs with --platform onnxruntime.",
        )
    record = manifest.engine(graph)
    if record is not None and record.flavor == TENSORRT_RTX:
        # Triton's tensorrt backend links full TensorRT, which cannot deserialize TensorRT-RTX engines.
        raise NucleusExportError(
            f"{path} was built with TensorRT-RTX; Triton's tensorrt_plan backend runs full TensorRT engines only.",
            "serve them in-process (--layout inprocess, the runtime loads TensorRT-RTX engines), build full TensorRT "
            f"engines ({_cli(BUILD + ' --backend tensorrt')}, on a GPU machine with your Triton release's TensorRT), "
            "or serve the ONNX graphs with --platform onnxruntime.",
        )
    return path


def _onnx_files(bundle_dir: Path, manifest: Manifest, graph: str, version_dir: str) -> list[RepoFile]:
    """The graph as model.onnx plus every external-data file it references, under the name it references."""
    import onnx
    from onnx.external_data_helper import _get_all_tensors, uses_external_data

    path = bundle_dir / onnx_file(graph)
    if not path.is_file():
        raise NucleusExportError(
            f"bundle {bundle_dir} has no {path.name}, which --platform onnxruntime serves.",
            f"export the bundle again ({_cli(EXPORT)}).",
        )
    model = onnx.load(str(path), load_external_data=False)
    locations: set[str] = set()
    for tensor in _get_all_tensors(model):
        if uses_external_data(tensor):
            locations.update(e.value for e in tensor.external_data if e.key == "location")
    files = [_bundle_file(bundle_dir, manifest, path.name, f"{version_dir}/{configs.MODEL_FILENAMES[configs.ONNXRUNTIME]}")]
    for location in sorted(locations):
        # ONNX resolves external data relative to the model file, so the data keeps its name next to model.onnx.
        data = bundle_dir / location
        if not data.is_file() or Path(location).is_absolute() or ".." in Path(location).parts:
            raise NucleusExportError(
                f"{path.name} references external data '{location}', which is not a file inside {bundle_dir}.",
                f"copy the complete bundle (with its .onnx.data files), or export it again ({_cli(EXPORT)}).",
            )
        files.append(_bundle_file(bundle_dir, manifest, location, f"{version_dir}/{location}"))
    return files


def _plugin_library(bundle_dir: Path, manifest: Manifest) -> tuple[Path, str] | None:
    """The verified plugin library (path, sha256) the engines need, or None when they were built without plugins."""
    try:
        return plugins.bundle_plugin_library(bundle_dir, manifest)
    except NucleusError as exc:
        raise NucleusExportError(
            f"the engines of bundle {bundle_dir} use TensorRT plugins, but their plugin library cannot be used: "
            f"{exc.problem}",
            f"build the engines again with the library ({_cli(f'{BUILD} --moe plugin --plugins build/{PLUGIN_LIBRARY_NAME}')}), "
            "which copies it into the bundle.",
        ) from None


def _runtime_files(dest: str) -> list[RepoFile]:
    root = Path(nucleus_runtime.__file__).parent
    return [
        RepoFile(f"{dest}/{p.relative_to(root).as_posix()}", source=p)
        for p in sorted(root.rglob("*.py"))
        if "__pycache__" not in p.parts
    ]


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
    in, and only then the old one deleted. Bundle files are hard-linked when the file system allows, else copied and
    the copy checked against the source's checksum.
    """
    repo = Path(repo).absolute()
    check_target(repo, force)
    with atomic_dir(repo) as tmp:
        for f in plan.files:
            dest = tmp / f.relpath
            dest.parent.mkdir(parents=True, exist_ok=True)
            if f.text is not None:
                dest.write_text(f.text)
            elif f.bundle_name is None or not _hard_link(f.source, dest):  # type: ignore[arg-type]
                shutil.copyfile(f.source, dest)  # type: ignore[arg-type]
                if f.bundle_name is not None and sha256_file(dest) != sha256_file(f.source):  # type: ignore[arg-type]
                    raise NucleusExportError(
                        f"the copy of {f.source} in the repository differs from the original.",
                        "check the target file system (space, errors) and run the command again.",
                    )
            if f.sha256 is not None and sha256_file(dest) != f.sha256:
                raise NucleusExportError(
                    f"{f.source} changed while the repository was written (it fails its recorded sha256).",
                    "copy the bundle again from its source and rerun.",
                )


def _hard_link(source: Path, dest: Path) -> bool:
    """Link instead of copying a (possibly multi-GB) bundle file; False where the file system refuses."""
    try:
        os.link(source, dest)
    except OSError:  # another file system (EXDEV), no hard links (EPERM, e.g. fs.protected_hardlinks), ...
        return False
    return True


def _size(nbytes: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if nbytes < 1024 or unit == "GiB":
            return f"{nbytes:.0f} {unit}" if unit == "B" else f"{nbytes:.1f} {unit}"
        nbytes /= 1024  # type: ignore[assignment]
    return f"{nbytes} B"
