"""Batched decode at a fixed KV memory budget: how many sequences of a context fit, and the aggregate
decode tokens/s of that many sequences stepping together, the measurement that turns a smaller cache into
serving speed.

A cache filled by one prefill (batch 1) is replicated to the batch with ``cache.select`` (every cache kind
implements it: beam search uses it to reorder rows), so the batch costs one prefill, not ``batch`` of them;
then whole-batch one-token steps are timed. Sequences that fit = budget // the planner's bytes of one
sequence at that context; the live cache at the measured batch is checked against ``kvlab plan``.
"""

from __future__ import annotations

import time

import torch


def sequences_fit(config, context: int, budget_bytes: int) -> int:
    """How many sequences of ``context`` tokens ``budget_bytes`` of KV cache hold (``kvlab plan``)."""
    from kvlab.planner import plan

    return budget_bytes // plan(config, context=context).total_bytes


@torch.no_grad()
def batched_decode(model, cache, token: torch.Tensor, batch: int, steps: int = 2) -> dict:
    """Replicate the batch-1 ``cache`` (and its last ``token [1, 1]``) to ``batch`` rows, run one warm-up
    step, then time ``steps`` whole-batch steps. Returns aggregate tok/s, the step seconds, the batch and
    the live cache bytes after the replication (before the steps). The steps run on oneDNN-packed linears
    where they measure faster (``Model.packed_linears``: at batch 16 on a 2-core EPYC the step's linears took
    0.6x MKL's time, ``benchmarks/fused_linears.py``), packed for this call only."""
    cache.select([0] * batch)
    live = int(cache.nbytes)
    tokens = token.reshape(1, 1).expand(batch, 1).contiguous()
    with model.packed_linears():
        tokens = model(tokens, cache=cache).argmax(-1)  # warm-up: allocations, packed_pays at this batch
        t0 = time.perf_counter()
        for _ in range(steps):
            tokens = model(tokens, cache=cache).argmax(-1)
        step = (time.perf_counter() - t0) / steps
    return {"batch": batch, "step_s": step, "aggregate_tok_s": batch / step, "cache_bytes": live}
