"""Training text: a corpus split into train / val / test, and a seeded contiguous-chunk sampler.

The default corpus is the running interpreter's standard-library source (about 30 MB of Python on every
machine, no download). Files are assigned to splits by a hash of their path, so the split never depends
on file order or on which other files exist. Alternatives: one text file, a folder of text files, or a
JSONL file whose records have a ``"text"`` field.
"""

from __future__ import annotations

import hashlib
import json
import sysconfig
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from kvlab.errors import KvlabError
from kvlab.safe_io import regular_file

SPLITS = ("train", "val", "test")
TEXT_SUFFIXES = {".txt", ".md", ".rst", ".py", ".text", ""}
_BLOCK_CHARS = 1 << 16  # a single text file is cut into blocks of about this size before splitting


@dataclass
class Corpus:
    """Documents per split, plus a name saying where they came from."""

    source: str
    splits: dict[str, list[str]] = field(default_factory=dict)

    def texts(self, split: str) -> list[str]:
        return self.splits[split]

    def fingerprint(self, split: str = "train") -> str:
        """sha256 of a split's documents: the cache key of tokenizers and token ids built from it."""
        digest = hashlib.sha256()
        for text in self.splits[split]:
            digest.update(text.encode("utf-8", errors="replace"))
            digest.update(b"\0")
        return digest.hexdigest()

    def num_chars(self) -> dict[str, int]:
        return {name: sum(len(t) for t in texts) for name, texts in self.splits.items()}


def split_of(key: str, fractions: tuple[float, float] = (0.9, 0.05)) -> str:
    """Deterministic split of a document named ``key`` (a relative path): train / val / test."""
    u = int.from_bytes(hashlib.sha256(key.encode()).digest()[:8], "big") / 2**64
    if u < fractions[0]:
        return "train"
    return "val" if u < fractions[0] + fractions[1] else "test"


def stdlib_files() -> tuple[Path, list[Path]]:
    """The standard library root and its ``.py`` files (sorted), without installed packages."""
    root = Path(sysconfig.get_paths()["stdlib"])
    skip = {"site-packages", "dist-packages", "__pycache__"}
    files = sorted(p for p in root.rglob("*.py") if not skip & set(p.relative_to(root).parts) and p.is_file())
    return root, files


def load_corpus(path: str | Path | None = None, max_chars: int | None = None) -> Corpus:
    """The corpus at ``path`` (None: the standard library). ``max_chars`` caps each split (quick runs).

    A missing path or a corpus without text is a one-line ``KvlabError``."""
    if path is None:
        root, files = stdlib_files()
        docs = [(str(p.relative_to(root)), p) for p in files]
        source = f"stdlib:{root}"
    else:
        path = Path(path)
        if not path.exists():
            raise KvlabError(f"{path}: no such corpus file or folder")
        source = str(path)
        if path.is_dir():
            files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in TEXT_SUFFIXES
                           and not any(part.startswith(".") for part in p.relative_to(path).parts))
            docs = [(str(p.relative_to(path)), p) for p in files]
        elif path.suffix.lower() == ".jsonl":
            return _finish(source, _jsonl_docs(path), max_chars)
        else:
            return _finish(source, _blocks(path.name, _read(path)), max_chars)
    return _finish(source, [(key, _read(p)) for key, p in docs], max_chars)


def _read(path: Path) -> str:
    regular_file(path, "corpus file")  # a device (/dev/zero) or FIFO would be read without end
    try:
        return path.read_text(encoding="utf-8", errors="replace")
    except OSError as exc:
        raise KvlabError(f"{path}: cannot read ({exc.strerror})") from None


def _jsonl_docs(path: Path) -> list[tuple[str, str]]:
    docs = []
    for n, line in enumerate(_read(path).splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            raise KvlabError(f"{path}:{n}: not valid JSON ({exc.msg})") from None
        if not isinstance(record, dict) or not isinstance(record.get("text"), str):
            raise KvlabError(f"{path}:{n}: expected an object with a string field \"text\"")
        docs.append((f"{path.name}#{n}", record["text"]))
    return docs


def _blocks(name: str, text: str) -> list[tuple[str, str]]:
    """Cut one long text into line-aligned blocks so that it can be split like a folder of files."""
    out, start = [], 0
    while start < len(text):
        end = text.find("\n", start + _BLOCK_CHARS)
        end = len(text) if end < 0 else end + 1
        out.append((f"{name}#{len(out)}", text[start:end]))
        start = end
    return out


def _finish(source: str, docs: list[tuple[str, str]], max_chars: int | None) -> Corpus:
    docs = [(key, text) for key, text in docs if text.strip()]
    if not docs:
        raise KvlabError(f"{source}: corpus holds no text")
    splits: dict[str, list[str]] = {name: [] for name in SPLITS}
    for key, text in docs:
        splits[split_of(key)].append(text)
    if not splits["val"] or not splits["test"]:  # too few documents: cut the concatenation 90 / 5 / 5 instead
        whole = "\n".join(text for _, text in docs)
        a, b = int(len(whole) * 0.9), int(len(whole) * 0.95)
        splits = {"train": [whole[:a]], "val": [whole[a:b]], "test": [whole[b:]]}
    if max_chars is not None:
        splits = {name: cap_texts(texts, max_chars) for name, texts in splits.items()}
    return Corpus(source, splits)


def cap_texts(texts: list[str], max_chars: int) -> list[str]:
    """The leading documents of ``texts`` holding ``max_chars`` characters (the last one cut)."""
    out, used = [], 0
    for text in texts:
        if used >= max_chars:
            break
        out.append(text[: max_chars - used])
        used += len(out[-1])
    return out


# ---- token ids ---------------------------------------------------------------------------------------
def encode_texts(texts: list[str], tokenizer) -> np.ndarray:
    """All documents as one id stream (int32), documents joined by a newline. Bytes take a fast path."""
    from kvlab.tokenizer import ByteTokenizer

    if isinstance(tokenizer, ByteTokenizer):
        return np.frombuffer("\n".join(texts).encode("utf-8"), dtype=np.uint8).astype(np.int32)
    inner = getattr(tokenizer, "inner", None)
    if inner is not None:  # tokenizers: batch-encode in parallel
        pieces = [np.asarray(e.ids, dtype=np.int32) for e in inner.encode_batch([t + "\n" for t in texts])]
    else:
        pieces = [np.asarray(tokenizer.encode(t + "\n"), dtype=np.int32) for t in texts]
    return np.concatenate(pieces) if pieces else np.zeros(0, dtype=np.int32)


class SeededStream:
    """A resumable stream of batches: batch ``k`` is a pure function of ``(seed, k)``, so the whole
    position is the counter ``step`` (``state_dict`` / ``load_state_dict`` resume bit-exactly). Under data
    parallelism every rank draws the same global batch of ``batch`` rows and keeps its contiguous share."""

    def __init__(self, batch: int, seed: int, rank: int, world: int):
        if batch % world:
            raise KvlabError(f"batch {batch} is not divisible by the {world} processes")
        self.batch, self.seed, self.rank, self.world = batch, seed, rank, world
        self.step = 0

    def batch_at(self, step: int) -> tuple[torch.Tensor, ...]:
        raise NotImplementedError

    def next_batch(self) -> tuple[torch.Tensor, ...]:
        batch = self.batch_at(self.step)
        self.step += 1
        return batch

    def generator(self, step: int) -> torch.Generator:
        return torch.Generator().manual_seed(self.seed * 1_000_003 + step)

    def share(self) -> slice:
        """This rank's rows of the global batch."""
        size = self.batch // self.world
        return slice(self.rank * size, (self.rank + 1) * size)

    def state_dict(self) -> dict:
        return {"seed": self.seed, "step": self.step}

    def load_state_dict(self, state: dict) -> None:
        self.seed, self.step = int(state["seed"]), int(state["step"])


class ChunkSampler(SeededStream):
    """Random contiguous chunks of ``seq_len + 1`` ids (inputs and next-token targets) from one id stream."""

    def __init__(self, ids: np.ndarray, seq_len: int, batch: int, seed: int = 0, rank: int = 0,
                 world: int = 1):
        if len(ids) < seq_len + 2:
            raise KvlabError(f"corpus split has {len(ids)} tokens, fewer than one sequence of {seq_len} + 1")
        super().__init__(batch, seed, rank, world)
        self.ids = torch.from_numpy(np.ascontiguousarray(ids, dtype=np.int64))
        self.seq_len = seq_len

    def batch_at(self, step: int) -> tuple[torch.Tensor, torch.Tensor]:
        """``(inputs, targets)``, each ``[batch / world, seq_len]`` int64."""
        starts = torch.randint(0, len(self.ids) - self.seq_len - 1, (self.batch,), generator=self.generator(step))
        rows = self.ids[starts[self.share()][:, None] + torch.arange(self.seq_len + 1)]  # [rows, seq_len + 1]
        return rows[:, :-1], rows[:, 1:]


def split_ids(corpus: Corpus, split: str, tokenizer, cache_dir: str | Path | None = None) -> np.ndarray:
    """``encode_texts`` of one split, cached as ``.npy`` (keyed by the split's and the tokenizer's hashes)
    for tokenizers slower than bytes, so a 30 MB corpus is encoded once per machine."""
    from kvlab.tokenizer import ByteTokenizer, default_cache_dir

    if isinstance(tokenizer, ByteTokenizer) or getattr(tokenizer, "inner", None) is None:
        return encode_texts(corpus.texts(split), tokenizer)
    tok_hash = hashlib.sha256(tokenizer.inner.to_str().encode()).hexdigest()[:16]
    folder = Path(cache_dir) if cache_dir is not None else default_cache_dir() / "ids"
    path = folder / f"{corpus.fingerprint(split)[:20]}-{tok_hash}.npy"
    if path.exists():
        return np.load(path)
    ids = encode_texts(corpus.texts(split), tokenizer)
    folder.mkdir(parents=True, exist_ok=True)
    from kvlab.checkpoint import atomic_write

    def write(tmp: str) -> None:
        with open(tmp, "wb") as handle:
            np.save(handle, ids)

    atomic_write(path, write)
    return ids
