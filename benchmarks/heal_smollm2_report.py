"""SmolLM2-135M variants side by side, training-free and healed, measured the way ``kvlab convert``'s report
measures them (``kvlab.convert.report.evaluate``): perplexity through the cache (teacher-forced prefill in
256-token chunks), KL and top-1 against the source on 2 x 2,048 held-out tokens of the stdlib test split,
and optionally passkeys. The heal curves (``heal_smollm2.py``) score 4 windows of 256 tokens, too short for
a window or a quantized cache to differ from the source; this is the common yardstick.

    PYTHONPATH=src python benchmarks/heal_smollm2_report.py \\
        --model "MLA 25%, healed=/tmp/healruns/heal_smollm2_mla25/kl/checkpoint" \\
        --model "budget 25%=spec:docs/convert/smollm2-b25/plan.json" --name heal_smollm2_report

``NAME=PATH`` is a kvlab checkpoint folder; ``NAME=spec:SPEC`` is converted from the source on the fly,
training-free (``heal_smollm2.make_student``). Writes benchmarks/results/<name>.{json,md}.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import write_results  # noqa: E402
from _smollm2 import DEFAULT, load_model  # noqa: E402
from heal_smollm2 import make_student  # noqa: E402

import kvlab  # noqa: E402
from kvlab.convert.report import evaluate  # noqa: E402
from kvlab.data.corpus import load_corpus, split_ids  # noqa: E402
from kvlab.planner import plan  # noqa: E402
from kvlab.tokenizer import load_tokenizer  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--model", action="append", required=True, help="NAME=PATH or NAME=spec:SPEC")
    p.add_argument("--teacher", default=DEFAULT)
    p.add_argument("--eval-seqs", type=int, default=2)
    p.add_argument("--eval-len", type=int, default=2048)
    p.add_argument("--chunk", type=int, default=256)
    p.add_argument("--needle-contexts", type=int, nargs="*", default=[])
    p.add_argument("--needle-depths", type=float, nargs="*", default=[0.1, 0.5, 0.9])
    p.add_argument("--context", type=int, default=4096, help="context of the bytes-per-token column")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--name", default="heal_smollm2_report")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    teacher = load_model(args.teacher).eval()
    tokenizer = load_tokenizer(DEFAULT, teacher.config.vocab_size)
    corpus = load_corpus(None, max_chars=2_000_000)
    test_ids = split_ids(corpus, "test", tokenizer)
    src_bytes = plan(teacher.config, context=args.context).total_bytes
    rows, data = [], {}
    for entry in args.model:
        name, _, where = entry.partition("=spec:") if "=spec:" in entry else entry.rpartition("=")
        where = "spec:" + where if "=spec:" in entry else where
        t0 = time.perf_counter()
        model = make_student(teacher, where[5:], 2048) if where.startswith("spec:") else kvlab.load(where)
        fields, measured = evaluate(teacher, model.eval(), tokenizer, test_ids, corpus.source, eval_seqs=args.eval_seqs,
                                    eval_len=args.eval_len, chunk=args.chunk, needle_contexts=args.needle_contexts,
                                    needle_depths=args.needle_depths, seed=0)
        for n, got in measured.items():  # live cache == plan at every measured length
            assert got["converted"] == plan(model.config, context=n).total_bytes, (name, n)
        f = fields["fidelity"]
        mine = plan(model.config, context=args.context).total_bytes
        needle = fields.get("needle", {}).get("converted", {}).get("accuracy", {})
        data[name] = {"where": where, "fidelity": f, "needle": fields.get("needle"), "bytes": mine,
                      "seconds": time.perf_counter() - t0}
        rows.append(f"| {name} | {mine / args.context:.0f} ({100 * mine / src_bytes:.1f}%) | {f['ppl_converted']:.3f} | "
                    f"{100 * (f['ppl_converted'] / f['ppl_source'] - 1):+.1f}% | {f['kl']:.4f} | {f['top1_agreement']:.3f} | "
                    + (" / ".join(f"{needle[n]:.2f}" for n in args.needle_contexts) if needle else "—") + " |")
        print(rows[-1], flush=True)
    first = next(iter(data.values()))["fidelity"]
    md = (f"# SmolLM2-135M variants through the cache ({args.eval_seqs} x {args.eval_len} held-out tokens)\n\n"
          f"Source perplexity {first['ppl_source']:.3f} on the same tokens (stdlib test split, prefilled in chunks of "
          f"{args.chunk} through each model's cache). Bytes per token at {args.context} tokens from `kvlab plan` "
          f"(= the live cache, asserted at every measured length).\n\n"
          f"Command: `PYTHONPATH=src python benchmarks/heal_smollm2_report.py {' '.join(repr(a) for a in sys.argv[1:])}`\n\n"
          "| model | KV bytes/token (% of source) | perplexity | vs source | KL | top-1 | passkeys "
          + "/".join(map(str, args.needle_contexts)) + " |\n|---|---|---|---|---|---|---|\n" + "\n".join(rows) + "\n")
    write_results(args.name, {"models": data, "args": vars(args)}, md)
    print(md)


if __name__ == "__main__":
    main()
