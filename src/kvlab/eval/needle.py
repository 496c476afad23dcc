"""Passkey retrieval (needle in a haystack) on a real model, with decode speed measured on the way.

A seeded 5-digit pass key sentence is placed at a depth of a haystack of held-out text, the prompt
ends with a question, and the model decodes greedily; a trial scores 1 when the first 5-digit run it
writes is the key. Prompts are token-exact: the haystack is cut to make each prompt ``context`` tokens.
Models are interleaved trial by trial, so their decode speeds (tokens/s of the answer's greedy steps,
batch 1, at that context) are comparable as a ratio.
"""

from __future__ import annotations

import random
import re
import time

import numpy as np
import torch
from tqdm import tqdm

NEEDLE = " The pass key is {key}. Remember it. {key} is the pass key. "
QUESTION = "\nWhat is the pass key? The pass key is"


def needle_prompt(tokenizer, haystack: np.ndarray, context: int, depth: float, rng: random.Random) -> tuple[list[int], str]:
    """A ``context``-token prompt with the needle at ``depth`` (0 = start, 1 = end) and its key."""
    from kvlab.errors import KvlabError

    key = str(rng.randint(10000, 99999))
    needle, question = tokenizer.encode(NEEDLE.format(key=key)), tokenizer.encode(QUESTION)
    room = context - len(needle) - len(question)
    if room < 1 or len(haystack) < room + 1:
        raise KvlabError(f"needle: context {context} too short for the needle, or the haystack text "
                         f"({len(haystack)} tokens) too small")
    start = rng.randint(0, len(haystack) - room - 1)
    hay = haystack[start:start + room].tolist()
    at = int(round(depth * room))
    return hay[:at] + needle + hay[at:] + question, key


def first_key(text: str) -> str | None:
    match = re.search(r"\d{5}", text.replace(" ", ""))
    return match.group(0) if match else None


@torch.no_grad()
def run_needles(models: dict, tokenizer, haystack: np.ndarray, contexts: list[int], depths: list[float],
                seed: int = 0, answer_tokens: int = 8, progress: bool = True, after=None) -> dict:
    """Per model: accuracy per context (over ``depths``), median decode tokens/s and cache bytes per context.
    ``after(name, model, context, cache, token)``, when given, runs after each answer on its cache (filled
    with the prompt and the answer; ``token``: the last one, not yet in it), interleaved with the trials;
    what it returns (not None) is kept per context under ``"after"`` (the first depth's)."""
    out = {name: {"accuracy": {}, "decode_tok_s": {}, "cache_bytes": {}, "answers": {}, "after": {}} for name in models}
    trials = [(n, d) for n in contexts for d in depths]
    for n, depth in tqdm(trials, desc="needle", unit="prompt", disable=not progress):
        rng = random.Random(f"{seed}-{n}-{depth}")
        prompt, key = needle_prompt(tokenizer, haystack, n, depth, rng)
        for name, model in models.items():
            cache = model.new_cache(1, max_length=n + 2 * answer_tokens)
            token = model(torch.tensor([prompt], device=model.device), cache=cache, last_only=True).argmax(-1)
            out[name]["cache_bytes"][n] = int(cache.nbytes)
            answer = [int(token)]
            t0 = time.perf_counter()
            for _ in range(answer_tokens - 1):
                token = model(token, cache=cache).argmax(-1)
                answer.append(int(token))
            rate = (answer_tokens - 1) / (time.perf_counter() - t0)
            text = tokenizer.decode(answer)
            hit = first_key(text) == key
            out[name]["answers"].setdefault(n, []).append({"depth": depth, "key": key, "answer": text, "hit": hit})
            out[name]["decode_tok_s"].setdefault(n, []).append(rate)
            extra = after(name, model, n, cache, token) if after is not None else None
            if extra is not None:
                out[name]["after"].setdefault(n, extra)
    for res in out.values():
        res["accuracy"] = {n: float(np.mean([a["hit"] for a in res["answers"][n]])) for n in contexts}
        res["decode_tok_s"] = {n: float(np.median(res["decode_tok_s"][n])) for n in contexts}
    return out
