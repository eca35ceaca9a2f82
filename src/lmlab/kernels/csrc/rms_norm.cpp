// RMSNorm, forward and backward, one pass over each row (torch's CPU RMSNorm is a composite of
// pow, mean, rsqrt and multiplies, and its backward is another ten elementwise passes).
//
//   y = x * r * w,  r = 1 / sqrt(mean(x^2) + eps)
//   dx = r * (g*w) - x * (r^3 * sum(g*w*x) / C),  dw = sum over rows of g * x * r
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/zeros.h>
#include <torch/library.h>

#include <cmath>
#include <tuple>

#include "vec_loop.h"

namespace {

using lmlab::for_vectors;
using lmlab::load;
using lmlab::store;
using lmlab::Vec;

void check(const at::Tensor& x, const at::Tensor& w) {
  TORCH_CHECK(x.device().is_cpu() && x.scalar_type() == at::kFloat && w.scalar_type() == at::kFloat,
              "lmlab::rms_norm: float32 CPU tensors only");
  TORCH_CHECK(x.dim() == 2 && x.is_contiguous() && w.dim() == 1 && w.is_contiguous() && w.size(0) == x.size(1),
              "lmlab::rms_norm: x (N, C) and weight (C,), contiguous");
}

float sum_squares(const float* x, int64_t C) {
  Vec acc(0.f);
  for_vectors(C, [&](int64_t i, int64_t n) {
    const Vec v = load(x + i, n);
    acc = at::vec::fmadd(v, v, acc);
  });
  return lmlab::hsum(acc);
}

std::tuple<at::Tensor, at::Tensor> rms_norm(const at::Tensor& x, const at::Tensor& w, double eps) {
  check(x, w);
  const int64_t N = x.size(0), C = x.size(1);
  at::Tensor y = at::empty_like(x), rstd = at::empty({N}, x.options());
  const float *xp = x.data_ptr<float>(), *wp = w.data_ptr<float>();
  float *yp = y.data_ptr<float>(), *rp = rstd.data_ptr<float>();
  at::parallel_for(0, N, lmlab::row_grain(C), [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      const float* xr = xp + r * C;
      const float rs = 1.f / std::sqrt(sum_squares(xr, C) / C + static_cast<float>(eps));
      rp[r] = rs;
      const Vec rv(rs);
      for_vectors(C, [&](int64_t i, int64_t n) { store(load(xr + i, n) * rv * load(wp + i, n), yp + r * C + i, n); });
    }
  });
  return {y, rstd};
}

std::tuple<at::Tensor, at::Tensor> rms_norm_backward(const at::Tensor& g, const at::Tensor& x, const at::Tensor& w,
                                                     const at::Tensor& rstd, bool want_dw) {
  check(x, w);
  TORCH_CHECK(g.sizes() == x.sizes() && g.is_contiguous() && g.scalar_type() == at::kFloat,
              "lmlab::rms_norm_backward: grad must be float32, contiguous, shaped like x");
  const int64_t N = x.size(0), C = x.size(1);
  at::Tensor dx = at::empty_like(x);
  // each thread sums its rows' share of dw in its own row of `partial`; one sum at the end
  at::Tensor partial = at::zeros({want_dw ? at::get_num_threads() : 0, C}, x.options());
  const float *gp = g.data_ptr<float>(), *xp = x.data_ptr<float>(), *wp = w.data_ptr<float>();
  const float* rp = rstd.data_ptr<float>();
  float *dxp = dx.data_ptr<float>(), *pp = partial.data_ptr<float>();
  at::parallel_for(0, N, lmlab::row_grain(C), [&](int64_t r0, int64_t r1) {
    float* dw = want_dw ? pp + at::get_thread_num() * C : nullptr;
    for (int64_t r = r0; r < r1; ++r) {
      const float *gr = gp + r * C, *xr = xp + r * C;
      const float rs = rp[r];
      Vec acc(0.f);
      for_vectors(C, [&](int64_t i, int64_t n) {
        acc = at::vec::fmadd(load(gr + i, n) * load(wp + i, n), load(xr + i, n), acc);
      });
      const float dot = lmlab::hsum(acc);
      const Vec rv(rs), cv(rs * rs * rs * dot / C);
      for_vectors(C, [&](int64_t i, int64_t n) {
        const Vec gv = load(gr + i, n), xv = load(xr + i, n);
        store(gv * load(wp + i, n) * rv - xv * cv, dxp + r * C + i, n);
        if (dw) store(at::vec::fmadd(gv, xv * rv, load(dw + i, n)), dw + i, n);
      });
    }
  });
  return {dx, want_dw ? partial.sum(0) : at::Tensor()};
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(lmlab, m) {
  m.def("rms_norm(Tensor x, Tensor weight, float eps) -> (Tensor, Tensor)");
  m.def("rms_norm_backward(Tensor grad, Tensor x, Tensor weight, Tensor rstd, bool want_dw) -> (Tensor, Tensor)");
}
TORCH_LIBRARY_IMPL(lmlab, CPU, m) {
  m.impl("rms_norm", rms_norm);
  m.impl("rms_norm_backward", rms_norm_backward);
}
