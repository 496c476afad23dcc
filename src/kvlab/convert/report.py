"""The fidelity report of a conversion (``kvlab convert``) or of a healed model (``kvlab heal``):
``report.json`` + ``report.md`` beside the checkpoint, and a table printed to the terminal. Every number
is measured in the run that writes it."""

from __future__ import annotations

import json
from pathlib import Path

from kvlab.errors import KvlabError
from kvlab.planner import plan


def check_lengths(max_seq_len: int, eval_seqs: int, eval_len: int, needle_contexts: list[int]) -> None:
    """Refuse, in one line and before any work, prompts longer than the model accepts (the evaluation
    rows and the passkey prompts; the answer's decode steps are not range-checked)."""
    for flag, length in [("--eval-len", eval_len if eval_seqs > 0 else 0),
                         *(("--needle-contexts", n) for n in needle_contexts)]:
        if length > max_seq_len:
            raise KvlabError(f"{flag}: {length:,} tokens exceed the model's max_seq_len ({max_seq_len:,})")


def evaluate(source, model, tokenizer, test_ids, corpus_source: str, *, eval_seqs: int, eval_len: int,
             chunk: int, needle_contexts: list[int], needle_depths: list[float],
             seed: int) -> tuple[dict, dict[int, dict]]:
    """The measured part of a report on ``model`` against ``source``: ``fidelity`` (perplexity through the
    cache, KL, top-1 on ``eval_seqs`` rows from the start of ``test_ids``; absent when 0), ``needle``
    (passkeys and decode speed on the test text after those rows; absent without contexts) and
    ``evaluation`` (what data that was); plus the live cache bytes measured, per length, for
    :func:`bytes_section`."""
    from kvlab.eval.fidelity import compare, heldout_rows
    from kvlab.eval.needle import run_needles

    fields: dict = {}
    measured: dict[int, dict] = {}
    evals = []
    if eval_seqs > 0:
        rows = heldout_rows(test_ids, eval_seqs, eval_len)
        fields["fidelity"] = compare(source, model, rows, chunk)
        cb = fields["fidelity"]["cache_bytes"]
        measured[cb["context"]] = cb
        evals.append(f"{corpus_source} test split, {eval_seqs} x {eval_len + 1} tokens from its start")
    if needle_contexts:
        hay = test_ids[eval_seqs * (eval_len + 1):]
        needles = run_needles({"source": source, "converted": model}, tokenizer, hay, needle_contexts,
                              needle_depths, seed)
        needles["depths"] = needle_depths
        fields["needle"] = needles
        for n in needle_contexts:
            measured[n] = {"source": needles["source"]["cache_bytes"][n],
                           "converted": needles["converted"]["cache_bytes"][n]}
        evals.append(f"passkey haystacks from the test split after those tokens (seed {seed})")
    fields["evaluation"] = "; ".join(evals) or "none"
    return fields, measured


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
    b, times = report["bytes"], report["times"]
    command = report.get("command", "convert")  # convert | heal
    name = "converted" if command == "convert" else "healed"
    if command == "convert":
        done = (f"Converted in {times['convert_s']:.1f} s (calibration {times['calibrate_s']:.1f} s"
                + (f", sensitivity {times['sensitivity_s']:.1f} s" if "sensitivity_s" in times else "") + ")")
    else:
        done = f"Healed in {times['heal_s']:.1f} s of training"
    lines = [f"# kvlab {command}: {report['source']} -> {report['to']}", "",
             f"{done}; report {times.get('report_s', 0):.1f} s on {report['machine']['cpu']} "
             f"({report['machine']['torch_threads']} torch threads).", "",
             f"| | source | {name} |", "|---|---|---|",
             f"| KV bytes / token at {b['context']} (kvlab plan) | {b['source_bytes_per_token']:.1f} | "
             f"{b['converted_bytes_per_token']:.1f} ({100 * b['fraction_of_source']:.1f}%, "
             f"{b['reduction']:.2f}x smaller) |"]
    f = report.get("fidelity")
    if f:
        lines += [f"| perplexity through the cache ({f['rows']} x {f['seq_len']} tok, chunks of {f['chunk']}) | "
                  f"{f['ppl_source']:.3f} | {f['ppl_converted']:.3f} |",
                  f"| KL(source \\|\\| {name}), nats/token | 0 | {f['kl']:.4f} |",
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
    lines += ["", *(f"{what.capitalize()}: {text}." for what, text in data.items()), ""]
    lines += ["## Per-layer plan", "", "| layer | step | cache |", "|---|---|---|"]
    for i, (step, layer) in enumerate(zip(report["plan"], b["per_layer"])):
        lines.append(f"| {i} | `{step}` | {layer} |")
    return "\n".join(lines) + "\n"


def write(folder: Path, report: dict) -> None:
    from kvlab.checkpoint import atomic_write

    atomic_write(folder / "report.json", lambda tmp: Path(tmp).write_text(json.dumps(report, indent=2) + "\n"))
    atomic_write(folder / "report.md", lambda tmp: Path(tmp).write_text(markdown(report)))
