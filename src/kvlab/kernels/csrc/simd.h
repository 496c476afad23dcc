// Helpers the decode kernels share: element loads as float32 (scalar, and 16 lanes with AVX-512), the
// 16-way horizontal sum, and a vectorisable exp. Included by the kernels' .cpp files; kvlab.kernels hashes
// this header with each source, so a change here rebuilds them.
#pragma once

#include <torch/extension.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <type_traits>

#ifdef __AVX512F__
#include <immintrin.h>
#endif

namespace kvlab {

inline float to_float(float x) { return x; }
inline float to_float(c10::BFloat16 x) {  // bf16 -> f32: the 16 bits become the high half
  uint32_t bits = static_cast<uint32_t>(x.x) << 16;
  float out;
  std::memcpy(&out, &bits, 4);
  return out;
}

// exp(x) for x <= 0 (scores minus their max), vectorisable: 2^n * p(f) with Cephes' degree-6 polynomial.
inline float exp_nonpositive(float x) {
  x = std::max(x, -87.0f);
  const float n = std::nearbyint(x * 1.44269504088896341f);
  const float f = (x - n * 0.693359375f) + n * 2.12194440e-4f;  // x - n ln2 in two parts
  float p = 1.9875691500e-4f;
  p = p * f + 1.3981999507e-3f;
  p = p * f + 8.3334519073e-3f;
  p = p * f + 4.1665795894e-2f;
  p = p * f + 1.6666665459e-1f;
  p = p * f + 5.0000001201e-1f;
  p = p * f * f + f + 1.0f;
  const int32_t bits = (static_cast<int32_t>(n) + 127) << 23;
  float scale;
  std::memcpy(&scale, &bits, 4);
  return p * scale;
}

// RoPE of one head: dst = x * cos + rotate_half(x) * sin, half-split pairs (a, b) = (x[i], x[i + dim / 2])
// over all dim channels -> (a cos - b sin, b cos + a sin). The decode kernels' rotation (kvlab.rope.Rotary
// is the reference).
inline void rope_row(const float* x, const float* cos, const float* sin, float* dst, int64_t dim) {
  const int64_t half = dim / 2;
#pragma omp simd
  for (int64_t i = 0; i < half; ++i) {
    dst[i] = x[i] * cos[i] + (-x[i + half]) * sin[i];
    dst[i + half] = x[i + half] * cos[i + half] + x[i] * sin[i + half];
  }
}

#ifdef __AVX512F__
inline __m512 load16(const float* p) { return _mm512_loadu_ps(p); }
inline __m512 load16(const c10::BFloat16* p) {
  const __m256i h = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
}
// The lanes of ``mask`` (the others 0, their memory never read): a row's last, partial vector.
inline __m512 load16(const float* p, __mmask16 mask) { return _mm512_maskz_loadu_ps(mask, p); }
inline __m512 load16(const c10::BFloat16* p, __mmask16 mask) {
  const __m256i h = _mm256_maskz_loadu_epi16(mask, p);
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
}

// Ask for the cache lines of [p, p + bytes) in L1 ahead of a loop that streams them (the hardware prefetcher
// alone left the float decode kernel at ~0.73 of the read bandwidth on a 2-core Xeon). Never faults.
inline void prefetch(const void* p, int64_t bytes) {
  for (int64_t at = 0; at < bytes; at += 64) _mm_prefetch(static_cast<const char*>(p) + at, _MM_HINT_T0);
}

// Lane j of the result = the sum of v[j]'s 16 lanes, for 16 vectors: a transpose-and-add tree (45
// shuffles and adds for 16 dot products, where 16 separate horizontal sums take ~3x as many).
inline __m512 sum16(const __m512* v) {
  __m512 pairs[8], quads[4];
  for (int i = 0; i < 8; ++i)  // per 128-bit lane: [a0+a2, b0+b2, a1+a3, b1+b3]
    pairs[i] = _mm512_add_ps(_mm512_unpacklo_ps(v[2 * i], v[2 * i + 1]), _mm512_unpackhi_ps(v[2 * i], v[2 * i + 1]));
  for (int i = 0; i < 4; ++i) {  // per 128-bit lane: the lane's sums of 4 vectors
    const __m512d a = _mm512_castps_pd(pairs[2 * i]), b = _mm512_castps_pd(pairs[2 * i + 1]);
    quads[i] = _mm512_add_ps(_mm512_castpd_ps(_mm512_unpacklo_pd(a, b)), _mm512_castpd_ps(_mm512_unpackhi_pd(a, b)));
  }
  auto fold = [](__m512 a, __m512 b) {  // 128-bit lanes (a0+a1, a2+a3, b0+b1, b2+b3)
    return _mm512_add_ps(_mm512_shuffle_f32x4(a, b, 0x88), _mm512_shuffle_f32x4(a, b, 0xDD));
  };
  return fold(fold(quads[0], quads[1]), fold(quads[2], quads[3]));
}
#endif

// f(KD, MR, m0, d0) for each block of <= 4 rows x <= 4 16-channel vectors of an [m_rows, dim] sum (dim a
// multiple of 16), KD and MR as std::integral_constant: a kernel templated on them keeps a block's sums in
// registers (the value loops of both decode-attention kernels).
template <typename F>
inline void for_register_blocks(int64_t m_rows, int64_t dim, F&& f) {
  for (int64_t m0 = 0; m0 < m_rows; m0 += 4)
    for (int64_t d0 = 0; d0 < dim; d0 += 64) {
      switch (std::min<int64_t>(4, (dim - d0) / 16) * 8 + std::min<int64_t>(4, m_rows - m0)) {
#define KVLAB_BLOCK(KD, MR) \
  case KD * 8 + MR: f(std::integral_constant<int, KD>{}, std::integral_constant<int, MR>{}, m0, d0); break;
        KVLAB_BLOCK(1, 1) KVLAB_BLOCK(1, 2) KVLAB_BLOCK(1, 3) KVLAB_BLOCK(1, 4)
        KVLAB_BLOCK(2, 1) KVLAB_BLOCK(2, 2) KVLAB_BLOCK(2, 3) KVLAB_BLOCK(2, 4)
        KVLAB_BLOCK(3, 1) KVLAB_BLOCK(3, 2) KVLAB_BLOCK(3, 3) KVLAB_BLOCK(3, 4)
        KVLAB_BLOCK(4, 1) KVLAB_BLOCK(4, 2) KVLAB_BLOCK(4, 3) KVLAB_BLOCK(4, 4)
#undef KVLAB_BLOCK
      }
    }
}

}  // namespace kvlab
