"""Corpus loading and splitting, the chunk sampler, BPE training/caching, and the recall task."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from kvlab.data.corpus import ChunkSampler, encode_texts, load_corpus, split_of, stdlib_files
from kvlab.errors import KvlabError
from kvlab.tokenizer import ByteTokenizer, train_bpe


def test_stdlib_corpus_files_and_split_are_deterministic():
    root, files = stdlib_files()
    assert len(files) > 100 and all(p.suffix == ".py" for p in files)
    assert not any("site-packages" in p.parts for p in files)
    keys = [str(p.relative_to(root)) for p in files]
    splits = [split_of(k) for k in keys]
    assert splits == [split_of(k) for k in keys]
    counts = {s: splits.count(s) for s in ("train", "val", "test")}
    assert counts["train"] > 0.8 * len(keys) and counts["val"] > 0 and counts["test"] > 0


def test_stdlib_corpus_loads_capped():
    corpus = load_corpus(None, max_chars=20_000)
    assert corpus.source.startswith("stdlib:")
    assert all(0 < n <= 20_000 for n in corpus.num_chars().values())


def test_folder_text_and_jsonl_corpora(tmp_path):
    folder = tmp_path / "docs"
    folder.mkdir()
    for i in range(40):
        (folder / f"f{i}.txt").write_text(f"document {i} " * 20)
    corpus = load_corpus(folder)
    assert sum(len(v) for v in corpus.splits.values()) == 40
    assert corpus.fingerprint() == load_corpus(folder).fingerprint()
    single = tmp_path / "one.txt"
    single.write_text("hello world\n" * 100)
    small = load_corpus(single)  # one block: falls back to a 90/5/5 cut
    assert all(small.splits[s] and small.splits[s][0] for s in ("train", "val", "test"))
    jsonl = tmp_path / "d.jsonl"
    jsonl.write_text("\n".join(json.dumps({"text": f"record {i}"}) for i in range(30)) + "\n")
    assert sum(len(v) for v in load_corpus(jsonl).splits.values()) in (1 + 1 + 1, 30)


def test_corpus_errors_are_one_line(tmp_path):
    with pytest.raises(KvlabError, match="no such corpus"):
        load_corpus(tmp_path / "missing")
    (tmp_path / "empty.txt").write_text("  \n")
    with pytest.raises(KvlabError, match="no text"):
        load_corpus(tmp_path / "empty.txt")
    (tmp_path / "bad.jsonl").write_text('{"txt": 1}\n')
    with pytest.raises(KvlabError, match="bad.jsonl:1"):
        load_corpus(tmp_path / "bad.jsonl")


def test_chunk_sampler_resumes_and_shards():
    ids = np.arange(1000, dtype=np.int32)
    sampler = ChunkSampler(ids, seq_len=16, batch=4, seed=3)
    first = [sampler.next_batch() for _ in range(3)]
    x, y = first[0]
    assert x.shape == (4, 16) and torch.equal(y, x + 1)  # contiguous chunks, next-token targets
    state = sampler.state_dict()
    after = sampler.next_batch()
    again = ChunkSampler(ids, seq_len=16, batch=4, seed=3)
    again.load_state_dict(state)
    assert torch.equal(again.next_batch()[0], after[0])
    ranks = [ChunkSampler(ids, 16, 4, seed=3, rank=r, world=2).next_batch()[0] for r in range(2)]
    assert torch.equal(torch.cat(ranks), first[0][0])
    with pytest.raises(KvlabError):
        ChunkSampler(ids[:10], seq_len=16, batch=4)


def test_byte_encoding_and_bpe_cache(tmp_path):
    assert encode_texts(["ab", "c"], ByteTokenizer()).tolist() == [97, 98, 10, 99]
    texts = ["def f(x):\n    return x + 1\n" * 20, "class A:\n    pass\n" * 20]
    tok = train_bpe(texts, vocab_size=300, cache_dir=tmp_path)
    assert 256 < tok.vocab_size <= 300
    assert tok.decode(tok.encode("def f(x): pass")) == "def f(x): pass"
    files = list(tmp_path.iterdir())
    assert len(files) == 1
    mtime = files[0].stat().st_mtime_ns
    again = train_bpe(texts, vocab_size=300, cache_dir=tmp_path)  # reused, not retrained
    assert files[0].stat().st_mtime_ns == mtime and again.encode("class A") == tok.encode("class A")
    assert len(encode_texts(texts, tok)) < len(encode_texts(texts, ByteTokenizer()))


def test_recall_batch_layout_and_determinism():
    from kvlab.data.recall import RecallTask

    task = RecallTask(5)
    x, y, mask = task.batch(3, 40, vocab_size=32, seed=7)
    assert x.shape == y.shape == mask.shape == (3, 40)
    assert torch.equal(x, task.batch(3, 40, 32, seed=7)[0])
    assert not torch.equal(x, task.batch(3, 40, 32, seed=8)[0])
    assert torch.equal(x[:, 1:], y[:, :-1])
    for row in range(3):
        pairs = dict(zip(x[row, 0:10:2].tolist(), x[row, 1:10:2].tolist()))
        assert len(pairs) == 5 and all(1 <= k <= 15 for k in pairs) and all(15 < v <= 30 for v in pairs.values())
        positions = mask[row].nonzero().flatten().tolist()
        assert len(positions) == 5 and min(positions) >= 10
        assert sorted(x[row, positions].tolist()) == sorted(pairs)  # each key queried once
        assert all(y[row, p].item() == pairs[x[row, p].item()] for p in positions)


def test_fused_recall_layout_binds_each_query_to_its_pair_token():
    from kvlab.data.recall import RecallTask

    task = RecallTask(6, alphabet=7, layout="fused")
    assert task.ids_needed(7) == 1 + 14 + 49
    x, y, mask = task.batch(4, 30, vocab_size=64, seed=3)
    assert torch.equal(x, task.batch(4, 30, 64, seed=3)[0])
    for row in range(4):
        pair_ids = x[row, 6:12] - 15  # k * 7 + v, 0-based, after a lead of 6 filler tokens
        bound = {int(p) // 7 + 1: int(p) % 7 + 8 for p in pair_ids}  # key token -> value token
        assert (x[row, :6] == 0).all() and x[row, 12:].max() <= 7 and (y[row][~mask[row]] == 0).all()
        assert len(bound) == 6
        positions = mask[row].nonzero().flatten().tolist()
        assert len(positions) == 6 and min(positions) >= 12
        assert all(y[row, p].item() == bound[x[row, p].item()] for p in positions)
    with pytest.raises(KvlabError, match="alphabet 8 needs 81 token ids"):
        RecallTask(6, alphabet=8, layout="fused").check(30, 64)
    assert RecallTask(4, layout="fused").n_symbols(256) == 15  # 1 + 30 + 225 = 256


def test_recall_errors_and_accuracy_of_an_oracle():
    from kvlab.data.recall import RecallTask, recall_accuracy

    with pytest.raises(KvlabError, match="too short"):
        RecallTask(5).batch(1, 10, 32, 0)
    with pytest.raises(KvlabError, match="distinct keys"):
        RecallTask(20).batch(1, 100, 32, 0)
    with pytest.raises(KvlabError, match="layout must be"):
        RecallTask(2, layout="zigzag").check(20, 32)

    class Oracle(torch.nn.Module):  # looks the key up in the prefix: accuracy 1
        config = type("C", (), {"vocab_size": 32})()

        def __init__(self):
            super().__init__()
            self.p = torch.nn.Parameter(torch.zeros(1))

        def forward(self, ids):
            out = torch.zeros(*ids.shape, 32)
            for b in range(ids.shape[0]):
                pairs = dict(zip(ids[b, 0:10:2].tolist(), ids[b, 1:10:2].tolist()))
                for t in range(10, ids.shape[1]):
                    out[b, t, pairs.get(int(ids[b, t]), 0)] = 1.0
            return out

    assert recall_accuracy(Oracle(), RecallTask(5), 40, n_samples=6, seed=1, batch=4) == 1.0
