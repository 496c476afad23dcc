"""Multi-query associative recall (MQAR): key-value pairs early in a sequence, queries of the keys later.

Two layouts of one row. ``pairs`` (Zoology's MQAR; ``seq_len + 1`` tokens before the input/target shift)::

    k1 v1 k2 v2 ... kP vP | 0 0 kq vq 0 0 0 kr vr 0 ...

``fused`` (one token per pair after a lead of ``P`` filler tokens; targets only at the queries)::

    0 ... 0 (k1,v1) (k2,v2) ... (kP,vP) | 0 0 kq 0 0 0 kr 0 ...     target at kq: vq

Token 0 is filler. The lead keeps the pairs off the first positions, which attention sinks and global
blocks keep whatever they hold: the test is of what a layer keeps from the middle of its context. Every key is queried once, in random order, at random slots of the tail; at the query
the target is the value bound to that key, which only a model that still holds the early pairs can
produce. A window narrower than the distance, or a linear state too small for ``P`` pairs, forgets them.

Why two layouts: recalling a two-token pair takes an induction circuit (a previous-token head feeding a
matching head), which small models form only after many thousands of steps; before that they plateau on a
shortcut (guess a value seen in context, minus those already asked). The fused layout needs a single
attention hop -- match the query to the pair token, copy its value -- so a 2-layer model learns it in a few
hundred steps, and what it then measures is what the cache keeps, not how fast a circuit forms.
Everything is drawn from a seed on the fly.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from kvlab.data.corpus import SeededStream
from kvlab.errors import KvlabError

LAYOUTS = ("pairs", "fused")


@dataclass(frozen=True)
class RecallTask:
    """``pairs`` key-value pairs per row over ``alphabet`` keys and ``alphabet`` values (None: as many as
    the vocabulary allows), laid out as ``layout``. Chance accuracy is ``1 / alphabet``."""

    pairs: int
    alphabet: int | None = None
    layout: str = "pairs"

    def n_symbols(self, vocab_size: int) -> int:
        """Distinct keys (and values)."""
        if self.alphabet is not None:
            return self.alphabet
        if self.layout == "pairs":
            return (vocab_size - 1) // 2
        return max(a for a in range(1, vocab_size) if 1 + 2 * a + a * a <= vocab_size)

    def ids_needed(self, alphabet: int) -> int:
        """Token ids the layout uses: filler, keys, values (and one id per possible pair when fused)."""
        return 1 + 2 * alphabet + (alphabet * alphabet if self.layout == "fused" else 0)

    def check(self, seq_len: int, vocab_size: int) -> None:
        """One-line errors for a task that cannot be laid out."""
        if self.layout not in LAYOUTS:
            raise KvlabError(f"recall: layout must be one of {', '.join(LAYOUTS)}, got {self.layout!r}")
        if self.pairs < 1:
            raise KvlabError(f"recall: n_pairs must be >= 1, got {self.pairs}")
        if self.alphabet is not None and (self.alphabet < 1 or self.ids_needed(self.alphabet) > vocab_size):
            raise KvlabError(f"recall: alphabet {self.alphabet} needs {self.ids_needed(max(self.alphabet, 1))} "
                             f"token ids in the {self.layout} layout; the vocabulary has {vocab_size}")
        if self.pairs > self.n_symbols(vocab_size):
            raise KvlabError(f"recall: {self.pairs} pairs need {self.pairs} distinct keys; there are "
                             f"{self.n_symbols(vocab_size)}")
        if self.layout == "pairs" and (seq_len + 1 - 2 * self.pairs) // 2 < self.pairs:
            raise KvlabError(f"recall: seq_len {seq_len} is too short for {self.pairs} pairs and their "
                             f"queries (needs >= {4 * self.pairs - 1})")
        if self.layout == "fused" and seq_len < 3 * self.pairs:
            raise KvlabError(f"recall: seq_len {seq_len} is too short for {self.pairs} pairs, their lead and "
                             f"their queries (needs >= {3 * self.pairs})")

    def batch(self, batch: int, seq_len: int, vocab_size: int, seed: int
              ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(inputs, targets, mask)``, each ``[batch, seq_len]``; ``mask`` (bool) marks the answer
        positions, where ``targets`` holds the recalled value. Deterministic from ``seed``."""
        self.check(seq_len, vocab_size)
        gen = torch.Generator().manual_seed(seed)
        n, pairs = self.n_symbols(vocab_size), self.pairs
        keys = torch.rand(batch, n, generator=gen).argsort(dim=1)[:, :pairs]  # [B, P] distinct, 0-based
        values = torch.randint(0, n, (batch, pairs), generator=gen)  # [B, P]
        order = torch.rand(batch, pairs, generator=gen).argsort(dim=1)  # which pair each query asks for
        asked_keys, asked_values = keys.gather(1, order), values.gather(1, order)
        if self.layout == "pairs":  # keys 1..n, values n+1..2n, pairs at the start
            total = seq_len + 1
            rows = torch.zeros(batch, total, dtype=torch.long)
            rows[:, 0: 2 * pairs: 2], rows[:, 1: 2 * pairs: 2] = keys + 1, values + n + 1
            slots = (total - 2 * pairs) // 2
            chosen = torch.rand(batch, slots, generator=gen).argsort(dim=1)[:, :pairs].sort(dim=1).values
            where = 2 * pairs + 2 * chosen  # [B, P] position of each query key
            rows.scatter_(1, where, asked_keys + 1)
            rows.scatter_(1, where + 1, asked_values + n + 1)
            mask = torch.zeros(batch, total, dtype=torch.bool).scatter_(1, where, True)[:, :seq_len]
            return rows[:, :-1], rows[:, 1:], mask
        # fused: keys 1..n, values n+1..2n, pair (k, v) = 2n + 1 + k * n + v, at positions P .. 2P-1
        inputs = torch.zeros(batch, seq_len, dtype=torch.long)
        inputs[:, pairs: 2 * pairs] = 2 * n + 1 + keys * n + values
        chosen = torch.rand(batch, seq_len - 2 * pairs, generator=gen).argsort(dim=1)[:, :pairs] + 2 * pairs
        inputs.scatter_(1, chosen, asked_keys + 1)
        targets = torch.zeros(batch, seq_len, dtype=torch.long).scatter_(1, chosen, asked_values + n + 1)
        mask = torch.zeros(batch, seq_len, dtype=torch.bool).scatter_(1, chosen, True)
        return inputs, targets, mask


class RecallStream(SeededStream):
    """MQAR batches as a resumable, rank-sharded stream (see ``SeededStream``)."""

    def __init__(self, task: RecallTask, seq_len: int, vocab_size: int, batch: int, seed: int = 0,
                 rank: int = 0, world: int = 1):
        task.check(seq_len, vocab_size)
        super().__init__(batch, seed, rank, world)
        self.task, self.seq_len, self.vocab_size = task, seq_len, vocab_size

    def batch_at(self, step: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(inputs, targets, mask)`` of this rank, each ``[batch / world, seq_len]``."""
        batch = self.task.batch(self.batch, self.seq_len, self.vocab_size, self.seed * 1_000_003 + step)
        return tuple(part[self.share()] for part in batch)


@torch.no_grad()
def recall_accuracy(model, task: RecallTask, seq_len: int, n_samples: int = 64, seed: int = 0,
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
            inputs, targets, mask = task.batch(size, seq_len, vocab, seed * 1_000_003 + i)
            predicted = model(inputs.to(device)).argmax(-1).cpu()
            correct += int((predicted == targets)[mask].sum())
            total += int(mask.sum())
    finally:
        model.train(was_training)
    return correct / max(total, 1)
