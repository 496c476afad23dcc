"""The compiled decode kernels for quantized K/V (``csrc/quantized_attention.cpp``), built on first use.

``QuantizedKVCacheLayer.attend`` has two implementations of the same arithmetic: torch ops over blocks of
codes converted to float in a workspace (``quantized.py``), and these two C++ loops, which dequantize each
token's codes in registers and so read the cache once at a quarter (int8) or an eighth (int4) of fp32's
bytes. The kernel is used where it built: CPU tensors, float32 arithmetic. It is compiled with
``torch.utils.cpp_extension`` (gcc + ninja, ~40 s once per machine). The build is cached in
``~/.cache/kvlab/kernels`` (or ``KVLAB_KERNEL_DIR``) under a name that includes the source, the flags and
the CPU's model and flags, since ``-march=native`` code must not run on another CPU. Where the build fails
(no compiler), the torch path runs and one warning says why. ``KVLAB_QUANT_KERNEL=0`` turns the kernel off
(the torch path, for comparisons and tests).
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

SOURCE = Path(__file__).with_name("csrc") / "quantized_attention.cpp"
FLAGS = ["-O3", "-march=native", "-fopenmp"]
STALE_LOCK_S = 600  # a build takes ~40 s; a lock older than this belongs to a killed build
_state: dict[str, object] = {}


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


def enabled() -> bool:
    """Whether ``KVLAB_QUANT_KERNEL`` allows the kernel (default on)."""
    return os.environ.get("KVLAB_QUANT_KERNEL", "1") != "0"


def kernel():
    """The compiled module (``scores``, ``values``), or None where it is turned off or cannot be built."""
    if not enabled():
        return None
    if "module" not in _state:
        _state["module"] = _build()
    return _state["module"]


def _build():
    source = SOURCE.read_text()
    digest = hashlib.sha256("\n".join([source, *FLAGS, _cpu_model(), torch.__version__]).encode()).hexdigest()[:12]
    name = f"kvlab_quantized_attention_{digest}"
    try:
        from torch.utils.cpp_extension import load

        folder = Path(os.environ.get("KVLAB_KERNEL_DIR") or Path.home() / ".cache" / "kvlab" / "kernels") / name
        folder.mkdir(parents=True, exist_ok=True)
        lock = folder / "lock"  # left by a build that was killed: torch would wait on it forever
        if lock.exists() and time.time() - lock.stat().st_mtime > STALE_LOCK_S:
            lock.unlink(missing_ok=True)
        if not (folder / f"{name}.so").exists():
            print("kvlab: building the quantized-KV decode kernel (once per machine, ~40 s)", file=sys.stderr)
        _ninja_on_path()
        return load(name=name, sources=[str(SOURCE)], extra_cflags=FLAGS, extra_ldflags=["-fopenmp"],
                    build_directory=str(folder), verbose=False)
    except Exception as err:  # no compiler, no ninja, no headers: the torch path
        first = (str(err).strip().splitlines() or [type(err).__name__])[-1]
        warnings.warn(f"kvlab: quantized-KV decode kernel not built ({first[:200]}); using torch ops", stacklevel=3)
        return None


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


def usable(*tensors: torch.Tensor) -> bool:
    """The kernel applies: built, and every tensor on the CPU."""
    return all(t.device.type == "cpu" for t in tensors) and kernel() is not None
