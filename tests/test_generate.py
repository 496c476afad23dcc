"""``generate()``: greedy == argmax of the full forward, seeded sampling, stop tokens, streaming, batches of
different lengths, stats, and a decode loop that never reallocates or copies the cache."""

from __future__ import annotations

import pytest
import torch
from helpers import build, tiny_config

import kvlab
from kvlab.generate import sample_next

LAYERS = [{"type": "full", "n_heads": 4, "n_kv_heads": 2}, {"type": "full", "n_heads": 4, "n_kv_heads": 1},
          {"type": "full", "n_heads": 4}]


@pytest.fixture(scope="module")
def model():
    return build(tiny_config(LAYERS, vocab=97, d_model=32, mlp_hidden=48))


def prompts(lengths=(7, 3, 11), seed=0) -> list[list[int]]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randint(0, 97, (n,), generator=gen).tolist() for n in lengths]


@torch.no_grad()
def test_greedy_equals_argmax_of_full_forward(model):
    prompt = prompts((9,))[0]
    result = model.generate([prompt], max_new_tokens=12)
    seq = torch.tensor([prompt + result.tokens[0]])
    logits = model(seq)  # full forward, no cache
    expected = logits[0, len(prompt) - 1:-1].argmax(-1).tolist()
    assert result.tokens[0] == expected
    assert result.sequences.tolist() == seq.tolist()


def test_batch_of_different_lengths_equals_each_alone(model):
    batch = prompts((7, 3, 11))
    together = model.generate(batch, max_new_tokens=10)
    for prompt, tokens in zip(batch, together.tokens):
        assert model.generate([prompt], max_new_tokens=10).tokens[0] == tokens


def test_seeded_sampling_is_reproducible(model):
    batch = prompts((5, 8))
    kwargs = dict(max_new_tokens=16, temperature=1.3, top_k=20, top_p=0.9)
    first = model.generate(batch, seed=123, **kwargs).tokens
    assert model.generate(batch, seed=123, **kwargs).tokens == first
    assert model.generate(batch, seed=124, **kwargs).tokens != first
    greedy = model.generate(batch, max_new_tokens=16).tokens
    assert model.generate(batch, max_new_tokens=16, temperature=1.0, top_k=1, seed=5).tokens == greedy
    assert model.generate(batch, max_new_tokens=16, temperature=1.0, top_p=1e-6, seed=5).tokens == greedy


def test_top_k_and_top_p_restrict_the_support():
    logits = torch.tensor([[4.0, 3.0, 2.0, 1.0, 0.0, -1.0]]).repeat(2000, 1)
    gen = torch.Generator().manual_seed(0)
    assert set(sample_next(logits, 1.0, 3, None, gen).tolist()) == {0, 1, 2}
    probs = logits[0].softmax(-1)  # top_p 0.8: the smallest prefix reaching 0.8 is tokens {0, 1}
    assert probs[0] < 0.8 <= probs[:2].sum()
    assert set(sample_next(logits, 1.0, None, 0.8, gen).tolist()) == {0, 1}
    assert sample_next(logits, 0.0, None, None, None).tolist() == [0] * 2000


def test_stop_tokens_end_rows_and_streaming_matches(model):
    batch = prompts((6, 4))
    free = model.generate(batch, max_new_tokens=12).tokens
    stop = free[0][3]  # row 0 stops at its 4th token (maybe earlier if it repeats)
    streamed: list[list[int | None]] = []
    result = model.generate(batch, max_new_tokens=12, stop_tokens=[stop], stream=streamed.append)
    for row, tokens in enumerate(result.tokens):
        cut = free[row].index(stop) + 1 if stop in free[row] else len(free[row])
        assert tokens == free[row][:cut]
        assert result.finished[row] == (stop in free[row])
        assert [step[row] for step in streamed if step[row] is not None] == tokens
    assert len(streamed) == max(len(t) for t in result.tokens)


def test_max_new_tokens_zero_and_one(model):
    assert model.generate(prompts((4,)), max_new_tokens=0).tokens == [[]]
    one = model.generate(prompts((4,)), max_new_tokens=1)
    assert len(one.tokens[0]) == 1 and one.stats.new_tokens == 1
    with pytest.raises(kvlab.KvlabError, match="max_new_tokens"):
        model.generate(prompts((4,)), max_new_tokens=-1)


def test_stats_peak_cache_equals_measured_and_planned(model, monkeypatch):
    caches = []
    original = type(model).new_cache

    def spy(self, *args, **kwargs):
        caches.append(original(self, *args, **kwargs))
        return caches[-1]

    monkeypatch.setattr(type(model), "new_cache", spy)
    batch = prompts((7, 3, 11))
    result = model.generate(batch, max_new_tokens=9)
    stats = result.stats
    assert stats.prompt_tokens == 11 and stats.new_tokens == 9
    assert stats.prefill_seconds > 0 and stats.decode_seconds > 0 and stats.decode_tokens_per_s > 0
    held = 11 + 9 - 1  # the last sampled token is never fed back
    assert caches[0].step == held
    assert stats.peak_cache_bytes == caches[0].nbytes
    assert stats.peak_cache_bytes == kvlab.plan(model.config, context=held, batch=3).total_bytes


def buffer_pointers(cache) -> list[tuple[int, int]]:
    return [(b.data.data_ptr(), b.capacity) for layer in cache.layers for b in layer.buffers.values()]


@torch.no_grad()
def test_decode_never_reallocates_or_copies_the_cache(model, monkeypatch):
    """generate reserves prompt + max_new_tokens up front; every decode step writes in place."""
    seen: list[list[tuple[int, int]]] = []
    original = type(model).new_cache
    caches = []

    def spy(self, *args, **kwargs):
        caches.append(original(self, *args, **kwargs))
        return caches[-1]

    monkeypatch.setattr(type(model), "new_cache", spy)
    result = model.generate(prompts((300, 5)), max_new_tokens=40,
                            stream=lambda _: seen.append(buffer_pointers(caches[0])))
    assert len(result.tokens[0]) == 40 and len(seen) == 40
    assert all(step == seen[0] for step in seen)
    assert all(capacity >= 340 for _, capacity in seen[0])

    monkeypatch.undo()  # without a reservation, growth is by chunks: a handful of reallocations in 700 tokens
    cache = model.new_cache(1)
    model(torch.zeros(1, 1, dtype=torch.long), cache=cache)
    pointers = {buffer_pointers(cache)[0]}
    for _ in range(700):
        model(torch.zeros(1, 1, dtype=torch.long), cache=cache)
        pointers.add(buffer_pointers(cache)[0])
    assert len(pointers) <= 4


def test_tensor_input_with_mask_equals_list_input(model):
    batch = prompts((6, 2))
    from kvlab.generate import left_pad

    ids, mask = left_pad(batch)
    assert model.generate(ids, attention_mask=mask, max_new_tokens=6).tokens == \
        model.generate(batch, max_new_tokens=6).tokens


def test_decode_uses_grouped_query_sdpa_without_expanding_kv(model, monkeypatch):
    """At decode the G query heads of a KV head are folded into the query axis: SDPA sees q [B, Hkv, G, D]
    against the un-expanded K/V, with no mask and no ``enable_gqa``."""
    import torch.nn.functional as F

    calls = []
    original = F.scaled_dot_product_attention

    def spy(q, k, v, *args, **kwargs):
        calls.append((tuple(q.shape), tuple(k.shape), kwargs.get("attn_mask"), kwargs.get("enable_gqa", False)))
        return original(q, k, v, *args, **kwargs)

    cache = model.new_cache(1, max_length=16)
    model(torch.arange(5)[None], cache=cache)
    monkeypatch.setattr(F, "scaled_dot_product_attention", spy)
    model(torch.tensor([[7]]), cache=cache)
    head_dim = 32 // 4
    assert [(q, k) for q, k, _, _ in calls] == [((1, 2, 2, head_dim), (1, 2, 6, head_dim)),
                                               ((1, 1, 4, head_dim), (1, 1, 6, head_dim)),
                                               ((1, 4, 1, head_dim), (1, 4, 6, head_dim))]
    assert all(mask is None and not gqa for _, _, mask, gqa in calls)


def test_hot_path_weights_are_column_major_and_checkpoints_are_not(model, tmp_path):
    """Decode reads every weight once per token; kvlab stores the linears of attention, MLP and LM head as
    [in, out]-contiguous (a faster GEMV on CPU) under the usual [out, in] names and shapes."""
    from safetensors.torch import load_file

    block = model.layers[0]
    for linear in (block.self_attn.q_proj, block.self_attn.k_proj, block.mlp.down_proj, model.lm_head):
        assert linear.weight.stride(0) == 1
    # q/k/v and gate/up are row blocks of one [in, sum out]-contiguous tensor each (one GEMV at decode)
    attn, mlp = block.self_attn, block.mlp
    for linears in ((attn.q_proj, attn.k_proj, attn.v_proj), (mlp.gate_proj, mlp.up_proj)):
        width = sum(linear.out_features for linear in linears)
        assert all(linear.weight.stride() == (1, width) for linear in linears)
        assert len({linear.weight.untyped_storage().data_ptr() for linear in linears}) == 1
    model.save(tmp_path / "ckpt")
    saved = load_file(str(tmp_path / "ckpt" / "model.safetensors"))
    assert saved["layers.0.self_attn.q_proj.weight"].is_contiguous()
    loaded = kvlab.load(tmp_path / "ckpt")
    assert loaded.layers[0].self_attn.q_proj.weight.stride(0) == 1
    torch.testing.assert_close(loaded.layers[0].self_attn.q_proj.weight, block.self_attn.q_proj.weight)


@torch.no_grad()
def test_last_only_prefill_equals_full_logits(model):
    ids = torch.randint(0, 97, (2, 9))
    mask = torch.ones_like(ids)
    mask[1, :4] = 0
    full = model(ids, attention_mask=mask)
    last = model(ids, cache=model.new_cache(2), attention_mask=mask, last_only=True)
    assert last.shape == (2, 1, 97)
    torch.testing.assert_close(last, full[:, -1:], atol=1e-5, rtol=1e-5)


def test_cli_generate_packed_gives_the_same_greedy_tokens(tmp_path, capsys):
    """``kvlab generate --packed`` (oneDNN-packed linears for the run) prints what the default path prints."""
    from kvlab.cli import main

    build(tiny_config([{"type": "full", "n_heads": 4, "n_kv_heads": 2}] * 2, vocab=300)).save(tmp_path / "m")
    outputs = []
    for extra in ([], ["--packed"]):
        assert main(["generate", str(tmp_path / "m"), "--ids", "1,2,3", "--ids", "4,5,6", "--max-new-tokens", "8",
                     *extra]) == 0
        outputs.append(capsys.readouterr().out)
    assert outputs[0] == outputs[1] and outputs[0].count("\n") == 2
