"""Pick the weights' dtype by measurement, never by assumption: bfloat16 only where this machine runs the
model's own matmuls faster in it. On a CPU with native bf16 (AMX, AVX512-BF16) prefill GEMMs run several
times faster; without it bf16 was measured 3-4x slower, and even with it a one-token GEMV can be slower.
So ``pick_dtype`` times the model's MLP matmul in fp32 and bf16 at a decode and a prefill shape
(interleaved, median), through the kernel the model will run (``packed``: oneDNN on a packed weight where
``linear_layout`` packs that dtype, as ``Model.packed_linears`` runs it where ``packed_pays`` measures that
faster), and takes bf16 only when it is at least ``MARGIN`` times faster at both.
On a 2-core Zen 4 EPYC (AVX512-BF16) bf16 loses at one row through MKL but wins 1.5-2.1x per linear packed. The
measurement is cached per process; ``dtype_report`` gives the timings and the decision, CPU flags as
information only."""

from __future__ import annotations

import functools
import statistics
import sys
import time
from pathlib import Path

import torch
from torch import nn

from kvlab.config import ModelConfig

MARGIN = 1.15  # bf16 must be this much faster at both shapes
PREFILL_ROWS = 256
REPEATS = 9
DTYPES = ("float32", "bfloat16")


def mlp_shape(config_or_shape: ModelConfig | dict | tuple[int, int]) -> tuple[int, int]:
    """(d_model, d_ff) of a config, a config dict or a ``(d_model, d_ff)`` pair."""
    if isinstance(config_or_shape, dict):
        config_or_shape = ModelConfig.from_dict(config_or_shape)
    if isinstance(config_or_shape, ModelConfig):
        return config_or_shape.d_model, config_or_shape.mlp_hidden
    d_model, d_ff = config_or_shape
    return int(d_model), int(d_ff)


def pick_dtype(config_or_shape: ModelConfig | dict | tuple[int, int], device: str | torch.device = "cpu",
               batch: int = 1, packed: bool = False) -> torch.dtype:
    """float32 or bfloat16 for a model of this shape on ``device``, decoding ``batch`` rows at a time (with
    ``packed`` linears, ``Model.packed_linears``): on CPU by measurement (``dtype_report``), on CUDA bf16
    where the GPU supports it."""
    return getattr(torch, dtype_report(config_or_shape, device, batch, packed)["dtype"])


def dtype_report(config_or_shape: ModelConfig | dict | tuple[int, int], device: str | torch.device = "cpu",
                 batch: int = 1, packed: bool = False) -> dict:
    """The decision and what it rests on: ``{"dtype", "reason", "speedup": {"decode", "prefill"}
    (fp32 time / bf16 time), "seconds", "shapes", "threads", "cpu_flags", ...}``. Cached per process (per
    device, shape, batch, kernel and thread count)."""
    d_model, d_ff = mlp_shape(config_or_shape)
    return dict(_report(torch.device(device).type, d_model, d_ff, batch, torch.get_num_threads(), bool(packed)))


@functools.cache
def _report(device: str, d_model: int, d_ff: int, batch: int, threads: int, packed: bool = False) -> dict:
    report: dict = {"device": device, "margin": MARGIN, "threads": threads, "packed": packed}
    if device == "cuda":
        bf16 = torch.cuda.is_available() and torch.cuda.is_bf16_supported()
        return {**report, "dtype": "bfloat16" if bf16 else "float32",
                "reason": "CUDA supports bf16" if bf16 else "this GPU has no bf16"}
    if device != "cpu":
        return {**report, "dtype": "float32", "reason": f"not measured on {device}"}
    shapes = {"decode": (batch, d_model, d_ff), "prefill": (PREFILL_ROWS, d_model, d_ff)}
    seconds = {name: _measure(*shape, REPEATS, packed) for name, shape in shapes.items()}
    speedup = {name: s["float32"] / s["bfloat16"] for name, s in seconds.items()}
    slow = [name for name, x in speedup.items() if x < MARGIN]
    reason = (f"bf16 >= {MARGIN}x faster at decode and prefill" if not slow else
              f"bf16 not >= {MARGIN}x faster at {' and '.join(slow)}")
    return {**report, "dtype": "float32" if slow else "bfloat16", "reason": reason, "speedup": speedup,
            "seconds": seconds, "shapes": {k: list(v) for k, v in shapes.items()}, "cpu_flags": _bf16_flags()}


def _measure(rows: int, d_in: int, d_out: int, repeats: int, packed: bool = False) -> dict[str, float]:
    """Median seconds of one ``x [rows, d_in] @ W.T`` (``W [d_out, d_in]`` column-major, as the model
    stores its hot-path linears; ``packed``: oneDNN's linear on a packed copy where that dtype packs) in
    each of ``DTYPES``, the dtypes alternating call by call."""
    from kvlab.linear_layout import column_major_, packed_linear, packed_weight

    gen = torch.Generator().manual_seed(0)
    weight = torch.randn(d_out, d_in, generator=gen) / d_in**0.5
    x = torch.randn(rows, d_in, generator=gen)
    calls = {}
    for name in DTYPES:
        linear = nn.Linear(d_in, d_out, bias=False)
        linear.weight = nn.Parameter(weight.to(getattr(torch, name)), requires_grad=False)
        column_major_(linear)
        reordered = packed_weight(linear.weight) if packed else None
        if reordered is not None:  # what FusedGroup.linear runs
            linear = functools.partial(packed_linear, packed=reordered)
        calls[name] = (linear, x.to(getattr(torch, name)))
    inner = max(1, 16 // rows)  # a one-row GEMV sample is several calls (~1 ms), so the clock resolves it
    times: dict[str, list[float]] = {name: [] for name in DTYPES}
    with torch.inference_mode():
        for i in range(repeats + 2):  # two warm-up rounds
            for name, (linear, inp) in calls.items():
                start = time.perf_counter()
                for _ in range(inner):
                    linear(inp)
                if i >= 2:
                    times[name].append((time.perf_counter() - start) / inner)
    return {name: statistics.median(t) for name, t in times.items()}


def _bf16_flags() -> str | None:
    """The CPU's bf16-related flags (information only; the decision is the timing)."""
    from kvlab.machine import machine_info

    found = [f for f in (machine_info()["cpu_flags"] or "").split() if f.startswith(("amx", "avx512_bf16"))]
    return " ".join(found) or None


def describe(report: dict) -> str:
    """One line: the dtype chosen and the measured ratios."""
    line = f"dtype auto: {report['dtype']} ({report['reason']}"
    if "speedup" in report:
        s = report["speedup"]
        line += (f"; bf16 speedup over fp32: decode {s['decode']:.2f}x at batch {report['shapes']['decode'][0]}, "
                 f"prefill {s['prefill']:.2f}x, {report['threads']} thread(s)"
                 + (", packed linears" if report.get("packed") else ""))
    return line + ")"


def resolve_dtype(choice: str | None, source: str | Path, batch: int = 1, packed: bool = False) -> str | None:
    """A CLI's ``--dtype``: None (the checkpoint's own), a dtype name, or ``auto``: measured for the
    checkpoint's shape and the kernel that will run (``dtype_report``), with one line on stderr."""
    if choice != "auto":
        return choice
    from kvlab.loading import read_model_config

    report = dtype_report(read_model_config(source), "cpu", batch, packed)
    print(describe(report), file=sys.stderr)
    return report["dtype"]
