"""The bundle directory and its manifest: the artifact contract between export, runtime and Triton.

A bundle holds `text_kv.onnx`, `denoiser.onnx` (plus external data), optionally `text_kv.plan`/`denoiser.plan`,
`scheduler_config.json` and `manifest.json`. The manifest records what the graphs expect (names, dtypes, shapes,
profiles), how they were made (precision, quantization, MoE lowering, tool versions) and a checksum per file.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any

from nucleus_runtime.errors import NucleusError

MANIFEST_NAME = "manifest.json"
SCHEDULER_CONFIG_NAME = "scheduler_config.json"
FORMAT_VERSION = 1

TEXT_KV = "text_kv"
DENOISER = "denoiser"
GRAPHS = (TEXT_KV, DENOISER)


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


def file_record(bundle_dir: Path, relpath: str) -> dict[str, Any]:
    path = bundle_dir / relpath
    return {"sha256": sha256_file(path), "bytes": path.stat().st_size}


def load_manifest(bundle_dir: Path) -> Manifest:
    path = Path(bundle_dir) / MANIFEST_NAME
    if not path.is_file():
        raise NucleusError(
            f"{bundle_dir} has no {MANIFEST_NAME}: it is not a nucleus-export bundle.",
            "run `nucleus-export export` (or `build`) to create one.",
        )
    try:
        manifest = Manifest.from_dict(json.loads(path.read_text()))
    except (json.JSONDecodeError, KeyError, TypeError) as exc:
        raise NucleusError(f"{path} is unreadable ({exc}).", "export the bundle again.") from None
    if manifest.format_version != FORMAT_VERSION:
        raise NucleusError(
            f"{path} has format version {manifest.format_version}; this runtime reads version {FORMAT_VERSION}.",
            "export the bundle again with this version of nucleus-export.",
        )
    return manifest


def verify_files(bundle_dir: Path, manifest: Manifest, names: list[str] | None = None) -> None:
    """Check that the named files (default: all recorded) exist and match their recorded sha256."""
    for relpath in names or list(manifest.files):
        record = manifest.files.get(relpath)
        path = Path(bundle_dir) / relpath
        if record is None:
            raise NucleusError(f"{relpath} is not recorded in {bundle_dir}/{MANIFEST_NAME}.", "export the bundle again.")
        if not path.is_file():
            raise NucleusError(f"bundle file {path} is missing.", "copy the complete bundle, or export it again.")
        if path.stat().st_size != record["bytes"] or sha256_file(path) != record["sha256"]:
            raise NucleusError(
                f"bundle file {path} does not match its checksum in {MANIFEST_NAME}: it was changed or truncated.",
                "copy the bundle again, or export it again.",
            )


def write_atomic(path: Path, data: bytes | memoryview | str) -> None:
    """Write through a temporary file in the same folder, fsync, rename into place: readers never see half a file."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data.encode() if isinstance(data, str) else data)
            f.flush()
            os.fsync(f.fileno())
        # mkstemp makes the file private (0600); bundle files are ordinary artifacts, readable like the ONNX files.
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o644 & ~umask)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
