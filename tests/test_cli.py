"""``kvlab plan`` numbers and output modes, and one-line failures (no traceback) of ``kvlab plan``,
``kvlab generate`` and ``kvlab.load`` on malformed, truncated or unsupported inputs."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

import kvlab
from kvlab.cli import main

GOOD_HF = dict(model_type="llama", vocab_size=160, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
               num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)

BAD_CONFIGS = {  # name -> (config.json text, a word the one-line error must contain)
    "truncated": (json.dumps(GOOD_HF)[:50], "not valid JSON"),
    "empty": ("", "not valid JSON"),
    "binary": ("\x00\xff\xfe", "not valid JSON"),
    "not-an-object": ("[1, 2]", "object"),
    "too-deep": ("[" * 100_000, "not valid JSON"),
    "unsupported-family": (json.dumps({**GOOD_HF, "model_type": "gpt2"}), "'gpt2'"),
    "missing-field": (json.dumps({k: v for k, v in GOOD_HF.items() if k != "hidden_size"}), "hidden_size"),
    "wrong-type": (json.dumps({**GOOD_HF, "num_hidden_layers": "two"}), "invalid value"),
    "null-size": (json.dumps({**GOOD_HF, "hidden_size": None}), "invalid value"),
    "kv-heads": (json.dumps({**GOOD_HF, "num_key_value_heads": 3}), "n_kv_heads"),
    "rope-not-object": (json.dumps({**GOOD_HF, "rope_scaling": "yes"}), "invalid value"),
    "rope-incomplete": (json.dumps({**GOOD_HF, "rope_scaling": {"rope_type": "llama3", "factor": 8}}),
                        "rope.scaling.low_freq_factor"),
    "negative-vocab": (json.dumps({**GOOD_HF, "vocab_size": -1}), "vocab_size"),
}


def run_cli(capsys, *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


@pytest.mark.parametrize("name", list(BAD_CONFIGS))
def test_bad_config_fails_in_one_line(name, tmp_path, capsys):
    text, word = BAD_CONFIGS[name]
    (tmp_path / "config.json").write_text(text)
    for argv in (["plan", str(tmp_path)], ["generate", str(tmp_path), "--ids", "1,2"]):
        code, _, err = run_cli(capsys, *argv)
        assert code == 2
        assert len(err.strip().splitlines()) == 1, err
        if argv[0] == "plan" or name != "rope-incomplete":
            assert word in err
    with pytest.raises(kvlab.KvlabError, match=word.replace("[", r"\[").replace(".", r"\.")):
        kvlab.load(tmp_path)


def test_subprocess_one_line_no_traceback(tmp_path):
    """The installed entry point (``python -m kvlab``): stderr is one line, exit status non-zero."""
    (tmp_path / "config.json").write_text(json.dumps(GOOD_HF)[:40])
    proc = subprocess.run([sys.executable, "-m", "kvlab", "plan", str(tmp_path)], capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines() == [proc.stderr.strip()]
    assert "not valid JSON" in proc.stderr


def test_plan_llama_405b_numbers(capsys):
    """126 layers x 8 KV heads x head_dim 128 x (K + V) x 2 bytes = 516,096 B/token in bf16."""
    code, out, _ = run_cli(capsys, "plan", "--preset", "llama-3.1-405b", "--context", "32768")
    assert code == 0
    per_token = 126 * 8 * 128 * 2 * 2
    assert per_token == 516_096
    assert "516,096" in out
    assert "15.75 GiB" in out  # 516,096 * 32,768 bytes
    assert "252.00 GiB" in out  # MHA-equivalent: 128 KV heads
    assert "MHA-equiv" in out and "16.0x" in out


def test_plan_json_per_layer_and_budget(capsys):
    code, out, _ = run_cli(capsys, "plan", "--preset", "llama-3.1-405b", "--context", "32K,128K", "--json",
                           "--per-layer", "--budget", "1TB")
    assert code == 0
    results = json.loads(out)
    assert [r["context"] for r in results] == [32768, 131072]
    for r in results:
        assert r["total_bytes"] == 516_096 * r["context"]
        assert r["bytes_per_token"] == 516_096
        assert r["mha_equivalent_bytes"] == 16 * r["total_bytes"]
        assert len(r["layers"]) == 126 and sum(layer["cache_bytes"] for layer in r["layers"]) == r["total_bytes"]
        free = 10**12 - r["weights_bytes"]
        assert r["max_sequences"] == free // r["total_bytes"]
    assert results[0]["max_sequences"] == 11
    code, out, _ = run_cli(capsys, "plan", "--preset", "qwen2.5-7b", "--context", "4K", "--per-layer")
    assert code == 0 and "per layer at 4,096 tokens" in out
    assert len([line for line in out.splitlines() if "GQA-7" in line]) == 28  # 28 query heads, 4 KV heads


def test_plan_dtype_and_batch(capsys):
    code, out, _ = run_cli(capsys, "plan", "--preset", "llama-3.1-8b", "--context", "1000", "--dtype", "fp32",
                           "--batch", "3", "--json")
    assert code == 0
    (r,) = json.loads(out)
    assert r["total_bytes"] == 32 * 8 * 128 * 2 * 4 * 1000 * 3


def test_plan_hf_folder_and_kvlab_config(tmp_path, capsys):
    (tmp_path / "config.json").write_text(json.dumps(GOOD_HF))
    code, out, _ = run_cli(capsys, "plan", str(tmp_path), "--context", "100", "--json")
    assert code == 0 and json.loads(out)[0]["total_bytes"] == 2 * 2 * 2 * 16 * 100 * 4
    cfg = kvlab.ModelConfig.from_dict({"vocab_size": 50, "d_model": 32, "n_layers": 2, "mlp_hidden": 64,
                                       "layers": {"repeat": {"type": "full", "n_heads": 4, "n_kv_heads": 1}}})
    cfg.save(tmp_path / "kv.yaml")
    code, out, _ = run_cli(capsys, "plan", str(tmp_path / "kv.yaml"), "--context", "10", "--json")
    assert code == 0 and json.loads(out)[0]["total_bytes"] == 2 * 2 * 1 * 8 * 10 * 4


@pytest.mark.parametrize("argv", [["plan"], ["plan", "--preset", "nope"], ["plan", "/no/such/dir"]])
def test_plan_usage_errors_are_one_line(argv, capsys):
    code, _, err = run_cli(capsys, *argv)
    assert code == 2 and len(err.strip().splitlines()) == 1


@pytest.mark.parametrize("preset", ["deepseek-v3", "deepseek-v4-flash", "zaya1-8b", "laguna-xs.2"])
def test_budget_of_a_mixture_of_experts_model_is_refused_not_guessed(capsys, preset):
    code, out, err = run_cli(capsys, "plan", "--preset", preset, "--context", "4K", "--budget", "80GiB")
    assert code == 2 and "experts, whose weights kvlab does not count" in err and len(err.splitlines()) == 1
    code, out, _ = run_cli(capsys, "plan", "--preset", preset, "--context", "4K")
    assert code == 0 and "weights:" not in out  # the KV plan alone
