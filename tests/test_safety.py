"""Targeted checks of the safety mechanisms behind the hostile table: the manifest (``--force`` removes
kvlab's files only), pickle-free trainer state, the non-finite-loss stop, the safe readers' refusals, and
the Python API's own exceptions."""

from __future__ import annotations

import json
import os
import struct
import time

import numpy as np
import pytest
import torch

import kvlab
from kvlab import safe_io
from kvlab.errors import InputError, InputTypeError, KvlabError
from kvlab.outputs import MANIFEST, prepare_output_dir, record_output
from kvlab.train.trainer import TrainConfig, Trainer

CONFIG = {"vocab_size": 64, "d_model": 32, "n_layers": 2, "mlp_hidden": 64, "max_seq_len": 64,
          "layers": {"repeat": {"type": "full", "n_heads": 4, "n_kv_heads": 2}}}


def _trainer(out, force=False, resume=False, **over) -> Trainer:
    cfg = TrainConfig(**{"steps": 4, "batch": 2, "seq": 16, "warmup": 1, "eval_every": 2, "eval_batches": 1,
                         "save_every": 2, **over})
    ids = np.random.default_rng(0).integers(0, 64, 2000).astype(np.int32)
    return Trainer(kvlab.ModelConfig.from_dict(CONFIG), cfg, out, ids[:1500], ids[1500:], force=force,
                   resume=resume, progress=False)


def test_force_removes_only_the_files_kvlab_wrote(tmp_path):
    out = tmp_path / "run"
    _trainer(out).run(stop_after=2)
    assert json.loads((out / MANIFEST).read_text())["kvlab"] == "outputs"
    (out / "notes.txt").write_text("mine")
    (out / "checkpoint" / "mine.bin").write_text("mine too")
    (out / "extra").mkdir()
    (out / "extra" / "data.csv").write_text("1,2")
    trainer = _trainer(out, force=True)
    trainer.run()
    assert (out / "notes.txt").read_text() == "mine" and (out / "extra" / "data.csv").exists()
    assert (out / "checkpoint" / "mine.bin").read_text() == "mine too"  # carried across checkpoint swaps too
    assert kvlab.load(out / "checkpoint").config.n_layers == 2


def test_a_forged_manifest_cannot_reach_outside_its_folder(tmp_path):
    (tmp_path / "victim.txt").write_text("keep")
    out = tmp_path / "run"
    out.mkdir()
    (out / "x").write_text("x")
    (out / MANIFEST).write_text(json.dumps({"kvlab": "outputs", "files": ["../victim.txt"]}))
    with pytest.raises(KvlabError, match="outside"):
        prepare_output_dir(out, force=True)
    assert (tmp_path / "victim.txt").exists() and (out / "x").exists()
    os.symlink(tmp_path, out / "link")
    (out / MANIFEST).write_text(json.dumps({"kvlab": "outputs", "files": ["link/victim.txt", "x"]}))
    prepare_output_dir(out, force=True)  # a symlinked sub-folder is not reached through
    assert (tmp_path / "victim.txt").exists() and not (out / "x").exists()
    record_output(out, "model.safetensors")
    assert "model.safetensors" in json.loads((out / MANIFEST).read_text())["files"]


def test_trainer_state_is_safetensors_and_json_and_never_a_pickle(tmp_path):
    _trainer(tmp_path / "run").run(stop_after=2)
    folder = tmp_path / "run" / "checkpoint"
    assert not (folder / "trainer.pt").exists()
    state = json.loads((folder / "trainer_state.json").read_text())
    assert state["step"] == 2 and safe_io.safetensors_header(folder / "trainer_state.safetensors")
    (folder / "trainer_state.json").unlink()
    (folder / "trainer.pt").write_bytes(b"\x80\x04K\x01.")  # an old-format run folder
    with pytest.raises(KvlabError, match="never unpickles"):
        _trainer(tmp_path / "run", resume=True)


def test_non_finite_loss_stops_the_run_and_keeps_the_last_good_checkpoint(tmp_path):
    trainer = _trainer(tmp_path / "run", steps=6, save_every=1)
    trainer.run(stop_after=2)
    saved = safe_io.read_safetensors(tmp_path / "run" / "checkpoint" / "model.safetensors")
    with torch.no_grad():
        trainer.model.norm.weight.fill_(float("nan"))
    with pytest.raises(KvlabError, match=r"step 3: loss is nan; training stopped \(the last good checkpoint \(step 2\)"):
        trainer.run()
    kept = safe_io.read_safetensors(tmp_path / "run" / "checkpoint" / "model.safetensors")
    assert all(torch.equal(saved[k], kept[k]) for k in saved)


def test_safetensors_header_is_checked_before_reading(tmp_path):
    path = tmp_path / "w.safetensors"
    header = json.dumps({"a": {"dtype": "F32", "shape": [1000], "data_offsets": [0, 4000]}}).encode()
    path.write_bytes(struct.pack("<Q", len(header)) + header + b"\0" * 16)
    with pytest.raises(KvlabError, match="outside the file"):
        safe_io.read_safetensors(path)
    path.write_bytes(struct.pack("<Q", 2**40) + b"{}")
    with pytest.raises(KvlabError, match="header claims"):
        safe_io.read_safetensors(path)
    fifo = tmp_path / "fifo.safetensors"
    os.mkfifo(fifo)
    with pytest.raises(KvlabError, match="not a regular file"):
        safe_io.read_safetensors(fifo)  # refused without opening: no hang


def test_index_names_stay_inside_the_folder(tmp_path):
    for name in ("../x.safetensors", "/etc/passwd", "a/../../x"):
        (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"w": name}}))
        with pytest.raises(KvlabError, match="outside"):
            safe_io.weight_files(tmp_path)


def test_yaml_alias_bomb_and_nan_json_are_refused_fast(tmp_path):
    levels = "a: &a [x, x, x, x, x, x, x, x, x]\n" + "".join(
        f"{chr(98 + i)}: &{chr(98 + i)} [{', '.join(['*' + chr(97 + i)] * 9)}]\n" for i in range(12))
    (tmp_path / "bomb.yaml").write_text(levels)
    started = time.perf_counter()
    with pytest.raises(KvlabError, match="expand"):
        safe_io.read_config(tmp_path / "bomb.yaml")
    assert time.perf_counter() - started < 5
    (tmp_path / "nan.json").write_text('{"norm_eps": NaN}')
    with pytest.raises(KvlabError, match="NaN is not a number"):
        safe_io.read_config(tmp_path / "nan.json")


def test_python_api_raises_kvlab_value_and_type_errors():
    model = kvlab.Model(kvlab.ModelConfig.from_dict(dict(CONFIG))).eval()
    cases = [(InputTypeError, lambda: model(torch.tensor([[1.5, 2.0]]))),
             (InputError, lambda: model(torch.zeros(1, 2, 3, dtype=torch.long))),
             (InputError, lambda: model(torch.tensor([[1, 64]]))),
             (InputError, lambda: model(torch.tensor([[63]]), cache=kvlab.Model(kvlab.ModelConfig.from_dict(
                 {**CONFIG, "layers": {"repeat": {"type": "full", "n_heads": 2}}})).new_cache(1))),
             (InputError, lambda: model.generate([[1, 2]], 2, temperature=float("nan"))),
             (InputError, lambda: model.generate([[1, 2]], 2, temperature=1.0, top_p=-0.5)),
             (InputError, lambda: model.generate([[1, 2]], 2, temperature=1.0, top_k=-1)),
             (InputTypeError, lambda: model.generate([[1.5, 2]], 2)),
             (InputError, lambda: model.generate([[1] * 60], 10))]
    for kind, call in cases:
        with pytest.raises(kind) as info:
            call()
        assert isinstance(info.value, (ValueError, TypeError)) and len(str(info.value).splitlines()) == 1


def test_config_types_are_checked_field_by_field():
    base = dict(CONFIG)
    for change, field in [({"tie_embeddings": "false"}, "tie_embeddings"), ({"norm_eps": float("nan")}, "norm_eps"),
                          ({"layers": {"repeat": {"type": "full", "n_heads": 4, "qkv_bias": "false"}}}, "qkv_bias"),
                          ({"layers": {"pattern": []}}, "layers.pattern"), ({"n_layers": 2.5}, "n_layers"),
                          ({"rope": "x"}, "rope"), ({"vocab_size": 10**13}, "vocab_size x d_model")]:
        with pytest.raises(KvlabError, match=field.replace(".", r"\.")):
            kvlab.ModelConfig.from_dict({**base, **change})
