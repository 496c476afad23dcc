"""Measurements of one model: held-out perplexity (overall and by position bucket), recall accuracy by
length, KV bytes measured from the live cache at several contexts, and prefill / decode speed."""

from __future__ import annotations

import math
import time

import numpy as np
import torch
import torch.nn.functional as F


@torch.no_grad()
def perplexity(model, ids: np.ndarray, seq_len: int, max_windows: int = 16, buckets: int = 4,
               token_bytes: np.ndarray | None = None) -> dict:
    """Mean next-token loss (nats and bits/token) over up to ``max_windows`` evenly spaced windows of
    ``ids``, plus the loss per position bucket (does the model use far context?) and the forward speed.
    ``token_bytes`` (text bytes of each token id) adds bits/byte: total bits over the bytes of the
    predicted tokens, comparable across tokenizers."""
    from kvlab.errors import KvlabError

    if len(ids) < seq_len + 1:
        raise KvlabError(f"eval: held-out text has {len(ids)} tokens, fewer than seq_len+1 = {seq_len + 1}")
    starts = np.linspace(0, len(ids) - seq_len - 1, num=min(max_windows, len(ids) - seq_len)).astype(int)
    rows = torch.as_tensor(np.stack([ids[s:s + seq_len + 1] for s in starts]).astype(np.int64))  # [N, S+1]
    model.eval()
    losses = []
    per_chunk = max(1, min(8, 2**25 // (seq_len * model.config.vocab_size)))  # logits chunk <= 128 MiB fp32
    t0 = time.perf_counter()
    for chunk in rows.split(per_chunk):
        logits = model(chunk[:, :-1].to(model.device)).float()  # [n, S, V]
        losses.append(F.cross_entropy(logits.transpose(1, 2), chunk[:, 1:].to(model.device),
                                      reduction="none").cpu())  # [n, S]
    seconds = time.perf_counter() - t0
    loss = torch.cat(losses)  # [N, S]
    edges = np.linspace(0, seq_len, buckets + 1).astype(int)
    by_bucket = [{"positions": f"{a}-{b - 1}", "loss": float(loss[:, a:b].mean())}
                 for a, b in zip(edges[:-1], edges[1:]) if b > a]
    mean = float(loss.mean())
    out = {"loss": mean, "bits_per_token": mean / math.log(2), "ppl": math.exp(mean),
           "windows": len(starts), "seq_len": seq_len, "tokens": int(loss.numel()),
           "tokens_per_s": loss.numel() / seconds if seconds > 0 else float("nan"), "by_position": by_bucket}
    if token_bytes is not None:
        n_bytes = int(np.asarray(token_bytes)[rows[:, 1:].numpy()].sum())
        out["bytes"] = n_bytes
        out["bits_per_byte"] = float(loss.sum()) / math.log(2) / n_bytes if n_bytes else float("nan")
    return out


@torch.no_grad()
def kv_bytes(model, contexts: list[int]) -> dict[int, int]:
    """Measured ``cache.nbytes`` after a batch-1 prefill of each context length (random tokens)."""
    out = {}
    for n in contexts:
        cache = model.new_cache(1)
        model(torch.randint(0, model.config.vocab_size, (1, n), device=model.device), cache=cache,
              last_only=True)
        out[n] = int(cache.nbytes)
    return out


def speed(model, contexts: list[int], decode_steps: int = 16, repeats: int = 3) -> dict[int, dict]:
    """Median prefill seconds and decode tokens/s (batch 1, greedy feedback) at each context length."""
    return speeds({"model": model}, contexts, decode_steps, repeats)["model"]


@torch.no_grad()
def speeds(models: dict, contexts: list[int], decode_steps: int = 16, repeats: int = 3) -> dict[str, dict[int, dict]]:
    """``speed`` of several models, interleaved: each repeat times every model in turn on the same prompt,
    so a drift in machine speed hits all of them alike and their ratios stay fair."""
    out: dict[str, dict[int, dict]] = {name: {} for name in models}
    for model in models.values():  # first-call costs (allocator, kernels, compilation) stay out of the timings
        warm = model.new_cache(1)
        model(torch.randint(0, model.config.vocab_size, (1, min(contexts)), device=model.device), cache=warm)
        model(torch.zeros(1, 1, dtype=torch.long, device=model.device), cache=warm)
    for n in contexts:
        samples: dict[str, tuple[list, list]] = {name: ([], []) for name in models}
        for _ in range(repeats):
            tokens = torch.randint(0, min(m.config.vocab_size for m in models.values()), (1, n))
            for name, model in models.items():
                cache = model.new_cache(1, max_length=n + decode_steps)
                t0 = time.perf_counter()
                token = model(tokens.to(model.device), cache=cache, last_only=True).argmax(-1)  # [1, 1]
                t1 = time.perf_counter()
                for _ in range(decode_steps):
                    token = model(token, cache=cache).argmax(-1)
                t2 = time.perf_counter()
                samples[name][0].append(t1 - t0)
                samples[name][1].append(decode_steps / (t2 - t1))
        for name, (prefill, decode) in samples.items():
            out[name][n] = {"prefill_s": float(np.median(prefill)), "decode_tok_s": float(np.median(decode))}
    return out


def recall_by_length(model, task, lengths: list[int], n_samples: int = 64, seed: int = 0) -> dict:
    """Recall accuracy (exact match of bound values) of a ``RecallTask`` at each sequence length."""
    from kvlab.data.recall import recall_accuracy

    out = {}
    for n in lengths:
        task.check(n, model.config.vocab_size)
        out[n] = recall_accuracy(model, task, n, n_samples=n_samples, seed=seed)
    return out


def scaling_exponent(xs: list[int], ys: list[float]) -> float | None:
    """Slope of log(y) against log(x): ~1 for linear growth in context, ~0 for constant."""
    pts = [(math.log(x), math.log(y)) for x, y in zip(xs, ys) if x > 0 and y > 0]
    if len(pts) < 2:
        return None
    lx, ly = np.array(pts).T
    return float(np.polyfit(lx, ly, 1)[0])


def format_report(result: dict) -> str:
    """A short human-readable table of an evaluation result."""
    lines = []
    if "perplexity" in result:
        p = result["perplexity"]
        per_byte = f", {p['bits_per_byte']:.4f} bits/byte" if "bits_per_byte" in p else ""
        lines.append(f"held-out loss {p['loss']:.4f} nats/token ({p['bits_per_token']:.3f} bits/token{per_byte}, "
                     f"ppl {p['ppl']:.2f}) over {p['windows']} x {p['seq_len']} tokens, "
                     f"{p['tokens_per_s']:.0f} tokens/s")
        lines += [f"  positions {b['positions']:>10}: loss {b['loss']:.4f}" for b in p["by_position"]]
    if "recall" in result:
        lines += [f"recall @ {n}: {acc:.3f}" for n, acc in result["recall"].items()]
    lines.append(f"{'context':>8} {'KV bytes':>12} {'prefill s':>10} {'decode tok/s':>13}")
    for n, b in result["kv_bytes"].items():
        s = result["speed"].get(n, {})
        lines.append(f"{n:>8} {b:>12} {s.get('prefill_s', float('nan')):>10.4f} "
                     f"{s.get('decode_tok_s', float('nan')):>13.1f}")
    return "\n".join(lines)
