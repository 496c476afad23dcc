"""``kvlab heal``: recover a converted model's quality by distillation from its source model (stage 1:
layer-local attention transfer; stage 2: KL on next-token distributions), then write KL and perplexity
against healing tokens, and ``kvlab convert``'s fidelity report of the healed model against the teacher.
``torchrun --nproc_per_node N -m kvlab heal ...`` heals data-parallel (DDP); rank 0 writes the report."""

from __future__ import annotations

import sys
from pathlib import Path

from kvlab.cli._args import token_count


def add_parser(sub):
    from kvlab.cli.convert import add_report_args
    from kvlab.heal.driver import HealConfig

    p = sub.add_parser("heal", help="heal a converted model by distillation from its source",
                       description="Distil a converted kvlab checkpoint toward its source: stage 1 (local) "
                       "trains each converted attention layer on the source's hidden states, stage 2 (kl) "
                       "matches the source's next-token distributions. Writes OUT/curve.json and curve.png, "
                       "and OUT/report.json and report.md (kvlab convert's fidelity report of the healed model "
                       "against the teacher, on the corpus' test split); the healed model is "
                       "OUT/<last stage>/checkpoint.")
    p.add_argument("converted", nargs="?", help="the converted kvlab checkpoint folder (the student)")
    p.add_argument("--teacher", help="the source checkpoint folder (kvlab or Hugging Face)")
    p.add_argument("--tokens", type=token_count, help="healing tokens in all (e.g. 200K)")
    p.add_argument("--out", required=True, help="heal run folder")
    p.add_argument("--stage", choices=["local", "kl", "both"], default="both", help="default both")
    p.add_argument("--train", choices=["converted", "attention", "all"], default="converted",
                   help="parameters stage 2 trains (stage 1 always trains the converted ones)")
    p.add_argument("--corpus", help="text file, folder or JSONL (default: this Python's standard library); "
                   "healing reads its train split, evaluation its test split")
    defaults = HealConfig(tokens=1)
    for flag, kind, text in [("batch", int, "sequences per optimizer micro-step"), ("seq", int, "tokens per sequence"),
                             ("grad-accum", int, "micro-steps per optimizer step"),
                             ("local-lr", float, "stage 1 learning rate"), ("kl-lr", float, "stage 2 learning rate"),
                             ("local-share", float, "share of --tokens for stage 1 with --stage both"),
                             ("hidden-weight", float, "weight of stage 2's hidden-state MSE term"),
                             ("eval-points", int, "fidelity evaluations per stage"),
                             ("eval-windows", int, "held-out windows per evaluation"),
                             ("eval-seq", int, "tokens per held-out window"),
                             ("max-chars", int, "characters read per corpus split"), ("seed", int, "data seed"),
                             ("device", str, "cpu, cuda, ...")]:
        default = getattr(defaults, flag.replace("-", "_"))
        p.add_argument(f"--{flag}", type=kind, default=None, help=f"{text} (default {default})")
    p.add_argument("--fsdp", action="store_true", help="shard with FSDP2 (fully_shard) instead of DDP")
    p.add_argument("--force", action="store_true", help="overwrite an existing heal folder")
    p.add_argument("--resume", action="store_true", help="continue the heal run in --out (saved settings)")
    p.add_argument("--stop-after", type=int, help="stop after this many steps in this invocation (resume later)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    add_report_args(p, "heal only (no fidelity report)")
    return p


def run(args) -> int:
    import dataclasses

    from kvlab.convert.report import check_lengths
    from kvlab.errors import KvlabError
    from kvlab.heal.driver import HealConfig, heal

    if args.fsdp:
        raise KvlabError("--fsdp: not supported yet; FSDP2 sharding is for models that do not fit one "
                         "device, and kvlab's trainer checkpoints full (unsharded) weights; use DDP "
                         "(torchrun without --fsdp)")
    if not args.resume and (args.converted is None or args.teacher is None or args.tokens is None):
        raise KvlabError("CONVERTED, --teacher and --tokens are required (unless --resume)")
    values = {"tokens": args.tokens or 1, "stage": args.stage, "train": args.train, "corpus": args.corpus}
    for f in dataclasses.fields(HealConfig):
        if getattr(args, f.name, None) is not None and f.name not in values:
            values[f.name] = getattr(args, f.name)
    cfg = HealConfig(**values)

    def check(student, teacher) -> None:  # before healing, not in a traceback after it
        if not args.no_report:
            check_lengths(min(student.config.max_seq_len, teacher.config.max_seq_len), args.eval_seqs,
                          args.eval_len, args.needle_contexts)

    summary = heal(args.converted, args.teacher, args.out, cfg, force=args.force, resume=args.resume,
                   progress=not args.no_progress, stop_after=args.stop_after, check=check)
    if summary:
        start, final = summary["start"], summary["final"]
        train_s = sum(s["train"] for s in summary["seconds"].values())
        print(f"teacher ppl {summary['teacher_ppl']:.3f}; student ppl {start['ppl']:.3f} -> {final['ppl']:.3f}, "
              f"KL {start['kl']:.4f} -> {final['kl']:.4f} after {final['tokens']} tokens ({train_s:.0f} s "
              f"healing); curve {args.out}/curve.json; model {summary['checkpoint']}", file=sys.stderr)
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
    if summary and not args.no_report:  # rank 0 only (the others' summary is empty)
        write_report(args, Path(args.out), summary)
    return 0


def write_report(args, out: Path, summary: dict) -> None:
    """``kvlab convert``'s fidelity report of the healed model against the teacher, on the heal corpus' test
    split (never trained on): OUT/report.json and report.md, and its table printed."""
    import json
    import time

    import torch

    import kvlab
    from kvlab.cli.convert import report_flags
    from kvlab.convert.report import bytes_section, evaluate, markdown, write
    from kvlab.data.corpus import load_corpus, split_ids
    from kvlab.heal.driver import RECORD, REPORT
    from kvlab.machine import machine_info
    from kvlab.outputs import record_output
    from kvlab.tokenizer import load_tokenizer

    t0 = time.perf_counter()
    saved = json.loads((out / RECORD).read_text())
    cfg, teacher_path = saved["config"], args.teacher or saved["teacher"]
    teacher = kvlab.load(teacher_path).eval().to(torch.device(cfg["device"]))
    healed = kvlab.load(summary["checkpoint"]).eval().to(teacher.device)
    tokenizer = load_tokenizer(teacher_path, teacher.config.vocab_size)
    corpus = load_corpus(cfg["corpus"], max_chars=cfg["max_chars"])
    fields, measured = evaluate(teacher, healed, tokenizer, split_ids(corpus, "test", tokenizer), corpus.source,
                                seed=cfg["seed"], **report_flags(args))
    plan_path = Path(saved["student"]) / "plan.json"
    plan_file = json.loads(plan_path.read_text()) if plan_path.exists() else {}
    layers = plan_file.get("layers") or [healed.config.layer(i).label() for i in range(healed.config.n_layers)]
    final = summary["final"]
    report = {"command": "heal", "source": str(teacher_path), "to": f"healed {saved['student']}", "plan": layers,
              "seed": cfg["seed"], "times": {"heal_s": sum(s["train"] for s in summary["seconds"].values()),
                                             "report_s": 0.0},
              "machine": machine_info(), "heal": {"checkpoint": summary["checkpoint"], "curve_final": final},
              "data": {"healing": f"{corpus.source} train split, {final['tokens']} tokens "
                                  f"({' then '.join(summary['seconds'])}, seed {cfg['seed']})",
                       "evaluation": fields.pop("evaluation")}, **fields}
    context = plan_file.get("context", min(4096, healed.config.max_seq_len))
    report["bytes"] = bytes_section(teacher.config, healed.config, context, measured)
    report["times"]["report_s"] = time.perf_counter() - t0
    write(out, report)
    record_output(out, *REPORT)
    print(markdown(report))
