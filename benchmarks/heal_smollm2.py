"""Heal converted SmolLM2-135M variants by distillation from the source, on this CPU.

Students are built by simple means until ``kvlab convert`` lands (tests/heal_students.py): MQA by
mean-pooling SmolLM2's 3 K/V heads into 1, and a sliding window with sinks on the source's weights.
Each variant is healed with ``kvlab.heal`` (stage 1 then stage 2) and its fidelity (perplexity through
the cache, KL to the source) is measured on fixed windows of the stdlib test split.

    PYTHONPATH=src python benchmarks/heal_smollm2.py --variant mqa --tokens 20K
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
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from _common import RESULTS, write_results  # noqa: E402
from heal_students import mqa_student, sliding_student  # noqa: E402

import kvlab  # noqa: E402
from kvlab.cli._args import token_count  # noqa: E402
from kvlab.heal.driver import HealConfig, heal  # noqa: E402

TEACHER = "/work/cache/smollm2-hf"


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--variant", choices=["mqa", "sliding"], default="mqa")
    p.add_argument("--teacher", default=TEACHER)
    p.add_argument("--tokens", type=token_count, default=20_000)
    p.add_argument("--local-share", type=float, default=0.8)
    p.add_argument("--local-lr", type=float, default=HealConfig.local_lr)
    p.add_argument("--kl-lr", type=float, default=HealConfig.kl_lr)
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--window", type=int, default=64)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--work", default="/work/cache/heal-runs")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    work = Path(args.work)
    student_dir = work / f"student-{args.variant}"
    if not (student_dir / "config.json").exists():
        teacher = kvlab.load(args.teacher)
        student = mqa_student(teacher) if args.variant == "mqa" else sliding_student(teacher, args.window, 4)
        student.save(student_dir, overwrite=True)
        del teacher, student
    cfg = HealConfig(tokens=args.tokens, batch=args.batch, seq=args.seq, local_share=args.local_share,
                     local_lr=args.local_lr, kl_lr=args.kl_lr)
    out = work / f"heal-{args.variant}"
    started = time.perf_counter()
    summary = heal(student_dir, args.teacher, out, cfg, force=True)
    total = time.perf_counter() - started
    shutil.copyfile(out / "curve.png", RESULTS / f"heal_smollm2_{args.variant}.png")
    rows = ["| stage | tokens | KL (nats/token) | perplexity |", "|---|---|---|---|"]
    rows += [f"| {q['stage']} | {q['tokens']} | {q['kl']:.4f} | {q['ppl']:.2f} |" for q in summary["points"]]
    secs = summary["seconds"]
    md = (f"# Healing SmolLM2-135M {args.variant} by distillation\n\n"
          f"Command: `PYTHONPATH=src python benchmarks/heal_smollm2.py {' '.join(sys.argv[1:])}`\n\n"
          f"Teacher perplexity on the same {summary['eval_tokens']} held-out tokens: {summary['teacher_ppl']:.3f}\n\n"
          + "\n".join(rows) + "\n\n"
          + "Wall seconds per stage (training / fidelity evaluation): "
          + ", ".join(f"{s} {v['train']:.0f} / {v['eval']:.0f}" for s, v in secs.items())
          + f"; whole script {total:.0f} s.\n\n![curve](heal_smollm2_{args.variant}.png)\n")
    write_results(f"heal_smollm2_{args.variant}", {"config": cfg.__dict__, "summary": summary,
                                                   "script_seconds": total}, md)
    print(md)
    print(json.dumps(secs))


if __name__ == "__main__":
    main()
