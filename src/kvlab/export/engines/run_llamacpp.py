"""llama.cpp (through llama-cpp-python) on GGUF files. Request: ``{"runs": [{"model": PATH, "prompt": [ids],
"n_new": N, "teacher": [ids], "logits_out": PATH.npy, "kv_type": "f32"|"f16", "text": STR}]}``. Per run: greedy ``tokens`` decoded through
llama.cpp's own KV cache, and (if ``teacher``) the logits of every position of ``teacher`` saved to
``logits_out`` as float32 ``[len(teacher), vocab]``; with ``text``, its ids under the GGUF's tokenizer."""

import json
import sys


def run_one(run: dict) -> dict:
    import numpy as np
    from llama_cpp import Llama

    need = max(len(run["prompt"]) + run["n_new"], len(run.get("teacher") or [])) + 8
    kv_type = {"f32": 0, "f16": 1}[run.get("kv_type", "f16")]  # ggml type of llama.cpp's KV cache
    llm = Llama(model_path=run["model"], n_ctx=need, n_batch=need, n_threads=run.get("threads", 1),
                logits_all=True, verbose=False, seed=0, type_k=kv_type, type_v=kv_type)
    llm.reset()
    llm.eval(run["prompt"])
    tokens = []
    for _ in range(run["n_new"]):
        token = int(np.argmax(llm.scores[llm.n_tokens - 1]))
        tokens.append(token)
        llm.eval([token])
    answer = {"tokens": tokens, "n_vocab": llm.n_vocab()}
    if run.get("text"):  # the GGUF's own tokenizer on a sentence
        answer["text_ids"] = llm.tokenize(run["text"].encode("utf-8"), add_bos=False, special=False)
    if run.get("teacher"):
        llm.reset()
        llm.eval(run["teacher"])
        np.save(run["logits_out"], np.asarray(llm.scores[: len(run["teacher"])], dtype=np.float32))
    del llm
    return answer


def main() -> None:
    request = json.loads(sys.stdin.read())
    answers = []
    for run in request["runs"]:
        try:
            answers.append(run_one(run))
        except Exception as exc:  # reported per run: one bad file does not hide the others
            answers.append({"error": f"{type(exc).__name__}: {exc}"})
    print(json.dumps({"runs": answers}))


if __name__ == "__main__":
    main()
