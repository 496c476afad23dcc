"""Manifold-constrained hyper-connections (mHC, DeepSeek V4): a residual-stream option for any kvlab
model (``ModelConfig.hyper_connections = {"streams": n, "sinkhorn_iters": 20, "eps": 1e-6}``).

The residual stream is widened to ``n`` copies ``[B, S, n, d]``. Around each sublayer (attention and
MLP), weights are computed from the flattened streams (unweighted RMSNorm, one linear map, a bias
and three scales): ``pre`` (n, sigmoid + eps) collapses the streams into the sublayer input, ``post``
(n, 2 sigmoid) spreads the sublayer output back, and ``comb`` (n x n, softmax + eps, then Sinkhorn-Knopp
normalisation in transformers' order: one column pass, then ``iters - 1`` row + column passes, each
dividing by ``sum + eps``) mixes the old streams: ``new_k = post_k y + sum_j comb[j, k] stream_j``.
A final head collapses the streams with its own sigmoid weights before the model's final norm.
Weights are computed in fp32. Parameter names follow transformers' ``DeepseekV4HyperConnection``
(``fn``, ``base``, ``scale``) and ``DeepseekV4HyperHead`` (``hc_fn``, ``hc_base``, ``hc_scale``).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from kvlab.errors import ConfigError
from kvlab.norms import RMSNorm

DEFAULTS = {"streams": 4, "sinkhorn_iters": 20, "eps": 1e-6}


def validate_hyper_connections(hc: dict | None, where: str = "hyper_connections") -> None:
    """Check a ``hyper_connections`` config dict (None = plain residuals)."""
    if hc is None:
        return
    if not isinstance(hc, dict):
        raise ConfigError(f"{where}: expected an object like {{\"streams\": 4}} or null, got {hc!r}")
    unknown = sorted(set(hc) - set(DEFAULTS))
    if unknown:
        raise ConfigError(f"{where}.{unknown[0]}: unknown field (known: {', '.join(DEFAULTS)})")
    for name in ("streams", "sinkhorn_iters"):
        value = hc.get(name, DEFAULTS[name])
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ConfigError(f"{where}.{name}: must be a positive integer, got {value!r}")
    eps = hc.get("eps", DEFAULTS["eps"])
    if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not eps >= 0 or eps == float("inf"):
        raise ConfigError(f"{where}.eps: must be a non-negative number, got {eps!r}")


def sinkhorn(comb: torch.Tensor, iters: int, eps: float) -> torch.Tensor:
    """Near-doubly-stochastic ``comb [..., n, n]``: column pass, then ``iters - 1`` row + column passes."""
    comb = comb / (comb.sum(dim=-2, keepdim=True) + eps)
    for _ in range(iters - 1):
        comb = comb / (comb.sum(dim=-1, keepdim=True) + eps)
        comb = comb / (comb.sum(dim=-2, keepdim=True) + eps)
    return comb


class HyperConnection(nn.Module):
    """One mHC site: wraps a sublayer ``branch`` (``[B, S, d] -> [B, S, d]``) on ``n`` streams."""

    def __init__(self, d_model: int, hc: dict, norm_eps: float):
        super().__init__()
        self.n = hc.get("streams", DEFAULTS["streams"])
        self.iters = hc.get("sinkhorn_iters", DEFAULTS["sinkhorn_iters"])
        self.eps = float(hc.get("eps", DEFAULTS["eps"]))
        self.input_norm = RMSNorm(self.n * d_model, norm_eps, scale=False)
        width = (2 + self.n) * self.n  # pre (n) + post (n) + comb (n * n)
        self.fn = nn.Parameter(torch.randn(width, self.n * d_model) * 0.02)
        self.base = nn.Parameter(torch.zeros(width))
        self.scale = nn.Parameter(torch.ones(3))

    def weights(self, streams: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """pre ``[B, S, n]``, post ``[B, S, n]``, comb ``[B, S, n, n]`` (fp32) of ``streams [B, S, n, d]``."""
        n = self.n
        mixed = F.linear(self.input_norm(streams.flatten(2).float()), self.fn.float())
        pre_w, post_w, comb_w = mixed.split([n, n, n * n], dim=-1)
        pre_b, post_b, comb_b = self.base.float().split([n, n, n * n])
        pre_s, post_s, comb_s = self.scale.float().unbind(0)
        pre = torch.sigmoid(pre_w * pre_s + pre_b) + self.eps
        post = 2 * torch.sigmoid(post_w * post_s + post_b)
        comb = torch.softmax(comb_w.unflatten(-1, (n, n)) * comb_s + comb_b.view(n, n), dim=-1) + self.eps
        return pre, post, sinkhorn(comb, self.iters, self.eps)

    def forward(self, streams: torch.Tensor, branch: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
        dtype = streams.dtype
        pre, post, comb = self.weights(streams)
        collapsed = (pre.unsqueeze(-1) * streams).sum(dim=2).to(dtype)  # [B, S, d]
        out = branch(collapsed)
        return post.to(dtype).unsqueeze(-1) * out.unsqueeze(-2) + comb.to(dtype).transpose(-1, -2) @ streams


class HyperHead(nn.Module):
    """Final collapse of the ``n`` streams into one ``[B, S, d]`` before the model's final norm."""

    def __init__(self, d_model: int, hc: dict, norm_eps: float):
        super().__init__()
        self.n = hc.get("streams", DEFAULTS["streams"])
        self.eps = float(hc.get("eps", DEFAULTS["eps"]))
        self.input_norm = RMSNorm(self.n * d_model, norm_eps, scale=False)
        self.hc_fn = nn.Parameter(torch.randn(self.n, self.n * d_model) * 0.02)
        self.hc_base = nn.Parameter(torch.zeros(self.n))
        self.hc_scale = nn.Parameter(torch.ones(1))

    def forward(self, streams: torch.Tensor) -> torch.Tensor:
        mixed = F.linear(self.input_norm(streams.flatten(2).float()), self.hc_fn.float())
        pre = torch.sigmoid(mixed * self.hc_scale.float() + self.hc_base.float()) + self.eps
        return (pre.unsqueeze(-1) * streams).sum(dim=2).to(streams.dtype)


def widen(h: torch.Tensor, streams: int) -> torch.Tensor:
    """``[B, S, d]`` -> ``[B, S, n, d]``: every stream starts as the embedding."""
    return h.unsqueeze(2).expand(-1, -1, streams, -1).contiguous()
