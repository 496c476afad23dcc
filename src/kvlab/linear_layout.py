"""Weight layout of the one-token hot path: groups of linears that read the same input (q/k/v, gate/up) run
as one matmul, and (opt-in, ``Model.pack_linears_()``) on CPU through oneDNN on packed copies of the weights.

Decode at batch 1 reads every weight once per token, so it is a chain of GEMVs; at batch 16 a chain of thin
GEMMs. Measured at SmolLM2-135M's shapes (``benchmarks/fused_linears.py``):
- one matmul over a wider weight beats several narrow ones (fewer calls; MKL's single-call GEMV bandwidth
  grows with the output width: on a 2-core EPYC 12 GB/s at 576 outputs, 16 at 960, 20 at 3,072);
- oneDNN's linear on a weight reordered once into its blocked layout (``torch.ops.mkldnn``, what inductor's
  CPU freezing uses) beats MKL on the plain weight at 2 threads, 1.2-1.5x at one row and 1.3-2.4x at 16
  rows on that EPYC, but is 1.5x slower at 1 thread: it is used where ``packed_pays`` measured it faster;
- in bf16, where oneDNN has a native kernel (AVX512-BF16 on that Zen 4 EPYC), the packed linear takes
  0.5-0.67x fp32's packed time at one row and 0.36-0.48x at 16 (``fused_linears.py --dtype bfloat16``),
  while MKL's bf16 GEMV on the plain weight reads only 6-14 GB/s;
- without oneDNN, a column-major weight (``[out, in]`` stored ``in``-major) makes MKL's GEMV 1.3-1.9x faster;
- kvlab's own kernel (``kernels/csrc/gemv.cpp``) on the column-major weight needs no packed copy and beats
  both in fp32 on that EPYC: at one row (each thread streams a contiguous range of the weight's rows)
  1.3-1.7x the faster of them, and at 16 rows (register tiles of 8 rows x 48 outputs) 1.4-2x oneDNN's
  packed linear for the layers' weights. It runs for up to ``GEMV_MAX_ROWS`` rows (batched decode) where
  ``gemv_pays`` measures it faster.

A *fused group* keeps each member an ordinary ``nn.Linear`` with its usual name, shape and values (state
dicts, checkpoints and exports see nothing new), but its ``weight`` (and ``bias``) become row blocks of one
column-major tensor ``[sum out, in]``; a one-member group is the linear itself. The packed copy is the only
extra memory (one more copy of the hot-path weights, CPU only: opt-in, since a comparison holding eleven
SmolLM2 variants at once outgrew a 24 GiB machine with it). ``group_forward`` runs one linear and splits
its output -- only without autograd (gradients flow only through the members' own forward) and only while
every member still is its view (``param.data = ...``, ``.to()`` or a hook on a member falls back to the
members' own forward until the layout is re-done). An in-place update of the weights (an optimizer step)
bumps their versions: the stale packed copy is then skipped for the fused tensor until ``fuse_`` re-packs.
"""

from __future__ import annotations

import functools
import json
import os
import statistics
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from kvlab import kernels
from kvlab.kernels import GEMV, NOTHING

_GROUPS = "_fused_groups"  # module.__dict__ entry: names -> FusedGroup (not a parameter, not a buffer)


def column_major_(linear: nn.Linear) -> None:
    """Re-store ``linear.weight [out, in]`` with the ``in`` axis outermost (a transposed view of a contiguous
    ``[in, out]`` tensor), in place: names, shape and values are unchanged, but a one-token forward
    (``x @ W.T``) then streams the weight row by row. Prefill GEMMs are indifferent."""
    weight = linear.weight
    if weight.dim() == 2 and weight.device.type != "meta" and weight.stride(0) != 1:
        weight.data = weight.data.t().contiguous().t()


@functools.cache
def packable_dtypes() -> tuple[torch.dtype, ...]:
    """Weight dtypes oneDNN's linear takes packed on this CPU: fp32, and bf16 where oneDNN has a native bf16
    kernel (AVX512-BF16 or AMX; without one it would emulate, several times slower)."""
    if not torch.backends.mkldnn.is_available():
        return ()
    try:
        bf16 = bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        bf16 = False
    return (torch.float32, torch.bfloat16) if bf16 else (torch.float32,)


def packed_weight(weight: torch.Tensor) -> torch.Tensor | None:
    """``weight [out, in]`` reordered for oneDNN's linear (an opaque ``torch._mkldnn`` tensor), or None where
    that path does not apply (not a CPU weight of a ``packable_dtypes`` dtype, or a torch without oneDNN)."""
    if weight.device.type != "cpu" or weight.dtype not in packable_dtypes():
        return None
    try:
        return torch.ops.mkldnn._reorder_linear_weight(weight.detach().contiguous(), 1)
    except (AttributeError, RuntimeError):  # a build without the op
        return None


def packed_linear(x: torch.Tensor, packed: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``x @ weight.T + bias`` through oneDNN on ``packed = packed_weight(weight)``."""
    return torch.ops.mkldnn._linear_pointwise(x, packed, bias, "none", [], "")


@dataclass(frozen=True)
class FusedGroup:
    weight: torch.Tensor  # [sum out, in], column-major: the members' weights are its row blocks
    bias: torch.Tensor | None  # [sum out] or None
    sizes: tuple[int, ...]  # each member's out_features, in order
    pointers: tuple[int, ...]  # each member's weight.data_ptr() when fused: still a view iff unchanged
    packed: torch.Tensor | None = None  # oneDNN-reordered copy of ``weight`` (None: not on this device)
    versions: tuple[int, ...] = ()  # each member's weight._version when packed: an in-place update since
    #                                 (an optimizer step) makes the packed copy stale

    def __deepcopy__(self, memo) -> None:
        """Not copied: a deep-copied module's parameters are new tensors, not views of ``weight`` (and the
        packed copy cannot be copied); its layout is re-done by ``fuse_`` (``eval()``, ``.to()``)."""
        return None

    def linear(self, x: torch.Tensor, linears: list[nn.Linear]) -> torch.Tensor:
        """``x @ weight.T + bias``: through kvlab's GEMV kernel for a few rows, or on the packed copy while it
        is current, where each was measured faster than the alternative."""
        rows = x.numel() // x.shape[-1]
        packed = (self.packed is not None and x.dtype == self.weight.dtype and _versions(linears) == self.versions
                  and packed_pays(self.weight, rows))
        if gemv_applies(x, self.weight) and gemv_pays(self.weight, rows, packed):
            return gemv(x, self.weight, self.bias)
        if packed:
            return packed_linear(x, self.packed, self.bias)
        return F.linear(x, self.weight, self.bias)


GEMV_MAX_ROWS = 64  # the kernel's rows: decode batches (prefill's longer rows stay on MKL / oneDNN)
GEMV_MIN_BYTES = 1 << 18  # smaller weights (toy models) stay on F.linear: nothing there to gain
_GEMV_PAYS: dict[tuple, bool] = {}  # (threads, rows bucket, dtype, shape, against oneDNN) -> measured
DECISIONS = "linear_decisions.json"  # in kernels.cache_dir(): gemv_pays' measurements, kept per machine


def gemv(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``x @ weight.T + bias`` through ``kernels.GEMV`` (``kernels/csrc/gemv.cpp``: up to 4 rows, one
    sequential pass over the weight per thread; more, register tiles; float32 sums). ``weight [out, in]``
    column-major (as ``fuse_`` stores it), float32 or bfloat16; ``x [..., in]``; the result in ``x``'s
    dtype."""
    rows = _float32(x.reshape(-1, x.shape[-1]))  # [M, in]
    out = GEMV.module().linear(rows, weight.t(), NOTHING if bias is None else _float32(bias))
    out = out.view(*x.shape[:-1], -1)
    return out if x.dtype == torch.float32 else out.to(x.dtype)




def _float32(t: torch.Tensor) -> torch.Tensor:
    """``t.float()`` without the no-op call (a decode step makes hundreds of them)."""
    return t if t.dtype == torch.float32 else t.float()


def gemv_applies(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """``gemv`` can run this call: a few rows, a column-major CPU weight worth a kernel, x of its dtype."""
    return (x.numel() <= GEMV_MAX_ROWS * x.shape[-1] and weight.dim() == 2 and weight.stride(0) == 1
            and weight.nbytes >= GEMV_MIN_BYTES and weight.dtype in (torch.float32, torch.bfloat16)
            and x.dtype == weight.dtype and GEMV.usable(weight, x))


def gemv_pays(weight: torch.Tensor, rows: int, against_packed: bool) -> bool:
    """Whether ``gemv`` beats what would run instead (oneDNN on the packed copy, or ``F.linear``) on this
    machine, thread count, rows (measured at 1, 4 for 2-4, 16 for 5-32 and 64 for 33-64),
    dtype and weight shape: measured once per machine, kernel and key (~0.25 s each; SmolLM2's five shapes
    took ~1 s at the first decode step of every process), then kept in
    ``kernels.cache_dir()/linear_decisions.json`` under the CPU, torch version and kernel digest."""
    bucket = 1 if rows <= 1 else 4 if rows <= 4 else 16 if rows <= 32 else 64
    key = (torch.get_num_threads(), bucket, weight.dtype, tuple(weight.shape), against_packed)
    if key not in _GEMV_PAYS:
        stored = "|".join(map(str, (kernels.machine_key(), "gemv", GEMV.digest(), *key)))
        decisions = _stored_decisions()
        if stored not in decisions:
            times = _timings(weight, bucket, ("gemv", "onednn" if against_packed else "mkl"))
            decisions[stored] = times["onednn" if against_packed else "mkl"] / times["gemv"] >= PACKED_MARGIN
            _store_decisions(decisions)
        _GEMV_PAYS[key] = bool(decisions[stored])
    return _GEMV_PAYS[key]


def _stored_decisions() -> dict[str, bool]:
    """Decisions measured earlier on this machine (an unreadable or foreign file counts as none)."""
    try:
        data = json.loads((kernels.cache_dir() / DECISIONS).read_text())
    except (OSError, ValueError):
        return {}
    return {k: v for k, v in data.items() if isinstance(v, bool)} if isinstance(data, dict) else {}


def _store_decisions(decisions: dict[str, bool]) -> None:
    """Write the decisions file atomically (a rename); a read-only or missing cache folder only costs the
    next process a measurement."""
    path = kernels.cache_dir() / DECISIONS
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f"{DECISIONS}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps(decisions, indent=0, sort_keys=True))
        os.replace(tmp, path)
    except OSError:
        pass


PACKED_MARGIN = 1.05  # oneDNN must be this much faster than MKL to be used
_PACKED_PAYS: dict[tuple, bool] = {}  # (threads, rows bucket, dtype, weight shape) -> measured, once per process


def _rows_bucket(rows: int) -> int:
    """Rows a decision is measured at: 1 (batch-1 decode), 16 (batched decode), 256 (prefill)."""
    return 1 if rows <= 1 else 16 if rows <= 32 else 256


def packed_pays(weight: torch.Tensor, rows: int) -> bool:
    """Whether oneDNN on packed weights beats ``F.linear`` on this machine, at this thread count, about
    ``rows`` rows, this dtype and this weight shape: measured once per process and key (~0.25 s) on copies of
    the weight, never assumed. Per shape, because the gain is: on a 2-core EPYC at 2 threads and one row,
    1.2-1.35x for q/k/v and down, ~1.0x for o, ~1.1x for the LM head (MKL's one-row GEMV runs on one thread
    there; ``benchmarks/fused_linears.py``), and one decision for all of them, taken on whichever came first,
    flipped between processes. At 1 thread MKL wins. SmolLM2 has five shapes: ~1-1.5 s per rows bucket, the
    price of ``Model.packed_linears`` on a short generation."""
    key = (torch.get_num_threads(), _rows_bucket(rows), weight.dtype, tuple(weight.shape))
    if key not in _PACKED_PAYS:
        _PACKED_PAYS[key] = _measure_packed(weight, key[1]) >= PACKED_MARGIN
    return _PACKED_PAYS[key]


def _measure_packed(weight: torch.Tensor, rows: int) -> float:
    """MKL time / oneDNN time of ``x [rows, in] @ weight.T`` (``_timings``)."""
    times = _timings(weight, rows, ("mkl", "onednn"))
    return times["mkl"] / times["onednn"]


@torch.no_grad()
def _timings(weight: torch.Tensor, rows: int, names: tuple[str, ...]) -> dict[str, float]:
    """Seconds of ``x [rows, in] @ weight.T`` by each of ``names`` ("mkl": ``F.linear``, "onednn": on packed
    copies, "gemv": kvlab's): medians of 20 interleaved passes (7 for a prefill's rows) over copies of
    ``weight`` (64 MiB of them for one row, twice a 32 MiB L3, so they come from memory as in a model's step,
    and each kernel's pass evicts the other's copies; 16 MiB for more rows, which compute more per byte).
    Copying and packing the copies takes about half of the ~0.25 s."""
    budget = (64 if rows == 1 else 16) << 20
    weight = weight[: max(1, (budget // 2) // (weight.shape[1] * weight.element_size()))]  # an LM head: a slice
    copies = max(2, min(256, budget // max(weight.nbytes, 1)))
    column_major = weight.stride(0) == 1  # as the model stores it (a slice of the head too): copies keep that
    dense = [weight.detach().t().clone(memory_format=torch.contiguous_format).t() if column_major
             else weight.detach().clone(memory_format=torch.contiguous_format) for _ in range(copies)]
    packed = [packed_weight(w) for w in dense] if "onednn" in names else []
    x = torch.randn(rows, weight.shape[1], dtype=weight.dtype, device=weight.device)
    passes = {"mkl": lambda: [F.linear(x, w) for w in dense],
              "onednn": lambda: [packed_linear(x, w) for w in packed],
              "gemv": lambda: [gemv(x, w) for w in dense]}
    passes = {name: passes[name] for name in names}
    seconds: dict[str, list[float]] = {name: [] for name in passes}
    for i in range(21 if rows <= 32 else 8):  # the first round warms up; a decode pass is a few ms: many
        for name, run in passes.items():
            start = time.perf_counter()
            run()
            if i:
                seconds[name].append(time.perf_counter() - start)
    return {name: statistics.median(times) for name, times in seconds.items()}


def _versions(linears: list[nn.Linear]) -> tuple[int, ...]:
    """The members' weight versions (-1: a parameter made under inference mode, which tracks none and
    cannot be trained)."""
    return tuple(map(_version, linears))


def _version(linear: nn.Linear) -> int:
    try:
        return linear.weight._version
    except RuntimeError:  # "Inference tensors do not track version counter"
        return -1


def _members(module: nn.Module, names: tuple[str, ...]) -> list[nn.Linear] | None:
    linears = [getattr(module, name, None) for name in names]
    return linears if all(isinstance(linear, nn.Linear) for linear in linears) else None


def _intact(group: FusedGroup, linears: list[nn.Linear]) -> bool:
    """Every member's weight still is its block of the fused tensor, and no member has a hook to honour."""
    return all(linear.weight.data_ptr() == pointer and not (linear._forward_hooks or linear._forward_pre_hooks)
               for linear, pointer in zip(linears, group.pointers))


def fuse_(module: nn.Module, names: tuple[str, ...], pack: bool = False) -> None:
    """Lay out ``module``'s linears ``names`` for decode (see the module docstring): several that share their
    input width, dtype, device and bias-ness become one fused group, one becomes a group of its own; each
    is column-major and, on CPU, packed. Missing members (a ``kv_from`` layer has no k/v) leave the linears
    column-major only. Re-running is a no-op unless the weights were replaced or updated since. ``pack``:
    keep a oneDNN-packed copy too (CPU, ``packable_dtypes``; one more copy of the weights, so opt-in).

    The new storage is made in the parameters' own mode: normal tensors for normal parameters (also when
    called under inference mode, as ``generate`` does: they may be trained later), inference tensors for
    parameters made under inference mode."""
    present = [getattr(module, name) for name in names if isinstance(getattr(module, name, None), nn.Linear)]
    with torch.inference_mode(any(linear.weight.is_inference() for linear in present)), torch.no_grad():
        _fuse(module, names, present, pack)


def _fuse(module: nn.Module, names: tuple[str, ...], present: list[nn.Linear], pack: bool) -> None:
    linears = _members(module, names)
    groups = module.__dict__.setdefault(_GROUPS, {})
    group = groups.pop(names, None)
    if group is not None and linears is not None and _intact(group, linears):  # keep the fused tensor
        stale = group.packed is not None and _versions(linears) != group.versions  # updated in place
        if not pack or stale or group.packed is None:
            fresh = packed_weight(group.weight) if pack and -1 not in _versions(linears) else None
            group = FusedGroup(group.weight, group.bias, group.sizes, group.pointers, fresh, _versions(linears))
        groups[names] = group
        return
    for linear in present:
        column_major_(linear)
    if linears is None or linears[0].weight.device.type == "meta":
        return
    weights = [linear.weight for linear in linears]
    if len({(w.shape[1], w.dtype, w.device, linear.bias is None) for w, linear in zip(weights, linears)}) > 1:
        return
    if len(linears) == 1:
        weight, bias = weights[0], linears[0].bias
    else:
        weight = torch.cat([w.detach() for w in weights]).t().contiguous().t()  # [sum out, in], in-major
        bias = None if linears[0].bias is None else torch.cat([linear.bias.detach() for linear in linears])
        start = 0
        for linear in linears:
            rows = slice(start, start + linear.out_features)
            linear.weight.data = weight[rows]
            if bias is not None:
                linear.bias.data = bias[rows]
            start = rows.stop
    # a packed copy must be able to go stale visibly: not for parameters without a version counter
    packed = packed_weight(weight) if pack and -1 not in _versions(linears) else None
    groups[names] = FusedGroup(weight.detach(), None if bias is None else bias.detach(),
                               tuple(linear.out_features for linear in linears),
                               tuple(linear.weight.data_ptr() for linear in linears), packed, _versions(linears))


def group_forward(module: nn.Module, names: tuple[str, ...], x: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """``tuple(getattr(module, n)(x) for n in names)``, as one linear when the group is laid out and intact
    and autograd is off (see the module docstring); the outputs are then views of one ``[..., sum out]``."""
    group = module.__dict__.get(_GROUPS, {}).get(names)
    linears = [getattr(module, name) for name in names]
    if group is not None and not torch.is_grad_enabled() and not torch.compiler.is_compiling() \
            and _intact(group, linears):  # (a traced step: inductor lays the linears out itself)
        out = group.linear(x, linears)
        return out.split(group.sizes, dim=-1) if len(names) > 1 else (out,)
    return tuple(linear(x) for linear in linears)
