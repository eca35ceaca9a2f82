// One row of the rotary embedding, shared by rope.cpp and attention.cpp.
#pragma once

#include "vec_loop.h"

namespace lmlab {

// y = x rotated by its position's angles, over D = 2d values. With sin signed as (-sin, sin) over
// the halves (see model/rope.py):
//   forward:  y[:d] = x[:d] * cos[:d] + x[d:] * sin[:d],  y[d:] = x[d:] * cos[d:] + x[:d] * sin[d:]
//   backward: the transpose, y[:d] = x[:d] * cos[:d] + x[d:] * sin[d:],  y[d:] = x[d:] * cos[d:] + x[:d] * sin[:d]
// x and y of type T (float or bfloat16), the angles of type C; arithmetic in float32. y may not alias x.
template <typename T, typename C>
inline void rotate_row(const T* x, const C* cos, const C* sin, T* y, int64_t d, bool backward) {
  // backward reads the sine of the other half: sin[d:] beside the first half, sin[:d] beside the second
  const int64_t s_first = backward ? d : 0, s_second = backward ? 0 : d;
  for_vectors(d, [&](int64_t i, int64_t n) {
    const Vec lo = load_as_float(x + i, n), hi = load_as_float(x + d + i, n);
    store_from_float(lo * load_as_float(cos + i, n) + hi * load_as_float(sin + s_first + i, n), y + i, n);
    store_from_float(hi * load_as_float(cos + d + i, n) + lo * load_as_float(sin + s_second + i, n), y + d + i, n);
  });
}

}  // namespace lmlab
