// y[M,N] = x[M,K] · W[N,K]ᵀ (+ b) for small M: the weight matmuls of a decode step.
//
// A decode step multiplies a few rows (one per sequence) by every weight matrix, so its speed is
// how fast the weights stream from memory. BLAS libraries tune for large M: for M = 8 MKL packs
// each weight before use and reaches about 11 GB/s here. This kernel reads each weight row once,
// multiplies it with all M rows of x held in L1, and prefetches rows ahead in software, because at
// M = 8 the core is busy with arithmetic long enough that the hardware prefetcher falls behind.
//
// Built at first use by generate/cpu_kernels.py with the host compiler against torch's headers, and
// registered as the operator lmlab::skinny_linear, so that eager code and torch.compile's C++
// wrapper both call it through the dispatcher without a detour through Python. Work is split over
// torch's own intra-op threads (at::parallel_for).
// written with AVX-512 intrinsics: on other CPUs the library is built without this operator
#if defined(__AVX512F__)

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include "simd.h"

#include <cstdint>
#include <vector>

namespace {

constexpr int64_t kPrefetchRows = 4;  // how far ahead of the rows in use to prefetch (into L2)

// Rows n and n + 1 of W against M <= 8 rows of x; acc[2m + j] accumulates x[m] · W[n + j].
template <int M>
inline void two_rows(const float* x, const float* w, float* y, int64_t n, int64_t N, int64_t K, __mmask16 tail) {
  __m512 acc[16];
  for (int i = 0; i < 16; ++i) acc[i] = _mm512_setzero_ps();
  const float* w0 = w + n * K;
  const float* w1 = w0 + K;
  const int64_t body = K & ~int64_t(15);
  for (int64_t k = 0; k < body; k += 16) {
    _mm_prefetch(reinterpret_cast<const char*>(w0 + k + kPrefetchRows * K), _MM_HINT_T1);
    _mm_prefetch(reinterpret_cast<const char*>(w1 + k + kPrefetchRows * K), _MM_HINT_T1);
    const __m512 a = _mm512_loadu_ps(w0 + k), b = _mm512_loadu_ps(w1 + k);
    for (int m = 0; m < M; ++m) {
      const __m512 xv = _mm512_loadu_ps(x + m * K + k);
      acc[2 * m] = _mm512_fmadd_ps(xv, a, acc[2 * m]);
      acc[2 * m + 1] = _mm512_fmadd_ps(xv, b, acc[2 * m + 1]);
    }
  }
  if (tail) {
    const __m512 a = _mm512_maskz_loadu_ps(tail, w0 + body), b = _mm512_maskz_loadu_ps(tail, w1 + body);
    for (int m = 0; m < M; ++m) {
      const __m512 xv = _mm512_maskz_loadu_ps(tail, x + m * K + body);
      acc[2 * m] = _mm512_fmadd_ps(xv, a, acc[2 * m]);
      acc[2 * m + 1] = _mm512_fmadd_ps(xv, b, acc[2 * m + 1]);
    }
  }
  lmlab::store_pairs<M>(acc, y, n, N);
}

using Pair = void (*)(const float*, const float*, float*, int64_t, int64_t, int64_t, __mmask16);
constexpr Pair kPairs[9] = {nullptr,       two_rows<1>, two_rows<2>, two_rows<3>, two_rows<4>,
                            two_rows<5>, two_rows<6>, two_rows<7>, two_rows<8>};

// Rows n, n + 1 of W against every row of x, 8 rows of x at a time: the weight rows are read from
// memory once and from L1 for every further 8 rows of x.
inline void pair_all(const float* x, const float* w, float* y, int64_t n, int64_t M, int64_t N, int64_t K,
                     __mmask16 tail) {
  for (int64_t m0 = 0; m0 < M; m0 += 8) kPairs[M - m0 < 8 ? M - m0 : 8](x + m0 * K, w, y + m0 * N, n, N, K, tail);
}

// Rows [n0, n1) of W (n1 - n0 even) against every row of x.
void row_pairs(const float* x, const float* w, float* y, int64_t n0, int64_t n1, int64_t M, int64_t N, int64_t K) {
  const __mmask16 tail = lmlab::tail_mask(K % 16);
  for (int64_t n = n0; n < n1; n += 2) pair_all(x, w, y, n, M, N, K, tail);
}

at::Tensor skinny_linear(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias) {
  TORCH_CHECK(x.device().is_cpu() && x.scalar_type() == at::kFloat && weight.scalar_type() == at::kFloat,
              "lmlab::skinny_linear: float32 CPU tensors only");
  TORCH_CHECK(weight.dim() == 2 && weight.is_contiguous() && weight.size(0) >= 2, "lmlab::skinny_linear: weight (N >= 2, K), contiguous");
  const int64_t N = weight.size(0), K = weight.size(1);
  TORCH_CHECK(x.dim() >= 1 && x.size(-1) == K, "lmlab::skinny_linear: x's last dimension must be ", K);
  // a decode step's x is contiguous: read it in place (a reshape is a dispatched op, ~1 us, and
  // a step makes some two hundred of these calls)
  const at::Tensor x2 = x.is_contiguous() ? x : x.contiguous();
  const int64_t M = K > 0 ? x2.numel() / K : 0;
  c10::SmallVector<int64_t, 4> shape(x.sizes().begin(), x.sizes().end());
  shape.back() = N;
  at::Tensor y = at::empty(shape, x.options());
  const float* xp = x2.data_ptr<float>();
  const float* wp = weight.data_ptr<float>();
  float* yp = y.data_ptr<float>();
  if (M == 0) return y;
  // pairs of weight rows split over threads; at least 16 pairs per task (small matrices stay whole)
  at::parallel_for(0, N / 2, 16, [&](int64_t p0, int64_t p1) { row_pairs(xp, wp, yp, 2 * p0, 2 * p1, M, N, K); });
  if (N % 2) {  // the last row of an odd N: computed with the row before it, into scratch
    std::vector<float> scratch(2 * M);
    const __mmask16 tail = lmlab::tail_mask(K % 16);
    pair_all(xp, wp + (N - 2) * K, scratch.data(), 0, M, 2, K, tail);
    for (int64_t m = 0; m < M; ++m) yp[m * N + N - 1] = scratch[2 * m + 1];
  }
  if (bias) {
    const at::Tensor b = bias->contiguous();
    TORCH_CHECK(b.scalar_type() == at::kFloat && b.numel() == N, "lmlab::skinny_linear: bias must be ", N, " float32 values");
    const float* bp = b.data_ptr<float>();
    for (int64_t m = 0; m < M; ++m)
      for (int64_t n = 0; n < N; ++n) yp[m * N + n] += bp[n];
  }
  return y;
}

}  // namespace

// y = x · Wᵀ + b for float32 CPU tensors, x (..., K), W (N, K).
TORCH_LIBRARY_FRAGMENT(lmlab, m) { m.def("skinny_linear(Tensor x, Tensor weight, Tensor? bias) -> Tensor"); }
TORCH_LIBRARY_IMPL(lmlab, CPU, m) { m.impl("skinny_linear", skinny_linear); }

#endif  // __AVX512F__
