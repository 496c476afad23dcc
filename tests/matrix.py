"""The standard tests every technique gets. A technique's test file sets ``CASES`` (name -> config
dict) and does ``from matrix import *``. Sequence lengths are chosen per case by ``case.get("_seq")``
so windowed/compressed layers are exercised past their boundaries."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from helpers import build, decode_stepwise

import kvlab
from kvlab import ModelConfig

ATOL = 2e-4  # fp32; logits are O(10) with the scaled-up test weights


def _config(case: dict) -> dict:
    return {k: v for k, v in copy.deepcopy(case).items() if not k.startswith("_")}


def _seq(case: dict) -> int:
    return case.get("_seq", 24)


def _ids(case: dict, batch: int = 2, seq: int | None = None) -> torch.Tensor:
    gen = torch.Generator().manual_seed(1)
    return torch.randint(0, case["vocab_size"], (batch, seq or _seq(case)), generator=gen)


@torch.no_grad()
def test_cached_decoding_equals_full_forward(case):
    model = build(_config(case))
    ids = _ids(case)
    full = model(ids)
    for chunks in ([ids.shape[1]], [5], [1], [ids.shape[1] // 2 + 3, 7]):
        inc, _ = decode_stepwise(model, ids, chunks)
        torch.testing.assert_close(inc, full, atol=ATOL, rtol=1e-4, msg=f"chunks {chunks}")


@torch.no_grad()
def test_left_padded_rows_match_rows_alone(case):
    model = build(_config(case))
    seq = _seq(case)
    ids = _ids(case, 3, seq)
    pads = [0, 3, 7]
    mask = torch.ones_like(ids)
    for row, pad in enumerate(pads):
        mask[row, :pad] = 0
    batched, _ = decode_stepwise(model, ids, [seq - 6], attention_mask=mask)
    for row, pad in enumerate(pads):
        alone, _ = decode_stepwise(model, ids[row:row + 1, pad:], [seq - 6 - pad])
        torch.testing.assert_close(batched[row:row + 1, pad:], alone, atol=ATOL, rtol=1e-4)


@torch.no_grad()
def test_rows_are_isolated(case):
    model = build(_config(case))
    ids = _ids(case)
    other = ids.clone()
    other[1] = (other[1] + 5) % case["vocab_size"]
    a, _ = decode_stepwise(model, ids, [_seq(case) // 2])
    b, _ = decode_stepwise(model, other, [_seq(case) // 2])
    torch.testing.assert_close(a[0], b[0], atol=1e-5, rtol=1e-5)


@torch.no_grad()
def test_planner_equals_measured_cache_bytes(case):
    model = build(_config(case))
    ids = _ids(case, batch=2, seq=_seq(case) + 9)
    cache = model.new_cache(2)
    model(ids[:, : _seq(case) // 2], cache=cache)
    checkpoints = {}
    for t in range(_seq(case) // 2, ids.shape[1]):
        model(ids[:, t:t + 1], cache=cache)
        checkpoints[t + 1] = (cache.nbytes, cache.layer_nbytes())
    for tokens, (total, per_layer) in checkpoints.items():
        planned = kvlab.plan(model.config, context=tokens, batch=2)
        assert [layer.cache_bytes for layer in planned.layers] == per_layer, f"at {tokens} tokens"
        assert planned.total_bytes == total


@torch.no_grad()
def test_cache_select_reorders_rows(case):
    model = build(_config(case))
    ids = _ids(case)
    cache = model.new_cache(2)
    model(ids[:, :-1], cache=cache)
    cache.select([1, 0])
    swapped = model(ids.flip(0)[:, -1:], cache=cache)
    reference = model(ids.flip(0))[:, -1:]
    torch.testing.assert_close(swapped, reference, atol=ATOL, rtol=1e-4)


def test_config_round_trip(case, tmp_path):
    config = ModelConfig.from_dict(_config(case))
    path = tmp_path / "config.json"
    config.save(path)
    again = ModelConfig.load(path)
    assert again.to_dict() == config.to_dict()
    assert json.loads(config.to_json())["layers"] == json.loads(again.to_json())["layers"]


def test_save_load_round_trip(case, tmp_path):
    model = build(_config(case))
    model.save(tmp_path / "ckpt")
    loaded = kvlab.load(tmp_path / "ckpt").eval()
    ids = _ids(case)
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids), model(ids), atol=0, rtol=0)
    with pytest.raises(kvlab.KvlabError):
        model.save(tmp_path / "ckpt")


__all__ = [name for name in dir() if name.startswith("test_")]
