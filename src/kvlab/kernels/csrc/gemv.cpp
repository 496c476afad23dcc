// The decode linear on a column-major weight (kvlab.linear_layout): y = x @ weight.T + bias for the rows x
// of a decode step. linear_layout stores weight [N, K] with K outermost, so wt = weight.T is [K, N] with
// contiguous rows.
// - Up to 4 rows (batch-1 decode), memory-bound: each thread takes a contiguous range of wt's rows (one
//   sequential stream through memory) and accumulates x[m, k] * wt[k, :] into its own partial y, 4 rows of
//   wt per pass, the rows two passes on prefetched into L2; the partials are summed at the end. On a 2-core
//   EPYC MKL's and oneDNN's GEMVs read 10-17 GB/s at SmolLM2's shapes, this 24-29 (of ~27 torch.sum reads).
// - More rows (batched decode), compute-bound: register tiles of 8 rows x 48 outputs (24 accumulators),
//   each thread a range of column tiles, walked in blocks of 64 of wt's rows. At 16 rows on that EPYC:
//   130-190 GFLOP/s at SmolLM2's layer shapes, where oneDNN's packed linear reached 60-130.
// (benchmarks/fused_linears.py.) F.linear is the reference.
//
//   linear(x, wt, bias):  y[m, n] = sum_k x[m, k] * wt[k, n] + bias[n]
//
// x [M, K] f32 (rows contiguous); wt [K, N] f32 or bf16 (rows strided, columns contiguous); bias [N] f32
// or empty. Returns [M, N] f32.

#include <algorithm>
#include <vector>

#include "simd.h"

namespace {

using kvlab::to_float;
#ifdef __AVX512F__
using kvlab::load16;
#endif

constexpr int64_t GEMV_ROWS = 4;  // up to this many rows of x, the memory-bound GEMV; more: tiled_impl
constexpr int64_t MIN_ROWS_PER_PART = 32;  // rows of wt per thread: fewer are not worth a thread

// y[m, :] += sum_{i < R} x[m, k + i] * wt[k + i, :] for R = 4 rows of wt at a time (then one at a time)
template <typename T>
void accumulate(const float* x, int64_t x_m, int64_t m_rows, const T* wt, int64_t w_k, int64_t n_cols,
                int64_t k0, int64_t k1, float* y) {
  int64_t k = k0;
  for (; k + 4 <= k1; k += 4) {
    const T *w0 = wt + k * w_k, *w1 = w0 + w_k, *w2 = w1 + w_k, *w3 = w2 + w_k;
    int64_t n = 0;
#ifdef __AVX512F__
    for (; n + 16 <= n_cols; n += 16) {
      for (int i = 0; i < 4; ++i)  // the same columns two passes on, into L2: 19-26 -> 24-29 GB/s on that EPYC
        _mm_prefetch(reinterpret_cast<const char*>(w0 + (8 + i) * w_k + n), _MM_HINT_T1);
      const __m512 a = load16(w0 + n), b = load16(w1 + n), c = load16(w2 + n), d = load16(w3 + n);
      for (int64_t m = 0; m < m_rows; ++m) {
        const float* xm = x + m * x_m + k;
        float* ym = y + m * n_cols + n;
        __m512 acc = _mm512_fmadd_ps(_mm512_set1_ps(xm[0]), a, _mm512_loadu_ps(ym));
        acc = _mm512_fmadd_ps(_mm512_set1_ps(xm[1]), b, acc);
        acc = _mm512_fmadd_ps(_mm512_set1_ps(xm[2]), c, acc);
        _mm512_storeu_ps(ym, _mm512_fmadd_ps(_mm512_set1_ps(xm[3]), d, acc));
      }
    }
#endif
    for (int64_t m = 0; m < m_rows; ++m) {  // the columns left (all of them without AVX-512)
      const float* xm = x + m * x_m + k;
      const float x0 = xm[0], x1 = xm[1], x2 = xm[2], x3 = xm[3];
      float* __restrict__ ym = y + m * n_cols;
#pragma omp simd
      for (int64_t j = n; j < n_cols; ++j)
        ym[j] += x0 * to_float(w0[j]) + x1 * to_float(w1[j]) + x2 * to_float(w2[j]) + x3 * to_float(w3[j]);
    }
  }
  for (; k < k1; ++k) {
    const T* w = wt + k * w_k;
    for (int64_t m = 0; m < m_rows; ++m) {
      const float xk = x[m * x_m + k];
      float* __restrict__ ym = y + m * n_cols;
#pragma omp simd
      for (int64_t j = 0; j < n_cols; ++j) ym[j] += xk * to_float(w[j]);
    }
  }
}

#ifdef __AVX512F__
constexpr int64_t TILE = 48;     // output columns per register tile: 3 vectors
constexpr int64_t ROW_TILE = 8;  // rows of x per tile: 8 x 3 accumulators + 3 weight vectors fit 32 registers
constexpr int64_t K_BLOCK = 64;  // rows of wt per block: 64 x 48 floats, 12 KiB

// y[0:MR, n:n+48] (+)= x[0:MR, k0:k1] @ wt[k0:k1, n:n+48], the tile's sums in registers, from 0, then added
// to the bias (k0 = 0) or to y (the earlier blocks): two-level sums, whose rounding grows with 64 + K/64
// terms, not K (one running sum over K = 1,536 moved SmolLM2's logits by up to 1e-3 against MKL); mask[j]: the valid columns of vector j (a row's last tile may be partial);
// ahead: where the same row of a later tile is, from this one's (prefetched meanwhile; 0: none).
template <typename T, int MR>
void tile(const float* x, int64_t x_m, const T* wt, int64_t w_k, int64_t k0, int64_t k1, int64_t n,
          const __mmask16* mask, const float* bias, float* y, int64_t y_m, int64_t ahead) {
  __m512 acc0[MR], acc1[MR], acc2[MR];
#pragma GCC unroll 8
  for (int m = 0; m < MR; ++m) acc0[m] = acc1[m] = acc2[m] = _mm512_setzero_ps();
  for (int64_t k = k0; k < k1; ++k) {
    const T* w = wt + k * w_k + n;
    for (int64_t byte = 0; byte < TILE * static_cast<int64_t>(sizeof(T)); byte += 64)
      _mm_prefetch(reinterpret_cast<const char*>(w + ahead) + byte, _MM_HINT_T1);
    const __m512 b0 = load16(w, mask[0]), b1 = load16(w + 16, mask[1]), b2 = load16(w + 32, mask[2]);
#pragma GCC unroll 8  // unrolled, the arrays live in registers (otherwise gcc stores all 24 every step)
    for (int m = 0; m < MR; ++m) {
      const __m512 a = _mm512_set1_ps(x[m * x_m + k]);
      acc0[m] = _mm512_fmadd_ps(a, b0, acc0[m]);
      acc1[m] = _mm512_fmadd_ps(a, b1, acc1[m]);
      acc2[m] = _mm512_fmadd_ps(a, b2, acc2[m]);
    }
  }
#pragma GCC unroll 8
  for (int m = 0; m < MR; ++m) {  // the block's sums added to the earlier blocks' (or the bias)
    float* ym = y + m * y_m + n;
    const float* from = k0 ? ym : bias ? bias + n : nullptr;
    if (from) {
      acc0[m] = _mm512_add_ps(acc0[m], _mm512_maskz_loadu_ps(mask[0], from));
      acc1[m] = _mm512_add_ps(acc1[m], _mm512_maskz_loadu_ps(mask[1], from + 16));
      acc2[m] = _mm512_add_ps(acc2[m], _mm512_maskz_loadu_ps(mask[2], from + 32));
    }
    _mm512_mask_storeu_ps(ym, mask[0], acc0[m]);
    _mm512_mask_storeu_ps(ym + 16, mask[1], acc1[m]);
    _mm512_mask_storeu_ps(ym + 32, mask[2], acc2[m]);
  }
}

// More rows than a GEMV (batched decode): compute-bound, so register tiles of 8 rows x 48 columns, each
// thread a range of column tiles (no partial sums). y [M, N] = x [M, K] @ wt [K, N] + bias.
template <typename T>
torch::Tensor tiled_impl(const torch::Tensor& x, const torch::Tensor& wt, const torch::Tensor& bias) {
  const int64_t m_rows = x.size(0), k_rows = x.size(1), n_cols = wt.size(1);
  auto out = torch::empty({m_rows, n_cols}, x.options());
  const float* xp = x.data_ptr<float>();
  const T* wp = static_cast<const T*>(wt.data_ptr());
  const float* bp = bias.numel() ? bias.data_ptr<float>() : nullptr;
  float* op = out.data_ptr<float>();
  const int64_t x_m = x.stride(0), w_k = wt.stride(0);
  const int64_t n_tiles = (n_cols + TILE - 1) / TILE;
  // Each thread: a range of column tiles, walked block of wt's rows by block, so that its reads of a block
  // are one contiguous run per row (a tile's own lines are rows apart: an LM head's rows are pages apart,
  // which the hardware prefetcher does not follow). The next tile's lines are prefetched a tile ahead.
  at::parallel_for(0, n_tiles, 1, [&](int64_t begin, int64_t end) {
    for (int64_t k0 = 0; k0 < k_rows; k0 += K_BLOCK) {
      const int64_t k1 = std::min(k_rows, k0 + K_BLOCK);
      for (int64_t t = begin; t < end; ++t) {
        const int64_t n = t * TILE;
        __mmask16 mask[3];
        for (int j = 0; j < 3; ++j) {
          const int64_t left = n_cols - n - 16 * j;
          mask[j] = left >= 16 ? __mmask16(0xFFFF) : left <= 0 ? __mmask16(0) : __mmask16((1u << left) - 1);
        }
        for (int64_t m0 = 0; m0 < m_rows; m0 += ROW_TILE) {  // the block's tile stays in L1 across row tiles
          const float* xm = xp + m0 * x_m;
          float* ym = op + m0 * n_cols;
          // every row tile prefetches into L2 the same rows of the tile d ahead in this thread's order (past
          // `end`: the next block of rows), so the weight streams in while the FMAs run. On a 2-core EPYC
          // with the weights in memory: 145-170 GFLOP/s (18-21 GB/s); prefetching into L1, one tile ahead
          // and in the first row tile only: 75-110.
          const int64_t d = 2 + m0 / ROW_TILE, wrap = t + d >= end, next = wrap ? begin + t + d - end : t + d;
          const int64_t ahead = wrap && (k1 >= k_rows || next >= end) ? 0 : wrap * K_BLOCK * w_k + (next - t) * TILE;
          switch (std::min(ROW_TILE, m_rows - m0)) {
#define KVLAB_TILE(R) case R: tile<T, R>(xm, x_m, wp, w_k, k0, k1, n, mask, bp, ym, n_cols, ahead); break;
            KVLAB_TILE(1) KVLAB_TILE(2) KVLAB_TILE(3) KVLAB_TILE(4)
            KVLAB_TILE(5) KVLAB_TILE(6) KVLAB_TILE(7) KVLAB_TILE(8)
#undef KVLAB_TILE
          }
        }
      }
    }
  });
  return out;
}
#endif

template <typename T>
torch::Tensor linear_impl(const torch::Tensor& x, const torch::Tensor& wt, const torch::Tensor& bias) {
#ifdef __AVX512F__
  if (x.size(0) > GEMV_ROWS) return tiled_impl<T>(x, wt, bias);
#endif
  const int64_t m_rows = x.size(0), k_rows = x.size(1), n_cols = wt.size(1);
  const int64_t parts = std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), k_rows / MIN_ROWS_PER_PART));
  auto partial = torch::empty({parts, m_rows, n_cols}, x.options());
  const float* xp = x.data_ptr<float>();
  const T* wp = static_cast<const T*>(wt.data_ptr());
  float* pp = partial.data_ptr<float>();
  const int64_t x_m = x.stride(0), w_k = wt.stride(0);
  at::parallel_for(0, parts, 1, [&](int64_t begin, int64_t end) {
    for (int64_t part = begin; part < end; ++part) {
      float* y = pp + part * m_rows * n_cols;
      std::fill(y, y + m_rows * n_cols, 0.f);
      const int64_t k0 = k_rows * part / parts, k1 = k_rows * (part + 1) / parts;
      accumulate<T>(xp, x_m, m_rows, wp, w_k, n_cols, k0, k1, y);
    }
  });
  auto out = torch::empty({m_rows, n_cols}, x.options());
  float* op = out.data_ptr<float>();
  const float* bp = bias.numel() ? bias.data_ptr<float>() : nullptr;
  at::parallel_for(0, m_rows * n_cols, 4096, [&](int64_t begin, int64_t end) {  // sum the partials (+ bias)
#pragma omp simd
    for (int64_t i = begin; i < end; ++i) {
      float s = bp ? bp[i % n_cols] : 0.f;
      for (int64_t part = 0; part < parts; ++part) s += pp[part * m_rows * n_cols + i];
      op[i] = s;
    }
  });
  return out;
}

}  // namespace

torch::Tensor linear(const torch::Tensor& x, const torch::Tensor& wt, const torch::Tensor& bias) {
  TORCH_CHECK(x.device().is_cpu() && wt.device().is_cpu(), "linear: CPU tensors");
  TORCH_CHECK(x.scalar_type() == torch::kFloat && x.dim() == 2 && (x.stride(1) == 1 || x.size(1) == 1), "linear: x");
  TORCH_CHECK(wt.dim() == 2 && (wt.stride(1) == 1 || wt.size(1) == 1) && wt.size(0) == x.size(1),
              "linear: wt [K, N], columns contiguous");
  if (bias.numel())
    TORCH_CHECK(bias.scalar_type() == torch::kFloat && bias.dim() == 1 && bias.size(0) == wt.size(1) &&
                bias.stride(0) == 1, "linear: bias");
  if (wt.scalar_type() == torch::kFloat) return linear_impl<float>(x, wt, bias);
  TORCH_CHECK(wt.scalar_type() == torch::kBFloat16, "linear: wt must be float32 or bfloat16");
  return linear_impl<c10::BFloat16>(x, wt, bias);
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("linear", &linear, "x @ wt + bias for a few rows x, wt = a column-major weight's transpose");
}
