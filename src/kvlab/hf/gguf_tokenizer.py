"""A GGUF file's tokenizer as a ``tokenizers.Tokenizer``, built from its metadata (a pure mapping, no I/O).

llama.cpp stores a byte-level BPE (``tokenizer.ggml.model = "gpt2"``) as its token list (already spelled
in GPT-2's byte alphabet), merges, token types (3 = control, 4 = user-defined) and the name of the
pre-tokenizer (``tokenizer.ggml.pre``), which stands for the regex split the vocabulary was trained with.
"""

from __future__ import annotations

from kvlab.errors import UnsupportedError

CONTROL, USER_DEFINED = 3, 4
GPT2_SPLIT = "gpt2"  # ByteLevel's built-in GPT-2 regex
# llama.cpp's pre-tokenizer names -> the split before the byte-level mapping (names sharing a regex there)
LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
                r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
               r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
PRE_TOKENIZERS = {
    **dict.fromkeys(("gpt2", "mpt", "olmo", "jais"), (GPT2_SPLIT, False)),
    # single digits first, then the GPT-2 regex
    **dict.fromkeys(("smollm", "starcoder", "refact", "command-r", "codeshell"), (GPT2_SPLIT, True)),
    **dict.fromkeys(("llama3", "llama-bpe", "llama-v3", "smaug-bpe", "dbrx"), (LLAMA3_SPLIT, False)),
    **dict.fromkeys(("qwen2", "deepseek-r1-qwen"), (QWEN2_SPLIT, False)),
}
# end-of-turn tokens a chat should stop at, besides eos (when the vocabulary marks them as control)
TURN_ENDS = ("<|im_end|>", "<|eot_id|>", "<|eom_id|>", "<|end|>", "<end_of_turn>", "<|endoftext|>")


def build_tokenizer(meta: dict, where: str = "gguf"):
    """The ``tokenizers.Tokenizer`` a GGUF's metadata describes (byte-level BPE only)."""
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers, processors

    kind = meta.get("tokenizer.ggml.model")
    if kind != "gpt2":
        raise UnsupportedError(f"{where}: GGUF tokenizer model {kind!r} is not supported (byte-level BPE 'gpt2' only)")
    pre = meta.get("tokenizer.ggml.pre", "gpt2")
    if pre not in PRE_TOKENIZERS:
        raise UnsupportedError(f"{where}: GGUF pre-tokenizer {pre!r} is not supported "
                               f"(supported: {', '.join(sorted(PRE_TOKENIZERS))})")
    tokens = list(meta["tokenizer.ggml.tokens"])
    types = list(meta.get("tokenizer.ggml.token_type") or [1] * len(tokens))
    alphabet = set(pre_tokenizers.ByteLevel.alphabet())
    spell = byte_spelling()
    vocab = {}
    for index, token in enumerate(tokens):  # a token outside the byte alphabet is respelled byte by byte
        vocab.setdefault(token if set(token) <= alphabet else "".join(spell[b] for b in token.encode()), index)
    merges = [tuple(m.split(" ", 1)) for m in meta.get("tokenizer.ggml.merges", [])]
    split, single_digits = PRE_TOKENIZERS[pre]
    tokenizer = Tokenizer(models.BPE(vocab, merges, fuse_unk=False, ignore_merges=split == LLAMA3_SPLIT))
    if split == GPT2_SPLIT:
        steps = [pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)]
    else:
        steps = [pre_tokenizers.Split(Regex(split), behavior="isolated"),
                 pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)]
    if single_digits:
        steps.insert(0, pre_tokenizers.Digits(individual_digits=True))
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(steps)
    tokenizer.decoder = decoders.ByteLevel()
    # control tokens match whole in the text and decode to nothing; user-defined ones match whole too
    tokenizer.add_special_tokens([AddedToken(t, special=True, normalized=False)
                                  for t, k in zip(tokens, types) if k == CONTROL and set(t) <= alphabet])
    tokenizer.add_tokens([AddedToken(t, special=False, normalized=False)
                          for t, k in zip(tokens, types) if k == USER_DEFINED and t in vocab])
    bos = meta.get("tokenizer.ggml.bos_token_id")
    if meta.get("tokenizer.ggml.add_bos_token") and bos is not None:
        tokenizer.post_processor = processors.TemplateProcessing(
            single=f"{tokens[bos]} $A", pair=f"{tokens[bos]} $A $B", special_tokens=[(tokens[bos], bos)])
    return tokenizer


def byte_spelling() -> dict[int, str]:
    """GPT-2's byte -> printable character table (printable Latin-1 bytes stand for themselves)."""
    kept = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    table, extra = {b: chr(b) for b in kept}, 0
    for b in range(256):
        if b not in table:
            table[b], extra = chr(256 + extra), extra + 1
    return table


def special_tokens(meta: dict) -> dict:
    """bos / eos strings and ids, the stop ids (eos, eot and control end-of-turn tokens) and the chat
    template of a GGUF's metadata."""
    tokens = meta.get("tokenizer.ggml.tokens") or []
    types = meta.get("tokenizer.ggml.token_type") or []
    name = lambda i: tokens[i] if i is not None and 0 <= i < len(tokens) else None  # noqa: E731
    bos, eos = meta.get("tokenizer.ggml.bos_token_id"), meta.get("tokenizer.ggml.eos_token_id")
    stops = {i for i in (eos, meta.get("tokenizer.ggml.eot_token_id"), meta.get("tokenizer.ggml.eom_token_id"))
             if name(i) is not None}
    stops |= {i for i, (t, k) in enumerate(zip(tokens, types)) if k == CONTROL and t in TURN_ENDS}
    return {"bos_token": name(bos), "eos_token": name(eos), "bos_id": bos, "eos_id": eos,
            "stop_ids": sorted(stops), "chat_template": meta.get("tokenizer.chat_template")}
