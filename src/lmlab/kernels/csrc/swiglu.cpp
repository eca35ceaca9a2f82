// SwiGLU's gate, silu(g) * u, forward and backward in one pass each, float32 or bfloat16 (torch runs silu, a multiply,
// and in backward two multiplies and silu_backward, each a pass over the (tokens x d_ff) tensors).
//
//   h = g * s * u,  s = sigmoid(g)
//   dg = dh * u * s * (1 + g * (1 - s)),  du = dh * g * s
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty_like.h>
#include <torch/library.h>

#include <tuple>

#include "vec_loop.h"

namespace {

using lmlab::for_vectors;
using lmlab::load_as_float;
using lmlab::store_from_float;
using lmlab::Vec;

constexpr int64_t kGrain = 32768;

void check(const at::Tensor& a, const at::Tensor& b, const char* what) {
  TORCH_CHECK(a.device().is_cpu() && (a.scalar_type() == at::kFloat || a.scalar_type() == at::kBFloat16) &&
                  b.scalar_type() == a.scalar_type(),
              what, ": float32 or bfloat16 CPU tensors of one dtype only");
  TORCH_CHECK(a.sizes() == b.sizes() && a.is_contiguous() && b.is_contiguous(), what,
              ": tensors of one shape, contiguous");
}

inline Vec sigmoid(const Vec& g) { return Vec(1.f) / (Vec(1.f) + g.neg().exp()); }

// bfloat16 tensors are computed in float32 and rounded once, at the store
template <typename T>
void swiglu_impl(const T* gp, const T* up, T* hp, int64_t numel) {
  at::parallel_for(0, numel, kGrain, [&](int64_t a, int64_t b) {
    for_vectors(b - a, [&](int64_t i, int64_t n) {
      const Vec gv = load_as_float(gp + a + i, n);
      store_from_float(gv * sigmoid(gv) * load_as_float(up + a + i, n), hp + a + i, n);
    });
  });
}

template <typename T>
void swiglu_backward_impl(const T* dhp, const T* gp, const T* up, T* dgp, T* dup, int64_t numel) {
  at::parallel_for(0, numel, kGrain, [&](int64_t a, int64_t b) {
    for_vectors(b - a, [&](int64_t i, int64_t n) {
      const int64_t o = a + i;
      const Vec d = load_as_float(dhp + o, n), gv = load_as_float(gp + o, n), s = sigmoid(gv);
      const Vec silu = gv * s;
      store_from_float(d * load_as_float(up + o, n) * s * (Vec(1.f) + gv - silu), dgp + o, n);
      store_from_float(d * silu, dup + o, n);
    });
  });
}

at::Tensor swiglu(const at::Tensor& g, const at::Tensor& u) {
  check(g, u, "lmlab::swiglu");
  at::Tensor h = at::empty_like(g);
  if (g.scalar_type() == at::kFloat)
    swiglu_impl(g.data_ptr<float>(), u.data_ptr<float>(), h.data_ptr<float>(), g.numel());
  else
    swiglu_impl(g.data_ptr<c10::BFloat16>(), u.data_ptr<c10::BFloat16>(), h.data_ptr<c10::BFloat16>(), g.numel());
  return h;
}

std::tuple<at::Tensor, at::Tensor> swiglu_backward(const at::Tensor& dh, const at::Tensor& g, const at::Tensor& u) {
  check(g, u, "lmlab::swiglu_backward");
  check(dh, g, "lmlab::swiglu_backward");
  at::Tensor dg = at::empty_like(g), du = at::empty_like(u);
  if (g.scalar_type() == at::kFloat)
    swiglu_backward_impl(dh.data_ptr<float>(), g.data_ptr<float>(), u.data_ptr<float>(), dg.data_ptr<float>(),
                         du.data_ptr<float>(), g.numel());
  else
    swiglu_backward_impl(dh.data_ptr<c10::BFloat16>(), g.data_ptr<c10::BFloat16>(), u.data_ptr<c10::BFloat16>(),
                         dg.data_ptr<c10::BFloat16>(), du.data_ptr<c10::BFloat16>(), g.numel());
  return {dg, du};
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(lmlab, m) {
  m.def("swiglu(Tensor gate, Tensor up) -> Tensor");
  m.def("swiglu_backward(Tensor grad, Tensor gate, Tensor up) -> (Tensor, Tensor)");
}
TORCH_LIBRARY_IMPL(lmlab, CPU, m) {
  m.impl("swiglu", swiglu);
  m.impl("swiglu_backward", swiglu_backward);
}
