"""``kvlab eval``: perplexity by position, recall by length, measured KV bytes equal the planner, speed."""

from __future__ import annotations

import json

import numpy as np

from kvlab import ModelConfig
from kvlab.cli import main
from kvlab.eval.evaluate import kv_bytes, perplexity, scaling_exponent
from kvlab.model import Model
from kvlab.planner import plan

CONFIG = {"vocab_size": 256, "d_model": 32, "n_layers": 2, "mlp_hidden": 64, "max_seq_len": 256,
          "layers": {"repeat": {"type": "full", "n_heads": 4, "n_kv_heads": 2}}}


def test_perplexity_buckets_and_kv_bytes_match_planner():
    model = Model(ModelConfig.from_dict(CONFIG))
    ids = np.random.default_rng(0).integers(0, 256, 2000).astype(np.int32)
    p = perplexity(model, ids, seq_len=32, max_windows=4, buckets=4)
    assert len(p["by_position"]) == 4 and abs(p["bits_per_token"] - 8) < 1.5  # untrained ~ uniform
    measured = kv_bytes(model, [16, 64])
    for n, b in measured.items():
        assert b == plan(model.config, context=n).total_bytes
    assert abs(scaling_exponent([1, 2, 4], [3.0, 6.0, 12.0]) - 1) < 1e-9


def test_cli_eval_of_a_saved_model(tmp_path, capsys):
    model = Model(ModelConfig.from_dict(CONFIG))
    model.save(tmp_path / "ckpt")
    corpus = tmp_path / "c.txt"
    corpus.write_text("".join(f"def f{i}(x):\n    return x + {i}\n" for i in range(300)))
    code = main(["eval", str(tmp_path / "ckpt"), "--corpus", str(corpus), "--split", "train", "--seq", "32",
                 "--windows", "2", "--context", "16,32", "--decode-steps", "2", "--recall-lengths", "64",
                 "--recall-pairs", "2", "--json"])
    result = json.loads(capsys.readouterr().out)
    assert code == 0 and set(result["kv_bytes"]) == {"16", "32"} and "64" in result["recall"]
    assert result["speed"]["32"]["decode_tok_s"] > 0 and result["perplexity"]["windows"] == 2
    kept = tmp_path / "result.json"
    kept.write_text("mine")
    assert main(["eval", str(tmp_path / "ckpt"), "--no-ppl", "--out", str(kept)]) == 2
    assert "exists; pass --force" in capsys.readouterr().err and kept.read_text() == "mine"
