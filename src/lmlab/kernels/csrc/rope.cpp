// Rotary position embedding of queries or keys in one pass, forward or backward; float32, or
// bfloat16 queries/keys (autocast's) with float32 or bfloat16 angles, computed in float32.
//
// The math of a row is in rotate.h.
// x is (B, H, T, D) in any layout whose rows of D are contiguous: queries and keys arrive as
// transposed views of the projection's (B, T, H, D) output, and the result keeps x's layout.
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty_like.h>
#include <torch/library.h>

#include "rotate.h"

namespace {

// x and y of type T (float or bfloat16), the angles of type C; arithmetic in float32
template <typename T, typename C>
void rope_impl(const at::Tensor& x, const at::Tensor& cos, const at::Tensor& sin, at::Tensor& y, bool backward) {
  const int64_t B = x.size(0), H = x.size(1), T_ = x.size(2), D = x.size(3), d = D / 2;
  const int64_t xb = x.stride(0), xh = x.stride(1), xt = x.stride(2);
  const int64_t yb = y.stride(0), yh = y.stride(1), yt = y.stride(2);
  const int64_t cb = cos.size(0) == 1 ? 0 : cos.stride(0), ct = cos.stride(2);
  const T* xp = x.data_ptr<T>();
  const C *cp = cos.data_ptr<C>(), *sp = sin.data_ptr<C>();
  T* yp = y.data_ptr<T>();
  at::parallel_for(0, B * H * T_, lmlab::row_grain(D), [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      const int64_t b = r / (H * T_), h = (r / T_) % H, t = r % T_;
      const int64_t co = b * cb + t * ct;
      lmlab::rotate_row(xp + b * xb + h * xh + t * xt, cp + co, sp + co, yp + b * yb + h * yh + t * yt, d, backward);
    }
  });
}

at::Tensor rope(const at::Tensor& x, const at::Tensor& cos, const at::Tensor& sin, bool backward) {
  const auto xt = x.scalar_type(), ct = cos.scalar_type();
  TORCH_CHECK(x.device().is_cpu() && (xt == at::kFloat || xt == at::kBFloat16) && sin.scalar_type() == ct &&
                  (ct == at::kFloat || ct == xt),
              "lmlab::rope: float32 or bfloat16 CPU tensors; cos and sin float32 or x's dtype");
  TORCH_CHECK(x.dim() == 4 && cos.dim() == 4 && sin.sizes() == cos.sizes() && sin.strides() == cos.strides(),
              "lmlab::rope: x (B, H, T, D), cos and sin (B or 1, 1, T, D) alike");
  const int64_t B = x.size(0), T = x.size(2), D = x.size(3);
  TORCH_CHECK(D % 2 == 0 && cos.size(3) == D && cos.size(2) == T && cos.size(1) == 1 &&
                  (cos.size(0) == B || cos.size(0) == 1),
              "lmlab::rope: cos/sin must be (B or 1, 1, T, D) for x of shape (B, H, T, D)");
  TORCH_CHECK(x.stride(3) == 1 && cos.stride(3) == 1, "lmlab::rope: rows of D must be contiguous");
  at::Tensor y = at::empty_like(x);  // x's layout where x is dense, else contiguous
  if (xt == at::kFloat)
    rope_impl<float, float>(x, cos, sin, y, backward);
  else if (ct == at::kFloat)
    rope_impl<c10::BFloat16, float>(x, cos, sin, y, backward);
  else
    rope_impl<c10::BFloat16, c10::BFloat16>(x, cos, sin, y, backward);
  return y;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(lmlab, m) { m.def("rope(Tensor x, Tensor cos, Tensor sin, bool backward) -> Tensor"); }
TORCH_LIBRARY_IMPL(lmlab, CPU, m) { m.impl("rope", rope); }
