"""Quality in the unit users see: PSNR and SSIM of decoded 8-bit images.

Each parity case is one denoiser step at timestep sigma (the timestep input, t / 1000). diffusers' pipeline negates
the transformer's output before the FlowMatch Euler step (x_next = x_t + (sigma_next - sigma) * (-output)), so the
step to sigma = 0 is the case's clean-latent estimate x0 = x_t + sigma * output. Decoding the x0 of the graph (or the
engines), of diffusers float32 and of diffusers bf16 with one decoder, diffusers' float32 AutoencoderKLQwenImage
through the pipeline's own tail (de-normalize, decode, post-process, round to uint8 as numpy_to_pil does), gives the
images a user would see after that step; each side is scored against float32's. One decoder for every side keeps the
scores about the denoiser: the VAE stage is checked on its own (parity.stages).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
from nucleus_runtime.latents import unpack_latents

# packed latents [B, S, C * p * p] on a patch grid -> uint8 RGB images [B, H, W, 3]
ImageDecoder = Callable[[np.ndarray, tuple[int, int]], np.ndarray]

LEVELS = 255.0  # the data range of 8-bit images

# Peak bytes of diffusers' float32 decode on the CPU per output pixel and per channel of the decoder's full-resolution
# stage, measured on the released VAE (96 channels) beyond the process's 0.38 GB: 8.8 GB for one 1024x1024 image,
# 2.6 GB at 512x512 (docs/quality.md). The causal 3D convolutions pad and cache copies of those activations.
DECODE_BYTES_PER_PIXEL_CHANNEL = 100


def x0_estimate(hidden_states: np.ndarray, output: np.ndarray, timestep: np.ndarray) -> np.ndarray:
    """The clean-latent estimate x_t + sigma * output per batch row (module docstring; sigma = the timestep input)."""
    return hidden_states + timestep.reshape(-1, 1, 1).astype(np.float32) * output


def psnr(image: np.ndarray, reference: np.ndarray, data_range: float = LEVELS) -> float | None:
    """Peak signal-to-noise ratio in dB, None for identical images (no finite value, and none JSON can hold)."""
    mse = float(np.mean((image.astype(np.float64) - reference.astype(np.float64)) ** 2))
    return psnr_of_mse(mse, data_range)


def psnr_of_mse(mse: float, data_range: float = LEVELS) -> float | None:
    return None if mse == 0 else float(10 * np.log10(data_range**2 / mse))


def _gaussian_window(size: int = 11, sigma: float = 1.5) -> np.ndarray:
    x = np.arange(size) - (size - 1) / 2
    g = np.exp(-(x**2) / (2 * sigma**2))
    return g / g.sum()


def _filter(image: np.ndarray, window: np.ndarray) -> np.ndarray:
    """Separable 'valid' filtering of [..., H, W]."""
    k = len(window)
    out = sum(window[i] * image[..., i : image.shape[-2] - k + 1 + i, :] for i in range(k))
    return sum(window[i] * out[..., :, i : out.shape[-1] - k + 1 + i] for i in range(k))


def ssim(image: np.ndarray, reference: np.ndarray, data_range: float = LEVELS) -> float:
    """Mean structural similarity (Wang et al. 2004: 11x11 Gaussian window, sigma 1.5, K1 0.01, K2 0.03) of channel-
    first images [..., H, W], channels averaged."""
    x, y = image.astype(np.float64), reference.astype(np.float64)
    # Images smaller than the window (toy models' thumbnails) get the largest odd window that fits.
    w = _gaussian_window(min(11, (min(x.shape[-2:]) - 1) | 1))
    c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
    mu_x, mu_y = _filter(x, w), _filter(y, w)
    sxx = _filter(x * x, w) - mu_x**2
    syy = _filter(y * y, w) - mu_y**2
    sxy = _filter(x * y, w) - mu_x * mu_y
    num = (2 * mu_x * mu_y + c1) * (2 * sxy + c2)
    den = (mu_x**2 + mu_y**2 + c1) * (sxx + syy + c2)
    return float(np.mean(num / den))


def pipeline_images(vae: Any, latents: np.ndarray) -> np.ndarray:
    """diffusers' pipeline tail on normalized latents [B, C, h, w] (or [B, C, 1, h, w]) in the VAE's dtype:
    de-normalize, decode frame 0, post-process, round to uint8 as numpy_to_pil does -> [B, H, W, 3]."""
    import torch
    from diffusers.image_processor import VaeImageProcessor

    z = torch.from_numpy(np.ascontiguousarray(latents, np.float32))
    z = (z if z.ndim == 5 else z[:, :, None]).to(vae.dtype)
    mean = torch.tensor(vae.config.latents_mean).view(1, -1, 1, 1, 1).to(z.dtype)
    inv_std = 1.0 / torch.tensor(vae.config.latents_std).view(1, -1, 1, 1, 1).to(z.dtype)
    with torch.no_grad():
        image = vae.decode(z / inv_std + mean, return_dict=False)[0][:, :, 0]
    # postprocess only denormalizes [-1, 1] to [0, 1] and moves channels last; the scale factor plays no part.
    return (VaeImageProcessor().postprocess(image.float(), output_type="np") * LEVELS).round().astype(np.uint8)


def diffusers_decoder(vae_dir: Path, patch_size: int, device: str = "cpu") -> ImageDecoder:
    """diffusers' AutoencoderKLQwenImage in float32 as an ImageDecoder, one image at a time (the decode's activations
    of one 1024x1024 image alone peak at ~9 GB on the CPU)."""
    import torch
    from diffusers import AutoencoderKLQwenImage

    vae = AutoencoderKLQwenImage.from_pretrained(str(vae_dir), torch_dtype=torch.float32).to(device).eval()

    def decode(packed: np.ndarray, grid: tuple[int, int]) -> np.ndarray:
        latents = unpack_latents(np.asarray(packed, np.float32), grid, patch_size)
        return np.concatenate([pipeline_images(vae, latents[row : row + 1]) for row in range(latents.shape[0])])

    return decode


def decode_bytes(pixels: int, channels: int) -> int:
    """Predicted peak activation bytes of one image's float32 decode on the CPU (DECODE_BYTES_PER_PIXEL_CHANNEL);
    `channels`: the decoder's width at full resolution."""
    return pixels * channels * DECODE_BYTES_PER_PIXEL_CHANNEL
