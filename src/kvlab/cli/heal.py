"""``kvlab heal``: recover a converted model's quality by distillation from its source model (stage 1:
layer-local attention transfer; stage 2: KL on next-token distributions), then write KL and perplexity
against healing tokens. ``torchrun --nproc_per_node N -m kvlab heal ...`` heals data-parallel (DDP)."""

from __future__ import annotations

import sys

from kvlab.cli._args import token_count


def add_parser(sub):
    from kvlab.heal.driver import HealConfig

    p = sub.add_parser("heal", help="heal a converted model by distillation from its source",
                       description="Distil a converted kvlab checkpoint toward its source: stage 1 (local) "
                       "trains each converted attention layer on the source's hidden states, stage 2 (kl) "
                       "matches the source's next-token distributions. Writes OUT/curve.json and curve.png; "
                       "the healed model is OUT/<last stage>/checkpoint.")
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
    return p


def run(args) -> int:
    import dataclasses

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
    summary = heal(args.converted, args.teacher, args.out, cfg, force=args.force, resume=args.resume,
                   progress=not args.no_progress, stop_after=args.stop_after)
    if summary:
        start, final = summary["start"], summary["final"]
        train_s = sum(s["train"] for s in summary["seconds"].values())
        print(f"teacher ppl {summary['teacher_ppl']:.3f}; student ppl {start['ppl']:.3f} -> {final['ppl']:.3f}, "
              f"KL {start['kl']:.4f} -> {final['kl']:.4f} after {final['tokens']} tokens ({train_s:.0f} s "
              f"healing); curve {args.out}/curve.json; model {summary['checkpoint']}", file=sys.stderr)
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
    return 0
