"""Weight layout of the one-token hot path: column-major linears, and groups of linears that read the same
input (q/k/v, gate/up) run as one GEMV.

Decode at batch 1 reads every weight once per token, so it is a chain of GEMVs. On CPU (MKL) a GEMV over a
column-major weight (``[out, in]`` stored ``in``-major, a transposed view of a contiguous ``[in, out]``)
runs 1.3-1.9x faster than over the row-major one, and one GEMV over a wider weight is faster again than
several narrow ones (fewer calls, and MKL's single-call bandwidth grows with the output width: on a 2-core
EPYC 12 GB/s at 576 outputs, 16 at 960, 20 at 3,072; ``benchmarks/fused_linears.py``).

A *fused group* keeps each member an ordinary ``nn.Linear`` with its usual name, shape and values (state
dicts, checkpoints and exports see nothing new), but its ``weight`` (and ``bias``) become row blocks of one
column-major tensor ``[sum out, in]``. ``group_forward`` then runs one ``F.linear`` and splits the output --
only without autograd (the members' parameters are views, so an optimizer's in-place update still reaches
the fused tensor, but gradients flow only through the members' own forward) and only while every member
still is that view (``param.data = ...``, ``.to()`` or a hook on a member makes it fall back to the members'
own forward until the layout is re-done).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

_GROUPS = "_fused_groups"  # module.__dict__ entry: names -> FusedGroup (not a parameter, not a buffer)


def column_major_(linear: nn.Linear) -> None:
    """Re-store ``linear.weight [out, in]`` with the ``in`` axis outermost (a transposed view of a contiguous
    ``[in, out]`` tensor), in place: names, shape and values are unchanged, but a one-token forward
    (``x @ W.T``) then streams the weight row by row. Prefill GEMMs are indifferent."""
    weight = linear.weight
    if weight.dim() == 2 and weight.device.type != "meta" and weight.stride(0) != 1:
        weight.data = weight.data.t().contiguous().t()


@dataclass(frozen=True)
class FusedGroup:
    weight: torch.Tensor  # [sum out, in], column-major
    bias: torch.Tensor | None  # [sum out] or None
    sizes: tuple[int, ...]  # each member's out_features, in order
    pointers: tuple[int, ...]  # each member's weight.data_ptr() when fused: still a view iff unchanged


def _members(module: nn.Module, names: tuple[str, ...]) -> list[nn.Linear] | None:
    linears = [getattr(module, name, None) for name in names]
    return linears if all(isinstance(linear, nn.Linear) for linear in linears) else None


def _intact(group: FusedGroup, linears: list[nn.Linear]) -> bool:
    """Every member's weight still is its block of the fused tensor, and no member has a hook to honour."""
    return all(linear.weight.data_ptr() == pointer and not (linear._forward_hooks or linear._forward_pre_hooks)
               for linear, pointer in zip(linears, group.pointers))


@torch.no_grad()
def fuse_(module: nn.Module, names: tuple[str, ...]) -> None:
    """Lay out ``module``'s linears ``names`` for decode: one member is made column-major; several that share
    their input width, dtype, device and bias-ness become one fused group (see the module docstring).
    Missing members (a ``kv_from`` layer has no k/v) leave the group unfused; re-running is a no-op."""
    linears = _members(module, names)
    groups = module.__dict__.setdefault(_GROUPS, {})
    if names in groups and linears is not None and _intact(groups[names], linears):
        return
    groups.pop(names, None)
    if linears is None:
        for name in names:
            if isinstance(getattr(module, name, None), nn.Linear):
                column_major_(getattr(module, name))
        return
    weights = [linear.weight for linear in linears]
    fusable = (len(linears) > 1 and weights[0].device.type != "meta"
               and len({(w.shape[1], w.dtype, w.device, linear.bias is None) for w, linear in zip(weights, linears)}) == 1)
    if not fusable:
        for linear in linears:
            column_major_(linear)
        return
    fused = torch.cat([w.detach() for w in weights]).t().contiguous().t()  # [sum out, in], in-major
    bias = None if linears[0].bias is None else torch.cat([linear.bias.detach() for linear in linears])
    start = 0
    for linear in linears:
        rows = slice(start, start + linear.out_features)
        linear.weight.data = fused[rows]
        if bias is not None:
            linear.bias.data = bias[rows]
        start = rows.stop
    groups[names] = FusedGroup(fused, bias, tuple(linear.out_features for linear in linears),
                               tuple(linear.weight.data_ptr() for linear in linears))


def group_forward(module: nn.Module, names: tuple[str, ...], x: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """``tuple(getattr(module, n)(x) for n in names)``, as one GEMV when the group is fused and intact and
    autograd is off (see the module docstring); the outputs are then views of one ``[..., sum out]`` tensor."""
    group = module.__dict__.get(_GROUPS, {}).get(names)
    linears = [getattr(module, name) for name in names]
    if group is not None and not torch.is_grad_enabled() and _intact(group, linears):
        return F.linear(x, group.weight, group.bias).split(group.sizes, dim=-1)
    return tuple(linear(x) for linear in linears)
