"""Quality in the unit users see: PSNR and SSIM of decoded images.

The denoiser predicts a velocity; with flow matching, x_t = (1 - sigma) x0 + sigma noise and v = noise - x0, so each
parity case's clean-latent estimate is x0 = x_t - sigma v, sigma being the timestep input (t / 1000). Decoding the
x0 of the graph (or engine), of diffusers float32 and of diffusers bf16 with the same VAE gives images compared with
PSNR and SSIM against float32's, so a report can say "bf16 graph: 41.2 dB, diffusers bf16: 41.0 dB".

The decoder is a hook (`ImageDecoder`): diffusers' AutoencoderKLQwenImage (`diffusers_decoder`) for both sides when
the bundle has no VAE stage; a bundle's own vae_decoder graph can be passed once that stage lands in bundles.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from pathlib import Path

import numpy as np

# latents [B, S, C * 4] (packed 2x2 patches) and the patch grid -> images [B, 3, H, W] in [-1, 1]
ImageDecoder = Callable[[np.ndarray, tuple[int, int]], np.ndarray]


def x0_estimate(hidden_states: np.ndarray, velocity: np.ndarray, timestep: np.ndarray) -> np.ndarray:
    """Flow matching's clean-latent estimate x0 = x_t - sigma v, per batch row (sigma = the timestep input)."""
    return hidden_states - timestep.reshape(-1, 1, 1).astype(np.float32) * velocity


def psnr(image: np.ndarray, reference: np.ndarray, data_range: float = 2.0) -> float:
    """Peak signal-to-noise ratio in dB (inf for identical images); images in [-1, 1] by default."""
    mse = float(np.mean((image.astype(np.float64) - reference.astype(np.float64)) ** 2))
    return float("inf") if mse == 0 else float(10 * np.log10(data_range**2 / mse))


def _gaussian_window(size: int = 11, sigma: float = 1.5) -> np.ndarray:
    x = np.arange(size) - (size - 1) / 2
    g = np.exp(-(x**2) / (2 * sigma**2))
    return g / g.sum()


def _filter(image: np.ndarray, window: np.ndarray) -> np.ndarray:
    """Separable 'valid' filtering of [..., H, W]."""
    k = len(window)
    out = sum(window[i] * image[..., i : image.shape[-2] - k + 1 + i, :] for i in range(k))
    return sum(window[i] * out[..., :, i : out.shape[-1] - k + 1 + i] for i in range(k))


def ssim(image: np.ndarray, reference: np.ndarray, data_range: float = 2.0) -> float:
    """Mean structural similarity (Wang et al. 2004: 11x11 Gaussian window, sigma 1.5, K1 0.01, K2 0.03) over
    [..., H, W] images, channels averaged."""
    x, y = image.astype(np.float64), reference.astype(np.float64)
    w = _gaussian_window()
    c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
    mu_x, mu_y = _filter(x, w), _filter(y, w)
    sxx = _filter(x * x, w) - mu_x**2
    syy = _filter(y * y, w) - mu_y**2
    sxy = _filter(x * y, w) - mu_x * mu_y
    num = (2 * mu_x * mu_y + c1) * (2 * sxy + c2)
    den = (mu_x**2 + mu_y**2 + c1) * (sxx + syy + c2)
    return float(np.mean(num / den))


@dataclasses.dataclass
class ImageQuality:
    """PSNR (dB) and SSIM of decoded images against diffusers float32's, per side."""

    psnr: dict[str, float]
    ssim: dict[str, float]

    def summary_line(self) -> str:
        return "decoded images vs diffusers float32: " + ", ".join(
            f"{k}: PSNR {self.psnr[k]:.2f} dB, SSIM {self.ssim[k]:.5f}" for k in self.psnr
        )


def image_quality(decode: ImageDecoder, grid: tuple[int, int], hidden_states: np.ndarray, timestep: np.ndarray,
                  truth: np.ndarray, others: dict[str, np.ndarray]) -> ImageQuality:
    """Decode the x0 estimates of float32 truth and of each other side (e.g. "graph", "diffusers bf16") and compare.

    Args:
        decode: latents -> images (ImageDecoder).
        hidden_states, timestep: the case's denoiser inputs.
        truth: diffusers float32's velocity; others: label -> velocity.
    """
    reference = decode(x0_estimate(hidden_states, truth, timestep), grid)
    scores_psnr, scores_ssim = {}, {}
    for label, velocity in others.items():
        image = decode(x0_estimate(hidden_states, velocity, timestep), grid)
        scores_psnr[label], scores_ssim[label] = psnr(image, reference), ssim(image, reference)
    return ImageQuality(scores_psnr, scores_ssim)


def diffusers_decoder(vae_dir: Path, device: str = "cpu") -> ImageDecoder:
    """diffusers' AutoencoderKLQwenImage (float32) as the decoder of both sides: packed latents [B, S, C*4] on a
    patch grid are unpacked to [B, C, 1, 2h, 2w], de-normalized with the VAE's latents_mean / latents_std, decoded,
    and the single frame returned in [-1, 1]."""
    import torch
    from diffusers import AutoencoderKLQwenImage

    vae = AutoencoderKLQwenImage.from_pretrained(str(vae_dir), torch_dtype=torch.float32).to(device).eval()
    channels = vae.config.z_dim
    mean = torch.tensor(vae.config.latents_mean).view(1, channels, 1, 1, 1)
    std = torch.tensor(vae.config.latents_std).view(1, channels, 1, 1, 1)

    def decode(latents: np.ndarray, grid: tuple[int, int]) -> np.ndarray:
        h, w = grid
        x = torch.from_numpy(np.ascontiguousarray(latents, np.float32))
        b = x.shape[0]
        x = x.view(b, h, w, channels, 2, 2).permute(0, 3, 1, 4, 2, 5).reshape(b, channels, 1, h * 2, w * 2)
        with torch.no_grad():
            image = vae.decode(x * std + mean, return_dict=False)[0]
        return image[:, :, 0].clamp(-1, 1).cpu().numpy()

    return decode
