// Rotary position embedding of queries or keys in one pass, forward or backward.
//
// With d = head_dim / 2 and sin signed as (-sin, sin) over the halves (see model/rope.py):
//   forward:  y[:d] = x[:d] * cos[:d] + x[d:] * sin[:d],  y[d:] = x[d:] * cos[d:] + x[:d] * sin[d:]
//   backward: the transpose, dx[:d] = g[:d] * cos[:d] + g[d:] * sin[d:],  dx[d:] = g[d:] * cos[d:] + g[:d] * sin[:d]
// x is (B, H, T, D) in any layout whose rows of D are contiguous: queries and keys arrive as
// transposed views of the projection's (B, T, H, D) output, and the result keeps x's layout.
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty_like.h>
#include <torch/library.h>

#include "vec_loop.h"

namespace {

using lmlab::load;
using lmlab::store;
using lmlab::Vec;

at::Tensor rope(const at::Tensor& x, const at::Tensor& cos, const at::Tensor& sin, bool backward) {
  TORCH_CHECK(x.device().is_cpu() && x.scalar_type() == at::kFloat && cos.scalar_type() == at::kFloat &&
                  sin.scalar_type() == at::kFloat,
              "lmlab::rope: float32 CPU tensors only");
  TORCH_CHECK(x.dim() == 4 && cos.dim() == 4 && sin.sizes() == cos.sizes() && sin.strides() == cos.strides(),
              "lmlab::rope: x (B, H, T, D), cos and sin (B or 1, 1, T, D) alike");
  const int64_t B = x.size(0), H = x.size(1), T = x.size(2), D = x.size(3), d = D / 2;
  TORCH_CHECK(D % 2 == 0 && cos.size(3) == D && cos.size(2) == T && cos.size(1) == 1 &&
                  (cos.size(0) == B || cos.size(0) == 1),
              "lmlab::rope: cos/sin must be (B or 1, 1, T, D) for x of shape (B, H, T, D)");
  TORCH_CHECK(x.stride(3) == 1 && cos.stride(3) == 1, "lmlab::rope: rows of D must be contiguous");
  at::Tensor y = at::empty_like(x);  // x's layout where x is dense, else contiguous
  const int64_t xb = x.stride(0), xh = x.stride(1), xt = x.stride(2);
  const int64_t yb = y.stride(0), yh = y.stride(1), yt = y.stride(2);
  const int64_t cb = cos.size(0) == 1 ? 0 : cos.stride(0), ct = cos.stride(2);
  const float *xp = x.data_ptr<float>(), *cp = cos.data_ptr<float>(), *sp = sin.data_ptr<float>();
  float* yp = y.data_ptr<float>();
  // backward reads the sine of the other half: sin[d:] beside the first half, sin[:d] beside the second
  const int64_t s_first = backward ? d : 0, s_second = backward ? 0 : d;
  at::parallel_for(0, B * H * T, lmlab::row_grain(D), [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      const int64_t b = r / (H * T), h = (r / T) % H, t = r % T;
      const int64_t xo = b * xb + h * xh + t * xt, co = b * cb + t * ct;
      const float *xr = xp + xo, *c = cp + co, *s = sp + co;
      float* yr = yp + b * yb + h * yh + t * yt;
      lmlab::for_vectors(d, [&](int64_t i, int64_t n) {
        const Vec lo = load(xr + i, n), hi = load(xr + d + i, n);
        store(lo * load(c + i, n) + hi * load(s + s_first + i, n), yr + i, n);
        store(hi * load(c + d + i, n) + lo * load(s + s_second + i, n), yr + d + i, n);
      });
    }
  });
  return y;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(lmlab, m) { m.def("rope(Tensor x, Tensor cos, Tensor sin, bool backward) -> Tensor"); }
TORCH_LIBRARY_IMPL(lmlab, CPU, m) { m.impl("rope", rope); }
