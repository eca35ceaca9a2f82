// The two elementwise ends of a dynamically quantized prefill matmul (kernels/quant.py:
// int8/int16/int24_dynamic_linear), each one pass where torch's formula takes five or more:
//
//   quantize_rows(x, limbs)  x float32 (M, K) -> codes int8 and one scale per row: each row rounded
//     to integers v = clamp(round(x / scale), -top, top), scale = max|x_m| / top, top = 127, 32639 or
//     8355711 for 1, 2 or 3 limbs, written in base 256 with signed digits in [-128, 127] (the top is
//     the largest v whose every digit fits int8): v = 256 h + l (two limbs), 65536 h + 256 m + l
//     (three). Rows [0, M) hold the highest digit, the next M rows the next, ... (limbs * M, K).
//   dequantize_sums(s, scale_x, scale_w, bias, limbs)  the int32 sums of codes x weight codes
//     (oneDNN's int8 matmul of the codes above) -> y float32 (M, N): the digits' sums put together in
//     float64 (exact: |total| < 2^53), rounded once to float32, times scale_x[m], times scale_w[n]
//     (+ bias[n]).
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

// the largest |v| whose base-256 digits all fit int8, by number of digits (limbs)
constexpr float kTop[4] = {0.0f, 127.0f, 127.0f * 256 + 127, (127.0f * 256 + 127) * 256 + 127};

// the number of lanes of a 16-wide chunk starting at k that lie below K
inline __mmask16 lanes(int64_t k, int64_t K) { return K - k >= 16 ? __mmask16(0xFFFF) : lmlab::tail_mask(K - k); }

void check_limbs(int64_t limbs, const char* op) {
  TORCH_CHECK(limbs >= 1 && limbs <= 3, "lmlab::", op, ": limbs must be 1, 2 or 3, not ", limbs);
}

std::tuple<at::Tensor, at::Tensor> quantize_rows(const at::Tensor& x, int64_t limbs) {
  TORCH_CHECK(x.device().is_cpu() && x.scalar_type() == at::kFloat && x.dim() == 2 && x.is_contiguous(),
              "lmlab::quantize_rows: x must be contiguous float32 (M, K) on the CPU");
  check_limbs(limbs, "quantize_rows");
  const int64_t M = x.size(0), K = x.size(1);
  at::Tensor q = at::empty({limbs * M, K}, x.options().dtype(at::kChar));
  at::Tensor scale = at::empty({M, 1}, x.options());
  const float* xp = x.data_ptr<float>();
  int8_t* qp = q.data_ptr<int8_t>();
  float* sp = scale.data_ptr<float>();
  const float top = kTop[limbs];
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
      const __m512 sv = _mm512_set1_ps(s), hi = _mm512_set1_ps(top), lo = _mm512_set1_ps(-top);
      for (int64_t k = 0; k < K; k += 16) {
        const __mmask16 mask = lanes(k, K);
        __m512 v = _mm512_roundscale_ps(_mm512_div_ps(_mm512_maskz_loadu_ps(mask, row + k), sv),
                                        _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
        // max |x| / scale may round one past the top (3 limbs: float's spacing there is 0.5). min/max
        // return their second operand when one is NaN, so v goes second: a NaN stays NaN (code 0), as
        // torch's clamp keeps it
        v = _mm512_min_ps(hi, _mm512_max_ps(lo, v));
        // lowest digit first: l = v - 256 h, h = floor((v + 128) / 256); every step is exact in float
        // (|v| < 2^23, and a power of two divides)
        for (int64_t d = limbs - 1; d > 0; --d) {
          const __m512 h = _mm512_roundscale_ps(_mm512_mul_ps(_mm512_add_ps(v, _mm512_set1_ps(128.0f)), _mm512_set1_ps(1.0f / 256)),
                                                _MM_FROUND_TO_NEG_INF | _MM_FROUND_NO_EXC);
          const __m512 l = _mm512_sub_ps(v, _mm512_mul_ps(h, _mm512_set1_ps(256.0f)));
          _mm512_mask_cvtepi32_storeu_epi8(qp + (d * M + m) * K + k, mask, _mm512_cvtps_epi32(l));
          v = h;
        }
        _mm512_mask_cvtepi32_storeu_epi8(qp + m * K + k, mask, _mm512_cvtps_epi32(v));
      }
    }
  });
  return {q, scale};
}

// 16 int32 sums of row m's digits at columns n.. put together exactly in float64, rounded to float32
inline __m512 digits_total(const int32_t* sp, int64_t limbs, int64_t M, int64_t N, int64_t m, int64_t n, __mmask16 mask) {
  const __m512i first = _mm512_maskz_loadu_epi32(mask, sp + m * N + n);
  if (limbs == 1) return _mm512_cvtepi32_ps(first);
  __m512d a = _mm512_cvtepi32_pd(_mm512_castsi512_si256(first));
  __m512d b = _mm512_cvtepi32_pd(_mm512_extracti64x4_epi64(first, 1));
  for (int64_t d = 1; d < limbs; ++d) {
    const __m512i next = _mm512_maskz_loadu_epi32(mask, sp + (d * M + m) * N + n);
    a = _mm512_add_pd(_mm512_mul_pd(a, _mm512_set1_pd(256.0)), _mm512_cvtepi32_pd(_mm512_castsi512_si256(next)));
    b = _mm512_add_pd(_mm512_mul_pd(b, _mm512_set1_pd(256.0)), _mm512_cvtepi32_pd(_mm512_extracti64x4_epi64(next, 1)));
  }
  const __m256 lo = _mm512_cvtpd_ps(a), hi = _mm512_cvtpd_ps(b);
  return _mm512_castpd_ps(_mm512_insertf64x4(_mm512_castpd256_pd512(_mm256_castps_pd(lo)), _mm256_castps_pd(hi), 1));
}

at::Tensor dequantize_sums(const at::Tensor& s, const at::Tensor& scale_x, const at::Tensor& scale_w,
                           const std::optional<at::Tensor>& bias, int64_t limbs) {
  TORCH_CHECK(s.device().is_cpu() && s.scalar_type() == at::kInt && s.dim() == 2 && s.is_contiguous(),
              "lmlab::dequantize_sums: sums must be contiguous int32 (M, N) on the CPU");
  check_limbs(limbs, "dequantize_sums");
  TORCH_CHECK(s.size(0) % limbs == 0, "lmlab::dequantize_sums: sums of ", limbs, " limbs need a multiple of ", limbs, " rows");
  const int64_t M = s.size(0) / limbs, N = s.size(1);
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
      const __m512 xs = _mm512_set1_ps(sx[m]);
      for (int64_t n = 0; n < N; n += 16) {
        const __mmask16 mask = lanes(n, N);
        __m512 v = digits_total(sp, limbs, M, N, m, n, mask);
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
  m.def("quantize_rows(Tensor x, int limbs) -> (Tensor, Tensor)");
  m.def("dequantize_sums(Tensor s, Tensor scale_x, Tensor scale_w, Tensor? bias, int limbs) -> Tensor");
}
TORCH_LIBRARY_IMPL(lmlab, CPU, m) {
  m.impl("quantize_rows", quantize_rows);
  m.impl("dequantize_sums", dequantize_sums);
}

#endif  // __AVX512F__
