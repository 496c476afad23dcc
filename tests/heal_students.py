"""Simple converted students for heal tests and experiments (until ``kvlab convert`` lands): a source
model's config with changed layer specs, the source's weights copied where they fit."""

from __future__ import annotations

import torch

from kvlab import ModelConfig
from kvlab.model import Model


def _with_layers(teacher: Model, change) -> ModelConfig:
    data = teacher.config.to_dict()
    data["layers"] = [change(spec) for spec in data["layers"]]
    return ModelConfig.from_dict(data)


@torch.no_grad()
def mqa_student(teacher: Model, kv_heads: int = 1) -> Model:
    """GQA/MHA -> ``kv_heads`` KV heads by mean-pooling each group of K and V heads' projection rows."""
    student = Model(_with_layers(teacher, lambda s: {**s, "n_kv_heads": kv_heads}))
    state = {k: v.clone() for k, v in teacher.state_dict().items()}
    for i, block in enumerate(teacher.layers):
        attn = block.self_attn
        for name in ("k_proj", "v_proj"):
            w = getattr(attn, name).weight  # [Hkv * D, d]
            groups = w.view(kv_heads, attn.n_kv_heads // kv_heads, attn.head_dim, -1)
            state[f"layers.{i}.self_attn.{name}.weight"] = groups.mean(1).reshape(kv_heads * attn.head_dim, -1)
    student.load_state_dict(state)
    return student


@torch.no_grad()
def sliding_student(teacher: Model, window: int, sinks: int = 0) -> Model:
    """Every layer -> sliding window (+ sinks) on the source's own weights."""
    student = Model(_with_layers(teacher, lambda s: {**s, "type": "sliding", "window": window, "sinks": sinks}))
    student.load_state_dict(teacher.state_dict())
    return student
