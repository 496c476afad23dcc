"""vLLM (CPU build) on HF export folders. Request: ``{"runs": [{"model": DIR, "prompts": [[ids], ...],
"n_new": N, "dtype": "float32"}]}``. Per run: greedy ``tokens`` for each prompt (temperature 0, EOS
ignored), the tokenizer not loaded (ids in, ids out), local files only. All runs share one process,
so vLLM is imported once.

``--serve`` keeps the engine loaded between requests, for timing (``benchmarks/vllm_batched.py``): one
JSON request per stdin line, one ``{"answer": ...}`` line per request on stdout. A request is a run as
above plus ``"llm"`` (extra ``LLM(...)`` arguments, e.g. ``max_num_seqs``); the answer holds the tokens,
the wall ``seconds`` of ``generate`` alone, each request's engine ``timestamps`` (with
``"disable_log_stats": false`` in ``llm``; else None) and the engine's settings. The engine is rebuilt
only when its arguments change (pass ``max_model_len`` in ``llm`` to keep one engine across ``n_new``)."""

import gc
import json
import os
import sys
import time

ENV = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "VLLM_NO_USAGE_STATS": "1", "DO_NOT_TRACK": "1",
       "VLLM_CPU_KVCACHE_SPACE": "1", "VLLM_ENABLE_V1_MULTIPROCESSING": "0"}


def llm_kwargs(run: dict) -> dict:
    longest = max(len(p) for p in run["prompts"]) + run["n_new"]
    return {"model": run["model"], "skip_tokenizer_init": True, "dtype": run.get("dtype", "float32"),
            "max_model_len": max(longest, 64), "enforce_eager": True, "seed": 0, "max_num_seqs": 4, **run.get("llm", {})}


def make_llm(run: dict):
    from vllm import LLM

    return LLM(**llm_kwargs(run))


def greedy(llm, run: dict, timestamps: list | None = None) -> list[list[int]]:
    """Greedy tokens of each prompt; with ``timestamps`` (a list), also each request's engine timestamps
    (``scheduled``, ``first_token``, ``last_token``: engine-core monotonic seconds) where the engine
    records them (``disable_log_stats=False``)."""
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    params = SamplingParams(temperature=0.0, max_tokens=run["n_new"], ignore_eos=True, detokenize=False)
    outputs = llm.generate([TokensPrompt(prompt_token_ids=p) for p in run["prompts"]], params, use_tqdm=False)
    if timestamps is not None:
        for o in outputs:
            m = getattr(o, "metrics", None)
            timestamps.append(None if m is None else {name: getattr(m, f"{name}_ts", None)
                                                      for name in ("scheduled", "first_token", "last_token")})
    return [list(o.outputs[0].token_ids) for o in outputs]


def run_one(run: dict) -> dict:
    llm = make_llm(run)
    tokens = greedy(llm, run)
    del llm
    gc.collect()
    return {"tokens": tokens}


def settings(llm) -> dict:
    """What the engine actually runs with (after vLLM's CPU platform adjusted the arguments)."""
    import torch
    import vllm

    out = {"vllm": vllm.__version__, "torch": torch.__version__, "torch_threads": torch.get_num_threads(),
           **{k: os.environ.get(k) for k in ("OMP_NUM_THREADS", "VLLM_CPU_KVCACHE_SPACE",
                                             "VLLM_ENABLE_V1_MULTIPROCESSING", "VLLM_CPU_OMP_THREADS_BIND",
                                             "LD_PRELOAD")}}
    try:
        config = llm.llm_engine.vllm_config
        sched, cache = config.scheduler_config, config.cache_config
        out.update(max_num_seqs=sched.max_num_seqs, max_num_batched_tokens=sched.max_num_batched_tokens,
                   chunked_prefill=sched.enable_chunked_prefill, prefix_caching=cache.enable_prefix_caching,
                   block_size=cache.block_size, kv_cache_dtype=str(cache.cache_dtype),
                   executor=str(config.parallel_config.distributed_executor_backend),
                   compilation_mode=str(config.compilation_config.mode),
                   model_dtype=str(config.model_config.dtype))
    except AttributeError as exc:  # another vLLM version: the timings still stand
        out["settings_error"] = str(exc)
    return out


def serve() -> None:
    llm, key = None, None
    for line in sys.stdin:
        if not line.strip():
            continue
        try:
            run = json.loads(line)
            wanted = json.dumps(llm_kwargs(run), sort_keys=True)
            if wanted != key:
                llm, key = None, None
                gc.collect()
                llm, key = make_llm(run), wanted
            t0, stamps = time.perf_counter(), []
            tokens = greedy(llm, run, stamps)
            answer = {"tokens": tokens, "seconds": time.perf_counter() - t0, "timestamps": stamps,
                      "settings": settings(llm)}
        except Exception as exc:  # reported per request; the process keeps serving
            answer = {"error": f"{type(exc).__name__}: {exc}"}
        print(json.dumps({"answer": answer}), flush=True)


def main() -> None:
    for name, value in ENV.items():
        os.environ.setdefault(name, value)
    if "--serve" in sys.argv[1:]:
        serve()
        return
    request = json.loads(sys.stdin.read())
    answers = []
    for run in request["runs"]:
        try:
            answers.append(run_one(run))
        except Exception as exc:  # reported per run
            answers.append({"error": f"{type(exc).__name__}: {exc}"})
    sys.stdout.flush()
    print(json.dumps({"runs": answers}), flush=True)


if __name__ == "__main__":
    main()
