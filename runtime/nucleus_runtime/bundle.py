"""The bundle directory and its manifest: the artifact contract between export, runtime and Triton.

A bundle holds `text_kv.onnx`, `denoiser.onnx` (plus external data), optionally `text_kv.plan`/`denoiser.plan`,
`scheduler_config.json` and `manifest.json`. The manifest records what the graphs expect (names, dtypes, shapes,
profiles), how they were made (precision, quantization, MoE lowering, tool versions) and a checksum per file.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import re
from pathlib import Path
from typing import Any

from nucleus_runtime.atomic import write_atomic  # noqa: F401 - the bundle writers' name for the shared helper
from nucleus_runtime.contract import (
    GRAPHS,
    MANIFEST_NAME,
    MOE_PLUGIN,
)
from nucleus_runtime.errors import NucleusError

FORMAT_VERSION = 1



@dataclasses.dataclass
class TensorSpec:
    """One graph input or output: ONNX element type name ("float32", "bfloat16", "int64", ...) and symbolic shape."""

    dtype: str
    shape: list[int | str]


@dataclasses.dataclass
class Profiles:
    """Shape ranges a bundle serves. Resolutions are in image pixels, grids in latent patches (rows, cols)."""

    batch: tuple[int, int, int]
    text_len: tuple[int, int, int]
    resolutions: list[tuple[int, int]]
    grids: list[tuple[int, int]]
    opt_resolution: tuple[int, int]

    @property
    def image_tokens(self) -> tuple[int, int, int]:
        tokens = [h * w for h, w in self.grids]
        opt_grid = self.grids[self.resolutions.index(tuple(self.opt_resolution))]
        return min(tokens), opt_grid[0] * opt_grid[1], max(tokens)


@dataclasses.dataclass
class Manifest:
    """Everything a consumer needs to know about a bundle without opening the graphs."""

    model_config: dict[str, Any]
    config_hash: str
    precision: str
    moe_lowering: str
    profiles: Profiles
    io: dict[str, dict[str, dict[str, TensorSpec]]]
    files: dict[str, dict[str, Any]] = dataclasses.field(default_factory=dict)
    quantization: dict[str, Any] | None = None
    engines: dict[str, Any] | None = None
    plugins: dict[str, Any] | None = None
    tools: dict[str, str] = dataclasses.field(default_factory=dict)
    format_version: int = FORMAT_VERSION
    # Graph name -> its segments in execution order (docs/contract.md "Segments"); None: every graph is one piece.
    segments: dict[str, list[dict[str, Any]]] | None = None

    def graph_segments(self, graph: str) -> list[dict[str, Any]]:
        """The graph's segment records (index, name, blocks, text_kv_layers, inputs, outputs, onnx, plan?), or []."""
        return list((self.segments or {}).get(graph) or [])

    def engine_units(self) -> list[str]:
        """What has its own graph and engine, in execution order: text_kv, then the denoiser or its segments."""
        units = []
        for graph in GRAPHS:
            segments = self.graph_segments(graph)
            units += [seg["name"] for seg in segments] if segments else [graph]
        return units

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), indent=2, sort_keys=True)

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> Manifest:
        raw = dict(raw)
        p = raw["profiles"]
        raw["profiles"] = Profiles(
            batch=tuple(p["batch"]),
            text_len=tuple(p["text_len"]),
            resolutions=[tuple(r) for r in p["resolutions"]],
            grids=[tuple(g) for g in p["grids"]],
            opt_resolution=tuple(p["opt_resolution"]),
        )
        raw["io"] = {
            graph: {side: {name: TensorSpec(**spec) for name, spec in specs.items()} for side, specs in sides.items()}
            for graph, sides in raw["io"].items()
        }
        return cls(**raw)

    def grid_for(self, height: int, width: int) -> tuple[int, int]:
        """Latent patch grid of a pixel resolution the bundle serves; a clear error for any other."""
        if (height, width) in [tuple(r) for r in self.profiles.resolutions]:
            return self.profiles.grids[self.profiles.resolutions.index((height, width))]
        served = ", ".join(f"{h}x{w}" for h, w in self.profiles.resolutions)
        raise NucleusError(
            f"resolution {height}x{width} is not in this bundle's profiles ({served}).",
            "pick one of those sizes, or export the bundle again with --resolutions including it.",
        )


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


def file_record(bundle_dir: Path, relpath: str) -> dict[str, Any]:
    path = bundle_dir / relpath
    return {"sha256": sha256_file(path), "bytes": path.stat().st_size}


_DAMAGED_FIX = "the manifest was damaged or edited: copy the bundle again from its source, or export it again."
_SHA256 = re.compile(r"[0-9a-f]{64}")


def check_relpath(relpath: object, what: str, fix: str = _DAMAGED_FIX) -> str:
    """A path recorded in a manifest or index must be relative and stay inside its folder: no absolute path, no
    drive, no backslash, no `..`, `.` or empty component. Returns it unchanged."""
    parts = relpath.split("/") if isinstance(relpath, str) else []
    if (
        not parts
        or any(part in ("", ".", "..") for part in parts)
        or "\\" in relpath  # type: ignore[operator]
        or "\0" in relpath  # type: ignore[operator]
        or re.match(r"^[A-Za-z]:", relpath)  # type: ignore[arg-type]
    ):
        raise NucleusError(f"{what} {relpath!r} is not a relative path inside its folder.", fix)
    return relpath  # type: ignore[return-value]


def inside(root: Path, relpath: str, what: str, fix: str = _DAMAGED_FIX) -> Path:
    """root/relpath, refused when the path or a symlink on it leads outside root."""
    check_relpath(relpath, what, fix)
    path = Path(root) / relpath
    if not path.resolve().is_relative_to(Path(root).resolve()):
        raise NucleusError(f"{what} {relpath!r} is a symlink that leads outside {root}.", fix)
    return path


def _kind(value: object) -> str:
    return "null" if value is None else type(value).__name__


def _expect(ok: bool, where: str, value: object, expected: str) -> None:
    if not ok:
        shown = repr(value) if len(repr(value)) <= 60 else repr(value)[:57] + "..."
        raise NucleusError(f"{MANIFEST_NAME}: {where} is {shown} ({_kind(value)}); expected {expected}.", _DAMAGED_FIX)


def _is_int(value: object, minimum: int = 0) -> bool:
    return type(value) is int and value >= minimum


def _is_int_list(value: object, length: int | None = None, minimum: int = 0) -> bool:
    return isinstance(value, list) and (length is None or len(value) == length) and all(_is_int(v, minimum) for v in value)


# Top-level fields: (JSON type, required). Everything a consumer reads is checked before it is used, so a damaged
# manifest fails with one line naming the field instead of somewhere deep in a backend.
_FIELDS: dict[str, tuple[tuple[type, ...], bool]] = {
    "model_config": ((dict,), True),
    "config_hash": ((str,), True),
    "precision": ((str,), True),
    "moe_lowering": ((str,), True),
    "profiles": ((dict,), True),
    "io": ((dict,), True),
    "files": ((dict,), True),
    "quantization": ((dict, type(None)), False),
    "engines": ((dict, type(None)), False),
    "plugins": ((dict, type(None)), False),
    "segments": ((dict, type(None)), False),
    "tools": ((dict,), False),
    "format_version": ((int,), True),
}
# The model_config entries the runtime reads (rope axes, patching, text width).
_RUNTIME_CONFIG_INTS = ("patch_size", "in_channels", "joint_attention_dim", "num_layers")


def validate_manifest(raw: object) -> None:
    """Check a parsed manifest's structure, types and paths; raises NucleusError naming the first bad field."""
    _expect(isinstance(raw, dict), "the top level", raw, "an object")
    assert isinstance(raw, dict)
    unknown = sorted(set(raw) - set(_FIELDS))
    if unknown:
        raise NucleusError(f"{MANIFEST_NAME} has unknown fields {', '.join(unknown)}.", _DAMAGED_FIX)
    for name, (types, required) in _FIELDS.items():
        if name not in raw:
            if required:
                raise NucleusError(f"{MANIFEST_NAME} has no field '{name}'.", _DAMAGED_FIX)
            continue
        value = raw[name]
        _expect(isinstance(value, types) and not isinstance(value, bool), f"field '{name}'", value,
                " or ".join("null" if t is type(None) else {dict: "an object", str: "a string", int: "an integer"}[t] for t in types))
    if raw["format_version"] != FORMAT_VERSION:
        raise NucleusError(
            f"{MANIFEST_NAME} has format version {raw['format_version']}; this runtime reads version {FORMAT_VERSION}.",
            "export the bundle again with this version of nucleus-export.",
        )
    config = raw["model_config"]
    for key in _RUNTIME_CONFIG_INTS:
        _expect(_is_int(config.get(key), 1), f"model_config.{key}", config.get(key), "a positive integer")
    _expect(_is_int_list(config.get("axes_dims_rope"), 3, 1), "model_config.axes_dims_rope", config.get("axes_dims_rope"),
            "three positive integers")

    profiles = raw["profiles"]
    for key in ("batch", "text_len"):
        value = profiles.get(key)
        _expect(_is_int_list(value, 3, 1) and value[0] <= value[1] <= value[2], f"profiles.{key}", value, "[min, opt, max] with 1 <= min <= opt <= max")
    resolutions, grids = profiles.get("resolutions"), profiles.get("grids")
    for key, value in (("resolutions", resolutions), ("grids", grids)):
        _expect(isinstance(value, list) and bool(value) and all(_is_int_list(v, 2, 1) for v in value), f"profiles.{key}", value,
                "a non-empty list of [height, width] pairs")
    _expect(len(grids) == len(resolutions), "profiles.grids", grids, f"one grid per resolution ({len(resolutions)})")
    _expect(profiles.get("opt_resolution") in resolutions, "profiles.opt_resolution", profiles.get("opt_resolution"),
            "one of profiles.resolutions")

    for graph in GRAPHS:
        sides = raw["io"].get(graph)
        _expect(isinstance(sides, dict) and set(sides) == {"inputs", "outputs"}, f"io.{graph}", sides, "an object with inputs and outputs")
        for side, specs in sides.items():
            _expect(isinstance(specs, dict), f"io.{graph}.{side}", specs, "an object")
            for tensor, spec in specs.items():
                ok = isinstance(spec, dict) and set(spec) == {"dtype", "shape"} and isinstance(spec["dtype"], str) and (
                    isinstance(spec["shape"], list) and all(isinstance(d, str) or _is_int(d) for d in spec["shape"])
                )
                _expect(ok, f"io.{graph}.{side}.{tensor}", spec, "{dtype: string, shape: [int or name, ...]}")

    files = raw["files"]
    for relpath, record in files.items():
        check_relpath(relpath, f"{MANIFEST_NAME}: files entry")
        ok = isinstance(record, dict) and isinstance(record.get("sha256"), str) and _SHA256.fullmatch(record["sha256"])
        _expect(bool(ok) and _is_int(record.get("bytes")), f"files[{relpath!r}]", record, "{sha256: 64 hex digits, bytes: integer}")

    plugins = raw.get("plugins")
    if raw["moe_lowering"] == MOE_PLUGIN and plugins is None:
        raise NucleusError(
            f"{MANIFEST_NAME} says the engines use TensorRT plugins (moe_lowering 'plugin') but has no plugins record, "
            "so the plugin library cannot be verified.",
            _DAMAGED_FIX,
        )
    if plugins is not None:
        library = plugins.get("library")
        check_relpath(library, f"{MANIFEST_NAME}: plugins.library")
        if library not in files:
            raise NucleusError(f"{MANIFEST_NAME}: the plugin library {library!r} has no checksum in 'files'.", _DAMAGED_FIX)
        if "sha256" in plugins and plugins["sha256"] != files[library]["sha256"]:
            raise NucleusError(f"{MANIFEST_NAME}: plugins.sha256 and files[{library!r}] disagree.", _DAMAGED_FIX)
    for graph, record in (raw.get("engines") or {}).items():
        for key in ("file", "onnx", "refit_onnx"):
            if isinstance(record, dict) and record.get(key) is not None:
                check_relpath(record[key], f"{MANIFEST_NAME}: engines.{graph}.{key}")
    for graph, records in (raw.get("segments") or {}).items():
        _expect(graph in GRAPHS and isinstance(records, list), f"segments.{graph}", records, "a list of segment records")
        for k, seg in enumerate(records):
            ok = isinstance(seg, dict) and isinstance(seg.get("name"), str) and isinstance(seg.get("inputs"), list) and (
                isinstance(seg.get("outputs"), list) and _is_int_list(seg.get("text_kv_layers"), 2, 0)
            )
            _expect(ok, f"segments.{graph}[{k}]", seg, "{name, inputs, outputs, text_kv_layers: [first, last], ...}")
            check_relpath(seg["name"], f"{MANIFEST_NAME}: segments.{graph}[{k}].name")
            if seg.get("onnx") is not None:
                check_relpath(seg["onnx"], f"{MANIFEST_NAME}: segments.{graph}[{k}].onnx")
    scales = (raw.get("quantization") or {}).get("scales_file")
    if scales is not None:
        check_relpath(scales, f"{MANIFEST_NAME}: quantization.scales_file")


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
        raise NucleusError(f"{path} is not valid JSON ({exc}).", _DAMAGED_FIX) from None
    validate_manifest(raw)
    try:
        return Manifest.from_dict(raw)
    except (KeyError, TypeError, ValueError) as exc:
        raise NucleusError(f"{path} is unreadable ({type(exc).__name__}: {exc}).", _DAMAGED_FIX) from None


def verify_files(bundle_dir: Path, manifest: Manifest, names: list[str] | None = None) -> None:
    """Check that the named files (default: all recorded) are inside the bundle, exist and match their sha256."""
    for relpath in list(manifest.files) if names is None else names:
        record = manifest.files.get(relpath)
        if record is None:
            raise NucleusError(f"{relpath} is not recorded in {bundle_dir}/{MANIFEST_NAME}.", _DAMAGED_FIX)
        path = inside(bundle_dir, relpath, f"{MANIFEST_NAME}: files entry")
        if not path.exists():
            raise NucleusError(f"bundle file {path} is missing.", "copy the complete bundle, or export it again.")
        if not path.is_file():
            raise NucleusError(f"bundle file {path} is not a regular file.", "copy the bundle again, or export it again.")
        if path.stat().st_size != record["bytes"] or sha256_file(path) != record["sha256"]:
            raise NucleusError(
                f"bundle file {path} does not match its checksum in {MANIFEST_NAME}: it was changed or truncated.",
                "copy the bundle again, or export it again.",
            )
