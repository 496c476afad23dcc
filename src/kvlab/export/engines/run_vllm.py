"""vLLM (CPU build) on HF export folders. Request: ``{"runs": [{"model": DIR, "prompts": [[ids], ...],
"n_new": N, "dtype": "float32"}]}``. Per run: greedy ``tokens`` for each prompt (temperature 0, EOS
ignored), the tokenizer not loaded (ids in, ids out), local files only. All runs share one process,
so vLLM is imported once."""

import gc
import json
import os
import sys


def run_one(run: dict) -> dict:
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    longest = max(len(p) for p in run["prompts"]) + run["n_new"]
    llm = LLM(model=run["model"], skip_tokenizer_init=True, dtype=run.get("dtype", "float32"),
              max_model_len=max(longest, 64), enforce_eager=True, seed=0, max_num_seqs=4)
    params = SamplingParams(temperature=0.0, max_tokens=run["n_new"], ignore_eos=True, detokenize=False)
    outputs = llm.generate([TokensPrompt(prompt_token_ids=p) for p in run["prompts"]], params, use_tqdm=False)
    tokens = [list(o.outputs[0].token_ids) for o in outputs]
    del llm
    gc.collect()
    return {"tokens": tokens}


def main() -> None:
    for name, value in {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "VLLM_NO_USAGE_STATS": "1",
                        "DO_NOT_TRACK": "1", "VLLM_CPU_KVCACHE_SPACE": "1",
                        "VLLM_ENABLE_V1_MULTIPROCESSING": "0"}.items():
        os.environ.setdefault(name, value)
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
