"""A training run's hyper-parameters (``TrainConfig``) and the small pure functions the trainer derives from
them: the learning-rate schedule, the device check and a memory estimate."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import torch

from kvlab.config import ModelConfig
from kvlab.data.recall import LAYOUTS, RecallTask
from kvlab.errors import KvlabError


@dataclass
class TrainConfig:
    """Hyper-parameters of one run. ``batch`` is the global batch (summed over processes) per micro-step;
    an optimizer step sees ``batch * grad_accum`` sequences of ``seq`` tokens."""

    steps: int = 200
    batch: int = 8
    seq: int = 256
    lr: float = 3e-3
    min_lr_ratio: float = 0.1
    warmup: int = 20
    grad_accum: int = 1
    clip: float = 1.0
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    eval_every: int = 50
    eval_batches: int = 4
    save_every: int = 100
    seed: int = 0
    task: str = "lm"  # "lm": next-token loss on a corpus; "recall": loss on the MQAR answer positions
    recall_pairs: int = 8
    recall_alphabet: int | None = None  # distinct keys (and values) of the recall task; None: the whole vocab
    recall_layout: str = "pairs"  # "pairs" (k v tokens, Zoology's MQAR) or "fused" (one token per pair)
    compile: bool = False
    bf16: bool = False  # bfloat16 autocast (weights and optimizer stay fp32)
    device: str = "cpu"

    def validate(self) -> None:
        from kvlab.typecheck import check_field_types

        check_field_types(self, "train.")
        check_device(self.device)
        for name in ("steps", "batch", "seq", "grad_accum", "eval_every", "eval_batches", "save_every",
                     "recall_pairs"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise KvlabError(f"train.{name}: must be a positive integer, got {value!r}")
        for name in ("lr", "clip"):
            if not getattr(self, name) > 0:
                raise KvlabError(f"train.{name}: must be positive, got {getattr(self, name)!r}")
        for name, low, high in (("min_lr_ratio", 0.0, 1.0), ("weight_decay", 0.0, 10.0), ("beta1", 0.0, 0.999999),
                                ("beta2", 0.0, 0.999999)):
            if not low <= getattr(self, name) <= high:
                raise KvlabError(f"train.{name}: must be in [{low:g}, {high:g}], got {getattr(self, name)!r}")
        if self.seed < 0:
            raise KvlabError(f"train.seed: must be >= 0, got {self.seed}")
        if self.recall_alphabet is not None and self.recall_alphabet < 2:
            raise KvlabError(f"train.recall_alphabet: must be at least 2, got {self.recall_alphabet}")
        if not isinstance(self.warmup, int) or self.warmup < 0:
            raise KvlabError(f"train.warmup: must be a non-negative integer, got {self.warmup!r}")
        if self.task not in ("lm", "recall"):
            raise KvlabError(f"train.task: must be 'lm' or 'recall', got {self.task!r}")
        if self.recall_layout not in LAYOUTS:
            raise KvlabError(f"train.recall_layout: must be one of {', '.join(LAYOUTS)}, got {self.recall_layout!r}")

    def recall_task(self) -> RecallTask:
        return RecallTask(self.recall_pairs, self.recall_alphabet, self.recall_layout)

    @classmethod
    def from_dict(cls, data: dict) -> TrainConfig:
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in names})


def check_device(name: str) -> torch.device:
    """``name`` as a torch device this process can use; a one-line error otherwise."""
    try:
        device = torch.device(name)
    except (RuntimeError, TypeError):
        raise KvlabError(f"device: {name!r} is not a torch device (e.g. cpu, cuda, cuda:1, mps)") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise KvlabError(f"device: {name!r} asked for, but this torch has no usable CUDA device")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise KvlabError(f"device: {name!r} asked for, but MPS is not available here")
    return device


def lr_factor(step: int, cfg: TrainConfig) -> float:
    """Linear warmup over ``warmup`` steps, then cosine decay to ``min_lr_ratio`` at ``steps``."""
    if step < cfg.warmup:
        return (step + 1) / cfg.warmup
    progress = min(1.0, (step - cfg.warmup) / max(1, cfg.steps - cfg.warmup))
    return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


# ---- memory guard -------------------------------------------------------------------------------------
def estimate_train_bytes(config: ModelConfig, n_params: int, rows: int, seq: int) -> int:
    """A rough lower estimate of training memory: fp32 weights, grads and two Adam moments, plus the
    activations autograd keeps (about 16 ``d_model`` vectors per token per layer, fp32 logits and their
    gradient). Meant to refuse absurd batch x seq, not to plan tightly."""
    tokens = rows * seq
    activations = tokens * (16 * config.d_model * config.n_layers + 3 * config.vocab_size) * 4
    return 16 * n_params + activations


