"""PNG files of uint8 RGB images with the standard library alone (zlib), so a deployment writes pictures without
Pillow. Deterministic: the same pixels always give the same bytes (`run --prompt` and the Triton model agree on them)."""

from __future__ import annotations

import struct
import zlib
from pathlib import Path

import numpy as np

from nucleus_runtime.atomic import write_atomic
from nucleus_runtime.errors import NucleusError

_SIGNATURE = b"\x89PNG\r\n\x1a\n"
_COMPRESSION = 6  # zlib's default: about Pillow's size at a fraction of the best level's time


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def encode_png(image: np.ndarray) -> bytes:
    """The PNG bytes of one [H, W, 3] uint8 image (8-bit RGB, no interlace, filter type 0 on every row)."""
    image = np.asarray(image)
    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
        raise NucleusError(
            f"an image to write is {image.dtype} {list(image.shape)}; PNG output takes uint8 [height, width, 3].",
            "pass one image of the batch, as the vae_decoder stage returns it.",
        )
    height, width, _ = image.shape
    rows = np.concatenate([np.zeros((height, 1), np.uint8), np.ascontiguousarray(image).reshape(height, width * 3)], axis=1)
    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return _SIGNATURE + _chunk(b"IHDR", header) + _chunk(b"IDAT", zlib.compress(rows.tobytes(), _COMPRESSION)) + _chunk(b"IEND", b"")


def write_png(path: Path, image: np.ndarray) -> None:
    """Write one image as a PNG file, atomically (never half-written, also on a signal)."""
    write_atomic(Path(path), encode_png(image))
