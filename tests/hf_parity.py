"""Module-level parity against a transformers attention module: the same input through the full sequence
and through prefill + single-token steps with each side's own cache (fp32, no padding)."""

from __future__ import annotations

from collections.abc import Callable

import torch

from kvlab.attention._common import ForwardContext

ATOL = 1e-4


def noisy_(model: torch.nn.Module, std: float = 0.05, seed: int = 0) -> None:
    """Add N(0, std) to every parameter so zero-initialised gates, biases and norms are exercised."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=gen) * std)


def additive_causal_mask(seq: int, window: int | None = None) -> torch.Tensor:
    """``[1, 1, S, S]`` float mask (0 = attend, -inf = not), HF's eager convention; window counts the query."""
    q = torch.arange(seq)[:, None]
    k = torch.arange(seq)[None, :]
    allowed = k <= q
    if window is not None:
        allowed &= k > q - window
    return torch.zeros(seq, seq).masked_fill(~allowed, float("-inf"))[None, None]


@torch.no_grad()
def check_module_parity(hf_step: Callable, new_hf_cache: Callable, module: torch.nn.Module, x: torch.Tensor,
                        prefill: int = 7, steps: int = 32) -> None:
    """``hf_step(chunk [B,S,d], start, cache | None) -> [B,S,d]`` runs the reference module; ``module`` is
    the kvlab attention module holding the same weights. ``x [B, prefill + steps, d]``."""
    batch, seq, _ = x.shape
    assert seq == prefill + steps

    def ours(chunk, start, cache):
        return module(chunk, ForwardContext(batch, chunk.shape[1], start, None, x.device), cache)

    full_ref = hf_step(x, 0, None)
    torch.testing.assert_close(ours(x, 0, None), full_ref, atol=ATOL, rtol=1e-4, msg="full sequence")
    hf_cache, cache = new_hf_cache(), module.new_cache_layer(batch, x.dtype, x.device, [])
    got, ref, pos = [], [], 0
    for size in [prefill] + [1] * steps:
        chunk = x[:, pos:pos + size]
        ref.append(hf_step(chunk, pos, hf_cache))
        got.append(ours(chunk, pos, cache))
        pos += size
    torch.testing.assert_close(torch.cat(got, 1), torch.cat(ref, 1), atol=ATOL, rtol=1e-4, msg="cached")
    torch.testing.assert_close(torch.cat(got, 1), full_ref, atol=ATOL, rtol=1e-4, msg="cached vs full")
