"""RoPE variants against transformers: inverse frequencies and attention factor from
``modeling_rope_utils`` (default, linear, llama3, yarn, proportional), and the rotation itself against
transformers' apply functions (rotate-half partial: Laguna; interleaved partial: GLM; interleaved full:
DeepSeek V3, which de-interleaves its output; proportional: Gemma 4)."""

import pytest
import torch

from kvlab.config import RopeConfig
from kvlab.errors import ConfigError
from kvlab.rope import Rotary, rope_frequencies

transformers = pytest.importorskip("transformers")
from transformers import LlamaConfig  # noqa: E402
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS  # noqa: E402

VARIANTS = {  # id -> (hf rope_parameters, head_dim, max_position)
    "default": ({"rope_type": "default", "rope_theta": 10000.0}, 64, 2048),
    "default_partial": ({"rope_type": "default", "rope_theta": 5e5, "partial_rotary_factor": 0.5}, 64, 2048),
    "linear": ({"rope_type": "linear", "rope_theta": 10000.0, "factor": 4.0}, 32, 2048),
    "llama3": ({"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
                "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}, 128, 131072),
    "yarn": ({"rope_type": "yarn", "rope_theta": 10000.0, "factor": 16.0, "beta_fast": 32, "beta_slow": 1,
              "original_max_position_embeddings": 4096}, 64, 65536),
    "yarn_mscale": ({"rope_type": "yarn", "rope_theta": 10000.0, "factor": 40.0, "mscale": 1.0,
                     "mscale_all_dim": 1.0, "beta_fast": 32, "beta_slow": 1,
                     "original_max_position_embeddings": 4096}, 64, 163840),
    "yarn_mscale_unequal": ({"rope_type": "yarn", "rope_theta": 10000.0, "factor": 40.0, "mscale": 0.707,
                             "mscale_all_dim": 1.0, "original_max_position_embeddings": 4096}, 64, 163840),
    "yarn_partial_no_truncate": ({"rope_type": "yarn", "rope_theta": 5e5, "factor": 32.0, "beta_fast": 64,
                                  "beta_slow": 1, "attention_factor": 1.0, "partial_rotary_factor": 0.5,
                                  "truncate": False, "original_max_position_embeddings": 4096}, 128, 131072),
    "proportional": ({"rope_type": "proportional", "rope_theta": 1e6, "partial_rotary_factor": 0.25}, 64, 2048),
    "proportional_full": ({"rope_type": "proportional", "rope_theta": 1e6, "factor": 2.0}, 32, 2048),
}


def _kvlab_rope(params: dict, max_position: int, interleaved: bool = False) -> RopeConfig:
    scaling = {k: v for k, v in params.items() if k not in ("rope_theta", "partial_rotary_factor")}
    if scaling["rope_type"] == "default":
        scaling = None
    return RopeConfig(theta=params["rope_theta"], partial=params.get("partial_rotary_factor", 1.0),
                      scaling=scaling, max_position=max_position, interleaved=interleaved)


def _hf_frequencies(params: dict, head_dim: int, max_position: int) -> tuple[torch.Tensor, float]:
    cfg = LlamaConfig(hidden_size=head_dim * 2, num_attention_heads=2, head_dim=head_dim,
                      max_position_embeddings=max_position, rope_parameters=dict(params))
    if params["rope_type"] == "default":  # the default lives on each model's rotary class
        dim = int(head_dim * params.get("partial_rotary_factor", 1.0))
        return 1.0 / params["rope_theta"] ** (torch.arange(0, dim, 2).float() / dim), 1.0
    return ROPE_INIT_FUNCTIONS[params["rope_type"]](cfg, None)


@pytest.mark.parametrize("name", sorted(VARIANTS))
def test_frequencies_match_transformers(name):
    params, head_dim, max_position = VARIANTS[name]
    want, want_factor = _hf_frequencies(params, head_dim, max_position)
    rotary = Rotary(_kvlab_rope(params, max_position), head_dim)
    torch.testing.assert_close(rotary.inv_freq, want.float(), atol=0, rtol=1e-6)
    assert rotary.attention_factor == pytest.approx(want_factor, rel=1e-12)


def _positions() -> torch.Tensor:
    return torch.tensor([[0, 1, 2, 7, 300, 5000], [3, 3, 0, 1, 64, 65535]])  # [B, S]


def _hf_cos_sin(inv_freq: torch.Tensor, factor: float) -> tuple[torch.Tensor, torch.Tensor]:
    """transformers' rotary forward: [B, S, rot] tables, cat(freqs, freqs), times the attention factor."""
    freqs = _positions()[..., None].float() * inv_freq
    emb = torch.cat([freqs, freqs], dim=-1)
    return emb.cos() * factor, emb.sin() * factor


def _kvlab_apply(rope: RopeConfig, head_dim: int, x: torch.Tensor) -> torch.Tensor:
    rotary = Rotary(rope, head_dim)
    return rotary.apply(x, *rotary.cos_sin(_positions(), torch.float32))


@pytest.mark.parametrize("name", ["default", "default_partial", "llama3", "yarn", "yarn_partial_no_truncate"])
def test_rotate_half_matches_laguna_apply(name):
    """Rotate-half on the leading ``partial`` slice, the rest passed through (Laguna, Llama, ...)."""
    from transformers.models.laguna.modeling_laguna import apply_rotary_pos_emb

    params, head_dim, max_position = VARIANTS[name]
    x = torch.randn(2, 3, 6, head_dim)
    want, _ = apply_rotary_pos_emb(x, x, *_hf_cos_sin(*_hf_frequencies(params, head_dim, max_position)))
    torch.testing.assert_close(_kvlab_apply(_kvlab_rope(params, max_position), head_dim, x), want,
                               atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("name", ["default", "default_partial", "yarn_partial_no_truncate"])
def test_interleaved_partial_matches_glm_apply(name):
    from transformers.models.glm.modeling_glm import apply_rotary_pos_emb

    params, head_dim, max_position = VARIANTS[name]
    x = torch.randn(2, 3, 6, head_dim)
    want, _ = apply_rotary_pos_emb(x, x, *_hf_cos_sin(*_hf_frequencies(params, head_dim, max_position)))
    got = _kvlab_apply(_kvlab_rope(params, max_position, interleaved=True), head_dim, x)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("name", ["default", "yarn_mscale"])
def test_interleaved_matches_deepseek_v3_up_to_its_deinterleaved_layout(name):
    """DeepSeek V3 returns [even channels | odd channels]; q.k products are the same either way."""
    from transformers.models.deepseek_v3.modeling_deepseek_v3 import apply_rotary_pos_emb_interleave

    params, head_dim, max_position = VARIANTS[name]
    x = torch.randn(2, 3, 6, head_dim)
    want, _ = apply_rotary_pos_emb_interleave(x, x, *_hf_cos_sin(*_hf_frequencies(params, head_dim, max_position)))
    got = _kvlab_apply(_kvlab_rope(params, max_position, interleaved=True), head_dim, x)
    torch.testing.assert_close(torch.cat([got[..., 0::2], got[..., 1::2]], dim=-1), want, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("name", ["proportional", "proportional_full"])
def test_proportional_matches_gemma4_apply(name):
    """Gemma 4 full layers: rotate-half over the whole head; pairs (j, j + D/2) for j < partial*D/2 rotate,
    the rest are identity (zero frequency)."""
    from transformers.models.gemma4.modeling_gemma4 import apply_rotary_pos_emb

    params, head_dim, max_position = VARIANTS[name]
    x = torch.randn(2, 3, 6, head_dim)
    want = apply_rotary_pos_emb(x, *_hf_cos_sin(*_hf_frequencies(params, head_dim, max_position)))
    got = _kvlab_apply(_kvlab_rope(params, max_position), head_dim, x)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    if name == "proportional":  # channels [16, 32) and [48, 64) of 64 pass through unchanged
        torch.testing.assert_close(got[..., 16:32], x[..., 16:32])
        torch.testing.assert_close(got[..., 48:], x[..., 48:])


def test_per_layer_rope_reaches_the_layers():
    """Per-layer theta/partial: each layer's rotary follows its own spec, not the model's."""
    from helpers import build

    layer = {"type": "full", "n_heads": 2, "head_dim": 16}
    model = build({"vocab_size": 31, "d_model": 32, "n_layers": 2, "mlp_hidden": 48,
                   "layers": [layer, {**layer, "rope": {"theta": 5e5, "partial": 0.5, "interleaved": True}}]})
    first, second = (model.layers[i].self_attn.rotary for i in range(2))
    assert (first.rot_dim, first.interleaved) == (16, False)
    assert (second.rot_dim, second.interleaved) == (8, True)
    torch.testing.assert_close(second.inv_freq, 1.0 / 5e5 ** (torch.arange(0, 8, 2).float() / 8))


def test_bad_scaling_is_a_config_error():
    with pytest.raises(ConfigError, match="unsupported RoPE scaling"):
        rope_frequencies(RopeConfig(scaling={"rope_type": "nope"}), 8)
    with pytest.raises(ConfigError, match="rope.scaling.factor"):
        RopeConfig(scaling={"type": "linear"})
