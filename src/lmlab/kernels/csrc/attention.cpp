// Scaled dot-product attention for training on the CPU, forward and backward, float32; causal or
// not, no mask, no dropout; grouped key/value heads (GQA/MQA).
//
// The work is the FlashAttention recipe, with blocks sized for a CPU core rather than a GPU's
// shared memory. Queries go in blocks of kBlock rows; for each block the scores against every key
// it may see are one GEMM into a per-thread buffer (kBlock x S floats, in L2), a softmax in place,
// and one GEMM against the values. Only the log-sum-exp per row is saved, so memory stays linear
// in the sequence; the backward recomputes the scores. Causal blocks stop at their diagonal, which
// skips ~40% of the work at T = 256 (more at longer T).
//
// ATen's own CPU flash attention does the same work with an online softmax over key blocks; at the
// sizes a small model trains with (T = 256, head_dim = 64) its backward runs at well under half the
// GEMM peak. Here each (batch, key/value head) is one thread's task in the backward, so gradients
// of keys and values accumulate without atomics or per-thread copies, and the GEMMs go straight to
// the BLAS torch links (MKL's sgemm; called from inside a parallel region, it runs on that thread).
//
// Layouts: q (B, H, T, D), k and v (B, Hkv, S, D) in any layout whose rows of D are contiguous (the
// transposed views of the projections' (B, T, H, D) outputs). Results come back in that projection
// layout, as (B, H, T, D) views of (B, T, H, D) memory, so the output projection and the input
// projections' backward read them without a copy.
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <cmath>
#include <limits>

#include "vec_loop.h"

// weak: a torch built without a BLAS leaves it null, and the operators are then not registered
extern "C" __attribute__((weak)) void sgemm_(const char* transa, const char* transb, const int* m, const int* n, const int* k,
                       const float* alpha, const float* a, const int* lda, const float* b, const int* ldb,
                       const float* beta, float* c, const int* ldc);

namespace {

using lmlab::for_vectors;
using lmlab::load;
using lmlab::store;
using lmlab::Vec;

constexpr int64_t kBlock = 64;  // query rows per block: large enough for efficient GEMMs, small enough to skip masked work

// Row-major C (m x n) = alpha * op(A) op(B) + beta * C. Read column-major, a row-major matrix is its
// transpose, so this is column-major C^T = op(B)^T op(A)^T: the operands swap, the flags carry over.
void gemm(bool ta, bool tb, int64_t m, int64_t n, int64_t k, float alpha, const float* a, int64_t lda, const float* b,
          int64_t ldb, float beta, float* c, int64_t ldc) {
  const char ca = ta ? 'T' : 'N', cb = tb ? 'T' : 'N';
  const int im = m, in = n, ik = k, ilda = lda, ildb = ldb, ildc = ldc;
  sgemm_(&cb, &ca, &in, &im, &ik, &alpha, b, &ildb, a, &ilda, &beta, c, &ildc);
}

struct Dims {
  int64_t B, H, Hkv, T, S, D;
};

// The keys query row `r` may see: all S, or (causal, T == S) those up to and including itself.
inline int64_t visible(bool causal, int64_t r, int64_t S) { return causal ? std::min(r + 1, S) : S; }

// Keys any row of the block [r0, r0 + rows) may see: the width of the block's score matrix.
inline int64_t block_width(bool causal, int64_t r0, int64_t rows, int64_t S) { return visible(causal, r0 + rows - 1, S); }

// Scores of a block (rows x e, leading dimension e) into probabilities, in place: exp(s - lse) over
// the visible keys, zero beyond them. `lse` is written (forward) or read (backward).
void softmax_rows(float* s, int64_t rows, int64_t e, int64_t r0, bool causal, int64_t S, float* lse, bool have_lse) {
  constexpr float kInf = std::numeric_limits<float>::infinity();
  for (int64_t rr = 0; rr < rows; ++rr) {
    float* row = s + rr * e;
    const int64_t n_vis = visible(causal, r0 + rr, S);
    float m;
    if (have_lse) {
      m = lse[rr];
    } else {
      Vec mx(-kInf);
      for_vectors(n_vis, [&](int64_t i, int64_t n) {
        const Vec v = load(row + i, n);
        mx = at::vec::maximum(mx, n == Vec::size() ? v : Vec::set(Vec(-kInf), v, n));
      });
      m = at::vec::vec_reduce_all<float>([](Vec a, Vec b) { return at::vec::maximum(a, b); }, mx);
    }
    const Vec mv(m);
    Vec z(0.f);
    for_vectors(n_vis, [&](int64_t i, int64_t n) {
      Vec p = (load(row + i, n) - mv).exp_u20();
      if (n < Vec::size()) p = Vec::set(Vec(0.f), p, n);
      z = z + p;
      store(p, row + i, n);
    });
    std::fill(row + n_vis, row + e, 0.f);
    if (have_lse) continue;
    const float zs = lmlab::hsum(z);
    lse[rr] = m + std::log(zs);
    const Vec inv(1.f / zs);
    for_vectors(n_vis, [&](int64_t i, int64_t n) { store(load(row + i, n) * inv, row + i, n); });
  }
}

void check_inputs(const char* op, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, bool causal) {
  TORCH_CHECK(q.device().is_cpu() && q.scalar_type() == at::kFloat && k.scalar_type() == at::kFloat &&
                  v.scalar_type() == at::kFloat,
              op, ": float32 CPU tensors");
  TORCH_CHECK(q.dim() == 4 && k.dim() == 4 && v.sizes() == k.sizes() && q.size(0) == k.size(0) &&
                  q.size(3) == k.size(3) && k.size(1) > 0 && q.size(1) % k.size(1) == 0,
              op, ": q (B, H, T, D), k and v (B, Hkv, S, D) with H a multiple of Hkv");
  TORCH_CHECK(!causal || q.size(2) == k.size(2), op, ": causal attention needs as many queries as keys");
  TORCH_CHECK(q.stride(3) == 1 && k.stride(3) == 1 && v.stride(3) == 1 && q.stride(2) >= q.size(3) &&
                  k.stride(2) >= k.size(3) && v.stride(2) >= v.size(3),
              op, ": rows of D must be contiguous and not overlap");
}

// (B, H, T, D) view of fresh (B, T, H, D) memory: the layout of a projection's output
at::Tensor projection_layout(const at::Tensor& like, int64_t B, int64_t H, int64_t T, int64_t D) {
  return at::empty({B, T, H, D}, like.options()).transpose(1, 2);
}

std::tuple<at::Tensor, at::Tensor> attention(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, bool causal,
                                             double scale) {
  check_inputs("lmlab::attention", q, k, v, causal);
  const Dims d{q.size(0), q.size(1), k.size(1), q.size(2), k.size(2), q.size(3)};
  at::Tensor out = projection_layout(q, d.B, d.H, d.T, d.D);
  at::Tensor lse = at::empty({d.B, d.H, d.T}, q.options());
  const float* qp = q.data_ptr<float>();
  const float *kp = k.data_ptr<float>(), *vp = v.data_ptr<float>();
  float* op = out.data_ptr<float>();
  float* lp = lse.data_ptr<float>();
  const int64_t n_blocks = (d.T + kBlock - 1) / kBlock, group = d.H / d.Hkv;
  at::parallel_for(0, d.B * d.H * n_blocks, 1, [&](int64_t t0, int64_t t1) {
    // scratch from torch's allocator: 64-byte aligned, so MKL takes the same path (and gives the
    // same bits) every run
    at::Tensor scratch = at::empty({kBlock * d.S}, q.options());
    float* scores = scratch.data_ptr<float>();
    for (int64_t task = t0; task < t1; ++task) {
      const int64_t b = task / (d.H * n_blocks), h = (task / n_blocks) % d.H, r0 = (task % n_blocks) * kBlock;
      const int64_t rows = std::min(kBlock, d.T - r0), e = block_width(causal, r0, rows, d.S), hk = h / group;
      const float* Q = qp + b * q.stride(0) + h * q.stride(1) + r0 * q.stride(2);
      const float* K = kp + b * k.stride(0) + hk * k.stride(1);
      const float* V = vp + b * v.stride(0) + hk * v.stride(1);
      gemm(false, true, rows, e, d.D, scale, Q, q.stride(2), K, k.stride(2), 0.f, scores, e);
      softmax_rows(scores, rows, e, r0, causal, d.S, lp + (b * d.H + h) * d.T + r0, false);
      float* O = op + b * out.stride(0) + h * out.stride(1) + r0 * out.stride(2);
      gemm(false, false, rows, d.D, e, 1.f, scores, e, V, v.stride(2), 0.f, O, out.stride(2));
    }
  });
  return {out, lse};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> attention_backward(const at::Tensor& grad, const at::Tensor& q,
                                                                  const at::Tensor& k, const at::Tensor& v,
                                                                  const at::Tensor& out, const at::Tensor& lse,
                                                                  bool causal, double scale) {
  check_inputs("lmlab::attention_backward", q, k, v, causal);
  TORCH_CHECK(grad.sizes() == q.sizes() && out.sizes() == q.sizes() && grad.scalar_type() == at::kFloat &&
                  out.scalar_type() == at::kFloat && grad.stride(3) == 1 && out.stride(3) == 1,
              "lmlab::attention_backward: grad and out like q, rows of D contiguous");
  TORCH_CHECK(grad.stride(2) >= grad.size(3), "lmlab::attention_backward: rows of grad must not overlap");
  const Dims d{q.size(0), q.size(1), k.size(1), q.size(2), k.size(2), q.size(3)};
  TORCH_CHECK(lse.scalar_type() == at::kFloat && lse.is_contiguous() && lse.numel() == d.B * d.H * d.T,
              "lmlab::attention_backward: lse (B, H, T) float32");
  at::Tensor dq = projection_layout(q, d.B, d.H, d.T, d.D);
  at::Tensor dk = projection_layout(k, d.B, d.Hkv, d.S, d.D), dv = projection_layout(v, d.B, d.Hkv, d.S, d.D);
  const float *gp = grad.data_ptr<float>(), *qp = q.data_ptr<float>(), *kp = k.data_ptr<float>();
  const float *vp = v.data_ptr<float>(), *op = out.data_ptr<float>();
  float* lp = lse.data_ptr<float>();  // read only: softmax_rows takes the saved values
  float *dqp = dq.data_ptr<float>(), *dkp = dk.data_ptr<float>(), *dvp = dv.data_ptr<float>();
  const int64_t n_blocks = (d.T + kBlock - 1) / kBlock, group = d.H / d.Hkv;
  const float fscale = static_cast<float>(scale);
  // one task per (batch, key/value head): the query heads of its group and all their blocks add
  // into the same rows of dk and dv, so no other thread touches them
  at::parallel_for(0, d.B * d.Hkv, 1, [&](int64_t t0, int64_t t1) {
    at::Tensor scratch = at::empty({2, kBlock * d.S}, q.options());  // aligned, as in the forward
    float *p = scratch[0].data_ptr<float>(), *dp = scratch[1].data_ptr<float>();
    for (int64_t task = t0; task < t1; ++task) {
      const int64_t b = task / d.Hkv, hk = task % d.Hkv;
      const float* K = kp + b * k.stride(0) + hk * k.stride(1);
      const float* V = vp + b * v.stride(0) + hk * v.stride(1);
      float* dK = dkp + b * dk.stride(0) + hk * dk.stride(1);
      float* dV = dvp + b * dv.stride(0) + hk * dv.stride(1);
      for (int64_t s = 0; s < d.S; ++s) {
        std::fill(dK + s * dk.stride(2), dK + s * dk.stride(2) + d.D, 0.f);
        std::fill(dV + s * dv.stride(2), dV + s * dv.stride(2) + d.D, 0.f);
      }
      for (int64_t h = hk * group; h < (hk + 1) * group; ++h) {
        for (int64_t blk = 0; blk < n_blocks; ++blk) {
          const int64_t r0 = blk * kBlock, rows = std::min(kBlock, d.T - r0), e = block_width(causal, r0, rows, d.S);
          const float* Q = qp + b * q.stride(0) + h * q.stride(1) + r0 * q.stride(2);
          const float* G = gp + b * grad.stride(0) + h * grad.stride(1) + r0 * grad.stride(2);
          const float* O = op + b * out.stride(0) + h * out.stride(1) + r0 * out.stride(2);
          float* dQ = dqp + b * dq.stride(0) + h * dq.stride(1) + r0 * dq.stride(2);
          // P = softmax(scale Q K^T), recomputed from the saved log-sum-exp
          gemm(false, true, rows, e, d.D, scale, Q, q.stride(2), K, k.stride(2), 0.f, p, e);
          softmax_rows(p, rows, e, r0, causal, d.S, lp + (b * d.H + h) * d.T + r0, true);
          gemm(true, false, e, d.D, rows, 1.f, p, e, G, grad.stride(2), 1.f, dV, dv.stride(2));  // dV += P^T dO
          gemm(false, true, rows, e, d.D, 1.f, G, grad.stride(2), V, v.stride(2), 0.f, dp, e);  // dP = dO V^T
          // dS = P * (dP - rowsum(dO * O)), in place of dP
          for (int64_t rr = 0; rr < rows; ++rr) {
            Vec acc(0.f);
            const float *g = G + rr * grad.stride(2), *o = O + rr * out.stride(2);
            for_vectors(d.D, [&](int64_t i, int64_t n) { acc = acc + load(g + i, n) * load(o + i, n); });
            const Vec dl(lmlab::hsum(acc));
            float *ds = dp + rr * e, *pr = p + rr * e;
            for_vectors(e, [&](int64_t i, int64_t n) { store(load(pr + i, n) * (load(ds + i, n) - dl), ds + i, n); });
          }
          gemm(false, false, rows, d.D, e, fscale, dp, e, K, k.stride(2), 0.f, dQ, dq.stride(2));  // dQ = s dS K
          gemm(true, false, e, d.D, rows, fscale, dp, e, Q, q.stride(2), 1.f, dK, dk.stride(2));  // dK += s dS^T Q
        }
      }
    }
  });
  return {dq, dk, dv};
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(lmlab, m) {
  if (sgemm_ == nullptr) return;
  m.def("attention(Tensor q, Tensor k, Tensor v, bool causal, float scale) -> (Tensor, Tensor)");
  m.def(
      "attention_backward(Tensor grad, Tensor q, Tensor k, Tensor v, Tensor out, Tensor lse, bool causal, "
      "float scale) -> (Tensor, Tensor, Tensor)");
}
TORCH_LIBRARY_IMPL(lmlab, CPU, m) {
  if (sgemm_ == nullptr) return;
  m.impl("attention", attention);
  m.impl("attention_backward", attention_backward);
}
