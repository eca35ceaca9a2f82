// Softmax cross-entropy of a chunk of logits, turning the logits into their gradient in place.
//
// Per row of V logits l with target t, row weight w (the loss's d/d row) and label smoothing e:
//   loss = (1 - e) * (lse - l[t]) + e * (lse - mean(l)),  lse = log sum exp(l)
//   grad = w * (softmax(l) - (1 - e) * onehot(t) - e / V)
// Torch needs some eight passes over the chunk for this (max, subtract, exp, sum, gather, scale,
// scatter, ...); here one row at a time: a pass for the max, one for exp and its sum, one to
// scale, the last two while the row (32 KB at V = 8192) is still in cache.
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <cmath>
#include <limits>

#include "vec_loop.h"

namespace {

using lmlab::for_vectors;
using lmlab::load;
using lmlab::store;
using lmlab::Vec;

at::Tensor softmax_xent_(at::Tensor& logits, const at::Tensor& targets, const std::optional<at::Tensor>& row_weight,
                         double label_smoothing) {
  TORCH_CHECK(logits.device().is_cpu() && logits.scalar_type() == at::kFloat && logits.dim() == 2 &&
                  logits.is_contiguous(),
              "lmlab::softmax_xent_: logits must be (rows, V) float32, contiguous, on the CPU");
  const int64_t R = logits.size(0), V = logits.size(1);
  TORCH_CHECK(targets.scalar_type() == at::kLong && targets.dim() == 1 && targets.size(0) == R && targets.is_contiguous(),
              "lmlab::softmax_xent_: targets must be (rows,) int64");
  const float* wp = nullptr;
  if (row_weight) {
    TORCH_CHECK(row_weight->scalar_type() == at::kFloat && row_weight->numel() == R && row_weight->is_contiguous(),
                "lmlab::softmax_xent_: row_weight must be (rows,) float32");
    wp = row_weight->data_ptr<float>();
  }
  at::Tensor loss = at::empty({R}, logits.options());
  float* lp = logits.data_ptr<float>();
  const int64_t* tp = targets.data_ptr<int64_t>();
  float* out = loss.data_ptr<float>();
  const float e = static_cast<float>(label_smoothing);
  at::parallel_for(0, R, lmlab::row_grain(V), [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      float* row = lp + r * V;
      const int64_t t = tp[r];
      TORCH_CHECK(t >= 0 && t < V, "lmlab::softmax_xent_: target ", t, " is out of range for ", V, " classes");
      const float m = lmlab::row_max(row, V), picked = row[t];
      // the smoothing term only when smoothing (mean(l) is -inf where a logit is: masked classes),
      // read before the row turns into its gradient
      Vec sum(0.f);
      if (e != 0.f) for_vectors(V, [&](int64_t i, int64_t n) { sum = sum + load(row + i, n); });
      const float mean = lmlab::hsum(sum) / V;
      const float zs = lmlab::exp_sum(row, V, m, wp != nullptr), lse = m + std::log(zs);
      out[r] = e == 0.f ? lse - picked : (1.f - e) * (lse - picked) + e * (lse - mean);
      if (!wp) continue;
      const Vec scale(wp[r] / zs), shift(wp[r] * e / V);
      for_vectors(V, [&](int64_t i, int64_t n) { store(load(row + i, n) * scale - shift, row + i, n); });
      row[t] += wp[r] * (e - 1.f);
    }
  });
  return loss;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(lmlab, m) {
  m.def("softmax_xent_(Tensor(a!) logits, Tensor targets, Tensor? row_weight, float label_smoothing) -> Tensor");
}
TORCH_LIBRARY_IMPL(lmlab, CPU, m) { m.impl("softmax_xent_", softmax_xent_); }
