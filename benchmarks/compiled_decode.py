"""Does a compiled decode step pay on CPU? Eager decode against ``torch.compile`` of the same step, real model.

The issue asked for "an optional compiled decode step (``torch.compile`` with a static cache, as gpt-fast
does) if it pays on CPU". This measures the cheapest version of it: ``torch.compile(step, dynamic=True)``
over kvlab's own step (``model(token, cache)`` + argmax), with kvlab's growing cache, so the cache length
is a symbolic size instead of one graph per length. Reported per context: the first compiled call's
seconds (inductor's compile), the graph breaks and recompiles dynamo counted, the median step of each, the
ratio compiled / eager (below 1 = compiling pays), and whether the greedy tokens are the same. Eager runs
twice: as loaded, and with the linears packed for oneDNN (``Model.packed_linears``, kvlab's fastest eager
step; ``kvlab generate --packed``). Tracing bypasses kvlab's fused linear groups
(``linear_layout.group_forward``: their identity check would break the graph): inductor lays out the
linears itself.

Each round runs a fresh prefill, then ``--steps`` steps eager and ``--steps`` steps compiled (order
alternating round by round), in one process, wall clock, ``--threads`` threads.

    python benchmarks/compiled_decode.py                 # contexts 512 and 2048
    python benchmarks/compiled_decode.py --quick         # 128, 2 rounds (validation)
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import command_line, write_results  # noqa: E402
from _smollm2 import load_model  # noqa: E402


def decode(model, step, prompt: torch.Tensor, steps: int) -> tuple[list[float], list[int]]:
    """Prefill ``prompt [1, S]`` eagerly, then ``steps`` greedy steps through ``step``: seconds, tokens."""
    cache = model.new_cache(1, max_length=prompt.shape[1] + steps + 1)
    times, tokens = [], []
    with torch.inference_mode():
        token = model(prompt, cache=cache)[:, -1].argmax(-1, keepdim=True)
        for _ in range(steps):
            start = time.perf_counter()
            token = step(token, cache)
            times.append(time.perf_counter() - start)
            tokens.append(int(token))
    return times, tokens


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--contexts", type=int, nargs="*", default=[512, 2048])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=16)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args(argv)
    name = "compiled_decode"
    if args.quick:
        args.contexts, args.rounds, args.steps, name = [128], 2, 4, name + "_quick"
    torch.set_num_threads(args.threads)
    from torch._dynamo.utils import counters

    model = load_model().eval()

    def step(token: torch.Tensor, cache) -> torch.Tensor:
        return model(token, cache=cache)[:, -1].argmax(-1, keepdim=True)

    compiled = torch.compile(step, dynamic=True)
    rows = []
    for context in args.contexts:
        prompt = torch.randint(0, model.config.vocab_size, (1, context), generator=torch.Generator().manual_seed(0))
        counters.clear()
        start = time.perf_counter()
        decode(model, compiled, prompt, 1)  # compiles (or reuses the graphs of a shorter context)
        compile_s = time.perf_counter() - start
        samples: dict[str, list[float]] = {"eager": [], "packed": [], "compiled": []}
        tokens: dict[str, list[int]] = {}
        for r in range(args.rounds):
            for label in list(samples) if r % 2 == 0 else list(samples)[::-1]:
                with model.packed_linears() if label == "packed" else contextlib.nullcontext():
                    times, tokens[label] = decode(model, compiled if label == "compiled" else step, prompt, args.steps)
                samples[label] += times[1:]  # the first step of a round re-warms after the prefill
        eager, packed, comp = (statistics.median(samples[k]) for k in samples)
        rows.append({"context": context, "compile_s": compile_s, "eager_ms": eager * 1e3, "packed_ms": packed * 1e3,
                     "compiled_ms": comp * 1e3, "ratio": comp / eager, "ratio_vs_packed": comp / packed,
                     "same_tokens": tokens["eager"] == tokens["compiled"] == tokens["packed"],
                     "graph_breaks": sum(counters["graph_break"].values()),
                     "frames": counters["stats"].get("unique_graphs", 0)})
        print(rows[-1], flush=True)
    lines = [f"# Compiled decode step vs eager (SmolLM2-135M, fp32, batch 1, {args.threads} thread(s), wall clock)", "",
             "| context | first compiled call s | graph breaks | graphs | eager step ms | eager packed ms | compiled step ms | "
             "compiled / eager | compiled / packed | same greedy tokens |", "|---|---|---|---|---|---|---|---|---|---|"]
    lines += [f"| {r['context']} | {r['compile_s']:.1f} | {r['graph_breaks']} | {r['frames']} | {r['eager_ms']:.1f} | "
              f"{r['packed_ms']:.1f} | {r['compiled_ms']:.1f} | {r['ratio']:.2f} | {r['ratio_vs_packed']:.2f} | "
              f"{r['same_tokens']} |" for r in rows]
    lines += ["", f"Medians of {args.rounds} rounds x {args.steps - 1} steps (the first step of each round dropped). "
              "Graph breaks and graphs are dynamo's counters for the context's first call (a later context reuses "
              "the earlier graphs). Command: " + command_line("compiled_decode.py", argv)]
    print("\n".join(lines))
    write_results(name, {"threads": args.threads, "rounds": args.rounds, "steps": args.steps, "rows": rows},
                  "\n".join(lines))


if __name__ == "__main__":
    main()
