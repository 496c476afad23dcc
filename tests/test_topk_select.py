"""CSA's top-k selection kernel (``kernels.TOPK``, ``csrc/topk_select.cpp``) against
``Indexer.select_reference`` (torch ops): random scores with many ties, rows whose visible entries are
fewer than k (an -inf tail, earliest -inf positions taken), k equal to the row length; and a CSA model's
prefill and decode through it equal to the same through the torch ops."""

import pytest
import torch
from helpers import build, tiny_config
from hypothesis import given, settings
from hypothesis import strategies as st

from kvlab.attention._v4 import Indexer
from kvlab.kernels import TOPK


@pytest.fixture(autouse=True)
def kernel(monkeypatch):
    monkeypatch.setenv("KVLAB_TOPK_KERNEL", "1")
    if TOPK.module() is None:
        pytest.skip("the top-k selection kernel did not build on this machine")


class Selector:
    """What ``Indexer.select`` reads of its module: the top-k and the reference."""

    select_reference = Indexer.select_reference

    def __init__(self, topk: int):
        self.topk = topk


@settings(max_examples=60, deadline=None)
@given(batch=st.integers(1, 2), queries=st.integers(1, 9), n=st.integers(1, 300), topk=st.integers(1, 64),
       levels=st.sampled_from([3, 20, 10_000]), seed=st.integers(0, 2**16))
@torch.no_grad()
def test_kernel_equals_the_torch_ops(batch, queries, n, topk, levels, seed):
    gen = torch.Generator().manual_seed(seed)
    scores = torch.randint(0, levels, (batch, queries, n), generator=gen).float()  # few levels: many ties
    visible = torch.randint(1, n + 1, (batch, queries), generator=gen)
    scores.masked_fill_(torch.arange(n) >= visible.unsqueeze(-1), float("-inf"))
    selector = Selector(topk)
    idx, valid = Indexer.select(selector, scores, visible)
    ref_idx, ref_valid = selector.select_reference(scores, visible)
    assert torch.equal(idx, ref_idx) and torch.equal(valid, ref_valid)
    assert idx.shape == (batch, queries, min(topk, n)) and bool((idx.diff(dim=-1) > 0).all())


@torch.no_grad()
def test_nan_scores_read_as_minus_inf():
    # a broken model's NaN scores: still k valid positions per row, as if the NaNs were -inf
    scores = torch.tensor([[[1.0, float("nan"), 3.0, float("nan"), 2.0, -1.0]]])
    visible = torch.tensor([[6]])
    idx, _ = Indexer.select(Selector(5), scores, visible)
    ref, _ = Indexer.select_reference(Selector(5), scores.nan_to_num(nan=float("-inf")), visible)
    assert torch.equal(idx, ref) and idx.tolist() == [[[0, 1, 2, 4, 5]]]


def test_strided_or_non_float32_scores_take_the_torch_ops(monkeypatch):
    calls = []
    monkeypatch.setattr(Selector, "select_reference", lambda self, s, v: calls.append(s.dtype) or (None, None))
    scores, visible = torch.randn(1, 4, 16), torch.full((1, 4), 16)
    Indexer.select(Selector(3), scores.double(), visible)
    Indexer.select(Selector(3), scores.transpose(1, 2), visible)
    assert calls == [torch.float64, torch.float32]
    monkeypatch.setenv("KVLAB_TOPK_KERNEL", "0")
    Indexer.select(Selector(3), scores, visible)
    assert len(calls) == 3


@torch.no_grad()
def test_a_csa_model_decodes_the_same_through_the_kernel(monkeypatch):
    layer = {"type": "csa", "n_heads": 4, "head_dim": 16, "q_lora_rank": 16, "o_groups": 2, "o_lora_rank": 16,
             "window": 8, "compress_rate": 4, "index_n_heads": 2, "index_head_dim": 16, "index_topk": 3}
    model = build(tiny_config([layer, {"type": "full", "n_heads": 4}])).eval()
    ids = torch.randint(0, 97, (2, 40), generator=torch.Generator().manual_seed(0))
    out = model.generate(ids, max_new_tokens=8)
    logits = model(ids)
    monkeypatch.setenv("KVLAB_TOPK_KERNEL", "0")
    assert model.generate(ids, max_new_tokens=8).tokens == out.tokens
    torch.testing.assert_close(model(ids), logits, atol=0, rtol=0)
