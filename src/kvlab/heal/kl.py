"""Stage 2, end to end: KL(teacher || student) of next-token distributions at temperature 1, averaged
over tokens, plus an optional hidden-state term: ``hidden_weight`` times the mean over blocks of
``mean((h_s - h_t)^2) / var_l`` on each block's output, ``var_l`` from a fixed calibration batch (as in
stage 1). Teacher logits are computed on the fly under ``no_grad``; no top-k cache: each healing token is
seen once, so a cache would cost a teacher forward per token just the same."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from kvlab.heal.local import capture, output_variance


def kl_divergence(teacher_logits: torch.Tensor, student_logits: torch.Tensor) -> torch.Tensor:
    """Mean over positions of ``sum_v p_t(v) (log p_t(v) - log p_s(v))``; logits ``[..., V]``, fp32."""
    t = F.log_softmax(teacher_logits.float().flatten(0, -2), dim=-1)  # [N, V]
    s = F.log_softmax(student_logits.float().flatten(0, -2), dim=-1)
    return F.kl_div(s, t, log_target=True, reduction="batchmean")


class KLObjective(nn.Module):
    """``forward(batch) -> loss`` of stage 2. Holds the teacher outside the module tree (see
    ``LocalObjective``)."""

    def __init__(self, student, teacher, hidden_weight: float = 0.0, calibration: torch.Tensor | None = None):
        super().__init__()
        self.student, self._teacher, self.hidden_weight = student, (teacher,), float(hidden_weight)
        if self.hidden_weight:
            with torch.no_grad():
                _, hidden = self._run(teacher, calibration.to(student.device))
            self.register_buffer("variance", torch.stack([output_variance(h) for h in hidden]), persistent=False)

    @staticmethod
    def _run(model, ids: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """Logits ``[B, S, V]`` and (when hidden states are matched) every block's output."""
        store: dict[int, tuple] = {}
        with capture(dict(enumerate(model.layers)), store):
            logits = model(ids)
        return logits, [store[i][1] for i in range(len(model.layers))]

    def forward(self, batch: tuple[torch.Tensor, ...]) -> torch.Tensor:
        ids = batch[0]
        if not self.hidden_weight:
            with torch.no_grad():
                teacher_logits = self._teacher[0](ids)
            return kl_divergence(teacher_logits, self.student(ids))
        with torch.no_grad():
            teacher_logits, teacher_hidden = self._run(self._teacher[0], ids)
        logits, hidden = self._run(self.student, ids)
        mse = torch.stack([(h.float() - t.float()).pow(2).mean() for h, t in zip(hidden, teacher_hidden)])
        return kl_divergence(teacher_logits, logits) + self.hidden_weight * (mse / self.variance).mean()
