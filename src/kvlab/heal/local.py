"""Stage 1, layer-local attention transfer (LoLCATs-style).

For each converted layer ``l``, the teacher's attention input ``x_l`` (its normed hidden state) and output
``y_l`` are captured once per batch under ``no_grad`` (forward hooks; no LM head runs), and the student's
attention module runs on the same ``x_l``. The loss is the mean over converted layers of

    L_l = mean((student_attn_l(x_l) - y_l)^2) / var_l

where ``var_l`` is the variance of ``y_l`` over all elements of a fixed calibration batch (the first
validation batch), computed once: ``L_l`` is the fraction of the teacher output's variance left
unexplained (1 for a student that outputs the mean, 0 for a perfect one), comparable across layers, and
independent of how a batch is split over processes (so DDP equals one process). Attention layers run in
their full-sequence form (no cache): a windowed layer trains with its window mask, a quantized-cache layer
on unquantized keys, exactly as their full forward computes."""

from __future__ import annotations

from contextlib import contextmanager

import torch
from torch import nn

from kvlab.attention._common import ForwardContext


@contextmanager
def capture(modules: dict[int, nn.Module], store: dict[int, tuple]):
    """While active, each call of ``modules[i]`` stores ``(first input, output)`` in ``store[i]``."""
    handles = [m.register_forward_hook(lambda _m, args, out, i=i: store.__setitem__(i, (args[0], out)))
               for i, m in modules.items()]
    try:
        yield store
    finally:
        for handle in handles:
            handle.remove()


@torch.no_grad()
def teacher_attention(teacher, ids: torch.Tensor, layers: list[int]) -> dict[int, tuple]:
    """``{layer: (x [B, S, d], y [B, S, d])}``: the teacher's attention inputs and outputs on ``ids``."""
    store: dict[int, tuple] = {}
    with capture({i: teacher.layers[i].self_attn for i in layers}, store):
        teacher(ids, return_hidden=True)  # final norm only, no LM head
    return store


def output_variance(y: torch.Tensor) -> torch.Tensor:
    """Variance over all elements (population), in fp32; floored so that a zero output stays finite."""
    return y.float().var(unbiased=False).clamp_min(1e-12)


class LocalObjective(nn.Module):
    """``forward(batch) -> loss`` of stage 1 (see the module docstring). Registers only the student;
    the teacher is held outside the module tree, so DDP and the optimizer never see its parameters."""

    def __init__(self, student, teacher, layers: list[int], calibration: torch.Tensor):
        super().__init__()
        self.student, self._teacher, self.layers = student, (teacher,), list(layers)
        producers = {student.config.layers[i].kv_from for i in self.layers} - {None}
        self.run_layers = sorted(set(self.layers) | producers)  # producers fill ctx.shared for consumers
        captured = teacher_attention(teacher, calibration.to(student.device), self.layers)
        self.register_buffer("variance", torch.stack([output_variance(captured[i][1]) for i in self.layers]),
                             persistent=False)  # [L]

    def layer_losses(self, ids: torch.Tensor) -> torch.Tensor:
        """``[L]``: normalised MSE of each converted layer on the batch ``ids [B, S]``."""
        target = teacher_attention(self._teacher[0], ids, self.run_layers)
        batch, seq = ids.shape
        ctx = ForwardContext(batch, seq, 0, None, ids.device)
        outputs = {i: self.student.layers[i].self_attn(target[i][0], ctx, None) for i in self.run_layers}
        mse = torch.stack([(outputs[i].float() - target[i][1].float()).pow(2).mean() for i in self.layers])
        return mse / self.variance

    def forward(self, batch: tuple[torch.Tensor, ...]) -> torch.Tensor:
        return self.layer_losses(batch[0]).mean()
