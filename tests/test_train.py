"""``kvlab train``: bit-exact resume, one-line refusals of bad inputs, the recall task, and DDP under
torchrun matching single-process training."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from kvlab import ModelConfig
from kvlab.cli import main
from kvlab.errors import KvlabError
from kvlab.train.trainer import TrainConfig, Trainer, lr_factor

CONFIG = {"vocab_size": 64, "d_model": 32, "n_layers": 2, "mlp_hidden": 64, "max_seq_len": 256,
          "layers": {"repeat": {"type": "full", "n_heads": 4, "n_kv_heads": 2}}}
TEXT = "".join(f"def f{i}(x):\n    return x * {i} + {i % 7}\n\n" for i in range(400))


def _ids(n: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 64, n).astype(np.int32)


def _trainer(out, resume=False, force=False, **overrides) -> Trainer:
    cfg = TrainConfig(**{"steps": 6, "batch": 4, "seq": 16, "warmup": 2, "grad_accum": 2, "eval_every": 3,
                         "eval_batches": 1, "save_every": 100, "lr": 1e-2, **overrides})
    return Trainer(ModelConfig.from_dict(CONFIG), cfg, out, _ids(3000, 0), _ids(500, 1), resume=resume,
                   force=force, progress=False)


def _weights(folder: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(folder / "checkpoint" / "model.safetensors"))


def test_lr_schedule_warms_up_then_decays_to_floor():
    cfg = TrainConfig(steps=100, warmup=10, min_lr_ratio=0.1)
    assert lr_factor(0, cfg) == pytest.approx(0.1) and lr_factor(9, cfg) == pytest.approx(1.0)
    assert lr_factor(10, cfg) == pytest.approx(1.0) and lr_factor(100, cfg) == pytest.approx(0.1)
    assert lr_factor(40, cfg) > lr_factor(60, cfg)


def test_resume_is_bit_exact(tmp_path):
    whole = _trainer(tmp_path / "whole")
    last = whole.run()
    assert last["step"] == 6 and "val_loss" in last and last["tok_s"] > 0
    part = _trainer(tmp_path / "part")
    part.run(stop_after=3)
    assert part.step == 3
    resumed = _trainer(tmp_path / "part", resume=True)
    assert resumed.step == 3 and resumed.train_data.step == 3 * 2  # grad_accum micro-batches drawn
    resumed.run()
    a, b = _weights(tmp_path / "whole"), _weights(tmp_path / "part")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    log = [json.loads(line) for line in (tmp_path / "part" / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == [1, 2, 3, 4, 5, 6]
    assert not (tmp_path / "part" / ".checkpoint.tmp").exists()
    import kvlab

    assert kvlab.load(tmp_path / "part" / "checkpoint").config.n_layers == 2  # a plain kvlab checkpoint


def test_refuses_existing_run_folder_and_bad_settings(tmp_path):
    _trainer(tmp_path / "run").run(stop_after=1)
    with pytest.raises(KvlabError, match="--force"):
        _trainer(tmp_path / "run")
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("keep me")
    with pytest.raises(KvlabError, match="not a kvlab run folder"):
        _trainer(tmp_path / "other", force=True)
    assert (tmp_path / "other" / "notes.txt").exists()
    with pytest.raises(KvlabError, match="no checkpoint"):
        _trainer(tmp_path / "nothing", resume=True)
    with pytest.raises(KvlabError, match="train.batch"):
        _trainer(tmp_path / "x", batch=0)
    with pytest.raises(KvlabError, match="GiB"):
        _trainer(tmp_path / "x", batch=10_000_000, seq=256)
    with pytest.raises(KvlabError, match="'gpu0' is not a torch device"):
        _trainer(tmp_path / "x", device="gpu0")
    if not torch.cuda.is_available():
        with pytest.raises(KvlabError, match="no usable CUDA device"):
            _trainer(tmp_path / "x", device="cuda")
    assert not (tmp_path / "x").exists()


def _cli(capsys, *argv) -> tuple[int, str]:
    code = main(["train", "--no-progress", *map(str, argv)])
    return code, capsys.readouterr().err


def test_cli_trains_resumes_and_refuses_in_one_line(tmp_path, capsys):
    cfg = tmp_path / "cfg.json"
    cfg.write_text(json.dumps(CONFIG))  # vocab 64 is replaced by the byte tokenizer's 256
    corpus = tmp_path / "corpus.txt"
    corpus.write_text(TEXT)
    out = tmp_path / "run"
    args = ["--config", cfg, "--corpus", corpus, "--out", out, "--steps", 4, "--batch", 2, "--seq", 32,
            "--eval-every", 2, "--eval-batches", 1]
    code, err = _cli(capsys, *args, "--stop-after", 2)
    assert code == 0 and "step 2/4" in err
    code, err = _cli(capsys, *args)
    assert code == 2 and "--force" in err and len(err.strip().splitlines()) == 1
    code, err = _cli(capsys, "--out", out, "--resume")
    assert code == 0 and "step 4/4" in err
    code, err = _cli(capsys, *[tmp_path / "whole" if a == out else a for a in args])  # uninterrupted
    a, b = _weights(out), _weights(tmp_path / "whole")
    assert code == 0 and all(torch.equal(a[k], b[k]) for k in a)
    assert json.loads((out / "checkpoint" / "config.json").read_text())["vocab_size"] == 256
    (tmp_path / "empty").mkdir()
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({**CONFIG, "d_model": -1}))
    for extra, message in [(["--corpus", tmp_path / "missing.txt"], "no such corpus"),
                           (["--corpus", tmp_path / "empty"], "no text"),
                           (["--config", bad], "d_model"),
                           (["--batch", 10_000_000, "--seq", 256], "GiB")]:
        code, err = _cli(capsys, *args, "--force", *extra)
        assert code == 2 and message in err and len(err.strip().splitlines()) == 1, (extra, err)
        assert (out / "checkpoint" / "model.safetensors").exists()  # a refused --force run deletes nothing


def test_recall_task_trains_and_reports_accuracy(tmp_path):
    trainer = Trainer(ModelConfig.from_dict(CONFIG),
                      TrainConfig(task="recall", steps=3, batch=4, seq=24, recall_pairs=3, warmup=1,
                                  eval_every=3, eval_batches=1), tmp_path / "r", progress=False)
    last = trainer.run()
    assert 0.0 <= last["recall_acc"] <= 1.0 and np.isfinite(last["val_loss"])


def _torchrun_available() -> bool:
    import torch.distributed as dist

    return dist.is_available() and dist.is_gloo_available()


_DDP_SCRIPT = """
import sys
import torch
import torch.distributed as dist
torch.set_num_threads(1)
sys.path.insert(0, sys.argv[2])
from test_train import _trainer
trainer = _trainer(sys.argv[1], steps=3, grad_accum=2, eval_every=100)
trainer.run()
torch.save(trainer.model.state_dict(), f"{sys.argv[1]}-rank{trainer.rank}.pt")
dist.destroy_process_group()
"""


@pytest.mark.slow
@pytest.mark.skipif(not _torchrun_available(), reason="torch.distributed / gloo not available")
def test_ddp_two_processes_match_single_process(tmp_path):
    """2 ranks x half the global batch == 1 process x the whole batch: same losses, same weights."""
    script = tmp_path / "ddp.py"
    script.write_text(_DDP_SCRIPT)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join(sys.path)}
    run = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(script),
                          str(tmp_path / "ddp"), str(Path(__file__).parent)], env=env, capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr[-2000:]
    ranks = [torch.load(tmp_path / f"ddp-rank{r}.pt") for r in range(2)]
    assert all(torch.equal(ranks[0][k], ranks[1][k]) for k in ranks[0])  # identical weights on both ranks
    single = _trainer(tmp_path / "single", steps=3, grad_accum=2, eval_every=100)
    single.run()
    ddp_log = [json.loads(line) for line in (tmp_path / "ddp" / "log.jsonl").read_text().splitlines()]
    single_log = [json.loads(line) for line in (tmp_path / "single" / "log.jsonl").read_text().splitlines()]
    assert [r["loss"] for r in ddp_log] == pytest.approx([r["loss"] for r in single_log], rel=1e-5)
    a, b = _weights(tmp_path / "ddp"), _weights(tmp_path / "single")
    assert all(torch.allclose(a[k], b[k], atol=1e-5, rtol=1e-4) for k in a)


def test_cli_bpe_tokenizer_is_saved_with_the_checkpoint(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("KVLAB_CACHE", str(tmp_path / "cache"))
    (tmp_path / "cfg.json").write_text(json.dumps(CONFIG))
    (tmp_path / "corpus.txt").write_text(TEXT)
    code, err = _cli(capsys, "--config", tmp_path / "cfg.json", "--corpus", tmp_path / "corpus.txt", "--out",
                     tmp_path / "run", "--tokenizer", "bpe", "--vocab", 300, "--steps", 2, "--batch", 2,
                     "--seq", 16, "--eval-batches", 1)
    assert code == 0, err
    checkpoint = tmp_path / "run" / "checkpoint"
    from kvlab.tokenizer import load_tokenizer

    tokenizer = load_tokenizer(checkpoint)
    assert tokenizer.vocab_size == json.loads((checkpoint / "config.json").read_text())["vocab_size"] <= 300
    assert tokenizer.decode(tokenizer.encode("return x * 3")) == "return x * 3"
    assert len(list((tmp_path / "cache" / "tokenizers").iterdir())) == 1
