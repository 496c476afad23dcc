"""``kvlab heal``: healing lowers KL on a tiny model within seconds, resume is bit-exact, each stage's loss
matches its definition on a hand-computed case, parameter selection, one-line refusals, and DDP under
torchrun equals one process."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from heal_students import mqa_student, sliding_student

from kvlab import ModelConfig
from kvlab.attention._common import ForwardContext
from kvlab.cli import main
from kvlab.errors import KvlabError
from kvlab.heal import converted_layers, converted_parameters, evaluate_fidelity, trainable_names
from kvlab.heal.driver import HealConfig, heal
from kvlab.heal.kl import KLObjective, kl_divergence
from kvlab.heal.local import LocalObjective
from kvlab.model import Model

CONFIG = {"vocab_size": 256, "d_model": 32, "n_layers": 2, "mlp_hidden": 64, "max_seq_len": 256,
          "layers": {"repeat": {"type": "full", "n_heads": 4, "n_kv_heads": 2}}}
TEXT = "".join(f"def f{i}(x):\n    return x * {i} + {i % 7}\n\n" for i in range(1500))


def make_teacher(seed: int = 0) -> Model:
    """A tiny random model with peaked distributions (weights scaled up), so KL is far from zero."""
    torch.manual_seed(seed)
    model = Model(ModelConfig.from_dict(CONFIG))
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() >= 2:
                p.normal_(0, 0.3)
    return model


@pytest.fixture
def pair(tmp_path) -> tuple[Path, Path, Path]:
    teacher = make_teacher()
    teacher.save(tmp_path / "teacher")
    mqa_student(teacher).save(tmp_path / "student")
    (tmp_path / "corpus.txt").write_text(TEXT)
    return tmp_path / "student", tmp_path / "teacher", tmp_path / "corpus.txt"


def _cfg(corpus: Path, **overrides) -> HealConfig:
    values = {"tokens": 2 * 24 * 4 * 32, "batch": 4, "seq": 32, "eval_seq": 32, "eval_points": 2,
              "corpus": str(corpus), "local_lr": 1e-2, "kl_lr": 3e-3, **overrides}
    return HealConfig(**values)


def _weights(folder: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(folder / "model.safetensors"))


# ---- selection ---------------------------------------------------------------------------------------
def test_converted_parameters_are_what_the_conversion_changed():
    teacher = make_teacher()
    mqa = mqa_student(teacher)
    assert converted_layers(mqa, teacher) == [0, 1]
    assert converted_parameters(mqa, teacher) == {f"layers.{i}.self_attn.{n}_proj.weight" for i in (0, 1)
                                                  for n in "kv"}
    window = sliding_student(teacher, window=8)  # same weights: the whole attention of each layer trains
    assert converted_parameters(window, teacher) == {n for n, _ in window.named_parameters() if ".self_attn." in n}
    partial = mqa_student(teacher)
    partial.load_state_dict({**partial.state_dict(), **{k: v for k, v in teacher.state_dict().items()
                                                        if k.startswith("layers.1.") and ".self_attn." not in k}})
    assert trainable_names(partial, teacher, "attention") == {n for n, _ in partial.named_parameters()
                                                              if ".self_attn." in n}
    assert len(trainable_names(partial, teacher, "all")) == len(list(partial.parameters()))
    with pytest.raises(KvlabError, match="nothing was converted"):
        trainable_names(make_teacher(), teacher)
    other = Model(ModelConfig.from_dict({**CONFIG, "mlp_hidden": 48}))
    with pytest.raises(KvlabError, match="outside attention"):
        converted_layers(other, teacher)


# ---- each stage's loss, by hand -------------------------------------------------------------------
def test_kl_matches_its_definition_on_a_hand_case():
    teacher = torch.log(torch.tensor([[0.5, 0.5], [0.9, 0.1]]))
    student = torch.log(torch.tensor([[0.25, 0.75], [0.5, 0.5]]))
    by_hand = ((0.5 * math.log(0.5 / 0.25) + 0.5 * math.log(0.5 / 0.75))
               + (0.9 * math.log(0.9 / 0.5) + 0.1 * math.log(0.1 / 0.5))) / 2
    assert float(kl_divergence(teacher, student)) == pytest.approx(by_hand, rel=1e-6)
    assert float(kl_divergence(teacher + 3.0, student - 1.0)) == pytest.approx(by_hand, rel=1e-5)  # logits


@torch.no_grad()
def test_kl_objective_is_token_mean_kl_plus_weighted_hidden_mse():
    teacher = make_teacher()
    student = mqa_student(teacher)
    ids, calib = torch.randint(0, 256, (2, 12)), torch.randint(0, 256, (3, 12))
    with torch.no_grad():
        p, q = teacher(ids).softmax(-1), student(ids).softmax(-1)  # [B, S, V]
    kl = float((p * (p.log() - q.log())).sum(-1).mean())
    assert float(KLObjective(student, teacher)((ids,)).detach()) == pytest.approx(kl, rel=1e-5)

    @torch.no_grad()
    def block_outputs(model, x):
        h, ctx, out = model.embed(x), ForwardContext(x.shape[0], x.shape[1], 0, None, x.device), []
        for block in model.layers:
            h = block(h, ctx, None)
            out.append(h)
        return out

    var = [float(h.var(unbiased=False)) for h in block_outputs(teacher, calib)]
    mse = [float((a - b).pow(2).mean()) for a, b in zip(block_outputs(student, ids), block_outputs(teacher, ids))]
    expected = kl + 0.5 * np.mean([m / v for m, v in zip(mse, var)])
    assert float(KLObjective(student, teacher, 0.5, calib)((ids,)).detach()) == pytest.approx(expected, rel=1e-5)


@torch.no_grad()
def test_local_objective_is_mean_of_variance_normalised_layer_mse():
    teacher = make_teacher()
    student = mqa_student(teacher)
    ids, calib = torch.randint(0, 256, (2, 12)), torch.randint(0, 256, (3, 12))

    @torch.no_grad()
    def attention_io(x):  # the teacher's attention inputs and outputs, block by block
        h, ctx, out = teacher.embed(x), ForwardContext(x.shape[0], x.shape[1], 0, None, x.device), []
        for block in teacher.layers:
            normed = block.input_layernorm(h)
            out.append((normed, block.self_attn(normed, ctx, None)))
            h = block(h, ctx, None)
        return out

    var = [float(y.var(unbiased=False)) for _, y in attention_io(calib)]
    ctx = ForwardContext(2, 12, 0, None, ids.device)
    losses = [float((student.layers[i].self_attn(x, ctx, None) - y).pow(2).mean()) / var[i]
              for i, (x, y) in enumerate(attention_io(ids))]
    objective = LocalObjective(student, teacher, [0, 1], calib)
    assert objective.layer_losses(ids).tolist() == pytest.approx(losses, rel=1e-5)
    assert float(objective((ids,))) == pytest.approx(np.mean(losses), rel=1e-5)
    assert float(LocalObjective(teacher, teacher, [0, 1], calib)((ids,))) == 0.0  # the source itself


# ---- healing works, resumes bit-exactly, evaluates through the cache --------------------------------
def test_healing_lowers_kl_within_seconds(pair):
    student, teacher, corpus = pair
    summary = heal(student, teacher, student.parent / "out", _cfg(corpus), progress=False)
    points = summary["points"]
    assert [p["stage"] for p in points] == ["start", "local", "local", "kl", "kl"]
    assert points[-1]["tokens"] == 2 * 24 * 4 * 32
    local_end = [p for p in points if p["stage"] == "local"][-1]
    assert local_end["kl"] < 0.9 * points[0]["kl"] and points[-1]["kl"] < local_end["kl"]
    assert sum(s["train"] for s in summary["seconds"].values()) < 20
    out = student.parent / "out"
    assert (out / "curve.png").stat().st_size > 0 and json.loads((out / "curve.json").read_text())["final"]
    import kvlab

    healed = kvlab.load(summary["checkpoint"])
    assert healed.config.layers[0].n_kv_heads == 1  # still the converted architecture
    ids = np.frombuffer(TEXT[-3000:].encode(), dtype=np.uint8).astype(np.int64)
    fidelity = evaluate_fidelity(healed, kvlab.load(teacher), ids, seq=32)
    assert fidelity["kl"] == pytest.approx(points[-1]["kl"], rel=0.5)  # other text, same ballpark
    same = evaluate_fidelity(kvlab.load(teacher), kvlab.load(teacher), ids, seq=32)
    assert abs(same["kl"]) < 1e-5 and same["ppl"] == pytest.approx(same["teacher_ppl"])


def test_fidelity_is_measured_through_the_cache():
    teacher = make_teacher()
    window = sliding_student(teacher, window=8)
    ids = np.frombuffer(TEXT[:2000].encode(), dtype=np.uint8).astype(np.int64)
    from kvlab.eval.evaluate import perplexity

    through_cache = evaluate_fidelity(window, teacher, ids, seq=64, count=2)
    assert through_cache["ppl"] == pytest.approx(perplexity(window, ids, 64, max_windows=2)["ppl"], rel=1e-4)
    assert through_cache["teacher_ppl"] == pytest.approx(perplexity(teacher, ids, 64, max_windows=2)["ppl"], rel=1e-4)
    assert through_cache["kl"] > 0


@pytest.mark.parametrize("stop", [2, 24])  # inside stage 1; exactly at its end (stage 2 restarts from disk)
def test_resume_is_bit_exact(pair, stop):
    student, teacher, corpus = pair
    whole = heal(student, teacher, student.parent / "whole", _cfg(corpus), progress=False)
    part = student.parent / "part"
    assert heal(student, teacher, part, _cfg(corpus), progress=False, stop_after=stop) == {}
    resumed = heal(None, None, part, _cfg(corpus, tokens=1), resume=True, progress=False)  # saved settings win
    a, b = _weights(Path(whole["checkpoint"])), _weights(Path(resumed["checkpoint"]))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert [p["kl"] for p in resumed["points"]] == [p["kl"] for p in whole["points"]]


# ---- the command line ---------------------------------------------------------------------------------
REPORT_FLAGS = ["--eval-seqs", "1", "--eval-len", "32", "--chunk", "16", "--needle-contexts", "160",
                "--needle-depths", "0.5"]


def test_cli_writes_convert_s_report_on_the_healed_model(pair, capsys):
    """OUT/report.json/md: the healed model against the teacher on the test split; with one probe window at
    the split's start, the report's KL is the curve's final KL; --no-report (and --force) leaves none."""
    student, teacher, corpus = pair
    (student / "plan.json").write_text(json.dumps({"kvlab_plan": 1, "context": 128, "layers": ["gqa-1"] * 2}))
    out = student.parent / "reported"
    args = ["heal", str(student), "--teacher", str(teacher), "--corpus", str(corpus), "--out", str(out),
            "--tokens", "2K", "--batch", "4", "--seq", "32", "--eval-seq", "32", "--eval-windows", "1",
            "--eval-points", "1", "--stage", "local", "--no-progress", *REPORT_FLAGS]
    assert main(args) == 0
    text = capsys.readouterr().out
    assert "perplexity through the cache" in text and "| | source | healed |" in text
    report = json.loads((out / "report.json").read_text())
    assert (out / "report.md").read_text() == text[:-1]  # print() adds a newline
    assert {"fidelity", "needle", "bytes", "plan", "data", "heal"} <= report.keys()
    assert report["plan"] == ["gqa-1"] * 2 and report["bytes"]["context"] == 128
    assert report["to"] == f"healed {student.resolve()}" and report["source"] == str(teacher)
    checks = report["bytes"]["measured_vs_planned"]
    assert {c["context"] for c in checks} == {32, 160} and all(c["equal"] for c in checks)
    curve = json.loads((out / "curve.json").read_text())["final"]
    assert report["heal"]["curve_final"] == curve and curve["tokens"] == 2048
    assert report["fidelity"]["kl"] == pytest.approx(curve["kl"], rel=1e-4, abs=1e-6)
    assert report["fidelity"]["ppl_converted"] == pytest.approx(curve["ppl"], rel=1e-4)
    assert main([*args, "--no-report", "--force"]) == 0
    assert "perplexity" not in capsys.readouterr().out
    assert not (out / "report.json").exists() and not (out / "report.md").exists()


def test_cli_heals_and_refuses_in_one_line(pair, capsys):
    student, teacher, corpus = pair
    out = student.parent / "cli"
    args = ["heal", str(student), "--teacher", str(teacher), "--corpus", str(corpus), "--out", str(out),
            "--tokens", "2K", "--batch", "4", "--seq", "32", "--eval-seq", "32", "--eval-points", "1",
            "--stage", "local", "--no-progress", *REPORT_FLAGS]
    assert main(args) == 0
    err = capsys.readouterr().err
    assert "KL" in err and "curve" in err and (out / "local" / "checkpoint" / "model.safetensors").exists()
    (student.parent / "mine").mkdir()
    (student.parent / "mine" / "notes.txt").write_text("keep")
    for extra, message in [([], "--force"), (["--fsdp"], "--fsdp"), (["--out", str(student.parent / "mine"),
                           "--force"], "not a kvlab heal folder"), (["--stage", "kl", "--force", "--teacher",
                           str(student)], "nothing was converted"), (["--needle-contexts", "300", "--force"],
                           "--needle-contexts: 300 tokens exceed the model's max_seq_len (256)")]:
        code = main(args + extra)
        err = capsys.readouterr().err
        assert code == 2 and message in err and len(err.strip().splitlines()) == 1, (extra, err)
    assert (out / "local" / "checkpoint" / "model.safetensors").exists()  # refused runs delete nothing
    assert (out / "report.json").exists()
    assert (student.parent / "mine" / "notes.txt").exists()
    assert main(["heal", "--out", str(student.parent / "none"), "--resume"]) == 2
    assert "nothing to resume" in capsys.readouterr().err


# ---- DDP under torchrun -------------------------------------------------------------------------------
_DDP_SCRIPT = """
import sys
import torch
import torch.distributed as dist
torch.set_num_threads(1)
from kvlab.heal.driver import HealConfig, heal
cfg = HealConfig(**__import__("json").loads(sys.argv[4]))
heal(sys.argv[1], sys.argv[2], sys.argv[3], cfg, progress=False)
dist.destroy_process_group()
"""


@pytest.mark.slow
def test_ddp_two_processes_match_single_process(pair):
    """2 ranks x half the global batch == 1 process x the whole batch, for both stages."""
    import dataclasses

    import torch.distributed as dist

    assert dist.is_available() and dist.is_gloo_available()
    student, teacher, corpus = pair
    cfg = _cfg(corpus, tokens=2 * 6 * 4 * 32, hidden_weight=0.5)
    script = student.parent / "ddp.py"
    script.write_text(_DDP_SCRIPT)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join(sys.path)}
    run = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                          str(script), str(student), str(teacher), str(student.parent / "ddp"),
                          json.dumps(dataclasses.asdict(cfg))], env=env, capture_output=True, text=True, timeout=180)
    assert run.returncode == 0, run.stderr[-2000:]
    single = heal(student, teacher, student.parent / "single", cfg, progress=False)
    for stage in ("local", "kl"):
        logs = [[json.loads(line) for line in (student.parent / name / stage / "log.jsonl").read_text().splitlines()]
                for name in ("ddp", "single")]
        assert [r["loss"] for r in logs[0]] == pytest.approx([r["loss"] for r in logs[1]], rel=1e-5)
    a = _weights(student.parent / "ddp" / "kl" / "checkpoint")
    b = _weights(Path(single["checkpoint"]))
    assert all(torch.allclose(a[k], b[k], atol=1e-5, rtol=1e-4) for k in a)


def test_heal_json_keeps_model_names_and_resolves_folders(tmp_path, monkeypatch):
    """--resume reloads what heal.json recorded: a named model (smollm2-135m) must stay a name."""
    from kvlab.heal.driver import _where

    (tmp_path / "student").mkdir()
    monkeypatch.chdir(tmp_path)
    assert _where("smollm2-135m") == "smollm2-135m"
    assert _where("student") == str((tmp_path / "student").resolve())
