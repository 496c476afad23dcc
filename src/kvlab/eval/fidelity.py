"""Fidelity of a converted model to its source, measured the way decoding sees it: teacher-forced
prefill in chunks appended to the cache, so later tokens attend to the quantized / evicted / shared
entries the earlier chunks left there (a single full-sequence forward would attend to its own
full-precision K/V and hide, e.g., int4's cost).

Per held-out token: both models' next-token log-probabilities; reported: each model's perplexity, the
mean KL(source || converted), top-1 agreement, and the cache bytes each model holds at the end of a row.
"""

from __future__ import annotations

import math

import torch
from tqdm import tqdm


def heldout_rows(ids, n_rows: int, seq_len: int, offset: int = 0) -> torch.Tensor:
    """``n_rows`` non-overlapping windows of ``seq_len + 1`` tokens of ``ids`` (from ``offset``)."""
    from kvlab.errors import KvlabError

    need = offset + n_rows * (seq_len + 1)
    if len(ids) < need:
        raise KvlabError(f"eval: the evaluation split has {len(ids)} tokens, {need} needed "
                         f"({n_rows} x {seq_len + 1}); lower --eval-seqs/--eval-len")
    return torch.as_tensor(ids[offset:need].astype("int64")).view(n_rows, seq_len + 1)


def chunked_log_probs(model, row: torch.Tensor, chunk: int):
    """Yield ``(log_probs [S, V] float32, cache)`` per chunk of ``row[:-1]``, fed through one cache."""
    cache = model.new_cache(1)
    inputs = row[:-1].to(model.device)
    for start in range(0, inputs.shape[0], chunk):
        logits = model(inputs[None, start:start + chunk], cache=cache)[0].float()  # [S, V]
        yield logits.log_softmax(-1), cache


@torch.no_grad()
def perplexity_through_cache(model, rows: torch.Tensor, chunk: int = 256) -> float:
    """Perplexity of ``model`` on ``rows [N, T + 1]`` with chunked teacher-forced prefill."""
    total, count = 0.0, 0
    for row in rows:
        start = 0
        for logp, _ in chunked_log_probs(model, row, chunk):
            target = row[start + 1: start + 1 + logp.shape[0]].to(logp.device)
            total -= float(logp.gather(1, target[:, None]).sum())
            count += logp.shape[0]
            start += logp.shape[0]
    return math.exp(total / count)


@torch.no_grad()
def reference_log_probs(source, rows: torch.Tensor, chunk: int = 256) -> list[dict]:
    """Per row of ``rows [N, T + 1]``: the source's chunked log-probabilities (``[S, V]`` per chunk) and its
    cache bytes at the end; computed once and passed to :func:`compare` for every converted model."""
    out = []
    for row in rows:
        pairs = list(chunked_log_probs(source, row, chunk))
        out.append({"log_probs": [logp for logp, _ in pairs], "cache_bytes": int(pairs[-1][1].nbytes)})
    return out


@torch.no_grad()
def compare(source, converted, rows: torch.Tensor, chunk: int = 256, progress: bool = True,
            reference: list[dict] | None = None) -> dict:
    """Perplexities, KL(source || converted), top-1 agreement and final cache bytes over ``rows``.
    ``reference``: the source's :func:`reference_log_probs` on the same rows and chunk (computed if absent)."""
    if reference is None:
        reference = reference_log_probs(source, rows, chunk)
    nll = {"source": 0.0, "converted": 0.0}
    kl, agree, count = 0.0, 0, 0
    cache_bytes: dict = {}
    bar = tqdm(total=rows.numel() - rows.shape[0], desc="evaluate", unit="tok", disable=not progress)
    for row, ref in zip(rows, reference):
        start, caches = 0, []
        for ls, (lc, cache_c) in zip(ref["log_probs"], chunked_log_probs(converted, row, chunk)):
            caches[:] = [cache_c]
            n = ls.shape[0]
            target = row[start + 1: start + 1 + n][:, None]
            nll["source"] -= float(ls.gather(1, target.to(ls.device)).sum())
            nll["converted"] -= float(lc.gather(1, target.to(lc.device)).sum())
            kl += float((ls.exp() * (ls - lc)).sum())
            agree += int((ls.argmax(-1) == lc.argmax(-1)).sum())
            count, start = count + n, start + n
            bar.update(n)
        cache_bytes = {"context": start, "source": ref["cache_bytes"], "converted": int(caches[0].nbytes)}
    bar.close()
    return {"tokens": count, "rows": rows.shape[0], "seq_len": rows.shape[1] - 1, "chunk": chunk,
            "ppl_source": math.exp(nll["source"] / count), "ppl_converted": math.exp(nll["converted"] / count),
            "kl": kl / count, "top1_agreement": agree / count, "cache_bytes": cache_bytes}
