"""Where a batch-1 decode step's time goes on the real model (SmolLM2-135M, fp32): the profile behind
``decode_bandwidth.py``'s fraction.

A step must read every weight once (the matmuls) and the whole cache held (SDPA). ``torch.profiler``
splits each step's op time into the weight matmuls, the attention kernel and every other op (norms,
RoPE, SiLU, residual adds, cache writes, views); each of the first two is turned into the bandwidth
it reads at (bytes it must read / its time), against ``torch.sum`` over 1 GiB measured in the same run.
The un-profiled step time is measured too: what the profiler does not see (Python between ops) is
the step time minus the profiled op time.

    python benchmarks/decode_profile.py            # contexts 512, 8192
    python benchmarks/decode_profile.py --quick    # 128; few steps (validation)
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections import defaultdict
from pathlib import Path
from types import SimpleNamespace

import torch
import torch.nn.functional as F
from torch.profiler import ProfilerActivity, profile, record_function

from kvlab.attention._common import decode_attention
from kvlab.kernels import FLOAT, GEMV, QUANTIZED, TOPK

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import write_results  # noqa: E402
from _smollm2 import load_model  # noqa: E402
from decode_bandwidth import cpu_flags, read_seconds  # noqa: E402

MATMUL = ("aten::mm", "aten::addmm", "kvlab::gemv")
ATTENTION = ("scaled_dot_product", "flash_attention", "kvlab::float_attention", "kvlab::quantized_attention")


def category(name: str) -> str:
    if any(name.startswith(key) for key in MATMUL):
        return "matmul"
    if any(key in name for key in ATTENTION):
        return "attention"
    return "other"


def label_kernels() -> None:
    """Make kvlab's compiled kernels visible to ``torch.profiler``: a pybind function is no aten op, so each
    is wrapped in a ``record_function`` named ``kvlab::<kernel>.<function>`` (this process only)."""
    for kernel in (FLOAT, GEMV, QUANTIZED, TOPK):
        module = kernel.module()
        if module is None:
            continue
        names = [name for name in dir(module) if not name.startswith("_") and callable(getattr(module, name))]
        kernel.built["module"] = SimpleNamespace(**{name: _labelled(f"kvlab::{kernel.name}.{name}",
                                                                    getattr(module, name)) for name in names})


def _labelled(label: str, fn):
    def call(*args):
        with record_function(label):
            return fn(*args)
    return call


def weight_bytes(model: torch.nn.Module) -> int:
    """Bytes a step's matmuls read: every unique parameter matrix (a lookup reads one embedding row,
    but a tied LM head reads the whole table)."""
    params = {id(p): p for p in model.parameters() if p.dim() == 2}
    total = sum(p.nbytes for p in params.values())
    if model.lm_head.weight is not model.embed_tokens.weight:
        total -= model.embed_tokens.weight.nbytes
    return total


def profile_context(model, ctx: int, steps: int, rounds: int) -> dict:
    """Step time, per-category op time and call counts per step at one context."""
    with torch.inference_mode():
        prompt = torch.randint(1, model.config.vocab_size, (1, ctx), generator=torch.Generator().manual_seed(ctx))
        cache = model.new_cache(1, max_length=ctx + (rounds + 2) * steps * 2 + 8)
        token = model(prompt, cache=cache, last_only=True)[:, -1].argmax(-1)
        for _ in range(3):  # warm-up
            token = model(token[:, None], cache=cache)[:, -1].argmax(-1)
        step_times = []
        for _ in range(rounds):
            for _ in range(steps):
                t0 = time.perf_counter()
                token = model(token[:, None], cache=cache)[:, -1].argmax(-1)
                step_times.append(time.perf_counter() - t0)
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            for _ in range(steps):
                token = model(token[:, None], cache=cache)[:, -1].argmax(-1)
        held = cache.nbytes
    seconds, calls, other = defaultdict(float), defaultdict(int), []
    for event in prof.key_averages():
        kind = category(event.key)
        seconds[kind] += event.self_cpu_time_total / 1e6 / steps
        calls[kind] += event.count / steps
        if kind == "other":
            other.append((event.self_cpu_time_total / 1e3 / steps, event.key, event.count / steps))
    top = [{"op": name, "ms": ms, "calls": n} for ms, name, n in sorted(other, reverse=True)[:10]]
    return {"step_s": statistics.median(step_times), "op_s": dict(seconds), "calls": dict(calls), "cache_bytes": held,
            "top_other_ops": top}


def attention_kernels(kv_heads: int, group: int, head_dim: int, ctx: int, layers: int, repeats: int = 10) -> dict:
    """GB/s at which ways of computing one decode query's attention read ``layers`` caches of ``ctx`` keys
    (distinct tensors, so the last-level cache does not serve them), against ``torch.sum`` over the same
    tensors. ``folded``: the path kvlab takes (the G query heads of a group as G query rows);
    ``enable_gqa``: SDPA's own grouping; ``split``: the keys split in two so both threads get equal work
    (partial results merged by their log-sum-exp); ``matmul``: scores, softmax and weighted sum as ops."""
    ks = [torch.randn(1, kv_heads, ctx, head_dim) for _ in range(layers)]
    vs = [torch.randn(1, kv_heads, ctx, head_dim) for _ in range(layers)]
    q = torch.randn(1, kv_heads, group, head_dim)  # [B, Hkv, G, D]: folded
    flash = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu
    half = ctx // 2

    def split(k, v):
        out, lse = flash(q[0].unsqueeze(1).expand(-1, 2, -1, -1), k[0, :, : 2 * half].unflatten(1, (2, half)),
                         v[0, :, : 2 * half].unflatten(1, (2, half)))  # [Hkv, 2, G, D], [Hkv, 2, G]
        return (out * lse.softmax(1).unsqueeze(-1)).sum(1)

    ways = {
        "sum": lambda k, v: (k.sum(), v.sum()),
        "folded": lambda k, v: F.scaled_dot_product_attention(q, k, v),
        "enable_gqa": lambda k, v: F.scaled_dot_product_attention(
            q.reshape(1, kv_heads * group, 1, head_dim), k, v, enable_gqa=True),
        "split": split,
        "matmul": lambda k, v: (q @ k.transpose(-1, -2) * head_dim ** -0.5).softmax(-1) @ v,
        "kvlab kernel": lambda k, v: decode_attention(q.reshape(1, kv_heads * group, 1, head_dim), k, v, None, None),
    }
    check = F.scaled_dot_product_attention(q, ks[0], vs[0])
    assert torch.allclose(split(ks[0], vs[0]), check[0], atol=1e-5)
    nbytes = sum(k.nbytes + v.nbytes for k, v in zip(ks, vs))
    got = {}
    with torch.inference_mode():
        for name, way in ways.items():
            for k, v in zip(ks, vs):  # warm-up
                way(k, v)
            t0 = time.perf_counter()
            for _ in range(repeats):
                for k, v in zip(ks, vs):
                    way(k, v)
            got[name] = nbytes * repeats / (time.perf_counter() - t0) / 1e9
    return got


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--contexts", type=int, nargs="*", default=[512, 8192])
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--name", default="decode_profile")
    args = parser.parse_args(argv)
    if args.quick:
        args.contexts, args.steps, args.rounds, args.name = [128], 3, 1, args.name + "_quick"
    torch.set_num_threads(args.threads)
    model = load_model(args.model).eval()
    label_kernels()
    weights = weight_bytes(model)
    buffer = torch.ones(2**28)  # 1 GiB fp32
    rows = []
    for ctx in args.contexts:
        bandwidth = buffer.nbytes / statistics.median(read_seconds(buffer)[0] for _ in range(5))
        got = profile_context(model, ctx, args.steps, args.rounds)
        mm, attn, other = (got["op_s"].get(k, 0.0) for k in ("matmul", "attention", "other"))
        step = got["step_s"]
        row = {"context": ctx, "read_bandwidth_GBps": bandwidth / 1e9, "step_ms": step * 1e3,
               "weights_bytes": weights, "cache_bytes": got["cache_bytes"],
               "fraction_of_bandwidth": (weights + got["cache_bytes"]) / step / bandwidth,
               "matmul_ms": mm * 1e3, "matmul_fraction_of_bandwidth": weights / mm / bandwidth,
               "attention_ms": attn * 1e3,
               "attention_fraction_of_bandwidth": got["cache_bytes"] / attn / bandwidth if attn else None,
               "other_ops_ms": other * 1e3, "outside_ops_ms": (step - mm - attn - other) * 1e3,
               "calls_per_step": got["calls"], "top_other_ops": got["top_other_ops"],
               "ideal_step_ms": (weights + got["cache_bytes"]) / bandwidth * 1e3}
        attn = model.layers[0].self_attn
        row["attention_kernels_GBps"] = attention_kernels(attn.n_kv_heads, attn.n_heads // attn.n_kv_heads,
                                                          attn.head_dim, ctx, len(model.layers))
        rows.append(row)
        print(row, flush=True)
    machine_flags = cpu_flags()
    lines = [f"# Where a batch-1 decode step goes ({args.model}, fp32, {args.threads} threads)", "",
             f"flags: {' '.join(machine_flags)}", "",
             "| context | step ms | ideal ms | fraction | matmul ms (of bandwidth) | attention ms (of bandwidth) "
             "| other ops ms (calls) | outside ops ms |", "|---" * 8 + "|"]
    for r in rows:
        attn_frac = r["attention_fraction_of_bandwidth"]
        attn_frac = "-" if attn_frac is None else f"{attn_frac:.2f}"
        lines.append(f"| {r['context']} | {r['step_ms']:.1f} | {r['ideal_step_ms']:.1f} | {r['fraction_of_bandwidth']:.2f} "
                     f"| {r['matmul_ms']:.1f} ({r['matmul_fraction_of_bandwidth']:.2f}) "
                     f"| {r['attention_ms']:.1f} ({attn_frac}) | {r['other_ops_ms']:.1f} ({r['calls_per_step']['other']:.0f}) "
                     f"| {r['outside_ops_ms']:.1f} |")
    top = ", ".join(f"{o['op']} {o['ms']:.2f} ms x {o['calls']:.0f}" for o in rows[-1]["top_other_ops"][:6])
    lines += ["", f"Largest other ops per step at {rows[-1]['context']}: {top}."]
    kernels = rows[-1]["attention_kernels_GBps"]
    lines += ["", f"Decode attention alone at {rows[-1]['context']} keys (GB/s read, distinct caches per layer): "
              + ", ".join(f"{name} {gbps:.1f}" for name, gbps in kernels.items()) + "."]
    lines += ["", "ideal: (weights + cache held) / read bandwidth (torch.sum over 1 GiB, same run). Op times are "
              f"the profiler's self CPU time per step over {args.steps} profiled steps (the profiler adds a little "
              "to each op; kvlab's kernels, `kvlab::*`, are labelled with `record_function`: matmul counts "
              "`kvlab::gemv`, attention the decode kernels); outside ops: step ms minus the op times (Python "
              "between ops, negative where the profiler's overhead exceeds it); step ms is the median un-profiled step. Command: `python benchmarks/decode_profile.py "
              + " ".join(argv if argv is not None else sys.argv[1:]) + "`"]
    print("\n".join(lines))
    write_results(args.name, {"model": args.model, "threads": args.threads, "cpu_flags": machine_flags, "rows": rows},
                  "\n".join(lines))


if __name__ == "__main__":
    main()
