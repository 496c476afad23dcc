"""Reproduce the issue's orientation table on SmolLM2 (perplexity through the cache, 2 x 2048 held-out
stdlib tokens, chunks of 256) and add the better merges. Writes docs/convert/orientation.json/.md.
Usage: PYTHONPATH=src python docs/convert/orientation.py SRC"""

import json
import sys
import time

import torch

import kvlab
from kvlab.convert.build import convert
from kvlab.convert.calibrate import calibration_rows, collect
from kvlab.convert.spec import resolve_spec
from kvlab.data.corpus import load_corpus, split_ids
from kvlab.eval.fidelity import heldout_rows, perplexity_through_cache
from kvlab.machine import machine_info
from kvlab.planner import plan
from kvlab.tokenizer import load_tokenizer

torch.set_num_threads(1)
src = sys.argv[1]
specs = sys.argv[2].split(";") if len(sys.argv) > 2 else [
    "keep", "sliding:window=1024,sinks=4", "sliding:window=256,sinks=4", "sliding:window=256,sinks=0",
    "mqa:merge=mean", "mqa", "mla:rank=80,rope=16", "mla:rank=40,rope=8", "int8", "int4"]
model = kvlab.load(src).eval()
tok = load_tokenizer(src, model.config.vocab_size)
corpus = load_corpus(None, max_chars=600_000)
rows = heldout_rows(split_ids(corpus, "test", tok), 2, 2048)
t = time.perf_counter()
stats = collect(model, calibration_rows(split_ids(corpus, "train", tok), 1, 2048), progress=False)
calib_s = time.perf_counter() - t
results = []
src_bytes = plan(model.config, context=4096).total_bytes
for spec in specs:
    t = time.perf_counter()
    conv = convert(model, resolve_spec(spec, model.config.n_layers)[0], stats)
    convert_s = time.perf_counter() - t
    t = time.perf_counter()
    ppl = perplexity_through_cache(conv, rows, 256)
    results.append({"spec": spec, "ppl": ppl, "convert_s": convert_s, "eval_s": time.perf_counter() - t,
                    "fraction_of_source_bytes_at_4096": plan(conv.config, context=4096).total_bytes / src_bytes})
    print(json.dumps(results[-1]), flush=True)
out = {"source": src, "calibrate_s": calib_s, "rows": "2 x 2049 tokens, stdlib test split from its start",
       "chunk": 256, "results": results, "machine": machine_info()}
name = sys.argv[3] if len(sys.argv) > 3 else "orientation"
with open(f"docs/convert/{name}.json", "w") as f:
    json.dump(out, f, indent=2)
with open(f"docs/convert/{name}.md", "w") as f:
    f.write(f"# {name}: SmolLM2-135M-Instruct, training-free, perplexity through the cache\n\n"
            f"{out['rows']}, chunks of 256; calibration 1 x 2048 train-split tokens ({calib_s:.0f} s). "
            f"CPU: {out['machine']['cpu']}.\n\n| --to | KV bytes vs source @4096 | perplexity | convert s |\n|---|---|---|---|\n")
    for r in results:
        f.write(f"| `{r['spec']}` | {100 * r['fraction_of_source_bytes_at_4096']:.1f}% | {r['ppl']:.2f} | {r['convert_s']:.1f} |\n")
