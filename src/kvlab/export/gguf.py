"""GGUF export for llama.cpp, written with the ``gguf`` package's ``GGUFWriter``.

``llama`` architecture for full-attention MHA/GQA/MQA models in F32, F16 or Q8_0 (norms stay F32; a
matrix whose rows do not split into 32-value blocks stays F16 under Q8_0). llama.cpp's llama graph rotates
interleaved pairs, kvlab (like HF) rotates halves: q/k rows are permuted per head so that both compute the
same scores (llama.cpp's ``convert_hf_to_gguf`` does the same). llama3 RoPE scaling becomes the
``rope_freqs`` tensor, linear scaling the ``rope.scaling`` keys. The tokenizer (a byte-level BPE
``tokenizer.json``) is written as ``tokenizer.ggml.*`` metadata; without one, a placeholder vocabulary of
the right size lets llama.cpp load the file (ids in, ids out). MLA models become ``deepseek2`` files
(``gguf_mla.py``).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from kvlab.export.layout import Layout, refuse
from kvlab.export.outdir import OutputFolder

GGUF_TYPES = ("f32", "f16", "q8_0")


def permute_rows(w: torch.Tensor, heads: int) -> torch.Tensor:
    """Rotate-half row order -> interleaved-pair row order within each head (``[heads * d, ...]``)."""
    return w.reshape(heads, 2, w.shape[0] // heads // 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


def _tensor_names(i: int) -> dict[str, str]:
    p = f"layers.{i}."
    return {p + "input_layernorm.weight": f"blk.{i}.attn_norm.weight",
            p + "post_attention_layernorm.weight": f"blk.{i}.ffn_norm.weight",
            p + "mlp.gate_proj.weight": f"blk.{i}.ffn_gate.weight",
            p + "mlp.up_proj.weight": f"blk.{i}.ffn_up.weight",
            p + "mlp.down_proj.weight": f"blk.{i}.ffn_down.weight",
            **{p + f"self_attn.{hf}.{kind}": f"blk.{i}.{gg}.{kind}"
               for hf, gg in (("q_proj", "attn_q"), ("k_proj", "attn_k"), ("v_proj", "attn_v"), ("o_proj", "attn_output"))
               for kind in ("weight", "bias")}}


def llama_tensors(model, layout: Layout) -> dict[str, torch.Tensor]:
    """GGUF names -> fp32 tensors, q/k permuted for llama.cpp's RoPE layout."""
    spec, config = layout.spec, model.config
    names = {"embed_tokens.weight": "token_embd.weight", "norm.weight": "output_norm.weight"}
    if not config.tie_embeddings:
        names["lm_head.weight"] = "output.weight"
    for i in range(config.n_layers):
        names.update(_tensor_names(i))
    out = {}
    for name, tensor in model.state_dict().items():
        if name not in names:
            continue
        tensor = tensor.detach().float().contiguous()
        if ".q_proj." in name:
            tensor = permute_rows(tensor, spec.n_heads)
        elif ".k_proj." in name:
            tensor = permute_rows(tensor, spec.n_kv_heads)
        out[names[name]] = tensor
    return out


def _llama_metadata(writer, spec, config) -> dict[str, torch.Tensor]:
    """Attention and RoPE keys of the llama arch; returns extra tensors (``rope_freqs`` for llama3 scaling)."""
    import gguf

    from kvlab.rope import rope_frequencies

    writer.add_head_count_kv(spec.n_kv_heads)
    writer.add_key_length(spec.head_dim)
    writer.add_value_length(spec.head_dim)
    writer.add_rope_freq_base(float(spec.rope.theta))
    writer.add_rope_dimension_count(spec.head_dim)
    scaling = spec.rope.scaling or {}
    kind = scaling.get("rope_type", scaling.get("type", "default"))
    if kind == "default":
        return {}
    if kind == "linear":
        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(float(scaling["factor"]))
        return {}
    if kind == "llama3":
        plain, _ = rope_frequencies(type(spec.rope)(theta=spec.rope.theta), spec.head_dim)
        scaled, _ = rope_frequencies(spec.rope, spec.head_dim)
        return {"rope_freqs.weight": (plain / scaled).float()}
    raise AssertionError(kind)  # ensure_llama refused it


def _encode(name: str, tensor: torch.Tensor, qtype: str):
    """(array, raw ggml type or None) for one tensor under the chosen file type."""
    import gguf

    data = tensor.numpy()
    if tensor.dim() == 1 or qtype == "f32":
        return data.astype(np.float32), None
    if qtype == "q8_0" and data.shape[-1] % 32 == 0:
        kind = gguf.GGMLQuantizationType.Q8_0
        return gguf.quants.quantize(data.astype(np.float32), kind), kind
    return data.astype(np.float16), None


def _tokenizer_metadata(writer, source: Path | None, vocab_size: int) -> str:
    """Write ``tokenizer.ggml.*``; returns what was written (for the check report)."""
    import gguf

    if source is not None and (source / "tokenizer.json").is_file():
        try:
            vocab = gguf.vocab.BpeVocab(source)
        except (FileNotFoundError, ValueError):
            vocab = None
        if vocab is not None:
            tokens, types = [], []
            for text, _, kind in vocab.all_tokens():
                tokens.append(text if isinstance(text, bytes) else text.encode("utf-8"))
                types.append(kind)
            tokens, types = tokens[:vocab_size], types[:vocab_size]
            for i in range(len(tokens), vocab_size):  # the model may have more rows than the tokenizer
                tokens.append(f"[PAD{i}]".encode())
                types.append(gguf.TokenType.UNUSED)
            writer.add_tokenizer_model("gpt2")
            writer.add_tokenizer_pre("default")
            writer.add_token_list(tokens)
            writer.add_token_types(types)
            gguf.SpecialVocab(source, load_merges=True, n_vocab=vocab_size).add_to_gguf(writer, quiet=True)
            return "tokenizer.json (gpt2 BPE)"
    # placeholder vocabulary: one control token, the rest plain pieces (llama.cpp needs a vocabulary to load)
    writer.add_tokenizer_model("llama")
    writer.add_token_list([f"<t{i}>".encode() for i in range(vocab_size)])
    writer.add_token_scores([0.0] * vocab_size)
    writer.add_token_types([gguf.TokenType.CONTROL] + [gguf.TokenType.NORMAL] * (vocab_size - 1))
    writer.add_bos_token_id(0)
    writer.add_eos_token_id(0)
    return "placeholder (no tokenizer.json)"


def ensure_llama(config, layout: Layout) -> None:
    """Refuse (one line) what kvlab's llama-arch GGUF writer cannot represent exactly."""
    if layout.family != "llama":
        what = {"mistral": "sliding-window attention", "qwen2": "q/k/v biases or sliding windows",
                "gemma4_text": "the Gemma 4 architecture"}[layout.family]
        raise refuse(config, f"{what} ({layout.family})", f"{what} in kvlab's GGUF writer, which writes "
                     "llama and deepseek2 GGUFs; use --format hf")
    kind = (layout.spec.rope.scaling or {}).get("rope_type", (layout.spec.rope.scaling or {}).get("type", "default"))
    if kind not in ("default", "linear", "llama3"):
        raise refuse(config, f"{kind} RoPE scaling", f"{kind} RoPE scaling in kvlab's GGUF writer (llama arch)")


def write_llama(model, layout: Layout, out: OutputFolder, source: Path | None, qtype: str = "f32") -> dict:
    """Write ``model-<qtype>.gguf`` (llama arch); returns ``{"file": name, "tokenizer": ...}``."""
    ensure_llama(model.config, layout)
    return write_file(model, out, "llama", qtype, source, _llama_metadata, llama_tensors(model, layout))


def write_file(model, out: OutputFolder, arch: str, qtype: str, source, metadata, tensors: dict) -> dict:
    """The GGUF file: ``metadata(writer, spec, config)`` (returns extra tensors), tokenizer, tensors."""
    import gguf

    config, spec = model.config, model.config.layer(0)
    name = f"model-{qtype}.gguf"
    writer = gguf.GGUFWriter(str(out.file(name)), arch)
    writer.add_name(config.name)
    writer.add_vocab_size(config.vocab_size)
    writer.add_context_length(spec.rope.max_position or config.max_seq_len)
    writer.add_embedding_length(config.d_model)
    writer.add_block_count(config.n_layers)
    writer.add_feed_forward_length(config.mlp_hidden)
    writer.add_head_count(spec.n_heads)
    writer.add_layer_norm_rms_eps(config.norm_eps)
    file_type = {"f32": gguf.LlamaFileType.ALL_F32, "f16": gguf.LlamaFileType.MOSTLY_F16,
                 "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0}[qtype]
    writer.add_file_type(int(file_type))
    extra = metadata(writer, spec, config)
    tokenizer = _tokenizer_metadata(writer, source, config.vocab_size)
    for tname, tensor in {**tensors, **extra}.items():
        data, raw = _encode(tname, tensor, qtype)
        writer.add_tensor(tname, data, raw_dtype=raw)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return {"file": name, "tokenizer": tokenizer}
