"""``kvlab compare``: train the default attention variants (or given configs) at matched parameters on the
recall task and write a table (Markdown + JSON) and plots. Cached per variant: rerun to resume."""

from __future__ import annotations

from pathlib import Path

from kvlab.cli._args import token_counts


def add_parser(sub):
    p = sub.add_parser("compare", help="train and compare attention variants (memory, speed, recall)",
                       description="Train variants at matched parameter count on the same recall batches and "
                       "seeds; measure KV bytes, prefill/decode scaling and recall; write compare.md, "
                       "compare.json and PNG plots into --out. Interrupted runs resume from per-variant caches.")
    p.add_argument("--out", default="runs/compare", help="output folder (default runs/compare)")
    p.add_argument("--quick", action="store_true", help="test-sized budget (a few minutes on 2 CPU cores)")
    p.add_argument("--variants", nargs="+", help="kvlab config files to compare instead of the default set")
    p.add_argument("--seeds", type=int, help="seeds per variant")
    p.add_argument("--steps", type=int, help="training steps per seed")
    p.add_argument("--tokens", type=int, help="training tokens per seed (sets --steps from batch x seq)")
    p.add_argument("--device", help="cpu (default), cuda, ...")
    p.add_argument("--contexts", type=token_counts, help="contexts for KV bytes and speed")
    p.add_argument("--progress", action="store_true", help="show training progress bars")
    return p


def run(args) -> int:
    import sys

    from kvlab.compare.run import Budget, compare
    from kvlab.config import read_config_file
    from kvlab.errors import KvlabError

    budget = Budget.quick() if args.quick else Budget()
    for name in ("seeds", "steps", "device", "contexts"):
        if getattr(args, name) is not None:
            setattr(budget, name, getattr(args, name))
    if args.tokens:
        budget.steps = max(1, args.tokens // (budget.batch * budget.seq))
    variants = None
    if args.variants:
        variants = {}
        for path in args.variants:
            if not Path(path).exists():
                raise KvlabError(f"--variants: {path}: no such config file")
            variants[Path(path).stem] = read_config_file(path)
    out = Path(args.out)
    compare(out, budget, variants, progress=args.progress, log=lambda m: print(m, file=sys.stderr))
    print((out / "compare.md").read_text())
    print(f"written: {out / 'compare.md'}, {out / 'compare.json'}, {out}/*.png")
    return 0
