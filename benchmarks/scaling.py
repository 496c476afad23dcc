"""How attention cost scales with length: prefill time vs sequence length and decode time per token vs
context, for full attention, sliding window (W = 512), BigBird and gated DeltaNet (linear), on this CPU.

One attention layer (d_model 512, 8 heads of dim 64, fp32, batch 1) is timed alone, so the curve is the
mixer's. Prefill: full, BigBird and DeltaNet run one forward over the sequence (BigBird's kernel is
picked automatically: compiled FlexAttention for grad-free forwards, compile excluded by warm-up; the
kernel used is recorded); sliding prefills chunk by chunk through its ring cache (chunks of W), the way
a bounded cache is filled. Decode: the cache is filled to the context (not timed), then one-token steps
are timed on a copy-free loop (the ring / state overwrite in place; full and BigBird grow by one token per
step). Techniques alternate within each length; medians with [min, max]. The exponent of each curve is a
least-squares fit of log(time) on log(length).

    python benchmarks/scaling.py           # 512 .. 16K, decode contexts 512 .. 16K
    python benchmarks/scaling.py --quick   # 512 .. 2K (validation)
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import RESULTS, interleaved, write_results  # noqa: E402

import kvlab  # noqa: E402
from kvlab.attention._common import ForwardContext  # noqa: E402

D_MODEL, HEADS, WINDOW = 512, 8, 512
TECHNIQUES = {
    "full": {"type": "full", "n_heads": HEADS},
    "sliding": {"type": "sliding", "n_heads": HEADS, "window": WINDOW},
    "bigbird": {"type": "block_sparse", "n_heads": HEADS, "block": 64, "local_blocks": 4, "global_blocks": 1,
                "random_blocks": 3},
    "linear": {"type": "gated_deltanet", "n_heads": HEADS, "head_dim": 64, "chunk": 64},
}


def build(spec: dict):
    config = kvlab.ModelConfig.from_dict({"vocab_size": 64, "d_model": D_MODEL, "n_layers": 1,
                                          "mlp_hidden": 64, "layers": [spec]})
    torch.manual_seed(0)
    return kvlab.Model(config).eval().layers[0].self_attn


def run_layer(layer, x: torch.Tensor, start: int, cache, trace: dict | None = None):
    return layer(x, ForwardContext(x.shape[0], x.shape[1], start, None, x.device, trace), cache)


def prefill_fn(name: str, layer, x: torch.Tensor):
    if name != "sliding":
        return lambda: run_layer(layer, x, 0, None)

    def chunked():
        cache = layer.new_cache_layer(1, x.dtype, x.device, [])
        for start in range(0, x.shape[1], WINDOW):
            run_layer(layer, x[:, start:start + WINDOW], start, cache)
    return chunked


def decode_fn(layer, context: int, steps: int):
    """Fill a cache to ``context`` tokens, then return a callable timing ``steps`` one-token forwards."""
    x = torch.randn(1, context + steps, D_MODEL)
    cache = layer.new_cache_layer(1, x.dtype, x.device, [])
    for start in range(0, context, 2048):
        run_layer(layer, x[:, start:min(start + 2048, context)], start, cache)
    state = {"t": context}

    def step():
        t = state["t"]
        run_layer(layer, x[:, t:t + 1], t, cache)
        state["t"] = t + 1 if t + 1 < context + steps else t  # stay at the last step once exhausted
    return step


def fit_exponent(lengths: list[int], seconds: list[float]) -> float:
    xs, ys = [math.log(n) for n in lengths], [math.log(s) for s in seconds]
    mx, my = statistics.fmean(xs), statistics.fmean(ys)
    return sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sum((x - mx) ** 2 for x in xs)


def summary(samples: list[float]) -> dict:
    return {"median": statistics.median(samples), "min": min(samples), "max": max(samples), "n": len(samples)}


@torch.no_grad()
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="short lengths, few repeats (validation)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    lengths = [512, 1024, 2048] if args.quick else [512, 1024, 2048, 4096, 8192, 16384]
    repeats, decode_steps = (2, 8) if args.quick else (5, 32)
    layers = {name: build(spec) for name, spec in TECHNIQUES.items()}
    prefill: dict[str, dict[int, dict]] = {name: {} for name in layers}
    decode: dict[str, dict[int, dict]] = {name: {} for name in layers}
    kernels = {}
    for n in lengths:
        x = torch.randn(1, n, D_MODEL)
        times = interleaved({name: prefill_fn(name, layer, x) for name, layer in layers.items()},
                            repeats=repeats, warmup=1)
        for name, samples in times.items():
            prefill[name][n] = summary(samples)
        trace = {}
        run_layer(layers["bigbird"], x, 0, None, trace)  # which kernel the timed prefill ran
        kernels[n] = trace[(layers["bigbird"].layer_idx, "backend")]
        steppers = {name: decode_fn(layer, n, decode_steps * (repeats + 1)) for name, layer in layers.items()}
        times = interleaved({name: (lambda f=f: [f() for _ in range(decode_steps)]) for name, f in steppers.items()},
                            repeats=repeats, warmup=1)
        for name, samples in times.items():
            decode[name][n] = summary([s / decode_steps for s in samples])
        print(f"{n:>6}: " + "  ".join(f"{name} prefill {prefill[name][n]['median'] * 1e3:8.1f} ms "
                                      f"decode {decode[name][n]['median'] * 1e3:6.2f} ms" for name in layers),
              flush=True)
    exponents = {name: {"prefill": fit_exponent(lengths, [prefill[name][n]["median"] for n in lengths]),
                        "decode": fit_exponent(lengths, [decode[name][n]["median"] for n in lengths])}
                 for name in layers}
    plot_path = plot(lengths, prefill, decode, exponents)
    rows = ["| technique | prefill exponent | decode exponent | "
            + " | ".join(f"prefill {n}" for n in lengths) + " | " + " | ".join(f"decode @{n}" for n in lengths) + " |",
            "|---|---|---|" + "---|" * (2 * len(lengths))]
    for name in layers:
        rows.append(f"| {name} | {exponents[name]['prefill']:.2f} | {exponents[name]['decode']:.2f} | "
                    + " | ".join(_ms(prefill[name][n]) for n in lengths) + " | "
                    + " | ".join(_ms(decode[name][n]) for n in lengths) + " |")
    markdown = "\n".join([
        "# Attention scaling: prefill and decode time vs length",
        "",
        f"One attention layer, d_model {D_MODEL}, {HEADS} heads of 64, fp32, batch 1, 1 thread. Sliding W = "
        f"{WINDOW} (chunked prefill), BigBird blocks of 64 (4 local, 1 global, 3 random; kernel per length: "
        f"{kernels}), linear = gated DeltaNet (chunk 64). Times: median [min, max] ms"
        f"{' (--quick)' if args.quick else ''}. Exponent: slope of log time vs log length.",
        "",
        *rows,
        "",
        f"Plot: {plot_path.name}",
    ])
    data = {"quick": args.quick, "lengths": lengths, "prefill": prefill, "decode": decode,
            "exponents": exponents, "bigbird_kernel": kernels, "techniques": TECHNIQUES}
    json_path, md_path = write_results("scaling", data, markdown)
    print(markdown)
    print(f"wrote {json_path}, {md_path}, {plot_path}")


def _ms(s: dict) -> str:
    return f"{s['median'] * 1e3:.2f} [{s['min'] * 1e3:.2f}, {s['max'] * 1e3:.2f}]"


def plot(lengths, prefill, decode, exponents) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.5), dpi=100)
    for ax, data, what in ((axes[0], prefill, "prefill"), (axes[1], decode, "decode")):
        for name in data:
            ax.loglog(lengths, [data[name][n]["median"] * 1e3 for n in lengths], "o-",
                      label=f"{name} (slope {exponents[name][what]:.2f})")
        ax.set_xlabel("sequence length" if what == "prefill" else "context (tokens)")
        ax.set_ylabel("ms" if what == "prefill" else "ms per token")
        ax.set_title(f"{what} time")
        ax.legend(fontsize=8)
    fig.tight_layout()
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / "scaling.png"
    fig.savefig(path)
    plt.close(fig)
    return path


if __name__ == "__main__":
    start = time.perf_counter()
    main()
    print(f"total {time.perf_counter() - start:.0f} s")
