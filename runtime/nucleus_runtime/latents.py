"""Latent layout of the Nucleus pipeline: packing 2x2 patches into tokens, unpacking, seeded initial noise.

The transformer reads latents packed as [B, S, C * p * p] with S = (h / p) * (w / p) tokens in row-major patch
order, each token holding its channels then the p x p pixels of the patch (diffusers' `_pack_latents`). The VAE
side uses [B, C, 1, h, w] (a frame axis of 1), which `unpack_latents` restores.
"""

from __future__ import annotations

import numpy as np



def latent_channels(in_channels: int, patch_size: int) -> int:
    """VAE latent channels from the transformer's packed input width (64 / 2**2 = 16 for Nucleus-Image)."""
    return in_channels // (patch_size * patch_size)


def pack_latents(latents: np.ndarray, patch_size: int) -> np.ndarray:
    """[B, C, h, w], [B, 1, C, h, w] or [B, C, 1, h, w] latents -> [B, (h/p) * (w/p), C * p * p] tokens."""
    # The frame axis is 1 wherever it sits, so merging it into the channels is the pipeline's own `view`.
    latents = latents.reshape(latents.shape[0], -1, *latents.shape[-2:])
    b, c, h, w = latents.shape
    p = patch_size
    x = latents.reshape(b, c, h // p, p, w // p, p).transpose(0, 2, 4, 1, 3, 5)
    return np.ascontiguousarray(x.reshape(b, (h // p) * (w // p), c * p * p))


def unpack_latents(packed: np.ndarray, grid: tuple[int, int], patch_size: int) -> np.ndarray:
    """[B, S, C * p * p] tokens on a (rows, cols) patch grid -> [B, C, 1, rows * p, cols * p] VAE latents."""
    b, s, width = packed.shape
    rows, cols = grid
    p = patch_size
    if s != rows * cols:
        raise ValueError(f"{s} tokens do not fill a {rows}x{cols} patch grid")
    c = width // (p * p)
    x = packed.reshape(b, rows, cols, c, p, p).transpose(0, 3, 1, 4, 2, 5)
    return np.ascontiguousarray(x.reshape(b, c, 1, rows * p, cols * p))


def initial_noise(seed: int, batch: int, in_channels: int, grid: tuple[int, int], patch_size: int) -> np.ndarray:
    """Seeded standard-normal packed latents [B, S, in_channels], float32.

    Drawn from numpy's default generator (PCG64) in the pipeline's [B, 1, C, h, w] layout and then packed, so a seed
    gives the same image layout on every machine and backend. It does NOT reproduce torch.randn for the same seed:
    to match a diffusers run, pass its initial latents explicitly.
    """
    c = latent_channels(in_channels, patch_size)
    rows, cols = grid
    noise = np.random.default_rng(seed).standard_normal((batch, 1, c, rows * patch_size, cols * patch_size))
    return pack_latents(noise.astype(np.float32), patch_size)
