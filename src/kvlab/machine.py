"""What a measurement ran on: written next to every benchmark and comparison result."""

from __future__ import annotations

import os
import platform
from datetime import datetime, timezone
from pathlib import Path

SIMD_FLAGS = ("avx", "fma", "amx", "f16c", "sse4")  # the /proc/cpuinfo flags that decide kernel speed


def machine_info() -> dict:
    """CPU model, its SIMD flags, cores, torch threads, library versions, load average and the UTC date."""
    import torch

    cpu = platform.processor() or platform.machine()
    flags: list[str] = []
    try:
        fields = dict(line.split(":", 1) for line in Path("/proc/cpuinfo").read_text().split("\n\n")[0]
                      .splitlines() if ":" in line)  # the first processor's block
        fields = {k.strip(): v.strip() for k, v in fields.items()}
        cpu = fields.get("model name", cpu)
        flags = sorted(f for f in fields.get("flags", "").split() if f.startswith(SIMD_FLAGS))
    except OSError:
        pass
    try:
        load = os.getloadavg()
    except OSError:
        load = None
    return {"cpu": cpu, "cpu_flags": " ".join(flags) or None, "cores": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "torch": torch.__version__, "python": platform.python_version(), "platform": platform.platform(),
            "load_avg": load, "date_utc": datetime.now(timezone.utc).isoformat(timespec="seconds")}
