"""Compiled CPU decode kernels (``csrc/*.cpp``), built on first use, each beside the torch reference it is
tested against:
- ``FLOAT`` (``float_attention.cpp``): one-query decode attention over a float32 / bfloat16 cache in one
  pass (flash-decoding over token blocks); ``grouped_sdpa`` runs it instead of SDPA where it applies, and
  ``FullAttention.decode_step`` its ``decode_step`` (RoPE, the cache write and attention in one call).
- ``QUANTIZED`` (``quantized_attention.cpp``): ``QuantizedKVCacheLayer.attend`` over the int8/int4 codes,
  dequantized in registers; the torch ops in ``quantized.py`` and ``attend_reference`` are its references.
- ``GEMV`` (``gemv.cpp``): the decode linear on a column-major weight (``linear_layout.gemv``): for up to 4
  rows each thread streams a contiguous range of the weight, for more (batched decode) register tiles of
  8 rows x 48 outputs; ``F.linear`` is its reference.
- ``TOPK`` (``topk_select.cpp``): CSA's top-k selection per query (``Indexer.select``), a bisection on
  each row's values with vectorised counts; ``Indexer.select_reference`` (torch ops) is its reference.
- ``DECODE_OPS`` (``decode_ops.cpp``): a decode step's RMSNorm, RoPE and SiLU-times-up, one call each where
  torch runs 2-7 small ops (``decode_ops`` says where; the torch ops beside each caller are the reference).
Why: at batch 1 a decode step is memory-bound, and on a 2-core EPYC torch's kernels read the cache (SDPA)
and the weights (MKL, oneDNN) at 8-17 GB/s of the ~30 the machine has, and at batch 16 MKL and oneDNN
computed SmolLM2's linears at 60-130 GFLOP/s of the ~180 its large matmuls reach
(``benchmarks/decode_attention.py``, ``benchmarks/fused_linears.py``).

They are compiled with ``torch.utils.cpp_extension`` (gcc + ninja, ~30-40 s each, once per machine) and
cached in ``~/.cache/kvlab/kernels`` (or ``KVLAB_KERNEL_DIR``) under a name that includes the source, the
flags and the CPU's model and flags, since ``-march=native`` code must not run on another CPU. Where a
build fails (no compiler), the torch path runs and one warning says why. ``KVLAB_FLOAT_KERNEL=0``,
``KVLAB_QUANT_KERNEL=0``, ``KVLAB_GEMV_KERNEL=0``, ``KVLAB_TOPK_KERNEL=0`` and ``KVLAB_DECODE_OPS_KERNEL=0``
turn a kernel off (the torch path, for comparisons).
"""

from __future__ import annotations

import hashlib
import os
import platform
import sys
import time
import warnings
from pathlib import Path

import torch

CSRC = Path(__file__).with_name("csrc")
FLAGS = ["-O3", "-march=native", "-fopenmp"]
STALE_LOCK_S = 600  # a build takes ~40 s; a lock older than this belongs to a killed build


class Kernel:
    """One C++ source built into a torch extension on first use (see the module docstring)."""

    def __init__(self, name: str, env: str, what: str):
        self.name, self.env, self.what = name, env, what
        self.source = CSRC / f"{name}.cpp"
        self.flags = list(FLAGS)
        self.built: dict[str, object] = {}  # "module": the extension or None (a failed build: never retried);
        #                                     "digest": its digest

    def enabled(self) -> bool:
        """Whether the kernel's environment variable allows it (default on; only ``0`` turns it off)."""
        return os.environ.get(self.env, "1") != "0"

    def module(self):
        """The compiled module, or None where the kernel is turned off or cannot be built."""
        if not self.enabled():
            return None
        if "module" not in self.built:
            self.built["module"] = self._build()
        return self.built["module"]

    def usable(self, *tensors: torch.Tensor) -> bool:
        """The kernel applies: built, and every tensor on the CPU."""
        return all(t.device.type == "cpu" for t in tensors) and self.module() is not None

    def digest(self) -> str:
        """What the built module depends on: its source, the shared header, the flags, the CPU and torch
        (a short hash; also part of the speed decisions measured on the kernel, ``linear_layout``)."""
        if "digest" not in self.built:
            texts = [path.read_text() for path in [self.source, *sorted(CSRC.glob("*.h"))]]  # the header too
            key = "\n".join([*texts, *self.flags, _cpu_model(), torch.__version__])
            self.built["digest"] = hashlib.sha256(key.encode()).hexdigest()[:12]
        return self.built["digest"]

    def _build(self):
        name = f"kvlab_{self.name}_{self.digest()}"
        try:
            from torch.utils.cpp_extension import load

            folder = cache_dir() / name
            folder.mkdir(parents=True, exist_ok=True)
            lock = folder / "lock"  # left by a build that was killed: torch would wait on it forever
            if lock.exists() and time.time() - lock.stat().st_mtime > STALE_LOCK_S:
                lock.unlink(missing_ok=True)
            if not (folder / f"{name}.so").exists():
                print(f"kvlab: building the {self.what} (once per machine, ~40 s)", file=sys.stderr)
            _ninja_on_path()
            return load(name=name, sources=[str(self.source)], extra_cflags=self.flags, extra_ldflags=["-fopenmp"],
                        build_directory=str(folder), verbose=False)
        except Exception as err:  # no compiler, no ninja, no headers: the torch path
            first = (str(err).strip().splitlines() or [type(err).__name__])[-1]
            warnings.warn(f"kvlab: {self.what} not built ({first[:200]}); using torch ops", stacklevel=4)
            return None


QUANTIZED = Kernel("quantized_attention", "KVLAB_QUANT_KERNEL", "quantized-KV decode kernel")
FLOAT = Kernel("float_attention", "KVLAB_FLOAT_KERNEL", "float decode-attention kernel")
GEMV = Kernel("gemv", "KVLAB_GEMV_KERNEL", "one-token linear kernel")
TOPK = Kernel("topk_select", "KVLAB_TOPK_KERNEL", "top-k selection kernel")
DECODE_OPS = Kernel("decode_ops", "KVLAB_DECODE_OPS_KERNEL", "decode elementwise kernels")
NOTHING = torch.empty(0)  # "no bias" / "no weight" for the C++ kernels (never written)
DECODE_OPS_MAX_ROWS = 64  # a decode step's rows (batch x 1 token); prefill's keep torch's threaded ops


def decode_ops(rows: int, *tensors: torch.Tensor):
    """``DECODE_OPS``' module where it may take this call, else None (the torch ops): at most
    ``DECODE_OPS_MAX_ROWS`` rows, float32 tensors on the CPU, nothing to differentiate, no ``torch.compile``
    trace (inductor fuses these ops itself)."""
    if rows > DECODE_OPS_MAX_ROWS or torch.compiler.is_compiling():
        return None
    for t in tensors:
        if t.dtype != torch.float32 or t.device.type != "cpu" or t.requires_grad and torch.is_grad_enabled():
            return None
    return DECODE_OPS.module()


def cache_dir() -> Path:
    """Where built kernels (and measured per-machine decisions, ``linear_layout``) are kept."""
    return Path(os.environ.get("KVLAB_KERNEL_DIR") or Path.home() / ".cache" / "kvlab" / "kernels")


def machine_key() -> str:
    """A short digest of what a speed measurement depends on: the CPU's model and flags, and torch."""
    return hashlib.sha256(f"{_cpu_model()}\n{torch.__version__}".encode()).hexdigest()[:12]


def _cpu_model() -> str:
    """The CPU's model name and feature flags (a model name alone, "AMD EPYC" on a cloud VM, can hide
    different instruction sets)."""
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        return platform.processor()
    model = next((line for line in lines if line.startswith("model name")), "")
    flags = next((line for line in lines if line.startswith("flags")), "")
    return f"{model}\n{flags}" if model or flags else platform.processor()


def _ninja_on_path() -> None:
    """torch runs ``ninja`` from PATH; the pip package's binary is in the venv's bin, which PATH lacks when
    kvlab runs as ``.venv/bin/kvlab`` without activating the venv."""
    try:
        import ninja
    except ImportError:
        return
    path = os.environ.get("PATH", "")
    if ninja.BIN_DIR not in path.split(os.pathsep):
        os.environ["PATH"] = os.pathsep.join([ninja.BIN_DIR, path]) if path else ninja.BIN_DIR
