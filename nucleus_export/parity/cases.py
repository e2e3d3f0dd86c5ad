"""The inputs a parity check runs: every served resolution, batch 1 and 2, padded masks, early/mid/late steps."""

from __future__ import annotations

import dataclasses

import numpy as np
from nucleus_runtime import rope
from nucleus_runtime.bundle import Profiles

from nucleus_export.model.config import ModelConfig

# Timestep inputs (t / 1000) near the start, middle and end of a schedule.
TIMESTEPS = {"early": 0.95, "middle": 0.5, "late": 0.05}


@dataclasses.dataclass
class ParityCase:
    """One forward pass: inputs for both graphs (numpy, contract names) and where they come from."""

    name: str
    resolution: tuple[int, int]
    grid: tuple[int, int]
    hidden_states: np.ndarray
    timestep: np.ndarray
    encoder_hidden_states: np.ndarray
    mask: np.ndarray

    @property
    def batch(self) -> int:
        return self.hidden_states.shape[0]

    def text_kv_inputs(self, config: ModelConfig) -> dict[str, np.ndarray]:
        cos, sin = rope.text_rope(config.axes_dims_rope, *self.grid, self.mask.shape[1])
        return {"encoder_hidden_states": self.encoder_hidden_states, "txt_rope_cos": cos, "txt_rope_sin": sin}

    def denoiser_inputs(self, config: ModelConfig, text_kv: np.ndarray) -> dict[str, np.ndarray]:
        cos, sin = rope.image_rope(config.axes_dims_rope, *self.grid)
        return {
            "hidden_states": self.hidden_states,
            "timestep": self.timestep,
            "img_rope_cos": cos,
            "img_rope_sin": sin,
            "text_kv": text_kv,
            "encoder_hidden_states_mask": self.mask,
        }


def make_cases(config: ModelConfig, profiles: Profiles, seed: int = 0, text_len: int | None = None) -> list[ParityCase]:
    """Three cases per resolution: batch 1 early, batch 2 middle, batch 2 late; batch-2 rows have different
    padding so masks matter."""
    rng = np.random.default_rng(seed)
    text_len = text_len or min(profiles.text_len[2], max(profiles.text_len[1], 8))
    cases = []
    for resolution, grid in zip(profiles.resolutions, profiles.grids):
        tokens = grid[0] * grid[1]
        for batch, phase in ((1, "early"), (2, "middle"), (2, "late")):
            mask = np.ones((batch, text_len), dtype=np.int64)
            if batch == 2 and text_len > 1:
                mask[1, max(1, text_len // 2) :] = 0
            cases.append(
                ParityCase(
                    name=f"{resolution[0]}x{resolution[1]}/b{batch}/{phase}",
                    resolution=resolution,
                    grid=grid,
                    hidden_states=rng.standard_normal((batch, tokens, config.in_channels)).astype(np.float32),
                    timestep=np.full((batch,), TIMESTEPS[phase], dtype=np.float32),
                    encoder_hidden_states=rng.standard_normal((batch, text_len, config.joint_attention_dim)).astype(np.float32),
                    mask=mask,
                )
            )
    return cases
