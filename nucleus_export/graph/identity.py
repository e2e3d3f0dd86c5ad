"""The identity of what a graph reads, and the bundle's file records, in one pass over the bytes.

A graph's identity (its `digest` in the manifest) hashes exactly the bytes the graph reads: the graph file itself and,
for every external initializer in graph order, the byte range it names in its data file or in a hard-linked
checkpoint shard. Two fine-tunes whose graphs differ in one tensor therefore differ in identity even when their weights
live in linked shards that hold other tensors too, and two bundles that share a graph's bytes share its identity
(what the runtime's caches key on). File checksums (`files`) and range digests come from the same read of each file,
so identity costs no second pass over a multi-GB checkpoint.
"""

from __future__ import annotations

import hashlib
from collections import defaultdict
from pathlib import Path

import onnx
from nucleus_runtime.bundle import FileRecord, bundle_files
from onnx import TensorProto

from nucleus_export.graph.external_data import resolve_external

DIGEST_PREFIX = "sha256:"
_CHUNK = 8 << 20

Range = tuple[str, int, int]  # (bundle-relative file, offset, length)


def graph_ranges(bundle_dir: Path, relpath: str) -> list[Range]:
    """The external byte ranges a bundle graph reads, in initializer order (locations checked to stay inside)."""
    path = Path(bundle_dir) / relpath
    model = onnx.load(str(path), load_external_data=False)
    ranges = []
    for tensor in model.graph.initializer:
        if tensor.data_location == TensorProto.EXTERNAL:
            file, offset, length = resolve_external(tensor, path.parent)
            ranges.append((file.resolve().relative_to(Path(bundle_dir).resolve()).as_posix(), offset, length))
    return ranges


def record_bundle(
    bundle_dir: Path, graphs: list[str], known: dict[str, FileRecord] | None = None
) -> tuple[dict[str, FileRecord], dict[str, str]]:
    """Every file's record and every named graph's identity, reading each byte once.

    Args:
        bundle_dir: the bundle folder.
        graphs: bundle-relative paths of the graphs whose identity is wanted.
        known: records of files this process wrote and hashed earlier and has not touched since; they are kept, and
            such a file is read only where a graph's range lies in it.

    Returns:
        (files: relpath -> record, digests: graph relpath -> identity).
    """
    bundle_dir = Path(bundle_dir)
    known = known or {}
    per_graph = {g: graph_ranges(bundle_dir, g) for g in graphs}
    wanted: dict[str, set[tuple[int, int]]] = defaultdict(set)
    for ranges in per_graph.values():
        for file, offset, length in ranges:
            wanted[file].add((offset, length))
    range_digests: dict[Range, str] = {}
    files: dict[str, FileRecord] = {}
    for relpath in bundle_files(bundle_dir):
        if relpath in known and relpath not in wanted:
            files[relpath] = known[relpath]
            continue
        record, digests = _read(bundle_dir / relpath, sorted(wanted.get(relpath, ())), relpath not in known)
        files[relpath] = record or known[relpath]
        range_digests.update({(relpath, o, n): d for (o, n), d in digests.items()})
    identities = {}
    for graph, ranges in per_graph.items():
        digest = hashlib.sha256(b"nucleus-graph/1|")
        digest.update(bytes.fromhex(files[graph].sha256))
        for entry in ranges:
            digest.update(f"|{entry[1]}+{entry[2]}:".encode() + bytes.fromhex(range_digests[entry]))
        identities[graph] = DIGEST_PREFIX + digest.hexdigest()
    return files, identities


def _read(path: Path, ranges: list[tuple[int, int]], whole: bool) -> tuple[FileRecord | None, dict[tuple[int, int], str]]:
    """Stream a file once: its sha256 (when `whole`) and a sha256 of each (offset, length) range (ranges may overlap)."""
    file_digest = hashlib.sha256() if whole else None
    hashers = {r: hashlib.sha256() for r in ranges}
    size = path.stat().st_size
    last_byte = max((offset + length for offset, length in ranges), default=0)
    pending = iter(ranges)  # sorted by offset: a sweep keeps only the ranges overlapping the current block
    upcoming = next(pending, None)
    active: list[tuple[int, int]] = []
    position = 0
    with open(path, "rb") as f:
        while block := f.read(_CHUNK):
            if file_digest is not None:
                file_digest.update(block)
            end = position + len(block)
            while upcoming is not None and upcoming[0] < end:
                active.append(upcoming)
                upcoming = next(pending, None)
            view = memoryview(block)
            for offset, length in active:
                lo, hi = max(offset, position), min(offset + length, end)
                if lo < hi:
                    hashers[(offset, length)].update(view[lo - position:hi - position])
            active = [(o, n) for o, n in active if o + n > end]
            position = end
            if file_digest is None and position >= last_byte:
                break
    record = FileRecord(file_digest.hexdigest(), size) if file_digest is not None else None
    return record, {r: h.hexdigest() for r, h in hashers.items()}
