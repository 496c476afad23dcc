"""GGUF files written here with the ``gguf`` package's own writer, the way llama.cpp's converter writes
them (llama.cpp tensor names, Q/K rows permuted, 1-D tensors in F32), from tiny random kvlab models:
``kvlab.load`` must give back the source weights within each type's quantization error, and refuse
unsupported architectures, tensor types and truncated files in one line."""

from __future__ import annotations

import gguf
import numpy as np
import pytest
import torch

import kvlab
from kvlab.hf import config_from_hf

Q = gguf.GGMLQuantizationType
HF = {"vocab_size": 128, "hidden_size": 64, "num_hidden_layers": 2, "intermediate_size": 96,
      "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 16, "rms_norm_eps": 1e-5,
      "rope_theta": 10000.0, "max_position_embeddings": 256}
NAMES = {"input_layernorm": "attn_norm", "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k",
         "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output", "post_attention_layernorm": "ffn_norm",
         "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down"}


def source_model(model_type: str = "llama", tie: bool = False, **extra) -> kvlab.Model:
    torch.manual_seed(0)
    model = kvlab.Model(config_from_hf({**HF, "model_type": model_type, "tie_word_embeddings": tie, **extra}))
    with torch.no_grad():  # norms and biases away from their init, so a swapped tensor shows
        for name, p in model.named_parameters():
            if p.dim() == 1:
                p.copy_(1 + 0.1 * torch.randn_like(p) if "norm" in name else 0.1 * torch.randn_like(p))
    return model.eval()


def llama_cpp_permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """The converter's reordering: per head, rows (0..D/2-1, D/2..D-1) become interleaved pairs."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def gguf_name(name: str) -> str:
    if name.startswith("layers."):
        _, index, rest = name.split(".", 2)
        module, kind = rest.rsplit(".", 1)
        return f"blk.{index}.{NAMES[module]}.{kind}"
    return {"embed_tokens.weight": "token_embd.weight", "norm.weight": "output_norm.weight",
            "lm_head.weight": "output.weight"}[name]


def write_gguf(model: kvlab.Model, path, qtype, arch: str = "llama", override: dict | None = None,
               extra: list | None = None) -> None:
    """``model`` as a GGUF file: 2-D weights in ``qtype`` (``override``: name -> array written as is;
    ``extra``: more ``(writer method, value)`` metadata calls)."""
    cfg, spec = model.config, model.config.layer(0)
    writer = gguf.GGUFWriter(str(path), arch)
    writer.add_block_count(cfg.n_layers)
    writer.add_context_length(cfg.max_seq_len)
    writer.add_embedding_length(cfg.d_model)
    writer.add_feed_forward_length(cfg.mlp_hidden)
    writer.add_head_count(spec.n_heads)
    writer.add_head_count_kv(spec.n_kv_heads)
    writer.add_rope_freq_base(cfg.rope.theta)
    writer.add_layer_norm_rms_eps(cfg.norm_eps)
    writer.add_rope_dimension_count(spec.head_dim)
    writer.add_vocab_size(cfg.vocab_size)
    for method, value in extra or ():
        getattr(writer, method)(value)
    for name, tensor in model.state_dict().items():
        if name == "lm_head.weight" and cfg.tie_embeddings:
            continue
        w = tensor.float().numpy().copy()
        if arch == "llama" and ".q_proj." in name:
            w = llama_cpp_permute(w, spec.n_heads)
        elif arch == "llama" and ".k_proj." in name:
            w = llama_cpp_permute(w, spec.n_kv_heads)
        if override and gguf_name(name) in override:
            writer.add_tensor(gguf_name(name), override[gguf_name(name)])
        elif w.ndim == 1 or qtype == Q.F32:
            writer.add_tensor(gguf_name(name), w.astype(np.float32))
        elif qtype == Q.F16:
            writer.add_tensor(gguf_name(name), w.astype(np.float16))
        else:
            writer.add_tensor(gguf_name(name), gguf.quants.quantize(w, qtype), raw_dtype=qtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


@pytest.fixture(scope="module")
def llama():
    return source_model()


def test_f16_gguf_matches_source_within_half_precision(llama, tmp_path):
    write_gguf(llama, tmp_path / "m.gguf", Q.F16)
    loaded = kvlab.load(tmp_path / "m.gguf").eval()
    assert loaded.config.n_layers == 2 and loaded.config.layer(0).n_kv_heads == 2
    assert not loaded.config.tie_embeddings and loaded.dtype == torch.float32
    source = llama.state_dict()
    for name, tensor in loaded.state_dict().items():  # fp16 rounding: relative error <= 2^-11
        torch.testing.assert_close(tensor, source[name], rtol=2**-11, atol=1e-7, msg=name)
    ids = torch.randint(0, 128, (2, 24), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids), llama(ids), rtol=1e-2, atol=1e-3)
    assert kvlab.load(tmp_path / "m.gguf", dtype="bfloat16").dtype == torch.bfloat16


def test_q8_0_gguf_matches_source_within_one_quantization_step(tmp_path):
    model = source_model(tie=True)
    write_gguf(model, tmp_path / "q8.gguf", Q.Q8_0)
    loaded = kvlab.load(tmp_path / "q8.gguf").eval()
    assert loaded.config.tie_embeddings and loaded.lm_head.weight is loaded.embed_tokens.weight
    source = model.state_dict()
    for name, tensor in loaded.state_dict().items():
        if tensor.dim() == 1:
            torch.testing.assert_close(tensor, source[name], rtol=0, atol=0, msg=name)
            continue
        blocks = source[name].reshape(-1, 32)  # Q8_0: 32 values share a scale d = amax / 127 (stored
        step = blocks.abs().amax(dim=1, keepdim=True) / 127  # in fp16), each value one int8 q
        error = (tensor.reshape(-1, 32) - blocks).abs()  # |x - q d'| <= d / 2 + 127 |d - d'|, |d - d'| <= d 2^-11
        assert bool((error <= step * (0.5 + 127 * 2**-11)).all()), name
        assert float(error.mean()) > 0  # it really was quantized


def test_qwen2_gguf_has_biases_and_no_permutation(tmp_path):
    model = source_model("qwen2")
    write_gguf(model, tmp_path / "qwen2.gguf", Q.F32, arch="qwen2")
    loaded = kvlab.load(tmp_path / "qwen2.gguf").eval()
    assert loaded.config.layer(0).qkv_bias
    for name, tensor in loaded.state_dict().items():
        torch.testing.assert_close(tensor, model.state_dict()[name], rtol=0, atol=0, msg=name)


def test_unsupported_architecture_tensor_type_and_truncation_fail_in_one_line(llama, tmp_path, capsys):
    from kvlab.cli import main

    write_gguf(llama, tmp_path / "gpt2.gguf", Q.F16, arch="gpt2")
    with pytest.raises(kvlab.UnsupportedError, match="GGUF architecture 'gpt2' is not supported"):
        kvlab.load(tmp_path / "gpt2.gguf")
    ints = {"blk.0.attn_q.weight": np.zeros((64, 64), dtype=np.int32)}
    write_gguf(llama, tmp_path / "i32.gguf", Q.F16, override=ints)
    with pytest.raises(kvlab.UnsupportedError, match="blk.0.attn_q.weight has GGML type I32"):
        kvlab.load(tmp_path / "i32.gguf")
    write_gguf(llama, tmp_path / "full.gguf", Q.F16)
    data = (tmp_path / "full.gguf").read_bytes()
    (tmp_path / "cut.gguf").write_bytes(data[: len(data) // 2])
    with pytest.raises(kvlab.KvlabError, match="cannot read GGUF") as info:
        kvlab.load(tmp_path / "cut.gguf")
    assert "\n" not in str(info.value)
    for argv in (["generate", str(tmp_path / "cut.gguf"), "--ids", "1,2"], ["eval", str(tmp_path / "gpt2.gguf")],
                 ["plan", str(tmp_path / "i32.gguf"), "--context", "64"]):
        code = main(argv)
        err = capsys.readouterr().err
        assert (code, len(err.strip().splitlines())) == ((0, 0) if argv[0] == "plan" else (2, 1)), (argv, err)


def test_plan_reads_a_gguf_without_its_weights(llama, tmp_path):
    write_gguf(llama, tmp_path / "m.gguf", Q.Q8_0)
    plan = kvlab.plan(str(tmp_path / "m.gguf"), context=100)
    assert plan.total_bytes == 2 * 2 * 2 * 16 * 100 * 4  # layers * (K, V) * kv heads * head_dim * tokens * fp32


@pytest.mark.parametrize("qtype", [Q.Q4_0, Q.Q4_1, Q.Q5_0, Q.Q5_1, Q.BF16])
def test_block_quantized_gguf_equals_gguf_dequantization(llama, tmp_path, qtype):
    """Any type the gguf package can write: kvlab's weights are exactly its dequantization of the file
    (blocks run along rows, so the row permutation commutes with quantization)."""
    write_gguf(llama, tmp_path / "q.gguf", qtype)
    loaded = kvlab.load(tmp_path / "q.gguf").state_dict()
    for name, tensor in llama.state_dict().items():
        if tensor.dim() == 2:
            w = tensor.numpy()
            expected = gguf.quants.dequantize(gguf.quants.quantize(w, qtype), qtype).reshape(w.shape)
            torch.testing.assert_close(loaded[name], torch.from_numpy(expected), rtol=0, atol=0, msg=name)


CHAT = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
        "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def write_tokenizer_gguf(path) -> None:
    """A tiny model with a byte-level BPE in its metadata: 256 byte tokens, 2 merges, 3 control tokens."""
    from kvlab.hf.gguf_tokenizer import byte_spelling

    tokens = [byte_spelling()[b] for b in range(256)] + ["hi", "Ġhi", "<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    calls = [("add_tokenizer_model", "gpt2"), ("add_tokenizer_pre", "smollm"), ("add_token_list", tokens),
             ("add_token_types", [1] * 258 + [3] * 3), ("add_token_merges", ["h i", "Ġ hi"]),
             ("add_bos_token_id", 259), ("add_eos_token_id", 260), ("add_chat_template", CHAT)]
    write_gguf(source_model(vocab_size=len(tokens)), path, Q.F16, extra=calls)


def test_gguf_tokenizer_chat_template_and_generate_chat(tmp_path, capsys):
    import transformers

    from kvlab.cli import main
    from kvlab.tokenizer import load_tokenizer

    write_tokenizer_gguf(tmp_path / "tok.gguf")
    tok = load_tokenizer(tmp_path / "tok.gguf")
    assert tok.encode("hi hi") == [256, 257] and tok.encode("<|im_start|>hi 7") == [259, 256, 32, 55]
    assert tok.decode([259, 256, 257, 260]) == "hi hi" and tok.stop_ids == [258, 260]
    assert tok.apply_chat_template([{"role": "user", "content": "hi"}]) == \
        "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    assert main(["generate", str(tmp_path / "tok.gguf"), "--chat", "--prompt", "hi", "--max-new-tokens", "3"]) == 0
    assert "prefill 20 tokens" in capsys.readouterr().err
    # the same tokenizer saved as an HF folder: tokenizer.json + chat template + eos come back
    hf = transformers.PreTrainedTokenizerFast(tokenizer_object=tok.inner, eos_token="<|im_end|>")
    hf.chat_template = CHAT
    hf.save_pretrained(tmp_path / "hf")
    again = load_tokenizer(tmp_path / "hf")
    assert again.encode("<|im_start|>hi hi") == [259, 256, 257] and again.stop_ids == [260]
    assert again.apply_chat_template([{"role": "user", "content": "hi"}]) == tok.apply_chat_template(
        [{"role": "user", "content": "hi"}])


def test_stream_decoder_prints_whole_characters():
    from kvlab.tokenizer import ByteTokenizer, StreamDecoder

    text = "é🦙 x"
    decoder = StreamDecoder(ByteTokenizer())
    deltas = [decoder.push(b) for b in text.encode()]
    assert "".join(deltas) == text and all("\ufffd" not in d for d in deltas)
    assert deltas[:2] == ["", "é"]
