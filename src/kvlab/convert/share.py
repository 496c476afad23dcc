"""``share:every=K`` / ``share:from=J``: cross-layer KV sharing. A consumer layer drops its K/V
projections and reads an earlier producer's cache (``kv_from``), so it caches nothing.

With ``from=-1`` (auto) the producer is the earlier producer layer whose keys and values are most similar
to this layer's on the calibration sequence, after the best re-mapping that keeps the consumer exact
where the two agree: per KV head and RoPE pair a complex scalar ``beta`` (``k_i ~ beta k_j``, absorbed
into the consumer's queries; it commutes with RoPE) and per KV head a matrix ``B`` (``v_i ~ B v_j``,
absorbed into its ``o_proj``), both least squares. Similarity = that fit's residual, weighted by the
consumer's query energy (keys) and its ``o_proj`` (values). Under ``every=K`` only layers with
``i % K != 0`` become consumers; the others stay producers.
"""

from __future__ import annotations

import dataclasses

import torch

from kvlab.convert._linalg import as_complex, pair_layout, put_complex
from kvlab.convert.heads import check_plain_attention, qkvo, write_qkvo
from kvlab.convert.registry import ConvertEnv, LayerWork, register_target
from kvlab.errors import ConfigError, UnsupportedError


def _activations(mats: dict, x: torch.Tensor, name: str) -> torch.Tensor:
    """Per-head projections of ``x [T, d]``: ``[H, T, D]`` (float64)."""
    xa = torch.cat([x.double(), x.new_ones(x.shape[0], 1, dtype=torch.float64)], dim=1)  # [T, n]
    return torch.einsum("hdn,tn->htd", mats[name], xa)


def fit_share(cons: dict, prod: dict, x_cons: torch.Tensor, x_prod: torch.Tensor, rope, group: int):
    """Re-map the consumer's queries and ``o_proj`` onto the producer's K/V. Returns (new q ``[H, D, n]``,
    new o ``[d, H*D]``, weighted relative residual of the fit)."""
    kc, kp = _activations(cons, x_cons, "k"), _activations(prod, x_prod, "k")  # [Hkv, T, D]
    vc, vp = _activations(cons, x_cons, "v"), _activations(prod, x_prod, "v")
    hkv, _, dim = kc.shape
    re, im, rest = pair_layout(rope, dim)
    q = cons["q"].clone()
    qa = _activations(cons, x_cons, "q")  # [H, T, D]
    # keys: one complex scalar per (KV head, pair), one real scalar per free channel
    zc = torch.complex(kc[..., re], kc[..., im])  # [Hkv, T, P]
    zp = torch.complex(kp[..., re], kp[..., im])
    beta = (zc * zp.conj()).mean(1) / zp.abs().pow(2).mean(1).clamp_min(1e-30)  # [Hkv, P]
    qw = torch.complex(qa[..., re], qa[..., im]).abs().pow(2).mean(1).view(hkv, group, -1).sum(1)  # [Hkv, P]
    key_err = (qw * (zc - beta[:, None] * zp).abs().pow(2).mean(1)).sum()
    key_ref = (qw * zc.abs().pow(2).mean(1)).sum()
    qc = as_complex(q, re, im) * beta.conj().repeat_interleave(group, 0)[:, :, None]
    put_complex(q, qc, re, im)
    if len(rest):
        fc, fp = kc[..., rest], kp[..., rest]
        b = (fc * fp).mean(1) / fp.pow(2).mean(1).clamp_min(1e-30)  # [Hkv, R]
        fw = qa[..., rest].pow(2).mean(1).view(hkv, group, -1).sum(1)
        key_err = key_err + (fw * (fc - b[:, None] * fp).pow(2).mean(1)).sum()
        key_ref = key_ref + (fw * fc.pow(2).mean(1)).sum()
        q[:, rest] = q[:, rest] * b.repeat_interleave(group, 0)[:, :, None]
    # values: v_c ~ B v_p per KV head (least squares), absorbed into o_proj
    cpp = torch.einsum("gti,gtj->gij", vp, vp)
    ccp = torch.einsum("gti,gtj->gij", vc, vp)
    mix = ccp @ torch.linalg.pinv(cpp)  # [Hkv, D, D]
    h = q.shape[0]
    o_blocks = cons["o"].view(-1, h, dim).transpose(0, 1)  # [H, d, D]
    new_o = torch.einsum("hdi,hij->hdj", o_blocks, mix.repeat_interleave(group, 0))
    resid = vc - torch.einsum("gij,gtj->gti", mix, vp)  # [Hkv, T, D]
    ob = o_blocks.view(hkv, group, *o_blocks.shape[1:])
    val_err = sum(float(torch.einsum("rdi,ti->rtd", ob[g], resid[g]).pow(2).sum()) for g in range(hkv))
    val_ref = sum(float(torch.einsum("rdi,ti->rtd", ob[g], vc[g]).pow(2).sum()) for g in range(hkv))
    error = float(key_err / key_ref.clamp_min(1e-30)) + val_err / max(val_ref, 1e-30)
    return q, new_o.transpose(0, 1).reshape(-1, h * dim), error


def _compatible(cons_spec, prod: LayerWork, cfg) -> bool:
    p, c = prod.spec.resolved(cfg), cons_spec.resolved(cfg)
    return (prod.spec.kv_from is None and type(prod.spec) is type(cons_spec)
            and (p.n_kv_heads, p.head_dim, p.rope) == (c.n_kv_heads, c.head_dim, c.rope)
            and getattr(p, "window", None) == getattr(c, "window", None)
            and not p.qk_norm and not p.k_eq_v and not p.v_norm)


def candidates(work: LayerWork, env: ConvertEnv) -> list[tuple[int, float, dict]]:
    """``(producer, error, weights)`` for every compatible earlier producer, best first."""
    spec = work.spec.resolved(env.config)
    cons, out = qkvo(work, spec), []
    for prod in env.done:
        if not _compatible(work.spec, prod, env.config):
            continue
        pspec = prod.spec.resolved(env.config)
        q, o, err = fit_share(cons, qkvo(prod, pspec), env.stats[work.index].x_seq,
                              env.stats[prod.index].x_seq, spec.rope, spec.n_heads // spec.n_kv_heads)
        weights = write_qkvo(work, spec, {**cons, "q": q, "o": o})
        weights = {k: v for k, v in weights.items() if not k.startswith(("k_proj.", "v_proj."))}
        out.append((prod.index, err, weights))
    return sorted(out, key=lambda c: c[1])


@register_target("share", options={"every": 2, "from": -1}, needs_calibration=True)
def share(work: LayerWork, opts: dict, env: ConvertEnv) -> LayerWork:
    """Read an earlier layer's K/V (``from=-1``: the most similar producer, measured)."""
    check_plain_attention(work, "share")
    if opts["from"] < 0 and (opts["every"] < 1 or work.index % opts["every"] == 0):
        return work  # a producer under share:every=K
    if work.spec.kv_quant:
        raise UnsupportedError(f"layers[{work.index}]: share: a consumer holds no cache to quantize")
    options = candidates(work, env)
    if opts["from"] >= 0:
        options = [c for c in options if c[0] == opts["from"]]
        if not options:
            raise ConfigError(f"layers[{work.index}]: share: layer {opts['from']} is not a compatible earlier "
                              "producer (same type, window, KV heads and head size; itself not sharing)")
    if not options:
        raise ConfigError(f"layers[{work.index}]: share: no compatible earlier producer layer")
    producer, _, weights = options[0]
    spec = dataclasses.replace(work.spec, kv_from=producer, kv_quant=None)
    return LayerWork(work.index, spec, weights)
