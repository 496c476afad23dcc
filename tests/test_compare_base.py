"""``kvlab compare --base smollm2-135m --quick`` end to end: table, JSON and plots exist, every row's memory
column is its live cache bytes and equals ``kvlab plan``, training-free and healed numbers are both there
with a spread over two held-out samples, a rerun resumes from the cached jobs, and the README block is
the run's table. Budgets scale without code changes."""

from __future__ import annotations

import copy
import json

import pytest

from kvlab.cli import main
from kvlab.compare.base_report import README_END, README_START, plots, ref_context, table
from kvlab.compare.base_rows import ROWS, BaseBudget, row_steps
from kvlab.planner import plan


@pytest.mark.xdist_group("compare")
def test_compare_base_quick_end_to_end(tmp_path, capsys):
    from kvlab.config import ModelConfig

    out = tmp_path / "cmp"
    argv = ["compare", "--base", "smollm2-135m", "--quick", "--out", str(out)]
    assert main(argv) == 0
    summary = json.loads((out / "compare.json").read_text())
    md = (out / "compare.md").read_text()
    for png in ("pareto.png", "retrieval.png", "memory.png"):
        assert (out / png).stat().st_size > 1000
    assert not (out / "work").exists()  # converted / healed checkpoints removed once every job is cached
    assert set(summary["rows"]) == set(BaseBudget.named("quick").rows)
    n = ref_context(summary["budget"])
    for name, r in summary["rows"].items():
        assert r["plan_equals_measured"] and r["bytes_live"] == r["bytes_planned"]
        assert r["bytes_live"] == plan(ModelConfig.from_dict(r["config"]), context=n).total_bytes
        assert f"| {name} | {r['bytes_per_token_live']:.0f} |" in md  # the memory column: measured bytes
        for stage in ("free", "healed"):
            assert len(r[stage]["ppl_drop_pct"]) == 2 and len(r[stage]["kl"]) == 2  # two disjoint samples
            assert set(r["needle"][stage]) == {str(c) for c in summary["budget"]["needle_contexts"]}
        assert r["decode_ratio"] > 0 and r["prefill_exponent"] is not None
    mqa, int4 = summary["rows"]["MQA (fit merge)"], summary["rows"]["int4 KV"]
    assert mqa["reduction_pct_mem"] == pytest.approx(100 * 2 / 3)  # 3 KV heads -> 1
    assert mqa["claim"][0] == "KV sharing, 4x" and "(75%)" in md
    assert mean(int4["free"]["top1"]) > 0.9 and mean(int4["free"]["kl"]) < mean(mqa["free"]["kl"])
    # int4's full forward is the source's (quantization acts on the cache): nothing to heal, healed = free
    assert int4["heal_skipped"] and int4["healed"] == int4["free"] and not mqa["heal_skipped"]
    assert "= free (nothing to heal)" in md and "Not healed (int4 KV)" in md
    assert mqa["sequences_vs_source"] == pytest.approx(3.0)  # 3x smaller cache: 3x the sequences per GiB
    for r in (mqa, int4, summary["source"]):  # batched decode at the KV budget (live == plan asserted there)
        assert r["serving"]["aggregate_tok_s"] > 0 and 1 <= r["serving"]["batch"] <= min(r["serving"]["fit"], 64)
    assert "within noise" in md or "≈" in md or "±" in md
    # a context gated off for a model (8K only after a key found at 2K) is left out of its plotted line
    gated = copy.deepcopy(summary)
    for stage in ("free", "healed"):
        gated["rows"]["MQA (fit merge)"]["needle"][stage].pop(str(summary["budget"]["needle_contexts"][-1]))
    plots(gated, tmp_path)
    assert (tmp_path / "retrieval.png").stat().st_size > 1000
    capsys.readouterr()
    readme = tmp_path / "README.md"
    readme.write_text(f"# x\n\n{README_START}\nold\n{README_END}\n\nafter\n")
    assert main([*argv, "--readme", str(readme)]) == 0  # resumes: every job cached, nothing loaded
    assert " 0 run" in capsys.readouterr().err
    text = readme.read_text()
    assert table(summary) in text and "old" not in text and text.endswith("after\n")


def mean(values: list[float]) -> float:
    return sum(values) / len(values)


def test_compare_base_refuses_bad_input(tmp_path, capsys):
    (tmp_path / "notes.txt").write_text("mine")
    assert main(["compare", "--base", "smollm2-135m", "--quick", "--out", str(tmp_path)]) == 2
    assert "not a kvlab compare folder" in capsys.readouterr().err
    assert (tmp_path / "notes.txt").read_text() == "mine"
    assert main(["compare", "--base", "smollm2-135m", "--budget", "huge", "--out", str(tmp_path / "a")]) == 2
    assert main(["compare", "--base", "smollm2-135m", "--rows", "nope", "--out", str(tmp_path / "a")]) == 2
    assert "--rows: unknown" in capsys.readouterr().err


def test_budgets_scale_tokens_and_contexts_and_rows_parse():
    default, large = BaseBudget.named("default"), BaseBudget.named("large")
    assert large.eval_len == 4 * default.eval_len and large.heal_tokens == 4 * default.heal_tokens
    assert 8192 in large.needle_contexts and large.needle_gate is None  # every model at every context
    assert 8192 in default.needle_contexts and default.needle_gate == 2048  # 8K: models that pass at 2K
    assert BaseBudget.named("1.5").eval_len == int(1.5 * default.eval_len)
    for row in ROWS:  # every row is a valid `kvlab convert --to` plan for a 30-layer model
        assert len(row_steps(row, 30)) == 30
