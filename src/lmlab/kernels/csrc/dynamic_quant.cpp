// The two elementwise ends of a dynamically quantized prefill matmul (kernels/quant.py:
// int8_dynamic_linear, int16_dynamic_linear), each one pass where torch's formula takes five or six:
//
//   quantize_rows(x, split)  x float32 (M, K) -> codes int8 and one scale per row.
//     split false: scale = max|x_m| / 127, codes = round(x / scale)                          (M, K)
//     split true:  scale = max|x_m| / 32639, v = round(x / scale) in [-32639, 32639], written as two
//                  int8 halves v = 256 h + l (h = floor((v + 128) / 256), l in [-128, 127]):
//                  rows [0, M) hold h, rows [M, 2M) hold l                                   (2M, K)
//   dequantize_sums(s, scale_x, scale_w, bias, split)  the int32 sums of codes x weight codes
//     (oneDNN's int8 matmul of the codes above) -> y float32 (M, N):
//     y = (split ? 256 * s_h + s_l : s) * scale_x[m] * scale_w[n] (+ bias[n])
//
// Both do the same float operations in the same order as the torch formula in quant.py (round half
// to even, and no fused multiply-adds: GCC contracts a * b + c by default in C++, turned off below),
// so their results are bit-identical to it; a row holding a NaN gets a NaN scale, as torch's amax
// gives. In a 512-token prefill of SmolLM2 the formula's elementwise passes cost nearly as much as
// the int8 matmuls.
#if defined(__AVX512F__)

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <limits>
#include <tuple>

#include "simd.h"

#pragma GCC optimize("fp-contract=off")

namespace {

constexpr float kInt8Max = 127.0f;
constexpr float kSplitMax = 127.0f * 256.0f + 127.0f;  // the largest v whose halves both fit int8

// the number of lanes of a 16-wide chunk starting at k that lie below K
inline __mmask16 lanes(int64_t k, int64_t K) { return K - k >= 16 ? __mmask16(0xFFFF) : lmlab::tail_mask(K - k); }

std::tuple<at::Tensor, at::Tensor> quantize_rows(const at::Tensor& x, bool split) {
  TORCH_CHECK(x.device().is_cpu() && x.scalar_type() == at::kFloat && x.dim() == 2 && x.is_contiguous(),
              "lmlab::quantize_rows: x must be contiguous float32 (M, K) on the CPU");
  const int64_t M = x.size(0), K = x.size(1);
  at::Tensor q = at::empty({split ? 2 * M : M, K}, x.options().dtype(at::kChar));
  at::Tensor scale = at::empty({M, 1}, x.options());
  const float* xp = x.data_ptr<float>();
  int8_t* qp = q.data_ptr<int8_t>();
  float* sp = scale.data_ptr<float>();
  const float top = split ? kSplitMax : kInt8Max;
  at::parallel_for(0, M, 16, [&](int64_t m0, int64_t m1) {
    for (int64_t m = m0; m < m1; ++m) {
      const float* row = xp + m * K;
      __m512 amax = _mm512_setzero_ps();
      __mmask16 nan = 0;  // (max_ps drops a NaN operand; torch's amax keeps it)
      for (int64_t k = 0; k < K; k += 16) {
        const __m512 v = _mm512_maskz_loadu_ps(lanes(k, K), row + k);
        amax = _mm512_max_ps(amax, _mm512_abs_ps(v));
        nan |= _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q);
      }
      const float biggest = nan ? std::numeric_limits<float>::quiet_NaN() : _mm512_reduce_max_ps(amax);
      const float s = (biggest < 1e-12f ? 1e-12f : biggest) / top;  // torch: amax.clamp(min=1e-12) / top (NaN stays)
      sp[m] = s;
      const __m512 sv = _mm512_set1_ps(s);
      int8_t* hi = qp + m * K;
      int8_t* lo = split ? qp + (M + m) * K : nullptr;
      for (int64_t k = 0; k < K; k += 16) {
        const __mmask16 mask = lanes(k, K);
        const __m512 v = _mm512_roundscale_ps(_mm512_div_ps(_mm512_maskz_loadu_ps(mask, row + k), sv),
                                              _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
        if (!split) {
          _mm512_mask_cvtepi32_storeu_epi8(hi + k, mask, _mm512_cvtps_epi32(v));
          continue;
        }
        // (v + 128) / 256 is exact in float (|v| < 2^15), so the floor is exact too
        const __m512 h = _mm512_roundscale_ps(_mm512_mul_ps(_mm512_add_ps(v, _mm512_set1_ps(128.0f)), _mm512_set1_ps(1.0f / 256)),
                                              _MM_FROUND_TO_NEG_INF | _MM_FROUND_NO_EXC);
        const __m512 l = _mm512_sub_ps(v, _mm512_mul_ps(h, _mm512_set1_ps(256.0f)));
        _mm512_mask_cvtepi32_storeu_epi8(hi + k, mask, _mm512_cvtps_epi32(h));
        _mm512_mask_cvtepi32_storeu_epi8(lo + k, mask, _mm512_cvtps_epi32(l));
      }
    }
  });
  return {q, scale};
}

at::Tensor dequantize_sums(const at::Tensor& s, const at::Tensor& scale_x, const at::Tensor& scale_w,
                           const std::optional<at::Tensor>& bias, bool split) {
  TORCH_CHECK(s.device().is_cpu() && s.scalar_type() == at::kInt && s.dim() == 2 && s.is_contiguous(),
              "lmlab::dequantize_sums: sums must be contiguous int32 (M, N) on the CPU");
  const int64_t M = split ? s.size(0) / 2 : s.size(0), N = s.size(1);
  TORCH_CHECK(!split || s.size(0) % 2 == 0, "lmlab::dequantize_sums: split sums need 2M rows");
  TORCH_CHECK(scale_x.scalar_type() == at::kFloat && scale_x.is_contiguous() && scale_x.numel() == M,
              "lmlab::dequantize_sums: scale_x must be ", M, " contiguous float32 values");
  TORCH_CHECK(scale_w.scalar_type() == at::kFloat && scale_w.is_contiguous() && scale_w.numel() == N,
              "lmlab::dequantize_sums: scale_w must be ", N, " contiguous float32 values");
  const float* b = nullptr;
  at::Tensor bias_c;
  if (bias) {
    bias_c = bias->contiguous();
    TORCH_CHECK(bias_c.scalar_type() == at::kFloat && bias_c.numel() == N, "lmlab::dequantize_sums: bias must be ", N,
                " float32 values");
    b = bias_c.data_ptr<float>();
  }
  at::Tensor y = at::empty({M, N}, scale_x.options());
  const int32_t* sp = s.data_ptr<int32_t>();
  const float* sx = scale_x.data_ptr<float>();
  const float* sw = scale_w.data_ptr<float>();
  float* yp = y.data_ptr<float>();
  at::parallel_for(0, M, 16, [&](int64_t m0, int64_t m1) {
    for (int64_t m = m0; m < m1; ++m) {
      const int32_t* hi = sp + m * N;
      const int32_t* lo = split ? sp + (M + m) * N : nullptr;
      const __m512 xs = _mm512_set1_ps(sx[m]);
      for (int64_t n = 0; n < N; n += 16) {
        const __mmask16 mask = lanes(n, N);
        __m512 v = _mm512_cvtepi32_ps(_mm512_maskz_loadu_epi32(mask, hi + n));
        if (split)
          v = _mm512_add_ps(_mm512_mul_ps(v, _mm512_set1_ps(256.0f)),
                            _mm512_cvtepi32_ps(_mm512_maskz_loadu_epi32(mask, lo + n)));
        v = _mm512_mul_ps(_mm512_mul_ps(v, xs), _mm512_maskz_loadu_ps(mask, sw + n));
        if (b) v = _mm512_add_ps(v, _mm512_maskz_loadu_ps(mask, b + n));
        _mm512_mask_storeu_ps(yp + m * N + n, mask, v);
      }
    }
  });
  return y;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(lmlab, m) {
  m.def("quantize_rows(Tensor x, bool split) -> (Tensor, Tensor)");
  m.def("dequantize_sums(Tensor s, Tensor scale_x, Tensor scale_w, Tensor? bias, bool split) -> Tensor");
}
TORCH_LIBRARY_IMPL(lmlab, CPU, m) {
  m.impl("quantize_rows", quantize_rows);
  m.impl("dequantize_sums", dequantize_sums);
}

#endif  // __AVX512F__
