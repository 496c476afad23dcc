"""Tokenizers: byte-level (vocab 256, no training) or a ``tokenizer.json`` (BPE via ``tokenizers``)."""

from __future__ import annotations

from pathlib import Path


class ByteTokenizer:
    """UTF-8 bytes as token ids 0..255."""

    vocab_size = 256

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def decode(self, ids: list[int]) -> str:
        return bytes(i for i in ids if 0 <= i < 256).decode("utf-8", errors="replace")


class JsonTokenizer:
    """A ``tokenizers`` tokenizer loaded from ``tokenizer.json``."""

    def __init__(self, path: str | Path):
        from tokenizers import Tokenizer

        self.inner = Tokenizer.from_file(str(path))
        self.vocab_size = self.inner.get_vocab_size()

    def encode(self, text: str) -> list[int]:
        return self.inner.encode(text).ids

    def decode(self, ids: list[int]) -> str:
        return self.inner.decode(ids)


def load_tokenizer(folder: str | Path, vocab_size: int | None = None):
    """The checkpoint folder's ``tokenizer.json`` if present, else byte-level (needs vocab >= 256)."""
    path = Path(folder) / "tokenizer.json"
    if path.exists():
        return JsonTokenizer(path)
    if vocab_size is not None and vocab_size < 256:
        from kvlab.errors import KvlabError

        raise KvlabError(f"{folder}: no tokenizer.json and vocab {vocab_size} < 256; use --ids")
    return ByteTokenizer()
