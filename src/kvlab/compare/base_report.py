"""The summary, table, plots and README block of ``kvlab compare --base``. Every number comes from the
cached jobs of the run (kvlab.compare.base); spreads are over the disjoint held-out samples."""

from __future__ import annotations

import json
import re
from dataclasses import asdict
from pathlib import Path

from kvlab.compare.base_rows import CLAIMS
from kvlab.compare.report import difference, mean_sd

README_START, README_END = "<!-- compare-table -->", "<!-- /compare-table -->"


def _quality(stage: dict) -> dict:
    drops = [100 * (f["ppl_converted"] / f["ppl_source"] - 1) for f in stage["samples"]]
    return {"ppl_drop_pct": drops, "kl": [f["kl"] for f in stage["samples"]],
            "top1": [f["top1_agreement"] for f in stage["samples"]],
            "ppl_source": [f["ppl_source"] for f in stage["samples"]],
            "ppl": [f["ppl_converted"] for f in stage["samples"]]}


def ref_context(budget: dict) -> int:
    """The context where every model's passkeys, bytes and decode speed are measured: the needle gate."""
    gate = budget.get("needle_gate")
    return gate if gate in budget["needle_contexts"] else max(budget["needle_contexts"])


def _acc(accuracy: dict, n: int) -> str:
    """Passkey accuracy at ``n``, or "—" where it did not run (missed every key at the gate)."""
    return f"{accuracy[str(n)]:.2f}" if str(n) in accuracy else "—"


def summarize(base: str, rows: list, results: dict, budget, seconds: float) -> dict:
    """compare.json: per row its measured bytes (== plan), quality free / healed, passkeys, speed."""
    from kvlab.config import ModelConfig
    from kvlab.machine import machine_info
    from kvlab.planner import plan

    src_cfg = ModelConfig.from_dict(results["source"]["config"])
    mem_ctx = budget.memory_context
    n_top = str(ref_context(asdict(budget)))
    serve = plan(src_cfg, context=budget.serve_context).total_bytes
    needle_src = results["needle_free"]["source"]
    srv_src = needle_src["after"].get(str(budget.serve_context))
    out_rows = {}
    for row in rows:
        r = results["rows"][row.name]
        cfg = ModelConfig.from_dict(r["free"]["config"])
        live = results["needle_free"][row.name]["cache_bytes"][n_top]
        planned = plan(cfg, context=int(n_top)).total_bytes
        assert live == planned, (row.name, live, planned)  # also checked when measured
        src_live = needle_src["cache_bytes"][n_top]
        free, healed = _quality(r["free"]), _quality(r["healed"])
        speed_src = needle_src["decode_tok_s"][n_top]
        cx = results["complexity"][row.name]
        out_rows[row.name] = {
            "spec": row.spec, "note": row.note, "claim": CLAIMS.get(row.claim), "config": r["free"]["config"],
            "bytes_per_token_live": live / int(n_top), "bytes_context": int(n_top), "bytes_live": live,
            "bytes_planned": planned, "plan_equals_measured": live == planned,
            "heal_skipped": r["heal"].get("skipped"),
            "sequences_per_gib": 2**30 / plan(cfg, context=budget.serve_context).total_bytes,
            "sequences_vs_source": serve / plan(cfg, context=budget.serve_context).total_bytes,
            "serving": _serving(results["needle_free"][row.name]["after"].get(str(budget.serve_context)), srv_src),
            "reduction_pct_live": 100 * (1 - live / src_live),
            "bytes_per_token_plan_mem": plan(cfg, context=mem_ctx).bytes_per_token,
            "reduction_pct_mem": 100 * (1 - plan(cfg, context=mem_ctx).total_bytes / plan(src_cfg, context=mem_ctx).total_bytes),
            "memory_curve": {str(n): plan(cfg, context=n).total_bytes for n in (512, 1024, 2048, 4096, 8192, 16384, 32768)},
            "free": free, "healed": healed,
            "healing_vs_free": {"ppl_drop_pct": difference(healed["ppl_drop_pct"], free["ppl_drop_pct"])},
            "needle": {"free": results["needle_free"][row.name]["accuracy"],
                       "healed": results["needle_healed"][row.name]["accuracy"]},
            "decode_ratio": results["needle_free"][row.name]["decode_tok_s"][n_top] / speed_src,
            "prefill_exponent": cx["prefill_exponent"], "decode_exponent": cx["decode_exponent"],
            "heal_seconds": r["heal"]["heal_seconds"], "job_seconds": {k: r[k]["seconds"] for k in ("free", "heal", "healed")},
        }
    return {"base": base, "budget": asdict(budget), "machine": machine_info(), "seconds": seconds,
            "source": {"bytes_per_token_live": needle_src["cache_bytes"][n_top] / int(n_top),
                       "bytes_per_token_plan_mem": plan(src_cfg, context=mem_ctx).bytes_per_token,
                       "ppl": _quality(results["rows"][rows[0].name]["free"])["ppl_source"],
                       "needle": needle_src["accuracy"], "decode_tok_s": speed_src, "sequences_per_gib": 2**30 / serve,
                       "serving": _serving(srv_src, srv_src),
                       "prefill_exponent": results["complexity"]["source"]["prefill_exponent"],
                       "decode_exponent": results["complexity"]["source"]["decode_exponent"],
                       "memory_curve": {str(n): plan(src_cfg, context=n).total_bytes
                                        for n in (512, 1024, 2048, 4096, 8192, 16384, 32768)}},
            "rows": out_rows, "job_seconds": {k: results[k]["seconds"] for k in ("needle_free", "needle_healed", "complexity")},
            "job_breakdown": _breakdown(results, out_rows),
            "jobs_total_seconds": sum(results[k]["seconds"] for k in ("needle_free", "needle_healed", "complexity"))
            + sum(sum(r["job_seconds"].values()) for r in out_rows.values())}


def _serving(mine: dict | None, source: dict | None) -> dict | None:
    """The batched decode at the KV budget, with its aggregate tok/s as a ratio to the source's."""
    if mine is None or source is None:
        return None
    return {**mine, "vs_source": mine["aggregate_tok_s"] / source["aggregate_tok_s"]}


def _srv(r: dict) -> str:
    s = r.get("serving")
    if s is None:
        return "—"
    return f"{s['aggregate_tok_s']:.1f} @ {s['batch']}{'*' if s['capped'] else ''} ({s['vs_source']:.2f})"


def _breakdown(results: dict, rows: dict) -> dict:
    """Seconds per kind of job (where the run's time went)."""
    kinds = {"training-free eval (incl. load, calibration, conversion)": "free", "healing": "heal", "healed eval": "healed"}
    out = {label: sum(r["job_seconds"][k] for r in rows.values()) for label, k in kinds.items()}
    out.update({"passkeys free": results["needle_free"]["seconds"], "passkeys healed": results["needle_healed"]["seconds"],
                "complexity": results["complexity"]["seconds"]})
    return out


def _pm(values: list[float], digits: int = 1) -> str:
    mean, sd = mean_sd(values)
    noise = " (within noise)" if len(values) > 1 and abs(mean) <= sd else ""
    return f"{mean:+.{digits}f} ± {sd:.{digits}f}{noise}"


def _plain(values: list[float], digits: int = 3) -> str:
    mean, sd = mean_sd(values)
    return f"{mean:.{digits}f} ± {sd:.{digits}f}"


def table(summary: dict) -> str:
    """The main table (also the README block)."""
    b = summary["budget"]
    n_top, mem = ref_context(b), b["memory_context"]
    ctxs = ", ".join(str(n) for n in b["needle_contexts"])
    lines = [f"| row | KV bytes/token @ {n_top} (live = plan) | memory reduction @ {mem} (claimed) | "
             f"ppl drop %, training-free | ppl drop %, healed (claimed) | KL free → healed | top-1 free → healed | "
             f"passkey @ {ctxs} free → healed | sequences per GiB @ {b['serve_context']} (× source) | "
             f"aggregate tok/s @ {b['serve_gib']:g} GiB KV, {b['serve_context']} (batch; × source) | "
             f"decode tok/s vs source @ {n_top} | prefill exp | decode exp |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    src = summary["source"]
    acc = " / ".join(_acc(src["needle"], n) for n in b["needle_contexts"])
    lines.append(f"| source (SmolLM2-135M) | {src['bytes_per_token_live']:.0f} | 0% | (ppl {_plain(src['ppl'], 2)}) | — | "
                 f"0 | 1 | {acc} | {src['sequences_per_gib']:.1f} (1.00) | {_srv(src)} | 1.00 | {src['prefill_exponent']:.2f} | {src['decode_exponent']:.2f} |")
    for name, r in summary["rows"].items():
        claim = r["claim"]
        cm, cp = (f" ({claim[1]})", f" ({claim[2]})") if claim else ("", "")
        hv = r["healing_vs_free"]["ppl_drop_pct"]
        mark = "" if hv["real"] else " ≈"
        kl = f"{mean_sd(r['free']['kl'])[0]:.3f} → {mean_sd(r['healed']['kl'])[0]:.3f}"
        top = f"{mean_sd(r['free']['top1'])[0]:.3f} → {mean_sd(r['healed']['top1'])[0]:.3f}"
        nd = " / ".join(f"{_acc(r['needle']['free'], n)}→{_acc(r['needle']['healed'], n)}" for n in b["needle_contexts"])
        healed = "= free (nothing to heal)" if r.get("heal_skipped") else f"{_pm(r['healed']['ppl_drop_pct'])}{mark}"
        lines.append(f"| {name} | {r['bytes_per_token_live']:.0f} | {r['reduction_pct_mem']:.1f}%{cm} | "
                     f"{_pm(r['free']['ppl_drop_pct'])} | {healed}{cp} | {kl} | {top} | "
                     f"{nd} | {r['sequences_per_gib']:.1f} ({r['sequences_vs_source']:.2f}) | {_srv(r)} | {r['decode_ratio']:.2f} | {r['prefill_exponent']:.2f} | {r['decode_exponent']:.2f} |")
    return "\n".join(lines)


def method(summary: dict) -> str:
    b, m = summary["budget"], summary["machine"]
    gate, ctxs = b.get("needle_gate"), b["needle_contexts"]
    longer = [n for n in ctxs if gate is not None and n > gate]
    eight = (f" Passkeys at {', '.join(map(str, longer))} run only for the models that found the key at {gate} (— where "
             f"one did not: the longest prefills are the run's most expensive steps); `--budget large` runs every model "
             f"at every context." if longer else "")
    skipped = [name for name, r in summary["rows"].items() if r.get("heal_skipped")]
    skip = (f" Not healed ({', '.join(skipped)}): the full forward equals the source's at the heal length "
            f"{b['heal_seq']} (within 1e-4), so healing has nothing to learn; healed = training-free." if skipped else "")
    n_seeds = b.get("heal_seeds", 1)
    seeds = (f"{n_seeds} healing seeds (data order and initialisation), so a healed ± spans {n_seeds} heals x "
             f"{b['eval_samples']} samples; the healed passkeys are seed 0's" if n_seeds > 1 else
             "one healing seed (0): the healed spread is the evaluation's")
    js = summary.get("job_breakdown", {})
    spent = (" Job seconds by kind: " + ", ".join(f"{k} {v:.0f}" for k, v in js.items()) + "." if js else "")
    return (f"Budget `{b['name']}`: {b['eval_samples']} disjoint held-out samples of {b['eval_len']} tokens (stdlib test "
            f"split), prefilled in chunks of {b['chunk']} through each model's cache; ± is the spread over the samples "
            f"('within noise' when the mean is inside it; ≈ marks a healed value within the spread of its "
            f"training-free value). Calibration: once, 1 x {b['calib_len']} train tokens, shared by every row. "
            f"Healing: `kvlab heal --stage {b['heal_stage']}`, the same {b['heal_tokens']} tokens for every row (batch 1 x "
            f"{b['heal_seq']}); {seeds}.{skip} Passkeys: {len(b['needle_depths'])} depths per context, greedy; decode tok/s "
            f"is measured on the passkey answers, every model interleaved in one job. Complexity exponents: slope "
            f"of log time vs log length over {', '.join(map(str, b['speed_lengths']))} tokens on every "
            f"{b['speed_layers']}th layer of each row (random weights, interleaved). Memory reduction @ "
            f"{b['memory_context']}: `kvlab plan`, which equals the live cache at every length measured (asserted). "
            f"Sequences per GiB @ {b['serve_context']}: 2^30 / the plan's bytes of one sequence (× source: how many "
            f"more sequences fit in a KV budget). Aggregate tok/s: the passkey's cache at {b['serve_context']} tokens "
            f"replicated to as many sequences as fit in {b['serve_gib']:g} GiB of KV (* capped at {b['serve_max_batch']}), "
            f"{b['serve_steps']} whole-batch decode steps timed after a warm-up (oneDNN-packed linears where measured "
            "faster, for those steps only), interleaved with the source; live "
            f"cache == plan at that batch (asserted)."
            f"{eight} The budget rows reuse the committed per-layer plans docs/convert/smollm2-b25/plan.json and "
            f"smollm2-b10/plan.json (`--to plan.json`) instead of re-running the sensitivity search. "
            f"Machine: {m['cpu']}, {m['cores']} cores, torch {m['torch']}; the jobs took {summary['jobs_total_seconds'] / 60:.1f} "
            f"min in all (each timed when it ran), this invocation {summary['seconds'] / 60:.1f} min.{spent}")


def markdown(summary: dict) -> str:
    notes = [f"- {name}: `{r['spec']}`" + (f" ({r['note']})" if r["note"] else "") for name, r in summary["rows"].items()]
    return "\n".join([f"# kvlab compare --base {summary['base']}", "", table(summary), "", method(summary), "",
                      "Rows:", *notes, "", "![quality vs bytes](pareto.png)", "", "![retrieval](retrieval.png)", "",
                      "![memory](memory.png)", ""])


def plots(summary: dict, out: Path) -> None:
    """pareto.png (ppl drop vs bytes/token, free -> healed arrows), retrieval.png, memory.png."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = summary["rows"]
    fig, ax = plt.subplots(figsize=(8, 5))
    for i, (name, r) in enumerate(rows.items()):
        x, y0, y1 = r["bytes_per_token_plan_mem"], mean_sd(r["free"]["ppl_drop_pct"])[0], mean_sd(r["healed"]["ppl_drop_pct"])[0]
        ax.scatter([x], [max(y0, 1e-2)], color=f"C{i % 10}", marker="o", label=name)
        ax.scatter([x], [max(y1, 1e-2)], color=f"C{i % 10}", marker="*", s=90)
        ax.annotate("", xy=(x, max(y1, 1e-2)), xytext=(x, max(y0, 1e-2)),
                    arrowprops={"arrowstyle": "->", "color": f"C{i % 10}", "lw": 0.8})
    ax.set(xscale="log", yscale="log", xlabel=f"KV bytes per token @ {summary['budget']['memory_context']} (kvlab plan = live)",
           ylabel="perplexity drop % vs source (o free, * healed; < 0.01 drawn at 0.01)", title=f"{summary['base']}: quality vs memory")
    ax.legend(fontsize=7, bbox_to_anchor=(1.02, 1), loc="upper left")
    fig.tight_layout()
    fig.savefig(out / "pareto.png", dpi=110)
    plt.close(fig)
    fig, ax = plt.subplots(figsize=(8, 4.5))
    ctxs = summary["budget"]["needle_contexts"]

    def measured(acc: dict) -> tuple[list[int], list[float]]:
        """The contexts a model's passkeys ran at (8K is skipped for a model that missed at 2K)."""
        pts = [(n, acc[str(n)]) for n in ctxs if str(n) in acc]
        return [n for n, _ in pts], [a for _, a in pts]

    ax.plot(*measured(summary["source"]["needle"]), "k-o", label="source")
    for i, (name, r) in enumerate(rows.items()):
        ax.plot(*measured(r["needle"]["free"]), "-o", color=f"C{i % 10}", label=name)
        ax.plot(*measured(r["needle"]["healed"]), "--*", color=f"C{i % 10}")
    ax.set(xscale="log", xlabel="context (tokens)", ylabel="passkey accuracy (- free, -- healed)", ylim=(-0.05, 1.05))
    ax.legend(fontsize=7, bbox_to_anchor=(1.02, 1), loc="upper left")
    fig.tight_layout()
    fig.savefig(out / "retrieval.png", dpi=110)
    plt.close(fig)
    fig, ax = plt.subplots(figsize=(8, 4.5))
    for i, (name, r) in enumerate([("source", summary["source"]), *rows.items()]):
        pts = sorted((int(n), b / 2**20) for n, b in r["memory_curve"].items())
        ax.plot(*zip(*pts), "-o", color="k" if i == 0 else f"C{(i - 1) % 10}", label=name, ms=3)
    ax.set(xscale="log", yscale="log", xlabel="context (tokens)", ylabel="KV cache MiB (kvlab plan = live)")
    ax.legend(fontsize=7, bbox_to_anchor=(1.02, 1), loc="upper left")
    fig.tight_layout()
    fig.savefig(out / "memory.png", dpi=110)
    plt.close(fig)


def write_outputs(summary: dict, out: Path) -> None:
    from kvlab.checkpoint import atomic_write

    atomic_write(out / "compare.json", lambda tmp: Path(tmp).write_text(json.dumps(summary, indent=2) + "\n"))
    atomic_write(out / "compare.md", lambda tmp: Path(tmp).write_text(markdown(summary)))
    plots(summary, out)


def update_readme(readme: Path, summary: dict, image: str) -> None:
    """Replace the block between the compare-table markers in ``readme`` with this run's table."""
    from kvlab.errors import KvlabError

    text = readme.read_text()
    pattern = re.compile(re.escape(README_START) + ".*?" + re.escape(README_END), re.S)
    if not pattern.search(text):
        raise KvlabError(f"--readme: {readme} has no {README_START} ... {README_END} block")
    block = "\n".join([README_START, table(summary), "", method(summary), "", f"![quality vs KV bytes]({image})",
                       README_END])
    readme.write_text(pattern.sub(lambda _: block, text))
