"""``mla:rank=R,rope=D_R,select=high|norm|layer|uniform``: GQA/MHA -> multi-head latent attention, training-free.

1. Decoupled partial RoPE. ``D_R / 2`` frequency pairs keep RoPE; MHA2MLA's 2-norm criterion scores pair
   ``p`` by ``sum_h |q_h,p| |k_h,p|`` (calibration RMS norms). kvlab's MLA rotates its RoPE key with one
   ``RopeConfig``, whose frequencies are a geometric series, so the kept pairs must form an arithmetic
   progression ``a, a + s, ...`` of the source's pairs (then ``theta' = theta^(s D_R / R)`` and a linear
   scaling factor ``theta^(2a / R)`` reproduce their frequencies exactly). ``high`` (default) keeps the
   first, highest-frequency pairs: the dropped low-frequency pairs barely rotate over a context, so they lose
   little as position-free latent channels, while a dropped high-frequency pair loses its relative position;
   on SmolLM2 it beats the 2-norm choice 2.4-3.4x in perplexity (``docs/convert/mla-select.md``).
   ``norm`` picks the best-scoring progression for the whole model: one ``(a, s)`` for every layer the plan
   converts with the same ``rope`` and ``select``, maximising the sum over those layers of each layer's
   score normalised to sum 1 (scored on the layers' source weights); ``layer`` picks it per layer
   (per-layer RoPE: kvlab serves it, stock engines do not); ``uniform`` takes every ``P / n``-th pair.
   All but ``layer`` give every layer the same RoPE, so the model exports to stock DeepSeek V3
   (``kvlab export``), whose RoPE is one config for all layers. MLA shares one RoPE key among
   all heads: per kept pair it is the query-weighted rank-1 merge of the KV heads' pairs (as ``gqa:fit``),
   each query head re-scaled by its head's complex coefficient.
2. Joint low-rank latent of ``[K_nope ; V]``, activation-aware: the top ``R - 1`` principal components of
   the calibration activations of ``[w_K * K_nope ; L V]`` (``w_K``: query energy per key channel, ``L``:
   the square root of ``O^T O`` per KV head, then K and V balanced to equal energy as TransMLA's BKV)
   give ``W_DKV``; ``kv_b_proj`` maps the latent back (undoing the weights).
3. kvlab's MLA (like DeepSeek's) RMS-normalises the latent. A linear K/V needs a constant norm, so one
   latent channel is a constant ``M`` (a bias), ``10^4`` times the latents' RMS norm: the RMS is then
   ``M / sqrt(R)`` to a relative ``|c|^2 / 2M^2`` (about ``5e-9``), undone by the norm's weights; that
   channel's up-projections are zero. It costs one of the ``R + D_R`` cached values. (Stock DeepSeek V3
   holds the bias exactly: its ``attention_bias`` biases ``kv_a_proj_with_mqa``; ``kvlab export`` adds a
   zero ``o_proj`` bias.)
At full rank with every pair kept (possible when the source has one KV head) the conversion is exact.
"""

from __future__ import annotations

import torch

from kvlab.attention.mla import MLASpec
from kvlab.config import RopeConfig
from kvlab.convert._linalg import (
    as_complex,
    pair_layout,
    put_complex,
    query_energy,
    rank1_merge,
    sym_sqrt,
    top_eigvecs,
)
from kvlab.convert.heads import check_plain_attention, qkvo
from kvlab.convert.registry import ConvertEnv, LayerWork, register_target
from kvlab.errors import ConfigError, UnsupportedError

CONST_RATIO = 1e4


SELECT = ("norm", "layer", "high", "uniform")


def choose_pairs(score: torch.Tensor, n: int, select: str) -> tuple[int, int]:
    """``(a, s)``: the kept pairs are ``a + s * j``, ``j < n``, of ``len(score)`` pairs (``norm`` and
    ``layer``: the progression of highest summed ``score``)."""
    pairs = len(score)
    if select == "high":
        return 0, 1
    if select == "uniform":
        return 0, max(pairs // n, 1) if n > 1 else 1
    best, choice = -1.0, (0, 1)
    for s in range(1, pairs + 1):
        for a in range(pairs - (n - 1) * s):
            total = float(score[a + s * torch.arange(n)].sum())
            if total > best:
                best, choice = total, (a, s)
        if n == 1:
            break
    return choice


def pair_energies(work: LayerWork, env: ConvertEnv) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per RoPE pair of ``work``'s layer: query energy ``[H, P]``, the keys as complex rows
    ``[Hkv, P, n]``, and MHA2MLA's 2-norm score ``sum_h |q_h,p| |k_h,p|`` ``[P]``."""
    spec = work.spec.resolved(env.config)
    group = spec.n_heads // spec.n_kv_heads
    re, im, rest = pair_layout(spec.rope, spec.head_dim)
    mats, xx = qkvo(work, spec), env.stats[work.index].xx
    q_pair, _ = query_energy(mats["q"], xx, re, im, rest)  # [H, P]
    kc = as_complex(mats["k"], re, im)  # [Hkv, P, n]
    k_pair = torch.einsum("gpn,nk,gpk->gp", kc, xx.to(kc.dtype), kc.conj()).real
    score = (q_pair.clamp_min(0).sqrt() * k_pair.clamp_min(0).sqrt().repeat_interleave(group, 0)).sum(0)
    return q_pair, kc, score


def model_progression(work: LayerWork, opts: dict, env: ConvertEnv, score: torch.Tensor) -> tuple[int, int]:
    """``select=norm``'s one ``(a, s)`` for every layer of the plan converted to MLA with the same ``rope``
    and ``select`` (this layer alone when ``env`` has no plan), computed once."""
    key = ("mla", opts["rope"], opts["select"])
    if key not in env.shared:
        same = [j for j, steps in enumerate(env.plan) if any(
            name == "mla" and (o["rope"], o["select"]) == key[1:] for name, o in steps)]
        scores = [score if j == work.index else pair_energies(env.source_layer(j), env)[2] for j in same or [work.index]]
        if len({len(x) for x in scores}) > 1:
            raise ConfigError("mla: select=norm needs the same number of RoPE pairs on every converted layer; "
                              "use select=layer")
        total = sum(x / x.sum().clamp_min(1e-30) for x in scores)
        env.shared[key] = choose_pairs(total, opts["rope"] // 2, "norm")
    return env.shared[key]


def mla_rope(rope: RopeConfig, rot_dim: int, d_rope: int, a: int, s: int) -> RopeConfig:
    """A RoPE config on ``d_rope`` dims whose frequencies are the source's pairs ``a + s j``."""
    if rope.scaling:
        raise UnsupportedError("mla: sources with RoPE scaling are not supported (frequencies must be a "
                               "geometric series)")
    scaling = {"type": "linear", "factor": rope.theta ** (2 * a / rot_dim)} if a else None
    return RopeConfig(theta=rope.theta ** (s * d_rope / rot_dim), partial=1.0, interleaved=rope.interleaved,
                      scaling=scaling, max_position=rope.max_position)


def _mla_pairs(d_rope: int, interleaved: bool) -> tuple[torch.Tensor, torch.Tensor]:
    n = d_rope // 2
    if interleaved:
        return torch.arange(0, d_rope, 2), torch.arange(1, d_rope, 2)
    return torch.arange(n), torch.arange(n, d_rope)


@register_target("mla", options={"rank": 0, "rope": 16, "select": "high", "balance": 0.0},
                 needs_calibration=True)
def to_mla(work: LayerWork, opts: dict, env: ConvertEnv) -> LayerWork:
    """Latent KV of ``rank`` values (0: a quarter of the layer's K/V width) + a ``rope``-dim RoPE key."""
    check_plain_attention(work, "mla")
    spec = work.spec.resolved(env.config)
    h, hkv, dim = spec.n_heads, spec.n_kv_heads, spec.head_dim
    group, d_rope = h // hkv, opts["rope"]
    re, im, rest = pair_layout(spec.rope, dim)
    n_pairs = d_rope // 2
    if d_rope < 2 or d_rope % 2 or n_pairs > len(re) or d_rope >= dim:
        raise ConfigError(f"layers[{work.index}]: mla: rope must be even, in [2, {min(2 * len(re), dim - 2)}], "
                          f"got {d_rope}")
    rank = opts["rank"] or max(2, (2 * hkv * dim) // 4 - d_rope)
    if rank < 2:
        raise ConfigError(f"layers[{work.index}]: mla: rank must be >= 2 (one channel carries the norm), got {rank}")
    if opts["select"] not in SELECT:
        raise ConfigError(f"layers[{work.index}]: mla: select must be one of {', '.join(SELECT)}")
    mats, xx = qkvo(work, spec), env.stats[work.index].xx
    if spec.qkv_bias and float(mats["q"][..., -1].abs().max()) > 0:
        raise UnsupportedError(f"layers[{work.index}]: mla: query biases are not supported (MLA's q_proj has none)")
    q, k, v = mats["q"], mats["k"], mats["v"]
    # 1. which pairs keep RoPE, and the shared RoPE key
    q_pair, kc, score = pair_energies(work, env)  # [H, P], [Hkv, P, n], [P]
    if opts["select"] == "norm":
        a, s = model_progression(work, opts, env, score)
    else:
        a, s = choose_pairs(score, n_pairs, opts["select"])
    kept = a + s * torch.arange(n_pairs)
    pair_w = q_pair.view(hkv, group, -1).sum(1)[:, kept].T  # [n, Hkv]
    z, coef = rank1_merge(kc[:, kept].transpose(0, 1), pair_w, xx)  # [n, n_aug], [n, Hkv]
    m_re, m_im = _mla_pairs(d_rope, spec.rope.interleaved)
    n_aug = q.shape[-1]
    k_rope = torch.zeros(d_rope, n_aug, dtype=torch.float64)
    put_complex(k_rope, z, m_re, m_im)
    q_rope = torch.zeros(h, d_rope, n_aug, dtype=torch.float64)
    put_complex(q_rope, as_complex(q, re, im)[:, kept] * coef.T.conj().repeat_interleave(group, 0)[:, :, None],
                m_re, m_im)
    # 2. joint latent of [K_nope ; V]
    rotated = set(re[kept].tolist()) | set(im[kept].tolist())
    nope = torch.tensor([c for c in range(dim) if c not in rotated])
    d_nope = len(nope)
    q_nope, k_nope = q[:, nope], k[:, nope]  # [H, dn, n], [Hkv, dn, n]
    energy = torch.einsum("hcn,nk,hck->hc", q_nope, xx, q_nope).view(hkv, group, -1).sum(1)  # [Hkv, dn]
    wk = energy.clamp_min(1e-12 * float(energy.max().clamp_min(1e-30))).sqrt()
    o_blocks = mats["o"].view(-1, h, dim).transpose(0, 1)  # [H, d, D]
    gram = torch.einsum("hdi,hdj->hij", o_blocks, o_blocks).view(hkv, group, dim, dim).sum(1)
    root, inv_root = sym_sqrt(gram), sym_sqrt(gram, inverse=True)
    zk = (wk[:, :, None] * k_nope).reshape(-1, n_aug)  # [Hkv*dn, n]
    zv = torch.einsum("gij,gjn->gin", root, v).reshape(-1, n_aug)  # [Hkv*D, n]
    balance = opts["balance"] or float(torch.trace(zv @ xx @ zv.T) / torch.trace(zk @ xx @ zk.T).clamp_min(1e-30)) ** 0.5
    zmat = torch.cat([balance * zk, zv])
    r_eff = rank - 1
    u = top_eigvecs(zmat @ xx @ zmat.T, min(r_eff, zmat.shape[0]))  # [Nz, r]
    if u.shape[1] < r_eff:
        u = torch.cat([u, u.new_zeros(u.shape[0], r_eff - u.shape[1])], dim=1)
    w_dkv = u.T @ zmat  # [r, n]
    uk = u[: hkv * d_nope].view(hkv, d_nope, r_eff) / (balance * wk[:, :, None])
    uv = torch.einsum("gij,gjr->gir", inv_root, u[hkv * d_nope:].view(hkv, dim, r_eff))
    # 3. the constant channel that makes the latent norm linear
    latent_sq = float(torch.trace(w_dkv @ xx @ w_dkv.T))
    big = CONST_RATIO * max(latent_sq, 1e-12) ** 0.5
    down = torch.cat([w_dkv, torch.zeros(1, n_aug, dtype=torch.float64), k_rope])  # [rank + dR, n]
    down[r_eff, -1] = big
    norm_w = torch.full((rank,), big / rank ** 0.5, dtype=torch.float64)
    norm_w[r_eff] = 0.0
    up = torch.cat([uk, uv], dim=1).repeat_interleave(group, 0)  # [H, dn + D, r]
    up = torch.cat([up, up.new_zeros(h, d_nope + dim, 1)], dim=2)  # [H, dn + D, rank]
    dtype = work.weights["q_proj.weight"].dtype
    weights = {
        "q_proj.weight": torch.cat([q_nope, q_rope], dim=1)[..., :-1].reshape(-1, n_aug - 1).to(dtype),
        "kv_a_proj_with_mqa.weight": down[:, :-1].to(dtype).contiguous(),
        "kv_a_proj_with_mqa.bias": down[:, -1].to(dtype).contiguous(),
        "kv_a_layernorm.weight": norm_w.to(dtype),
        "kv_b_proj.weight": up.reshape(-1, rank).to(dtype),
        "o_proj.weight": work.weights["o_proj.weight"],
    }
    if spec.o_bias:
        weights["o_proj.bias"] = work.weights["o_proj.bias"]
    new = MLASpec(n_heads=h, kv_lora_rank=rank, qk_rope_head_dim=d_rope, qk_nope_head_dim=d_nope, v_head_dim=dim,
                  qkv_bias=True, o_bias=spec.o_bias, softmax_scale=work.spec.softmax_scale,
                  rope=mla_rope(spec.rope, 2 * len(re), d_rope, a, s), mlp_hidden=work.spec.mlp_hidden,
                  kv_quant=work.spec.kv_quant, kv_quant_group=work.spec.kv_quant_group,
                  kv_quant_residual=work.spec.kv_quant_residual)
    return LayerWork(work.index, new, weights)
