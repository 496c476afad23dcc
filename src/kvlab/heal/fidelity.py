"""How close a student is to its teacher on held-out text, measured through the cache the way decoding
sees it: windows of ``seq`` tokens are prefilled chunk by chunk into each model's own cache (later chunks
attend to what the cache holds, so a window or a quantized cache acts as in decoding). Reported: the
student's perplexity, the teacher's, and the mean per-token KL(teacher || student)."""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F

from kvlab.errors import KvlabError


def windows(ids: np.ndarray, seq: int, count: int) -> torch.Tensor:
    """``[N, seq + 1]`` int64: ``count`` evenly spaced windows of the held-out ids (fixed, not sampled)."""
    if len(ids) < seq + 1:
        raise KvlabError(f"held-out text has {len(ids)} tokens, fewer than seq + 1 = {seq + 1}")
    starts = np.linspace(0, len(ids) - seq - 1, num=min(count, len(ids) - seq)).astype(int)
    return torch.as_tensor(np.stack([ids[s:s + seq + 1] for s in starts]).astype(np.int64))


@torch.no_grad()
def cached_log_probs(model, inputs: torch.Tensor, chunk: int = 64, rows: int = 4) -> torch.Tensor:
    """Next-token log-probabilities ``[N, S, V]`` (fp32, CPU) of ``inputs [N, S]``, prefilled through the
    model's cache ``chunk`` tokens at a time, ``rows`` windows per forward."""
    was_training = model.training
    model.eval()
    out = []
    for part in inputs.split(rows):
        cache = model.new_cache(part.shape[0], max_length=part.shape[1])
        logits = [model(piece.to(model.device), cache=cache) for piece in part.split(chunk, dim=1)]
        out.append(F.log_softmax(torch.cat(logits, 1).float(), dim=-1).cpu())  # [n, S, V]
    model.train(was_training)
    return torch.cat(out)


def _nll(log_probs: torch.Tensor, targets: torch.Tensor) -> float:
    return float(-log_probs.gather(-1, targets.unsqueeze(-1)).mean())


class FidelityProbe:
    """The teacher's side of ``evaluate_fidelity`` computed once; calling it measures a student."""

    def __init__(self, teacher, ids: np.ndarray, seq: int = 256, count: int = 4, chunk: int = 64):
        self.rows, self.chunk = windows(ids, seq, count), chunk
        self.teacher = cached_log_probs(teacher, self.rows[:, :-1], chunk)
        self.teacher_nll = _nll(self.teacher, self.rows[:, 1:])

    def __call__(self, student) -> dict:
        student_lp = cached_log_probs(student, self.rows[:, :-1], self.chunk)
        kl = float((self.teacher.exp() * (self.teacher - student_lp)).sum(-1).mean())
        nll = _nll(student_lp, self.rows[:, 1:])
        return {"kl": kl, "ppl": math.exp(nll), "teacher_ppl": math.exp(self.teacher_nll),
                "eval_tokens": int(self.rows[:, 1:].numel())}


def evaluate_fidelity(student, teacher, ids: np.ndarray, seq: int = 256, count: int = 4) -> dict:
    """Student perplexity, teacher perplexity and mean KL(teacher || student) per token, through each
    model's cache, on ``count`` fixed windows of ``seq`` tokens of the held-out ids ``ids``."""
    return FidelityProbe(teacher, ids, seq, count)(student)
