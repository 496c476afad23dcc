"""Small builders shared by tests."""

from __future__ import annotations

import copy

import torch

from kvlab import Model, ModelConfig


def model_dict(layers, vocab: int = 97, d_model: int = 64, mlp_hidden: int = 96, **extra) -> dict:
    """A model config dict around ``layers`` (a matrix case: keys starting with ``_``, like ``_seq``, are
    test settings, dropped before the config is built)."""
    return {"vocab_size": vocab, "d_model": d_model, "n_layers": len(layers), "mlp_hidden": mlp_hidden,
            "layers": layers, **extra}


def tiny_config(layers: list[dict], vocab: int = 97, d_model: int = 64, mlp_hidden: int = 96, **extra) -> ModelConfig:
    return ModelConfig.from_dict(model_dict(copy.deepcopy(layers), vocab, d_model, mlp_hidden, **extra))


def build(config: ModelConfig | dict, seed: int = 0) -> Model:
    if isinstance(config, dict):
        config = ModelConfig.from_dict(copy.deepcopy(config))
    torch.manual_seed(seed)
    model = Model(config).eval()
    with torch.no_grad():  # larger-than-init weights make mismatches visible
        for p in model.parameters():
            if p.dim() >= 2:
                p.mul_(3.0)
    return model


def decode_stepwise(model: Model, ids: torch.Tensor, chunks: list[int], attention_mask=None) -> tuple[torch.Tensor, object]:
    """Feed ``ids`` through a cache in chunks of the given sizes (the rest one token at a time)."""
    cache = model.new_cache(ids.shape[0])
    outs, pos = [], 0
    sizes = list(chunks)
    while pos < ids.shape[1]:
        size = sizes.pop(0) if sizes else 1
        mask = attention_mask if pos == 0 else None
        if mask is not None:
            mask = mask[:, : pos + size]
        outs.append(model(ids[:, pos: pos + size], cache=cache, attention_mask=mask))
        pos += size
    return torch.cat(outs, dim=1), cache
