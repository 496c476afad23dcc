"""The one-token hot path's weight layout survives loading: a tied LM head stays the embedding itself and
column-major after a save/load round trip, and greedy tokens are the same as before the round trip."""

from __future__ import annotations

import torch
from helpers import build, tiny_config

import kvlab

LAYERS = [{"type": "full", "n_heads": 4, "n_kv_heads": 2}, {"type": "full", "n_heads": 4, "n_kv_heads": 1}]


def test_tied_head_is_the_embedding_and_column_major_after_load(tmp_path):
    model = build(tiny_config(LAYERS, tie_embeddings=True)).eval()
    prompt = torch.randint(0, 97, (1, 9), generator=torch.Generator().manual_seed(0))
    before = model.generate(prompt, max_new_tokens=32).tokens
    model.save(tmp_path / "m")
    loaded = kvlab.load(tmp_path / "m").eval()
    assert loaded.lm_head.weight is loaded.embed_tokens.weight
    assert loaded.lm_head.weight.stride(0) == 1  # [vocab, d] stored d-major: the head GEMV streams it
    assert loaded.generate(prompt, max_new_tokens=32).tokens == before
