"""Image resolutions a bundle serves: parsing, defaults and checks against the model's patch grid."""

from __future__ import annotations

import math

from nucleus_export.errors import UsageError
from nucleus_export.model.config import DEFAULT_VAE_SCALE_FACTOR, ModelConfig

# Seven aspect ratios from 1:1 to 16:9 and 9:16 at about one megapixel (multiples of 16 pixels).
ASPECT_RATIOS: dict[str, tuple[int, int]] = {
    "1:1": (1, 1),
    "4:3": (3, 4),
    "3:4": (4, 3),
    "3:2": (2, 3),
    "2:3": (3, 2),
    "16:9": (9, 16),
    "9:16": (16, 9),
}
DEFAULT_BASE = 1024


def aspect_resolutions(base: int = DEFAULT_BASE, multiple: int = 16) -> list[tuple[int, int]]:
    """(height, width) in pixels for each aspect ratio, with height*width close to base**2."""
    out = []
    for h_ratio, w_ratio in ASPECT_RATIOS.values():
        unit = math.sqrt(base * base / (h_ratio * w_ratio))
        out.append((round(unit * h_ratio / multiple) * multiple, round(unit * w_ratio / multiple) * multiple))
    return out


def parse_resolutions(text: str) -> list[tuple[int, int]]:
    """"1024x1024,768x1344" -> [(1024, 1024), (768, 1344)] (height x width)."""
    out = []
    for item in text.split(","):
        try:
            h, w = (int(v) for v in item.lower().strip().split("x"))
        except ValueError:
            raise UsageError(f"resolution '{item}' is not HEIGHTxWIDTH.", "write e.g. --resolutions 1024x1024,768x1344.") from None
        out.append((h, w))
    return out


def patch_grid(config: ModelConfig, height: int, width: int, vae_scale_factor: int = DEFAULT_VAE_SCALE_FACTOR) -> tuple[int, int]:
    """Latent patch grid (rows, cols) of a pixel resolution; refuses sizes the model cannot tile.

    Args:
        vae_scale_factor: pixels per latent of the pipeline's VAE (its config's 2 ** len(temperal_downsample));
            without a VAE at hand, the pipeline's own default.
    """
    step = vae_scale_factor * config.patch_size
    if height <= 0 or width <= 0 or height % step or width % step:
        raise UsageError(
            f"resolution {height}x{width} is not a multiple of {step} pixels (VAE factor {vae_scale_factor} x patch "
            f"size {config.patch_size}).",
            f"round height and width to multiples of {step}.",
        )
    return height // step, width // step
