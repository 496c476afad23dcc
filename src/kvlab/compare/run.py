"""Train every variant (same recall-task batches and seeds, matched parameters), evaluate it, cache the
result per variant (an interrupted comparison resumes), and write Markdown, JSON and PNG plots."""

from __future__ import annotations

import json
import statistics
from dataclasses import asdict, dataclass, field
from pathlib import Path

from kvlab.checkpoint import atomic_write
from kvlab.compare.variants import DEFAULT_VARIANTS, availability, base_model, count_params, match_params


@dataclass
class Budget:
    """What one comparison trains and measures. ``quick`` is the test-sized budget."""

    steps: int = 300
    batch: int = 16
    seq: int = 128
    pairs: int = 8
    seeds: int = 2
    lr: float = 3e-3
    recall_lengths: list[int] = field(default_factory=lambda: [64, 128, 256])
    contexts: list[int] = field(default_factory=lambda: [128, 256, 512, 1024])
    long_context: int = 32768
    device: str = "cpu"

    @classmethod
    def quick(cls) -> Budget:
        return cls(steps=40, batch=8, seq=64, pairs=4, seeds=1, recall_lengths=[64, 128],
                   contexts=[64, 128, 256])


def _write_json(path: Path, data) -> None:
    atomic_write(path, lambda tmp: Path(tmp).write_text(json.dumps(data, indent=2) + "\n"))


def evaluate_variant(config: dict, budget: Budget, folder: Path, progress: bool = False) -> dict:
    """Train ``config`` once per seed on the recall task, then measure recall, KV bytes and speed."""
    from kvlab.config import ModelConfig
    from kvlab.eval.evaluate import kv_bytes, recall_by_length, scaling_exponent, speed
    from kvlab.planner import plan
    from kvlab.train.trainer import TrainConfig, Trainer

    model_config = ModelConfig.from_dict(config)
    seeds = []
    model = None
    for seed in range(budget.seeds):
        cfg = TrainConfig(steps=budget.steps, batch=budget.batch, seq=budget.seq, lr=budget.lr, task="recall",
                          recall_pairs=budget.pairs, seed=seed, warmup=max(1, budget.steps // 10),
                          eval_every=budget.steps, eval_batches=2, save_every=budget.steps, device=budget.device)
        trainer = Trainer(model_config, cfg, folder / f"seed{seed}", force=True, progress=progress)
        last = trainer.run()
        model = trainer.model.eval()
        seeds.append({"seed": seed, "loss": last.get("loss"), "val_loss": last.get("val_loss"),
                      "recall": {str(n): a for n, a in
                                 recall_by_length(model, budget.recall_lengths, budget.pairs, seed=99).items()}})
    measured = kv_bytes(model, budget.contexts)
    planned = {n: plan(model_config, context=n).total_bytes for n in budget.contexts}
    timing = speed(model, budget.contexts)
    ctx = budget.contexts
    return {
        "params": model.num_parameters(), "mlp_hidden": config["mlp_hidden"], "seeds": seeds,
        "kv_bytes": {str(n): b for n, b in measured.items()},
        "planned_bytes": {str(n): b for n, b in planned.items()},
        "plan_equals_measured": all(measured[n] == planned[n] for n in ctx),
        "kv_bytes_per_token": measured[ctx[-1]] / ctx[-1],
        "long_context_bytes": plan(model_config, context=budget.long_context).total_bytes,
        "speed": {str(n): s for n, s in timing.items()},
        "prefill_exponent": scaling_exponent(ctx, [timing[n]["prefill_s"] for n in ctx]),
        "decode_exponent": scaling_exponent(ctx, [1 / timing[n]["decode_tok_s"] for n in ctx]),
    }


def _spread(values: list[float]) -> tuple[float, float]:
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def compare(out: Path, budget: Budget, variants: dict[str, dict] | None = None, progress: bool = False,
            log=print) -> dict:
    """Run (or resume) a comparison into ``out``; returns the summary also written to compare.json."""
    out.mkdir(parents=True, exist_ok=True)
    if variants is None:
        variants, needs = {}, {}
        for name, (need, layers, extra) in DEFAULT_VARIANTS.items():
            variants[name], needs[name] = base_model(layers, max_seq_len=max(budget.contexts) * 2, **extra), need
    else:
        needs = {name: () for name in variants}
    target = None
    results: dict[str, dict] = {}
    for name, config in variants.items():
        why = availability(needs[name], config)
        if why is not None:
            results[name] = {"available": False, "why": why}
            log(f"{name}: not available ({why})")
            continue
        if target is None:  # the first runnable variant (MHA by default) sets the parameter target
            target = count_params(config)
        config, n_params = match_params(config, target)
        folder = out / "variants" / "".join(c if c.isalnum() else "_" for c in name)
        key = {"config": config, "budget": asdict(budget)}
        cached = folder / "result.json"
        if cached.exists() and json.loads(cached.read_text()).get("key") == key:
            results[name] = json.loads(cached.read_text())["result"]
            log(f"{name}: cached")
            continue
        log(f"{name}: training {budget.seeds} seed(s) x {budget.steps} steps, {n_params} params")
        folder.mkdir(parents=True, exist_ok=True)
        result = {"available": True, **evaluate_variant(config, budget, folder, progress)}
        _write_json(cached, {"key": key, "result": result})
        results[name] = result
    summary = summarize(results, budget)
    _write_json(out / "compare.json", summary)
    (out / "compare.md").write_text(markdown(summary))
    plots(summary, out)
    return summary


def summarize(results: dict[str, dict], budget: Budget) -> dict:
    """Per-variant means and spreads over seeds, change vs MHA and 'within noise' marks."""
    ref_name = next((n for n, r in results.items() if r.get("available")), None)
    ref = results.get(ref_name, {})
    longest = str(max(budget.recall_lengths))

    def recall_at(r: dict, n: str) -> list[float]:
        return [s["recall"][n] for s in r["seeds"]]

    ref_mean, ref_sd = _spread(recall_at(ref, longest)) if ref_name else (0.0, 0.0)
    rows = {}
    for name, r in results.items():
        if not r.get("available"):
            rows[name] = r
            continue
        mean, sd = _spread(recall_at(r, longest))
        noise = max(sd, ref_sd)
        rows[name] = {**r, "recall_mean": {n: _spread(recall_at(r, n))[0] for n in map(str, budget.recall_lengths)},
                      "recall_at_longest": [mean, sd], "recall_delta_vs_ref": mean - ref_mean,
                      "recall_within_noise": abs(mean - ref_mean) <= noise if budget.seeds > 1 else None,
                      "memory_reduction_vs_ref": ref["long_context_bytes"] / max(r["long_context_bytes"], 1)}
    return {"reference": ref_name, "budget": asdict(budget), "variants": rows}


def markdown(summary: dict) -> str:
    """The comparison table for people."""
    b = summary["budget"]
    n_long = max(b["recall_lengths"])
    head = (f"| technique | params | KV bytes/token | memory vs {summary['reference']} @ {b['long_context']} | "
            f"prefill exp | decode exp | recall @ {n_long} (mean ± sd) | Δ recall | decode tok/s |")
    lines = [head, "|" + "---|" * 9]
    for name, r in summary["variants"].items():
        if not r.get("available"):
            lines.append(f"| {name} | not available: {r['why']} |" + " |" * 7)
            continue
        mean, sd = r["recall_at_longest"]
        mark = {True: " (within noise)", False: "", None: " (1 seed: no spread)"}[r["recall_within_noise"]]
        tok_s = r["speed"][str(max(b["contexts"]))]["decode_tok_s"]
        lines.append(f"| {name} | {r['params']} | {r['kv_bytes_per_token']:.0f} | "
                     f"{r['memory_reduction_vs_ref']:.1f}x | {r['prefill_exponent']:.2f} | "
                     f"{r['decode_exponent']:.2f} | {mean:.3f} ± {sd:.3f} | {r['recall_delta_vs_ref']:+.3f}{mark} | "
                     f"{tok_s:.0f} |")
    note = (f"\nRecall task: {b['pairs']} key-value pairs, trained at length {b['seq']} for {b['steps']} steps x "
            f"{b['batch']} rows, {b['seeds']} seed(s). KV bytes are measured (cache.nbytes) and equal the planner "
            "at every measured context. Exponents: slope of log time vs log context.\n")
    return "\n".join(lines) + "\n" + note


def plots(summary: dict, out: Path) -> None:
    """PNG plots: recall vs KV bytes/token (Pareto), KV memory vs context, decode time vs context, recall
    vs length."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = {n: r for n, r in summary["variants"].items() if r.get("available")}
    fig, ax = plt.subplots(figsize=(6, 4))
    for name, r in rows.items():
        ax.scatter(r["kv_bytes_per_token"], r["recall_at_longest"][0], label=name)
    ax.set(xscale="log", xlabel="KV bytes per token", ylabel="recall accuracy", title="quality vs KV memory")
    ax.legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(out / "pareto.png", dpi=100)
    plt.close(fig)
    for file, key, ylabel in [("kv_memory.png", "kv_bytes", "KV bytes"), ("decode_time.png", "speed", "s/token"),
                              ("recall_length.png", "recall_mean", "recall accuracy")]:
        fig, ax = plt.subplots(figsize=(6, 4))
        for name, r in rows.items():
            xs = sorted(r[key], key=int)
            ys = [1 / r[key][x]["decode_tok_s"] if key == "speed" else r[key][x] for x in xs]
            ax.plot([int(x) for x in xs], ys, marker="o", label=name)
        ax.set(xscale="log", xlabel="context / sequence length", ylabel=ylabel)
        ax.legend(fontsize=6)
        fig.tight_layout()
        fig.savefig(out / file, dpi=100)
        plt.close(fig)
