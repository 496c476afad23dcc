"""Multi-head latent attention: the standard matrix, absorbed == expanded, the cache holds the latent + RoPE
key only, and a decode step never materializes per-head K/V of past tokens."""

import pytest
import torch
from helpers import build, decode_stepwise
from helpers import model_dict as _model
from matrix import *  # noqa: F401,F403
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

import kvlab

YARN = {"theta": 10000.0, "interleaved": True, "max_position": 1024,
        "scaling": {"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64, "mscale": 1.0,
                    "mscale_all_dim": 0.8}}


def _mla(**extra):
    return {"type": "mla", "n_heads": 4, "kv_lora_rank": 32, "qk_rope_head_dim": 8, "qk_nope_head_dim": 16,
            "v_head_dim": 12, **extra}


CASES = {
    "mla_q_lora_yarn_interleaved": _model([_mla(q_lora_rank=24, rope=YARN), _mla(q_lora_rank=24, rope=YARN)]),
    "mla_full_rank_q_bias": _model([_mla(qkv_bias=True, o_bias=True), _mla(kv_lora_rank=16, v_head_dim=20)]),
    "mla_mixed_with_gqa": _model([_mla(), {"type": "full", "n_heads": 4, "n_kv_heads": 2}, _mla(n_heads=2)]),
    # cross-layer latent sharing: consumers have their own queries and up-projections, no cache
    "mla_shared_latent": _model([_mla(q_lora_rank=24), _mla(kv_from=0, n_heads=2, v_head_dim=20),
                                 {"type": "full", "n_heads": 4}, _mla(kv_from=0, rope=YARN)]),
    # long enough that "auto" switches from expanded (prefill) to absorbed (short chunks)
    "mla_long": {**_model([_mla(n_heads=8, qk_nope_head_dim=8, v_head_dim=8)]), "_seq": 60},
}


def _with_path(config, path):
    """``config`` with every MLA layer's execution ``path`` forced (a spec field)."""
    return {**config, "layers": [{**layer, "path": path} if layer["type"] == "mla" else layer
                                 for layer in config["layers"]]}


@torch.no_grad()
def test_absorbed_and_expanded_paths_agree():
    ids = torch.randint(0, 97, (2, 30), generator=torch.Generator().manual_seed(2))
    outputs = {}
    for path in ("absorbed", "expanded"):
        model = build(_with_path(CASES["mla_q_lora_yarn_interleaved"], path))  # same seed: same weights
        full = model(ids)
        cached, _ = decode_stepwise(model, ids, [11, 6])
        torch.testing.assert_close(cached, full, atol=2e-4, rtol=1e-4)
        outputs[path] = full
    torch.testing.assert_close(outputs["absorbed"], outputs["expanded"], atol=1e-4, rtol=1e-4)
    assert outputs["absorbed"].abs().max() > 1.0  # logits are not trivially small


def test_auto_path_is_absorbed_for_decode_and_expanded_for_long_prefill():
    config = {k: v for k, v in CASES["mla_long"].items() if not k.startswith("_")}
    attn = build(config).layers[0].self_attn  # r 32, d_nope 8, d_v 8: absorbed iff S * 48 < 512
    assert attn.use_absorbed(1) and attn.use_absorbed(10) and not attn.use_absorbed(11)


@torch.no_grad()
def test_cache_holds_latent_and_rope_key_only():
    model = build(CASES["mla_mixed_with_gqa"])
    _, cache = decode_stepwise(model, torch.randint(0, 97, (3, 21)), [9])
    latent = cache.layers[0]
    assert list(latent.buffers) == ["latent"] and not latent.state
    assert latent.buffers["latent"].view().shape == (3, 1, 21, 32 + 8)
    assert cache.layer_nbytes() == [3 * 21 * (32 + 8) * 4, 2 * 3 * 2 * 16 * 21 * 4, 3 * 21 * 40 * 4]


class AllocationRecorder(TorchDispatchMode):
    """Records the shape of every tensor an op allocates (view ops, which alias their input, are skipped)."""

    def __init__(self):
        super().__init__()
        self.allocated: list[tuple[str, tuple[int, ...]]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if not any(ret.alias_info is not None for ret in func._schema.returns):
            for t in tree_leaves(out):
                if isinstance(t, torch.Tensor):
                    self.allocated.append((str(func), tuple(t.shape)))
        return out


@torch.no_grad()
def _decode_step_allocations(path: str, context: int):
    spec = _mla(n_heads=8, kv_lora_rank=32, qk_nope_head_dim=16, v_head_dim=16)
    model = build(_with_path(_model([spec]), path))
    ids = torch.randint(0, 97, (2, context + 1))
    cache = model.new_cache(2, max_length=context + 1)  # no buffer growth inside the recorded step
    model(ids[:, :context], cache=cache)
    with AllocationRecorder() as rec:
        model(ids[:, context:], cache=cache)
    return rec.allocated, cache


@pytest.mark.parametrize("context", [300])
def test_decode_never_materializes_per_head_kv(context):
    allocated, cache = _decode_step_allocations("auto", context)
    tokens = context + 1
    latent_numel = 2 * tokens * (32 + 8)  # what the cache holds; the step reads it in place
    per_head_kv = 2 * 8 * tokens * 16  # the smallest per-head K or V of the past tokens
    largest = max(allocated, key=lambda item: torch.Size(item[1]).numel())
    assert torch.Size(largest[1]).numel() < latent_numel, f"decode allocated {largest}"
    assert torch.Size(largest[1]).numel() < per_head_kv
    assert cache.nbytes == latent_numel * 4
    # the recorder does catch expansion: the expanded path allocates per-head keys [B, H, T, d_nope + d_rope]
    expanded, _ = _decode_step_allocations("expanded", context)
    assert any(shape == (2, 8, tokens, 16 + 8) for _, shape in expanded)


def test_planner_rule_and_labels():
    config = kvlab.ModelConfig.from_dict(CASES["mla_mixed_with_gqa"])
    plan = kvlab.plan(config, context=100, batch=2, dtype="bf16")
    assert plan.layers[0].cache_bytes == 2 * 100 * 40 * 2
    assert plan.layers[0].mha_bytes == 2 * 100 * 4 * (16 + 12) * 2
    assert plan.layers[0].label == "MLA-32+8"
    assert plan.layers[0].decode_flops == 2 * 4 * (2 * 32 + 8) * 100  # 100 keys for the 100th token


@pytest.mark.parametrize("field,value,message", [
    ("n_kv_heads", 2, "n_kv_heads: MLA caches one latent"),
    ("head_dim", 16, "head_dim: MLA's q/k head size"),
    ("qk_rope_head_dim", 7, "qk_rope_head_dim: must be even"),
    ("kv_lora_rank", 0, "kv_lora_rank: must be a positive number"),
    ("kv_quant", "int8", "kv_quant: this layer reads layer 0's latent"),
])
def test_invalid_specs_name_the_field(field, value, message):
    layers = [_mla(), _mla(**{field: value}, kv_from=0 if field == "kv_quant" else None)]
    with pytest.raises(kvlab.ConfigError, match=rf"layers\[1\]\.{message}"):
        kvlab.ModelConfig.from_dict(_model(layers))


@torch.no_grad()
def test_latent_consumers_hold_nothing():
    model = build(CASES["mla_shared_latent"])
    _, cache = decode_stepwise(model, torch.randint(0, 97, (2, 15)), [6])
    assert cache.layer_nbytes() == [2 * 15 * 40 * 4, 0, 2 * 2 * 4 * 16 * 15 * 4, 0]
    assert not hasattr(model.layers[1].self_attn, "kv_a_proj_with_mqa")


def test_latent_consumer_rank_must_match_producer():
    config = kvlab.ModelConfig.from_dict(_model([_mla(), _mla(kv_from=0, kv_lora_rank=16)]))
    with pytest.raises(kvlab.ConfigError, match=r"layers\[1\]\.kv_from: layer 0 caches a latent of 32 \+ 8"):
        kvlab.Model(config)
