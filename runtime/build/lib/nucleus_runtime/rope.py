"""Rotary position tables of the Nucleus transformer, in numpy.

The same values as diffusers' `NucleusMoEEmbedRope` (scale_rope=True), as real cos/sin tables: image positions are
centred on the latent patch grid, text positions start at max(h//2, w//2), so the text table depends on the grid.
"""

from __future__ import annotations

import functools

import numpy as np

THETA = 10000
MAX_POSITIONS = 4096


def _axis_angles(positions: np.ndarray, dim: int) -> np.ndarray:
    # float32 inverse frequencies and float32 products, as torch computes them; cos/sin are taken in float64 and
    # rounded once, so the tables are within an ulp of torch's.
    inv = (np.float32(1.0) / np.power(np.float32(THETA), np.arange(0, dim, 2, dtype=np.float32) / np.float32(dim))).astype(np.float32)
    return np.outer(positions.astype(np.float32), inv).astype(np.float32)


@functools.lru_cache(maxsize=64)
def _image_angles(axes_dims: tuple[int, int, int], height: int, width: int) -> np.ndarray:
    frame = _axis_angles(np.zeros(1), axes_dims[0])  # frame index 0
    rows = np.concatenate([np.arange(-(height - height // 2), 0), np.arange(height // 2)])
    cols = np.concatenate([np.arange(-(width - width // 2), 0), np.arange(width // 2)])
    a_h = _axis_angles(rows, axes_dims[1])
    a_w = _axis_angles(cols, axes_dims[2])
    grid = np.concatenate(
        [
            np.broadcast_to(frame[None, :, :], (height, width, frame.shape[1])),
            np.broadcast_to(a_h[:, None, :], (height, width, a_h.shape[1])),
            np.broadcast_to(a_w[None, :, :], (height, width, a_w.shape[1])),
        ],
        axis=-1,
    )
    return grid.reshape(height * width, -1)


def text_position_offset(height: int, width: int) -> int:
    """First text position for a latent patch grid of height x width."""
    return max(height // 2, width // 2)


def image_rope(axes_dims: tuple[int, ...], height: int, width: int) -> tuple[np.ndarray, np.ndarray]:
    """cos, sin tables [height*width, head_dim/2] for the image tokens of a patch grid."""
    angles = _image_angles(tuple(axes_dims), height, width).astype(np.float64)
    return np.cos(angles).astype(np.float32), np.sin(angles).astype(np.float32)


def text_rope(axes_dims: tuple[int, ...], height: int, width: int, text_len: int) -> tuple[np.ndarray, np.ndarray]:
    """cos, sin tables [text_len, head_dim/2] for text tokens next to a patch grid of height x width."""
    start = text_position_offset(height, width)
    if start + text_len > MAX_POSITIONS:
        raise ValueError(f"text positions {start}..{start + text_len} exceed the model's {MAX_POSITIONS} rope positions")
    positions = np.arange(start, start + text_len)
    angles = np.concatenate([_axis_angles(positions, d) for d in axes_dims], axis=-1).astype(np.float64)
    return np.cos(angles).astype(np.float32), np.sin(angles).astype(np.float32)
