// CSA's top-k selection (kvlab.attention._v4.Indexer.select): for each row of index scores, the positions
// of its k best entries, in position order. Deterministic under ties: the entries scoring above the k-th
// score, then the earliest entries equal to it. Indexer.select_reference (kthvalue, a tie cumsum and
// nonzero over the whole [rows, n] score matrix) is the reference it is tested against.
//
//   select(scores, k):  idx[r, :] = the k positions of row r's top-k, ascending
//
// scores [R, n] f32 (rows contiguous); returns [R, k] int64. Per row: the scores become order-preserving
// 32-bit keys, the k-th largest key is found by bisection on its value, each step one vectorised count of
// the keys at or above it (<= 32 counts of n, ~1 ns per score; quickselect, std::nth_element or torch's
// kthvalue, took 10-15 ns on branch mispredictions), then one scan writes the positions. At 16K tokens a
// CSA prefill selects from ~33M scores (benchmarks/v4_prefill.py).

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <vector>

#include "simd.h"

torch::Tensor select_topk(const torch::Tensor& scores, int64_t k) {
  TORCH_CHECK(scores.device().is_cpu() && scores.scalar_type() == torch::kFloat && scores.dim() == 2 &&
              scores.stride(1) == 1, "select: scores [R, n] float32 with contiguous rows");
  const int64_t rows = scores.size(0), n = scores.size(1);
  TORCH_CHECK(k >= 1 && k <= n && n < (int64_t(1) << 31), "select: 1 <= k <= n < 2^31");
  auto idx = torch::empty({rows, k}, scores.options().dtype(torch::kLong));
  const float* sp = scores.data_ptr<float>();
  int64_t* ip = idx.data_ptr<int64_t>();
  const int64_t s_r = scores.stride(0);
  at::parallel_for(0, rows, 16, [&](int64_t begin, int64_t end) {
    std::vector<uint32_t> key(n);
    std::vector<float> clean;  // a row with NaN scores, read as -inf (always k valid positions out)
    for (int64_t r = begin; r < end; ++r) {
      const float* row = sp + r * s_r;
      if (std::any_of(row, row + n, [](float x) { return std::isnan(x); })) {
        clean.assign(row, row + n);
        for (float& x : clean) x = std::isnan(x) ? -std::numeric_limits<float>::infinity() : x;
        row = clean.data();
      }
      uint32_t lo = UINT32_MAX, hi = 0;
      for (int64_t i = 0; i < n; ++i) {  // float order as unsigned order: negatives flipped, sign bit set
        uint32_t bits;
        std::memcpy(&bits, row + i, 4);
        key[i] = bits ^ ((bits >> 31) ? 0xFFFFFFFFu : 0x80000000u);
        lo = std::min(lo, key[i]), hi = std::max(hi, key[i]);
      }
      while (lo < hi) {  // the largest t with count(key >= t) >= k lies in [lo, hi]
        const uint32_t mid = lo + (hi - lo + 1) / 2;
        int64_t count = 0;
        for (int64_t i = 0; i < n; ++i) count += key[i] >= mid;
        if (count >= k) lo = mid; else hi = mid - 1;
      }
      const uint32_t kth_bits = lo ^ ((lo >> 31) ? 0x80000000u : 0xFFFFFFFFu);
      float kth;
      std::memcpy(&kth, &kth_bits, 4);
      int64_t above = 0;
      for (int64_t i = 0; i < n; ++i) above += row[i] > kth;
      int64_t ties = k - above, at = 0, i = 0;  // the earliest `ties` entries equal to the k-th are taken too
      int64_t* out = ip + r * k;
#ifdef __AVX512F__
      const __m512 kv = _mm512_set1_ps(kth);
      const __m512i lanes = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
      int32_t picked[16];
      for (; i + 16 <= n && at < k; i += 16) {  // 16 at a time, the taken positions compressed out
        const __m512 v = _mm512_loadu_ps(row + i);
        const __mmask16 gt = _mm512_cmp_ps_mask(v, kv, _CMP_GT_OQ), eq = _mm512_cmp_ps_mask(v, kv, _CMP_EQ_OQ);
        if (eq && ties > 0) break;  // ties to take here: the scalar loop from this vector on
        _mm512_mask_compressstoreu_epi32(picked, gt, _mm512_add_epi32(lanes, _mm512_set1_epi32(int32_t(i))));
        for (int j = 0, c = __builtin_popcount(gt); j < c; ++j) out[at++] = picked[j];
      }
#endif
      for (; i < n && at < k; ++i) {
        const bool take = row[i] > kth || (row[i] == kth && ties > 0);
        ties -= row[i] == kth && take;
        if (take) out[at++] = i;
      }
    }
  });
  return idx;
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("select", &select_topk, "positions of each row's top-k scores, ascending (earliest ties first)");
}
