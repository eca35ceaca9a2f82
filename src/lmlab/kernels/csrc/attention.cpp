// Scaled dot-product attention for training on the CPU, forward and backward, float32; causal or
// not, no mask, no dropout; grouped key/value heads (GQA/MQA); rotary embeddings optionally fused.
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
// With rotary angles (cos and signed sin, as model/rope.py makes them) the kernel also applies RoPE
// to queries and keys as it reads them, and turns their gradients back as it writes them: the
// rotated tensors never go to memory, which saves a pass over q and k each way.
//
// Layouts: q (B, H, T, D), k and v (B, Hkv, S, D) in any layout whose rows of D are contiguous (the
// transposed views of the projections' (B, T, H, D) outputs). Results come back in that projection
// layout, as (B, H, T, D) views of (B, T, H, D) memory, so the output projection and the input
// projections' backward read them without a copy.
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <cmath>

#include "rotate.h"

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
  for (int64_t rr = 0; rr < rows; ++rr) {
    float* row = s + rr * e;
    const int64_t n_vis = visible(causal, r0 + rr, S);
    const float m = have_lse ? lse[rr] : lmlab::row_max(row, n_vis);
    const float zs = lmlab::exp_sum(row, n_vis, m, true);
    std::fill(row + n_vis, row + e, 0.f);
    if (have_lse) continue;
    lse[rr] = m + std::log(zs);
    const Vec inv(1.f / zs);
    for_vectors(n_vis, [&](int64_t i, int64_t n) { store(load(row + i, n) * inv, row + i, n); });
  }
}

void check_inputs(const char* op, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                  const std::optional<at::Tensor>& cos, const std::optional<at::Tensor>& sin, bool causal) {
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
  TORCH_CHECK(cos.has_value() == sin.has_value(), op, ": cos and sin come together");
  if (!cos) return;
  const int64_t B = q.size(0), T = q.size(2), D = q.size(3);
  TORCH_CHECK(cos->scalar_type() == at::kFloat && sin->scalar_type() == at::kFloat && cos->dim() == 4 &&
                  sin->sizes() == cos->sizes() && sin->strides() == cos->strides() && D % 2 == 0 &&
                  k.size(2) == T && (cos->size(0) == B || cos->size(0) == 1) && cos->size(1) == 1 &&
                  cos->size(2) == T && cos->size(3) == D && cos->stride(3) == 1,
              op, ": cos and sin (B or 1, 1, T, D) float32 alike, rows contiguous, for as many keys as queries");
}

// (B, H, T, D) view of fresh (B, T, H, D) memory: the layout of a projection's output
at::Tensor projection_layout(const at::Tensor& like, int64_t B, int64_t H, int64_t T, int64_t D) {
  return at::empty({B, T, H, D}, like.options()).transpose(1, 2);
}

// A matrix of rows of D floats: a pointer and its row stride.
struct Rows {
  const float* p;
  int64_t ld;
};

// The rotary angles of one sequence, or none. Queries and keys are rotated as they are read (into a
// per-thread buffer), so the rotated tensors never go to memory and their gradients are turned
// back within the same pass: rotary embedding and attention cost one read of q and k each way.
struct Angles {
  const float *cos = nullptr, *sin = nullptr;
  int64_t b_stride = 0, t_stride = 0;

  Angles(const std::optional<at::Tensor>& c, const std::optional<at::Tensor>& s) {
    if (!c) return;
    cos = c->data_ptr<float>(), sin = s->data_ptr<float>();
    b_stride = c->size(0) == 1 ? 0 : c->stride(0), t_stride = c->stride(2);
  }
  bool on() const { return cos != nullptr; }

  // rows [r0, r0 + n) of x, rotated (or, backward, rotated back) into dst (n x D, row stride ld)
  void rotate(Rows x, int64_t b, int64_t r0, int64_t n, int64_t D, float* dst, int64_t ld, bool backward) const {
    for (int64_t r = 0; r < n; ++r) {
      const int64_t o = b * b_stride + (r0 + r) * t_stride;
      lmlab::rotate_row(x.p + r * x.ld, cos + o, sin + o, dst + r * ld, D / 2, backward);
    }
  }

  // x's rows [r0, r0 + n), rotated into buf when there are angles, else x itself
  Rows read(Rows x, int64_t b, int64_t r0, int64_t n, int64_t D, float* buf) const {
    if (!on()) return x;
    rotate(x, b, r0, n, D, buf, D, false);
    return {buf, D};
  }
};

std::tuple<at::Tensor, at::Tensor> attention(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                             const std::optional<at::Tensor>& cos,
                                             const std::optional<at::Tensor>& sin, bool causal, double scale) {
  check_inputs("lmlab::attention", q, k, v, cos, sin, causal);
  const Dims d{q.size(0), q.size(1), k.size(1), q.size(2), k.size(2), q.size(3)};
  const Angles angles(cos, sin);
  at::Tensor out = projection_layout(q, d.B, d.H, d.T, d.D);
  at::Tensor lse = at::empty({d.B, d.H, d.T}, q.options());
  const float *qp = q.data_ptr<float>(), *kp = k.data_ptr<float>(), *vp = v.data_ptr<float>();
  float *op = out.data_ptr<float>(), *lp = lse.data_ptr<float>();
  const int64_t n_blocks = (d.T + kBlock - 1) / kBlock, group = d.H / d.Hkv;
  // one task per (batch, head): its keys are rotated once for all its blocks of queries
  at::parallel_for(0, d.B * d.H, 1, [&](int64_t t0, int64_t t1) {
    // scratch from torch's allocator: 64-byte aligned, so MKL takes the same path (and gives the
    // same bits) every run. Scores, then rotated keys and one block of rotated queries.
    const int64_t rot = angles.on() ? (d.S + kBlock) * d.D : 0;
    at::Tensor scratch = at::empty({kBlock * d.S + rot}, q.options());
    float *scores = scratch.data_ptr<float>(), *k_rot = scores + kBlock * d.S, *q_rot = k_rot + d.S * d.D;
    for (int64_t task = t0; task < t1; ++task) {
      const int64_t b = task / d.H, h = task % d.H, hk = h / group;
      const Rows K = angles.read({kp + b * k.stride(0) + hk * k.stride(1), k.stride(2)}, b, 0, d.S, d.D, k_rot);
      const float* V = vp + b * v.stride(0) + hk * v.stride(1);
      for (int64_t blk = 0; blk < n_blocks; ++blk) {
        const int64_t r0 = blk * kBlock, rows = std::min(kBlock, d.T - r0), e = block_width(causal, r0, rows, d.S);
        const Rows Q = angles.read({qp + b * q.stride(0) + h * q.stride(1) + r0 * q.stride(2), q.stride(2)}, b, r0,
                                   rows, d.D, q_rot);
        gemm(false, true, rows, e, d.D, scale, Q.p, Q.ld, K.p, K.ld, 0.f, scores, e);
        softmax_rows(scores, rows, e, r0, causal, d.S, lp + (b * d.H + h) * d.T + r0, false);
        float* O = op + b * out.stride(0) + h * out.stride(1) + r0 * out.stride(2);
        gemm(false, false, rows, d.D, e, 1.f, scores, e, V, v.stride(2), 0.f, O, out.stride(2));
      }
    }
  });
  return {out, lse};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> attention_backward(
    const at::Tensor& grad, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
    const std::optional<at::Tensor>& cos, const std::optional<at::Tensor>& sin, const at::Tensor& out,
    const at::Tensor& lse, bool causal, double scale) {
  check_inputs("lmlab::attention_backward", q, k, v, cos, sin, causal);
  TORCH_CHECK(grad.sizes() == q.sizes() && out.sizes() == q.sizes() && grad.scalar_type() == at::kFloat &&
                  out.scalar_type() == at::kFloat && grad.stride(3) == 1 && out.stride(3) == 1,
              "lmlab::attention_backward: grad and out like q, rows of D contiguous");
  TORCH_CHECK(grad.stride(2) >= grad.size(3), "lmlab::attention_backward: rows of grad must not overlap");
  const Dims d{q.size(0), q.size(1), k.size(1), q.size(2), k.size(2), q.size(3)};
  TORCH_CHECK(lse.scalar_type() == at::kFloat && lse.is_contiguous() && lse.numel() == d.B * d.H * d.T,
              "lmlab::attention_backward: lse (B, H, T) float32");
  const Angles angles(cos, sin);
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
    // probabilities and their gradient; with angles, also the rotated keys, the gradient of the
    // rotated keys, the rotated queries of a head and one block of their gradient
    const int64_t rot = angles.on() ? (2 * d.S + d.T + kBlock) * d.D : 0;
    at::Tensor scratch = at::empty({2 * kBlock * d.S + rot}, q.options());  // aligned, as in the forward
    float *p = scratch.data_ptr<float>(), *dp = p + kBlock * d.S;
    float *k_rot = dp + kBlock * d.S, *dk_rot = k_rot + d.S * d.D, *q_rot = dk_rot + d.S * d.D;
    float* dq_rot = q_rot + d.T * d.D;
    for (int64_t task = t0; task < t1; ++task) {
      const int64_t b = task / d.Hkv, hk = task % d.Hkv;
      const Rows K = angles.read({kp + b * k.stride(0) + hk * k.stride(1), k.stride(2)}, b, 0, d.S, d.D, k_rot);
      const float* V = vp + b * v.stride(0) + hk * v.stride(1);
      float* dK_out = dkp + b * dk.stride(0) + hk * dk.stride(1);
      float* dV = dvp + b * dv.stride(0) + hk * dv.stride(1);
      // with angles, dk accumulates for the rotated keys and is turned back at the end
      float* dK = angles.on() ? dk_rot : dK_out;
      const int64_t ldk = angles.on() ? d.D : dk.stride(2);
      for (int64_t s = 0; s < d.S; ++s) {
        std::fill(dK + s * ldk, dK + s * ldk + d.D, 0.f);
        std::fill(dV + s * dv.stride(2), dV + s * dv.stride(2) + d.D, 0.f);
      }
      for (int64_t h = hk * group; h < (hk + 1) * group; ++h) {
        const Rows Qh = angles.read({qp + b * q.stride(0) + h * q.stride(1), q.stride(2)}, b, 0, d.T, d.D, q_rot);
        for (int64_t blk = 0; blk < n_blocks; ++blk) {
          const int64_t r0 = blk * kBlock, rows = std::min(kBlock, d.T - r0), e = block_width(causal, r0, rows, d.S);
          const float* Q = Qh.p + r0 * Qh.ld;
          const float* G = gp + b * grad.stride(0) + h * grad.stride(1) + r0 * grad.stride(2);
          const float* O = op + b * out.stride(0) + h * out.stride(1) + r0 * out.stride(2);
          float* dQ_out = dqp + b * dq.stride(0) + h * dq.stride(1) + r0 * dq.stride(2);
          // P = softmax(scale Q K^T), recomputed from the saved log-sum-exp
          gemm(false, true, rows, e, d.D, scale, Q, Qh.ld, K.p, K.ld, 0.f, p, e);
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
          float* dQ = angles.on() ? dq_rot : dQ_out;
          const int64_t ldq = angles.on() ? d.D : dq.stride(2);
          gemm(false, false, rows, d.D, e, fscale, dp, e, K.p, K.ld, 0.f, dQ, ldq);  // dQ = s dS K
          gemm(true, false, e, d.D, rows, fscale, dp, e, Q, Qh.ld, 1.f, dK, ldk);  // dK += s dS^T Q
          if (angles.on()) angles.rotate({dq_rot, d.D}, b, r0, rows, d.D, dQ_out, dq.stride(2), true);
        }
      }
      if (angles.on()) angles.rotate({dk_rot, d.D}, b, 0, d.S, d.D, dK_out, dk.stride(2), true);
    }
  });
  return {dq, dk, dv};
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(lmlab, m) {
  if (sgemm_ == nullptr) return;
  m.def("attention(Tensor q, Tensor k, Tensor v, Tensor? cos, Tensor? sin, bool causal, float scale) -> (Tensor, Tensor)");
  m.def(
      "attention_backward(Tensor grad, Tensor q, Tensor k, Tensor v, Tensor? cos, Tensor? sin, Tensor out, "
      "Tensor lse, bool causal, float scale) -> (Tensor, Tensor, Tensor)");
}
TORCH_LIBRARY_IMPL(lmlab, CPU, m) {
  if (sgemm_ == nullptr) return;
  m.impl("attention", attention);
  m.impl("attention_backward", attention_backward);
}
