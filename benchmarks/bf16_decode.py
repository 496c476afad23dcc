"""SmolLM2-135M in bfloat16 against float32 on this CPU: decode and prefill speed, greedy agreement, and
what ``kvlab.runtime_dtype.pick_dtype`` decides here.

The real weights (``kvlab.load("smollm2-135m", dtype=...)``) in both dtypes. Decode: caches filled to the
context with random K/V through each layer's own write path (values do not change speed; see
``serving_budget.fill``), then one-token greedy steps of the whole batch, fp32 and bf16 alternating round
by round (in alternating order), median step (process CPU time by default: the machine is shared). Rows: batch 1 at 512 and 2048 tokens, batch 16
at 1024 (aggregate tok/s). Prefill: one forward of 1 x 2048 tokens, interleaved the same way. Greedy: N
new tokens from one fixed prompt in each dtype; bf16 rounds differently, so the count of positions that
agree (and the first that does not) is reported, not asserted, and so is bf16's next-token agreement on
fp32's own continuation (teacher-forced: each position compared on the same prefix). Every speed is a ratio measured in this run.

    python benchmarks/bf16_decode.py              # 1 thread, process CPU time, ~3 min
    python benchmarks/bf16_decode.py --threads 2 --clock wall   # on a quiet machine
    python benchmarks/bf16_decode.py --quick      # short contexts, few rounds (validation)
    python benchmarks/bf16_decode.py --threads 2 --clock wall --packed   # both dtypes with packed linears
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import machine_info, write_results  # noqa: E402
from _smollm2 import DEFAULT, load_model, timed_steps  # noqa: E402
from serving_budget import fill  # noqa: E402

from kvlab.linear_layout import packable_dtypes  # noqa: E402
from kvlab.runtime_dtype import describe, dtype_report  # noqa: E402

DTYPES = ("float32", "bfloat16")
PROMPT = "The history of the printing press begins"


def interleave(fns: dict, rounds: int) -> dict[str, list[float]]:
    """Call each ``fns[name]() -> list of seconds`` once per round, alternating the order; round 0 warms up."""
    samples: dict[str, list[float]] = {name: [] for name in fns}
    for r in range(rounds + 1):
        for name in (list(fns) if r % 2 == 0 else list(reversed(fns))):
            times = fns[name]()
            if r:
                samples[name] += times
    return samples


def decode_row(models: dict, batch: int, context: int, rounds: int, steps: int, clock) -> dict:
    caches = {}
    for name, model in models.items():
        caches[name] = model.new_cache(batch, max_length=context + steps * (rounds + 2))
        fill(caches[name], context)
    samples = interleave({n: lambda n=n: timed_steps(models[n], caches[n], steps, clock)
                          for n in models}, rounds)
    step = {n: statistics.median(t) for n, t in samples.items()}
    row = {"batch": batch, "context": context, "samples": len(samples["float32"])}
    for n in models:
        row[n] = {"step_ms": step[n] * 1e3, "tok_s": batch / step[n],
                  "step_ms_min_max": [min(samples[n]) * 1e3, max(samples[n]) * 1e3]}
    row["speedup"] = step["float32"] / step["bfloat16"]
    return row


@torch.inference_mode()
def prefill_row(models: dict, length: int, rounds: int, clock) -> dict:
    ids = torch.randint(1, 49152, (1, length), generator=torch.Generator().manual_seed(length))

    def timed(model):
        t0 = clock()
        model(ids, cache=model.new_cache(1, max_length=length), last_only=True)
        return [clock() - t0]

    samples = interleave({n: lambda m=m: timed(m) for n, m in models.items()}, rounds)
    seconds = {n: statistics.median(t) for n, t in samples.items()}
    return {"length": length, "samples": rounds, **{n: {"seconds": s, "tok_s": length / s} for n, s in seconds.items()},
            "speedup": seconds["float32"] / seconds["bfloat16"]}


def greedy(models: dict, new_tokens: int) -> dict:
    from kvlab.tokenizer import load_tokenizer

    tok = load_tokenizer(DEFAULT, models["float32"].config.vocab_size)
    ids = tok.encode(PROMPT)
    out = {n: m.generate([ids], max_new_tokens=new_tokens).tokens[0] for n, m in models.items()}
    a, b = out["float32"], out["bfloat16"]
    first = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), None)
    with torch.inference_mode():  # bf16's own next token after each fp32 prefix (one forward, no drift)
        logits = models["bfloat16"](torch.tensor([ids + a[:-1]]))[0, len(ids) - 1:]  # [new_tokens, vocab]
    forced = int((logits.argmax(-1) == torch.tensor(a)).sum())
    return {"prompt": PROMPT, "new_tokens": new_tokens, "agree": sum(x == y for x, y in zip(a, b)),
            "first_difference": first, "agree_on_fp32_prefix": forced, "float32_text": tok.decode(a),
            "bfloat16_text": tok.decode(b)}


def markdown(data: dict) -> str:
    g, p = data["greedy"], data["prefill"]
    packed = data.get("packed", False)
    lines = [f"# SmolLM2-135M: bfloat16 against float32{' (quick)' if data['quick'] else ''}"
             f"{', packed linears' if packed else ''}", "",
             f"{data['threads']} thread(s), {data['clock']} clock, fp32 and bf16 interleaved"
             + (", both with `Model.pack_linears_()` (oneDNN on packed weights where `packed_pays` measures it "
                f"faster; bf16 packs where oneDNN has native bf16: {data['bf16_packs']})" if packed else "")
             + "; load average "
             f"{data['load_avg_before']} before, {data['load_avg_after']} after (another process may hold a core). "
             "Decode: median one-token step of the whole batch over caches filled to the context; "
             "speedup = fp32 time / bf16 time (> 1: bf16 faster).", "",
             "| workload | fp32 | bf16 | bf16 speedup |", "|---|---|---|---|"]
    for r in data["decode"]:
        lines.append(f"| decode batch {r['batch']} at {r['context']} tokens (tok/s) | {r['float32']['tok_s']:.1f} | "
                     f"{r['bfloat16']['tok_s']:.1f} | **{r['speedup']:.2f}x** |")
    lines.append(f"| prefill 1 x {p['length']} (s) | {p['float32']['seconds']:.2f} | {p['bfloat16']['seconds']:.2f} | "
                 f"**{p['speedup']:.2f}x** |")
    lines += ["", f"Greedy, {g['new_tokens']} new tokens from {g['prompt']!r}: {g['agree']}/{g['new_tokens']} agree "
              f"position by position (first difference at {g['first_difference']}); given fp32's own prefix at every "
              f"position, bf16's next token agrees {g['agree_on_fp32_prefix']}/{g['new_tokens']} times.", "",
              f"`pick_dtype` on this machine (the MLP matmul, 576 x 1536, column-major as the model stores it"
              f"{', packed' if packed else ''}):", ""]
    lines += [f"- batch {b}: {describe(r)}" for b, r in data["pick_dtype"].items()]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--clock", choices=("cpu", "wall"), default="cpu",
                        help="cpu: process CPU time (another process holding the core is not counted)")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--packed", action="store_true", help="both models with packed linears (Model.pack_linears_)")
    args = parser.parse_args(argv)
    name = "bf16_decode" + ("_packed" if args.packed else "")
    shapes, prefill_len = [(1, 512), (1, 2048), (16, 1024)], 2048
    if args.quick:
        shapes, prefill_len, name = [(1, 64), (4, 64)], 128, name + "_quick"
        args.rounds, args.steps, args.new_tokens = 1, 2, 8
    torch.set_num_threads(args.threads)
    clock = time.process_time if args.clock == "cpu" else time.perf_counter
    load_before = [round(x, 2) for x in os.getloadavg()]
    models = {n: load_model(DEFAULT, n).eval().pack_linears_(args.packed) for n in DTYPES}
    picks = {b: dtype_report(models["float32"].config, "cpu", b, args.packed)
             for b in sorted({1, *(b for b, _ in shapes)})}
    for b, r in picks.items():
        print(f"pick_dtype batch {b}: {describe(r)}", flush=True)
    decode = []
    for batch, context in shapes:
        decode.append(decode_row(models, batch, context, args.rounds, args.steps, clock))
        print(decode[-1], flush=True)
    prefill = prefill_row(models, prefill_len, max(args.rounds // 2, 1), clock)
    print(prefill, flush=True)
    agreement = greedy(models, args.new_tokens)
    print(agreement, flush=True)
    data = {"quick": args.quick, "threads": args.threads, "clock": args.clock, "rounds": args.rounds, "steps": args.steps,
            "packed": args.packed, "bf16_packs": torch.bfloat16 in packable_dtypes(), "load_avg_before": load_before,
            "load_avg_after": [round(x, 2) for x in os.getloadavg()],
            "decode": decode, "prefill": prefill, "greedy": agreement, "pick_dtype": picks}
    paths = write_results(name, data, markdown(data))
    print(markdown(data))
    print(f"wrote {paths[0]} and {paths[1]} ({machine_info()['cpu']})")


if __name__ == "__main__":
    main()
