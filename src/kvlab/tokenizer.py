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

        from kvlab.errors import KvlabError
        from kvlab.safe_io import MAX_JSON_BYTES, read_text

        self.path = Path(path)
        text = read_text(self.path, MAX_JSON_BYTES, "tokenizer.json")
        try:
            self.inner = Tokenizer.from_str(text)
        except Exception as exc:  # the tokenizers library raises a bare Exception
            raise KvlabError(f"{path}: not a valid tokenizer.json ({(str(exc).splitlines() or ['?'])[0]})") from None
        self.vocab_size = self.inner.get_vocab_size()

    def encode(self, text: str) -> list[int]:
        return self.inner.encode(text).ids

    def decode(self, ids: list[int]) -> str:
        return self.inner.decode(ids)


def load_tokenizer(folder: str | Path, vocab_size: int | None = None):
    """The checkpoint folder's ``tokenizer.json`` if present, else byte-level (needs vocab >= 256)."""
    path = Path(folder) / "tokenizer.json"
    if path.exists() or path.is_symlink():
        return JsonTokenizer(path)
    if vocab_size is not None and vocab_size < 256:
        from kvlab.errors import KvlabError

        raise KvlabError(f"{folder}: no tokenizer.json and vocab {vocab_size} < 256; use --ids")
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
