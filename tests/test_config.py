"""Config validation names the offending field; JSON / YAML round trips; kvlab checkpoints (bf16 included)
save and load, refuse to overwrite, and fail in one line on truncated weights."""

from __future__ import annotations

import copy

import pytest
import torch
from helpers import build

import kvlab
from kvlab import ConfigError, KvlabError, ModelConfig

BASE = {"vocab_size": 97, "d_model": 32, "n_layers": 2, "mlp_hidden": 48,
        "layers": [{"type": "full", "n_heads": 4, "n_kv_heads": 2}, {"type": "full", "n_heads": 4}]}


def with_(**changes) -> dict:
    data = copy.deepcopy(BASE)
    data.update(changes)
    return data


def layer(**fields) -> list[dict]:
    return [{"type": "full", "n_heads": 4, **fields}, {"type": "full", "n_heads": 4}]


BAD = {  # id -> (config dict, the message must start with this field path)
    "kv-heads-not-dividing": (with_(layers=layer(n_kv_heads=3)), "layers[0].n_kv_heads"),
    "unknown-technique": (with_(layers=[{"type": "nope", "n_heads": 4}] * 2), "layers[0].type"),
    "missing-technique": (with_(layers=[{"n_heads": 4}] * 2), "layers[0].type"),
    "missing-heads": (with_(layers=[{"type": "full"}] * 2), "layers[0].n_heads"),
    "zero-d_model": (with_(d_model=0), "d_model"),
    "negative-vocab": (with_(vocab_size=-5), "vocab_size"),
    "zero-mlp": (with_(mlp_hidden=0), "mlp_hidden"),
    "zero-heads": (with_(layers=layer(n_heads=0)), "layers[0].n_heads"),
    "zero-kv-heads": (with_(layers=layer(n_kv_heads=0)), "layers[0].n_kv_heads"),
    "negative-head-dim": (with_(layers=layer(head_dim=-8)), "layers[0].head_dim"),
    "fractional-heads": (with_(layers=layer(n_heads=4.5)), "layers[0].n_heads"),
    "float-d_model": (with_(d_model=32.0), "d_model"),
    "zero-eps": (with_(norm_eps=0), "norm_eps"),
    "layer-count": (with_(n_layers=3), "layers"),
    "layers-not-list": (with_(layers="full"), "layers"),
    "kv_from-self": (with_(layers=[{"type": "full", "n_heads": 4},
                                   {"type": "full", "n_heads": 4, "kv_from": 1}]), "layers[1].kv_from"),
    "kv_from-later": (with_(layers=[{"type": "full", "n_heads": 4, "kv_from": 1},
                                    {"type": "full", "n_heads": 4}]), "layers[0].kv_from"),
    "kv_from-shape": (with_(layers=[{"type": "full", "n_heads": 4},
                                    {"type": "full", "n_heads": 4, "n_kv_heads": 2, "kv_from": 0}]),
                      "layers[1].kv_from"),
    "kv_from-string": (with_(layers=[{"type": "full", "n_heads": 4},
                                     {"type": "full", "n_heads": 4, "kv_from": "0"}]), "layers[1].kv_from"),
    "bad-dtype": (with_(dtype="int7"), "dtype"),
    "unknown-field": (with_(n_experts=4), "n_experts"),
    "unknown-layer-field": (with_(layers=layer(window=3)), "layers[0].window"),
    "rope-theta": (with_(rope={"theta": -1.0}), "rope.theta"),
    "rope-scaling": (with_(rope={"scaling": {"rope_type": "llama3", "factor": 8.0}}), "rope.scaling."),
    "mlp-act": (with_(mlp_act="relu"), "mlp_act"),
}


@pytest.mark.parametrize("name", list(BAD))
def test_invalid_config_names_the_field(name):
    data, field_path = BAD[name]
    with pytest.raises(ConfigError) as info:
        ModelConfig.from_dict(data)
    message = str(info.value)
    assert message.startswith(field_path), message
    assert "\n" not in message


def test_shorthands_and_aliases():
    cfg = ModelConfig.from_dict(with_(n_layers=3, layers={"pattern": [{"type": "gqa", "n_heads": 4, "n_kv_heads": 2},
                                                                      {"type": "mqa", "n_heads": 4, "n_kv_heads": 1}]},
                                      dtype="bf16"))
    assert [spec.n_kv_heads for spec in cfg.layers] == [2, 1, 2]
    assert {spec.type for spec in cfg.layers} == {"full"}
    assert cfg.dtype == "bfloat16"


@pytest.mark.parametrize("suffix", [".json", ".yaml"])
def test_file_round_trip(tmp_path, suffix):
    data = with_(layers=[{"type": "full", "n_heads": 4, "n_kv_heads": 1, "qk_norm": True, "qkv_bias": True,
                          "head_dim": 12, "rope": {"theta": 5e5, "scaling": {"rope_type": "linear", "factor": 2.0}}},
                         {"type": "full", "n_heads": 4, "kv_from": 0, "n_kv_heads": 1, "head_dim": 12}],
                 tie_embeddings=True, norm_eps=1e-5, extras={"note": "x"})
    cfg = ModelConfig.from_dict(data)
    path = tmp_path / f"cfg{suffix}"
    cfg.save(path)
    again = ModelConfig.load(path)
    assert again == cfg and again.to_dict() == cfg.to_dict()
    assert ModelConfig.from_dict(cfg.to_dict()) == cfg


def test_malformed_yaml_is_one_line(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("layers: [unclosed\n  - : :\n")
    with pytest.raises(ConfigError, match="not valid YAML") as info:
        ModelConfig.load(path)
    assert "\n" not in str(info.value)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_checkpoint_round_trip(tmp_path, dtype):
    model = build(with_(dtype=dtype, tie_embeddings=True))
    model.save(tmp_path / "ckpt")
    loaded = kvlab.load(tmp_path / "ckpt")
    assert loaded.dtype == model.dtype == getattr(torch, dtype)
    assert loaded.lm_head.weight is loaded.embed_tokens.weight
    ids = torch.randint(0, 97, (2, 9))
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids), model(ids), atol=0, rtol=0)
    as_fp32 = kvlab.load(tmp_path / "ckpt", dtype="float32")
    assert as_fp32.dtype == torch.float32 and as_fp32.config.dtype == "float32"


def test_save_refuses_to_overwrite(tmp_path):
    model = build(BASE)
    model.save(tmp_path / "ckpt")
    other = build(BASE, seed=1)
    with pytest.raises(KvlabError, match="overwrite=True"):
        other.save(tmp_path / "ckpt")
    (tmp_path / "cfg-only").mkdir()
    (tmp_path / "cfg-only" / "config.json").write_text("{}")
    with pytest.raises(KvlabError, match="overwrite=True"):
        other.save(tmp_path / "cfg-only")
    other.save(tmp_path / "ckpt", overwrite=True)
    loaded = kvlab.load(tmp_path / "ckpt")
    torch.testing.assert_close(loaded.embed_tokens.weight, other.embed_tokens.weight)


def test_truncated_or_mismatched_weights_fail_in_one_line(tmp_path):
    model = build(BASE)
    model.save(tmp_path / "ckpt")
    weights = tmp_path / "ckpt" / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2])
    with pytest.raises(KvlabError, match="cannot read safetensors") as info:
        kvlab.load(tmp_path / "ckpt")
    assert "\n" not in str(info.value)
    build(with_(mlp_hidden=64)).save(tmp_path / "ckpt", overwrite=True)  # weights of another shape
    (tmp_path / "ckpt" / "config.json").write_text(build(BASE).config.to_json())
    with pytest.raises(KvlabError, match="shape"):
        kvlab.load(tmp_path / "ckpt")
