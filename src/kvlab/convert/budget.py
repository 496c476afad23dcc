"""Per-layer choices under a byte budget (``--kv-budget``).

Sensitivity (the divergence a choice costs) is measured per layer and candidate, on the calibration
sequence, as the *local* error: the candidate layer and the source layer both run over that layer's
real calibration inputs, chunked through their own caches (so eviction and quantization act as in
decoding), and the error is ``|attn_c(x) - attn_s(x)|^2 / |h|^2`` per token, the relative
perturbation of the residual stream ``h`` the layer adds to. It is a proxy for the KL of the final
logits; it costs one attention layer per candidate instead of the rest of the network (on SmolLM2
about 30 x 12 candidates in a minute or two instead of half an hour), and the report measures the
chosen plan's real KL. Errors are summed over layers (first order: small perturbations add).

Search: a multiple-choice knapsack, greedy by marginal error saved per byte. Start from every layer's
cheapest candidate (if even that exceeds the budget, a one-line error names the smallest reachable
budget), then repeatedly take the upgrade with the best error decrease per extra byte that still fits.
The budget is never exceeded by construction. Bytes are exact (``spec.cache_bytes`` at ``--context``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from tqdm import tqdm

from kvlab.attention._common import ForwardContext
from kvlab.config import ModelConfig
from kvlab.convert.registry import ConvertEnv, get_target
from kvlab.convert.spec import parse_layer_spec
from kvlab.errors import KvlabError


class UnreachableBudget(KvlabError):
    """The budget is below every layer's cheapest candidate; ``smallest`` is the least reachable total."""

    def __init__(self, smallest: int):
        super().__init__(f"budget unreachable; the smallest reachable is {smallest} bytes")
        self.smallest = smallest


@dataclass
class Candidate:
    step: str
    bytes: int  # cache bytes of the layer at the context (batch 1)
    error: float  # measured local error (0 for keep)


def default_menu(config: ModelConfig, i: int, context: int) -> list[str]:
    """The step strings tried for layer ``i``: heads, MLA ranks, windows, quantization, DeltaNet."""
    spec = config.layer(i)
    width = 2 * spec.n_kv_heads * spec.head_dim
    menu = ["keep", "int8", "int4"]
    for kv in sorted({1, spec.n_kv_heads // 2} - {0, spec.n_kv_heads}):
        menu += [f"gqa-{kv}", f"gqa-{kv}+int8", f"gqa-{kv}+int4"]
    for frac, rope in ((2, 32), (4, 32), (8, 8), (16, 8)):  # RoPE widths measured best on SmolLM2
        rank = width // frac - rope
        if rank >= 8 and rope < spec.head_dim:
            mla = f"mla:rank={rank},rope={rope}"  # select=high: layer-independent (the plan exports)
            menu += [mla, f"{mla}+int8"]
    for frac in (4, 16):
        window = max(context // frac, 16)
        if window < context:
            menu.append(f"sliding:window={window},sinks=4")
    menu.append("deltanet")
    return menu


@torch.no_grad()
def run_layer(module, x: torch.Tensor, chunk: int) -> torch.Tensor:
    """One attention module over ``x [T, d]`` chunked through its own cache: ``[T, d]``."""
    cache = module.new_cache_layer(1, x.dtype, x.device, [])
    outs = []
    for start in range(0, x.shape[0], chunk):
        part = x[None, start:start + chunk]
        ctx = ForwardContext(1, part.shape[1], start, None, x.device)
        outs.append(module(part, ctx, cache)[0])
    return torch.cat(outs)


def _layer_module(config: ModelConfig, i: int, spec, weights: dict):
    import dataclasses

    from kvlab.model import build_attention

    layers = list(config.layers)
    layers[i] = spec
    cfg = dataclasses.replace(config, layers=layers)
    with torch.device("meta"):
        module = build_attention(cfg, i)
    module.load_state_dict(weights, assign=True)
    return module.eval(), cfg.layer(i)


@torch.no_grad()
def measure(model, stats: list, context: int, menus: list[list[str]], chunk: int = 256,
            progress: bool = True) -> list[list[Candidate]]:
    """Bytes and local error of every candidate of every layer."""
    config, state = model.config, model.state_dict()
    elem = config.dtype_bytes
    out = []
    total = sum(len(m) for m in menus)
    bar = tqdm(total=total, desc="sensitivity", unit="cand", disable=not progress)
    for i, menu in enumerate(menus):
        x = stats[i].x_seq
        reference = run_layer(model.layers[i].self_attn, x, chunk)
        scale = stats[i].h_sq * x.shape[0]
        env = ConvertEnv(config, stats, [], 0, state)  # no plan: a model-wide choice sees this layer alone
        cands = []
        for step in menu:
            work = env.source_layer(i)
            for name, opts in parse_layer_spec(step, f"menu[{i}]"):
                work = get_target(name).fn(work, opts, env)
            module, resolved = _layer_module(config, i, work.spec, work.weights)
            error = 0.0 if step == "keep" else float((run_layer(module, x, chunk) - reference).double().pow(2).sum()) / scale
            cands.append(Candidate(step, resolved.cache_bytes(context, 1, elem), error))
            bar.update(1)
        out.append(cands)
    bar.close()
    return out


def search(cands: list[list[Candidate]], budget: int) -> list[int]:
    """Index of the chosen candidate per layer: minimal summed error with total bytes <= ``budget``."""
    choice = [min(range(len(c)), key=lambda j: (c[j].bytes, c[j].error)) for c in cands]
    used = sum(c[j].bytes for c, j in zip(cands, choice))
    if used > budget:
        raise UnreachableBudget(used)
    while True:
        best, move = 0.0, None
        for i, c in enumerate(cands):
            cur = c[choice[i]]
            for j, cand in enumerate(c):
                gain, extra = cur.error - cand.error, cand.bytes - cur.bytes
                if gain <= 0 or used + extra > budget:
                    continue
                ratio = math.inf if extra <= 0 else gain / extra
                if ratio > best:
                    best, move = ratio, (i, j)
        if move is None:
            return choice
        i, j = move
        used += cands[i][j].bytes - cands[i][choice[i]].bytes
        choice[i] = j
