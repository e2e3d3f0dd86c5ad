"""Find, validate and stream a diffusers transformer checkpoint without loading it into memory.

A checkpoint is a diffusers transformer folder (config.json, one or many `diffusion_pytorch_model*.safetensors`,
and an index json when sharded) or a pipeline root that holds such a folder under `transformer/`. Validation reads
only the safetensors headers, so it costs kilobytes even for the 34 GB checkpoint; tensors are then read one at a
time (`WeightStore.read`) into private buffers that are freed after use, so streaming the whole model never keeps
more than one tensor resident.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import struct
from collections.abc import Iterator
from pathlib import Path

import ml_dtypes
import numpy as np
from nucleus_runtime.bundle import inside

from nucleus_export.errors import NucleusExportError
from nucleus_export.model.config import ModelConfig

WEIGHTS_NAME = "diffusion_pytorch_model.safetensors"
INDEX_NAME = "diffusion_pytorch_model.safetensors.index.json"

SAFETENSORS_DTYPES: dict[str, np.dtype] = {
    "F64": np.dtype(np.float64),
    "F32": np.dtype(np.float32),
    "F16": np.dtype(np.float16),
    "BF16": np.dtype(ml_dtypes.bfloat16),
    "F8_E4M3": np.dtype(ml_dtypes.float8_e4m3fn),
    "I64": np.dtype(np.int64),
    "I32": np.dtype(np.int32),
    "I8": np.dtype(np.int8),
    "U8": np.dtype(np.uint8),
    "BOOL": np.dtype(np.bool_),
}

_MAX_HEADER_BYTES = 100 << 20
_LISTED = 5


@dataclasses.dataclass(frozen=True)
class TensorInfo:
    """Where one tensor lives: shard file, dtype name, shape and absolute byte range."""

    shard: Path
    dtype: str
    shape: tuple[int, ...]
    begin: int
    end: int

    @property
    def nbytes(self) -> int:
        return self.end - self.begin


def read_safetensors_header(path: Path, role: str = "shard") -> dict[str, TensorInfo]:
    """Parse one safetensors header and validate it fully: every dtype known, every shape a list of non-negative
    integers, every byte range in order, of exactly shape x itemsize bytes, and the ranges tiling the data region
    with no gap, overlap or trailing bytes (what the safetensors format requires).

    Args:
        path: the file.
        role: what the file is to the user ("shard", "input file"), for the messages.
    """
    if role == "shard":
        fix = "the shard is corrupt: download it again (compare its size with the original)."
    else:
        fix = f"write {path.name} again with safetensors (e.g. safetensors.numpy.save_file)."

    def corrupt(problem: str) -> NucleusExportError:
        return NucleusExportError(f"{role} {path} is not a valid safetensors file: {problem}.", fix)

    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            raw_len = f.read(8)
            if len(raw_len) != 8:
                raise corrupt("it is empty" if not raw_len else "it is shorter than the 8-byte header length")
            (header_len,) = struct.unpack("<Q", raw_len)
            if header_len > min(_MAX_HEADER_BYTES, size - 8):
                raise corrupt(f"header length {header_len} exceeds the file size {size}")
            header = json.loads(f.read(header_len))
    except FileNotFoundError:
        raise NucleusExportError(f"{role} {path} is missing.", fix) from None
    except IsADirectoryError:
        raise NucleusExportError(f"{role} {path} is a folder, not a safetensors file.", fix) from None
    except (ValueError, UnicodeDecodeError) as exc:
        raise corrupt(f"its header is not JSON ({exc})") from None
    if not isinstance(header, dict):
        raise corrupt("its header is not a JSON object")
    base = 8 + header_len
    infos: dict[str, TensorInfo] = {}
    ranges: list[tuple[int, int, str]] = []
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        ok = isinstance(entry, dict) and isinstance(entry.get("shape"), list) and isinstance(entry.get("data_offsets"), list)
        ok = ok and all(type(d) is int and d >= 0 for d in entry["shape"]) and len(entry["data_offsets"]) == 2
        ok = ok and all(type(o) is int and o >= 0 for o in entry["data_offsets"])
        if not ok:
            raise corrupt(f"the header entry of '{name}' is malformed (needs dtype, shape and two non-negative offsets)")
        dtype, shape, (begin, end) = entry["dtype"], tuple(entry["shape"]), entry["data_offsets"]
        if dtype not in SAFETENSORS_DTYPES:
            raise NucleusExportError(
                f"{role} {path}: tensor '{name}' has unsupported dtype {dtype!r} (known: {', '.join(SAFETENSORS_DTYPES)}).",
                "convert the tensors to bf16, fp16 or fp32.",
            )
        expected = math.prod(shape) * SAFETENSORS_DTYPES[dtype].itemsize
        if end < begin or end - begin != expected:
            raise corrupt(f"tensor '{name}' {dtype}{list(shape)} needs {expected} bytes but its offsets {begin}..{end} span {end - begin}")
        if base + end > size:
            raise NucleusExportError(
                f"{role} {path} is truncated: tensor '{name}' needs bytes {base + begin}..{base + end} but the file has {size}.",
                fix,
            )
        ranges.append((begin, end, name))
        infos[name] = TensorInfo(path, dtype, shape, base + begin, base + end)
    covered = 0
    for begin, end, name in sorted(ranges):
        if begin != covered:
            raise corrupt(
                f"tensor '{name}' starts at data byte {begin}, "
                + ("overlapping the tensor before it" if begin < covered else f"leaving a gap after byte {covered}")
            )
        covered = end
    if base + covered != size:
        raise corrupt(f"{size - base - covered} bytes after the last tensor belong to none")
    return infos


def _listing(names: list[str]) -> str:
    shown = ", ".join(names[:_LISTED])
    return shown + (f" and {len(names) - _LISTED} more" if len(names) > _LISTED else "")


class WeightStore:
    """Read-only view of a checkpoint's tensors, streamed from disk one at a time.

    Args:
        tensors: tensor name -> location, as gathered from the shard headers.
    """

    def __init__(self, tensors: dict[str, TensorInfo]):
        self._tensors = tensors

    def __contains__(self, name: str) -> bool:
        return name in self._tensors

    def __iter__(self) -> Iterator[str]:
        return iter(self._tensors)

    def __len__(self) -> int:
        return len(self._tensors)

    def info(self, name: str) -> TensorInfo:
        return self._tensors[name]

    def shape(self, name: str) -> tuple[int, ...]:
        return self._tensors[name].shape

    def dtype(self, name: str) -> np.dtype:
        return SAFETENSORS_DTYPES[self._tensors[name].dtype]

    def read(self, name: str) -> np.ndarray:
        """Read one tensor into a fresh buffer (pread, no lingering mapping)."""
        info = self._tensors[name]
        buf = bytearray(info.nbytes)
        fd = os.open(info.shard, os.O_RDONLY)
        try:
            view, done = memoryview(buf), 0
            while done < info.nbytes:
                got = os.preadv(fd, [view[done:]], info.begin + done)
                if got <= 0:
                    raise NucleusExportError(f"{info.shard} ended while reading '{name}'.", "download this shard again.")
                done += got
        finally:
            os.close(fd)
        return np.frombuffer(buf, dtype=self.dtype(name)).reshape(info.shape)

    @property
    def num_parameters(self) -> int:
        return sum(math.prod(info.shape) for info in self._tensors.values())

    def bytes_by_dtype(self) -> dict[str, int]:
        totals: dict[str, int] = {}
        for info in self._tensors.values():
            totals[info.dtype] = totals.get(info.dtype, 0) + info.nbytes
        return totals

    @property
    def shards(self) -> list[Path]:
        return sorted({info.shard for info in self._tensors.values()})


@dataclasses.dataclass
class Checkpoint:
    """A validated transformer checkpoint.

    Attributes:
        transformer_dir: folder with config.json and the safetensors shards.
        pipeline_root: the diffusers pipeline folder when the model was given as one (holds `scheduler/`).
        config: the parsed architecture.
        weights: lazy tensor view.
    """

    transformer_dir: Path
    pipeline_root: Path | None
    config: ModelConfig
    weights: WeightStore

    @property
    def scheduler_dir(self) -> Path | None:
        if self.pipeline_root and (self.pipeline_root / "scheduler").is_dir():
            return self.pipeline_root / "scheduler"
        return None


def resolve_transformer_dir(path: Path) -> tuple[Path, Path | None]:
    """Return (transformer folder, pipeline root or None) for a transformer folder or a pipeline root."""
    path = Path(path).expanduser()
    if not path.exists():
        raise NucleusExportError(f"model path {path} does not exist.", "pass --model tiny or a checkpoint folder.")
    if (path / "config.json").is_file() and not (path / "model_index.json").is_file():
        return path, None
    if (path / "transformer" / "config.json").is_file():
        return path / "transformer", path
    raise NucleusExportError(
        f"{path} holds neither config.json nor transformer/config.json.",
        "pass the transformer folder or the diffusers pipeline root of Nucleus-Image.",
    )


def _shard_files(transformer_dir: Path) -> tuple[list[Path], dict[str, str] | None]:
    index_path = transformer_dir / INDEX_NAME
    if index_path.is_file():
        try:
            weight_map = json.loads(index_path.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as exc:
            raise NucleusExportError(f"{index_path} is not a valid index ({exc}).", "restore the index json from the checkpoint.") from None
        if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
            raise NucleusExportError(f"{index_path} has no weight_map of tensor name -> shard file.", "restore the index json from the checkpoint.")
        files = sorted(set(weight_map.values()))
        for f in files:  # shard names are joined onto the folder: none may lead outside it
            inside(transformer_dir, f, f"{INDEX_NAME} names shard", "restore the index json from the checkpoint.")
        missing = [f for f in files if not (transformer_dir / f).is_file()]
        if missing:
            raise NucleusExportError(
                f"{index_path.name} names shard files that are missing: {_listing(missing)}.",
                f"download the missing shards into {transformer_dir}.",
            )
        return [transformer_dir / f for f in files], weight_map
    single = transformer_dir / WEIGHTS_NAME
    if single.is_file():
        return [single], None
    shards = sorted(transformer_dir.glob("diffusion_pytorch_model*.safetensors"))
    if shards:
        raise NucleusExportError(
            f"{transformer_dir} has {len(shards)} safetensors shards but no {INDEX_NAME}.",
            "download the index json that maps tensor names to shards.",
        )
    raise NucleusExportError(
        f"{transformer_dir} holds no {WEIGHTS_NAME} and no {INDEX_NAME}.",
        "download the transformer weights (safetensors) next to config.json.",
    )


def expected_parameter_shapes(config: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Parameter names and shapes of the diffusers model for this config, built on the meta device (no memory)."""
    import torch
    from diffusers import NucleusMoEImageTransformer2DModel

    with torch.device("meta"):
        model = NucleusMoEImageTransformer2DModel.from_config(config.to_dict())
    return {name: tuple(p.shape) for name, p in model.state_dict().items()}


def open_checkpoint(path: Path) -> Checkpoint:
    """Locate and validate a checkpoint: config, index, shard headers, names and shapes against the config.

    Args:
        path: a transformer folder or a diffusers pipeline root.

    Returns:
        The validated checkpoint with a lazy weight view; no tensor data has been read.
    """
    transformer_dir, pipeline_root = resolve_transformer_dir(path)
    config = ModelConfig.from_json_file(transformer_dir / "config.json")
    shard_paths, weight_map = _shard_files(transformer_dir)
    tensors: dict[str, TensorInfo] = {}
    for shard in shard_paths:
        for name, info in read_safetensors_header(shard).items():
            if name in tensors:
                raise NucleusExportError(
                    f"tensor '{name}' appears in both {tensors[name].shard.name} and {shard.name}.",
                    "the shards come from different checkpoints: download a consistent set.",
                )
            tensors[name] = info
    if weight_map is not None:
        misplaced = sorted(n for n, f in weight_map.items() if n in tensors and tensors[n].shard.name != f)
        absent = sorted(n for n in weight_map if n not in tensors)
        if misplaced or absent:
            raise NucleusExportError(
                f"{INDEX_NAME} does not match the shards: "
                + (f"{len(absent)} indexed tensors are in no shard ({_listing(absent)}); " if absent else "")
                + (f"{len(misplaced)} tensors are in another shard than indexed ({_listing(misplaced)})" if misplaced else ""),
                "download the index and shards from the same checkpoint revision.",
            )
    expected = expected_parameter_shapes(config)
    missing = sorted(set(expected) - set(tensors))
    unexpected = sorted(set(tensors) - set(expected))
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing keys ({_listing(missing)})")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected keys ({_listing(unexpected)})")
        raise NucleusExportError(
            f"weights in {transformer_dir} do not match config.json: {'; '.join(parts)}.",
            "check that config.json belongs to these weights (layers, experts, dense_moe_strategy).",
        )
    mismatched = [
        f"{n} {tensors[n].shape} vs config {expected[n]}" for n in sorted(expected) if tensors[n].shape != expected[n]
    ]
    if mismatched:
        raise NucleusExportError(
            f"weights in {transformer_dir} do not match config.json: {len(mismatched)} shape mismatches "
            f"({_listing(mismatched)}).",
            "check that config.json belongs to these weights (hidden size, heads, experts, intermediate dims).",
        )
    return Checkpoint(transformer_dir, pipeline_root, config, WeightStore(tensors))
