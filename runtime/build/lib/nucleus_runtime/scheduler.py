"""FlowMatch Euler sampling schedule in numpy: diffusers' FlowMatchEulerDiscreteScheduler as the Nucleus pipeline uses it.

The pipeline always passes `sigmas = linspace(1, 1/N, N)` and a resolution shift `mu` (computed from the image token
count even when the config does not use it); the scheduler shifts those sigmas, optionally stretches them to
`shift_terminal`, appends the terminal sigma and steps with `x + (sigma_next - sigma) * v`. Arithmetic follows
diffusers' order and dtypes (float32 arrays, Python-float scalars) so the schedule matches it to the last bit.

Supported: static `shift`, dynamic shifting (`time_shift_type` exponential or linear), `shift_terminal`,
`invert_sigmas`. Karras / exponential / beta sigmas and stochastic sampling are refused with a clear error.
"""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path
from typing import Any

import numpy as np

from nucleus_runtime.errors import NucleusError

SCHEDULER_CLASS = "FlowMatchEulerDiscreteScheduler"

# What a bundle gets when the model path is not a pipeline root (no scheduler/ folder to copy): the settings of
# Nucleus-Image's published scheduler, every key written out as diffusers saves it.
DEFAULT_SCHEDULER_CONFIG: dict[str, Any] = {
    "_class_name": SCHEDULER_CLASS,
    "num_train_timesteps": 1000,
    "shift": 1.0,
    "use_dynamic_shifting": True,
    "base_shift": 0.5,
    "max_shift": 1.15,
    "base_image_seq_len": 256,
    "max_image_seq_len": 4096,
    "invert_sigmas": False,
    "shift_terminal": None,
    "use_karras_sigmas": False,
    "use_exponential_sigmas": False,
    "use_beta_sigmas": False,
    "time_shift_type": "exponential",
    "stochastic_sampling": False,
}

# Config keys whose features this runtime does not implement; refused when set to anything truthy.
_UNSUPPORTED_FLAGS = ("use_karras_sigmas", "use_exponential_sigmas", "use_beta_sigmas", "stochastic_sampling")


@dataclasses.dataclass(frozen=True)
class SchedulerConfig:
    """The FlowMatchEulerDiscreteScheduler settings the runtime honours (names as in diffusers' scheduler_config.json)."""

    num_train_timesteps: int = 1000
    shift: float = 1.0
    use_dynamic_shifting: bool = False
    base_shift: float | None = 0.5
    max_shift: float | None = 1.15
    base_image_seq_len: int = 256
    max_image_seq_len: int = 4096
    invert_sigmas: bool = False
    shift_terminal: float | None = None
    time_shift_type: str = "exponential"

    @classmethod
    def from_dict(cls, raw: dict[str, Any], source: str = "scheduler config") -> SchedulerConfig:
        """Parse a diffusers scheduler config; refuse other schedulers and features this runtime does not implement."""
        class_name = raw.get("_class_name", SCHEDULER_CLASS)
        if class_name != SCHEDULER_CLASS:
            raise NucleusError(
                f"{source} is for {class_name}; this runtime implements {SCHEDULER_CLASS} only.",
                f"export the bundle with a {SCHEDULER_CLASS} scheduler config.",
            )
        fields = {f.name for f in dataclasses.fields(cls)}
        unsupported = [k for k in _UNSUPPORTED_FLAGS if raw.get(k)]
        # Keys this runtime has never heard of may change the schedule; refuse them unless they are unset.
        unknown = [k for k, v in raw.items() if not k.startswith("_") and k not in fields and k not in _UNSUPPORTED_FLAGS and v]
        if unsupported or unknown:
            raise NucleusError(
                f"{source} sets {', '.join(unsupported + unknown)}, which this runtime does not implement.",
                "use a scheduler config without those options (the Nucleus-Image default has none).",
            )
        config = cls(**{k: v for k, v in raw.items() if k in fields})
        if config.time_shift_type not in ("exponential", "linear"):
            raise NucleusError(
                f"{source}: time_shift_type '{config.time_shift_type}' is unknown.", "use 'exponential' or 'linear'."
            )
        if config.use_dynamic_shifting and None in (config.base_shift, config.max_shift):
            raise NucleusError(
                f"{source}: use_dynamic_shifting needs base_shift and max_shift.", "set both in scheduler_config.json."
            )
        return config

    @classmethod
    def from_file(cls, path: Path) -> SchedulerConfig:
        path = Path(path)
        if not path.is_file():
            raise NucleusError(f"scheduler config {path} is missing.", "copy the complete bundle, or export it again.")
        try:
            raw = json.loads(path.read_text())
        except json.JSONDecodeError as exc:
            raise NucleusError(f"{path} is not valid JSON ({exc}).", "export the bundle again.") from None
        return cls.from_dict(raw, source=str(path))


@dataclasses.dataclass(frozen=True)
class Schedule:
    """One sampling run's schedule.

    Attributes:
        timesteps: [N] float32, the scheduler's timesteps (sigma * num_train_timesteps).
        sigmas: [N + 1] float32, including the terminal sigma.
        mu: the resolution shift used.
        num_train_timesteps: divisor that turns a timestep into what the transformer receives.
    """

    timesteps: np.ndarray
    sigmas: np.ndarray
    mu: float
    num_train_timesteps: int

    def __len__(self) -> int:
        return len(self.timesteps)

    def model_timestep(self, index: int, batch: int) -> np.ndarray:
        """[batch] float32 `t / num_train_timesteps`, the value diffusers' transformer forward receives."""
        return np.full((batch,), self.timesteps[index], dtype=np.float32) / np.float32(self.num_train_timesteps)

    def step(self, model_output: np.ndarray, index: int, sample: np.ndarray) -> np.ndarray:
        """Euler step from sigmas[index] to sigmas[index + 1]."""
        dt = self.sigmas[index + 1] - self.sigmas[index]
        return (sample.astype(np.float32) + dt * model_output).astype(np.float32)


def calculate_shift(
    image_seq_len: int,
    base_seq_len: int = 256,
    max_seq_len: int = 4096,
    base_shift: float = 0.5,
    max_shift: float = 1.15,
) -> float:
    """Resolution shift mu: linear in the image token count (diffusers' calculate_shift)."""
    m = (max_shift - base_shift) / (max_seq_len - base_seq_len)
    b = base_shift - m * base_seq_len
    return image_seq_len * m + b


def make_schedule(config: SchedulerConfig, num_steps: int, image_seq_len: int) -> Schedule:
    """The schedule NucleusMoEImagePipeline sets for `num_steps` steps at `image_seq_len` image tokens."""
    if num_steps < 1:
        raise NucleusError(f"steps must be at least 1 (got {num_steps}).", "pass --steps 1 or more.")
    # The pipeline reads these with config.get(..., default), so missing values fall back to the same numbers.
    mu = calculate_shift(
        image_seq_len,
        config.base_image_seq_len,
        config.max_image_seq_len,
        config.base_shift if config.base_shift is not None else 0.5,
        config.max_shift if config.max_shift is not None else 1.15,
    )
    sigmas = np.linspace(1.0, 1 / num_steps, num_steps).astype(np.float32)
    if config.use_dynamic_shifting:
        if config.time_shift_type == "exponential":
            sigmas = math.exp(mu) / (math.exp(mu) + (1 / sigmas - 1) ** 1.0)
        else:
            sigmas = mu / (mu + (1 / sigmas - 1) ** 1.0)
    else:
        sigmas = config.shift * sigmas / (1 + (config.shift - 1) * sigmas)
    if config.shift_terminal:
        if num_steps == 1:
            # diffusers divides 0 by 0 here and samples NaNs; say so instead.
            raise NucleusError("shift_terminal needs at least 2 steps.", "pass --steps 2 or more.")
        one_minus_z = 1 - sigmas
        scale_factor = one_minus_z[-1] / (1 - config.shift_terminal)
        sigmas = 1 - (one_minus_z / scale_factor)
    sigmas = sigmas.astype(np.float32)
    if config.invert_sigmas:
        sigmas = (np.float32(1.0) - sigmas).astype(np.float32)
        terminal = np.float32(1.0)
    else:
        terminal = np.float32(0.0)
    timesteps = (sigmas * np.float32(config.num_train_timesteps)).astype(np.float32)
    return Schedule(
        timesteps=timesteps,
        sigmas=np.concatenate([sigmas, [terminal]]).astype(np.float32),
        mu=mu,
        num_train_timesteps=config.num_train_timesteps,
    )
