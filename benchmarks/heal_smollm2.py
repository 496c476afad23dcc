"""Heal SmolLM2-135M variants made by ``kvlab convert``'s library, by distillation from the source, on this CPU.

Each variant is a ``kvlab convert --to`` SPEC (or a committed per-layer plan under docs/convert/),
converted training-free from the source with calibration on the train split, then healed with
``kvlab.heal`` (stage 1 layer-local, then stage 2 KL), and its fidelity (perplexity through the cache,
KL to the source) measured on fixed windows of the stdlib test split at every curve point.

    PYTHONPATH=src python benchmarks/heal_smollm2.py --variant mqa --tokens 32K
Writes benchmarks/results/heal_smollm2_<variant>.{json,md,png}; the run folder goes to --work.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import RESULTS, write_results  # noqa: E402
from _smollm2 import DEFAULT, load_model  # noqa: E402

from kvlab.cli._args import token_count  # noqa: E402
from kvlab.heal.driver import HealConfig, heal  # noqa: E402

PLANS = Path(__file__).resolve().parents[1] / "docs" / "convert"
# variant -> convert SPEC (bytes per token relative to the source's GQA-3 in the comment)
VARIANTS = {
    "mqa": "mqa",  # fit merge, 1/3
    "mqa-mean": "gqa:kv=1,merge=mean",  # the GQA paper's mean pooling, 1/3
    "mla25": "mla:rank=64,rope=32,select=high",  # 96 of 384 values per layer: 25%
    "sliding25": "sliding:window=1024,sinks=4",  # 25% at 4K
    "budget25": str(PLANS / "smollm2-b25" / "plan.json"),  # convert --kv-budget 25%
}


def make_student(teacher, spec: str, calib_len: int):
    """``kvlab convert``'s library: the source converted to ``spec`` (calibrated on the train split)."""
    from kvlab.convert.build import convert, needs_calibration
    from kvlab.convert.calibrate import calibration_rows, collect
    from kvlab.convert.spec import resolve_spec
    from kvlab.data.corpus import load_corpus, split_ids
    from kvlab.tokenizer import load_tokenizer

    steps = resolve_spec(spec, teacher.config.n_layers)[0]
    stats = []
    if needs_calibration(steps):
        tok = load_tokenizer(DEFAULT, teacher.config.vocab_size)
        ids = split_ids(load_corpus(None, max_chars=2_000_000), "train", tok)
        stats = collect(teacher, calibration_rows(ids, 1, calib_len), progress=False)
    return convert(teacher, steps, stats, seed=0)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--variant", choices=sorted(VARIANTS), default="mqa")
    p.add_argument("--teacher", default=DEFAULT)
    p.add_argument("--tokens", type=token_count, default=32_768)
    p.add_argument("--stage", choices=["local", "kl", "both"], default="both")
    p.add_argument("--local-share", type=float, default=0.5)
    p.add_argument("--local-lr", type=float, default=HealConfig.local_lr)
    p.add_argument("--kl-lr", type=float, default=HealConfig.kl_lr)
    p.add_argument("--train", choices=["converted", "attention", "all"], default="converted")
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--eval-points", type=int, default=4)
    p.add_argument("--calib-len", type=int, default=2048)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--work", default="/tmp/kvlab-heal-runs")
    p.add_argument("--tag", default="", help="suffix of the result files (a variant healed another way)")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    work = Path(args.work)
    student_dir = work / f"student-{args.variant}"
    t0 = time.perf_counter()
    if not (student_dir / "config.json").exists():
        teacher = load_model(args.teacher)
        make_student(teacher, VARIANTS[args.variant], args.calib_len).save(student_dir, overwrite=True)
        del teacher
    convert_seconds = time.perf_counter() - t0
    cfg = HealConfig(tokens=args.tokens, stage=args.stage, train=args.train, batch=args.batch, seq=args.seq,
                     local_share=args.local_share, local_lr=args.local_lr, kl_lr=args.kl_lr,
                     eval_points=args.eval_points)
    name = f"heal_smollm2_{args.variant}" + (f"_{args.tag}" if args.tag else "")
    out = work / name
    started = time.perf_counter()
    summary = heal(student_dir, args.teacher, out, cfg, force=True)
    total = time.perf_counter() - started
    shutil.copyfile(out / "curve.png", RESULTS / f"{name}.png")
    teacher_ppl = summary["teacher_ppl"]
    rows = ["| stage | tokens | KL (nats/token) | perplexity | vs teacher |", "|---|---|---|---|---|"]
    rows += [f"| {q['stage']} | {q['tokens']} | {q['kl']:.4f} | {q['ppl']:.2f} | {q['ppl'] / teacher_ppl - 1:+.1%} |"
             for q in summary["points"]]
    secs = summary["seconds"]
    train_s = sum(v["train"] for v in secs.values())
    md = (f"# Healing SmolLM2-135M `{args.variant}` by distillation\n\n"
          f"Student: `kvlab convert --to {VARIANTS[args.variant]}` (training-free, calibrated on "
          f"{args.calib_len} train tokens; {convert_seconds:.0f} s).\n\n"
          f"Command: `PYTHONPATH=src python benchmarks/heal_smollm2.py {' '.join(sys.argv[1:])}`\n\n"
          f"Teacher perplexity on the same {summary['eval_tokens']} held-out tokens (through the cache): "
          f"{teacher_ppl:.3f}\n\n"
          + "\n".join(rows) + "\n\n"
          + "Wall seconds per stage (training / fidelity evaluation): "
          + ", ".join(f"{s} {v['train']:.0f} / {v['eval']:.0f}" for s, v in secs.items())
          + f"; healing (training only) {train_s:.0f} s; whole heal {total:.0f} s.\n\n"
          + f"![curve]({name}.png)\n")
    write_results(name, {"variant": args.variant, "spec": VARIANTS[args.variant],
                                                   "config": cfg.__dict__, "summary": summary,
                                                   "heal_seconds": total, "train_seconds": train_s}, md)
    print(md)
    print(json.dumps(secs))


if __name__ == "__main__":
    main()
