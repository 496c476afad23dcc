"""A second hostile set, written apart from ``hostile_probe.py``'s table (other fields, other verbs' flags,
symlinks to devices, YAML tags, forged sizes inside features, API argument kinds); appended to that table."""

from __future__ import annotations

import os
import shutil

import hostile_probe as hp
import torch


def _cfg(r, name, data, suffix=".json"):
    return hp.cfg(r, "second-" + name, data, suffix)


def second_cases(fx: dict) -> list[tuple[str, object, str]]:
    r, ck = fx["root"], str(fx["ckpt"])
    C = []
    for name, data, suf in [
        ("type-int", hp.tiny(layers=hp.rep(type=5)), ".json"), ("type-list", hp.tiny(layers={"repeat": {"type": ["full"], "n_heads": 4}}), ".json"),
        ("yarn-factor-str", hp.tiny(rope={"scaling": {"rope_type": "yarn", "factor": "x"}}), ".json"),
        ("yaml-binary", "vocab_size: !!binary aGVsbG8=\nd_model: 32\n", ".yaml"),
        ("yaml-timestamp", "vocab_size: 2001-12-14\nd_model: 32\nn_layers: 1\nmlp_hidden: 8\nlayers: [{type: full, n_heads: 4}]\n", ".yaml"),
        ("yaml-int-keys", "1: 2\n", ".yaml"), ("yaml-set", "vocab_size: !!set {a, b}\n", ".yaml"),
        ("json-dup-keys", '{"vocab_size": 1, "vocab_size": 256}', ".json"),
        ("deep-json", "{\"a\":" * 5000 + "1" + "}" * 5000, ".json"),
        ("window-neg", hp.tiny(layers={"repeat": {"type": "sliding", "n_heads": 4, "window": -3}}), ".json"),
        ("window-float", hp.tiny(layers={"repeat": {"type": "sliding", "n_heads": 4, "window": 3.5}}), ".json"),
        ("sinks-bool", hp.tiny(layers={"repeat": {"type": "sliding", "n_heads": 4, "window": 8, "sinks": True}}), ".json"),
        ("mla-rank-0", hp.tiny(layers={"repeat": {"type": "mla", "n_heads": 4, "kv_lora_rank": 0}}), ".json"),
        ("kv-sharing-last-huge", hp.tiny(kv_sharing={"last": 10**6}, layers=[{"type": "full", "n_heads": 4}] * 2), ".json"),
        ("hc-streams-huge", hp.tiny(hyper_connections={"streams": 10**9}), ".json"),
        ("ple-huge", hp.tiny(per_layer_embeddings={"dim": 2**40}), ".json"),
        ]:
        path = _cfg(r, name, data, suf)
        C.append((f"plan-{name}", ["plan", path], "err"))
    big = r / "cfgs" / "big.json"
    big.write_text("{" + " " * (17 * 2**20) + "}")
    C.append(("plan-big-config", ["plan", str(big)], "err"))
    d = r / "devlink"
    d.mkdir()
    os.symlink("/dev/zero", d / "config.json")
    C.append(("plan-symlink-dev-zero", ["plan", str(d)], "err"))
    z = r / "zw"
    shutil.copytree(ck, z)
    (z / "model.safetensors").unlink()
    os.symlink("/dev/urandom", z / "model.safetensors")
    C.append(("generate-symlink-urandom", ["generate", str(z), "--ids", "1"], "err"))
    td = r / "tokdir"
    shutil.copytree(ck, td)
    (td / "tokenizer.json").mkdir()
    C.append(("generate-tokenizer-is-dir", ["generate", str(td), "--ids", "1", "--max-new-tokens", "1"], "err"))
    for name, argv in [("plan-context-mixed", ["plan", ck, "--context", "1K,2K,-3"]), ("plan-preset-empty", ["plan", "--preset", ""]),
                       ("eval-split", ["eval", ck, "--split", "dev"]), ("eval-recall-long", ["eval", ck, "--no-ppl", "--recall-lengths", "1000000"]),
                       ("eval-recall-alpha-1", ["eval", ck, "--no-ppl", "--recall-lengths", "32", "--recall-alphabet", "1"]),
                       ("eval-recall-pairs-big", ["eval", ck, "--no-ppl", "--recall-lengths", "32", "--recall-pairs", "1000"]),
                       ("train-recall-pairs-big", ["train", "--no-progress", "--config", _cfg(r, "g2", hp.TINY), "--out", str(r / "outs" / "t1"), "--task", "recall", "--recall-pairs", "100", "--seq", "16", "--steps", "1", "--batch", "1"]),
                       ("train-yaml-bomb", ["train", "--config", _cfg(r, "bomb2", hp.ALIAS_BOMB, ".yaml"), "--out", str(r / "outs" / "t2")]),
                       ("train-corpus-dev-zero", ["train", "--no-progress", "--config", _cfg(r, "g3", hp.TINY), "--out", str(r / "outs" / "t3"), "--corpus", "/dev/zero", "--steps", "1"]),
                       ("train-out-dev-null", ["train", "--config", _cfg(r, "g4", hp.TINY), "--out", "/dev/null", "--force"]),
                       ("train-tokenizer-empty", ["train", "--config", _cfg(r, "g5", hp.TINY), "--out", str(r / "outs" / "t5"), "--tokenizer", ""]),
                       ("show-mask-preset-nope", ["show-mask", "--preset", "nope"]),
                       ("show-mask-hf-gpt2", ["show-mask", _cfg(r, "gpt2", {"model_type": "gpt2"})]),
                       ("compare-variant-maxseq", ["compare", "--quick", "--out", str(r / "cmpx"), "--variants", _cfg(r, "ms", hp.tiny(max_seq_len=1e30))]),
                       ("generate-ids-spaces", ["generate", ck, "--ids", " 1 , 2 ", "--max-new-tokens", "1"]),
                       ("generate-both", ["generate", ck, "--ids", "1", "--prompt", "x", "--max-new-tokens", "1"])]:
        C.append((name, argv, "err" if "spaces" not in name and "both" not in name else "any"))
    def api(fn):
        def call():
            import kvlab
            m = kvlab.load(ck).eval()
            return fn(kvlab, m)
        return call
    for name, fn in [("float-mask", lambda k, m: m.generate(torch.tensor([[1, 2]]), 2, attention_mask=torch.tensor([[1.0, 1.0]]))),
                     ("top-k-bool", lambda k, m: m.generate([[1, 2]], 2, top_k=True)),
                     ("plan-batch-0", lambda k, m: k.plan(m.config, context=8, batch=0)),
                     ("plan-dtype", lambda k, m: k.plan(m.config, context=8, dtype="int3")),
                     ("plan-context-nan", lambda k, m: k.plan(m.config, context=float("nan"))),
                     ("batch-mismatch", lambda k, m: m(torch.tensor([[1, 2]]), cache=m.new_cache(2))),
                     ("load-empty", lambda k, m: k.load("")), ("load-dtype", lambda k, m: k.load(ck, dtype="int8")),
                     ("n-layers-bool", lambda k, m: k.ModelConfig.from_dict(hp.tiny(n_layers=True))),
                     ("scaling-nan", lambda k, m: k.ModelConfig.from_dict(hp.tiny(rope={"scaling": {"rope_type": "linear", "factor": float("nan")}}))),
                     ("gen-prompt-tuple-str", lambda k, m: m.generate(["ab"], 2)),
                     ("gen-mask-shape", lambda k, m: m.generate(torch.tensor([[1, 2]]), 2, attention_mask=torch.ones(1, 5, dtype=torch.long))),
                     ("cache-dtype", lambda k, m: m.generate([[1, 2]], 2, cache_dtype="fp8")),
                     ("forward-bool-ids", lambda k, m: m(torch.ones(1, 2, dtype=torch.bool))),
                     ("save-over-file", lambda k, m: m.save(ck + "/config.json"))]:
        C.append((f"api-{name}", api(fn), "raise"))
    return C
