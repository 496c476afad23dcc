"""Shared benchmark helpers: machine description, interleaved timing, result files."""

from __future__ import annotations

import json
import os
import platform
import statistics
import time
from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path

import torch

RESULTS = Path(__file__).resolve().parent / "results"


def machine_info() -> dict:
    """What the numbers were measured on (CPU model, cores, threads, library versions, load)."""
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    try:
        load = os.getloadavg()
    except OSError:
        load = None
    return {"cpu": cpu, "cores": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "torch": torch.__version__, "python": platform.python_version(), "platform": platform.platform(),
            "load_avg": load, "date_utc": datetime.now(timezone.utc).isoformat(timespec="seconds")}


def median_spread(samples: list[float]) -> dict:
    """Median with the interquartile range and the extremes (seconds)."""
    ordered = sorted(samples)
    q = statistics.quantiles(ordered, n=4) if len(ordered) > 1 else [ordered[0]] * 3
    return {"median": statistics.median(ordered), "q1": q[0], "q3": q[2], "min": ordered[0],
            "max": ordered[-1], "n": len(ordered)}


def interleaved(fns: dict[str, Callable[[], object]], repeats: int, warmup: int = 2) -> dict[str, list[float]]:
    """Time each callable ``repeats`` times, alternating between them every round (so load drifts hit all
    alike); returns seconds per call."""
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    return times


def write_results(name: str, data: dict, markdown: str) -> tuple[Path, Path]:
    """Write ``results/<name>.json`` (data + machine info) and ``results/<name>.md``."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    info = machine_info()
    json_path, md_path = RESULTS / f"{name}.json", RESULTS / f"{name}.md"
    json_path.write_text(json.dumps({"machine": info, **data}, indent=2) + "\n")
    machine = ", ".join(f"{k}: {v}" for k, v in info.items())
    md_path.write_text(f"{markdown.rstrip()}\n\nMachine: {machine}\n")
    return json_path, md_path
