"""Cache-layer protocol and the growable buffer most cache layers store their tensors in.

Contract (every technique's cache layer):
- the technique's module writes what it needs through the layer's own methods (``append`` here);
- ``length``: tokens (steps) this layer has seen;
- ``nbytes``: bytes of the live tensors it holds, read from the tensors (``Tensor.nbytes``), never a
  formula -- the planner predicts exactly this number;
- ``reserved_nbytes``: bytes allocated, including preallocated room not yet filled;
- ``reset()`` empties it; ``select(rows)`` keeps / reorders batch rows (beam search, dropping rows).
"""

from __future__ import annotations

import torch

GROWTH_CHUNK = 256  # tokens; capacity is always a multiple of this


class GrowingBuffer:
    """A tensor that grows along ``time_dim`` by preallocated chunks (geometric, rounded to
    ``GROWTH_CHUNK``), so appending one token is an in-place write, not a ``torch.cat``."""

    def __init__(self, shape: tuple[int, ...], time_dim: int, dtype: torch.dtype, device=None,
                 reserve: int = 0):
        self.time_dim, self.length = time_dim, 0
        self._shape, self._dtype, self._device = list(shape), dtype, device
        self.data = self._alloc(self._round(reserve)) if reserve else None

    @staticmethod
    def _round(n: int) -> int:
        return -(-n // GROWTH_CHUNK) * GROWTH_CHUNK

    def _alloc(self, capacity: int) -> torch.Tensor:
        shape = list(self._shape)
        shape[self.time_dim] = capacity
        return torch.empty(shape, dtype=self._dtype, device=self._device)

    @property
    def dtype(self) -> torch.dtype:
        return self._dtype

    @property
    def capacity(self) -> int:
        return 0 if self.data is None else self.data.shape[self.time_dim]

    def reserve(self, total: int) -> None:
        """Make room for ``total`` tokens in all (one allocation + copy at most)."""
        if total <= self.capacity:
            return
        new = self._alloc(self._round(total))
        if self.length:
            new.narrow(self.time_dim, 0, self.length).copy_(self.view())
        self.data = new

    def append(self, x: torch.Tensor) -> torch.Tensor:
        """Write ``x`` (its ``time_dim`` holds the new tokens) after the current ones; return the view
        of everything held."""
        n = x.shape[self.time_dim]
        self._make_room(n)
        self.data.narrow(self.time_dim, self.length, n).copy_(x)  # a failed write leaves the length as it was
        self.length += n
        return self.view()

    def claim(self, n: int) -> tuple[torch.Tensor, int]:
        """Room for ``n`` more tokens, counted as held: the whole buffer ``data`` and the first claimed
        index along ``time_dim``, for a caller that writes them itself (a fused decode kernel)."""
        self._make_room(n)
        self.length += n
        return self.data, self.length - n

    def _make_room(self, n: int) -> None:
        if self.length + n > self.capacity:
            self.reserve(max(self.length + n, int(self.capacity * 1.5)))

    def view(self) -> torch.Tensor:
        if self.data is None:
            return self._alloc(0)
        return self.data.narrow(self.time_dim, 0, self.length)

    def reset(self) -> None:
        self.length = 0

    def select(self, rows: torch.Tensor) -> None:
        if self.data is not None:
            self.data = self.data.index_select(0, rows.to(self.data.device))
        self._shape[0] = len(rows)


class CacheLayer:
    """Base cache layer. Subclasses keep their state in ``self.buffers`` (growable, time-indexed)
    and/or ``self.state`` (fixed-size tensors); the defaults below then need no override."""

    def __init__(self) -> None:
        self.buffers: dict[str, GrowingBuffer] = {}
        self.state: dict[str, torch.Tensor] = {}
        self.length = 0

    def live_tensors(self) -> list[torch.Tensor]:
        return [b.view() for b in self.buffers.values()] + list(self.state.values())

    @property
    def nbytes(self) -> int:
        return sum(t.nbytes for t in self.live_tensors())

    @property
    def reserved_nbytes(self) -> int:
        held = sum(b.data.nbytes for b in self.buffers.values() if b.data is not None)
        return held + sum(t.nbytes for t in self.state.values())

    def reserve(self, total: int) -> None:
        for b in self.buffers.values():
            b.reserve(total)

    def reset(self) -> None:
        self.length = 0
        for b in self.buffers.values():
            b.reset()
        for t in self.state.values():
            t.zero_()

    def select(self, rows: torch.Tensor) -> None:
        for b in self.buffers.values():
            b.select(rows)
        for k, t in self.state.items():
            self.state[k] = t.index_select(0, rows.to(t.device))


class SharedCacheLayer(CacheLayer):
    """The cache layer of a layer that reuses another layer's K/V: it holds nothing (0 bytes) and
    points at the producer's layer."""

    def __init__(self, producer: CacheLayer):
        super().__init__()
        self.producer = producer

    @property
    def length(self) -> int:  # type: ignore[override]
        return self.producer.length

    @length.setter
    def length(self, value: int) -> None:
        pass

    def reserve(self, total: int) -> None:
        pass

    def select(self, rows: torch.Tensor) -> None:
        pass  # the producer's layer is selected on its own
