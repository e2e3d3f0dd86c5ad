"""The numpy FlowMatch Euler schedule against diffusers' FlowMatchEulerDiscreteScheduler, as the pipeline drives it."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler
from nucleus_runtime.errors import NucleusError
from nucleus_runtime.scheduler import (
    DEFAULT_SCHEDULER_CONFIG,
    SchedulerConfig,
    calculate_shift,
    make_schedule,
)

CONFIGS = [
    DEFAULT_SCHEDULER_CONFIG,
    {**DEFAULT_SCHEDULER_CONFIG, "time_shift_type": "linear"},
    {**DEFAULT_SCHEDULER_CONFIG, "shift_terminal": 0.02},
    {"num_train_timesteps": 1000, "shift": 3.0},
    {"num_train_timesteps": 1000, "shift": 1.0},
    {"num_train_timesteps": 1000, "shift": 2.0, "invert_sigmas": True},
    {**DEFAULT_SCHEDULER_CONFIG, "base_image_seq_len": 128, "max_shift": 2.0, "num_train_timesteps": 500},
]


def _diffusers_run(raw: dict, steps: int, seq_len: int, outputs: list[torch.Tensor], sample: torch.Tensor):
    scheduler = FlowMatchEulerDiscreteScheduler.from_config({k: v for k, v in raw.items() if not k.startswith("_")})
    # The pipeline module imports transformers (not a dependency here); its calculate_shift is this formula.
    base, top = scheduler.config.get("base_image_seq_len", 256), scheduler.config.get("max_image_seq_len", 4096)
    m = (scheduler.config.get("max_shift", 1.15) - scheduler.config.get("base_shift", 0.5)) / (top - base)
    mu = seq_len * m + (scheduler.config.get("base_shift", 0.5) - m * base)
    scheduler.set_timesteps(steps, sigmas=np.linspace(1.0, 1 / steps, steps), mu=mu)
    scheduler.set_begin_index(0)
    model_timesteps = []
    for i, t in enumerate(scheduler.timesteps):
        model_timesteps.append((t.expand(1).to(torch.float32) / scheduler.config.num_train_timesteps).numpy())
        sample = scheduler.step(outputs[i], t, sample, return_dict=False)[0]
    return scheduler, mu, np.concatenate(model_timesteps), sample


@pytest.mark.parametrize("raw", CONFIGS)
@pytest.mark.parametrize("steps,seq_len", [(1, 64), (4, 240), (20, 1024), (50, 4096)])
def test_schedule_matches_diffusers_bitwise(raw, steps, seq_len):
    if raw.get("shift_terminal") and steps == 1:
        with pytest.raises(NucleusError, match="shift_terminal"):
            make_schedule(SchedulerConfig.from_dict(raw), steps, seq_len)
        return
    rng = np.random.default_rng(steps)
    sample = rng.standard_normal((1, seq_len, 4)).astype(np.float32)
    outputs = [rng.standard_normal((1, seq_len, 4)).astype(np.float32) for _ in range(steps)]
    ref, mu, ref_model_t, ref_sample = _diffusers_run(
        raw, steps, seq_len, [torch.from_numpy(o) for o in outputs], torch.from_numpy(sample)
    )

    schedule = make_schedule(SchedulerConfig.from_dict(raw), steps, seq_len)
    assert schedule.mu == mu
    np.testing.assert_array_equal(schedule.timesteps, ref.timesteps.numpy())
    np.testing.assert_array_equal(schedule.sigmas, ref.sigmas.numpy())
    np.testing.assert_array_equal(np.concatenate([schedule.model_timestep(i, 1) for i in range(steps)]), ref_model_t)
    for i in range(steps):
        sample = schedule.step(outputs[i], i, sample)
    np.testing.assert_array_equal(sample, ref_sample.numpy())


def test_calculate_shift_endpoints():
    assert calculate_shift(256) == pytest.approx(0.5)
    assert calculate_shift(4096) == pytest.approx(1.15)
    assert calculate_shift(1024) == pytest.approx(0.5 + 0.65 * 768 / 3840)


@pytest.mark.parametrize(
    "raw,needle",
    [
        ({"use_karras_sigmas": True}, "use_karras_sigmas"),
        ({"stochastic_sampling": True}, "stochastic_sampling"),
        ({"_class_name": "EulerDiscreteScheduler"}, "EulerDiscreteScheduler"),
        ({"time_shift_type": "cosine"}, "cosine"),
        ({"some_future_option": 3}, "some_future_option"),
        ({"use_dynamic_shifting": True, "base_shift": None}, "base_shift"),
    ],
)
def test_unsupported_configs_are_refused(raw, needle):
    with pytest.raises(NucleusError, match=needle):
        SchedulerConfig.from_dict(raw)


def test_unset_unsupported_flags_and_private_keys_are_accepted():
    raw = {**DEFAULT_SCHEDULER_CONFIG, "_diffusers_version": "0.42.1", "use_karras_sigmas": False, "use_beta_sigmas": False}
    assert SchedulerConfig.from_dict(raw).use_dynamic_shifting


def test_bad_step_count():
    with pytest.raises(NucleusError, match="steps"):
        make_schedule(SchedulerConfig(), 0, 64)
