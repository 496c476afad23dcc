"""Calibration: per-layer statistics of the attention inputs on a few sequences of text.

Hooks on every block record the normalised attention input ``x`` (what q/k/v projections see) and the
residual stream ``h`` entering the block. Kept per layer: the second moment ``E[x~ x~^T]`` of
``x~ = [x ; 1]`` (every linear K/V/Q statistic follows from it: ``E[k k^T] = W E[x x^T] W^T``, and the
appended 1 carries biases), the first sequence's inputs (cross-layer similarity and the local error of
a candidate layer need real tokens) and ``E|h|^2`` (the scale the layer's output is added to).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from tqdm import tqdm

from kvlab.errors import KvlabError


@dataclass
class LayerStats:
    xx: torch.Tensor  # [d + 1, d + 1] float64: E[x~ x~^T], x~ = [x ; 1]
    x_seq: torch.Tensor  # [T, d] the first calibration sequence's attention inputs (model dtype)
    h_sq: float  # E |h|^2 of the residual stream entering the block
    tokens: int


def augment(weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """``[W | b]`` in float64, ``[out, in + 1]`` (zeros when there is no bias), matching ``x~ = [x ; 1]``."""
    b = bias if bias is not None else weight.new_zeros(weight.shape[0])
    return torch.cat([weight.double(), b.double()[:, None]], dim=1)


def split_augmented(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Inverse of ``augment``: ``(W, b)`` in float32."""
    return w[:, :-1].float().contiguous(), w[:, -1].float().contiguous()


def calibration_rows(ids, n_seqs: int, seq_len: int) -> torch.Tensor:
    """``n_seqs`` contiguous, non-overlapping windows of ``seq_len`` tokens from the start of ``ids``."""
    need = n_seqs * seq_len
    if len(ids) < need:
        raise KvlabError(f"calibration: the calibration split has {len(ids)} tokens, {need} needed "
                         f"({n_seqs} x {seq_len}); lower --calib-seqs/--calib-len or use a larger --corpus")
    return torch.as_tensor(ids[:need].astype("int64")).view(n_seqs, seq_len)


@torch.no_grad()
def collect(model, rows: torch.Tensor, progress: bool = True) -> list[LayerStats]:
    """Run ``model`` over ``rows [N, T]`` (one row at a time) and return one ``LayerStats`` per layer."""
    n_layers = len(model.layers)
    xx = [None] * n_layers
    h_sq = [0.0] * n_layers
    first: list = [None] * n_layers
    count = [0]
    handles = []

    def attn_hook(i):
        def hook(_module, args):
            x = args[0].reshape(-1, args[0].shape[-1])  # [B*S, d]
            xa = torch.cat([x.double(), x.new_ones(x.shape[0], 1, dtype=torch.float64)], dim=1)
            xx[i] = xa.T @ xa if xx[i] is None else xx[i] + xa.T @ xa
            if first[i] is None:
                first[i] = args[0][0].detach().clone()  # [S, d]
        return hook

    def block_hook(i):
        def hook(_module, args):
            h_sq[i] += float(args[0].double().pow(2).sum())
        return hook

    for i, block in enumerate(model.layers):
        handles.append(block.self_attn.register_forward_pre_hook(attn_hook(i)))
        handles.append(block.register_forward_pre_hook(block_hook(i)))
    try:
        for row in tqdm(rows, desc="calibrate", unit="seq", disable=not progress):
            model(row[None].to(model.device), last_only=True)
            count[0] += row.numel()
    finally:
        for handle in handles:
            handle.remove()
    n = count[0]
    return [LayerStats(xx[i] / n, first[i], h_sq[i] / n, n) for i in range(n_layers)]
