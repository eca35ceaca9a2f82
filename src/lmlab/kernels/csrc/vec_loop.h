// Helpers for elementwise kernels written with ATen's portable vectors (at::vec::Vectorized).
#pragma once

#include <ATen/Parallel.h>
#include <ATen/cpu/vec/functional.h>
#include <c10/util/BFloat16.h>
#include <ATen/cpu/vec/vec.h>

#include <algorithm>
#include <cstdint>
#include <limits>

namespace lmlab {

using Vec = at::vec::Vectorized<float>;

// f(offset, count) over [0, n) in vector-sized pieces; the last piece may be shorter (count lanes
// loaded and stored, the rest zero), so callers use Vec::loadu(p, count) / store(p, count).
template <typename F>
inline void for_vectors(int64_t n, const F& f) {
  constexpr int64_t V = Vec::size();
  int64_t i = 0;
  for (; i + V <= n; i += V) f(i, V);
  if (i < n) f(i, n - i);
}

inline float hsum(const Vec& v) {
  return at::vec::vec_reduce_all<float>([](Vec a, Vec b) { return a + b; }, v);
}

inline Vec load(const float* p, int64_t count) { return count == Vec::size() ? Vec::loadu(p) : Vec::loadu(p, count); }

inline void store(const Vec& v, float* p, int64_t count) {
  if (count == Vec::size())
    v.store(p);
  else
    v.store(p, count);
}

// Loads and stores of n <= Vec::size() elements of float or bfloat16 as a float vector (bfloat16 is
// widened on load and rounded to nearest-even on store).
inline Vec load_as_float(const float* p, int64_t n) { return load(p, n); }
inline Vec load_as_float(const c10::BFloat16* p, int64_t n) {
  if (n == Vec::size()) {
    Vec out;
    at::vec::load_to_float(p, out);
    return out;
  }
  float tmp[Vec::size()] = {};
  for (int64_t i = 0; i < n; ++i) tmp[i] = static_cast<float>(p[i]);
  return Vec::loadu(tmp);
}
inline void store_from_float(const Vec& v, float* p, int64_t n) { store(v, p, n); }
inline void store_from_float(const Vec& v, c10::BFloat16* p, int64_t n) {
  at::vec::convert_from_float<c10::BFloat16>(v, v).store(p, n);
}

// Largest of row[0, n) (-inf for n = 0).
inline float row_max(const float* row, int64_t n) {
  constexpr float kInf = std::numeric_limits<float>::infinity();
  Vec mx(-kInf);
  for_vectors(n, [&](int64_t i, int64_t c) {
    const Vec v = load(row + i, c);
    mx = at::vec::maximum(mx, c == Vec::size() ? v : Vec::set(Vec(-kInf), v, c));
  });
  return at::vec::vec_reduce_all<float>([](Vec a, Vec b) { return at::vec::maximum(a, b); }, mx);
}

// sum of exp(row[i] - m) over [0, n); with `write`, each exp(row[i] - m) replaces row[i].
inline float exp_sum(float* row, int64_t n, float m, bool write) {
  const Vec mv(m);
  Vec z(0.f);
  for_vectors(n, [&](int64_t i, int64_t c) {
    Vec p = (load(row + i, c) - mv).exp_u20();
    if (c < Vec::size()) p = Vec::set(Vec(0.f), p, c);
    z = z + p;
    if (write) store(p, row + i, c);
  });
  return hsum(z);
}

// Rows per parallel task: at least ~16k floats of work, so small tensors stay on one thread.
inline int64_t row_grain(int64_t row_len) { return std::max<int64_t>(1, 16384 / std::max<int64_t>(row_len, 1)); }

}  // namespace lmlab
