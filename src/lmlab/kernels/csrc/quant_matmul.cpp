// y[M,N] = x[M,K] · Wᵀ (+ b) with W stored as int8 or int4 codes and float scales: weight-only
// quantized matmuls (compress/quantize.py, GGUF Q8_0/Q4_0).
//
// A decode step streams every weight once per token, so fewer bytes per weight is more tokens per
// second: int8 reads a quarter of fp32's bytes, int4 an eighth. Each weight chunk is turned into
// float32 in registers (int8: code -> float, times its group's scale; int4: a 16-entry table per group)
// and multiplied with up to 8 rows of x held in L1, as skinny_matmul.cpp does for float32 weights;
// activations and accumulation stay float32, so the result equals F.linear on the dequantized
// weights up to summation order.
//
// Layouts (both row-major over N output rows):
// - int8: q int8 [N, K], value = q * scale[n, k / G]; G = K is per-channel, G = 32 is GGUF Q8_0.
// - int4: q uint8 [N, K / 2], blocks of 32 weights in 16 bytes, byte j holding weight j (low
//   nibble) and weight j + 16 (high nibble) as GGUF's Q4_0/Q4_1 do, so their blocks run unchanged;
//   value = code * scale[n, k / G] + offset[n, k / G] (Q4_0: offset = -8 * scale).
//
// Up to 64 rows of x (a short prompt's prefill) stream the weights once per 8 rows. With more, the
// matmul is compute-bound and BLAS is faster: tiles of W are dequantized into a float32 buffer and
// handed to at::mm. (Measured on SmolLM2 Q8_0, 2 cores: a 40-token prompt in 70 ms this way against
// 100 ms through BLAS, 64 tokens in 108 against 128 ms; BLAS wins from about 96 rows.)
#if defined(__AVX512F__)

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/mm.h>
#include <torch/library.h>

#include "simd.h"

#include <cstdint>
#include <vector>

namespace {

constexpr int64_t kPrefetchBytes = 4 * 1024;  // how far ahead in the weight stream to prefetch (into L2)
constexpr int64_t kMaxSkinnyRows = 64;        // above this, dequantized tiles + BLAS (see the top)
constexpr int64_t kTileRows = 256;            // weight rows dequantized per BLAS tile

// Weights of one output row, as float32 chunks of 16.
struct Int8Row {
  const int8_t* q;
  const float* scale;
  int64_t group;
  // codes [k, k + 16) (k a multiple of 16) as floats
  inline __m512 codes(int64_t k) const {
    return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(q + k))));
  }
  inline void prefetch(int64_t k) const { _mm_prefetch(reinterpret_cast<const char*>(q + k + kPrefetchBytes), _MM_HINT_T1); }
};

struct Int4Row {
  const uint8_t* q;
  const float* scale;
  const float* offset;
  int64_t group;
  // The 16 values a code can stand for in group g, code * scale + offset: a lookup table in one
  // register. vpermps reads only the low 4 bits of each index, so a nibble needs no mask; one
  // permute replaces converting the code to float and scaling it (the same fma, so the same
  // values), ~20% fewer instructions per weight, which is what a batch-1 step is bound by.
  inline __m512 table(int64_t g) const {
    const __m512 codes = _mm512_setr_ps(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
    return _mm512_fmadd_ps(codes, _mm512_set1_ps(scale[g]), _mm512_set1_ps(offset[g]));
  }
  // weights [k, k + 16) and [k + 16, k + 32) of the 32-block starting at k; t: their group's table
  inline void block(int64_t k, __m512 t, __m512& lo, __m512& hi) const {
    const __m512i bytes = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(q + k / 2)));
    lo = _mm512_permutexvar_ps(bytes, t);
    hi = _mm512_permutexvar_ps(_mm512_srli_epi32(bytes, 4), t);
  }
  inline void prefetch(int64_t k) const { _mm_prefetch(reinterpret_cast<const char*>(q + k / 2 + kPrefetchBytes), _MM_HINT_T1); }
};

// acc += x[:, k..end) · rows r0, r1 (as codes times d0, d1 when Scaled; as bare codes otherwise).
template <int M, bool Scaled>
inline void int8_span(const float* x, const Int8Row& r0, const Int8Row& r1, __m512 (&acc)[16], int64_t k, int64_t end,
                      int64_t K, __m512 d0, __m512 d1) {
  for (; k < end; k += 16) {
    if ((k & 63) == 0) r0.prefetch(k), r1.prefetch(k);
    __m512 a = r0.codes(k), b = r1.codes(k);
    if constexpr (Scaled) a = _mm512_mul_ps(a, d0), b = _mm512_mul_ps(b, d1);
    for (int m = 0; m < M; ++m) {
      const __m512 xv = _mm512_loadu_ps(x + m * K + k);
      acc[2 * m] = _mm512_fmadd_ps(xv, a, acc[2 * m]);
      acc[2 * m + 1] = _mm512_fmadd_ps(xv, b, acc[2 * m + 1]);
    }
  }
}

// Output rows n, n + 1 against M <= 8 rows of x (K a multiple of 16). With one scale per row
// (per-channel int8, lmlab quantize's default) it is applied once to each sum, not to every weight:
// a quarter fewer instructions per weight.
template <int M>
inline void int8_pair(const float* x, const Int8Row& r0, const Int8Row& r1, float* y, int64_t n, int64_t N, int64_t K) {
  __m512 acc[16];
  for (int i = 0; i < 16; ++i) acc[i] = _mm512_setzero_ps();
  const int64_t G = r0.group;
  if (G == K) {
    const __m512 one = _mm512_set1_ps(1.0f);
    int8_span<M, false>(x, r0, r1, acc, 0, K, K, one, one);
    lmlab::store_pairs<M>(acc, y, n, N);
    for (int m = 0; m < M; ++m) y[m * N + n] *= r0.scale[0], y[m * N + n + 1] *= r1.scale[0];
    return;
  }
  for (int64_t g = 0; g < K / G; ++g)
    int8_span<M, true>(x, r0, r1, acc, g * G, (g + 1) * G, K, _mm512_set1_ps(r0.scale[g]), _mm512_set1_ps(r1.scale[g]));
  lmlab::store_pairs<M>(acc, y, n, N);
}

// Output rows n, n + 1 against M <= 8 rows of x (K a multiple of 32).
template <int M>
inline void int4_pair(const float* x, const Int4Row& r0, const Int4Row& r1, float* y, int64_t n, int64_t N, int64_t K) {
  __m512 acc[16];
  for (int i = 0; i < 16; ++i) acc[i] = _mm512_setzero_ps();
  const int64_t G = r0.group;
  for (int64_t g = 0, k = 0; k < K; ++g) {
    const __m512 t0 = r0.table(g), t1 = r1.table(g);
    for (const int64_t end = k + G; k < end; k += 32) {
      if ((k & 127) == 0) r0.prefetch(k), r1.prefetch(k);
      __m512 a0, a1, b0, b1;
      r0.block(k, t0, a0, a1);
      r1.block(k, t1, b0, b1);
      for (int m = 0; m < M; ++m) {
        const __m512 x0 = _mm512_loadu_ps(x + m * K + k), x1 = _mm512_loadu_ps(x + m * K + k + 16);
        acc[2 * m] = _mm512_fmadd_ps(x1, a1, _mm512_fmadd_ps(x0, a0, acc[2 * m]));
        acc[2 * m + 1] = _mm512_fmadd_ps(x1, b1, _mm512_fmadd_ps(x0, b0, acc[2 * m + 1]));
      }
    }
  }
  lmlab::store_pairs<M>(acc, y, n, N);
}

template <class Row>
using PairFn = void (*)(const float*, const Row&, const Row&, float*, int64_t, int64_t, int64_t);
constexpr PairFn<Int8Row> kInt8[9] = {nullptr,      int8_pair<1>, int8_pair<2>, int8_pair<3>, int8_pair<4>,
                                      int8_pair<5>, int8_pair<6>, int8_pair<7>, int8_pair<8>};
constexpr PairFn<Int4Row> kInt4[9] = {nullptr,      int4_pair<1>, int4_pair<2>, int4_pair<3>, int4_pair<4>,
                                      int4_pair<5>, int4_pair<6>, int4_pair<7>, int4_pair<8>};

// One layer's quantized weight: how to get row n, and how to dequantize rows into float32.
struct Int8Weight {
  const int8_t* q;
  const float* scale;
  int64_t K, groups;
  Int8Row row(int64_t n) const { return {q + n * K, scale + n * groups, K / groups}; }
  // group by group, so that finding a chunk's scale takes no division
  void dequantize(int64_t n, float* out) const {
    const Int8Row r = row(n);
    for (int64_t g = 0, k = 0; g < groups; ++g) {
      const __m512 d = _mm512_set1_ps(r.scale[g]);
      for (const int64_t end = k + r.group; k < end; k += 16) _mm512_storeu_ps(out + k, _mm512_mul_ps(r.codes(k), d));
    }
  }
};

struct Int4Weight {
  const uint8_t* q;
  const float* scale;
  const float* offset;
  int64_t K, groups;
  Int4Row row(int64_t n) const { return {q + n * K / 2, scale + n * groups, offset + n * groups, K / groups}; }
  void dequantize(int64_t n, float* out) const {
    const Int4Row r = row(n);
    for (int64_t g = 0, k = 0; g < groups; ++g) {
      const __m512 t = r.table(g);
      for (const int64_t end = k + r.group; k < end; k += 32) {
        __m512 lo, hi;
        r.block(k, t, lo, hi);
        _mm512_storeu_ps(out + k, lo);
        _mm512_storeu_ps(out + k + 16, hi);
      }
    }
  }
};

template <class Weight, class Row>
void skinny(const PairFn<Row>* pairs, const float* x, const Weight& w, float* y, int64_t M, int64_t N, int64_t K) {
  auto pair_all = [&](const Row& r0, const Row& r1, float* out, int64_t n, int64_t ldy) {
    for (int64_t m0 = 0; m0 < M; m0 += 8) pairs[M - m0 < 8 ? M - m0 : 8](x + m0 * K, r0, r1, out + m0 * ldy, n, ldy, K);
  };
  // pairs of weight rows split over threads; at least 16 pairs per task (small matrices stay whole)
  at::parallel_for(0, N / 2, 16, [&](int64_t p0, int64_t p1) {
    for (int64_t p = p0; p < p1; ++p) pair_all(w.row(2 * p), w.row(2 * p + 1), y, 2 * p, N);
  });
  if (N % 2) {  // the last row of an odd N: with itself as its pair, into scratch
    std::vector<float> scratch(2 * M);
    pair_all(w.row(N - 1), w.row(N - 1), scratch.data(), 0, 2);
    for (int64_t m = 0; m < M; ++m) y[m * N + N - 1] = scratch[2 * m];
  }
}

// y = x · Wᵀ by BLAS over dequantized tiles of kTileRows weight rows.
template <class Weight>
void tiled(const at::Tensor& x2, const Weight& w, at::Tensor& y2, int64_t N, int64_t K) {
  at::Tensor tile = at::empty({std::min(kTileRows, N), K}, x2.options());
  for (int64_t n0 = 0; n0 < N; n0 += kTileRows) {
    const int64_t rows = std::min(kTileRows, N - n0);
    float* t = tile.data_ptr<float>();
    at::parallel_for(0, rows, 8, [&](int64_t r0, int64_t r1) {
      for (int64_t r = r0; r < r1; ++r) w.dequantize(n0 + r, t + r * K);
    });
    at::Tensor out = y2.narrow(1, n0, rows);  // BLAS writes into y's columns (its row stride), no copy
    at::mm_out(out, x2, tile.narrow(0, 0, rows).t());
  }
}

at::Tensor run(const at::Tensor& x, int64_t N, int64_t K, const std::optional<at::Tensor>& bias,
               const auto& weight, const auto* pairs) {
  TORCH_CHECK(x.device().is_cpu() && x.scalar_type() == at::kFloat, "lmlab quantized linear: float32 CPU x only");
  TORCH_CHECK(x.dim() >= 1 && x.size(-1) == K, "lmlab quantized linear: x's last dimension must be ", K);
  const at::Tensor x2 = x.is_contiguous() ? x : x.contiguous();
  const int64_t M = K > 0 ? x2.numel() / K : 0;
  c10::SmallVector<int64_t, 4> shape(x.sizes().begin(), x.sizes().end());
  shape.back() = N;
  at::Tensor y = at::empty(shape, x.options());
  if (M == 0) return y;
  if (M <= kMaxSkinnyRows) {
    skinny(pairs, x2.data_ptr<float>(), weight, y.data_ptr<float>(), M, N, K);
  } else {
    at::Tensor y2 = y.view({M, N});
    tiled(x2.view({M, K}), weight, y2, N, K);
  }
  if (bias) {
    const at::Tensor b = bias->contiguous();
    TORCH_CHECK(b.scalar_type() == at::kFloat && b.numel() == N, "lmlab quantized linear: bias must be ", N, " float32 values");
    y.add_(b);
  }
  return y;
}

void check_scales(const at::Tensor& s, int64_t N, int64_t K, int64_t block, const char* name) {
  TORCH_CHECK(s.scalar_type() == at::kFloat && s.is_contiguous() && s.dim() == 2 && s.size(0) == N,
              "lmlab quantized linear: ", name, " must be contiguous float32 (N, groups)");
  const int64_t groups = s.size(1);
  TORCH_CHECK(groups > 0 && K % groups == 0 && (K / groups) % block == 0,
              "lmlab quantized linear: group size must divide K and be a multiple of ", block);
}

// int8 codes q (N, K), scale (N, K / G).
at::Tensor int8_linear(const at::Tensor& x, const at::Tensor& q, const at::Tensor& scale, const std::optional<at::Tensor>& bias) {
  TORCH_CHECK(q.scalar_type() == at::kChar && q.dim() == 2 && q.is_contiguous(), "lmlab::int8_linear: q must be contiguous int8 (N, K)");
  const int64_t N = q.size(0), K = q.size(1);
  check_scales(scale, N, K, 16, "scale");
  const Int8Weight w{q.data_ptr<int8_t>(), scale.data_ptr<float>(), K, scale.size(1)};
  return run(x, N, K, bias, w, kInt8);
}

// int4 codes packed two per byte q (N, K / 2), scale and offset (N, K / G).
at::Tensor int4_linear(const at::Tensor& x, const at::Tensor& q, const at::Tensor& scale, const at::Tensor& offset,
                       const std::optional<at::Tensor>& bias) {
  TORCH_CHECK(q.scalar_type() == at::kByte && q.dim() == 2 && q.is_contiguous(), "lmlab::int4_linear: q must be contiguous uint8 (N, K / 2)");
  const int64_t N = q.size(0), K = 2 * q.size(1);
  check_scales(scale, N, K, 32, "scale");
  check_scales(offset, N, K, 32, "offset");
  TORCH_CHECK(offset.size(1) == scale.size(1), "lmlab::int4_linear: scale and offset must have the same groups");
  const Int4Weight w{q.data_ptr<uint8_t>(), scale.data_ptr<float>(), offset.data_ptr<float>(), K, scale.size(1)};
  return run(x, N, K, bias, w, kInt4);
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(lmlab, m) {
  m.def("int8_linear(Tensor x, Tensor q, Tensor scale, Tensor? bias) -> Tensor");
  m.def("int4_linear(Tensor x, Tensor q, Tensor scale, Tensor offset, Tensor? bias) -> Tensor");
}
TORCH_LIBRARY_IMPL(lmlab, CPU, m) {
  m.impl("int8_linear", int8_linear);
  m.impl("int4_linear", int4_linear);
}

#endif  // __AVX512F__
