"""``kvlab compare --quick`` end to end: table, JSON and plots exist, the memory column is each variant's
measured cache bytes (and equals the planner), unavailable techniques are reported, not faked; the
statistics that call a difference real or within noise."""

from __future__ import annotations

import json

import pytest

from kvlab.cli import main
from kvlab.compare.report import difference
from kvlab.compare.variants import availability, base_model, count_params, widen


@pytest.mark.xdist_group("compare")
def test_compare_quick_end_to_end(tmp_path, capsys):
    out = tmp_path / "cmp"
    argv = ["compare", "--from-scratch", "--quick", "--out", str(out)]
    assert main(argv) == 0
    summary = json.loads((out / "compare.json").read_text())
    table = (out / "compare.md").read_text()
    for png in ("pareto.png", "kv_memory.png", "decode_time.png", "recall_length.png"):
        assert (out / png).stat().st_size > 1000
    longest = str(max(summary["budget"]["contexts"]))
    assert summary["reference"] == "MHA" and summary["machine"]["cores"] >= 1
    available = {n: r for n, r in summary["variants"].items() if r.get("available")}
    assert len(available) == 10
    params = [r["params"] for r in available.values()]
    assert max(params) / min(params) < 1.02  # matched parameter count
    for name, r in summary["variants"].items():
        assert name in table
        if not r.get("available"):
            assert "not available" in table
            continue
        assert r["plan_equals_measured"] and r["kv_bytes"] == r["planned_bytes"]
        per_token = r["kv_bytes"][longest] / int(longest)
        assert f"| {name} | {r['params']} | {per_token:.0f} |" in table  # the memory column: measured bytes
        assert len(r["lm_runs"]) == len(r["recall_runs"]) == 1 and r["bits_per_byte"][0] > 0
        assert set(r["recall"]) == {str(n) for n in summary["budget"]["recall_lengths"]}
    assert "one seed there is no spread" in table
    capsys.readouterr()
    assert main(argv) == 0 and "20 of 20 training jobs cached" in capsys.readouterr().err  # resumes


def test_compare_refuses_a_folder_it_did_not_write(tmp_path, capsys):
    (tmp_path / "notes.txt").write_text("mine")
    assert main(["compare", "--from-scratch", "--quick", "--out", str(tmp_path)]) == 2
    assert "not a kvlab compare folder" in capsys.readouterr().err
    assert (tmp_path / "notes.txt").read_text() == "mine"


def test_differences_are_real_only_beyond_their_seed_spread():
    assert difference([1.0, 1.2], [0.1, 0.12])["real"] is True
    close = difference([1.0, 1.2], [1.1, 1.3])
    assert close["real"] is False and close["delta"] == pytest.approx(-0.1)
    assert close["spread"] == pytest.approx((2 * 0.1414**2) ** 0.5, rel=1e-3)
    assert difference([1.0], [0.0])["real"] is None  # one seed: no spread, nothing called real


def test_missing_technique_is_not_available():
    cfg = base_model([{"type": "full", "n_heads": 2, "head_dim": 8}])
    assert availability(("no_such_technique",), cfg).startswith("technique 'no_such_technique' not registered")
    assert availability(("full",), {**cfg, "d_model": -1}).startswith("config does not validate")
    assert availability(("full",), cfg) is None


def test_widen_scales_widths_not_heads_or_windows():
    sliding = {"type": "sliding", "n_heads": 2, "head_dim": 8, "window": 16}
    cfg = base_model([sliding, {"type": "mla", "n_heads": 2, "kv_lora_rank": 12, "qk_rope_head_dim": 4,
                                "qk_nope_head_dim": 8, "v_head_dim": 8}, sliding], d_model=16, mlp_hidden=32)
    wide = widen(cfg, 4)
    assert wide["d_model"] == 64 and wide["mlp_hidden"] == 128 and cfg["layers"][0]["head_dim"] == 8
    assert wide["layers"][0]["head_dim"] == wide["layers"][2]["head_dim"] == 32  # a repeated spec: scaled once
    assert wide["layers"][0]["window"] == 16
    assert wide["layers"][1]["kv_lora_rank"] == 48 and wide["layers"][1]["n_heads"] == 2
    assert count_params(wide) > 8 * count_params(cfg)


@pytest.mark.xdist_group("compare")
def test_compare_user_configs_over_two_seeds_marks_noise(tmp_path, capsys):
    paths = []
    for name, layer in [("mha", {"type": "full", "n_heads": 4, "head_dim": 8}),
                        ("window", {"type": "sliding", "n_heads": 4, "head_dim": 8, "window": 8})]:
        path = tmp_path / f"{name}.json"
        path.write_text(json.dumps({"vocab_size": 97, "d_model": 32, "n_layers": 2, "mlp_hidden": 64,
                                    "layers": {"repeat": layer}}))
        paths.append(str(path))
    out = tmp_path / "cmp"
    assert main(["compare", "--from-scratch", "--quick", "--variants", *paths, "--seeds", "2", "--steps", "3", "--lm-steps", "3",
                 "--workers", "1", "--out", str(out)]) == 0
    assert "vocab_size 97 -> 256" in capsys.readouterr().err
    summary = json.loads((out / "compare.json").read_text())
    assert summary["reference"] == "mha" and set(summary["variants"]) == {"mha", "window"}
    window = summary["variants"]["window"]
    assert len(window["lm_runs"]) == 2 and window["bits_per_byte"][1] > 0  # a spread over two seeds
    delta = window["bits_per_byte_vs_ref"]
    table = (out / "compare.md").read_text()
    mark = "" if delta["real"] else " (within noise)"
    assert f"{delta['delta']:+.3f} ± {delta['spread']:.3f}{mark} |" in table
    assert main(["compare", "--from-scratch", "--variants", str(tmp_path / "missing.json"), "--out", str(out)]) == 2
    (tmp_path / "again").mkdir()
    (tmp_path / "again" / "mha.json").write_text((tmp_path / "mha.json").read_text())
    assert main(["compare", "--from-scratch", "--variants", paths[0], str(tmp_path / "again" / "mha.json"), "--out", str(out)]) == 2
    assert "two configs are named 'mha'" in capsys.readouterr().err
