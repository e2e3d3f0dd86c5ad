"""Host memory figures the runtime plans with, from the kernel's own accounting (no psutil in the runtime)."""

from __future__ import annotations

import os
from pathlib import Path

MEMINFO = Path("/proc/meminfo")


def host_available_bytes() -> int:
    """Memory the kernel could give this process now without swapping (MemAvailable: free + reclaimable cache);
    elsewhere than Linux, the free physical pages."""
    if MEMINFO.is_file():
        for line in MEMINFO.read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
