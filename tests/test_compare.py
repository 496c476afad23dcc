"""``kvlab compare --quick`` end to end: table, JSON and plots exist, the memory column is each variant's
measured cache bytes (and equals the planner), unavailable techniques are reported, not faked."""

from __future__ import annotations

import json

from kvlab.cli import main
from kvlab.compare.variants import availability, base_model


def test_compare_quick_end_to_end(tmp_path, capsys):
    out = tmp_path / "cmp"
    argv = ["compare", "--quick", "--steps", "6", "--out", str(out)]
    assert main(argv) == 0
    summary = json.loads((out / "compare.json").read_text())
    table = (out / "compare.md").read_text()
    for png in ("pareto.png", "kv_memory.png", "decode_time.png", "recall_length.png"):
        assert (out / png).stat().st_size > 1000
    longest = str(max(summary["budget"]["contexts"]))
    assert summary["reference"] == "MHA"
    params = [r["params"] for r in summary["variants"].values() if r.get("available")]
    assert max(params) / min(params) < 1.02  # matched parameter count
    for name, r in summary["variants"].items():
        assert name in table
        if not r.get("available"):
            assert "not available" in table
            continue
        assert r["plan_equals_measured"] and r["kv_bytes"] == r["planned_bytes"]
        per_token = r["kv_bytes"][longest] / int(longest)
        assert f"| {name} | {r['params']} | {per_token:.0f} |" in table
    capsys.readouterr()
    assert main(argv) == 0 and "cached" in capsys.readouterr().err  # resumes from per-variant results


def test_missing_technique_is_not_available():
    cfg = base_model([{"type": "full", "n_heads": 2, "head_dim": 8}])
    assert availability(("no_such_technique",), cfg).startswith("technique 'no_such_technique' not registered")
    assert availability(("full",), {**cfg, "d_model": -1}).startswith("config does not validate")
    assert availability(("full",), cfg) is None
