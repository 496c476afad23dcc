"""Fewer KV heads (MHA/GQA -> GQA-k / MQA): ``gqa:kv=K,merge=fit|mean`` (``mqa`` = ``gqa:kv=1``).

Consecutive KV heads are merged ``m = n_kv / K`` at a time (query head ``h`` keeps reading the merge of
its old head).

- ``mean``: the GQA paper's mean pooling of the K and V projections.
- ``fit`` (default): activation-aware merges that keep the attention-relevant error small.
  Keys: per RoPE pair, the merged key is the weighted rank-1 principal component of the group's keys
  (complex weights per pair commute with RoPE; ``_linalg``), weighted by each head's query energy on that
  pair (a key error matters in proportion to the queries that read it); each query head is re-scaled by
  the pair's complex coefficient, so ``q . k`` is reproduced as well as rank one allows.
  Values: the joint PCA of the group's values, whitened by ``O_h^T O_h`` (an error matters through
  ``o_proj``), gives the merged value projection; each query head's ``o_proj`` block maps it back.
Both are exact when nothing is merged (``K = n_kv``).
"""

from __future__ import annotations

import dataclasses

import torch

from kvlab.attention.full import FullSpec
from kvlab.convert._linalg import (
    as_complex,
    pair_layout,
    put_complex,
    query_energy,
    rank1_merge,
    sym_sqrt,
    top_eigvecs,
)
from kvlab.convert.calibrate import augment, split_augmented
from kvlab.convert.registry import ConvertEnv, LayerWork, register_target
from kvlab.errors import ConfigError, UnsupportedError


def check_plain_attention(work: LayerWork, what: str) -> None:
    """Refuse layers whose keys are not a linear map of the input (qk_norm, k_eq_v, ...)."""
    spec = work.spec
    if not isinstance(spec, FullSpec):
        raise UnsupportedError(f"layers[{work.index}]: {what} needs a full-attention layer, got '{spec.type}'")
    for flag in ("qk_norm", "k_eq_v", "v_norm"):
        if getattr(spec, flag):
            raise UnsupportedError(f"layers[{work.index}]: {what}: layers with {flag} are not supported")
    if spec.kv_from is not None or spec.output_gate is not None:
        raise UnsupportedError(f"layers[{work.index}]: {what}: kv_from / output_gate layers are not supported")


def qkvo(work: LayerWork, spec) -> dict[str, torch.Tensor]:
    """Augmented per-head projections: q ``[H, D, n]``, k and v ``[Hkv, D, n]`` (``n = d + 1``), o ``[d, H*D]``."""
    w, h, hkv, d = work.weights, spec.n_heads, spec.n_kv_heads, spec.head_dim
    get = lambda name: augment(w[f"{name}.weight"], w.get(f"{name}.bias"))  # noqa: E731
    return {"q": get("q_proj").view(h, d, -1), "k": get("k_proj").view(hkv, d, -1),
            "v": get("v_proj").view(hkv, d, -1), "o": w["o_proj.weight"].double()}


def write_qkvo(work: LayerWork, spec, mats: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    out = dict(work.weights)
    dtype = work.weights["q_proj.weight"].dtype
    for name in ("q", "k", "v"):
        weight, bias = split_augmented(mats[name].reshape(-1, mats[name].shape[-1]))
        out[f"{name}_proj.weight"] = weight.to(dtype)
        if spec.qkv_bias:
            out[f"{name}_proj.bias"] = bias.to(dtype)
    out["o_proj.weight"] = mats["o"].to(dtype).contiguous()
    return out


def merge_keys(k: torch.Tensor, q: torch.Tensor, xx: torch.Tensor, rope, group: int):
    """Merge the key heads ``k [m, D, n]`` into one and re-scale their ``group`` query heads each
    (``q [m * group, D, n]``, modified copy returned)."""
    m, dim, _ = k.shape
    re, im, rest = pair_layout(rope, dim)
    q = q.clone()
    pair_e, free_e = query_energy(q, xx, re, im, rest)  # [m*G, P], [m*G, R]
    pair_w = pair_e.view(m, group, -1).sum(1).T  # [P, m]
    merged = torch.zeros(dim, k.shape[-1], dtype=torch.float64)
    z, a = rank1_merge(as_complex(k, re, im).transpose(0, 1), pair_w, xx)  # [P, n], [P, m]
    put_complex(merged, z, re, im)
    qc = as_complex(q, re, im)  # [m*G, P, n]
    qc = qc * a.T.conj().repeat_interleave(group, 0)[:, :, None]
    put_complex(q, qc, re, im)
    if len(rest):
        free_w = free_e.view(m, group, -1).sum(1).T  # [R, m]
        zr, ar = rank1_merge(k[:, rest].transpose(0, 1), free_w, xx)
        merged[rest] = zr
        q[:, rest] = q[:, rest] * ar.T.repeat_interleave(group, 0)[:, :, None]
    return merged, q


def merge_values(v: torch.Tensor, o_blocks: torch.Tensor, xx: torch.Tensor, group: int):
    """Merge value heads ``v [m, D, n]``; ``o_blocks [m * group, d, D]`` are the query heads' ``o_proj``
    columns. Returns the merged value rows ``[D, n]`` and the new ``o_proj`` blocks."""
    m, dim, _ = v.shape
    gram = torch.einsum("hdi,hdj->hij", o_blocks, o_blocks).view(m, group, dim, dim).sum(1)  # [m, D, D]
    root, inv_root = sym_sqrt(gram), sym_sqrt(gram, inverse=True)
    whitened = torch.einsum("gij,gjn->gin", root, v).reshape(m * dim, -1)  # [m*D, n]
    u = top_eigvecs(whitened @ xx @ whitened.T, dim).view(m, dim, dim)  # [m, D(old), D(new)]
    merged = torch.einsum("gio,gin->on", u, whitened.view(m, dim, -1))
    back = torch.einsum("gij,gjo->gio", inv_root, u).repeat_interleave(group, 0)  # [m*G, D, D]
    return merged, torch.einsum("hdi,hio->hdo", o_blocks, back)


@register_target("gqa", options={"kv": 1, "merge": "fit"}, needs_calibration=True)
def fewer_kv_heads(work: LayerWork, opts: dict, env: ConvertEnv) -> LayerWork:
    """Merge KV heads into ``kv`` heads (``merge``: fit = activation-aware, mean = mean pooling)."""
    check_plain_attention(work, "gqa")
    spec = work.spec.resolved(env.config)
    h, hkv, dim, k_new = spec.n_heads, spec.n_kv_heads, spec.head_dim, opts["kv"]
    if k_new < 1 or hkv % k_new:
        raise ConfigError(f"layers[{work.index}]: gqa: kv={k_new} must divide the layer's {hkv} KV heads")
    if opts["merge"] not in ("fit", "mean"):
        raise ConfigError(f"layers[{work.index}]: gqa: merge must be 'fit' or 'mean', got {opts['merge']!r}")
    m, group = hkv // k_new, h // hkv
    mats = qkvo(work, spec)
    if opts["merge"] == "mean":
        mats["k"] = mats["k"].view(k_new, m, dim, -1).mean(1)
        mats["v"] = mats["v"].view(k_new, m, dim, -1).mean(1)
    else:
        xx = env.stats[work.index].xx
        o_blocks = mats["o"].view(-1, h, dim).transpose(0, 1)  # [H, d, D]
        ks, vs, qs, os_ = [], [], [], []
        for j in range(k_new):
            heads, queries = slice(j * m, (j + 1) * m), slice(j * m * group, (j + 1) * m * group)
            k_j, q_j = merge_keys(mats["k"][heads], mats["q"][queries], xx, spec.rope, group)
            v_j, o_j = merge_values(mats["v"][heads], o_blocks[queries], xx, group)
            ks.append(k_j), qs.append(q_j), vs.append(v_j), os_.append(o_j)
        mats["k"], mats["v"], mats["q"] = torch.stack(ks), torch.stack(vs), torch.cat(qs)
        mats["o"] = torch.cat(os_).transpose(0, 1).reshape(-1, h * dim)  # [d, H*D]
    new_spec = dataclasses.replace(work.spec, n_kv_heads=k_new)
    return LayerWork(work.index, new_spec, write_qkvo(work, spec, mats))
