// The elementwise steps of a decode step, one call each instead of a handful of torch ops: at one token a
// SmolLM2 step ran ~5,100 small ops (~170 per layer) for ~18 of its ~40 ms on a 2-core Xeon, most of it
// dispatch and Python between them, not arithmetic (benchmarks/decode_profile.py). Their references are the
// torch ops they replace, beside each caller:
//
//   rms_norm(x, w, eps):  out = x * rsqrt(mean(x^2) + eps) * w         (kvlab.norms.RMSNorm, F.rms_norm)
//   rope(x, cos, sin):    out = x * cos + rotate_half(x) * sin          (kvlab.rope.Rotary.apply)
//   silu_mul(g, u):       out = silu(g) * u                             (kvlab.mlp.GatedMLP)
//
// All float32 on the CPU, one thread (a decode step's activations are a few KB; kvlab.kernels.decode_ops
// sends prefill's larger ones to torch's threaded ops). Inputs may be strided views (channels contiguous):
// rows of a fused linear's output, heads of a [B, S, H, D] projection seen as [B, H, S, D].

#include <cmath>

#include "simd.h"

namespace {

void check_channels(const torch::Tensor& t, const char* what) {
  TORCH_CHECK(t.device().is_cpu() && t.scalar_type() == torch::kFloat && t.stride(-1) == 1, what,
              ": float32 on the CPU with contiguous channels");
}

// x [M, D] (rows strided), weight [D] or empty (no scale) -> [M, D] contiguous.
torch::Tensor rms_norm(const torch::Tensor& x, const torch::Tensor& weight, double eps) {
  check_channels(x, "rms_norm: x");
  TORCH_CHECK(x.dim() == 2, "rms_norm: x [M, D]");
  const int64_t rows = x.size(0), dim = x.size(1), stride = x.stride(0);
  const bool scaled = weight.numel() > 0;
  if (scaled) {
    check_channels(weight, "rms_norm: weight");
    TORCH_CHECK(weight.dim() == 1 && weight.size(0) == dim, "rms_norm: weight [D]");
  }
  auto out = torch::empty({rows, dim}, x.options());
  const float* xp = x.data_ptr<float>();
  const float* wp = scaled ? weight.data_ptr<float>() : nullptr;
  float* op = out.data_ptr<float>();
  for (int64_t r = 0; r < rows; ++r) {
    const float* row = xp + r * stride;
    float* dst = op + r * dim;
    float squares = 0.0f;
#pragma omp simd reduction(+ : squares)
    for (int64_t i = 0; i < dim; ++i) squares += row[i] * row[i];
    const float inv = 1.0f / std::sqrt(squares / static_cast<float>(dim) + static_cast<float>(eps));
    if (scaled) {
#pragma omp simd
      for (int64_t i = 0; i < dim; ++i) dst[i] = row[i] * inv * wp[i];
    } else {
#pragma omp simd
      for (int64_t i = 0; i < dim; ++i) dst[i] = row[i] * inv;
    }
  }
  return out;
}

// x [B, H, S, D] (strided), cos / sin [B or 1, 1, S, D] (strided, broadcast over heads) -> [B, H, S, D]
// contiguous. Half-split pairs over the whole head dim: (a, b) -> (a cos - b sin, b cos + a sin).
torch::Tensor rope(const torch::Tensor& x, const torch::Tensor& cos, const torch::Tensor& sin) {
  check_channels(x, "rope: x");
  check_channels(cos, "rope: cos");
  check_channels(sin, "rope: sin");
  TORCH_CHECK(x.dim() == 4 && cos.dim() == 4 && sin.sizes() == cos.sizes() && sin.strides() == cos.strides(),
              "rope: x [B, H, S, D], cos and sin [B|1, 1, S, D] alike");
  const int64_t batch = x.size(0), heads = x.size(1), seq = x.size(2), dim = x.size(3);
  TORCH_CHECK(dim % 2 == 0 && cos.size(3) == dim && cos.size(2) == seq && cos.size(1) == 1 &&
              (cos.size(0) == batch || cos.size(0) == 1), "rope: shapes");
  auto out = torch::empty({batch, heads, seq, dim}, x.options());
  const float* xp = x.data_ptr<float>();
  const float* cp = cos.data_ptr<float>();
  const float* sp = sin.data_ptr<float>();
  float* op = out.data_ptr<float>();
  const int64_t cb = cos.size(0) == 1 ? 0 : cos.stride(0), cs = cos.stride(2);
  for (int64_t b = 0; b < batch; ++b)
    for (int64_t h = 0; h < heads; ++h)
      for (int64_t s = 0; s < seq; ++s)
        kvlab::rope_row(xp + b * x.stride(0) + h * x.stride(1) + s * x.stride(2), cp + b * cb + s * cs,
                        sp + b * cb + s * cs, op + ((b * heads + h) * seq + s) * dim, dim);
  return out;
}

// gate, up [M, N] (rows strided: the halves of a fused gate/up output) -> silu(gate) * up [M, N] contiguous.
torch::Tensor silu_mul(const torch::Tensor& gate, const torch::Tensor& up) {
  check_channels(gate, "silu_mul: gate");
  check_channels(up, "silu_mul: up");
  TORCH_CHECK(gate.dim() == 2 && up.sizes() == gate.sizes(), "silu_mul: gate and up [M, N] alike");
  const int64_t rows = gate.size(0), cols = gate.size(1);
  auto out = torch::empty({rows, cols}, gate.options());
  float* op = out.data_ptr<float>();
  for (int64_t r = 0; r < rows; ++r) {
    const float* g = gate.data_ptr<float>() + r * gate.stride(0);
    const float* u = up.data_ptr<float>() + r * up.stride(0);
    float* dst = op + r * cols;
#pragma omp simd
    for (int64_t i = 0; i < cols; ++i) {  // silu(x) = x / (1 + e^-x), with e^-|x| <= 1 (no overflow)
      const float x = g[i], e = kvlab::exp_nonpositive(-std::fabs(x));
      const float sigmoid = x >= 0.0f ? 1.0f / (1.0f + e) : e / (1.0f + e);
      dst[i] = x * sigmoid * u[i];
    }
  }
  return out;
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("rms_norm", &rms_norm, "x * rsqrt(mean(x^2) + eps) * weight, per row");
  m.def("rope", &rope, "x * cos + rotate_half(x) * sin, per head");
  m.def("silu_mul", &silu_mul, "silu(gate) * up");
}
