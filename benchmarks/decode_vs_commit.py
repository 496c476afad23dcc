"""kvlab's decode speed against an older commit of itself, interleaved: has a refactor made decoding slower?

The kvlab side of ``decode.py`` (the same random Llama of d_model 512, 8 layers, 8 query heads of dim 64,
saved by transformers and loaded by kvlab; greedy ``generate()``; decode tokens/s between the first and the
last new token) runs in two worker processes, one importing kvlab from this tree and one from a checkout of
the old commit (``git worktree add``). The parent alternates the two run by run (in alternating order), one
worker busy at a time, and checks that both trees generate the same tokens. One thread per worker.

    python benchmarks/decode_vs_commit.py --old /tmp/old        # checkout of the baseline commit
    python benchmarks/decode_vs_commit.py --old /tmp/old --quick
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import write_results  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent

WORKER = r"""
import json, sys, tempfile, time
import torch
torch.set_num_threads(1)
sys.path.insert(0, sys.argv[1])
from decode import HEADS, HIDDEN, LAYERS, MLP, VOCAB, build_pair, decode_rate
_, model = build_pair(int(sys.argv[2]))
for line in sys.stdin:
    length, new = map(int, line.split())
    prompt = torch.randint(1, VOCAB, (1, length), generator=torch.Generator().manual_seed(length))
    stamps = []
    with torch.inference_mode():
        out = model.generate(prompt, max_new_tokens=new, stream=lambda _: stamps.append(time.perf_counter()))
    print(json.dumps({"rate": decode_rate(stamps), "tokens": out.tokens[0]}), flush=True)
"""


class Worker:
    def __init__(self, tree: Path, kv_heads: int):
        env = {**os.environ, "PYTHONPATH": str(tree / "src"), "OMP_NUM_THREADS": "1"}
        self.proc = subprocess.Popen([sys.executable, "-c", WORKER, str(ROOT / "benchmarks"), str(kv_heads)],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env)

    def run(self, length: int, new_tokens: int) -> dict:
        self.proc.stdin.write(f"{length} {new_tokens}\n")
        self.proc.stdin.flush()
        return json.loads(self.proc.stdout.readline())

    def close(self) -> None:
        self.proc.stdin.close()
        self.proc.wait()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--old", type=Path, required=True, help="checkout of the baseline commit")
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    old_commit = subprocess.run(["git", "-C", str(args.old), "rev-parse", "--short", "HEAD"], capture_output=True,
                                text=True).stdout.strip()
    new_commit = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"], capture_output=True,
                                text=True).stdout.strip()
    lengths, new_tokens, runs = ([128, 512], 16, 3) if args.quick else ([512, 2048], 64, 5)
    rows = []
    for kv_heads in (8, 2):
        workers = {"old": Worker(args.old, kv_heads), "new": Worker(ROOT, kv_heads)}
        for length in lengths:
            tokens = {name: w.run(length, new_tokens)["tokens"] for name, w in workers.items()}  # warm-up
            rates: dict[str, list[float]] = {name: [] for name in workers}
            for run in range(runs):
                for name in (["old", "new"] if run % 2 == 0 else ["new", "old"]):
                    rates[name].append(workers[name].run(length, new_tokens)["rate"])
            row = {"kv_heads": kv_heads, "prompt": length, "new_tokens": new_tokens, "runs": runs,
                   "same_tokens": tokens["old"] == tokens["new"]}
            for name, values in rates.items():
                row[name] = {"median": statistics.median(values), "min": min(values), "max": max(values),
                             "all": [round(v, 2) for v in values]}
            row["ratio_new_over_old"] = row["new"]["median"] / row["old"]["median"]
            rows.append(row)
            print(f"kv {kv_heads} prompt {length}: old {row['old']['median']:.1f} tok/s, new "
                  f"{row['new']['median']:.1f} tok/s, new/old {row['ratio_new_over_old']:.3f}", flush=True)
        for w in workers.values():
            w.close()
    lines = [f"# kvlab decode: this tree ({new_commit}) vs {old_commit}, interleaved", "",
             "decode tokens/s of greedy `generate()`, median [min-max] of the runs; one thread per process", "",
             "| KV heads | prompt | new | old tok/s | new tok/s | new / old | same tokens |",
             "|---:|---:|---:|---:|---:|---:|:---:|"]
    for r in rows:
        lines.append(f"| {r['kv_heads']} | {r['prompt']} | {r['new_tokens']} | {r['old']['median']:.1f} "
                     f"[{r['old']['min']:.1f}-{r['old']['max']:.1f}] | {r['new']['median']:.1f} "
                     f"[{r['new']['min']:.1f}-{r['new']['max']:.1f}] | {r['ratio_new_over_old']:.3f} | "
                     f"{'yes' if r['same_tokens'] else 'NO'} |")
    name = f"decode_vs_{old_commit}" + ("_quick" if args.quick else "")
    paths = write_results(name, {"old": old_commit, "new": new_commit, "rows": rows}, "\n".join(lines))
    print(f"wrote {paths[0]} and {paths[1]}")


if __name__ == "__main__":
    main()
