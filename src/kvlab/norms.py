"""Normalisation layers."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from kvlab.kernels import NOTHING, decode_ops


class RMSNorm(nn.Module):
    """RMSNorm computed in fp32. ``unit_offset``: weight stored as w - 1 (Gemma); ``scale=False``:
    no learned weight (Gemma 4's value norm, DeepSeek V4's per-head query norm)."""

    def __init__(self, dim: int, eps: float = 1e-6, scale: bool = True, unit_offset: bool = False):
        super().__init__()
        self.eps, self.unit_offset = eps, unit_offset
        self.weight = nn.Parameter(torch.zeros(dim) if unit_offset else torch.ones(dim)) if scale else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        plain = self.weight is None or (self.weight.dtype == torch.float32 and not self.unit_offset)
        if dtype == torch.float32 and plain:  # nothing to convert (3 no-op casts x 61 norms per decode step)
            ops = decode_ops(x.numel() // x.shape[-1], x) if self.eps is not None else None
            if ops is not None:  # a decode step: one call for F.rms_norm's ~6 ops (kernels/csrc/decode_ops.cpp)
                weight = NOTHING if self.weight is None else self.weight
                return ops.rms_norm(x.reshape(-1, x.shape[-1]), weight, self.eps).view(x.shape)
            return F.rms_norm(x, (x.shape[-1],), self.weight, self.eps)
        weight = None if self.weight is None else (
            1.0 + self.weight.float() if self.unit_offset else self.weight.float())
        # one fused kernel: at one decode token, 61 norms x 6 elementwise ops were measurable per step
        return F.rms_norm(x.float(), (x.shape[-1],), weight, self.eps).to(dtype)
