"""Statistics, the Markdown table and the plots of a comparison.

A quality difference against the reference (MHA) is ``mean(variant) - mean(reference)`` over seeds, shown
with its spread ``sqrt(sd_variant**2 + sd_reference**2)`` (the seed-to-seed standard deviations). It is
called real only when it is larger than that spread; with one seed there is no spread and nothing is
called real.
"""

from __future__ import annotations

import math
import statistics
from pathlib import Path


def mean_sd(values: list[float]) -> tuple[float, float]:
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def difference(values: list[float], reference: list[float]) -> dict:
    """Mean difference to the reference, its spread, and whether it stands out of that spread."""
    (mean, sd), (ref_mean, ref_sd) = mean_sd(values), mean_sd(reference)
    spread = math.hypot(sd, ref_sd)
    real = None if min(len(values), len(reference)) < 2 else abs(mean - ref_mean) > spread
    return {"delta": mean - ref_mean, "spread": spread, "real": real}


def summarize(results: dict[str, dict], budget) -> dict:
    """Per-variant means and spreads over seeds, differences vs the reference (the first available
    variant), memory reduction and speed ratios."""
    from dataclasses import asdict

    ref_name = next((n for n, r in results.items() if r.get("available")), None)
    ref = results.get(ref_name, {})
    longest_ctx = str(max(budget.contexts))
    lengths = [str(n) for n in budget.recall_lengths]

    def bits(r: dict) -> list[float]:
        return [run["bits_per_byte"] for run in r["lm_runs"]]

    def recall(r: dict, n: str) -> list[float]:
        return [run["recall"][n] for run in r["recall_runs"]]

    rows = {}
    for name, r in results.items():
        if not r.get("available"):
            rows[name] = r
            continue
        rows[name] = {
            **r,
            "plan_equals_measured": r["kv_bytes"] == r["planned_bytes"],
            "kv_bytes_per_token": r["kv_bytes"][longest_ctx] / int(longest_ctx),
            "memory_reduction_vs_ref": ref["long_context_bytes"] / max(r["long_context_bytes"], 1),
            "decode_tok_s": r["speed"][longest_ctx]["decode_tok_s"],
            "decode_speed_vs_ref": r["speed"][longest_ctx]["decode_tok_s"] / ref["speed"][longest_ctx]["decode_tok_s"],
            "bits_per_byte": mean_sd(bits(r)),
            "bits_per_byte_vs_ref": difference(bits(r), bits(ref)),
            "recall": {n: mean_sd(recall(r, n)) for n in lengths},
            "recall_vs_ref": {n: difference(recall(r, n), recall(ref, n)) for n in lengths},
        }
    return {"reference": ref_name, "budget": asdict(budget), "chance_recall": 1 / budget.alphabet,
            "variants": rows}


def recall_length(budget: dict) -> str:
    """The recall length the table and the Pareto plot show: the trained length (no extrapolation)."""
    lengths = budget["recall_lengths"]
    return str(budget["seq"] if budget["seq"] in lengths else max(lengths))


def _delta(d: dict, digits: int, reference: bool = False) -> str:
    if reference:
        return "(reference)"
    mark = {True: "", False: " (within noise)", None: ""}[d["real"]]
    return f"{d['delta']:+.{digits}f} ± {d['spread']:.{digits}f}{mark}"


def markdown(summary: dict) -> str:
    """The comparison table for people, with the budget, the machine and the differences that are real."""
    b, ref = summary["budget"], summary["reference"]
    ctx, n_long = max(b["contexts"]), recall_length(b)
    lines = [f"| technique | params | KV bytes/token @ {ctx} | memory vs {ref} @ {b['long_context'] // 1024}K | "
             f"prefill exp | decode exp | bits/byte | Δ bits/byte | recall @ {n_long} | Δ recall | "
             f"decode tok/s @ {ctx} |", "|" + "---|" * 11]
    for name, r in summary["variants"].items():
        if not r.get("available"):
            lines.append(f"| {name} | not available: {r['why']} |" + " |" * 9)
            continue
        bpb, acc = r["bits_per_byte"], r["recall"][n_long]
        lines.append(
            f"| {name} | {r['params']} | {r['kv_bytes_per_token']:.0f} | {r['memory_reduction_vs_ref']:.1f}× | "
            f"{r['prefill_exponent']:.2f} | {r['decode_exponent']:.2f} | {bpb[0]:.3f} ± {bpb[1]:.3f} | "
            f"{_delta(r['bits_per_byte_vs_ref'], 3, name == ref)} | {acc[0]:.2f} ± {acc[1]:.2f} | "
            f"{_delta(r['recall_vs_ref'][n_long], 2, name == ref)} | {r['decode_tok_s']:.0f} ({r['decode_speed_vs_ref']:.2f}×) |")
    lines += ["", _findings(summary), "", _method(summary)]
    return "\n".join(lines) + "\n"


def _findings(summary: dict) -> str:
    """Which quality differences are larger than their seed spread, in words."""
    b, ref = summary["budget"], summary["reference"]
    rows = {n: r for n, r in summary["variants"].items() if r.get("available") and n != ref}
    if b["seeds"] < 2:
        return "With one seed there is no spread: no quality difference can be called real at this budget."
    out = []
    for label, get in [(f"recall @ {n}", lambda r, n=n: r["recall_vs_ref"][n]) for n in map(str, b["recall_lengths"])] \
            + [("bits/byte", lambda r: r["bits_per_byte_vs_ref"])]:
        real = [f"{name} ({get(r)['delta']:+.3f})" for name, r in rows.items() if get(r)["real"]]
        out.append(f"- {label}: " + (f"real differences vs {ref}: " + ", ".join(real) if real
                                     else f"every difference vs {ref} is within the seed spread"))
    return "Differences larger than their seed spread (the others are marked 'within noise'):\n" + "\n".join(out)


def _method(summary: dict) -> str:
    b, m = summary["budget"], summary.get("machine", {})
    return (f"Each variant is trained {b['seeds']} time(s) (seeds 0..{b['seeds'] - 1}) on two tasks at matched "
            f"parameter count (MLP width adjusted): next-byte prediction on the corpus ({b['lm_steps']} steps x "
            f"{b['lm_batch']} x {b['lm_seq']} bytes; bits/byte on {b['lm_windows']} held-out windows), and "
            f"multi-query associative recall ({b['pairs']} key-value pairs over {b['alphabet']} keys/values, "
            f"chance {1 / b['alphabet']:.2f}; {b['steps']} steps x {b['batch']} rows of {b['seq']} tokens; "
            f"accuracy on {b['recall_samples']} fresh rows at each length {b['recall_lengths']}; the table shows "
            f"the trained length, longer ones also test how far RoPE extrapolates). Δ is the "
            "difference of means to the reference ± the spread sqrt(sd² + sd_ref²). KV bytes are measured from the "
            f"live cache after a prefill (and equal the planner at every context {b['contexts']}); memory vs the "
            "reference at the long context comes from the planner. Speed is measured on each variant widened "
            f"{b['speed_width']}x (same techniques, random weights) at batch 1: exponents are slopes of log time "
            "against log context, decode tok/s comes with its ratio to the reference measured in the same run.\n\n"
            f"Machine: {m.get('cpu', '?')}, {m.get('cores', '?')} cores, torch {m.get('torch', '?')}. Jobs took "
            f"{summary.get('job_seconds', 0) / 60:.1f} process-minutes ({b['workers']} training processes side by "
            f"side); this invocation {summary.get('seconds', 0) / 60:.1f} min (cached jobs are not re-run).")


def plots(summary: dict, out: Path) -> None:
    """PNG plots: quality vs KV bytes per token (the Pareto picture), KV memory vs context, decode time
    vs context, recall vs length."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = {n: r for n, r in summary["variants"].items() if r.get("available")}
    n_long = recall_length(summary["budget"])
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for i, (name, r) in enumerate(rows.items()):
        color = f"C{i % 10}"
        marker = "osD^v<>pP*X"[i % 11]
        x = r["kv_bytes_per_token"]
        axes[0].errorbar(x, r["recall"][n_long][0], yerr=r["recall"][n_long][1], fmt=marker, color=color,
                         capsize=3, label=name)
        axes[1].errorbar(x, r["bits_per_byte"][0], yerr=r["bits_per_byte"][1], fmt=marker, color=color, capsize=3)
    axes[0].axhline(summary["chance_recall"], color="gray", lw=0.8, ls=":", label="chance")
    axes[0].set(xscale="log", xlabel="KV bytes per token (measured)", ylabel=f"recall accuracy @ {n_long}",
                title="recall vs KV memory (higher is better)")
    axes[1].set(xscale="log", xlabel="KV bytes per token (measured)", ylabel="held-out bits/byte",
                title="perplexity vs KV memory (lower is better)")
    fig.legend(loc="center right", fontsize=7)
    fig.tight_layout(rect=(0, 0, 0.82, 1))
    fig.savefig(out / "pareto.png", dpi=110)
    plt.close(fig)
    curves = [("kv_memory.png", "KV cache bytes (measured)", lambda r: {n: b for n, b in r["kv_bytes"].items()}),
              ("decode_time.png", "decode seconds / token",
               lambda r: {n: 1 / s["decode_tok_s"] for n, s in r["speed"].items()}),
              ("recall_length.png", "recall accuracy", lambda r: {n: v[0] for n, v in r["recall"].items()})]
    for file, ylabel, series in curves:
        fig, ax = plt.subplots(figsize=(7, 4.2))
        for i, (name, r) in enumerate(rows.items()):
            points = sorted((int(n), v) for n, v in series(r).items())
            ax.plot(*zip(*points), marker="osD^v<>pP*X"[i % 11], color=f"C{i % 10}", label=name)
        if file == "recall_length.png":
            ax.axhline(summary["chance_recall"], color="gray", lw=0.8, ls=":", label="chance")
            ax.axvline(summary["budget"]["seq"], color="gray", lw=0.8, ls="--", label="trained length")
        ax.set(xscale="log", xlabel="context / sequence length (tokens)", ylabel=ylabel)
        if file != "recall_length.png":
            ax.set_yscale("log")
        ax.legend(fontsize=7, bbox_to_anchor=(1.02, 1), loc="upper left")
        fig.tight_layout()
        fig.savefig(out / file, dpi=110)
        plt.close(fig)
