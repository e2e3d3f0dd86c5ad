"""The bundle directory and its manifest: the artifact contract between export, build, runtime and Triton.

A bundle holds one ONNX graph per stage (`text_kv.onnx`, `denoiser.onnx`, their segments, external data or hard links
to the checkpoint's shards), optionally engines (`<unit>.plan`, built from `<unit>.engine.onnx`), the scheduler
config, the quantization recipe, reports, and `manifest.json`: what the graphs expect (io, profiles), how they were
made (precision, quantization, engine records), an identity per graph (the digest of exactly the bytes it reads) and
a checksum per file. The records are typed (nucleus_runtime.records): reading a manifest checks every field.

Format 2 groups everything per stage; format-1 manifests (nucleus-export before stages) load through `_from_v1`.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import re
from pathlib import Path
from typing import Any

from nucleus_runtime.contract import (
    CHECKPOINT_LINKS_DIR,
    COMBINE_FORMULATIONS,
    COMBINE_ONEHOT,
    GRAPHS,
    MANIFEST_NAME,
    MOE_LOWERINGS,
    MOE_NATIVE,
    MOE_PLUGIN,
    OPTIONAL_STAGES,
    SCHEME_SUFFIXES,
    SEGMENT_SLICED_INPUTS,
    STAGES,
    TENSORRT_MODULES,
    checkpoint_links_dir,
    external_data_file,
    graph_of_unit,
    onnx_file,
    precision_label,
)
from nucleus_runtime.errors import NucleusError
from nucleus_runtime.records import RelPath, Sha256, check_relpath, from_json, to_json

FORMAT_VERSION = 2
DAMAGED_FIX = "the manifest was damaged or edited: copy the bundle again from its source, or export it again."
_SHA256 = re.compile(r"[0-9a-f]{64}")


def _refuse(problem: str) -> None:
    raise NucleusError(f"{MANIFEST_NAME}: {problem}", DAMAGED_FIX)


@dataclasses.dataclass(frozen=True)
class TensorSpec:
    """One graph input or output: ONNX element type name ("float32", "bfloat16", "int64", ...) and symbolic shape."""

    dtype: str
    shape: list[int | str]


@dataclasses.dataclass(frozen=True)
class GraphIO:
    inputs: dict[str, TensorSpec]
    outputs: dict[str, TensorSpec]


@dataclasses.dataclass(frozen=True)
class Profiles:
    """Shape ranges a bundle serves. Resolutions are in image pixels, grids in latent patches (rows, cols)."""

    batch: tuple[int, int, int]
    text_len: tuple[int, int, int]
    resolutions: list[tuple[int, int]]
    grids: list[tuple[int, int]]
    opt_resolution: tuple[int, int]

    def __post_init__(self) -> None:
        for name in ("batch", "text_len"):
            value = tuple(getattr(self, name))
            if len(value) != 3 or not 1 <= value[0] <= value[1] <= value[2]:
                _refuse(f"profiles.{name} is {list(getattr(self, name))}; expected [min, opt, max] with 1 <= min <= opt <= max.")
        if not self.resolutions or len(self.grids) != len(self.resolutions):
            _refuse(f"profiles has {len(self.resolutions)} resolutions and {len(self.grids)} grids; expected one grid per resolution.")
        if any(v < 1 for pair in (*self.resolutions, *self.grids) for v in pair):
            _refuse("profiles holds a resolution or grid that is not positive.")
        if tuple(self.opt_resolution) not in [tuple(r) for r in self.resolutions]:
            _refuse(f"profiles.opt_resolution {list(self.opt_resolution)} is not one of profiles.resolutions.")

    @property
    def pixels_per_patch(self) -> int:
        """Image pixels per latent patch side (the VAE's scale factor times the patch size), as the profiles were made."""
        return self.resolutions[0][0] // self.grids[0][0]

    @property
    def image_tokens(self) -> tuple[int, int, int]:
        tokens = [h * w for h, w in self.grids]
        opt_grid = self.grids[[tuple(r) for r in self.resolutions].index(tuple(self.opt_resolution))]
        return min(tokens), opt_grid[0] * opt_grid[1], max(tokens)


@dataclasses.dataclass(frozen=True)
class FileRecord:
    sha256: Sha256
    bytes: int


@dataclasses.dataclass(frozen=True)
class LoweringRecord:
    """How an engine computes the MoE ops: native layers (with the combine's formulation) or the plugins."""

    moe: str
    combine: str | None = None

    def __post_init__(self) -> None:
        if self.moe not in MOE_LOWERINGS:
            _refuse(f"MoE lowering {self.moe!r} is not one of {', '.join(MOE_LOWERINGS)}.")
        if (self.moe == MOE_NATIVE) != (self.combine is not None) or (self.combine and self.combine not in COMBINE_FORMULATIONS):
            _refuse(f"lowering {self.moe!r} with combine {self.combine!r}: native lowerings name one of "
                    f"{', '.join(COMBINE_FORMULATIONS)}, plugin lowerings none.")


@dataclasses.dataclass(frozen=True)
class EngineRecord:
    """One engine unit's plan (`<unit>.plan`, built from `<unit>.engine.onnx`).

    Attributes:
        flavor: the TensorRT that built it ("tensorrt" or "tensorrt-rtx"); a plan loads only in that library.
        version: that library's version.
        lowering: how it computes the MoE ops; None for a stage that has none (text encoder, VAE decoder).
        compute_capabilities: the targets it was built for ("SM89", ...); None: the builder's GPU (full TensorRT).
        stripped: a weight-stripped plan, refit at load from its engine ONNX.
        weight_streaming: built with streamable weights.
    """

    flavor: str
    version: str
    lowering: LoweringRecord | None
    compute_capabilities: list[str] | None = None
    stripped: bool = False
    weight_streaming: bool = False

    def __post_init__(self) -> None:
        if self.flavor not in TENSORRT_MODULES:
            _refuse(f"engine flavor {self.flavor!r} is not one of {', '.join(TENSORRT_MODULES)}.")


@dataclasses.dataclass(frozen=True)
class SegmentRecord:
    """Consecutive blocks [first, last) of a stage's graph as a graph of their own (`<name>.onnx`), reading
    text_kv[first:last]; `inputs`/`outputs` are what it takes from and hands to the other segments."""

    name: str
    blocks: tuple[int, int]
    inputs: list[str]
    outputs: list[str]
    digest: str

    def __post_init__(self) -> None:
        check_relpath(self.name, f"{MANIFEST_NAME}: segment name", DAMAGED_FIX)
        if not 0 <= self.blocks[0] < self.blocks[1]:
            _refuse(f"segment {self.name} has blocks {list(self.blocks)}; expected [first, last) with first < last.")


@dataclasses.dataclass(frozen=True)
class StageRecord:
    """One stage of the pipeline (contract.STAGES): its graph `<stage>.onnx`, the identity of exactly the bytes that
    graph reads (`digest`: the graph and every weight range of its external data or linked shards), its segments
    ([]: one piece), its engines by unit (the stage, or each segment), the facts about it a runtime needs
    (`config`; the text encoder's and the VAE decoder's, see docs/contract.md) and its own precision label
    (`precision`: stages differ, text_kv and the VAE decoder are never quantized; None in bundles written before
    stages recorded it, whose stages share the manifest's)."""

    io: GraphIO
    digest: str
    segments: list[SegmentRecord] = dataclasses.field(default_factory=list)
    engines: dict[str, EngineRecord] = dataclasses.field(default_factory=dict)
    config: dict[str, Any] = dataclasses.field(default_factory=dict)
    precision: str | None = None


@dataclasses.dataclass(frozen=True)
class PluginRecord:
    """The TensorRT plugin library the engines need (its checksum is the `files` record of `library`)."""

    library: RelPath
    ops: list[str]
    namespace: str
    version: str


@dataclasses.dataclass(frozen=True)
class QuantizationRecord:
    """A quantized build: its scheme; the recipe (per-GEMM modes, scales) is contract.QUANT_RECIPE_NAME."""

    scheme: str

    def __post_init__(self) -> None:
        if self.scheme not in SCHEME_SUFFIXES:
            _refuse(f"quantization scheme {self.scheme!r} is not one of {', '.join(SCHEME_SUFFIXES)}.")


# The model_config entries the runtime reads (rope axes, patching, text width).
_RUNTIME_CONFIG_INTS = ("patch_size", "in_channels", "joint_attention_dim", "num_layers")


@dataclasses.dataclass(frozen=True)
class Manifest:
    """Everything a consumer needs to know about a bundle without opening the graphs."""

    model_config: dict[str, Any]
    config_hash: str
    precision: str
    profiles: Profiles
    stages: dict[str, StageRecord]
    files: dict[str, FileRecord]
    quantization: QuantizationRecord | None = None
    plugins: PluginRecord | None = None
    tools: dict[str, str] = dataclasses.field(default_factory=dict)
    format_version: int = FORMAT_VERSION

    def __post_init__(self) -> None:
        if self.format_version != FORMAT_VERSION:
            _refuse(f"format version {self.format_version} is not {FORMAT_VERSION}.")
        for key in _RUNTIME_CONFIG_INTS:
            value = self.model_config.get(key)
            if type(value) is not int or value < 1:
                _refuse(f"model_config.{key} is {value!r}; expected a positive integer.")
        axes = self.model_config.get("axes_dims_rope")
        if not (isinstance(axes, list) and len(axes) == 3 and all(type(a) is int and a > 0 for a in axes)):
            _refuse(f"model_config.axes_dims_rope is {axes!r}; expected three positive integers.")
        for relpath in self.files:
            check_relpath(relpath, f"{MANIFEST_NAME}: files entry", DAMAGED_FIX)
        missing = [g for g in GRAPHS if g not in self.stages]
        unknown = [g for g in self.stages if g not in STAGES]
        if missing or unknown:
            _refuse(f"stages are {sorted(self.stages)}; expected {', '.join(GRAPHS)} and optionally "
                    f"{', '.join(OPTIONAL_STAGES)}.")
        for graph, stage in self.stages.items():
            names = {seg.name for seg in stage.segments}
            if any(graph_of_unit(s) != graph for s in names) or set(stage.engines) - ({graph} | names):
                _refuse(f"stages.{graph} names segments or engines of another stage ({sorted(names | set(stage.engines))}).")
        uses_plugins = any(e.lowering is not None and e.lowering.moe == MOE_PLUGIN
                           for s in self.stages.values() for e in s.engines.values())
        if uses_plugins and self.plugins is None:
            _refuse("the engines use TensorRT plugins (lowering 'plugin') but there is no plugins record, so the plugin "
                    "library cannot be verified.")
        if self.plugins is not None and self.plugins.library not in self.files:
            _refuse(f"the plugin library {self.plugins.library!r} has no checksum in 'files'.")

    # ---- stages and engine units -----------------------------------------------------------------------------

    def units(self, graph: str) -> list[str]:
        """What of a stage has its own graph and engine, in execution order: its segments, or the stage itself."""
        segments = self.stages[graph].segments
        return [seg.name for seg in segments] if segments else [graph]

    @property
    def stage_names(self) -> list[str]:
        """The bundle's stages in execution order."""
        return [graph for graph in STAGES if graph in self.stages]

    def engine_units(self, graphs: tuple[str, ...] | None = None) -> list[str]:
        """Every unit of the given stages (default: all of the bundle's) in execution order."""
        return [unit for graph in self.stage_names if graphs is None or graph in graphs for unit in self.units(graph)]

    def graph_segments(self, graph: str) -> list[SegmentRecord]:
        return list(self.stages[graph].segments)

    def unit_records(self, graph: str, segments: bool = True) -> list[SegmentRecord]:
        """What a runtime runs of a stage that can be cut (contract.SEGMENT_SLICED_INPUTS), in order: its segments
        (unless `segments` is False), or one record of the whole graph (all its layers, its own inputs and outputs),
        so one loop runs both."""
        stage = self.stages[graph]
        if stage.segments and segments:
            return list(stage.segments)
        layers = stage.io.inputs[SEGMENT_SLICED_INPUTS[graph][0]].shape[0]
        if type(layers) is not int:
            _refuse(f"stages.{graph}.io gives {SEGMENT_SLICED_INPUTS[graph][0]} a symbolic layer count {layers!r}.")
        return [SegmentRecord(graph, (0, layers), list(stage.io.inputs), list(stage.io.outputs), stage.digest)]

    def stage_precision(self, graph: str) -> str:
        """A stage's precision label ('bf16', 'bf16+fp8', ...): its own, or the bundle's for older manifests."""
        return self.stages[graph].precision or self.precision_label

    def engine(self, unit: str) -> EngineRecord | None:
        return self.stages[graph_of_unit(unit)].engines.get(unit)

    def unit_digest(self, unit: str) -> str:
        """The identity of exactly the bytes the unit's ONNX graph reads."""
        stage = self.stages[graph_of_unit(unit)]
        for seg in stage.segments:
            if seg.name == unit:
                return seg.digest
        return stage.digest

    @property
    def engine_flavors(self) -> set[str]:
        return {e.flavor for s in self.stages.values() for e in s.engines.values()}

    @property
    def identity(self) -> str:
        """One digest for the whole bundle's computation: two bundles with equal identities compute the same thing
        from the same bytes (what "is this the same bundle?" asks)."""
        digest = hashlib.sha256(self.precision.encode())
        for unit in self.engine_units():
            digest.update(f"|{unit}={self.unit_digest(unit)}".encode())
        return digest.hexdigest()

    # ---- precision -------------------------------------------------------------------------------------------

    @property
    def precision_label(self) -> str:
        return precision_label(self.precision, self.quantization.scheme if self.quantization else None)

    @property
    def io(self) -> dict[str, GraphIO]:
        return {graph: stage.io for graph, stage in self.stages.items()}

    # ---- resolutions -----------------------------------------------------------------------------------------

    def grid_for(self, height: int, width: int) -> tuple[int, int]:
        """Latent patch grid of a pixel resolution the bundle serves; a clear error for any other."""
        resolutions = [tuple(r) for r in self.profiles.resolutions]
        if (height, width) in resolutions:
            return tuple(self.profiles.grids[resolutions.index((height, width))])  # type: ignore[return-value]
        served = ", ".join(f"{h}x{w}" for h, w in self.profiles.resolutions)
        raise NucleusError(
            f"resolution {height}x{width} is not in this bundle's profiles ({served}).",
            "pick one of those sizes, or export the bundle again with --resolutions including it.",
        )

    # ---- JSON ------------------------------------------------------------------------------------------------

    def to_json(self) -> str:
        return json.dumps(to_json(self), indent=2, sort_keys=True)

    @classmethod
    def from_dict(cls, raw: object) -> Manifest:
        """A manifest from parsed JSON (format 2, or format 1 migrated), every field checked."""
        if isinstance(raw, dict) and raw.get("format_version") == 1:
            raw = _from_v1(raw)
        version = raw.get("format_version") if isinstance(raw, dict) else None
        if type(version) is int and version != FORMAT_VERSION:
            raise NucleusError(
                f"{MANIFEST_NAME} has format version {version}; this runtime reads versions 1 and "
                f"{FORMAT_VERSION}.",
                "export the bundle again with this version of nucleus-export.",
            )
        return from_json(cls, raw, MANIFEST_NAME, DAMAGED_FIX)


# ---- format 1 -----------------------------------------------------------------------------------------------------


def _legacy_digest(files: dict[str, Any], graph: str) -> str:
    """Format 1 recorded no graph identities: the digest of every recorded file the graph may read (the graph, its
    data file, every linked shard, whole). Conservative: a bundle that differs anywhere in those files differs."""
    digest = hashlib.sha256(b"format-1")
    for relpath in sorted(files):
        if relpath in (onnx_file(graph), external_data_file(graph_of_unit(graph))) or relpath.startswith(CHECKPOINT_LINKS_DIR + "/"):
            digest.update(f"|{relpath}={files[relpath].get('sha256') if isinstance(files[relpath], dict) else None}".encode())
    return "files:" + digest.hexdigest()


def _from_v1(raw: dict[str, Any]) -> dict[str, Any]:
    """A format-1 manifest (top-level io, segments, engines and moe_lowering; dict records) in format 2."""
    files = raw.get("files") or {}
    stages: dict[str, Any] = {}
    top_lowering = raw.get("moe_lowering")
    for graph in GRAPHS:
        segments = [
            {"name": s.get("name"), "blocks": s.get("blocks"), "inputs": s.get("inputs"), "outputs": s.get("outputs"),
             "digest": _legacy_digest(files, str(s.get("name")))}
            for s in ((raw.get("segments") or {}).get(graph) or [])
            if isinstance(s, dict)
        ]
        engines = {}
        for unit, record in (raw.get("engines") or {}).items():
            if not isinstance(record, dict) or graph_of_unit(unit) != graph:
                continue
            moe = record.get("moe_lowering", top_lowering)
            combine = (record.get("combine") or {}).get("formulation", COMBINE_ONEHOT) if moe == MOE_NATIVE else None
            engines[unit] = {
                "flavor": record.get("backend"),
                "version": record.get("backend_version"),
                "lowering": {"moe": moe, "combine": combine},
                "compute_capabilities": record.get("compute_capabilities"),
                "stripped": bool(record.get("stripped")),
                "weight_streaming": bool(record.get("weight_streaming")),
            }
        stages[graph] = {
            "io": (raw.get("io") or {}).get(graph),
            "digest": _legacy_digest(files, graph),
            "segments": segments,
            "engines": engines,
        }
    plugins = raw.get("plugins")
    quantization = raw.get("quantization")
    return {
        "format_version": FORMAT_VERSION,
        "model_config": raw.get("model_config"),
        "config_hash": raw.get("config_hash"),
        "precision": raw.get("precision"),
        "profiles": raw.get("profiles"),
        "stages": stages,
        "files": files,
        "quantization": None if not isinstance(quantization, dict) else {"scheme": quantization.get("scheme")},
        "plugins": None if not isinstance(plugins, dict) else {
            k: plugins.get(k) for k in ("library", "ops", "namespace", "version")
        },
        "tools": raw.get("tools") or {},
    }


# ---- files --------------------------------------------------------------------------------------------------------


def sha256_file(path: Path, chunk: int = 8 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def bundle_files(bundle_dir: Path) -> list[str]:
    """Bundle-relative paths of every file a manifest records: subfolders included, the manifest itself and hidden
    files (temporaries of atomic writes) excluded."""
    return sorted(
        p.relative_to(bundle_dir).as_posix()
        for p in Path(bundle_dir).rglob("*")
        if p.is_file() and p.name != MANIFEST_NAME and not p.name.startswith(".")
    )


def file_record(bundle_dir: Path, relpath: str) -> FileRecord:
    path = Path(bundle_dir) / relpath
    return FileRecord(sha256_file(path), path.stat().st_size)


def inside(root: Path, relpath: str, what: str, fix: str = DAMAGED_FIX) -> Path:
    """root/relpath, refused when the path or a symlink on it leads outside root."""
    check_relpath(relpath, what, fix)
    path = Path(root) / relpath
    if not path.resolve().is_relative_to(Path(root).resolve()):
        raise NucleusError(f"{what} {relpath!r} is a symlink that leads outside {root}.", fix)
    return path


def check_sha256_hex(value: str) -> str:
    """A sha256 as the user pins it (`sha256sum manifest.json`): 64 hex digits, any case."""
    digest = value.strip().lower()
    if not _SHA256.fullmatch(digest):
        raise NucleusError(f"{value!r} is not a sha256 (64 hex digits).", f"pass the output of `sha256sum {MANIFEST_NAME}`.")
    return digest


def load_manifest(bundle_dir: Path, expect_sha256: str | None = None) -> Manifest:
    """Read and validate a bundle's manifest.

    Args:
        bundle_dir: the bundle folder.
        expect_sha256: the manifest's sha256 as the user pinned it. The manifest holds every other file's checksum,
            so pinning it pins the whole bundle: without it, checksums catch corruption but not a deliberate change.

    Raises:
        NucleusError: no manifest, a pinned hash that differs, or a damaged manifest (unreadable JSON, a field of the
            wrong type, a path leading outside the bundle, a plugin bundle without a verifiable library).
    """
    path = Path(bundle_dir) / MANIFEST_NAME
    if not path.is_file():
        raise NucleusError(
            f"{bundle_dir} has no {MANIFEST_NAME}: it is not a nucleus-export bundle.",
            "run `nucleus-export export` (or `build`) to create one.",
        )
    data = path.read_bytes()
    if expect_sha256 is not None:
        actual = hashlib.sha256(data).hexdigest()
        if actual != check_sha256_hex(expect_sha256):
            raise NucleusError(
                f"{path} has sha256 {actual}, not the pinned {expect_sha256.strip().lower()}: the bundle is not the one "
                "you trusted.",
                "get the bundle again from its trusted source, or pin the new hash only if you trust the change.",
            )
    try:
        raw = json.loads(data)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise NucleusError(f"{path} is not valid JSON ({exc}).", DAMAGED_FIX) from None
    return Manifest.from_dict(raw)


def verify_files(bundle_dir: Path, manifest: Manifest, names: list[str] | None = None) -> None:
    """Check that the named files (default: all recorded) are inside the bundle, exist and match their sha256."""
    for relpath in list(manifest.files) if names is None else names:
        record = manifest.files.get(relpath)
        if record is None:
            raise NucleusError(f"{relpath} is not recorded in {bundle_dir}/{MANIFEST_NAME}.", DAMAGED_FIX)
        path = inside(bundle_dir, relpath, f"{MANIFEST_NAME}: files entry")
        if not path.exists():
            raise NucleusError(f"bundle file {path} is missing.", "copy the complete bundle, or export it again.")
        if not path.is_file():
            raise NucleusError(f"bundle file {path} is not a regular file.", "copy the bundle again, or export it again.")
        if path.stat().st_size != record.bytes or sha256_file(path) != record.sha256:
            raise NucleusError(
                f"bundle file {path} does not match its checksum in {MANIFEST_NAME}: it was changed or truncated.",
                "copy the bundle again, or export it again.",
            )


def stage_files(manifest: Manifest, graph: str) -> list[str]:
    """The recorded files the ONNX graphs of a stage read: its graph or segment graphs, their data, linked shards."""
    units = manifest.units(graph)
    graphs = [onnx_file(graph)] + [onnx_file(u) for u in units if u != graph]
    links = checkpoint_links_dir(graph) + "/"
    data = [f for f in manifest.files if f == external_data_file(graph) or (f.startswith(links) and "/" not in f[len(links):])]
    return graphs + data


__all__ = [
    "DAMAGED_FIX",
    "EngineRecord",
    "FileRecord",
    "GraphIO",
    "LoweringRecord",
    "Manifest",
    "PluginRecord",
    "Profiles",
    "QuantizationRecord",
    "SegmentRecord",
    "StageRecord",
    "TensorSpec",
    "bundle_files",
    "check_relpath",
    "check_sha256_hex",
    "file_record",
    "inside",
    "load_manifest",
    "sha256_file",
    "stage_files",
    "verify_files",
]
