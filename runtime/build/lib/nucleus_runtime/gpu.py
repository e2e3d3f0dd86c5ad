"""Whether this process may use a CUDA GPU, without loading any native library (no CUDA context, no checksum due)."""

from __future__ import annotations

import os
from pathlib import Path

# One folder per GPU the NVIDIA kernel driver manages (Linux).
NVIDIA_PROC_GPUS = Path("/proc/driver/nvidia/gpus")
# Lets tests exercise the "no GPU" paths on a machine that has one.
ASSUME_NO_GPU_ENV = "NUCLEUS_EXPORT_ASSUME_NO_GPU"


def cuda_device_count() -> int:
    """Number of CUDA devices this process may use, 0 without a driver or GPU.

    Read from the kernel driver's /proc entries, narrowed by CUDA_VISIBLE_DEVICES as the CUDA runtime narrows it
    (entries up to the first invalid one, e.g. "-1" or "" hide every GPU).
    """
    if os.environ.get(ASSUME_NO_GPU_ENV):
        return 0
    count = sum(1 for _ in NVIDIA_PROC_GPUS.iterdir()) if NVIDIA_PROC_GPUS.is_dir() else 0
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is None:
        return count
    valid = 0
    for entry in visible.split(","):
        entry = entry.strip()
        if not entry or entry.startswith("-") or not (entry.isdigit() or entry.startswith(("GPU-", "MIG-"))):
            break
        valid += 1
    return min(count, valid)
