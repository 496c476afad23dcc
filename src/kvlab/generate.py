"""Autoregressive generation over kvlab's cache: prefill once, then one token per step.

The decode loop does no per-step allocation of the cache (it is reserved for prompt + new tokens up
front) and no copy of past K/V; sampling is greedy, or temperature / top-k / top-p with a seed.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

from kvlab.errors import InputError, InputTypeError, KvlabError


@dataclass
class GenerationStats:
    prompt_tokens: int
    new_tokens: int
    prefill_seconds: float
    decode_seconds: float
    peak_cache_bytes: int

    @property
    def decode_tokens_per_s(self) -> float | None:
        """Decoded tokens per second per sequence (steps after the first token / decode time); None when
        nothing was decoded after the first token (there is no rate to report)."""
        steps = max(self.new_tokens - 1, 0)
        return steps / self.decode_seconds if steps and self.decode_seconds > 0 else None


@dataclass
class GenerationResult:
    tokens: list[list[int]]  # new tokens of each row, stop token included, nothing after it
    sequences: torch.Tensor  # [B, prompt + new] as fed to the model (left padding included)
    stats: GenerationStats
    finished: list[bool] = field(default_factory=list)


def left_pad(prompts: Sequence[Sequence[int]], pad_id: int = 0) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Lists of token ids of different lengths -> ``input_ids [B, L]`` and a 0/1 mask (None if equal)."""
    if isinstance(prompts, (str, bytes)) or not isinstance(prompts, Sequence) or not prompts:
        raise InputTypeError("input_ids: expected a [B, L] tensor or a list of token-id lists")
    for row, prompt in enumerate(prompts):
        if isinstance(prompt, (str, bytes)) or not isinstance(prompt, Sequence):
            raise InputTypeError(f"input_ids[{row}]: expected a list of token ids, got {type(prompt).__name__}")
        if not all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
            bad = next(t for t in prompt if not isinstance(t, int) or isinstance(t, bool))
            raise InputTypeError(f"input_ids[{row}]: token ids must be integers, got {bad!r}")
    if any(len(p) == 0 for p in prompts):
        raise KvlabError("generate: every prompt needs at least one token")
    longest = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), longest), pad_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), longest), dtype=torch.long)
    for row, prompt in enumerate(prompts):
        ids[row, longest - len(prompt):] = torch.as_tensor(list(prompt), dtype=torch.long)
        mask[row, longest - len(prompt):] = 1
    return ids, (None if bool(mask.all()) else mask)


def sample_next(logits: torch.Tensor, temperature: float, top_k: int | None, top_p: float | None,
                generator: torch.Generator | None) -> torch.Tensor:
    """logits ``[B, V]`` -> next token ids ``[B]``."""
    if temperature <= 0:
        return logits.argmax(dim=-1)
    logits = logits.float() / temperature
    if top_k:
        kth = torch.topk(logits, min(top_k, logits.shape[-1]), dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        cumulative = sorted_logits.softmax(-1).cumsum(-1)
        drop = cumulative - sorted_logits.softmax(-1) > top_p  # keep the smallest set reaching top_p
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
        logits = torch.full_like(logits, float("-inf")).scatter(-1, order, sorted_logits)
    probs = logits.softmax(dim=-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


def _check_sampling(model, max_new_tokens, temperature, top_k, top_p, seed, stop_tokens, pad_id) -> None:
    """Refuse bad generation settings at the entry, with kvlab's errors (not torch's from a later step)."""
    def integer(name, value, low, high=2**63 - 1):
        if isinstance(value, bool) or not isinstance(value, int):
            raise InputTypeError(f"{name}: must be an integer, got {value!r}")
        if not low <= value <= high:
            raise InputError(f"{name}: must be in {low}..{high}, got {value}")

    integer("max_new_tokens", max_new_tokens, 0)
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)):
        raise InputTypeError(f"temperature: must be a number, got {temperature!r}")
    if not math.isfinite(temperature) or temperature < 0:
        raise InputError(f"temperature: must be a finite number >= 0 (0 = greedy), got {temperature}")
    if top_k is not None:
        integer("top_k", top_k, 0)
    if top_p is not None:
        if isinstance(top_p, bool) or not isinstance(top_p, (int, float)) or not 0 < top_p <= 1:
            raise InputError(f"top_p: must be a number in (0, 1], got {top_p!r}")
    if seed is not None:
        integer("seed", seed, 0, 2**64 - 1)
    if isinstance(stop_tokens, (str, bytes)) or not isinstance(stop_tokens, (Sequence, set, frozenset)):
        raise InputTypeError(f"stop_tokens: expected a list of token ids, got {stop_tokens!r}")
    for token in stop_tokens:
        integer("stop_tokens", token, 0)
    integer("pad_id", pad_id, 0, model.config.vocab_size - 1)


@torch.inference_mode()
def generate(model, input_ids, max_new_tokens: int = 32, *, attention_mask: torch.Tensor | None = None,
             temperature: float = 0.0, top_k: int | None = None, top_p: float | None = None,
             seed: int | None = None, stop_tokens: Sequence[int] = (), pad_id: int = 0,
             stream: Callable[[list[int | None]], None] | None = None,
             cache_dtype: torch.dtype | None = None) -> GenerationResult:
    """Generate up to ``max_new_tokens`` per row.

    ``input_ids``: a ``[B, L]`` tensor (with an optional left-padding ``attention_mask``) or a list of
    token-id lists of any lengths (left-padded here). ``stream`` is called after every step with the
    new token of each row (None for rows already stopped). Rows stop at any of ``stop_tokens``.
    """
    _check_sampling(model, max_new_tokens, temperature, top_k, top_p, seed, stop_tokens, pad_id)
    if cache_dtype is not None and not isinstance(cache_dtype, torch.dtype):
        raise InputTypeError(f"cache_dtype: expected a torch.dtype (e.g. torch.bfloat16), got {cache_dtype!r}")
    if not isinstance(input_ids, torch.Tensor):
        input_ids, attention_mask = left_pad(input_ids, pad_id)
    model._check_input(input_ids, None)
    input_ids = input_ids.to(model.device)
    batch, prompt_len = input_ids.shape
    if prompt_len + max_new_tokens > model.config.max_seq_len:
        raise InputError(f"generate: prompt ({prompt_len} tokens) + max_new_tokens ({max_new_tokens}) exceeds the "
                         f"model's max_seq_len ({model.config.max_seq_len})")
    generator = None
    if seed is not None:
        generator = torch.Generator(device=model.device).manual_seed(seed)
    model.decode_layout_()  # re-packs weights a training step updated in place (no-op otherwise)
    cache = model.new_cache(batch, max_length=prompt_len + max_new_tokens, dtype=cache_dtype)
    stops = torch.as_tensor(list(stop_tokens), dtype=torch.long, device=model.device)
    finished = torch.zeros(batch, dtype=torch.bool, device=model.device)
    out: list[torch.Tensor] = []

    t0 = time.perf_counter()
    logits = model(input_ids, cache=cache, attention_mask=attention_mask, last_only=True)[:, -1]
    prefill_seconds = time.perf_counter() - t0
    if not bool(torch.isfinite(logits).all()):  # once, after the prefill: never a silently wrong token
        raise KvlabError("generate: the model's logits for the prompt are not finite (NaN or inf weights?)")
    peak = cache.nbytes
    t1 = time.perf_counter()
    for step in range(max_new_tokens):
        token = sample_next(logits, temperature, top_k, top_p, generator)
        token = torch.where(finished, torch.full_like(token, pad_id), token)
        out.append(token)
        if stream is not None:
            stream([None if f else int(t) for t, f in zip(token.tolist(), finished.tolist())])
        if len(stops):
            finished |= torch.isin(token, stops)
            if bool(finished.all()):
                break
        if step + 1 == max_new_tokens:
            break
        logits = model(token[:, None], cache=cache)[:, -1]
    peak = max(peak, cache.nbytes)
    decode_seconds = time.perf_counter() - t1 if out else 0.0

    new = torch.stack(out, dim=1) if out else input_ids.new_zeros((batch, 0))
    tokens = []
    for row in new.tolist():
        kept = []
        for t in row:
            kept.append(t)
            if t in stop_tokens:
                break
        tokens.append(kept)
    stats = GenerationStats(prompt_len, new.shape[1], prefill_seconds, decode_seconds, peak)
    return GenerationResult(tokens, torch.cat([input_ids, new], dim=1), stats, finished.tolist())
