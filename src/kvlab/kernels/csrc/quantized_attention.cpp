// Decode attention over KIVI-quantized K/V codes (kvlab.cache.quantized), dequantized in registers: the
// codes are read once, never converted into a float copy in memory. Two kernels, with torch's softmax
// between them (kvlab.kernels builds them and QuantizedKVCacheLayer.attend calls them;
// QuantizedKVCacheLayer.attend_reference is the naive reference they are tested against):
//
//   scores(q, codes, scale, zero, group, bits, out):  out[r, m, t] = q[r, m] . (zero[r, t/G] + codes[r, t] * scale[r, t/G])
//       keys quantized per channel over groups of G tokens; q . (s*c + z) = (q*s) . c + q . z, so the scale
//       is folded into the query once per group and the zero point is one dot product per group.
//   values(p, codes, scale, zero, bits, out):          out[r, m] = sum_t p[r, m, t] * (zero[r, t, j] + codes[r, t] * scale[r, t, j])
//       values quantized per token over J groups of D/J channels.
//
// Rows r = batch x KV heads, m = the query rows of a GQA group, t = quantized tokens, D = head dim.
// Codes are uint8 [R, T, D] (int8) or [R, T, D/2] (int4: channel 2i in the low nibble of byte i, 2i+1 in
// the high one); rows and tokens may be strided (the cache's preallocated buffers). Float32 throughout,
// parallel over rows and token / channel blocks with torch's thread pool (at::parallel_for).
//
// The hot loops are templates over the head dim's 16-channel vectors (and, for values, the query rows),
// so gcc unrolls them and keeps the sums in registers: with a runtime trip count it kept the accumulator
// arrays in memory, and at SmolLM2's shape (GQA-3, D = 64, one thread, 30 layers x 8K tokens) each kernel
// took ~43 cycles per token and KV head; templated, 21-24.

#include <algorithm>
#include <vector>

#include "simd.h"

namespace {

#ifdef __AVX512F__
using kvlab::sum16;
#endif

constexpr int64_t CHUNK = 512;  // tokens per work item: rows x chunks keep both threads busy at batch 1 (3 rows x 2K: 12)

// Channels of one token's codes as floats: int8 one per byte, int4 two per byte (low nibble first).
template <int BITS>
inline void load_codes(const uint8_t* __restrict__ c, int64_t dim, float* __restrict__ out) {
  if constexpr (BITS == 8) {
#pragma omp simd
    for (int64_t d = 0; d < dim; ++d) out[d] = static_cast<float>(c[d]);
  } else {
#pragma omp simd
    for (int64_t i = 0; i < dim / 2; ++i) {
      out[2 * i] = static_cast<float>(c[i] & 15);
      out[2 * i + 1] = static_cast<float>(c[i] >> 4);
    }
  }
}

inline float dot(const float* __restrict__ a, const float* __restrict__ b, int64_t dim) {
  float acc = 0.f;
#pragma omp simd reduction(+ : acc)
  for (int64_t d = 0; d < dim; ++d) acc += a[d] * b[d];
  return acc;
}

#ifdef __AVX512F__
// 16 channels of codes as floats (the compiler's own vectorization of load_codes is 2-3x slower here).
template <int BITS>
inline __m512 load16(const uint8_t* c) {
  if constexpr (BITS == 8) {
    return _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(c))));
  } else {  // 8 bytes -> 16 nibbles in channel order: each byte becomes the 16-bit lane (low | high << 8)
    const __m128i bytes = _mm_cvtepu8_epi16(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(c)));
    const __m128i lo = _mm_and_si128(bytes, _mm_set1_epi16(15)), hi = _mm_srli_epi16(bytes, 4);
    return _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm_or_si128(lo, _mm_slli_epi16(hi, 8))));
  }
}
#endif

void check(const torch::Tensor& t, torch::ScalarType dtype, int64_t dims, const char* name) {
  TORCH_CHECK(t.device().is_cpu(), name, ": expected a CPU tensor");
  TORCH_CHECK(t.scalar_type() == dtype, name, ": unexpected dtype ", t.scalar_type());
  TORCH_CHECK(t.dim() == dims, name, ": expected ", dims, " dims, got ", t.dim());
  TORCH_CHECK(t.stride(-1) == 1, name, ": the last dim must be contiguous");
}

// One quantized stream's tensors as raw pointers and hoisted strides (Tensor::stride() is a call, too slow
// for the per-token loops): codes [R, T, D*bits/8] u8, scale and zero [R, n, w] f32.
struct Stream {
  const uint8_t* codes;
  const float *scale, *zero;
  int64_t c_r, c_t, s_r, s_n, z_r, z_n;
  Stream(const torch::Tensor& c, const torch::Tensor& s, const torch::Tensor& z)
      : codes(c.data_ptr<uint8_t>()), scale(s.data_ptr<float>()), zero(z.data_ptr<float>()),
        c_r(c.stride(0)), c_t(c.stride(1)), s_r(s.stride(0)), s_n(s.stride(1)), z_r(z.stride(0)), z_n(z.stride(1)) {}
  const uint8_t* token(int64_t r, int64_t t) const { return codes + r * c_r + t * c_t; }
  const float* scale_at(int64_t r, int64_t n) const { return scale + r * s_r + n * s_n; }
  const float* zero_at(int64_t r, int64_t n) const { return zero + r * z_r + n * z_n; }
};

#ifdef __AVX512F__
// Scores of tokens t0 .. t1 (whole tiles of 16) of row r for every query row: each tile's keys dequantized
// once into x16 [16, KD*16], then per query row 16 dot products and one sum16. KD = dim / 16 is a template
// argument so the loops unroll and the 16 accumulators stay in registers.
template <int BITS, int KD>
void scores_tiles(const Stream& keys, int64_t r, int64_t t0, int64_t t1, const float* qs, const float* bias,
                  int64_t m_rows, float* x16, float* o, int64_t o_m) {
  constexpr int64_t dim = KD * 16;
  for (int64_t t = t0; t < t1; t += 16) {
#pragma GCC unroll 16
    for (int j = 0; j < 16; ++j) {
      const uint8_t* c = keys.token(r, t + j);
#pragma GCC unroll 8
      for (int k = 0; k < KD; ++k) _mm512_storeu_ps(x16 + j * dim + 16 * k, load16<BITS>(c + k * 16 * BITS / 8));
    }
    for (int64_t m = 0; m < m_rows; ++m) {
      const float* w = qs + m * dim;
      __m512 wk[KD];
#pragma GCC unroll 8
      for (int k = 0; k < KD; ++k) wk[k] = _mm512_loadu_ps(w + 16 * k);
      __m512 acc[16];
#pragma GCC unroll 16
      for (int j = 0; j < 16; ++j) {
        acc[j] = _mm512_mul_ps(_mm512_loadu_ps(x16 + j * dim), wk[0]);
#pragma GCC unroll 8
        for (int k = 1; k < KD; ++k) acc[j] = _mm512_fmadd_ps(_mm512_loadu_ps(x16 + j * dim + 16 * k), wk[k], acc[j]);
      }
      _mm512_storeu_ps(o + m * o_m + (t - t0), _mm512_add_ps(sum16(acc), _mm512_set1_ps(bias[m])));
    }
  }
}

// p[m, t0:t1] @ dequantized values of row r, channels d0 .. d0 + 16 KD, added to acc [MR, .] (rows acc_m
// apart): the MR x KD accumulators in registers (template arguments, so the loops unroll), each channel
// vector's scale group hoisted out of the token loop.
template <int BITS, int KD, int MR>
void values_tokens(const Stream& vals, int64_t r, int64_t t0, int64_t t1, const float* p, int64_t p_m,
                   int64_t width, int64_t d0, float* acc, int64_t acc_m) {
  __m512 regs[MR][KD];
  int64_t group_of[KD];
#pragma GCC unroll 8
  for (int k = 0; k < KD; ++k) group_of[k] = (d0 + k * 16) / width;
#pragma GCC unroll 4
  for (int m = 0; m < MR; ++m)
#pragma GCC unroll 8
    for (int k = 0; k < KD; ++k) regs[m][k] = _mm512_loadu_ps(acc + m * acc_m + 16 * k);
  for (int64_t t = t0; t < t1; ++t) {
    const uint8_t* c = vals.token(r, t) + d0 * BITS / 8;
    const float *s = vals.scale_at(r, t), *z = vals.zero_at(r, t);
    __m512 v[KD];
#pragma GCC unroll 8
    for (int k = 0; k < KD; ++k)
      v[k] = _mm512_fmadd_ps(load16<BITS>(c + k * 16 * BITS / 8), _mm512_set1_ps(s[group_of[k]]),
                             _mm512_set1_ps(z[group_of[k]]));
#pragma GCC unroll 4
    for (int m = 0; m < MR; ++m) {
      const __m512 w = _mm512_set1_ps(p[m * p_m + t]);
#pragma GCC unroll 8
      for (int k = 0; k < KD; ++k) regs[m][k] = _mm512_fmadd_ps(w, v[k], regs[m][k]);
    }
  }
#pragma GCC unroll 4
  for (int m = 0; m < MR; ++m)
#pragma GCC unroll 8
    for (int k = 0; k < KD; ++k) _mm512_storeu_ps(acc + m * acc_m + 16 * k, regs[m][k]);
}
#endif

template <int BITS>
void scores_impl(const torch::Tensor& q, const torch::Tensor& codes, const torch::Tensor& scale,
                 const torch::Tensor& zero, int64_t group, torch::Tensor& out) {
  const int64_t rows = q.size(0), m_rows = q.size(1), dim = q.size(2), tokens = codes.size(1);
  const int64_t groups = tokens / group;
  const Stream keys(codes, scale, zero);
  const float* qp = q.data_ptr<float>();
  float* op = out.data_ptr<float>();
  const int64_t q_r = q.stride(0), q_m = q.stride(1), o_r = out.stride(0), o_m = out.stride(1);
  const int64_t per_item = std::max<int64_t>(1, std::min<int64_t>(groups, CHUNK / group));  // groups per item
  const int64_t items_per_row = (groups + per_item - 1) / per_item;
  at::parallel_for(0, rows * items_per_row, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> qs(m_rows * dim), bias(m_rows), row(dim), x16(16 * dim);
    for (int64_t item = begin; item < end; ++item) {
      const int64_t r = item / items_per_row, g0 = (item % items_per_row) * per_item;
      const int64_t g1 = std::min(groups, g0 + per_item);
      const float* qr = qp + r * q_r;
      for (int64_t g = g0; g < g1; ++g) {
        const float *s = keys.scale_at(r, g), *z = keys.zero_at(r, g);
        for (int64_t m = 0; m < m_rows; ++m) {  // the scale folded into the query, the zero point as a bias
          const float* qm = qr + m * q_m;
#pragma omp simd
          for (int64_t d = 0; d < dim; ++d) qs[m * dim + d] = qm[d] * s[d];
          bias[m] = dot(qm, z, dim);
        }
        int64_t t = g * group;
#ifdef __AVX512F__
        if (dim % 16 == 0 && dim <= 128) {  // 16 tokens at a time: dequantized once into x, then per query row
          const int64_t t1 = t + (((g + 1) * group - t) / 16) * 16;
          float* o = op + r * o_r + t;
          switch (dim / 16) {
#define KVLAB_SCORES(KD) case KD: scores_tiles<BITS, KD>(keys, r, t, t1, qs.data(), bias.data(), m_rows, x16.data(), o, o_m); break;
            KVLAB_SCORES(1) KVLAB_SCORES(2) KVLAB_SCORES(3) KVLAB_SCORES(4)
            KVLAB_SCORES(5) KVLAB_SCORES(6) KVLAB_SCORES(7) KVLAB_SCORES(8)
#undef KVLAB_SCORES
          }
          t = t1;
        }
#endif
        for (; t < (g + 1) * group; ++t) {
          const uint8_t* c = keys.token(r, t);
          float* o = op + r * o_r + t;
#ifdef __AVX512F__
          if (dim % 16 == 0 && dim <= 256) {
            __m512 x[16];
            for (int64_t k = 0; k < dim / 16; ++k) x[k] = load16<BITS>(c + k * 16 * BITS / 8);
            for (int64_t m = 0; m < m_rows; ++m) {
              const float* w = qs.data() + m * dim;
              __m512 acc = _mm512_mul_ps(x[0], _mm512_loadu_ps(w));
              for (int64_t k = 1; k < dim / 16; ++k) acc = _mm512_fmadd_ps(x[k], _mm512_loadu_ps(w + 16 * k), acc);
              o[m * o_m] = _mm512_reduce_add_ps(acc) + bias[m];
            }
            continue;
          }
#endif
          load_codes<BITS>(c, dim, row.data());
          for (int64_t m = 0; m < m_rows; ++m) o[m * o_m] = dot(qs.data() + m * dim, row.data(), dim) + bias[m];
        }
      }
    }
  });
}

template <int BITS>
torch::Tensor values_impl(const torch::Tensor& p, const torch::Tensor& codes, const torch::Tensor& scale,
                          const torch::Tensor& zero, int64_t dim) {
  const int64_t rows = p.size(0), m_rows = p.size(1), tokens = p.size(2);
  const int64_t n_groups = scale.size(2), width = dim / n_groups;
  const int64_t chunks = std::max<int64_t>(1, (tokens + CHUNK - 1) / CHUNK);
  auto partial = torch::zeros({rows, chunks, m_rows, dim}, p.options());  // one per work item, summed after
  const Stream vals(codes, scale, zero);
  const float* pp = p.data_ptr<float>();
  float* op = partial.data_ptr<float>();
  const int64_t p_r = p.stride(0), p_m = p.stride(1);
#ifdef __AVX512F__
  const bool vector = dim % 16 == 0 && width % 16 == 0;  // every 16-channel vector in one scale group
#endif
  at::parallel_for(0, rows * chunks, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> row(dim);
    for (int64_t item = begin; item < end; ++item) {
      const int64_t r = item / chunks, t0 = (item % chunks) * CHUNK, t1 = std::min(tokens, t0 + CHUNK);
      float* acc = op + item * m_rows * dim;
#ifdef __AVX512F__
      if (vector) {  // blocks of <= 4 query rows x <= 64 channels, each block's sums in registers
        kvlab::for_register_blocks(m_rows, dim, [&](auto kd, auto mr, int64_t m0, int64_t d0) {
          values_tokens<BITS, decltype(kd)::value, decltype(mr)::value>(vals, r, t0, t1, pp + r * p_r + m0 * p_m,
                                                                        p_m, width, d0, acc + m0 * dim + d0, dim);
        });
        continue;
      }
#endif
      for (int64_t t = t0; t < t1; ++t) {  // any shape: a token's values dequantized into row, then added
        load_codes<BITS>(vals.token(r, t), dim, row.data());
        const float *s = vals.scale_at(r, t), *z = vals.zero_at(r, t);
        float* v = row.data();
        for (int64_t j = 0; j < n_groups; ++j) {
#pragma omp simd
          for (int64_t d = j * width; d < (j + 1) * width; ++d) v[d] = v[d] * s[j] + z[j];
        }
        for (int64_t m = 0; m < m_rows; ++m) {
          const float w = pp[r * p_r + m * p_m + t];
          float* __restrict__ a = acc + m * dim;
#pragma omp simd
          for (int64_t d = 0; d < dim; ++d) a[d] += w * v[d];
        }
      }
    }
  });
  return chunks == 1 ? partial.squeeze(1) : partial.sum(1);
}

}  // namespace

// q [R, M, D] f32; codes [R, T, D*bits/8] u8; scale, zero [R, T/G, D] f32; out [R, M, T] f32 (written).
void scores(const torch::Tensor& q, const torch::Tensor& codes, const torch::Tensor& scale,
            const torch::Tensor& zero, int64_t group, int64_t bits, torch::Tensor& out) {
  check(q, torch::kFloat, 3, "q"), check(codes, torch::kByte, 3, "codes");
  check(scale, torch::kFloat, 3, "scale"), check(zero, torch::kFloat, 3, "zero"), check(out, torch::kFloat, 3, "out");
  const int64_t rows = q.size(0), m_rows = q.size(1), dim = q.size(2), tokens = codes.size(1);
  TORCH_CHECK(bits == 8 || (bits == 4 && dim % 2 == 0), "scores: bits");
  TORCH_CHECK(codes.size(0) == rows && codes.size(2) == dim * bits / 8, "scores: codes shape");
  TORCH_CHECK(tokens % group == 0 && scale.size(1) * group == tokens && scale.size(2) == dim, "scores: shapes");
  TORCH_CHECK(out.size(0) == rows && out.size(1) == m_rows && out.size(2) == tokens, "scores: out shape");
  if (bits == 8) return scores_impl<8>(q, codes, scale, zero, group, out);
  scores_impl<4>(q, codes, scale, zero, group, out);
}

// p [R, M, T] f32 (rows may be strided); codes [R, T, D*bits/8] u8; scale, zero [R, T, J] f32 (token
// groups of D/J channels); returns [R, M, D] f32.
torch::Tensor values(const torch::Tensor& p, const torch::Tensor& codes, const torch::Tensor& scale,
                     const torch::Tensor& zero, int64_t bits) {
  check(p, torch::kFloat, 3, "p"), check(codes, torch::kByte, 3, "codes");
  check(scale, torch::kFloat, 3, "scale"), check(zero, torch::kFloat, 3, "zero");
  TORCH_CHECK(bits == 8 || bits == 4, "values: bits");
  const int64_t rows = p.size(0), tokens = p.size(2), dim = codes.size(2) * 8 / bits, n_groups = scale.size(2);
  TORCH_CHECK(codes.size(0) == rows && codes.size(1) == tokens && scale.size(1) == tokens && dim % n_groups == 0,
              "values: shapes");
  return bits == 8 ? values_impl<8>(p, codes, scale, zero, dim) : values_impl<4>(p, codes, scale, zero, dim);
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("scores", &scores, "q . dequantized keys, per channel groups of G tokens");
  m.def("values", &values, "probabilities @ dequantized values, per token channel groups");
}
