"""Loading time of the shipped SmolLM2-135M-Instruct GGUF (Q4_1, 272 tensors): kvlab against transformers.

Each sample is a fresh Python process (imports done before the clock starts, so neither library reuses
anything from an earlier load) that times, in this order, the model load in fp32 (``kvlab.load(path)`` /
``AutoModelForCausalLM.from_pretrained(folder, gguf_file=name)``) and then the tokenizer load
(``kvlab.tokenizer.load_tokenizer`` / ``AutoTokenizer.from_pretrained(..., gguf_file=...)``). The two
libraries alternate sample by sample (in alternating order) after one warm-up each, so the file is in the
page cache for both and a drift in machine load hits both alike. Rows report medians [min-max] and the
ratio transformers / kvlab (> 1: kvlab loads faster).

    python benchmarks/load_time.py             # 5 samples each
    python benchmarks/load_time.py --repeats 2 # quicker
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import write_results  # noqa: E402

from kvlab.named_models import NAMED_MODELS  # noqa: E402

SCRIPTS = {
    "kvlab": """
import json, sys, time, torch
torch.set_num_threads(1)
import kvlab
from kvlab.tokenizer import load_tokenizer
path = sys.argv[1]
t0 = time.perf_counter(); model = kvlab.load(path)
t1 = time.perf_counter(); tok = load_tokenizer(path)
t2 = time.perf_counter()
print(json.dumps({"model_s": t1 - t0, "tokenizer_s": t2 - t1, "params": model.num_parameters()}))
""",
    "transformers": """
import json, sys, time, torch
torch.set_num_threads(1)
from pathlib import Path
import transformers
transformers.logging.disable_progress_bar()
path = Path(sys.argv[1])
t0 = time.perf_counter()
model = transformers.AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32)
t1 = time.perf_counter()
tok = transformers.AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
t2 = time.perf_counter()
print(json.dumps({"model_s": t1 - t0, "tokenizer_s": t2 - t1, "params": model.num_parameters()}))
""",
}


def sample(name: str, path: Path) -> dict:
    proc = subprocess.run([sys.executable, "-c", SCRIPTS[name], str(path)], capture_output=True, text=True,
                          timeout=900)
    if proc.returncode != 0:
        raise SystemExit(f"{name} load failed: {proc.stderr.strip().splitlines()[-1:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def stats(values: list[float]) -> dict:
    return {"median": statistics.median(values), "min": min(values), "max": max(values),
            "all": [round(v, 3) for v in values]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5, help="samples per library (default 5)")
    args = parser.parse_args()
    named = NAMED_MODELS["smollm2-135m"]
    path = named.path()
    if path is None:
        raise SystemExit(f"smollm2-135m is not installed: {named.install_hint}")
    names = list(SCRIPTS)
    for name in names:  # warm-up: page cache, first-import compilation
        sample(name, path)
    samples: dict[str, list[dict]] = {name: [] for name in names}
    for run in range(args.repeats):
        for name in names if run % 2 == 0 else reversed(names):
            samples[name].append(sample(name, path))
            print(name, samples[name][-1], flush=True)
    rows = {}
    for name, runs in samples.items():
        rows[name] = {key: stats([r[key] for r in runs]) for key in ("model_s", "tokenizer_s")}
        rows[name]["total_s"] = stats([r["model_s"] + r["tokenizer_s"] for r in runs])
        rows[name]["params"] = runs[0]["params"]
    ratio = {key: rows["transformers"][key]["median"] / rows["kvlab"][key]["median"]
             for key in ("model_s", "tokenizer_s", "total_s")}

    def cell(s: dict) -> str:
        return f"{s['median']:.2f} [{s['min']:.2f}-{s['max']:.2f}]"

    lines = ["# Loading the SmolLM2-135M-Instruct GGUF: kvlab vs transformers", "",
             f"File: `{named.file}` ({path.stat().st_size / 2**20:.1f} MiB, Q4_1 + Q8_0 embeddings), "
             f"dequantized to fp32, 1 torch thread, {args.repeats} interleaved fresh-process samples each. "
             "Seconds, median [min-max]; ratio = transformers / kvlab. kvlab's tokenizer load reuses the "
             "GGUF metadata its model load already parsed (one reader per file per process).", "",
             "| step | kvlab s | transformers s | ratio |", "|---|---|---|---|"]
    for key, label in (("model_s", "model"), ("tokenizer_s", "tokenizer"), ("total_s", "model + tokenizer")):
        lines.append(f"| {label} | {cell(rows['kvlab'][key])} | {cell(rows['transformers'][key])} | "
                     f"**{ratio[key]:.2f}x** |")
    paths = write_results("load_time", {"file": named.file, "repeats": args.repeats, "rows": rows,
                                        "ratio_transformers_over_kvlab": ratio}, "\n".join(lines))
    print("\n".join(lines))
    print(f"wrote {paths[0]} and {paths[1]}")


if __name__ == "__main__":
    main()
