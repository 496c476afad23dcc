"""The fidelity report of a conversion: ``report.json`` + ``report.md`` beside the checkpoint, and a
table printed to the terminal. Every number is measured in the run that writes it."""

from __future__ import annotations

import json
from pathlib import Path

from kvlab.planner import plan


def bytes_section(source_cfg, converted_cfg, context: int, measured: dict[int, dict]) -> dict:
    """Planner bytes per token at ``context`` for both models, and, at every length a live cache was
    measured at, measured == planned."""
    ps, pc = plan(source_cfg, context=context), plan(converted_cfg, context=context)
    checks = []
    for length, got in sorted(measured.items()):
        want_s = plan(source_cfg, context=length).total_bytes
        want_c = plan(converted_cfg, context=length).total_bytes
        checks.append({"context": length, "source_measured": got["source"], "source_planned": want_s,
                       "converted_measured": got["converted"], "converted_planned": want_c,
                       "equal": got["source"] == want_s and got["converted"] == want_c})
    return {"context": context, "source_bytes_per_token": ps.bytes_per_token,
            "converted_bytes_per_token": pc.bytes_per_token,
            "fraction_of_source": pc.total_bytes / ps.total_bytes if ps.total_bytes else None,
            "reduction": ps.total_bytes / pc.total_bytes if pc.total_bytes else None,
            "per_layer": [layer.label + f" {layer.cache_bytes / context:.0f} B/tok" for layer in pc.layers],
            "measured_vs_planned": checks}


def markdown(report: dict) -> str:
    """The report as Markdown (also what the CLI prints, minus the per-layer list)."""
    b = report["bytes"]
    lines = [f"# kvlab convert: {report['source']} -> {report['to']}", "",
             f"Converted in {report['times']['convert_s']:.1f} s (calibration {report['times']['calibrate_s']:.1f} s"
             + (f", sensitivity {report['times']['sensitivity_s']:.1f} s" if "sensitivity_s" in report["times"] else "")
             + f"); report {report['times'].get('report_s', 0):.1f} s on {report['machine']['cpu']} "
             f"({report['machine']['torch_threads']} torch threads).", "",
             "| | source | converted |", "|---|---|---|",
             f"| KV bytes / token at {b['context']} (kvlab plan) | {b['source_bytes_per_token']:.1f} | "
             f"{b['converted_bytes_per_token']:.1f} ({100 * b['fraction_of_source']:.1f}%, "
             f"{b['reduction']:.2f}x smaller) |"]
    f = report.get("fidelity")
    if f:
        lines += [f"| perplexity through the cache ({f['rows']} x {f['seq_len']} tok, chunks of {f['chunk']}) | "
                  f"{f['ppl_source']:.3f} | {f['ppl_converted']:.3f} |",
                  f"| KL(source \\|\\| converted), nats/token | 0 | {f['kl']:.4f} |",
                  f"| top-1 agreement with the source | 1 | {f['top1_agreement']:.3f} |"]
    n = report.get("needle")
    if n:
        for ctx, acc in n["source"]["accuracy"].items():
            lines.append(f"| passkey accuracy @ {ctx} ({len(n['depths'])} depths) | {acc:.2f} | "
                         f"{n['converted']['accuracy'][ctx]:.2f} |")
        for ctx, rate in n["source"]["decode_tok_s"].items():
            conv = n["converted"]["decode_tok_s"][ctx]
            lines.append(f"| decode tok/s @ {ctx} (interleaved) | {rate:.1f} | {conv:.1f} ({conv / rate:.2f}x) |")
    checks = b["measured_vs_planned"]
    if checks:
        ok = all(c["equal"] for c in checks)
        lines += ["", "Live cache bytes equal `kvlab plan` at " + ", ".join(str(c["context"]) for c in checks)
                  + (": yes." if ok else ": **NO**.")]
    budget = report.get("budget")
    if budget:
        lines += ["", f"Budget: {budget['budget_bytes_per_token']:.1f} bytes/token at {b['context']} "
                  f"({100 * budget['budget_total_bytes'] / budget['source_total_bytes']:.1f}% of the source); summed "
                  f"local error of the chosen plan {budget['proxy_error']:.4f}"
                  + (f"; sensitivities reused from `{budget['sensitivity_from']}`" if budget.get("sensitivity_from")
                     else "") + "."]
    data = report["data"]
    lines += ["", f"Calibration: {data['calibration']}.", f"Evaluation: {data['evaluation']}.", ""]
    lines += ["## Per-layer plan", "", "| layer | step | cache |", "|---|---|---|"]
    for i, (step, layer) in enumerate(zip(report["plan"], b["per_layer"])):
        lines.append(f"| {i} | `{step}` | {layer} |")
    return "\n".join(lines) + "\n"


def write(folder: Path, report: dict) -> None:
    from kvlab.checkpoint import atomic_write

    atomic_write(folder / "report.json", lambda tmp: Path(tmp).write_text(json.dumps(report, indent=2) + "\n"))
    atomic_write(folder / "report.md", lambda tmp: Path(tmp).write_text(markdown(report)))
