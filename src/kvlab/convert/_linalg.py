"""Linear algebra shared by the targets: RoPE pairs as complex numbers, weighted rank-1 merges that
commute with RoPE, and symmetric square roots.

RoPE rotates each frequency pair ``(re, im)`` of a head by the same angle, i.e. multiplies the complex
number ``re + i im`` by ``e^{i theta t}``. A map on keys commutes with RoPE iff it acts on each pair as a
complex scalar (a 2x2 rotation-and-scale) or mixes the same pair across heads with complex weights.
Score of a pair: ``q . k = Re(q conj(k))``; replacing ``k ~ a z`` is exact for the query ``q conj(a)``.
"""

from __future__ import annotations

import torch

from kvlab.rope import Rotary


def eigh(m: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``torch.linalg.eigh`` on one thread. The matrices here are small (at most a few hundred rows), and
    MKL's multi-threaded eigh on them spends its time in thread barriers when the cores are shared: two
    orders of magnitude slower than one thread on a loaded 2-core machine (``kvlab compare --base``'s MQA
    conversion took minutes instead of seconds)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return torch.linalg.eigh(m)
    finally:
        torch.set_num_threads(threads)


def pair_layout(rope, head_dim: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Channel indices of one head: real and imaginary parts of each rotated pair ``[P]``, ``[P]`` and the
    channels RoPE leaves alone ``[D - 2P]`` (partial RoPE)."""
    rotary = Rotary(rope, head_dim)
    pairs = rotary.rot_dim // 2
    if rotary.interleaved:
        re, im = torch.arange(0, 2 * pairs, 2), torch.arange(1, 2 * pairs, 2)
    else:
        re, im = torch.arange(pairs), torch.arange(pairs, 2 * pairs)
    return re, im, torch.arange(2 * pairs, head_dim)


def as_complex(w: torch.Tensor, re: torch.Tensor, im: torch.Tensor) -> torch.Tensor:
    """Rows ``w [..., D, n]`` of one head -> complex pair rows ``[..., P, n]``."""
    return torch.complex(w[..., re, :].double(), w[..., im, :].double())


def put_complex(w: torch.Tensor, z: torch.Tensor, re: torch.Tensor, im: torch.Tensor) -> None:
    """Write complex pair rows ``z [..., P, n]`` back into ``w [..., D, n]`` in place."""
    w[..., re, :] = z.real.to(w.dtype)
    w[..., im, :] = z.imag.to(w.dtype)


def quad(a: torch.Tensor, xx: torch.Tensor) -> torch.Tensor:
    """``a xx a^H`` for rows ``a [..., m, n]`` and a real second moment ``xx [n, n]``: ``[..., m, m]``."""
    sigma = xx.to(a.dtype)
    return a @ sigma @ a.conj().transpose(-1, -2)


def rank1_merge(rows: torch.Tensor, weights: torch.Tensor, xx: torch.Tensor):
    """Merge ``m`` heads' rows ``[P, m, n]`` (complex for RoPE pairs, real for free channels) into one row per
    pair: minimises ``sum_g w_g E|k_g - a_g z|^2`` over ``z = sum_g c_g k_g`` and ``a``, the top eigenvector
    of the ``w``-weighted covariance. Returns the merged rows ``[P, n]`` and ``a [P, m]`` (``k_g ~ a_g z``)."""
    root = weights.clamp_min(1e-12 * float(weights.max().clamp_min(1e-30))).sqrt().to(rows.dtype)  # [P, m]
    cov = root[:, :, None] * quad(rows, xx) * root.conj()[:, None, :]  # [P, m, m]
    _, vecs = eigh(cov)
    u = vecs[..., -1]  # [P, m] top eigenvector
    merged = torch.einsum("pm,pmn->pn", u.conj() * root, rows)
    return merged, u / root


def sym_sqrt(m: torch.Tensor, inverse: bool = False) -> torch.Tensor:
    """Symmetric (pseudo-inverse) square root of a PSD matrix ``[..., n, n]`` (float64)."""
    vals, vecs = eigh(m.double())
    keep = vals > vals.amax(-1, keepdim=True).clamp_min(1e-300) * 1e-12
    root = vals.clamp_min(0).sqrt()
    root = torch.where(keep, 1.0 / root.where(keep, torch.ones_like(root)), torch.zeros_like(root)) \
        if inverse else root
    return (vecs * root[..., None, :]) @ vecs.transpose(-1, -2)


def query_energy(wq: torch.Tensor, xx: torch.Tensor, re: torch.Tensor, im: torch.Tensor,
                 rest: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """E|q_p|^2 per pair ``[H, P]`` and E q_c^2 per free channel ``[H, R]`` of query rows ``wq [H, D, n]``."""
    qc = as_complex(wq, re, im)  # [H, P, n]
    pair = torch.einsum("hpn,nk,hpk->hp", qc, xx.to(qc.dtype), qc.conj()).real
    free = torch.einsum("hrn,nk,hrk->hr", wq[:, rest].double(), xx, wq[:, rest].double())
    return pair, free


def top_eigvecs(cov: torch.Tensor, k: int) -> torch.Tensor:
    """The ``k`` leading eigenvectors of a symmetric ``cov [n, n]``, as columns ``[n, k]`` (descending)."""
    _, vecs = eigh(cov.double())
    return vecs[:, -k:].flip(-1)
