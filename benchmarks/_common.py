"""Shared benchmark helpers: machine description, interleaved timing, result files."""

from __future__ import annotations

import json
import os
import statistics
import time
from collections.abc import Callable
from pathlib import Path

from kvlab.machine import machine_info  # noqa: F401  (re-exported for the scripts)

RESULTS = Path(__file__).resolve().parent / "results"


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


def command_line(script: str, argv: list[str] | None) -> str:
    """The invocation a results file quotes: ``python benchmarks/<script> <args>``, in backticks."""
    import sys

    return f"`python benchmarks/{script} " + " ".join(argv if argv is not None else sys.argv[1:]) + "`"


def write_results(name: str, data: dict, markdown: str) -> tuple[Path, Path]:
    """Write ``results/<name>.json`` (data + machine info) and ``results/<name>.md``. ``KVLAB_RESULTS_SUFFIX``
    (e.g. ``_xeon``) is appended to the name: another machine's run kept beside this one's."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    suffix = os.environ.get("KVLAB_RESULTS_SUFFIX", "")
    if suffix and not all(c.isalnum() or c in "_-." for c in suffix):
        raise SystemExit(f"KVLAB_RESULTS_SUFFIX: letters, digits, '_', '-' and '.' only, got {suffix!r}")
    name += suffix
    info = machine_info()
    json_path, md_path = RESULTS / f"{name}.json", RESULTS / f"{name}.md"
    json_path.write_text(json.dumps({"machine": info, **data}, indent=2) + "\n")
    machine = ", ".join(f"{k}: {v}" for k, v in info.items())
    md_path.write_text(f"{markdown.rstrip()}\n\nMachine: {machine}\n")
    return json_path, md_path


def _busy_seconds() -> float | None:
    """CPU seconds all processes on the machine have spent busy (from /proc/stat), or None off Linux."""
    try:
        fields = Path("/proc/stat").read_text().splitlines()[0].split()[1:]
    except OSError:
        return None
    ticks = [int(x) for x in fields]
    idle = ticks[3] + (ticks[4] if len(ticks) > 4 else 0)  # idle + iowait
    busy = sum(ticks[:8]) - idle  # user nice system idle iowait irq softirq steal (guest is inside user)
    return busy / os.sysconf("SC_CLK_TCK")


def _own_seconds() -> float:
    import resource

    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def guarded(fn: Callable[[], object], max_other_cores: float = 0.1, retries: int = 8) -> tuple[object, dict]:
    """Run ``fn`` until no other process used more than ``max_other_cores`` cores on average while it ran
    (``/proc/stat`` busy time minus this process's ``getrusage``), at most ``retries`` + 1 times. Returns
    ``fn``'s last result and ``{"other_cores": load seen, "attempts": n, "quiet": bool}``: a noisy sample is
    kept (and marked) when the machine never went quiet, so a busy machine still gives numbers."""
    attempts, other = 0, float("nan")
    while True:
        attempts += 1
        busy0, own0, t0 = _busy_seconds(), _own_seconds(), time.perf_counter()
        result = fn()
        wall = time.perf_counter() - t0
        if busy0 is None:
            return result, {"other_cores": None, "attempts": attempts, "quiet": True}
        other = max((_busy_seconds() - busy0) - (_own_seconds() - own0), 0.0) / max(wall, 1e-9)
        if other <= max_other_cores or attempts > retries:
            return result, {"other_cores": round(other, 3), "attempts": attempts, "quiet": other <= max_other_cores}
