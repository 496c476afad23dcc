"""Multi-query associative recall (MQAR): key-value pairs early in a sequence, queries of the keys later.

Layout of one row (``seq_len + 1`` tokens before the input/target shift)::

    k1 v1 k2 v2 ... kP vP | 0 0 kq vq 0 0 0 kr vr 0 ...

Token 0 is filler, keys come from ``1 .. n_keys`` and values from ``n_keys + 1 .. vocab - 1``. Every key
is queried once, in random order, at random non-overlapping slots of the tail. The answer positions are
the query keys: there the next-token target is the value bound to that key, which only a model that still
holds the early pairs can produce. A window narrower than the gap, or a linear state too small for ``P``
pairs, forgets them. Everything is drawn from a seed on the fly.
"""

from __future__ import annotations

import torch

from kvlab.data.corpus import SeededStream
from kvlab.errors import KvlabError


def key_count(vocab_size: int) -> int:
    """How many token ids serve as keys (the rest after filler are values)."""
    return (vocab_size - 1) // 2


def check_recall(seq_len: int, n_pairs: int, vocab_size: int) -> None:
    """One-line errors for a task that cannot be laid out."""
    if n_pairs < 1:
        raise KvlabError(f"recall: n_pairs must be >= 1, got {n_pairs}")
    if n_pairs > key_count(vocab_size):
        raise KvlabError(f"recall: {n_pairs} pairs need {n_pairs} distinct keys; vocab {vocab_size} has "
                         f"{key_count(vocab_size)}")
    if (seq_len + 1 - 2 * n_pairs) // 2 < n_pairs:
        raise KvlabError(f"recall: seq_len {seq_len} is too short for {n_pairs} pairs and their queries "
                         f"(needs >= {4 * n_pairs - 1})")


def recall_batch(batch: int, seq_len: int, n_pairs: int, vocab_size: int, seed: int
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(inputs, targets, mask)``, each ``[batch, seq_len]``; ``mask`` (bool) marks the answer positions,
    where ``targets`` holds the recalled value. Deterministic from ``seed``."""
    check_recall(seq_len, n_pairs, vocab_size)
    gen = torch.Generator().manual_seed(seed)
    n_keys = key_count(vocab_size)
    keys = torch.rand(batch, n_keys, generator=gen).argsort(dim=1)[:, :n_pairs] + 1  # distinct per row
    values = torch.randint(n_keys + 1, vocab_size, (batch, n_pairs), generator=gen)
    total = seq_len + 1
    rows = torch.zeros(batch, total, dtype=torch.long)
    rows[:, 0: 2 * n_pairs: 2], rows[:, 1: 2 * n_pairs: 2] = keys, values
    order = torch.rand(batch, n_pairs, generator=gen).argsort(dim=1)  # which pair each query asks for
    slots = (total - 2 * n_pairs) // 2
    chosen = torch.rand(batch, slots, generator=gen).argsort(dim=1)[:, :n_pairs].sort(dim=1).values
    where = 2 * n_pairs + 2 * chosen  # [B, P] position of each query key
    rows.scatter_(1, where, keys.gather(1, order))
    rows.scatter_(1, where + 1, values.gather(1, order))
    mask = torch.zeros(batch, total, dtype=torch.bool).scatter_(1, where, True)[:, :seq_len]
    return rows[:, :-1], rows[:, 1:], mask


class RecallStream(SeededStream):
    """MQAR batches as a resumable, rank-sharded stream (see ``SeededStream``)."""

    def __init__(self, seq_len: int, n_pairs: int, vocab_size: int, batch: int, seed: int = 0,
                 rank: int = 0, world: int = 1):
        check_recall(seq_len, n_pairs, vocab_size)
        super().__init__(batch, seed, rank, world)
        self.seq_len, self.n_pairs, self.vocab_size = seq_len, n_pairs, vocab_size

    def batch_at(self, step: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(inputs, targets, mask)`` of this rank, each ``[batch / world, seq_len]``."""
        batch = recall_batch(self.batch, self.seq_len, self.n_pairs, self.vocab_size, self.seed * 1_000_003 + step)
        return tuple(part[self.share()] for part in batch)


@torch.no_grad()
def recall_accuracy(model, seq_len: int, n_pairs: int, n_samples: int = 64, seed: int = 0,
                    batch: int = 16) -> float:
    """Fraction of answer positions where the model's argmax is the bound value (exact match)."""
    was_training = model.training
    model.eval()
    correct = total = 0
    vocab = model.config.vocab_size
    device = next(model.parameters()).device
    try:
        for i, start in enumerate(range(0, n_samples, batch)):
            size = min(batch, n_samples - start)
            inputs, targets, mask = recall_batch(size, seq_len, n_pairs, vocab, seed * 1_000_003 + i)
            predicted = model(inputs.to(device)).argmax(-1).cpu()
            correct += int((predicted == targets)[mask].sum())
            total += int(mask.sum())
    finally:
        model.train(was_training)
    return correct / max(total, 1)
