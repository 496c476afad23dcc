"""Adding a technique is one file: this test file defines a toy technique (spec + planner rule + examples,
module + cache layer), registers it, and runs it through the standard matrix; no kvlab source file
changes. The toy: causal *mean* attention, each position reads the mean of the values so far, with a
fixed-size cache (running sum and count). Also: the contract fails loudly when a part is missing."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import pytest
import torch
from helpers import model_dict
from hypothesis import strategies as st
from matrix import *  # noqa: F401,F403
from strategies import LAYER_STRATEGIES

import kvlab
from kvlab.cache.base import CacheLayer
from kvlab.config import LayerSpec
from kvlab.registry import register_module, register_spec, techniques, unregister


@dataclass(kw_only=True)
class MeanSpec(LayerSpec):
    """Causal mean of the value projections; nothing but a running sum and count is cached."""

    SUPPORTED_OPTIONS: ClassVar[frozenset[str]] = frozenset({"o_bias"})
    EXAMPLES: ClassVar[dict[str, dict]] = {"mean_then_full": {"layers": [
        {"type": "toy_mean", "n_heads": 2}, {"type": "full", "n_heads": 2}]}}

    def own_cache_bytes(self, tokens: int, batch: int, elem_bytes: int) -> int:
        return 0 if tokens == 0 else batch * (self.n_heads * self.head_dim + 1) * elem_bytes


class MeanCache(CacheLayer):
    def __init__(self, batch: int, width: int, dtype: torch.dtype, device=None):
        super().__init__()
        self.state["sum"] = torch.zeros(batch, width, dtype=dtype, device=device)
        self.state["count"] = torch.zeros(batch, 1, dtype=dtype, device=device)

    def live_tensors(self) -> list[torch.Tensor]:
        return list(self.state.values()) if self.length else []


class MeanAttention(torch.nn.Module):
    def __init__(self, spec: MeanSpec, cfg, layer_idx: int):
        super().__init__()
        self.spec, self.layer_idx = spec, layer_idx
        width = spec.n_heads * spec.head_dim
        self.v_proj = torch.nn.Linear(cfg.d_model, width, bias=False)
        self.o_proj = torch.nn.Linear(width, cfg.d_model, bias=spec.o_bias)

    def new_cache_layer(self, batch: int, dtype: torch.dtype, device, built: list[CacheLayer]) -> CacheLayer:
        return MeanCache(batch, self.spec.n_heads * self.spec.head_dim, dtype, device)

    def forward(self, x: torch.Tensor, ctx, cache: MeanCache | None) -> torch.Tensor:
        real = torch.ones(x.shape[:2], dtype=x.dtype, device=x.device)  # [B, S]: 0 on left padding
        if ctx.pad_offset is not None:
            real = (ctx.query_steps[None, :] >= ctx.pad_offset[:, None]).to(x.dtype)
        v = self.v_proj(x) * real[..., None]  # [B, S, W]
        total, count = v.cumsum(1), real.cumsum(1)[..., None]  # [B, S, W], [B, S, 1]
        if cache is not None:
            total, count = total + cache.state["sum"][:, None], count + cache.state["count"][:, None]
            cache.state["sum"].copy_(total[:, -1])
            cache.state["count"].copy_(count[:, -1])
            cache.length += x.shape[1]
        return self.o_proj(total / count.clamp_min(1))


CASES = {f"toy_mean/{name}": model_dict(vocab=61, d_model=32, mlp_hidden=48, **case)
         for name, case in MeanSpec.EXAMPLES.items()}


@pytest.fixture(autouse=True, scope="module")
def _toy_registered():
    """Register the toy (spec, module, strategy) for this module's tests only."""
    techniques()  # the real techniques first
    register_spec("toy_mean")(MeanSpec)
    register_module("toy_mean")(MeanAttention)
    LAYER_STRATEGIES["toy_mean"] = lambda previous: st.fixed_dictionaries(
        {"type": st.just("toy_mean"), "n_heads": st.sampled_from([1, 2, 4])})
    yield
    unregister("toy_mean")
    del LAYER_STRATEGIES["toy_mean"]


def test_the_toy_meets_the_guards():
    from test_techniques import test_every_technique_declares_its_own_examples as has_examples
    from test_techniques import test_every_technique_has_a_hypothesis_strategy as has_strategy

    assert "toy_mean" in techniques()
    has_examples("toy_mean")
    has_strategy("toy_mean")
    with pytest.raises(kvlab.ConfigError, match=r"layers\[0\]\.qk_norm: not supported by 'toy_mean'"):
        kvlab.ModelConfig.from_dict(model_dict([{"type": "toy_mean", "n_heads": 2, "qk_norm": True}]))


def test_a_spec_without_a_planner_rule_is_refused_at_registration():
    @dataclass(kw_only=True)
    class NoRule(LayerSpec):
        pass

    with pytest.raises(TypeError, match="own_cache_bytes"):
        register_spec("toy_no_rule")(NoRule)
    assert "toy_no_rule" not in techniques()


def test_a_module_without_a_cache_layer_is_refused_at_registration():
    with pytest.raises(TypeError, match="new_cache_layer"):
        register_module("toy_mean")(torch.nn.Identity)
