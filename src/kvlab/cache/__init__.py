"""The model-level cache: one cache layer per attention layer, plus per-row bookkeeping.

Bookkeeping (not counted in ``nbytes``): ``step``, the number of tokens each row has consumed
(left padding included), and ``pad_offset[b]``, the number of left-padding tokens of row ``b``.
"""

from __future__ import annotations

import torch

from kvlab.cache.base import CacheLayer, GrowingBuffer, SharedCacheLayer

__all__ = ["Cache", "CacheLayer", "GrowingBuffer", "SharedCacheLayer"]


class Cache:
    def __init__(self, layers: list[CacheLayer], batch_size: int):
        self.layers = layers
        self.batch_size = batch_size
        self.step = 0
        self.pad_offset: torch.Tensor | None = None  # [B] long, None when no row is padded

    def __len__(self) -> int:
        return len(self.layers)

    def __getitem__(self, i: int) -> CacheLayer:
        return self.layers[i]

    @property
    def nbytes(self) -> int:
        """Bytes of all live cache tensors, summed from the tensors themselves."""
        return sum(layer.nbytes for layer in self.layers)

    @property
    def reserved_nbytes(self) -> int:
        return sum(layer.reserved_nbytes for layer in self.layers)

    def layer_nbytes(self) -> list[int]:
        return [layer.nbytes for layer in self.layers]

    def reserve(self, total_tokens: int) -> None:
        """Preallocate room for ``total_tokens`` per row, so decoding never reallocates."""
        for layer in self.layers:
            layer.reserve(total_tokens)

    def reset(self) -> None:
        self.step, self.pad_offset = 0, None
        for layer in self.layers:
            layer.reset()

    def select(self, rows: torch.Tensor | list[int]) -> None:
        """Keep (and reorder to) the batch rows ``rows``."""
        rows = torch.as_tensor(rows, dtype=torch.long)
        for layer in self.layers:
            layer.select(rows)
        if self.pad_offset is not None:
            self.pad_offset = self.pad_offset.index_select(0, rows.to(self.pad_offset.device))
        self.batch_size = len(rows)
