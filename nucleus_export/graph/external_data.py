"""ONNX external data as bundles hold it: one streamed data file per graph, and hard links to the checkpoint's shards.

A weight the graph uses in the dtype and layout the checkpoint stores it in is not copied: the bundle holds a hard link
to the checkpoint's safetensors shard (under contract.CHECKPOINT_LINKS_DIR) and the initializer points at the
tensor's bytes inside it (ONNX external data: location, offset, length). A hard link is a second name for the same
bytes, so the bundle stays self-contained (deleting the checkpoint leaves the data alive) and costs no disk. Where the
file system refuses a link (another device, fs.protected_hardlinks), the tensors of that shard are copied instead.

The onnx package refuses to load or check external data that has several hard links (its guard against a model
that makes a loader read a file it was not given); ONNX Runtime and TensorRT's parser read it. So bundle graphs are
loaded and checked here: every location must stay inside the graph's folder (the rule the bundle applies to every
path, nucleus_runtime.bundle.inside) and every byte range inside its file, and the ONNX checker sees the external
tensors as typed graph inputs.
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO

import onnx
from nucleus_runtime.bundle import inside
from nucleus_runtime.contract import checkpoint_links_dir
from onnx import TensorProto, helper

from nucleus_export.errors import NucleusExportError
from nucleus_export.model.checkpoint import TensorInfo

logger = logging.getLogger("nucleus_export")

_ALIGN = 64
_REEXPORT = "export the bundle again (nucleus-export export), or copy the complete bundle."


def external_tensor(name: str, data_type: int, dims: tuple[int, ...] | list[int], location: str, offset: int,
                    length: int) -> TensorProto:
    """A TensorProto whose data are `length` bytes at `offset` of the file `location` (relative to the graph)."""
    proto = TensorProto(name=name, data_type=data_type, dims=list(dims))
    proto.data_location = TensorProto.EXTERNAL
    for key, value in (("location", location), ("offset", str(offset)), ("length", str(length))):
        entry = proto.external_data.add()
        entry.key, entry.value = key, value
    return proto


class ExternalDataWriter:
    """Appends tensors to one data file and returns protos that point into it."""

    def __init__(self, data_path: Path):
        self.data_path = Path(data_path)
        self._file: BinaryIO = open(self.data_path, "wb")
        self.bytes_written = 0

    def write(self, name: str, data_type: int, dims: tuple[int, ...], data: memoryview) -> TensorProto:
        pad = (-self.bytes_written) % _ALIGN
        if pad:
            self._file.write(b"\0" * pad)
            self.bytes_written += pad
        offset = self.bytes_written
        self._file.write(data)
        self.bytes_written += data.nbytes
        return external_tensor(name, data_type, dims, self.data_path.name, offset, data.nbytes)

    def close(self) -> None:
        self._file.close()


class CheckpointLinks:
    """Hard links from a bundle folder to the checkpoint shards its graphs read, made on first use of each shard.

    Args:
        bundle_dir: the (temporary) bundle folder the graphs are written into.
        component: the pipeline component the shards belong to ("" for the transformer): its links go to
            checkpoint/<component>/, so shards of two components with the same file name never collide.
    """

    def __init__(self, bundle_dir: Path, component: str = ""):
        self.bundle_dir = Path(bundle_dir)
        self.folder = checkpoint_links_dir(component)
        self._locations: dict[Path, str | None] = {}

    def tensor(self, name: str, info: TensorInfo, data_type: int) -> TensorProto | None:
        """An initializer reading the checkpoint tensor `info` in place, or None where its shard cannot be linked."""
        location = self._link(info.shard)
        if location is None:
            return None
        return external_tensor(name, data_type, info.shape, location, info.begin, info.nbytes)

    @property
    def files(self) -> list[str]:
        """Bundle-relative paths of the linked shards."""
        return sorted(loc for loc in self._locations.values() if loc is not None)

    def _link(self, shard: Path) -> str | None:
        if shard not in self._locations:
            location: str | None = f"{self.folder}/{shard.name}"
            dest = self.bundle_dir / location
            dest.parent.mkdir(parents=True, exist_ok=True)
            try:
                os.link(shard.resolve(), dest)  # resolved: Hub caches name shards through symlinks into blobs/
            except OSError as exc:
                logger.info("cannot hard-link %s into the bundle (%s): its tensors are copied", shard, exc.strerror)
                location = None
            self._locations[shard] = location
        return self._locations[shard]


def _external_initializers(model: onnx.ModelProto) -> Iterator[TensorProto]:
    return (t for t in model.graph.initializer if t.data_location == TensorProto.EXTERNAL)


def resolve_external(tensor: TensorProto, base_dir: Path) -> tuple[Path, int, int]:
    """(file, offset, length) of an external tensor, refused unless the file is inside base_dir and holds the range."""
    info = {e.key: e.value for e in tensor.external_data}
    what = f"external data of tensor '{tensor.name}'"
    if "location" not in info:
        raise NucleusExportError(f"{what} names no file.", _REEXPORT)
    path = inside(base_dir, info["location"], what, _REEXPORT)
    if not path.is_file():
        raise NucleusExportError(f"{what} is missing: {path} is not a file.", _REEXPORT)
    size = path.stat().st_size
    offset = int(info.get("offset", 0))
    length = int(info.get("length", size - offset))
    itemsize = onnx.helper.tensor_dtype_to_np_dtype(tensor.data_type).itemsize
    if length != math.prod(tensor.dims) * itemsize or offset + length > size:
        raise NucleusExportError(
            f"{what} spans bytes {offset}..{offset + length} of {path} ({size} bytes) but the tensor needs "
            f"{math.prod(tensor.dims) * itemsize} bytes.",
            _REEXPORT,
        )
    return path, offset, length


def validate_external_data(model: onnx.ModelProto, base_dir: Path) -> None:
    """Check every external initializer's location and byte range without reading the data."""
    for tensor in _external_initializers(model):
        resolve_external(tensor, base_dir)


def load_external_data(model: onnx.ModelProto, base_dir: Path) -> None:
    """Read every external initializer into the proto (in place), after the checks of validate_external_data."""
    for tensor in _external_initializers(model):
        path, offset, length = resolve_external(tensor, base_dir)
        with open(path, "rb") as f:
            f.seek(offset)
            tensor.raw_data = f.read(length)
        del tensor.external_data[:]
        tensor.data_location = TensorProto.DEFAULT


def load_model(path: Path) -> onnx.ModelProto:
    """A bundle graph with its weights, wherever they live (data file or linked checkpoint shard)."""
    model = onnx.load(str(path), load_external_data=False)
    load_external_data(model, Path(path).parent)
    return model


def check_model(path: Path) -> None:
    """The full ONNX checker (with strict shape inference) on a saved graph, external tensors as typed inputs."""
    model = onnx.load(str(path), load_external_data=False)
    validate_external_data(model, Path(path).parent)
    external = list(_external_initializers(model))
    kept = [t for t in model.graph.initializer if t.data_location != TensorProto.EXTERNAL]
    listed = {v.name for v in model.graph.input}
    model.graph.input.extend(
        helper.make_tensor_value_info(t.name, t.data_type, list(t.dims)) for t in external if t.name not in listed
    )
    del model.graph.initializer[:]
    model.graph.initializer.extend(kept)
    onnx.checker.check_model(model, full_check=True)
