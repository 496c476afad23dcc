"""kvlab convert on tiny random models: lossless where the conversion is exact, planner == measured
bytes for every converted model, the grammar, and the fidelity numbers."""

import math

import pytest
import torch
import torch.nn.functional as F
from helpers import build, tiny_config

from kvlab.convert.build import convert
from kvlab.convert.calibrate import collect
from kvlab.convert.spec import format_steps, parse_layer_spec, resolve_spec
from kvlab.errors import ConfigError
from kvlab.eval.fidelity import compare, perplexity_through_cache
from kvlab.planner import plan

GQA = [{"type": "full", "n_heads": 4, "n_kv_heads": 2}] * 3


def setup(layers=GQA, seq=48, **extra):
    model = build(tiny_config(layers, **extra))
    stats = collect(model, torch.randint(0, 97, (2, seq)), progress=False)
    return model, stats


def converted(model, stats, spec):
    return convert(model, resolve_spec(spec, model.config.n_layers)[0], stats)


@torch.no_grad()
def max_diff(a, b, x):
    return float((a(x) - b(x)).abs().max())


@pytest.mark.parametrize("spec", ["keep", "gqa-2", "gqa-2:merge=mean", "sliding:window=64,sinks=0",
                                  "sliding:window=48,sinks=4", "block_sparse:block=8,local=6,global=1"])
def test_lossless_same_structure(spec):
    model, stats = setup()
    x = torch.randint(0, 97, (1, 40))  # window >= context: nothing is evicted
    assert max_diff(model, converted(model, stats, spec), x) < 1e-5


@pytest.mark.parametrize("interleaved", [False, True])
def test_mla_full_rank_all_rope_is_lossless(interleaved):
    """MLA shares one RoPE key among heads, so 'all RoPE kept' is exact from a one-KV-head source; with
    partial RoPE (half of each 16-dim head) rank = 8 nope + 16 value + 1 norm channel is full rank."""
    layers = [{"type": "full", "n_heads": 4, "n_kv_heads": 1}] * 2
    model, stats = setup(layers, rope={"theta": 10000.0, "partial": 0.5, "interleaved": interleaved})
    conv = converted(model, stats, "mla:rank=25,rope=8")
    x = torch.randint(0, 97, (1, 40))
    assert conv.config.layers[0].type == "mla"
    assert max_diff(model, conv, x) < 1e-4
    for module in (layer.self_attn for layer in conv.layers):
        module.path = "absorbed"
    assert max_diff(model, conv, x) < 1e-4


def test_mla_kept_pairs_reproduce_their_frequencies():
    """Pairs 1, 3, 5, 7 of 8 carry all query energy: the norm criterion keeps exactly them (a = 1, s = 2)
    and theta' / the linear factor reproduce their frequencies, so the conversion stays exact."""
    layers = [{"type": "full", "n_heads": 2, "n_kv_heads": 1, "head_dim": 16}]
    model, stats = setup(layers)
    with torch.no_grad():
        q = model.layers[0].self_attn.q_proj.weight.view(2, 16, -1)
        for p in (0, 2, 4, 6):
            q[:, p] = 0
            q[:, p + 8] = 0
    stats = collect(model, torch.randint(0, 97, (2, 48)), progress=False)
    conv = converted(model, stats, "mla:rank=25,rope=8,select=norm")
    rope = conv.config.layers[0].rope
    assert rope.scaling["type"] == "linear"
    assert max_diff(model, conv, torch.randint(0, 97, (1, 40))) < 1e-4


def test_mla_select_norm_is_one_progression_for_the_model():
    """select=norm: one RoPE config on every layer (what stock DeepSeek V3 can hold), the progression of
    highest summed per-layer normalised score; select=layer picks per layer (here: layer 0 keeps pairs
    1, 3, 5, 7, which only it favours, layer 1 the default's best)."""
    from kvlab.convert.mla import choose_pairs, pair_energies
    from kvlab.convert.registry import ConvertEnv

    layers = [{"type": "full", "n_heads": 2, "n_kv_heads": 1, "head_dim": 16}] * 3
    model, _ = setup(layers)
    with torch.no_grad():
        q = model.layers[0].self_attn.q_proj.weight.view(2, 16, -1)
        for p in (0, 2, 4, 6):
            q[:, p] = q[:, p + 8] = 0
    stats = collect(model, torch.randint(0, 97, (2, 48)), progress=False)
    shared, per_layer = (converted(model, stats, f"mla:rank=25,rope=8,select={s}") for s in ("norm", "layer"))
    assert len({repr(shared.config.layer(i).rope) for i in range(3)}) == 1
    assert len({repr(per_layer.config.layer(i).rope) for i in range(3)}) > 1
    env = ConvertEnv(model.config, stats, state=model.state_dict())
    scores = [pair_energies(env.source_layer(i), env)[2] for i in range(3)]
    a, s = choose_pairs(sum(x / x.sum() for x in scores), 4, "norm")
    theta = model.config.layer(0).rope.theta
    assert shared.config.layer(0).rope.theta == pytest.approx(theta ** (s * 8 / 16))



def test_share_between_identical_layers_is_lossless():
    """Layer 0 adds nothing to the residual (zero o_proj and down_proj) and layer 1 has its norms and K/V
    weights: both see the same K/V, so layer 1 reading layer 0's cache changes nothing."""
    model = build(tiny_config([{"type": "full", "n_heads": 4, "n_kv_heads": 2}] * 2))
    with torch.no_grad():
        a, b = model.layers
        a.self_attn.o_proj.weight.zero_()
        a.mlp.down_proj.weight.zero_()
        b.input_layernorm.weight.copy_(a.input_layernorm.weight)
        b.self_attn.k_proj.weight.copy_(a.self_attn.k_proj.weight)
        b.self_attn.v_proj.weight.copy_(a.self_attn.v_proj.weight)
    stats = collect(model, torch.randint(0, 97, (2, 48)), progress=False)
    conv = converted(model, stats, "share")
    assert conv.config.layers[1].kv_from == 0
    assert max_diff(model, conv, torch.randint(0, 97, (1, 40))) < 1e-4


def test_fit_merge_beats_mean_pooling():
    model, stats = setup(seq=64)
    x = torch.randint(0, 97, (1, 64))
    assert max_diff(model, converted(model, stats, "mqa"), x) < max_diff(model, converted(model, stats, "mqa:merge=mean"), x)


SPECS = ["gqa-1", "mqa+int8", "mqa+int4", "int4", "mla:rank=16,rope=4", "mla:rank=16,rope=4+int8",
         "sliding:window=16,sinks=4", "share", "block_sparse:block=8,local=2,global=1", "deltanet", "keep"]


@pytest.mark.parametrize("spec", SPECS)
def test_planner_equals_measured_bytes(spec):
    model, stats = setup()
    conv = converted(model, stats, spec)
    for length in (1, 37, 70):
        cache = conv.new_cache(1)
        ids = torch.randint(0, 97, (1, length))
        for start in range(0, length, 16):  # chunked, as the report fills it
            conv(ids[:, start:start + 16], cache=cache)
        assert cache.nbytes == plan(conv.config, context=length).total_bytes, (spec, length)


def test_report_perplexity_equals_independent_recomputation():
    model, stats = setup()
    conv = converted(model, stats, "mqa+int4:residual=8,group=8")
    rows = torch.randint(0, 97, (2, 41))
    got = compare(model, conv, rows, chunk=8, progress=False)
    total = 0.0
    for row in rows:  # independent: plain cross-entropy of logits fed chunk by chunk
        cache = conv.new_cache(1)
        logits = torch.cat([conv(row[None, s:min(s + 8, 40)], cache=cache) for s in range(0, 40, 8)], dim=1)
        total += float(F.cross_entropy(logits[0], row[1:], reduction="sum"))
    assert got["ppl_converted"] == pytest.approx(math.exp(total / 80), rel=1e-6)
    assert got["ppl_converted"] == pytest.approx(perplexity_through_cache(conv, rows, 8), rel=1e-9)
    full = float(F.cross_entropy(model(rows[:, :-1]).transpose(1, 2), rows[:, 1:]))  # no cache effects
    assert got["ppl_source"] == pytest.approx(math.exp(full), rel=1e-5)
    assert got["kl"] > 0 and 0 <= got["top1_agreement"] <= 1
    same = compare(model, model, rows, chunk=8, progress=False)
    assert same["kl"] == pytest.approx(0, abs=1e-6) and same["top1_agreement"] == 1


def test_grammar():
    steps = parse_layer_spec("mla:rank=64,rope=8+int8")
    assert steps[0] == ("mla", {"rank": 64, "rope": 8, "select": "high", "balance": 0.0})
    assert format_steps(steps) == "mla:rank=64,rope=8+int8"
    assert parse_layer_spec("gqa-3")[0][1]["kv"] == 3 and parse_layer_spec("mqa")[0][1]["kv"] == 1
    for bad in ["nope", "mla:rank", "mla:ranks=3", "mla:rank=x", "sliding:window=1,,", ""]:
        if bad == "sliding:window=1,,":
            parse_layer_spec(bad)  # empty options are ignored
            continue
        with pytest.raises(ConfigError):
            parse_layer_spec(bad)


def test_bad_conversions_are_config_errors():
    model, stats = setup()
    with pytest.raises(ConfigError):
        converted(model, stats, "gqa-3")  # 3 does not divide 2 KV heads
    with pytest.raises(ConfigError):
        converted(model, stats, "mla:rope=3")
