"""The inputs a parity check runs: every served resolution, batch 1 and 2, padded masks, early/mid/late steps.

Cases of one resolution run as one batch (`batch_by_resolution`): every op of the model is per batch row (attention,
norms, and expert-choice routing, which picks its top-C per row), so stacking rows changes no result and turns
21 graph and reference runs into 7.
"""

from __future__ import annotations

import dataclasses

import numpy as np
from nucleus_runtime import rope
from nucleus_runtime.backends.base import denoiser_host_inputs, text_kv_inputs
from nucleus_runtime.bundle import Profiles
from nucleus_runtime.contract import TEXT_KV

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
        return text_kv_inputs(self.encoder_hidden_states, cos, sin)

    def denoiser_inputs(self, config: ModelConfig, text_kv: np.ndarray) -> dict[str, np.ndarray]:
        cos, sin = rope.image_rope(config.axes_dims_rope, *self.grid)
        return {**denoiser_host_inputs(self.hidden_states, self.timestep, cos, sin, self.mask), TEXT_KV: text_kv}


CASE_SETS = ("quick", "full")


def make_cases(
    config: ModelConfig, profiles: Profiles, seed: int = 0, text_len: int | None = None, case_set: str = "full"
) -> list[ParityCase]:
    """Three cases per resolution: batch 1 early, batch 2 middle, batch 2 late; batch-2 rows have different
    padding so masks matter. The "quick" set keeps the engines' optimization resolution (1024x1024 by default):
    one batched run instead of one per resolution."""
    if case_set not in CASE_SETS:
        raise ValueError(f"case_set must be one of {CASE_SETS}, got {case_set!r}")
    rng = np.random.default_rng(seed)
    text_len = text_len or min(profiles.text_len[2], max(profiles.text_len[1], 8))
    served = list(zip(profiles.resolutions, profiles.grids))
    if case_set == "quick":
        served = [(r, g) for r, g in served if tuple(r) == tuple(profiles.opt_resolution)]
    cases = []
    for resolution, grid in served:
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


def batch_by_resolution(
    cases: list[ParityCase], max_rows: int | None = None
) -> list[tuple[ParityCase, list[tuple[ParityCase, slice]]]]:
    """Stack the cases of each resolution into one case; returns (stacked case, [(case, its rows)]) per stack, in
    first-seen order. Cases of one resolution must share the text length (make_cases' do). With `max_rows`, a stack
    holds whole cases of at most that many rows (one case per stack if it alone is larger): the activations of one
    run stay bounded while the results stay the same (every op is per batch row)."""
    groups: dict[tuple[int, int], list[list[ParityCase]]] = {}
    for case in cases:
        stacks = groups.setdefault(case.resolution, [[]])
        if max_rows is not None and stacks[-1] and sum(c.batch for c in stacks[-1]) + case.batch > max_rows:
            stacks.append([])
        stacks[-1].append(case)
    batches = []
    for resolution, stacks in groups.items():
        if len({c.mask.shape[1] for members in stacks for c in members}) != 1:
            raise ValueError(f"cases at {resolution} have different text lengths; they cannot share a batch")
        for part, members in enumerate(stacks):
            rows, start = [], 0
            for case in members:
                rows.append((case, slice(start, start + case.batch)))
                start += case.batch
            stacked = ParityCase(
                name=f"{resolution[0]}x{resolution[1]}" + (f"/part{part}" if len(stacks) > 1 else ""),
                resolution=resolution,
                grid=members[0].grid,
                hidden_states=np.concatenate([c.hidden_states for c in members]),
                timestep=np.concatenate([c.timestep for c in members]),
                encoder_hidden_states=np.concatenate([c.encoder_hidden_states for c in members]),
                mask=np.concatenate([c.mask for c in members]),
            )
            batches.append((stacked, rows))
    return batches
