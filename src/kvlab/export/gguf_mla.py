"""GGUF ``deepseek2`` (MLA) for llama.cpp: every layer dense, ``q_lora_rank`` as kvlab's.

llama.cpp's MLA graph caches the latent ``[c ; k_R]`` as one KV head (key length ``r + d_R``, value length
``r``) and absorbs the up-projections: ``kv_b_proj`` is split per head into ``attn_k_b`` (W_UK transposed,
``[H, r, d_nope]``) and ``attn_v_b`` (``[H, d_v, r]``), as llama.cpp's ``convert_hf_to_gguf`` does. It rotates
interleaved pairs: a rotate-half kvlab model gets its RoPE rows permuted. Its latent norm uses the model's
``rms_norm_eps`` while kvlab's uses 1e-6, so ``norm_eps`` must be 1e-6 for an exact file.

The llama.cpp vendored in llama-cpp-python 0.3.36 decides by layer count whether a deepseek2 model has a
q LoRA ("lite": 26 or 27 layers, or 48 with a 128,256 vocabulary, have none); any other model must have
``q_lora_rank``, and a dense-q one (``q_lora_rank`` null) with another layer count is refused here rather
than written as a file llama.cpp rejects.
"""

from __future__ import annotations

import torch

from kvlab.attention.mla import LATENT_NORM_EPS
from kvlab.export.gguf import _tensor_names, permute_rows, write_file
from kvlab.export.layout import Layout, refuse
from kvlab.export.outdir import OutputFolder


def llamacpp_lite(config) -> bool:
    """llama.cpp 0.3.36's test for a deepseek2 model without q LoRA."""
    return config.n_layers in (26, 27) or (config.n_layers == 48 and config.vocab_size == 128256)


def ensure_deepseek2(config, layout: Layout) -> None:
    spec = layout.spec
    if spec.q_lora_rank is None and not llamacpp_lite(config):
        raise refuse(config, f"MLA with a full-rank query and {config.n_layers} layers",
                     "such deepseek2 GGUF in llama.cpp 0.3.36 (it expects a q LoRA unless the model has 26 or 27 "
                     "layers); use --format hf")
    if spec.q_lora_rank is not None and llamacpp_lite(config):
        raise refuse(config, f"MLA with a q LoRA and {config.n_layers} layers",
                     "such deepseek2 GGUF in llama.cpp 0.3.36 (26/27-layer models are read without q LoRA)")
    if abs(config.norm_eps - LATENT_NORM_EPS) > 1e-12 or spec.qkv_bias or spec.rope.scaling:
        raise refuse(config, "MLA with norm_eps != 1e-6, biases or RoPE scaling",
                     "such deepseek2 GGUF in kvlab's writer (one norm eps, no biases, plain RoPE); use --format hf")


def write_deepseek2(model, layout: Layout, out: OutputFolder, source, qtype: str = "f32") -> dict:
    """Write ``model-<qtype>.gguf`` (deepseek2 arch); returns ``{"file": name, "tokenizer": ...}``."""
    ensure_deepseek2(model.config, layout)
    return write_file(model, out, "deepseek2", qtype, source, deepseek2_metadata, deepseek2_tensors(model, layout))


def deepseek2_metadata(writer, spec, config) -> dict:
    writer.add_head_count_kv(1)
    writer.add_key_length(spec.kv_lora_rank + spec.qk_rope_head_dim)
    writer.add_value_length(spec.kv_lora_rank)
    writer.add_key_length_mla(spec.qk_nope_head_dim + spec.qk_rope_head_dim)
    writer.add_value_length_mla(spec.v_head_dim)
    writer.add_kv_lora_rank(spec.kv_lora_rank)
    if spec.q_lora_rank is not None:
        writer.add_q_lora_rank(spec.q_lora_rank)
    writer.add_rope_dimension_count(spec.qk_rope_head_dim)
    writer.add_rope_freq_base(float(spec.rope.theta))
    writer.add_leading_dense_block_count(config.n_layers)
    writer.add_expert_feed_forward_length(config.mlp_hidden)
    writer.add_expert_count(0)
    writer.add_expert_used_count(0)
    writer.add_expert_shared_count(0)
    writer.add_expert_weights_scale(1.0)
    return {}


def _interleave_rope_rows(w: torch.Tensor, heads: int, nope: int, rope: int) -> torch.Tensor:
    """Permute the RoPE rows ``[nope, nope + rope)`` of each of ``heads`` row groups to interleaved order."""
    w = w.view(heads, nope + rope, *w.shape[1:]).clone()
    w[:, nope:] = permute_rows(w[:, nope:].reshape(heads * rope, *w.shape[2:]), heads).view(heads, rope, *w.shape[2:])
    return w.reshape(heads * (nope + rope), *w.shape[2:])


def deepseek2_tensors(model, layout: Layout) -> dict[str, torch.Tensor]:
    spec, config = layout.spec, model.config
    heads, nope, rope, rank = spec.n_heads, spec.qk_nope_head_dim, spec.qk_rope_head_dim, spec.kv_lora_rank
    state = {k: v.detach().float().contiguous() for k, v in model.state_dict().items()}
    out = {"token_embd.weight": state["embed_tokens.weight"], "output_norm.weight": state["norm.weight"]}
    if not config.tie_embeddings:
        out["output.weight"] = state["lm_head.weight"]
    for i in range(config.n_layers):
        out.update({gg: state[kv] for kv, gg in _tensor_names(i).items() if ".self_attn." not in kv})
        p, b = f"layers.{i}.self_attn.", f"blk.{i}."
        q_name = "q_b_proj" if spec.q_lora_rank else "q_proj"
        q = state[p + f"{q_name}.weight"]
        kv_a = state[p + "kv_a_proj_with_mqa.weight"]
        if not spec.rope.interleaved:
            q = _interleave_rope_rows(q, heads, nope, rope)
            kv_a = torch.cat([kv_a[:rank], permute_rows(kv_a[rank:], 1)])
        out[b + ("attn_q_b.weight" if spec.q_lora_rank else "attn_q.weight")] = q
        if spec.q_lora_rank:
            out[b + "attn_q_a.weight"] = state[p + "q_a_proj.weight"]
            out[b + "attn_q_a_norm.weight"] = state[p + "q_a_layernorm.weight"]
        out[b + "attn_kv_a_mqa.weight"] = kv_a
        out[b + "attn_kv_a_norm.weight"] = state[p + "kv_a_layernorm.weight"]
        kv_b = state[p + "kv_b_proj.weight"].view(heads, nope + spec.v_head_dim, rank)
        out[b + "attn_k_b.weight"] = kv_b[:, :nope].transpose(1, 2).contiguous()  # [H, r, d_nope]
        out[b + "attn_v_b.weight"] = kv_b[:, nope:].contiguous()  # [H, d_v, r]
        out[b + "attn_output.weight"] = state[p + "o_proj.weight"]
    return out
