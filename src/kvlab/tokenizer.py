"""Tokenizers: byte-level (vocab 256, no training), a ``tokenizer.json`` or a GGUF file's metadata (BPE via
``tokenizers``), with the chat template and stop tokens a chat needs, and streaming decode."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np


class ByteTokenizer:
    """UTF-8 bytes as token ids 0..255."""

    vocab_size = 256

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def decode(self, ids: list[int]) -> str:
        return bytes(i for i in ids if 0 <= i < 256).decode("utf-8", errors="replace")


class TokenizersTokenizer:
    """A ``tokenizers.Tokenizer`` (``inner``) plus what chat generation needs: the chat template, bos /
    eos strings and the ids generation stops at."""

    def __init__(self, inner, chat_template: str | None = None, stop_ids: Sequence[int] = (),
                 bos_token: str | None = None, eos_token: str | None = None):
        self.inner = inner
        self.vocab_size = inner.get_vocab_size()
        self.chat_template, self.stop_ids = chat_template, list(stop_ids)
        self.bos_token, self.eos_token = bos_token, eos_token

    def encode(self, text: str) -> list[int]:
        return self.inner.encode(text).ids

    def save(self, folder: str | Path) -> list[str]:
        """Write ``tokenizer.json`` and, for the chat template and bos/eos, ``tokenizer_config.json`` into
        ``folder`` (what ``JsonTokenizer`` and transformers read back); returns the file names written."""
        import json

        folder = Path(folder)
        self.inner.save(str(folder / "tokenizer.json"))
        extra = {"bos_token": self.bos_token, "eos_token": self.eos_token, "chat_template": self.chat_template}
        (folder / "tokenizer_config.json").write_text(json.dumps({k: v for k, v in extra.items() if v}, indent=1))
        return ["tokenizer.json", "tokenizer_config.json"]

    def decode(self, ids: list[int]) -> str:
        return self.inner.decode(ids)

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True) -> str:
        """``messages`` (``{"role", "content"}`` dicts) rendered by the model's Jinja chat template in a
        sandbox (a template from a file must not reach Python internals), as transformers does."""
        from jinja2 import TemplateError
        from jinja2.sandbox import ImmutableSandboxedEnvironment

        from kvlab.errors import KvlabError

        if not self.chat_template:
            raise KvlabError("--chat: this model's tokenizer has no chat template")

        def raise_exception(message):
            raise TemplateError(message)

        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
        env.globals["raise_exception"] = raise_exception
        try:
            return env.from_string(self.chat_template).render(
                messages=messages, add_generation_prompt=add_generation_prompt,
                bos_token=self.bos_token or "", eos_token=self.eos_token or "")
        except TemplateError as exc:
            raise KvlabError(f"chat template: {(str(exc).splitlines() or ['invalid'])[0]}") from None


class JsonTokenizer(TokenizersTokenizer):
    """A ``tokenizers`` tokenizer loaded from ``tokenizer.json`` (and, beside it, the chat template and
    eos token of an HF ``tokenizer_config.json`` when there is one)."""

    def __init__(self, path: str | Path):
        from tokenizers import Tokenizer

        from kvlab.errors import KvlabError
        from kvlab.safe_io import MAX_JSON_BYTES, read_text

        self.path = Path(path)
        text = read_text(self.path, MAX_JSON_BYTES, "tokenizer.json")
        try:
            inner = Tokenizer.from_str(text)
        except Exception as exc:  # the tokenizers library raises a bare Exception
            raise KvlabError(f"{path}: not a valid tokenizer.json ({(str(exc).splitlines() or ['?'])[0]})") from None
        extra = hf_tokenizer_config(self.path.parent / "tokenizer_config.json")
        eos = extra.get("eos_token")
        stops = [inner.token_to_id(eos)] if eos and inner.token_to_id(eos) is not None else []
        super().__init__(inner, extra.get("chat_template"), stops, extra.get("bos_token"), eos)


def hf_tokenizer_config(path: Path) -> dict:
    """chat_template / bos_token / eos_token of an HF ``tokenizer_config.json`` ({} when absent)."""
    from kvlab.config import read_config_file

    if not path.is_file():
        return {}
    data = read_config_file(path)
    out = {}
    for key in ("bos_token", "eos_token"):  # a string, or an AddedToken dict with "content"
        value = data.get(key)
        out[key] = value.get("content") if isinstance(value, dict) else value
    if isinstance(data.get("chat_template"), str):
        out["chat_template"] = data["chat_template"]
    elif (path.parent / "chat_template.jinja").is_file():  # where transformers 5 saves it
        out["chat_template"] = (path.parent / "chat_template.jinja").read_text()
    return out


def gguf_tokenizer(path: str | Path) -> TokenizersTokenizer:
    """The tokenizer (and chat template, stop tokens) stored in a GGUF file's metadata."""
    from kvlab.hf.gguf_tokenizer import build_tokenizer, special_tokens
    from kvlab.loading import read_gguf_metadata

    meta, _ = read_gguf_metadata(path)
    specials = special_tokens(meta)
    return TokenizersTokenizer(build_tokenizer(meta, str(path)), specials["chat_template"], specials["stop_ids"],
                               specials["bos_token"], specials["eos_token"])


class StreamDecoder:
    """Text as it grows, one token at a time: ``push(id)`` returns the new text since the last call (empty
    while the tail is an incomplete UTF-8 sequence, so a character split over tokens prints whole)."""

    def __init__(self, tokenizer):
        self.tokenizer, self.ids, self.text = tokenizer, [], ""

    def push(self, token: int) -> str:
        self.ids.append(token)
        text = self.tokenizer.decode(self.ids)
        if text.endswith("\ufffd"):
            return ""
        delta = text[len(self.text):] if text.startswith(self.text) else text
        self.text = text
        return delta


def token_byte_lengths(tokenizer) -> np.ndarray:
    """UTF-8 bytes of text each token id stands for (bits/byte needs them). Byte-level BPE tokens are
    spelled one character per byte, so a token that is half of a character still counts its bytes."""
    if isinstance(tokenizer, ByteTokenizer):
        return np.ones(256, dtype=np.int64)
    from kvlab.hf.gguf_tokenizer import byte_spelling

    inner = tokenizer.inner
    alphabet = set(byte_spelling().values())
    byte_level = type(inner.decoder).__name__ == "ByteLevel"
    special = {t.content for t in inner.get_added_tokens_decoder().values() if t.special}
    lengths = np.zeros(inner.get_vocab_size(), dtype=np.int64)
    for token, index in inner.get_vocab().items():
        if byte_level and set(token) <= alphabet and token not in special:
            lengths[index] = len(token)
        else:
            lengths[index] = len(inner.decode([index], skip_special_tokens=False).encode("utf-8"))
    return lengths


def load_tokenizer(source: str | Path, vocab_size: int | None = None):
    """The tokenizer of a checkpoint: a GGUF file's (or named model's) own, a folder's ``tokenizer.json``
    if present, else byte-level (needs vocab >= 256; e.g. a GGUF written without tokenizer metadata)."""
    from kvlab.loading import gguf_source

    gguf = gguf_source(source)
    path = Path(source) / "tokenizer.json"
    if gguf is not None:
        from kvlab.loading import read_gguf_metadata

        if "tokenizer.ggml.tokens" in read_gguf_metadata(gguf)[0]:
            return gguf_tokenizer(gguf)
    elif path.exists() or path.is_symlink():  # a link is refused by the safe reader, not skipped
        return JsonTokenizer(path)
    if vocab_size is not None and vocab_size < 256:
        from kvlab.errors import KvlabError

        raise KvlabError(f"{source}: no tokenizer and vocab {vocab_size} < 256; use --ids")
    return ByteTokenizer()


def default_cache_dir() -> Path:
    """``$KVLAB_CACHE`` or ``$XDG_CACHE_HOME/kvlab`` (``~/.cache/kvlab``)."""
    import os

    if os.environ.get("KVLAB_CACHE"):
        return Path(os.environ["KVLAB_CACHE"])
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "kvlab"


def train_bpe(texts: list[str], vocab_size: int = 8192, cache_dir: str | Path | None = None) -> JsonTokenizer:
    """A byte-level BPE trained on ``texts`` with ``tokenizers``; cached on disk under a key made of the
    texts' hash and ``vocab_size``, so a second call with the same corpus loads instead of training."""
    import hashlib

    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    from kvlab.checkpoint import atomic_write
    from kvlab.errors import KvlabError

    if vocab_size < 257:
        raise KvlabError(f"bpe vocab_size: must be > 256 (the byte alphabet), got {vocab_size}")
    digest = hashlib.sha256(f"bpe-v1:{vocab_size}".encode())
    for text in texts:
        digest.update(text.encode("utf-8", errors="replace"))
        digest.update(b"\0")
    folder = Path(cache_dir) if cache_dir is not None else default_cache_dir() / "tokenizers"
    path = folder / f"bpe-{vocab_size}-{digest.hexdigest()[:20]}.json"
    if path.exists():
        return JsonTokenizer(path)
    if not any(t.strip() for t in texts):
        raise KvlabError("bpe: no text to train on")
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tokenizer.train_from_iterator(texts, trainer)
    folder.mkdir(parents=True, exist_ok=True)
    atomic_write(path, lambda tmp: tokenizer.save(tmp))
    return JsonTokenizer(path)
