// AVX-512 helpers shared by the decode kernels.
#pragma once

#include <immintrin.h>

#include <cstdint>

namespace lmlab {

// Lane i of the result is the sum of the 16 lanes of v[perm(i)], perm(4q + r) = 4r + q.
inline __m512 sum16(const __m512 v[16]) {
  __m512 a[8], b[4], c[2];
  for (int i = 0; i < 8; ++i)  // halves
    a[i] = _mm512_add_ps(_mm512_shuffle_f32x4(v[2 * i], v[2 * i + 1], 0x44),
                         _mm512_shuffle_f32x4(v[2 * i], v[2 * i + 1], 0xEE));
  for (int i = 0; i < 4; ++i)  // quarters
    b[i] = _mm512_add_ps(_mm512_shuffle_f32x4(a[2 * i], a[2 * i + 1], 0x88),
                         _mm512_shuffle_f32x4(a[2 * i], a[2 * i + 1], 0xDD));
  for (int i = 0; i < 2; ++i)  // pairs within 128-bit lanes
    c[i] = _mm512_add_ps(_mm512_shuffle_ps(b[2 * i], b[2 * i + 1], 0x44),
                         _mm512_shuffle_ps(b[2 * i], b[2 * i + 1], 0xEE));
  return _mm512_add_ps(_mm512_shuffle_ps(c[0], c[1], 0x88), _mm512_shuffle_ps(c[0], c[1], 0xDD));
}

inline __mmask16 tail_mask(int64_t n) { return static_cast<__mmask16>((1u << n) - 1); }

// The decode matmuls' epilogue: acc[2m + j] holds x[m] · W[n + j] in 16 partial sums; writes
// y[m * N + n + j], their totals, for m < M.
template <int M>
inline void store_pairs(const __m512 (&acc)[16], float* y, int64_t n, int64_t N) {
  if constexpr (M == 1) {  // a batch-1 step: two reductions, not the 16-way transpose (~45 instructions)
    y[n] = _mm512_reduce_add_ps(acc[0]);
    y[n + 1] = _mm512_reduce_add_ps(acc[1]);
    return;
  }
  alignas(64) float out[16];
  _mm512_store_ps(out, sum16(acc));
  for (int m = 0; m < M; ++m)
    for (int j = 0; j < 2; ++j) {
      const int i = 2 * m + j;
      y[int64_t(m) * N + n + j] = out[4 * (i % 4) + i / 4];
    }
}

}  // namespace lmlab
