// Decode attention over a float32 or bfloat16 K/V cache in one pass (flash-decoding): for each row and
// block of tokens, the scores, their softmax and the weighted sum of the values, with the blocks' partial
// results merged at the end. Each key and value is read once, from the cache's own (strided) buffers, and
// the work is split over rows x token blocks so both threads work at batch 1. kvlab.kernels builds it;
// grouped_sdpa (kvlab.attention._common) calls it for one query per row, SDPA being the reference.
//
//   attend(q, k, v, mask, scale):  out[r, m] = sum_t softmax_t(scale * q[r, m] . k[r, t] | mask) v[r, t]
//
// Rows r = batch x KV heads, m = the query rows of a GQA group, t = tokens, D / Dv = head dims.
// q [R, M, D] f32; k [R, T, D], v [R, T, Dv] f32 or bf16, rows and tokens strided, channels contiguous;
// mask [Bm, T] bool (True = attend) with Bm = 1 or the batch (row r is sequence r / (R / Bm)), or empty.
// Scores, softmax and sums in float32. The vector loops are templates over the head dims' 16-channel
// vectors (and the value blocks' rows): unrolled, their sums stay in registers for any GQA group (blocks of
// 4 query rows x 64 channels) and head dims up to 256, e.g. MLA's absorbed decode (9 query heads over a
// 160-wide latent, 128-wide values).

#include <algorithm>
#include <limits>
#include <vector>

#include "simd.h"

namespace {

using kvlab::exp_nonpositive;
using kvlab::to_float;
#ifdef __AVX512F__
using kvlab::load16;
using kvlab::sum16;
#endif

// Tokens per work item: at most BLOCK, at least MIN_BLOCK, else as many as give each thread ~8 items, so
// both threads are busy (and evenly) at batch 1 and short contexts too (3 rows of one 1,024-token block at
// 512 tokens left one thread with two of them).
constexpr int64_t BLOCK = 1024, MIN_BLOCK = 128;
#ifndef KVLAB_AHEAD
#define KVLAB_AHEAD 32
#endif
constexpr int64_t AHEAD = KVLAB_AHEAD;  // tokens: keys and values are prefetched this far ahead of their loops

struct Strided {  // a [R, T, W] tensor as a pointer and hoisted strides (Tensor::stride() is a call)
  const void* data;
  int64_t r, t;
  template <typename T>
  const T* at(int64_t row, int64_t token) const { return static_cast<const T*>(data) + row * r + token * t; }
};

#ifdef __AVX512F__
// block_scores' 16-token tiles for a head dim of KD vectors (a template argument, so the loops unroll and
// the 16 sums stay in registers; q in registers too up to 8 vectors, read from L1 past that)
template <typename T, int KD>
void score_tiles(const float* q, int64_t q_m, int64_t m_rows, const Strided& k, int64_t row, int64_t t0,
                 int64_t t1, float scale, float* scores, int64_t width, int64_t t_begin) {  // t1 - t0: 16s
  for (int64_t t = t0; t < t1; t += 16) {
    if (t + AHEAD + 16 <= t1)
      for (int j = 0; j < 16; ++j) kvlab::prefetch(k.at<T>(row, t + AHEAD + j), KD * 16 * sizeof(T));
    for (int64_t m = 0; m < m_rows; ++m) {
      const float* qm = q + m * q_m;
      __m512 qv[KD <= 8 ? KD : 1], acc[16];
      if constexpr (KD <= 8) {
#pragma GCC unroll 8
        for (int c = 0; c < KD; ++c) qv[c] = _mm512_loadu_ps(qm + 16 * c);
      }
      auto query = [&](int c) {  // q's vector c: from registers, or from L1 past 8 vectors
        if constexpr (KD <= 8) return qv[c];
        else return _mm512_loadu_ps(qm + 16 * c);
      };
#pragma GCC unroll 16
      for (int j = 0; j < 16; ++j) {
        const T* kt = k.at<T>(row, t + j);
        acc[j] = _mm512_mul_ps(load16(kt), query(0));
#pragma GCC unroll 16
        for (int c = 1; c < KD; ++c) acc[j] = _mm512_fmadd_ps(load16(kt + 16 * c), query(c), acc[j]);
      }
      _mm512_storeu_ps(scores + m * width + (t - t_begin), _mm512_mul_ps(sum16(acc), _mm512_set1_ps(scale)));
    }
  }
}
#endif

// scores[m, t - t0] = scale * q[m] . k[t] (or -inf where masked) for t in [t0, t1)
template <typename T>
void block_scores(const float* q, int64_t q_m, int64_t m_rows, int64_t dim, const Strided& k, int64_t row,
                  int64_t t0, int64_t t1, const bool* mask, int64_t mask_t, float scale, float* scores) {
  const int64_t width = t1 - t0;
  int64_t t = t0;
#ifdef __AVX512F__
  if (dim % 16 == 0 && dim <= 256) {  // 16 tokens at a time, one query row at a time
    const int64_t tiles_end = t0 + (width / 16) * 16;
    switch (dim / 16) {
#define KVLAB_SCORES(KD) \
  case KD: score_tiles<T, KD>(q, q_m, m_rows, k, row, t0, tiles_end, scale, scores, width, t0); break;
      KVLAB_SCORES(1) KVLAB_SCORES(2) KVLAB_SCORES(3) KVLAB_SCORES(4) KVLAB_SCORES(5) KVLAB_SCORES(6)
      KVLAB_SCORES(7) KVLAB_SCORES(8) KVLAB_SCORES(9) KVLAB_SCORES(10) KVLAB_SCORES(11) KVLAB_SCORES(12)
      KVLAB_SCORES(13) KVLAB_SCORES(14) KVLAB_SCORES(15) KVLAB_SCORES(16)
#undef KVLAB_SCORES
    }
    t = tiles_end;
  }
#endif
  for (; t < t1; ++t) {
    const T* kt = k.at<T>(row, t);
    for (int64_t m = 0; m < m_rows; ++m) {
      const float* qm = q + m * q_m;
      float acc = 0.f;
#pragma omp simd reduction(+ : acc)
      for (int64_t d = 0; d < dim; ++d) acc += qm[d] * to_float(kt[d]);
      scores[m * width + (t - t0)] = scale * acc;
    }
  }
  if (mask) {
    for (int64_t t = t0; t < t1; ++t)
      if (!mask[t * mask_t])
        for (int64_t m = 0; m < m_rows; ++m) scores[m * width + (t - t0)] = -std::numeric_limits<float>::infinity();
  }
}

#ifdef __AVX512F__
// acc[m, d0 : d0 + 16 KD] += sum_t p[m, t - t0] v[t, d0 : ...] for MR rows: the MR x KD sums in registers
// (template arguments, so the loops unroll; with runtime bounds gcc kept them in memory)
template <typename T, int KD, int MR>
void value_tile(const float* p, int64_t width, int64_t dv, int64_t d0, const Strided& v, int64_t row,
                int64_t t0, int64_t t1, float* acc) {
  __m512 a[MR][KD];
#pragma GCC unroll 4
  for (int m = 0; m < MR; ++m)
#pragma GCC unroll 4
    for (int c = 0; c < KD; ++c) a[m][c] = _mm512_loadu_ps(acc + m * dv + d0 + 16 * c);
  for (int64_t t = t0; t < t1; ++t) {
    const T* vt = v.at<T>(row, t) + d0;
    if (t + AHEAD < t1) kvlab::prefetch(v.at<T>(row, t + AHEAD) + d0, KD * 16 * sizeof(T));
    __m512 x[KD];
#pragma GCC unroll 4
    for (int c = 0; c < KD; ++c) x[c] = load16(vt + 16 * c);
#pragma GCC unroll 4
    for (int m = 0; m < MR; ++m) {
      const __m512 w = _mm512_set1_ps(p[m * width + (t - t0)]);
#pragma GCC unroll 4
      for (int c = 0; c < KD; ++c) a[m][c] = _mm512_fmadd_ps(w, x[c], a[m][c]);
    }
  }
#pragma GCC unroll 4
  for (int m = 0; m < MR; ++m)
#pragma GCC unroll 4
    for (int c = 0; c < KD; ++c) _mm512_storeu_ps(acc + m * dv + d0 + 16 * c, a[m][c]);
}
#endif

// acc[m] += sum_t p[m, t - t0] * v[t] for t in [t0, t1); acc [M, Dv] f32, zeroed by the caller
template <typename T>
void block_values(const float* p, int64_t m_rows, int64_t dv, const Strided& v, int64_t row, int64_t t0,
                  int64_t t1, float* acc) {
  const int64_t width = t1 - t0;
#ifdef __AVX512F__
  if (dv % 16 == 0) {  // blocks of <= 4 rows x <= 64 channels, each block's sums in registers
    kvlab::for_register_blocks(m_rows, dv, [&](auto kd, auto mr, int64_t m0, int64_t d0) {
      value_tile<T, decltype(kd)::value, decltype(mr)::value>(p + m0 * width, width, dv, d0, v, row, t0, t1,
                                                              acc + m0 * dv);
    });
    return;
  }
#endif
  for (int64_t t = t0; t < t1; ++t) {
    const T* vt = v.at<T>(row, t);
    for (int64_t m = 0; m < m_rows; ++m) {
      const float w = p[m * width + (t - t0)];
      float* __restrict__ am = acc + m * dv;
#pragma omp simd
      for (int64_t d = 0; d < dv; ++d) am[d] += w * to_float(vt[d]);
    }
  }
}

template <typename T>
torch::Tensor attend_impl(const torch::Tensor& q, const torch::Tensor& k, const torch::Tensor& v,
                          const torch::Tensor& mask, double scale) {
  const int64_t rows = q.size(0), m_rows = q.size(1), dim = q.size(2), tokens = k.size(1), dv = v.size(2);
  const int64_t per_row = std::max<int64_t>(1, (8 * at::get_num_threads() + rows - 1) / rows);
  const int64_t block = std::clamp<int64_t>(((tokens + per_row - 1) / per_row + 15) / 16 * 16, MIN_BLOCK, BLOCK);
  const int64_t blocks = std::max<int64_t>(1, (tokens + block - 1) / block);
  // per (row, block): unnormalised output [M, Dv], running max [M] and sum [M], merged after
  auto partial = torch::empty({rows, blocks, m_rows, dv + 2}, q.options());
  const Strided ks{k.data_ptr(), k.stride(0), k.stride(1)}, vs{v.data_ptr(), v.stride(0), v.stride(1)};
  const float* qp = q.data_ptr<float>();
  const int64_t q_r = q.stride(0), q_m = q.stride(1);
  const bool* mp = mask.numel() ? mask.data_ptr<bool>() : nullptr;
  const int64_t per_mask_row = mp ? rows / mask.size(0) : 1, mask_b = mp ? mask.stride(0) : 0;
  const int64_t mask_t = mp ? mask.stride(1) : 0;
  float* out = partial.data_ptr<float>();
  at::parallel_for(0, rows * blocks, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> scores(m_rows * block), acc(m_rows * dv);
    for (int64_t item = begin; item < end; ++item) {
      const int64_t r = item / blocks, t0 = (item % blocks) * block, t1 = std::min(tokens, t0 + block);
      const int64_t width = t1 - t0;
      const bool* mr = mp ? mp + (r / per_mask_row) * mask_b : nullptr;
      block_scores<T>(qp + r * q_r, q_m, m_rows, dim, ks, r, t0, t1, mr, mask_t, static_cast<float>(scale),
                      scores.data());
      float* res = out + item * m_rows * (dv + 2);
      for (int64_t m = 0; m < m_rows; ++m) {  // softmax numerators in place: exp(s - max)
        float* s = scores.data() + m * width;
        float mx = -std::numeric_limits<float>::infinity(), sum = 0.f;
#pragma omp simd reduction(max : mx)
        for (int64_t t = 0; t < width; ++t) mx = std::max(mx, s[t]);
        const float shift = std::isinf(mx) ? 0.f : mx;  // a fully masked block adds nothing
#pragma omp simd reduction(+ : sum)
        for (int64_t t = 0; t < width; ++t) {
          s[t] = exp_nonpositive(s[t] - shift);
          sum += s[t];
        }
        if (std::isinf(mx)) {
          for (int64_t t = 0; t < width; ++t) s[t] = 0.f;
          sum = 0.f;
        }
        res[m * (dv + 2) + dv] = mx, res[m * (dv + 2) + dv + 1] = sum;
      }
      std::fill(acc.begin(), acc.end(), 0.f);
      block_values<T>(scores.data(), m_rows, dv, vs, r, t0, t1, acc.data());
      for (int64_t m = 0; m < m_rows; ++m) std::copy_n(acc.data() + m * dv, dv, res + m * (dv + 2));
    }
  });
  auto result = torch::empty({rows, m_rows, dv}, q.options());
  const float* pp = partial.data_ptr<float>();
  float* rp = result.data_ptr<float>();
  for (int64_t r = 0; r < rows; ++r) {  // merge the blocks: rescale each by exp(its max - the row's max)
    for (int64_t m = 0; m < m_rows; ++m) {
      float mx = -std::numeric_limits<float>::infinity(), sum = 0.f;
      for (int64_t b = 0; b < blocks; ++b) mx = std::max(mx, pp[((r * blocks + b) * m_rows + m) * (dv + 2) + dv]);
      float* o = rp + (r * m_rows + m) * dv;
      std::fill(o, o + dv, 0.f);
      for (int64_t b = 0; b < blocks; ++b) {
        const float* res = pp + ((r * blocks + b) * m_rows + m) * (dv + 2);
        if (std::isinf(res[dv])) continue;
        const float w = std::exp(res[dv] - mx);
        sum += w * res[dv + 1];
        for (int64_t d = 0; d < dv; ++d) o[d] += w * res[d];
      }
      const float inv = sum > 0.f ? 1.f / sum : 0.f;
      for (int64_t d = 0; d < dv; ++d) o[d] *= inv;
    }
  }
  return result;
}

}  // namespace

// q [R, M, D] f32; k [R, T, D], v [R, T, Dv] f32 or bf16 (same dtype); mask [Bm, T] bool or empty.
// Returns [R, M, Dv] f32.
torch::Tensor attend(const torch::Tensor& q, const torch::Tensor& k, const torch::Tensor& v,
                     const torch::Tensor& mask, double scale) {
  TORCH_CHECK(q.device().is_cpu() && k.device().is_cpu() && v.device().is_cpu(), "attend: CPU tensors");
  TORCH_CHECK(q.scalar_type() == torch::kFloat && q.dim() == 3 && q.stride(2) == 1, "attend: q");
  TORCH_CHECK(k.dim() == 3 && v.dim() == 3 && k.stride(2) == 1 && v.stride(2) == 1, "attend: k, v layout");
  TORCH_CHECK(k.scalar_type() == v.scalar_type(), "attend: k and v dtypes differ");
  TORCH_CHECK(k.size(0) == q.size(0) && v.size(0) == q.size(0) && k.size(2) == q.size(2) && v.size(1) == k.size(1),
              "attend: shapes");
  if (mask.numel()) {
    TORCH_CHECK(mask.scalar_type() == torch::kBool && mask.dim() == 2 && mask.size(1) == k.size(1), "attend: mask");
    TORCH_CHECK(q.size(0) % mask.size(0) == 0, "attend: mask rows");
  }
  if (k.scalar_type() == torch::kFloat) return attend_impl<float>(q, k, v, mask, scale);
  TORCH_CHECK(k.scalar_type() == torch::kBFloat16, "attend: k, v must be float32 or bfloat16");
  return attend_impl<c10::BFloat16>(q, k, v, mask, scale);
}

// One decode token of plain full attention in one call (FullAttention.decode_step): RoPE on this token's
// query and key, its key and value written into slot ``slot`` of the cache buffers, then attend() over slots
// 0 .. slot, all visible. At one token per step this replaces ~25 torch calls per layer (split, head views,
// two rotations, two cache writes, the attention's reshapes), ~0.1 ms of a layer's dispatch and Python.
// q [B, H*D], k [B, Hkv*D], v [B, Hkv*Dv] f32 (rows strided: views of one fused linear output); cos, sin
// [B or 1, D] (rows strided); k_buf [B, Hkv, C, D], v_buf [B, Hkv, C, Dv] f32 contiguous, slot < C.
// Returns [B*Hkv, G, Dv] (head h = kv_head * G + g).
torch::Tensor decode_step(const torch::Tensor& q, const torch::Tensor& k, const torch::Tensor& v,
                          const torch::Tensor& cos, const torch::Tensor& sin, torch::Tensor& k_buf,
                          torch::Tensor& v_buf, int64_t slot, double scale) {
  for (const auto* t : {&q, &k, &v, &cos, &sin})
    TORCH_CHECK(t->device().is_cpu() && t->scalar_type() == torch::kFloat && t->dim() == 2 && t->stride(1) == 1,
                "decode_step: q, k, v, cos, sin [rows, width] float32 on the CPU, channels contiguous");
  for (const auto* t : {&k_buf, &v_buf})
    TORCH_CHECK(t->device().is_cpu() && t->scalar_type() == torch::kFloat && t->dim() == 4 && t->is_contiguous(),
                "decode_step: k_buf, v_buf [B, Hkv, C, D] contiguous float32 on the CPU");
  const int64_t batch = k_buf.size(0), kv_heads = k_buf.size(1), cap = k_buf.size(2), dim = k_buf.size(3);
  const int64_t dv = v_buf.size(3), heads = q.size(1) / dim, group = heads / std::max<int64_t>(kv_heads, 1);
  TORCH_CHECK(v_buf.size(0) == batch && v_buf.size(1) == kv_heads && v_buf.size(2) == cap && dim % 2 == 0 &&
              q.size(0) == batch && k.size(0) == batch && v.size(0) == batch && q.size(1) == heads * dim &&
              k.size(1) == kv_heads * dim && v.size(1) == kv_heads * dv && heads == group * kv_heads &&
              cos.sizes() == sin.sizes() && cos.strides() == sin.strides() && cos.size(1) == dim &&
              (cos.size(0) == 1 || cos.size(0) == batch) && slot >= 0 && slot < cap, "decode_step: shapes");
  auto rotated = torch::empty({batch * kv_heads, group, dim}, q.options());
  const float *qp = q.data_ptr<float>(), *kp = k.data_ptr<float>(), *vp = v.data_ptr<float>();
  const float *cp = cos.data_ptr<float>(), *sp = sin.data_ptr<float>();
  float *rp = rotated.data_ptr<float>(), *kb = k_buf.data_ptr<float>(), *vb = v_buf.data_ptr<float>();
  const int64_t c_b = cos.size(0) == 1 ? 0 : cos.stride(0);
  for (int64_t b = 0; b < batch; ++b) {
    const float *c = cp + b * c_b, *n = sp + b * c_b;
    for (int64_t h = 0; h < heads; ++h)
      kvlab::rope_row(qp + b * q.stride(0) + h * dim, c, n, rp + (b * heads + h) * dim, dim);
    for (int64_t h = 0; h < kv_heads; ++h) {
      const int64_t at = (b * kv_heads + h) * cap + slot;
      kvlab::rope_row(kp + b * k.stride(0) + h * dim, c, n, kb + at * dim, dim);
      std::copy_n(vp + b * v.stride(0) + h * dv, dv, vb + at * dv);
    }
  }
  const auto keys = k_buf.view({batch * kv_heads, cap, dim}).narrow(1, 0, slot + 1);
  const auto values = v_buf.view({batch * kv_heads, cap, dv}).narrow(1, 0, slot + 1);
  return attend_impl<float>(rotated, keys, values, torch::empty({0}, q.options().dtype(torch::kBool)), scale);
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("attend", &attend, "one-pass decode attention over a float32 / bfloat16 cache");
  m.def("decode_step", &decode_step, "RoPE, the cache write and attention of one decode token");
}
