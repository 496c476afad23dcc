"""``kvlab convert SRC --to SPEC --out DIR``: retrofit a checkpoint to a smaller KV cache, training-free,
per layer (optionally under ``--kv-budget``), and write a kvlab checkpoint, its per-layer plan
(``plan.json``, reusable as ``--to``) and a fidelity report (``report.md`` / ``report.json``)."""

from __future__ import annotations

import argparse
import json
import re
import time
from pathlib import Path

from kvlab.cli._args import byte_size, positive_int, token_count, token_counts
from kvlab.errors import KvlabError

WRITTEN = ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json", "plan.json",
           "report.json", "report.md")


def budget_arg(text: str) -> tuple[str, float]:
    """'25%' -> ('fraction', 0.25); '20KiB' -> ('bytes', 20480) bytes per token."""
    match = re.fullmatch(r"\s*([0-9.]+)\s*%\s*", text)
    if match:
        value = float(match.group(1)) / 100
        if not 0 < value:
            raise argparse.ArgumentTypeError(f"must be positive: {text!r}")
        return "fraction", value
    return "bytes", float(byte_size(text))


def floats(text: str) -> list[float]:
    try:
        return [float(p) for p in text.split(",") if p.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a list of numbers: {text!r}") from None


def add_report_args(p, no_report_help: str) -> None:
    """The fidelity report's flags (``kvlab convert`` and ``kvlab heal``)."""
    p.add_argument("--eval-seqs", type=int, default=2, help="held-out sequences for perplexity/KL (default 2; 0 skips)")
    p.add_argument("--eval-len", type=token_count, default=2048, help="held-out sequence length (default 2048)")
    p.add_argument("--chunk", type=positive_int, default=256, help="prefill chunk appended to the cache (default 256)")
    p.add_argument("--needle-contexts", type=token_counts, default=[2048, 8192],
                   help="passkey / decode-speed contexts (default 2048,8192; empty string skips)")
    p.add_argument("--needle-depths", type=floats, default=[0.1, 0.5, 0.9], help="passkey depths (default 0.1,0.5,0.9)")
    p.add_argument("--no-report", action="store_true", help=no_report_help)


def report_flags(args) -> dict:
    """The flags of ``kvlab.convert.report.evaluate`` from parsed ``add_report_args``."""
    return {"eval_seqs": args.eval_seqs, "eval_len": args.eval_len, "chunk": args.chunk,
            "needle_contexts": args.needle_contexts, "needle_depths": args.needle_depths}


def add_parser(sub):
    p = sub.add_parser("convert", help="retrofit a checkpoint to a smaller KV cache (training-free)",
                       description=__doc__.split("\n\n")[0] + " SPEC grammar: see kvlab.convert.spec "
                       "(e.g. mqa, gqa-1:merge=mean, mla:rank=80,rope=16, sliding:window=1024,sinks=4, int8, "
                       "int4, share:every=2, block_sparse, deltanet, mqa+int8, or a plan.json).")
    p.add_argument("source", help="checkpoint folder or name kvlab.load accepts")
    p.add_argument("--to", help="SPEC for every layer, or a per-layer plan file; with --kv-budget, optionally the "
                   "candidates to choose from per layer, separated by '|' (e.g. 'keep|sliding:window=256,sinks=4': "
                   "the hybrid), default: kvlab.convert.budget.default_menu")
    p.add_argument("--out", required=True, help="output folder (refused if it holds files, unless --force)")
    p.add_argument("--kv-budget", type=budget_arg, help="per-layer search under this budget: '25%%' of the "
                   "source's bytes per token at --context, or absolute bytes per token ('20KiB')")
    p.add_argument("--sensitivity-from", metavar="REPORT", help="reuse the measured candidates of an earlier "
                   "--kv-budget run's report.json (same source, context and calibration flags)")
    p.add_argument("--context", type=token_count, default=4096, help="context the budget refers to (default 4096)")
    p.add_argument("--corpus", help="text for calibration (train split) and evaluation (test split); default stdlib")
    p.add_argument("--max-chars", type=positive_int, default=600_000, help="characters read per split")
    p.add_argument("--seed", type=int, default=0, help="seed of data offsets and passkeys (default 0)")
    p.add_argument("--calib-seqs", type=positive_int, default=1, help="calibration sequences (default 1)")
    p.add_argument("--calib-len", type=token_count, default=2048, help="calibration sequence length (default 2048)")
    add_report_args(p, "convert only (no evaluation)")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.add_argument("--force", action="store_true", help="replace the files a previous convert wrote in --out")
    return p


def data_ids(args, tokenizer, split: str):
    from kvlab.data.corpus import load_corpus, split_ids

    corpus = load_corpus(args.corpus, max_chars=args.max_chars)
    return corpus, split_ids(corpus, split, tokenizer)


def reuse_candidates(args, cfg) -> list:
    """The candidates (bytes, measured error) of an earlier budget run, checked to match this one."""
    from kvlab.config import read_config_file
    from kvlab.convert.budget import Candidate

    old = read_config_file(args.sensitivity_from)
    budget = old.get("budget") or {}
    same = (old.get("source") == str(args.source) and old.get("calibration_flags") == calibration_flags(args))
    if not budget.get("candidates") or not same or len(budget["candidates"]) != cfg.n_layers:
        raise KvlabError(f"--sensitivity-from: {args.sensitivity_from} is not a --kv-budget report of this "
                         "source with the same context and calibration flags")
    return [[Candidate(c["step"], c.get("bytes", round(c["bytes_per_token"] * args.context)), c["error"])
             for c in layer] for layer in budget["candidates"]]


def calibration_flags(args) -> dict:
    return {"context": args.context, "corpus": args.corpus, "max_chars": args.max_chars, "seed": args.seed,
            "calib_seqs": args.calib_seqs, "calib_len": args.calib_len, "chunk": args.chunk,
            "menu": args.to if args.kv_budget else None}


def run(args) -> int:  # noqa: C901 (one linear pipeline)
    import numpy as np
    import torch

    import kvlab
    from kvlab.convert import budget as bud
    from kvlab.convert.build import convert, needs_calibration
    from kvlab.convert.calibrate import calibration_rows, collect
    from kvlab.convert.report import bytes_section, check_lengths, evaluate, markdown, write
    from kvlab.convert.spec import format_steps, parse_layer_spec, resolve_spec
    from kvlab.machine import machine_info
    from kvlab.outputs import prepare_output_dir
    from kvlab.planner import plan
    from kvlab.tokenizer import load_tokenizer

    menu = None  # with --kv-budget, --to may list the candidates: "keep|sliding:window=256,sinks=4"
    if args.kv_budget and args.to not in (None, "auto"):
        menu = [part.strip() for part in args.to.split("|") if part.strip()]
        for step in menu:
            parse_layer_spec(step)
    if not args.kv_budget and not args.to:
        raise KvlabError("--to: required (a SPEC or a plan file), unless --kv-budget is given")
    out = Path(args.out)
    prepare_output_dir(out, args.force, files=WRITTEN, what="convert folder")
    torch.manual_seed(args.seed)
    source = kvlab.load(args.source).eval()
    cfg = source.config
    tokenizer = load_tokenizer(args.source, cfg.vocab_size)
    if getattr(tokenizer, "inner", None) is None and cfg.vocab_size > 512:
        raise KvlabError(f"{args.source}: no tokenizer.json found; a {cfg.vocab_size}-token model is not "
                         "byte-level, so its text cannot be encoded")
    if not args.no_report:
        check_lengths(cfg.max_seq_len, args.eval_seqs, args.eval_len, args.needle_contexts)
    times: dict = {}
    t0 = time.perf_counter()
    plan_data: dict = {}
    if args.kv_budget:
        plan_steps = None
    else:
        plan_steps, plan_data = resolve_spec(args.to, cfg.n_layers)
    stats, corpus, calib_desc = [], None, "none (the targets need none)"
    if plan_steps is None or needs_calibration(plan_steps):
        corpus, ids = data_ids(args, tokenizer, "train")
        need = args.calib_seqs * args.calib_len
        offset = int(np.random.default_rng(args.seed).integers(0, max(len(ids) - need, 1)))
        rows = calibration_rows(ids[offset:], args.calib_seqs, args.calib_len)
        stats = collect(source, rows, progress=True)
        calib_desc = (f"{corpus.source} train split, {args.calib_seqs} x {args.calib_len} tokens from token "
                      f"{offset} (seed {args.seed})")
    times["calibrate_s"] = time.perf_counter() - t0
    budget_info = None
    if plan_steps is None:
        t1 = time.perf_counter()
        kind, value = args.kv_budget
        src_total = plan(cfg, context=args.context).total_bytes
        budget_total = int(value * src_total) if kind == "fraction" else int(value * args.context)
        if args.sensitivity_from:
            cands = reuse_candidates(args, cfg)
        else:
            menus = [list(menu) if menu else bud.default_menu(cfg, i, args.context) for i in range(cfg.n_layers)]
            cands = bud.measure(source, stats, args.context, menus, chunk=args.chunk)
        try:
            choice = bud.search(cands, budget_total)
        except bud.UnreachableBudget as exc:
            raise KvlabError(f"--kv-budget: unreachable at context {args.context}; the smallest reachable is "
                             f"{exc.smallest / args.context:.1f} bytes/token "
                             f"({100 * exc.smallest / src_total:.2f}% of the source)") from None
        steps = [cands[i][j].step for i, j in enumerate(choice)]
        plan_steps = [parse_layer_spec(s) for s in steps]
        times["sensitivity_s"] = time.perf_counter() - t1
        budget_info = {"budget_bytes_per_token": budget_total / args.context, "budget_total_bytes": budget_total,
                       "source_total_bytes": src_total, "proxy_error": sum(cands[i][j].error for i, j in enumerate(choice)),
                       "sensitivity_from": args.sensitivity_from,
                       "candidates": [[{"step": c.step, "bytes": c.bytes, "bytes_per_token": c.bytes / args.context,
                                        "error": c.error}
                                       for c in layer] for layer in cands]}
    t2 = time.perf_counter()
    converted = convert(source, plan_steps, stats, args.seed, progress=True)
    times["convert_s"] = time.perf_counter() - t2 + times["calibrate_s"] + times.get("sensitivity_s", 0)
    converted.save(out)
    if hasattr(tokenizer, "save"):  # a GGUF's tokenizer too: the converted folder generates and chats alone
        tokenizer.save(out)
    layer_steps = [format_steps(s) for s in plan_steps]
    plan_file = {"kvlab_plan": 1, "source": str(args.source), "context": args.context, "layers": layer_steps}
    if budget_info:
        plan_file["budget"] = {k: v for k, v in budget_info.items() if k != "candidates"}
    (out / "plan.json").write_text(json.dumps(plan_file, indent=2) + "\n")
    report = {"source": str(args.source), "to": args.to or f"--kv-budget {args.kv_budget[1]}"
              f"{'' if args.kv_budget[0] == 'bytes' else ' (fraction)'}", "plan": layer_steps,
              "seed": args.seed, "calibration_flags": calibration_flags(args), "times": times, "machine": machine_info(), "budget": budget_info,
              "data": {"calibration": calib_desc, "evaluation": "none"}}
    measured: dict = {}
    if not args.no_report:
        t3 = time.perf_counter()
        if corpus is None:
            corpus, _ = data_ids(args, tokenizer, "train")
        test_ids = data_ids(args, tokenizer, "test")[1]
        fields, measured = evaluate(source, converted, tokenizer, test_ids, corpus.source, seed=args.seed,
                                    **report_flags(args))
        report["data"]["evaluation"] = fields.pop("evaluation")
        report.update(fields)
        times["report_s"] = time.perf_counter() - t3
    report["bytes"] = bytes_section(cfg, converted.config, args.context, measured)
    write(out, report)
    print(json.dumps(report, indent=2) if args.json else markdown(report))
    return 0
