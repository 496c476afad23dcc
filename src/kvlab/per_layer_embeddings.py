"""Per-layer embeddings (PLE, Gemma 3n / Gemma 4); the config check is ``config_options.validate_per_layer_embeddings``.

PLE gives every layer ``i`` a small vector ``e_i [P]`` per token, made of a token-identity part (a lookup in
a ``[V, L * P]`` table, times sqrt(P)) and a context part (a projection of the scaled main embedding,
times d^-0.5, RMS-normed over P), averaged with weight 2^-0.5 each. At the end of layer ``i`` the block adds
``norm(proj(gelu_tanh(gate(h)) * e_i))`` to the residual stream. Nothing here touches the KV cache.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from kvlab.mlp import ACTIVATIONS
from kvlab.norms import RMSNorm


class PerLayerEmbeddings(nn.Module):
    """Model-level PLE: ids ``[B, S]`` and scaled main embeddings ``[B, S, d]`` -> ``[B, S, L, P]``.
    Parameter names follow Hugging Face's Gemma 4 (``embed_tokens_per_layer``, ...)."""

    def __init__(self, d_model: int, n_layers: int, dim: int, vocab: int, eps: float):
        super().__init__()
        self.n_layers, self.dim, self.d_model = n_layers, dim, d_model
        self.embed_tokens_per_layer = nn.Embedding(vocab, n_layers * dim)
        self.per_layer_model_projection = nn.Linear(d_model, n_layers * dim, bias=False)
        self.per_layer_projection_norm = RMSNorm(dim, eps)

    def forward(self, input_ids: torch.Tensor, embeds: torch.Tensor) -> torch.Tensor:
        shape = (*input_ids.shape, self.n_layers, self.dim)
        table = self.embed_tokens_per_layer(input_ids)
        tokens = (table * torch.tensor(math.sqrt(self.dim), dtype=table.dtype)).reshape(shape)
        context = self.per_layer_model_projection(embeds) * self.d_model ** -0.5
        context = self.per_layer_projection_norm(context.reshape(shape))
        return (context + tokens) * 2 ** -0.5


class PerLayerInput(nn.Module):
    """Block-level PLE: ``h [B, S, d]`` and this layer's ``e [B, S, P]`` -> the residual update ``[B, S, d]``."""

    def __init__(self, d_model: int, dim: int, eps: float, act: str = "gelu_tanh", unit_offset: bool = False):
        super().__init__()
        self.act = ACTIVATIONS[act]
        self.per_layer_input_gate = nn.Linear(d_model, dim, bias=False)
        self.per_layer_projection = nn.Linear(dim, d_model, bias=False)
        self.post_per_layer_input_norm = RMSNorm(d_model, eps, unit_offset=unit_offset)

    def forward(self, h: torch.Tensor, e: torch.Tensor) -> torch.Tensor:
        x = self.act(self.per_layer_input_gate(h)) * e
        return self.post_per_layer_input_norm(self.per_layer_projection(x))
