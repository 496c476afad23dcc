"""Print the Markdown summary of docs/convert (orientation table + budget reports) from their JSON files,
for the README. Usage: python docs/convert/summarize.py"""

import json
import sys
from pathlib import Path

here = Path(__file__).parent
orient = json.loads((here / "orientation.json").read_text())
base = next(r["ppl"] for r in orient["results"] if r["spec"] == "keep")
print(f"SmolLM2-135M-Instruct, perplexity through the cache on {orient['rows']} (chunks of {orient['chunk']}); "
      f"source {base:.2f}. Calibration: 1 x 2048 train-split tokens.\n")
print("| `--to` | KV bytes vs source @4096 | perplexity | convert s |\n|---|---|---|---|")
for r in orient["results"]:
    print(f"| `{r['spec']}` | {100 * r['fraction_of_source_bytes_at_4096']:.1f}% | {r['ppl']:.2f} | {r['convert_s']:.1f} |")
rows = []
prefix = sys.argv[1] if len(sys.argv) > 1 else ""  # e.g. docs/convert/ for links from the README
for folder in sorted(here.glob("smollm2-b*")):
    rep = json.loads((folder / "report.json").read_text())
    f, b, n = rep.get("fidelity", {}), rep["bytes"], rep.get("needle", {})
    acc = ", ".join(f"{k}: {v:.2f}" for k, v in n.get("converted", {}).get("accuracy", {}).items())
    speed = ", ".join(f"{k}: {n['converted']['decode_tok_s'][k] / n['source']['decode_tok_s'][k]:.2f}x"
                      for k in n.get("source", {}).get("decode_tok_s", {}))
    rows.append(f"| [{folder.name}]({prefix}{folder.name}/report.md) | {100 * b['fraction_of_source']:.1f}% | "
                f"{f.get('ppl_source', float('nan')):.2f} -> {f.get('ppl_converted', float('nan')):.2f} | "
                f"{f.get('kl', float('nan')):.3f} | {f.get('top1_agreement', float('nan')):.3f} | {acc} | {speed} | "
                f"{rep['times']['convert_s']:.0f} + {rep['times'].get('report_s', 0):.0f} |")
if rows:
    print("\n| budget | KV bytes vs source @4096 | perplexity | KL | top-1 | passkey (converted) | decode speed | "
          "convert + report s |\n|---|---|---|---|---|---|---|---|")
    print("\n".join(rows))
    src = json.loads((sorted(here.glob("smollm2-b*"))[0] / "report.json").read_text())["needle"]["source"]
    print("\nSource passkey accuracy: " + ", ".join(f"{k}: {v:.2f}" for k, v in src["accuracy"].items()) + ".")
