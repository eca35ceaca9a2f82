// SwiGLU's gate, silu(g) * u, forward and backward in one pass each (torch runs silu, a multiply,
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
using lmlab::load;
using lmlab::store;
using lmlab::Vec;

constexpr int64_t kGrain = 32768;

void check(const at::Tensor& a, const at::Tensor& b, const char* what) {
  TORCH_CHECK(a.device().is_cpu() && a.scalar_type() == at::kFloat && b.scalar_type() == at::kFloat, what,
              ": float32 CPU tensors only");
  TORCH_CHECK(a.sizes() == b.sizes() && a.is_contiguous() && b.is_contiguous(), what,
              ": tensors of one shape, contiguous");
}

inline Vec sigmoid(const Vec& g) { return Vec(1.f) / (Vec(1.f) + g.neg().exp()); }

at::Tensor swiglu(const at::Tensor& g, const at::Tensor& u) {
  check(g, u, "lmlab::swiglu");
  at::Tensor h = at::empty_like(g);
  const float *gp = g.data_ptr<float>(), *up = u.data_ptr<float>();
  float* hp = h.data_ptr<float>();
  at::parallel_for(0, g.numel(), kGrain, [&](int64_t a, int64_t b) {
    for_vectors(b - a, [&](int64_t i, int64_t n) {
      const Vec gv = load(gp + a + i, n);
      store(gv * sigmoid(gv) * load(up + a + i, n), hp + a + i, n);
    });
  });
  return h;
}

std::tuple<at::Tensor, at::Tensor> swiglu_backward(const at::Tensor& dh, const at::Tensor& g, const at::Tensor& u) {
  check(g, u, "lmlab::swiglu_backward");
  check(dh, g, "lmlab::swiglu_backward");
  at::Tensor dg = at::empty_like(g), du = at::empty_like(u);
  const float *dhp = dh.data_ptr<float>(), *gp = g.data_ptr<float>(), *up = u.data_ptr<float>();
  float *dgp = dg.data_ptr<float>(), *dup = du.data_ptr<float>();
  at::parallel_for(0, g.numel(), kGrain, [&](int64_t a, int64_t b) {
    for_vectors(b - a, [&](int64_t i, int64_t n) {
      const int64_t o = a + i;
      const Vec d = load(dhp + o, n), gv = load(gp + o, n), s = sigmoid(gv);
      const Vec silu = gv * s;
      store(d * load(up + o, n) * s * (Vec(1.f) + gv - silu), dgp + o, n);
      store(d * silu, dup + o, n);
    });
  });
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
