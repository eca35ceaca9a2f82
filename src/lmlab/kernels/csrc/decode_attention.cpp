// Attention for one query per sequence (a decode step), grouped-query heads, a mask over the keys.
//
// torch's CPU flash attention tiles queries and keys for long sequences; with a single query it
// spends ~45 us per call at batch 1 and ~145 us at batch 8 (SmolLM2, 192 keys) on set-up, several
// times the arithmetic. This kernel does the arithmetic directly: per (sequence, head), scores
// against every key, a softmax, and the weighted sum of the values, one task per pair, split over
// torch's intra-op threads when there is enough work to share.
// written with AVX-512 intrinsics: on other CPUs the library is built without this operator
#if defined(__AVX512F__)

#include <ATen/Parallel.h>
#include <ATen/cpu/vec/vec.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include "simd.h"

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <vector>

namespace {

using lmlab::tail_mask;
using Vec = at::vec::Vectorized<float>;

// q · k[s] for 16 keys s0 .. s0 + 15 (rows `ks` floats apart): one vector of 16 scores.
inline __m512 dot16(const float* q, const float* k, int64_t ks, int64_t D) {
  __m512 acc[16];
  for (int i = 0; i < 16; ++i) acc[i] = _mm512_setzero_ps();
  int64_t d = 0;
  for (; d + 16 <= D; d += 16) {
    const __m512 qv = _mm512_loadu_ps(q + d);
    for (int i = 0; i < 16; ++i) acc[i] = _mm512_fmadd_ps(qv, _mm512_loadu_ps(k + i * ks + d), acc[i]);
  }
  if (d < D) {
    const __mmask16 t = tail_mask(D - d);
    const __m512 qv = _mm512_maskz_loadu_ps(t, q + d);
    for (int i = 0; i < 16; ++i) acc[i] = _mm512_fmadd_ps(qv, _mm512_maskz_loadu_ps(t, k + i * ks + d), acc[i]);
  }
  // sum16 puts key 4r + c's score in lane 4c + r: undo that permutation
  const __m512i order = _mm512_set_epi32(15, 11, 7, 3, 14, 10, 6, 2, 13, 9, 5, 1, 12, 8, 4, 0);
  return _mm512_permutexvar_ps(order, lmlab::sum16(acc));
}

inline float dot(const float* a, const float* b, int64_t D) {
  __m512 acc = _mm512_setzero_ps();
  int64_t d = 0;
  for (; d + 16 <= D; d += 16) acc = _mm512_fmadd_ps(_mm512_loadu_ps(a + d), _mm512_loadu_ps(b + d), acc);
  if (d < D) {
    const __mmask16 t = tail_mask(D - d);
    acc = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(t, a + d), _mm512_maskz_loadu_ps(t, b + d), acc);
  }
  return _mm512_reduce_add_ps(acc);
}

// o = sum over s of w[s] * v[s] (rows `vs` floats apart), held in registers 64 floats of o at a
// time, two keys interleaved so that the additions do not wait on each other.
inline void weighted_sum(const float* w, const float* v, int64_t vs, int64_t S, int64_t D, float* o) {
  for (int64_t d0 = 0; d0 < D; d0 += 64) {
    __mmask16 m[4];
    for (int i = 0; i < 4; ++i) {
      const int64_t left = D - d0 - 16 * i;
      m[i] = left >= 16 ? __mmask16(0xFFFF) : left > 0 ? tail_mask(left) : __mmask16(0);
    }
    __m512 a[8];
    for (int i = 0; i < 8; ++i) a[i] = _mm512_setzero_ps();
    int64_t s = 0;
    for (; s + 2 <= S; s += 2) {
      const __m512 w0 = _mm512_set1_ps(w[s]), w1 = _mm512_set1_ps(w[s + 1]);
      const float* v0 = v + s * vs + d0;
      const float* v1 = v0 + vs;
      for (int i = 0; i < 4; ++i) {
        a[i] = _mm512_fmadd_ps(w0, _mm512_maskz_loadu_ps(m[i], v0 + 16 * i), a[i]);
        a[4 + i] = _mm512_fmadd_ps(w1, _mm512_maskz_loadu_ps(m[i], v1 + 16 * i), a[4 + i]);
      }
    }
    if (s < S) {
      const __m512 w0 = _mm512_set1_ps(w[s]);
      for (int i = 0; i < 4; ++i) a[i] = _mm512_fmadd_ps(w0, _mm512_maskz_loadu_ps(m[i], v + s * vs + d0 + 16 * i), a[i]);
    }
    for (int i = 0; i < 4; ++i) _mm512_mask_storeu_ps(o + d0 + 16 * i, m[i], _mm512_add_ps(a[i], a[4 + i]));
  }
}

// q (B, H, 1, D); k, v (B, Hkv, S, D) with unit stride in D; mask broadcast to (B, H, 1, S) as
// strides (bool: attend where true; float: added to the scores); out (B, H, 1, D) contiguous.
at::Tensor decode_attention(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                            const std::optional<at::Tensor>& mask, double scale) {
  TORCH_CHECK(q.dim() == 4 && k.dim() == 4 && v.dim() == 4 && q.size(2) == 1,
              "lmlab::decode_attention: q (B, H, 1, D), k and v (B, Hkv, S, D)");
  TORCH_CHECK(q.scalar_type() == at::kFloat && k.scalar_type() == at::kFloat && v.scalar_type() == at::kFloat,
              "lmlab::decode_attention: float32 only");
  const int64_t B = q.size(0), H = q.size(1), D = q.size(3), Hkv = k.size(1), S = k.size(2);
  TORCH_CHECK(k.size(0) == B && v.size(0) == B && v.size(1) == Hkv && v.size(2) == S && k.size(3) == D &&
                  v.size(3) == D && H % Hkv == 0,
              "lmlab::decode_attention: shapes do not match");
  TORCH_CHECK(k.stride(3) == 1 && v.stride(3) == 1, "lmlab::decode_attention: k and v need unit stride in D");
  const at::Tensor qc = q.contiguous();
  at::Tensor out = at::empty({B, H, 1, D}, q.options());
  const int64_t group = H / Hkv;

  const bool has_mask = mask.has_value() && mask->defined();
  at::Tensor m;
  int64_t mb = 0, mh = 0, ms = 0;
  if (has_mask) {
    m = *mask;
    TORCH_CHECK(m.dim() == 4 && (m.size(0) == 1 || m.size(0) == B) && (m.size(1) == 1 || m.size(1) == H) &&
                    m.size(2) == 1 && m.size(3) == S,
                "lmlab::decode_attention: mask must broadcast to (B, H, 1, S)");
    TORCH_CHECK(m.scalar_type() == at::kBool || m.scalar_type() == at::kFloat,
                "lmlab::decode_attention: mask must be bool or float32");
    // broadcast by hand (a zero stride over size-1 dimensions): expand() is a dispatched op
    mb = m.size(0) == 1 ? 0 : m.stride(0), mh = m.size(1) == 1 ? 0 : m.stride(1), ms = m.stride(3);
  }
  const bool bool_mask = has_mask && m.scalar_type() == at::kBool;
  const bool* mbool = bool_mask ? m.data_ptr<bool>() : nullptr;
  const float* mfloat = has_mask && !bool_mask ? m.data_ptr<float>() : nullptr;

  const float* qp = qc.data_ptr<float>();
  const float* kp = k.data_ptr<float>();
  const float* vp = v.data_ptr<float>();
  float* op = out.data_ptr<float>();
  const int64_t kb = k.stride(0), kh = k.stride(1), ks = k.stride(2);
  const int64_t vb = v.stride(0), vh = v.stride(1), vs = v.stride(2);
  const float sc = static_cast<float>(scale);
  constexpr float kNegInf = -std::numeric_limits<float>::infinity();

  // a task is one (sequence, head); share them over threads only when there is real work
  const int64_t grain = std::max<int64_t>(1, (int64_t(1) << 16) / std::max<int64_t>(1, S * D));
  at::parallel_for(0, B * H, grain, [&](int64_t t0, int64_t t1) {
    std::vector<float> p(S);
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t b = t / H, h = t % H, g = h / group;
      const float* qv = qp + t * D;
      const float* kr = kp + b * kb + g * kh;
      const float* vr = vp + b * vb + g * vh;
      // keys after the last visible one are skipped, not read: a static KV cache's unwritten slots
      const int64_t mrow = b * mb + h * mh;
      int64_t S1 = S;
      if (mbool)
        while (S1 > 0 && !mbool[mrow + (S1 - 1) * ms]) --S1;
      if (mfloat)
        while (S1 > 0 && mfloat[mrow + (S1 - 1) * ms] == kNegInf) --S1;
      // scores, scaled; masked keys get -inf
      int64_t s = 0;
      for (; s + 16 <= S1; s += 16) _mm512_storeu_ps(p.data() + s, _mm512_mul_ps(dot16(qv, kr + s * ks, ks, D), _mm512_set1_ps(sc)));
      for (; s < S1; ++s) p[s] = dot(qv, kr + s * ks, D) * sc;
      if (mbool)
        for (s = 0; s < S1; ++s) p[s] = mbool[mrow + s * ms] ? p[s] : kNegInf;
      if (mfloat)
        for (s = 0; s < S1; ++s) p[s] += mfloat[mrow + s * ms];
      // softmax over the keys
      float top = kNegInf;
      for (s = 0; s < S1; ++s) top = std::max(top, p[s]);
      Vec total_v(0.f);
      s = 0;
      for (; s + Vec::size() <= S1; s += Vec::size()) {
        const Vec e = (Vec::loadu(p.data() + s) - Vec(top)).exp_u20();
        e.store(p.data() + s);
        total_v = total_v + e;
      }
      float total = _mm512_reduce_add_ps(__m512(total_v));
      for (; s < S1; ++s) total += (p[s] = std::exp(p[s] - top));
      // weighted sum of the values (a row that sees no key gets zeros)
      const float inv = 1.f / total;
      for (s = 0; s < S1; ++s) p[s] *= inv;
      weighted_sum(p.data(), vr, vs, S1, D, op + t * D);
    }
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(lmlab, m) {
  m.def("decode_attention(Tensor q, Tensor k, Tensor v, Tensor? mask, float scale) -> Tensor");
}
TORCH_LIBRARY_IMPL(lmlab, CPU, m) { m.impl("decode_attention", decode_attention); }

#endif  // __AVX512F__
