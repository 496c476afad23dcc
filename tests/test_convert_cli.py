"""``kvlab convert`` end to end on a tiny byte-level model: outputs, report, plan reuse, refusals."""

import json

import pytest
import torch
from helpers import build, tiny_config

from kvlab.checkpoint import read_safetensors_file
from kvlab.cli import main
from kvlab.loading import load

FLAGS = ["--calib-len", "64", "--eval-seqs", "1", "--eval-len", "96", "--chunk", "32", "--context", "128",
         "--needle-contexts", "160", "--needle-depths", "0.5", "--max-chars", "20000"]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("convert")
    model = build(tiny_config([{"type": "full", "n_heads": 4, "n_kv_heads": 2}] * 2, vocab=256))
    model.save(root / "src")
    corpus = root / "corpus.txt"
    corpus.write_text("".join(f"def f{i}(x):\n    return x * {i} + {i % 7}\n\n" for i in range(3000)))
    return root, ["--corpus", str(corpus), *FLAGS]


def run(capsys, argv):
    code = main(argv)
    out = capsys.readouterr()
    return code, out.out, out.err


def test_convert_writes_checkpoint_plan_and_report(setup, capsys):
    root, flags = setup
    out = root / "mqa"
    code, text, _ = run(capsys, ["convert", str(root / "src"), "--to", "mqa+int8", "--out", str(out), *flags])
    assert code == 0 and "perplexity through the cache" in text
    for name in ("config.json", "model.safetensors", "plan.json", "report.json", "report.md"):
        assert (out / name).exists()
    report = json.loads((out / "report.json").read_text())
    assert report["plan"] == ["gqa+int8"] * 2
    assert all(c["equal"] for c in report["bytes"]["measured_vs_planned"])
    assert {c["context"] for c in report["bytes"]["measured_vs_planned"]} == {96, 160}
    assert report["bytes"]["fraction_of_source"] < 0.5
    assert load(out).config.layers[0].kv_quant == "int8"
    # refuses to overwrite without --force, then replaces with it
    code, _, err = run(capsys, ["convert", str(root / "src"), "--to", "keep", "--out", str(out), *flags])
    assert code == 2 and "--force" in err and err.count("\n") == 1
    code, text, _ = run(capsys, ["convert", str(root / "src"), "--to", "keep", "--out", str(out), "--json",
                                 "--force", *flags])
    assert code == 0 and json.loads(text)["fidelity"]["kl"] == pytest.approx(0, abs=1e-6)


def test_budget_plan_reproduces_and_is_deterministic(setup, capsys):
    root, flags = setup
    a, b, c = root / "b1", root / "b2", root / "b3"
    budget = ["--kv-budget", "30%", "--no-report"]
    assert run(capsys, ["convert", str(root / "src"), "--out", str(a), *budget, *flags])[0] == 0
    assert run(capsys, ["convert", str(root / "src"), "--out", str(b), *budget, *flags])[0] == 0
    reuse = root / "b4"
    assert run(capsys, ["convert", str(root / "src"), "--out", str(reuse), *budget, *flags,
                        "--sensitivity-from", str(a / "report.json")])[0] == 0
    assert json.loads((reuse / "plan.json").read_text())["layers"] == json.loads((a / "plan.json").read_text())["layers"]
    plan = json.loads((a / "plan.json").read_text())
    assert plan == json.loads((b / "plan.json").read_text())
    report = json.loads((a / "report.json").read_text())
    assert report["bytes"]["fraction_of_source"] <= 0.30
    assert run(capsys, ["convert", str(root / "src"), "--to", str(a / "plan.json"), "--out", str(c),
                        "--no-report", *flags])[0] == 0
    assert json.loads((c / "config.json").read_text())["layers"] == json.loads((a / "config.json").read_text())["layers"]
    wa, wc = read_safetensors_file(a / "model.safetensors"), read_safetensors_file(c / "model.safetensors")
    assert wa.keys() == wc.keys() and all(torch.equal(wa[k], wc[k]) for k in wa)


def test_unreachable_budget_and_bad_spec_are_one_line(setup, capsys):
    root, flags = setup
    code, _, err = run(capsys, ["convert", str(root / "src"), "--out", str(root / "u"), "--kv-budget", "1B",
                                "--no-report", *flags])
    last = err.strip().splitlines()[-1]  # after the calibration / sensitivity progress bars
    assert code == 2 and "smallest reachable" in last and "Traceback" not in err
    code, _, err = run(capsys, ["convert", str(root / "src"), "--out", str(root / "v"), "--to", "mla:ranks=3", *flags])
    assert code == 2 and "unknown option" in err and err.count("\n") == 1


def test_budget_over_a_given_menu_is_the_hybrid(setup, capsys):
    root, flags = setup
    out = root / "hybrid"
    code, _, _ = run(capsys, ["convert", str(root / "src"), "--out", str(out), "--kv-budget", "75%", "--to",
                              "keep|sliding:window=16,sinks=4", "--no-report", *flags])
    assert code == 0
    layers = json.loads((out / "plan.json").read_text())["layers"]
    assert sorted(layers) == ["keep", "sliding:window=16"]  # one layer stays full: the more sensitive one
