"""``kvlab.runtime_dtype``: bf16 only where it measures faster by the margin at decode and prefill (timings
forced both ways), cached per process; ``--dtype auto`` on ``kvlab generate`` / ``kvlab eval``."""

from __future__ import annotations

import pytest
import torch

import kvlab
from kvlab import ModelConfig
from kvlab import runtime_dtype as rd
from kvlab.cli import main
from kvlab.loading import read_model_config
from kvlab.model import Model

CONFIG = {"vocab_size": 256, "d_model": 32, "n_layers": 2, "mlp_hidden": 64, "max_seq_len": 128,
          "layers": {"repeat": {"type": "full", "n_heads": 4, "n_kv_heads": 2}}}


@pytest.fixture(autouse=True)
def _fresh_cache():
    rd._report.cache_clear()
    yield
    rd._report.cache_clear()


def force(monkeypatch, decode: float, prefill: float) -> list:
    """Make bf16 ``decode`` / ``prefill`` times faster than fp32 (< 1: slower); returns the calls made."""
    calls = []

    def measure(rows, d_in, d_out, repeats, packed=False):
        calls.append((rows, d_in, d_out) + (("packed",) if packed else ()))
        return {"float32": 1.0, "bfloat16": 1.0 / (prefill if rows == rd.PREFILL_ROWS else decode)}

    monkeypatch.setattr(rd, "_measure", measure)
    return calls


def test_real_measurement_gives_a_dtype_and_a_report():
    dtype = rd.pick_dtype(ModelConfig.from_dict(CONFIG))
    report = rd.dtype_report(CONFIG)
    assert dtype in (torch.float32, torch.bfloat16) and dtype == getattr(torch, report["dtype"])
    assert report["shapes"] == {"decode": [1, 32, 64], "prefill": [rd.PREFILL_ROWS, 32, 64]}
    assert set(report["seconds"]["decode"]) == {"float32", "bfloat16"} and report["speedup"]["prefill"] > 0
    assert (report["dtype"] == "bfloat16") == (min(report["speedup"].values()) >= rd.MARGIN)
    assert rd.describe(report).startswith(f"dtype auto: {report['dtype']} (")


@pytest.mark.parametrize("decode, prefill, want", [(0.3, 0.3, torch.float32), (0.8, 5.0, torch.float32),
                                                   (1.1, 5.0, torch.float32), (1.5, 4.0, torch.bfloat16)])
def test_bf16_only_when_faster_by_the_margin_at_both(monkeypatch, decode, prefill, want):
    calls = force(monkeypatch, decode, prefill)
    assert rd.pick_dtype((32, 64), batch=4) == want
    assert calls == [(4, 32, 64), (rd.PREFILL_ROWS, 32, 64)]
    assert rd.pick_dtype((32, 64), batch=4) == want and len(calls) == 2  # measured once per process
    assert rd.dtype_report((32, 64), batch=4)["reason"].startswith("bf16 >=" if want == torch.bfloat16 else "bf16 not")


def test_packed_kernel_is_measured_apart():
    """``packed``: both dtypes timed through oneDNN on packed copies (where that dtype packs), a report of
    its own; the plain report is not reused for it."""
    plain, packed = rd.dtype_report(CONFIG), rd.dtype_report(CONFIG, packed=True)
    assert not plain["packed"] and packed["packed"] and packed["speedup"]["decode"] > 0
    assert "packed linears" in rd.describe(packed) and "packed" not in rd.describe(plain)


def test_generate_packed_dtype_auto_measures_packed(checkpoint, capsys, monkeypatch):
    calls = force(monkeypatch, 2.0, 2.0)
    assert main(["generate", checkpoint, "--ids", "1,2", "--max-new-tokens", "2", "--dtype", "auto",
                 "--packed"]) == 0
    assert calls and all(call[-1] == "packed" for call in calls)
    assert "packed linears" in capsys.readouterr().err


def test_cuda_takes_bf16_where_supported_without_timing(monkeypatch):
    calls = force(monkeypatch, 0.1, 0.1)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda: True)
    assert rd.pick_dtype((32, 64), device="cuda") == torch.bfloat16 and not calls


@pytest.fixture
def checkpoint(tmp_path):
    Model(ModelConfig.from_dict(CONFIG)).save(tmp_path / "ckpt")
    return str(tmp_path / "ckpt")


def test_generate_dtype_auto_prints_the_decision(checkpoint, capsys):
    code = main(["generate", checkpoint, "--ids", "1,2,3", "--max-new-tokens", "2", "--dtype", "auto"])
    err = capsys.readouterr().err
    assert code == 0 and err.startswith("dtype auto: ") and "bf16 speedup over fp32: decode" in err
    assert read_model_config(checkpoint).to_dict() == kvlab.load(checkpoint).config.to_dict()  # no weights read


def test_forced_bf16_runs_generate_and_eval_in_bf16(checkpoint, capsys, monkeypatch):
    force(monkeypatch, 2.0, 2.0)
    loaded = []
    real_load = kvlab.loading.load
    monkeypatch.setattr(kvlab.loading, "load", lambda *a, **k: loaded.append(k) or real_load(*a, **k))
    monkeypatch.setattr("kvlab.load", kvlab.loading.load)
    assert main(["generate", checkpoint, "--ids", "1,2", "--max-new-tokens", "2", "--dtype", "auto"]) == 0
    assert main(["eval", checkpoint, "--no-ppl", "--context", "16", "--decode-steps", "1", "--dtype", "auto"]) == 0
    assert capsys.readouterr().err.count("dtype auto: bfloat16") == 2
    assert loaded == [{"dtype": "bfloat16"}, {"dtype": "bfloat16"}]


@pytest.mark.parametrize("command", ["generate", "eval"])
def test_bad_dtype_is_one_line_exit_2(checkpoint, capsys, command):
    assert main([command, checkpoint, "--dtype", "fp8"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--dtype" in err and "invalid choice" in err
