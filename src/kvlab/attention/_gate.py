"""Softplus output gate (Laguna's ``gating``), an option of any technique that lists ``output_gate`` in
its ``SUPPORTED_OPTIONS``: the attention output is scaled, before ``o_proj``, by ``softplus(g_proj(x))``
computed from the layer input, one gate per head (``"head"``) or per output channel (``"element"``)."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def output_gate_proj(spec, d_model: int) -> torch.nn.Linear | None:
    """``g_proj`` of a softplus output gate (Laguna's ``output_gate``): one gate per head ("head") or
    per output channel ("element"), computed from the layer input; None when the spec has no gate."""
    if spec.output_gate is None:
        return None
    width = spec.n_heads if spec.output_gate == "head" else spec.n_heads * spec.head_dim
    return torch.nn.Linear(d_model, width, bias=False)


def apply_output_gate(g_proj: torch.nn.Linear | None, x: torch.Tensor, out: torch.Tensor,
                      n_heads: int) -> torch.Tensor:
    """Scale the attention output ``out [B, S, H*Dv]`` by ``softplus(g_proj(x))`` (fp32), ``x [B, S, d]``
    being the layer input; before ``o_proj``. Identity without a gate."""
    if g_proj is None:
        return out
    gate = F.softplus(g_proj(x).float()).to(out.dtype)  # [B, S, H] or [B, S, H*Dv]
    if gate.shape[-1] == n_heads and out.shape[-1] != n_heads:
        return (out.unflatten(-1, (n_heads, -1)) * gate.unsqueeze(-1)).flatten(-2)
    return out * gate
