"""Gated MLP (SwiGLU / GeGLU)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from kvlab.kernels import decode_ops
from kvlab.linear_layout import group_forward

ACTIVATIONS = {
    "silu": F.silu,
    "gelu": F.gelu,
    "gelu_tanh": lambda x: F.gelu(x, approximate="tanh"),
}


class GatedMLP(nn.Module):
    """down(act(gate(x)) * up(x)); names match Hugging Face's (gate_proj, up_proj, down_proj)."""

    DECODE_GROUPS = (("gate_proj", "up_proj"), ("down_proj",))  # decode weight layout (linear_layout.py)

    def __init__(self, d_model: int, hidden: int, act: str = "silu", bias: bool = False):
        super().__init__()
        self.gate_proj = nn.Linear(d_model, hidden, bias=bias)
        self.up_proj = nn.Linear(d_model, hidden, bias=bias)
        self.down_proj = nn.Linear(hidden, d_model, bias=bias)
        self.act = ACTIVATIONS[act]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = group_forward(self, ("gate_proj", "up_proj"), x)
        ops = decode_ops(gate.numel() // gate.shape[-1], gate, up) if self.act is F.silu else None
        if ops is not None and gate.stride(-1) == 1 and up.stride(-1) == 1:  # a decode step: one call for two ops
            hidden = ops.silu_mul(gate.reshape(-1, gate.shape[-1]), up.reshape(-1, up.shape[-1])).view(gate.shape)
        else:
            hidden = self.act(gate) * up
        return group_forward(self, ("down_proj",), hidden)[0]
