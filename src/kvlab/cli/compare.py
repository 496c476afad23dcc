"""``kvlab compare``: ``--base MODEL`` converts a real checkpoint into every row (kvlab convert), measures it
training-free and after the same healing budget (kvlab heal); ``--from-scratch`` trains the default
attention variants (or given configs) at matched parameters on real text and on the recall task, over
several seeds. Both write a table (Markdown + JSON) and plots; every job is cached in the output folder:
rerun the same command to resume."""

from __future__ import annotations

from pathlib import Path

from kvlab.cli._args import positive_int, token_counts


def add_parser(sub):
    p = sub.add_parser("compare", help="compare KV-cache techniques (memory, speed, quality) on a real model "
                       "(--base) or trained from scratch (--from-scratch)",
                       description="--base MODEL: convert MODEL into every row, measure bytes/token (live == "
                       "plan), perplexity drop, KL, top-1, passkeys, decode speed and complexity, training-free "
                       "and healed. --from-scratch: train variants at matched parameter count on the same text "
                       "and recall batches and seeds. Both write compare.md, compare.json and PNG plots into "
                       "--out. Rerun to resume.")
    mode = p.add_mutually_exclusive_group(required=True)
    mode.add_argument("--base", help="real checkpoint (name or folder) to convert into every row, e.g. smollm2-135m")
    mode.add_argument("--from-scratch", action="store_true", help="train the variants from scratch (byte-level)")
    p.add_argument("--out", default="runs/compare", help="output folder (default runs/compare)")
    p.add_argument("--quick", action="store_true", help="test-sized budget (under 3 minutes on 2 CPU cores)")
    p.add_argument("--budget", help="--base: small, default, large or a multiplier of the default's tokens "
                   "(>= 2: passkeys at 512-8K for every model, 3 depths)")
    p.add_argument("--rows", nargs="+", help="--base: only these rows (names as in the table)")
    p.add_argument("--readme", help="--base: replace the compare-table block of this Markdown file with the table")
    p.add_argument("--variants", nargs="+", help="kvlab config files to compare instead of the default set")
    p.add_argument("--seeds", type=positive_int, help="seeds per variant (default 2)")
    p.add_argument("--steps", type=positive_int, help="recall-task training steps per seed")
    p.add_argument("--lm-steps", type=positive_int, help="text training steps per seed")
    p.add_argument("--tokens", type=positive_int, help="training tokens per seed and task (sets both step counts "
                   "from batch x seq)")
    p.add_argument("--corpus", help="text file, folder or JSONL (default: this Python's standard library)")
    p.add_argument("--device", help="cpu (default), cuda, ...")
    p.add_argument("--workers", type=positive_int, help="training processes side by side (default 2; 1 on GPUs)")
    p.add_argument("--contexts", type=token_counts, help="contexts for KV bytes and speed (at most 128K)")
    return p


def _check_variant(path: str, data: dict) -> dict:
    """A ``--variants`` file must be a config kvlab can build and run: refused (one line) otherwise, before
    any training, rather than reported later as an empty row."""
    import torch

    from kvlab.config import ModelConfig
    from kvlab.errors import KvlabError
    from kvlab.model import Model

    try:
        config = ModelConfig.from_dict(data)
        with torch.device("meta"):
            Model(config)
    except KvlabError as exc:
        raise KvlabError(f"--variants: {path}: {exc}") from None
    return data


def run_base(args) -> int:
    import sys

    from kvlab.compare.base import compare_base
    from kvlab.compare.base_report import update_readme
    from kvlab.compare.base_rows import ROWS, BaseBudget
    from kvlab.errors import KvlabError

    if args.quick and args.budget:
        raise KvlabError("--quick and --budget: give one")
    budget = BaseBudget.named("quick" if args.quick else args.budget or "default")
    if args.rows:
        unknown = sorted(set(args.rows) - {r.name for r in ROWS})
        if unknown:
            raise KvlabError(f"--rows: unknown {unknown} (rows: {', '.join(r.name for r in ROWS)})")
        budget.rows = args.rows
    if args.readme and not Path(args.readme).is_file():
        raise KvlabError(f"--readme: {args.readme}: no such file")
    out = Path(args.out)
    summary = compare_base(args.base, out, budget, log=lambda m: print(m, file=sys.stderr, flush=True))
    if args.readme:
        import os

        update_readme(Path(args.readme), summary, os.path.relpath(out / "pareto.png", Path(args.readme).parent))
    print((out / "compare.md").read_text())
    print(f"written: {out / 'compare.md'}, {out / 'compare.json'}, {out}/*.png")
    return 0


def run(args) -> int:
    import sys

    if args.base:
        return run_base(args)
    from kvlab.compare.run import Budget, compare
    from kvlab.config import read_config_file
    from kvlab.errors import KvlabError
    from kvlab.train.trainer import check_device

    budget = Budget.quick() if args.quick else Budget()
    if args.device:
        check_device(args.device)
    if args.device and args.device != "cpu":
        budget.workers = 1
    for name in ("seeds", "steps", "lm_steps", "device", "workers", "contexts", "corpus"):
        if getattr(args, name) is not None:
            setattr(budget, name, getattr(args, name))
    if args.corpus and not Path(args.corpus).exists():
        raise KvlabError(f"--corpus: {args.corpus}: no such file or folder")
    if args.contexts and max(args.contexts) > 2**17:
        raise KvlabError(f"--contexts: {max(args.contexts):,} tokens; compare measures contexts up to 131,072")
    if args.tokens:
        budget.steps = max(1, args.tokens // (budget.batch * budget.seq))
        budget.lm_steps = max(1, args.tokens // (budget.lm_batch * budget.lm_seq))
    variants = None
    if args.variants:
        variants = {}
        for path in args.variants:
            if not Path(path).exists():
                raise KvlabError(f"--variants: {path}: no such config file")
            if Path(path).stem in variants:
                raise KvlabError(f"--variants: two configs are named {Path(path).stem!r}; rename one (the file "
                                 "name labels its row)")
            variants[Path(path).stem] = _check_variant(path, read_config_file(path))
    out = Path(args.out)
    if args.corpus:
        budget.corpus = str(Path(args.corpus).resolve())
    compare(out, budget, variants, log=lambda m: print(m, file=sys.stderr, flush=True))
    print((out / "compare.md").read_text())
    print(f"written: {out / 'compare.md'}, {out / 'compare.json'}, {out}/*.png")
    return 0
