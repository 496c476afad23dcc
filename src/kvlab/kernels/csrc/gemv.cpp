// The one-token linear on a column-major weight (kvlab.linear_layout): y = x @ weight.T + bias for a few
// rows x, reading the weight once, front to back. linear_layout stores weight [N, K] with K outermost, so
// wt = weight.T is [K, N] with contiguous rows; each thread takes a contiguous range of those rows (one
// sequential stream through memory) and accumulates x[m, k] * wt[k, :] into its own partial y, 4 rows of wt
// per pass; the partials are summed at the end. Batch-1 decode is a chain of these GEMVs, memory-bound:
// on a 2-core EPYC MKL's and oneDNN's read 10-17 GB/s at SmolLM2's shapes, this 18-26
// (benchmarks/fused_linears.py). F.linear is the reference.
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

template <typename T>
torch::Tensor linear_impl(const torch::Tensor& x, const torch::Tensor& wt, const torch::Tensor& bias) {
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
