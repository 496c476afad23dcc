"""Rotary position embeddings: frequencies for each scaling variant, and their application.

Keys are cached *after* rotation, so a cache never needs positions to re-rotate; the positions of
new tokens come from the forward context (``step - left padding``).
"""

from __future__ import annotations

import dataclasses
import json
import math

import torch
from torch import nn

from kvlab.config import RopeConfig
from kvlab.errors import ConfigError
from kvlab.kernels import decode_ops


def rope_frequencies(rope: RopeConfig, rot_dim: int) -> tuple[torch.Tensor, float]:
    """Inverse frequencies ``[rot_dim // 2]`` (fp32) and the attention factor that scales cos/sin.

    ``rot_dim`` is the rotated width (``head_dim * partial``), except for ``proportional``, where it is
    the whole head dim (see ``_proportional``)."""
    base = torch.arange(0, rot_dim, 2, dtype=torch.int64, device="cpu").float() / rot_dim
    inv_freq = 1.0 / (rope.theta ** base)
    scaling = dict(rope.scaling or {})
    rope_type = scaling_type(rope)
    if rope_type == "default":
        return inv_freq, 1.0
    if rope_type == "linear":
        return inv_freq / float(scaling["factor"]), 1.0
    if rope_type == "llama3":
        return _llama3(inv_freq, scaling), 1.0
    if rope_type == "yarn":
        return _yarn(rope, rot_dim, scaling)
    if rope_type == "proportional":  # Gemma 4: frequencies over the full head dim, only a prefix rotates
        return _proportional(rope, rot_dim, scaling)
    raise ConfigError(f"rope.scaling.type: unsupported RoPE scaling {rope_type!r} "
                      "(supported: default, linear, llama3, yarn, proportional)")


def _llama3(inv_freq: torch.Tensor, s: dict) -> torch.Tensor:
    factor, low, high = float(s["factor"]), float(s["low_freq_factor"]), float(s["high_freq_factor"])
    old_len = float(s["original_max_position_embeddings"])
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > old_len / low, inv_freq / factor, inv_freq)
    smooth = (old_len / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = (wavelen >= old_len / high) & (wavelen <= old_len / low)
    return torch.where(medium, smoothed, scaled)


def _yarn_mscale(scale: float, mscale: float = 1.0) -> float:
    return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0


def _yarn(rope: RopeConfig, dim: int, s: dict) -> tuple[torch.Tensor, float]:
    original = s.get("original_max_position_embeddings") or rope.max_position
    if original is None:
        raise ConfigError("rope.scaling.original_max_position_embeddings: required for yarn")
    factor = s.get("factor")
    if factor is None:  # as transformers 5: max_position / original only stands in for a missing factor
        if not (s.get("original_max_position_embeddings") and rope.max_position):
            raise ConfigError("rope.scaling.factor: required for yarn")
        factor = rope.max_position / s["original_max_position_embeddings"]
    factor = float(factor)
    attention_factor = s.get("attention_factor")
    if attention_factor is None:
        mscale, mscale_all = s.get("mscale"), s.get("mscale_all_dim")
        if mscale and mscale_all:
            attention_factor = _yarn_mscale(factor, mscale) / _yarn_mscale(factor, mscale_all)
        else:
            attention_factor = _yarn_mscale(factor)
    beta_fast, beta_slow = s.get("beta_fast") or 32, s.get("beta_slow") or 1

    def correction_dim(rotations: float) -> float:
        return dim * math.log(original / (rotations * 2 * math.pi)) / (2 * math.log(rope.theta))

    low, high = correction_dim(beta_fast), correction_dim(beta_slow)
    if s.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001
    ramp = ((torch.arange(dim // 2, dtype=torch.float32, device="cpu") - low) / (high - low)).clamp(0, 1)
    pos_freqs = rope.theta ** (torch.arange(0, dim, 2, device="cpu").float() / dim)
    extrapolation, interpolation = 1.0 / pos_freqs, 1.0 / (factor * pos_freqs)
    keep = 1 - ramp  # 1: keep the original (extrapolated) frequency
    return interpolation * (1 - keep) + extrapolation * keep, float(attention_factor)


def _proportional(rope: RopeConfig, head_dim: int, s: dict) -> tuple[torch.Tensor, float]:
    """Gemma 4: the first ``partial * head_dim / 2`` frequencies of a full-width RoPE, the rest 0.

    ``Rotary`` rotates the whole head (rotate-half over ``head_dim``), so with partial 0.25 of 512 the
    rotated pairs are (j, j + 256) for j < 64: channels [0, 64) and [256, 320). Zero frequencies are
    the identity (cos 1, sin 0)."""
    angles = int(rope.partial * head_dim // 2)
    inv_freq = torch.zeros(head_dim // 2, device="cpu")
    inv_freq[:angles] = 1.0 / (rope.theta ** (torch.arange(0, 2 * angles, 2, device="cpu").float() / head_dim))
    return inv_freq / float(s.get("factor", 1.0)), 1.0


def scaling_type(rope: RopeConfig) -> str:
    """HF's ``rope_type`` of ``rope.scaling`` (``"default"`` without scaling)."""
    scaling = rope.scaling or {}
    return scaling.get("rope_type", scaling.get("type", "default"))


class Rotary(nn.Module):
    """RoPE of one (RopeConfig, head_dim), owned by the attention module that applies it.

    The inverse frequencies are a non-persistent buffer (not in the state dict, moved by ``.to(device)``
    but never cast: they stay fp32 whatever the model dtype). cos/sin are computed from the positions
    of each forward (no table to grow, no host sync); ``ForwardContext.cos_sin`` computes them once per
    forward for all layers with the same ``key``."""

    def __init__(self, rope: RopeConfig, head_dim: int):
        super().__init__()
        self.rot_dim = int(head_dim * rope.partial) // 2 * 2
        if scaling_type(rope) == "proportional":  # partial is expressed by zero frequencies instead
            self.rot_dim = head_dim // 2 * 2
        self.interleaved = rope.interleaved
        inv_freq, self.attention_factor = rope_frequencies(rope, self.rot_dim)
        self.register_buffer("inv_freq", inv_freq, persistent=False)
        self.key = (json.dumps(dataclasses.asdict(rope), sort_keys=True), head_dim)  # equal RoPE, equal key

    def _apply(self, fn, recurse=True):
        inv_freq = self.inv_freq
        super()._apply(fn, recurse)
        self.inv_freq = inv_freq.to(self.inv_freq.device)  # follow the device, keep fp32
        return self

    def cos_sin(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """positions ``[B, S]`` -> cos, sin ``[B, 1, S, rot_dim]`` (broadcast over heads)."""
        inv_freq = self.inv_freq.to(positions.device)
        freqs = positions.float().unsqueeze(-1) * inv_freq  # [B, S, rot/2]
        emb = freqs.repeat_interleave(2, dim=-1) if self.interleaved else torch.cat([freqs, freqs], dim=-1)
        cos, sin = emb.cos() * self.attention_factor, emb.sin() * self.attention_factor
        return cos.unsqueeze(1).to(dtype), sin.unsqueeze(1).to(dtype)

    def apply(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """Rotate the first ``rot_dim`` channels of ``x [B, H, S, D]``."""
        if self.rot_dim == x.shape[-1] and not self.interleaved and x.dim() == cos.dim() == 4:
            ops = decode_ops(x.shape[0] * x.shape[2], x, cos, sin)
            if ops is not None and x.stride(-1) == 1 and cos.stride(-1) == 1 and sin.stride(-1) == 1:
                return ops.rope(x, cos, sin)  # a decode step: one call for the ~7 ops below (decode_ops.cpp)
        if self.rot_dim == x.shape[-1]:
            return x * cos + self.rotate(x) * sin
        rot, rest = x[..., : self.rot_dim], x[..., self.rot_dim:]
        return torch.cat([rot * cos + self.rotate(rot) * sin, rest], dim=-1)

    def rotate(self, x: torch.Tensor) -> torch.Tensor:
        """The 90-degree rotation of each pair: ``(a, b) -> (-b, a)`` (interleaved or half-split pairs)."""
        if self.interleaved:
            pairs = x.unflatten(-1, (-1, 2))  # [..., D/2, 2]
            return torch.stack([-pairs[..., 1], pairs[..., 0]], dim=-1).flatten(-2)
        half = x.shape[-1] // 2
        return torch.cat([-x[..., half:], x[..., :half]], dim=-1)
