"""A new user's hostile and careless inputs across every CLI verb and the Python API, each run in a forked
child (bounded memory and time). Prints one line per broken promise and a count:

    PYTHONPATH=src python tests/hostile_probe.py [-k SUBSTRING]

A case breaks the promise when: a user error does not give exit 2 and exactly one stderr line, a traceback
appears, it hangs, a marker file from a planted pickle appears, a file outside the output changes or
disappears, or a reported number is NaN. ``tests/test_hostile.py`` runs the same table under pytest.
"""

from __future__ import annotations

import io
import json
import os
import pickle
import resource
import signal
import sys
import tempfile
import time
from pathlib import Path

import torch

torch.set_num_threads(1)

TINY = {"vocab_size": 256, "d_model": 32, "n_layers": 2, "mlp_hidden": 64, "max_seq_len": 128,
        "layers": {"repeat": {"type": "full", "n_heads": 4, "n_kv_heads": 2}}}
HF = dict(model_type="llama", vocab_size=256, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
          num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)


class Boom:
    """Unpickling this writes the marker file: proof that code ran."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (eval, (f"open({self.marker!r}, 'w').write('pwned')",))


def evil_pickle(marker: Path) -> bytes:
    return pickle.dumps({"step": 1, "x": Boom(str(marker))})


def write_torch_pickle(path: Path, marker: Path) -> None:
    """A torch.save zip whose data.pkl runs code on ``torch.load(weights_only=False)``."""
    buffer = io.BytesIO()
    torch.save({"step": 1}, buffer)
    import zipfile

    src = zipfile.ZipFile(io.BytesIO(buffer.getvalue()))
    with zipfile.ZipFile(path, "w") as dst:
        for item in src.infolist():
            data = src.read(item)
            if item.filename.endswith("data.pkl"):
                data = evil_pickle(marker)
            dst.writestr(item, data)


def cfg(root: Path, name: str, data, suffix: str = ".json") -> str:
    path = root / "cfgs" / f"{name}{suffix}"
    path.parent.mkdir(exist_ok=True, parents=True)
    path.write_text(data if isinstance(data, str) else json.dumps(data))
    return str(path)


def tiny(**over) -> dict:
    return {**TINY, **over}


def rep(**layer) -> dict:
    return {"repeat": {"type": "full", "n_heads": 4, "n_kv_heads": 2, **layer}}


def build_fixtures(root: Path) -> dict:
    """A kvlab checkpoint, a trained run folder, an HF checkpoint and variants of each."""
    import matplotlib
    from safetensors.torch import save_file

    import kvlab
    from kvlab.train.trainer import TrainConfig, Trainer

    matplotlib.use("Agg")
    import matplotlib.pyplot  # noqa: F401 - imported once here, not in every forked case
    import tokenizers  # noqa: F401

    from kvlab.cli import build_parser

    build_parser()  # imports every command module before the forks
    fx: dict = {"root": root, "marker": root / "MARKER"}
    torch.manual_seed(0)
    model = kvlab.Model(kvlab.ModelConfig.from_dict(dict(TINY)))
    ck = root / "ckpt"
    model.save(ck)
    fx["ckpt"] = ck
    (root / "corpus.txt").write_text("".join(f"def f{i}(x):\n    return x * {i}\n\n" for i in range(300)))
    import numpy as np

    ids = np.frombuffer((root / "corpus.txt").read_bytes(), dtype=np.uint8).astype(np.int32)
    run = root / "run"
    Trainer(kvlab.ModelConfig.from_dict(dict(TINY)), TrainConfig(steps=4, batch=2, seq=16, warmup=1,
            eval_every=2, eval_batches=1, save_every=2), run, ids[:3000], ids[3000:], progress=False,
            meta={"config": "x", "corpus": str(root / "corpus.txt"), "tokenizer": "byte", "vocab": 8192,
                  "max_chars": None}).run(stop_after=2)
    fx["run"] = run
    hf = root / "hf"
    hf.mkdir()
    (hf / "config.json").write_text(json.dumps(HF))
    state = {("model." + k if not k.startswith("lm_head") else k): v.contiguous()
             for k, v in model.state_dict().items()}
    save_file(state, str(hf / "model.safetensors"))
    fx["hf"] = hf
    (root / "cfgs").mkdir()
    return fx


def variant_ckpt(fx: dict, name: str, edit) -> str:
    """A copy of the kvlab checkpoint with ``edit(folder)`` applied."""
    import shutil

    folder = fx["root"] / "variants" / name
    shutil.copytree(fx["ckpt"], folder)
    edit(folder)
    return str(folder)


def variant_hf(fx: dict, name: str, edit) -> str:
    import shutil

    folder = fx["root"] / "hfvariants" / name
    shutil.copytree(fx["hf"], folder)
    edit(folder)
    return str(folder)


def variant_run(fx: dict, name: str, edit) -> str:
    import shutil

    folder = fx["root"] / "runs" / name
    shutil.copytree(fx["run"], folder)
    edit(folder)
    return str(folder)


def _fifo(path: Path) -> None:
    path.unlink(missing_ok=True)
    os.mkfifo(path)


def _wrong_dtype(folder: Path) -> None:
    from safetensors.torch import load_file, save_file

    state = load_file(str(folder / "model.safetensors"))
    state = {k: v.to(torch.int32) if "embed" in k else v for k, v in state.items()}
    save_file(state, str(folder / "model.safetensors"))


def _huge_header(folder: Path) -> None:
    import struct

    (folder / "model.safetensors").write_bytes(struct.pack("<Q", 2**40) + b"{" + b" " * 16)


def _forged_offsets(folder: Path) -> None:
    """A header whose first tensor claims bytes past the end of the file."""
    import struct

    data = (folder / "model.safetensors").read_bytes()
    n = struct.unpack("<Q", data[:8])[0]
    header = json.loads(data[8:8 + n])
    name = next(k for k in header if k != "__metadata__")
    header[name]["data_offsets"] = [0, 10**12]
    raw = json.dumps(header).encode()
    (folder / "model.safetensors").write_bytes(struct.pack("<Q", len(raw)) + raw + data[8 + n:])


def _nan_weights(folder: Path) -> None:
    from safetensors.torch import load_file, save_file

    state = load_file(str(folder / "model.safetensors"))
    state["norm.weight"] = torch.full_like(state["norm.weight"], float("nan"))
    save_file(state, str(folder / "model.safetensors"))


def _index(folder: Path, target: str) -> None:
    (folder / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"lm_head.weight": target}}))


def _thesis(root: Path, name: str, with_file: str) -> str:
    folder = root / "user" / name
    folder.mkdir(parents=True)
    (folder / "thesis.tex").write_text("years of work")
    if with_file == "checkpoint":
        (folder / "checkpoint").mkdir()
        (folder / "checkpoint" / "mine.bin").write_text("mine")
    else:
        (folder / with_file).write_text("{}")
    return str(folder)


ALIAS_BOMB = "a: &a [x, x, x, x, x, x, x, x, x]\n" + "".join(
    f"{chr(98 + i)}: &{chr(98 + i)} [*{chr(97 + i)}, *{chr(97 + i)}, *{chr(97 + i)}, *{chr(97 + i)}, "
    f"*{chr(97 + i)}, *{chr(97 + i)}, *{chr(97 + i)}, *{chr(97 + i)}, *{chr(97 + i)}]\n" for i in range(9)) + \
    "vocab_size: *j\n"


def cases(fx: dict) -> list[tuple[str, object, str]]:
    """(name, argv list or zero-argument callable, expectation: 'err' | 'ok' | 'raise')."""
    r, ck, marker = fx["root"], str(fx["ckpt"]), fx["marker"]
    good = cfg(r, "good", TINY)
    out = str(r / "outs")
    C = []

    def bad_cfg(name, data, suffix=".json"):
        path = cfg(r, name, data, suffix)
        C.append((f"plan-cfg-{name}", ["plan", path], "err"))
        C.append((f"api-cfg-{name}", lambda p=path: __import__("kvlab").ModelConfig.load(p), "raise"))

    # ---- configs (plan + ModelConfig.load) ----
    bad_cfg("pattern-empty", tiny(layers={"pattern": []}))
    bad_cfg("repeat-float-n", tiny(n_layers=2.5))
    bad_cfg("repeat-str-n", tiny(n_layers="2"))
    bad_cfg("repeat-not-object", tiny(layers={"repeat": 3}))
    bad_cfg("pattern-not-list", tiny(layers={"pattern": 3}))
    bad_cfg("rope-str", tiny(rope="x"))
    bad_cfg("norm-eps-nan", '{"vocab_size":256,"d_model":32,"n_layers":1,"mlp_hidden":64,"norm_eps":NaN,'
            '"layers":[{"type":"full","n_heads":4}]}')
    bad_cfg("theta-inf", tiny(rope={"theta": float("inf")}))
    bad_cfg("embed-scale-nan", '{"vocab_size":256,"d_model":32,"n_layers":1,"mlp_hidden":64,'
            '"embed_scale":NaN,"layers":[{"type":"full","n_heads":4}]}')
    bad_cfg("softcap-nan", '{"vocab_size":256,"d_model":32,"n_layers":1,"mlp_hidden":64,'
            '"logit_softcap":NaN,"layers":[{"type":"full","n_heads":4}]}')
    bad_cfg("softcap-neg", tiny(logit_softcap=-1.0))
    bad_cfg("tie-str", tiny(tie_embeddings="false"))
    bad_cfg("qkv-bias-str", tiny(layers=rep(qkv_bias="false")))
    bad_cfg("o-bias-int", tiny(layers=rep(o_bias=1)))
    bad_cfg("kv-from-false", tiny(layers=[{"type": "full", "n_heads": 4}, {"type": "full", "n_heads": 4,
                                                                          "kv_from": False}]))
    bad_cfg("int4-odd-head", tiny(d_model=30, layers=rep(n_heads=2, n_kv_heads=2, kv_quant="int4")))
    bad_cfg("vocab-huge", tiny(vocab_size=10**30))
    bad_cfg("dmodel-huge", tiny(d_model=2**40, layers=rep(n_heads=2**20, n_kv_heads=2**20)))
    bad_cfg("n-layers-huge", tiny(n_layers=10**9))
    bad_cfg("n-layers-zero", tiny(n_layers=0))
    bad_cfg("n-heads-bool", tiny(layers=rep(n_heads=True, n_kv_heads=None)))
    bad_cfg("max-seq-float", tiny(max_seq_len=1e30))
    bad_cfg("layers-str", tiny(layers="abc"))
    bad_cfg("layers-ints", tiny(n_layers=2, layers=[1, 2]))
    bad_cfg("sharing-every-0", tiny(kv_sharing={"every": 0}, layers=[{"type": "full", "n_heads": 4}] * 2))
    bad_cfg("sharing-every-true", tiny(kv_sharing={"every": True}, layers=[{"type": "full", "n_heads": 4}] * 2))
    bad_cfg("mlp-act-int", tiny(mlp_act=5))
    bad_cfg("name-int", tiny(name=5))
    bad_cfg("dtype-int", tiny(dtype=5))
    bad_cfg("extras-str", tiny(extras="x"))
    bad_cfg("hc-str", tiny(hyper_connections="x"))
    bad_cfg("ple-str", tiny(per_layer_embeddings="x"))
    bad_cfg("kvquant-group-str", tiny(layers=rep(kv_quant="int8", kv_quant_group="32")))
    bad_cfg("kvquant-resid-float", tiny(layers=rep(kv_quant="int8", kv_quant_residual=2.5)))
    bad_cfg("softmax-scale-nan", '{"vocab_size":256,"d_model":32,"n_layers":1,"mlp_hidden":64,'
            '"layers":[{"type":"full","n_heads":4,"softmax_scale":NaN}]}')
    bad_cfg("rope-partial-str", tiny(rope={"partial": "half"}))
    bad_cfg("rope-interleaved-str", tiny(rope={"interleaved": "yes"}))
    bad_cfg("rope-maxpos-neg", tiny(rope={"max_position": -4}))
    bad_cfg("yaml-alias-bomb", ALIAS_BOMB, ".yaml")
    bad_cfg("yaml-python-tag", "vocab_size: !!python/object/apply:os.system ['touch " + str(marker) + "']\n",
            ".yaml")
    bad_cfg("hf-heads-0", {**HF, "num_attention_heads": 0})
    bad_cfg("hf-layer-types-unknown", {**HF, "layer_types": ["full_attention", "linear_attention"]})
    bad_cfg("hf-layer-types-short", {**HF, "layer_types": ["full_attention"]})
    bad_cfg("hf-eps-str", {**HF, "rms_norm_eps": "1e-6"})
    bad_cfg("hf-tie-str", {**HF, "tie_word_embeddings": "false"})
    bad_cfg("hf-theta-neg", {**HF, "rope_theta": -1})
    fifo_dir = r / "fifo_cfg"
    fifo_dir.mkdir()
    _fifo(fifo_dir / "config.json")
    C.append(("plan-fifo-config", ["plan", str(fifo_dir)], "err"))
    C.append(("plan-dir-config", ["plan", str(r / "cfgs" / "x.json")], "err"))
    (r / "cfgs" / "dir.json").mkdir()
    C.append(("plan-config-is-dir", ["plan", str(r / "cfgs" / "dir.json")], "err"))

    # ---- plan arguments ----
    for name, extra in [("context-comma", ["--context", ","]), ("context-0", ["--context", "0"]),
                        ("context-neg", ["--context", "-5"]), ("budget-1e400", ["--budget", "1e400"]),
                        ("budget-nan", ["--budget", "nan"]), ("budget-0", ["--budget", "0"]),
                        ("batch-0", ["--batch", "0"]), ("batch-neg", ["--batch", "-1"]),
                        ("batch-str", ["--batch", "abc"]), ("dtype-bad", ["--dtype", "int3"]),
                        ("context-huge", ["--context", "99999999999999999999M"]), ("unknown-flag", ["--bogus"])]:
        C.append((f"plan-{name}", ["plan", good, *extra], "err"))
    C.append(("plan-preset-traversal", ["plan", "--preset", "../../etc/passwd"], "err"))
    C.append(("plan-ok", ["plan", good, "--context", "64"], "ok"))

    # ---- train ----
    tr = ["train", "--no-progress", "--config", good, "--corpus", str(r / "corpus.txt"), "--steps", "2",
          "--batch", "2", "--seq", "16", "--eval-batches", "1"]
    for name, extra in [("lr-nan", ["--lr", "nan"]), ("lr-inf", ["--lr", "inf"]), ("wd-nan", ["--weight-decay", "nan"]),
                        ("clip-nan", ["--clip", "nan"]), ("steps-0", ["--steps", "0"]), ("steps-str", ["--steps", "x"]),
                        ("batch-neg", ["--batch", "-1"]), ("max-chars-neg", ["--max-chars", "-1"]),
                        ("warmup-neg", ["--warmup", "-1"]), ("stop-after-0", ["--stop-after", "0"]),
                        ("stop-after-neg", ["--stop-after", "-3"]), ("recall-alphabet-0", ["--task", "recall",
                                                                                           "--recall-alphabet", "0"]),
                        ("device-cuda99", ["--device", "cuda:99"]), ("seed-huge", ["--seed", str(2**70)]),
                        ("seed-neg", ["--seed", "-1"]), ("wd-neg", ["--weight-decay", "-1"]),
                        ("vocab-0-bpe", ["--tokenizer", "bpe", "--vocab", "0"]),
                        ("lr-huge-nonfinite", ["--lr", "1e30", "--steps", "3", "--save-every", "1"])]:
        C.append((f"train-{name}", [*tr, "--out", f"{out}/train-{name}", *extra], "err"))
    C.append(("train-cfg-eps-nan", ["train", "--no-progress", "--config", cfg(r, "eps-nan-train",
              '{"vocab_size":256,"d_model":32,"n_layers":1,"mlp_hidden":64,"norm_eps":NaN,'
              '"layers":[{"type":"full","n_heads":4}]}'), "--corpus", str(r / "corpus.txt"), "--steps", "2",
              "--batch", "2", "--seq", "16", "--out", f"{out}/eps"], "err"))
    C.append(("train-force-foreign-checkpoint", [*tr, "--out", _thesis(r, "a", "checkpoint"), "--force"], "err"))
    C.append(("train-force-foreign-train-config", [*tr, "--out", _thesis(r, "b", "train_config.json"), "--force"],
              "err"))
    C.append(("train-out-is-file", [*tr, "--out", str(r / "corpus.txt")], "err"))
    C.append(("train-out-is-file-force", [*tr, "--out", str(r / "corpus.txt"), "--force"], "err"))
    def legacy(f):  # a run folder as an older kvlab wrote it, with its trainer.pt replaced by an attacker's
        for name in ("trainer_state.json", "trainer_state.safetensors"):
            (f / "checkpoint" / name).unlink(missing_ok=True)
        write_torch_pickle(f / "checkpoint" / "trainer.pt", marker)

    C.append(("train-resume-evil-pickle", ["train", "--no-progress", "--resume", "--out", variant_run(fx, "evil", legacy)],
              "err"))
    for name, content in [("empty", b""), ("truncated", b"PK\x03\x04garbage")]:
        def edit(f, content=content):
            for p in (f / "checkpoint").iterdir():
                if p.name.startswith("trainer"):
                    p.write_bytes(content)
        C.append((f"train-resume-{name}-state", ["train", "--no-progress", "--resume", "--out",
                                                   variant_run(fx, name, edit)], "err"))
    for name in ("trainer_state.json", "trainer_state.safetensors", "model.safetensors", "config.json",
                 "tokenizer.json"):
        C.append((f"train-resume-pickle-{name}", ["train", "--no-progress", "--resume", "--out", variant_run(
            fx, "p" + name, lambda f, n=name: (f / "checkpoint" / n).write_bytes(evil_pickle(marker)))], "err"))
    C.append(("train-resume-pickle-train-config", ["train", "--no-progress", "--resume", "--out", variant_run(
        fx, "ptc", lambda f: (f / "train_config.json").write_bytes(evil_pickle(marker)))], "err"))
    C.append(("train-resume-fifo-state", ["train", "--no-progress", "--resume", "--out", variant_run(
        fx, "fst", lambda f: _fifo(f / "checkpoint" / "trainer_state.json"))], "err"))
    C.append(("train-resume-forged-state", ["train", "--no-progress", "--resume", "--out", variant_run(
        fx, "fgs", lambda f: (f / "checkpoint" / "trainer_state.json").write_text(
            '{"step": 1, "optimizer": {"__tensor__": "nope"}}'))], "err"))
    C.append(("train-resume-and-force", ["train", "--no-progress", "--resume", "--force", "--out",
                                         variant_run(fx, "rf", lambda f: None)], "err"))
    forged = _thesis(r, "forged", "notes.txt")
    (Path(forged) / ".kvlab-manifest.json").write_text(json.dumps({"kvlab": "outputs", "files": [
        "../../corpus.txt", str(r / "cfgs" / "good.json"), "thesis.tex/../../../corpus.txt"]}))
    C.append(("train-force-forged-manifest", [*tr, "--out", forged, "--force"], "err"))
    C.append(("train-resume-other-config", ["train", "--no-progress", "--resume", "--out", variant_run(fx, "rc", lambda f: None),
                                            "--config", cfg(r, "other", tiny(d_model=64))], "err"))
    C.append(("train-resume-other-corpus", ["train", "--no-progress", "--resume", "--out", variant_run(fx, "rk", lambda f: None),
                                            "--corpus", str(r / "cfgs" / "good.json")], "err"))
    C.append(("train-resume-bad-tokenizer", ["train", "--no-progress", "--resume", "--out", variant_run(
        fx, "rt", lambda f: (f / "checkpoint" / "tokenizer.json").write_text('{"model": 5}'))], "err"))
    C.append(("train-tokenizer-malformed", [*tr, "--out", f"{out}/tokbad", "--tokenizer",
                                            cfg(r, "tokenizer", '{"model": {"type": "BPE", "vocab": 3}}')], "err"))
    C.append(("train-tokenizer-fifo", [*tr, "--out", f"{out}/tokfifo", "--tokenizer", str(fifo_dir / "config.json")],
              "err"))

    # ---- eval ----
    ev = ["eval", ck, "--corpus", str(r / "corpus.txt"), "--windows", "2", "--seq", "16", "--context", "16"]
    for name, extra in [("seq-0", ["--seq", "0"]), ("seq-neg", ["--seq", "-1"]), ("windows-0", ["--windows", "0"]),
                        ("decode-neg", ["--decode-steps", "-1"]), ("decode-0", ["--decode-steps", "0"]),
                        ("context-0", ["--context", "0"]), ("context-comma", ["--context", ","]),
                        ("seq-beyond", ["--seq", "100000"]), ("context-beyond", ["--context", "1M"]),
                        ("recall-pairs-0", ["--recall-lengths", "32", "--recall-pairs", "0"]),
                        ("recall-len-1", ["--recall-lengths", "1"]), ("max-chars-neg", ["--max-chars", "-5"]),
                        ("out-exists", ["--out", str(r / "corpus.txt")]),
                        ("out-dir", ["--out", str(r)])]:
        C.append((f"eval-{name}", [*ev, *extra], "err"))
    C.append(("eval-ok", [*ev, "--json"], "ok"))

    # ---- broken checkpoints (generate and eval) ----
    broken = {
        "wrong-dtype": variant_ckpt(fx, "wd", _wrong_dtype),
        "truncated-weights": variant_ckpt(fx, "tw", lambda f: (f / "model.safetensors").write_bytes(
            (f / "model.safetensors").read_bytes()[:200])),
        "empty-weights": variant_ckpt(fx, "ew", lambda f: (f / "model.safetensors").write_bytes(b"")),
        "huge-header": variant_ckpt(fx, "hh", _huge_header),
        "fifo-weights": variant_ckpt(fx, "fw", lambda f: _fifo(f / "model.safetensors")),
        "pickle-weights": variant_ckpt(fx, "pw", lambda f: (f / "model.safetensors").write_bytes(evil_pickle(marker))),
        "pickle-config": variant_ckpt(fx, "pc", lambda f: (f / "config.json").write_bytes(evil_pickle(marker))),
        "pickle-tokenizer": variant_ckpt(fx, "pt", lambda f: (f / "tokenizer.json").write_bytes(evil_pickle(marker))),
        "bad-tokenizer": variant_ckpt(fx, "bt", lambda f: (f / "tokenizer.json").write_text('{"model": {}}')),
        "fifo-tokenizer": variant_ckpt(fx, "ft", lambda f: _fifo(f / "tokenizer.json")),
        "nan-weights": variant_ckpt(fx, "nw", _nan_weights),
        "no-weights": variant_ckpt(fx, "nw2", lambda f: (f / "model.safetensors").unlink()),
        "hf-index-traversal": variant_hf(fx, "it", lambda f: _index(f, "../../ckpt/model.safetensors")),
        "hf-index-absolute": variant_hf(fx, "ia", lambda f: _index(f, str(fx["ckpt"] / "model.safetensors"))),
        "hf-index-fifo": variant_hf(fx, "if", lambda f: (_fifo(f / "model.safetensors.index.json"))),
        "hf-index-bad": variant_hf(fx, "ib", lambda f: (f / "model.safetensors.index.json").write_text('{"x": 1}')),
        "hf-fifo-weights": variant_hf(fx, "fw", lambda f: _fifo(f / "model.safetensors")),
        "hf-pickle-weights": variant_hf(fx, "pw", lambda f: (f / "model.safetensors").write_bytes(evil_pickle(marker))),
        "hf-pickle-index": variant_hf(fx, "pi", lambda f: (f / "model.safetensors.index.json").write_bytes(
            evil_pickle(marker))),
        "hf-pickle-config": variant_hf(fx, "pc", lambda f: (f / "config.json").write_bytes(evil_pickle(marker))),
        "pickle-bin-weights": variant_hf(fx, "pb", lambda f: ((f / "model.safetensors").unlink(),
                                                               (f / "pytorch_model.bin").write_bytes(evil_pickle(marker)))),
        "hf-layer-types": variant_hf(fx, "lt", lambda f: (f / "config.json").write_text(json.dumps(
            {**HF, "layer_types": ["full_attention", "mamba"]}))),
        "forged-offsets": variant_ckpt(fx, "fo", _forged_offsets),
    }
    for name, folder in broken.items():
        C.append((f"generate-{name}", ["generate", folder, "--ids", "1,2", "--max-new-tokens", "2"], "err"))
    C.append(("eval-nan-weights", ["eval", broken["nan-weights"], "--corpus", str(r / "corpus.txt"), "--windows", "2",
                                   "--seq", "16", "--context", "16", "--json"], "err"))
    C.append(("eval-pickle-tokenizer", ["eval", broken["pickle-tokenizer"], "--corpus", str(r / "corpus.txt"),
                                        "--windows", "2", "--seq", "16", "--context", "16"], "err"))

    # ---- generate arguments ----
    gen = ["generate", ck, "--ids", "1,2,3"]
    for name, extra in [("max-new-huge", ["--max-new-tokens", "1000000000000"]), ("max-new-neg", ["--max-new-tokens", "-1"]),
                        ("temp-nan", ["--temperature", "nan"]), ("temp-neg", ["--temperature", "-1"]),
                        ("temp-inf", ["--temperature", "inf"]), ("top-p-neg", ["--temperature", "1", "--top-p", "-0.5"]),
                        ("top-p-nan", ["--temperature", "1", "--top-p", "nan"]), ("top-p-big", ["--top-p", "2"]),
                        ("top-k-neg", ["--temperature", "1", "--top-k", "-3"]), ("seed-neg", ["--seed", "-1"]),
                        ("seed-huge", ["--seed", str(2**80)]), ("stop-str", ["--stop", "x"]),
                        ("max-new-beyond", ["--max-new-tokens", "1000"])]:
        C.append((f"generate-{name}", [*gen, *extra], "err"))
    for name, ids in [("empty", ""), ("double-comma", "1,,2"), ("oov", "99999"), ("neg", "-1"), ("float", "1.5"),
                      ("huge", str(2**70))]:
        C.append((f"generate-ids-{name}", ["generate", ck, "--ids", ids], "err"))
    C.append(("generate-prompt-long", ["generate", ck, "--prompt", "x" * 500, "--max-new-tokens", "1"], "err"))
    C.append(("generate-prompt-surrogate", ["generate", ck, "--prompt", "a\udcff", "--max-new-tokens", "1"], "any"))
    C.append(("generate-no-prompt", ["generate", ck], "err"))
    C.append(("generate-missing", ["generate", str(r / "nope")], "err"))
    C.append(("generate-ok-0", ["generate", ck, "--ids", "1,2", "--max-new-tokens", "0"], "ok"))
    C.append(("generate-ok-1", ["generate", ck, "--ids", "1,2", "--max-new-tokens", "1"], "ok"))
    C.append(("generate-ok", ["generate", ck, "--prompt", "hi", "--max-new-tokens", "3"], "ok"))

    # ---- show-mask ----
    (r / "mymask.png").write_bytes(b"user's png")
    sm = ["show-mask", good]
    for name, extra in [("seq-huge", ["--seq", "100000"]), ("seq-0", ["--seq", "0"]), ("seq-neg", ["--seq", "-1"]),
                        ("out-noext-exists", ["--out", str(r / "mymask")]), ("out-txt", ["--out", str(r / "m.txt")]),
                        ("layer-neg", ["--layer", "-1"]), ("layer-big", ["--layer", "99"]),
                        ("out-nodir", ["--out", str(r / "no" / "dir" / "m.png")]), ("out-dir", ["--out", str(r)]),
                        ("seq-str", ["--seq", "abc"])]:
        C.append((f"show-mask-{name}", [*sm, *extra], "err"))
    C.append(("show-mask-no-source", ["show-mask"], "err"))
    C.append(("show-mask-ok", [*sm, "--out", str(r / "new_mask.png")], "ok"))

    # ---- demo ----
    for name, value in [("16", "16"), ("0", "0"), ("neg", "-1"), ("huge", str(10**9)), ("str", "x")]:
        C.append((f"demo-context-{name}", ["demo", "--context", value], "err"))

    # ---- compare ----
    cmp_out = str(r / "cmp")
    for name, extra in [("variants-unknown-type", ["--variants", cfg(r, "unk", tiny(layers=[{"type": "nope", "n_heads": 4}] * 2))]),
                        ("variants-bad", ["--variants", cfg(r, "pat", tiny(layers={"pattern": []}))]),
                        ("variants-empty", ["--variants", cfg(r, "empty", {})]),
                        ("variants-missing", ["--variants", str(r / "none.json")]),
                        ("variants-fifo", ["--variants", str(fifo_dir / "config.json")]),
                        ("variants-list", ["--variants", cfg(r, "lst", "[1, 2]")]),
                        ("variants-yaml-bomb", ["--variants", cfg(r, "bomb", ALIAS_BOMB, ".yaml")]),
                        ("contexts-0", ["--contexts", "0"]), ("contexts-comma", ["--contexts", ","]),
                        ("seeds-0", ["--seeds", "0"]), ("device-bad", ["--device", "gpu0"]),
                        ("workers-neg", ["--workers", "-2"]), ("corpus-missing", ["--corpus", str(r / "nope.txt")])]:
        C.append((f"compare-{name}", ["compare", "--quick", "--out", cmp_out + name, *extra], "err"))
    C.append(("compare-out-foreign", ["compare", "--quick", "--out", _thesis(r, "c", "notes.txt")], "err"))

    # ---- usage ----
    C.append(("no-command", [], "err"))
    C.append(("unknown-command", ["frobnicate"], "err"))

    # ---- Python API ----
    def api(fn):
        def call():
            import kvlab

            torch.manual_seed(0)
            model = kvlab.load(ck).eval()
            return fn(kvlab, model)
        return call

    other = tiny(layers=rep(n_heads=2, n_kv_heads=1))
    for name, fn in [
        ("float-ids", lambda k, m: m(torch.tensor([[1.5, 2.0]]))),
        ("3d-ids", lambda k, m: m(torch.zeros(1, 2, 3, dtype=torch.long))),
        ("1d-ids", lambda k, m: m(torch.zeros(3, dtype=torch.long))),
        ("oov-ids", lambda k, m: m(torch.tensor([[1, 999]]))),
        ("neg-ids", lambda k, m: m(torch.tensor([[-1, 2]]))),
        ("empty-ids", lambda k, m: m(torch.zeros(1, 0, dtype=torch.long))),
        ("ids-list", lambda k, m: m([[1, 2]])),
        ("foreign-cache", lambda k, m: m(torch.tensor([[1, 2]]), cache=k.Model(k.ModelConfig.from_dict(other)).new_cache(1))),
        ("cache-not-cache", lambda k, m: m(torch.tensor([[1, 2]]), cache="x")),
        ("mask-float-garbage", lambda k, m: m(torch.tensor([[1, 2]]), attention_mask=torch.tensor([[0.5, 2.0]]))),
        ("beyond-max-seq", lambda k, m: m(torch.zeros(1, 200, dtype=torch.long))),
        ("gen-temp-nan", lambda k, m: m.generate([[1, 2]], 2, temperature=float("nan"))),
        ("gen-top-p-neg", lambda k, m: m.generate([[1, 2]], 2, temperature=1.0, top_p=-0.5)),
        ("gen-top-k-neg", lambda k, m: m.generate([[1, 2]], 2, temperature=1.0, top_k=-1)),
        ("gen-huge", lambda k, m: m.generate([[1, 2]], 10**12)),
        ("gen-float-n", lambda k, m: m.generate([[1, 2]], 2.5)),
        ("gen-float-prompt", lambda k, m: m.generate([[1.5, 2]], 2)),
        ("gen-oov-prompt", lambda k, m: m.generate([[1, 9999]], 2)),
        ("gen-tensor-float", lambda k, m: m.generate(torch.tensor([[1.0, 2.0]]), 2)),
        ("gen-beyond-max", lambda k, m: m.generate([[1] * 100], 100)),
        ("gen-stop-str", lambda k, m: m.generate([[1, 2]], 2, stop_tokens="ab")),
        ("new-cache-huge", lambda k, m: m.new_cache(1, max_length=10**12)),
        ("new-cache-neg", lambda k, m: m.new_cache(-1)),
        ("load-fifo", lambda k, m: k.load(broken["fifo-weights"])),
        ("load-traversal", lambda k, m: k.load(broken["hf-index-traversal"])),
        ("from-dict-pattern", lambda k, m: k.ModelConfig.from_dict(tiny(layers={"pattern": []}))),
        ("from-dict-nan", lambda k, m: k.ModelConfig.from_dict(tiny(norm_eps=float("nan")))),
        ("from-dict-not-dict", lambda k, m: k.ModelConfig.from_dict([1])),
        ("plan-context-neg", lambda k, m: k.plan(m.config, context=-1)),
        ("plan-context-float", lambda k, m: k.plan(m.config, context=1.5)),
    ]:
        C.append((f"api-{name}", api(fn), "raise"))
    from hostile_second_set import second_cases

    return C + second_cases(fx)


SNAPSHOT_SKIP = ("outs", "cmp")


def snapshot(root: Path) -> dict[str, tuple[int, int]]:
    """Every file under ``root`` (but the output areas) with its size and mtime."""
    out = {}
    for path in root.rglob("*"):
        rel = path.relative_to(root)
        if rel.parts and (rel.parts[0] in SNAPSHOT_SKIP or rel.parts[0].startswith(SNAPSHOT_SKIP)):
            continue
        try:
            st = path.lstat()
        except FileNotFoundError:
            continue
        out[str(rel)] = (st.st_size, st.st_mtime_ns)
    return out


def mapped_bytes() -> int:
    """This process's virtual address space (``VmSize``): a forked child inherits the test process's, which
    grows with the models earlier tests in that worker built and their packed decode weights."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmSize:"):
            return int(line.split()[1]) * 1024
    return 0


def run_case(fx: dict, name: str, what, expect: str, timeout: float = 60.0) -> str | None:
    """None when the case keeps the promise, else why not."""
    root = fx["root"]
    before = fx.get("snapshot") or snapshot(root)  # the previous case's "after"
    stdout, stderr = root.parent / "case.out", root.parent / "case.err"
    pid = os.fork()
    if pid == 0:  # child
        code = 99
        try:
            limit = mapped_bytes() + 8 * 2**30  # 8 GiB beyond what the (forked) test process already maps
            resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
            fo, fe = os.open(stdout, os.O_WRONLY | os.O_CREAT | os.O_TRUNC), os.open(stderr, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
            os.dup2(fo, 1)
            os.dup2(fe, 2)
            sys.stdout = open(1, "w", closefd=False)
            sys.stderr = open(2, "w", closefd=False)
            if callable(what):
                try:
                    what()
                    code = 0
                except Exception as exc:
                    import kvlab

                    ok = isinstance(exc, kvlab.KvlabError) and isinstance(exc, (ValueError, TypeError))
                    lines = str(exc).strip().splitlines()
                    print(f"{type(exc).__name__}: {exc}", file=sys.stderr)
                    code = 2 if ok and len(lines) == 1 else 3
            else:
                from kvlab.cli import main

                code = main(list(what))
        except SystemExit as exc:
            code = exc.code if isinstance(exc.code, int) else 1
        except BaseException:
            import traceback

            traceback.print_exc()
            code = 1
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(code if isinstance(code, int) else 1)
    deadline = time.time() + timeout
    status = None
    while time.time() < deadline:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            break
        time.sleep(0.02)
    else:
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
        return "hang"
    if os.WIFSIGNALED(status):
        return f"killed by signal {os.WTERMSIG(status)}"
    rc = os.WEXITSTATUS(status)
    err, outp = stderr.read_text(errors="replace"), stdout.read_text(errors="replace")
    problems = []
    if fx["marker"].exists():
        problems.append("CODE RAN (marker file)")
        fx["marker"].unlink()
    after = fx["snapshot"] = snapshot(root)
    gone = [p for p in before if p not in after]
    changed = [p for p in before if p in after and after[p] != before[p] and not Path(root / p).is_dir()]
    if gone:
        problems.append(f"deleted {gone[:3]}")
    if changed:
        problems.append(f"changed {changed[:3]}")
    if "Traceback" in err:
        problems.append("traceback")
    lines = [line for line in err.strip().splitlines() if line.strip()]
    if expect in ("err", "raise"):
        if rc != 2:
            problems.append(f"exit {rc}")
        if len(lines) != 1:
            problems.append(f"{len(lines)} stderr lines")
    elif expect == "ok":
        if rc != 0:
            problems.append(f"exit {rc}")
        if "nan" in outp.lower().replace("nano", "") or "nan" in err.lower().split("]")[0][-40:]:
            problems.append("NaN reported")
    elif expect == "any":
        if rc not in (0, 2) or (rc == 2 and len(lines) != 1):
            problems.append(f"exit {rc} with {len(lines)} lines")
    if problems:
        tail = (lines[-1] if lines else "")[:150]
        return f"{'; '.join(problems)} | {tail}"
    return None


def main(argv: list[str]) -> int:
    only = argv[argv.index("-k") + 1] if "-k" in argv else ""
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / "w"
        root.mkdir()
        fx = build_fixtures(root)
        table = [c for c in cases(fx) if only in c[0]]
        broken = 0
        for name, what, expect in table:
            why = run_case(fx, name, what, expect)
            if why:
                broken += 1
                print(f"BROKEN {name}: {why}", flush=True)
        print(f"{broken} of {len(table)} cases break the promise")
    return 1 if broken else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
