// Row math of the TeS loss: the one copy of the formulas, shared by the CPU
// kernels (cpu/tes_loss_cpu.cpp) and the CUDA kernels (cuda/), so the CPU tests
// also test the GPU's arithmetic.
//
// For one row with label y, vision logits z and text logits t:
//   s      = t / tau
//   p_ref  = softmax(s)                      (a constant: no gradient)
//   p_v    = softmax(z)
//   q      = lambda_v * p_ref + (1 - lambda_v) * onehot(y)
//   loss   = CE(z, q) + lambda_t * CE(s, y)
//          = lse(z) - lambda_v * <p_ref, z> - (1 - lambda_v) * z[y]
//            + lambda_t * (lse(s) - s[y])
//   dloss/dz = p_v - q
//   dloss/dt = (lambda_t / tau) * (p_ref - onehot(y))
//
// One read of a row is enough for the forward: an online softmax keeps, for
// each part of a row, its max and the sum of exp(x - max) for z and for s, and
// the sums of exp(s - max) * z and exp(s - max) * s, which give <p_ref, z> and
// <p_ref, s> at the end; parts merge with row_state_merge. The backward needs
// only lse(z) and lse(s) per row.
#pragma once

#include <cmath>
#include <cstdint>
#include <limits>

#include "params.h"

// The element functions differ by device: each device's exp comes first, so
// the templates below find it.
#if defined(__CUDACC__) || defined(__HIPCC__)
#define TESLOSS_HD __host__ __device__ __forceinline__
#include "cuda/device_exp.cuh"
#else
#define TESLOSS_HD inline
#include "cpu/vec_exp.h"
#endif

namespace tesloss {

TESLOSS_HD double tes_exp(double x) { return ::exp(x); }
TESLOSS_HD float tes_log(float x) { return ::logf(x); }
TESLOSS_HD double tes_log(double x) { return ::log(x); }

// A max that keeps NaN, so a NaN logit reaches the loss instead of vanishing.
template <typename acc_t>
TESLOSS_HD acc_t nan_max(acc_t a, acc_t b) {
  return (a != a || a > b) ? a : b;
}

// e * x where e is a softmax weight: a weight that underflowed to 0 contributes
// 0 even where x is -inf (a masked logit), instead of 0 * -inf = nan.
template <typename acc_t>
TESLOSS_HD acc_t weighted(acc_t e, acc_t x) {
  return e == acc_t(0) ? acc_t(0) : e * x;
}

// exp(old_max - new_max), the factor that moves a running sum to a new max.
// Equal maxima (including both -inf for an empty partial) give exactly 1.
template <typename acc_t>
TESLOSS_HD acc_t rescale(acc_t old_max, acc_t new_max) {
  return old_max == new_max ? acc_t(1) : tes_exp(old_max - new_max);
}

template <typename acc_t>
TESLOSS_HD bool is_ignored(int64_t label, const RowParams<acc_t>& p) {
  return label == p.ignore_index;
}

template <typename acc_t>
TESLOSS_HD bool is_valid_label(int64_t label, int64_t num_classes) {
  return label >= 0 && label < num_classes;
}

// Online-softmax statistics of one row, or of any part of one.
template <typename acc_t>
struct RowState {
  acc_t max_vis;      // running max of z
  acc_t sum_vis;      // sum of exp(z - max_vis)
  acc_t max_txt;      // running max of s
  acc_t sum_txt;      // sum of exp(s - max_txt)
  acc_t ref_dot_vis;  // sum of exp(s - max_txt) * z
  acc_t ref_dot_txt;  // sum of exp(s - max_txt) * s
};

template <typename acc_t>
TESLOSS_HD RowState<acc_t> row_state_empty() {
  const acc_t neg_inf = -std::numeric_limits<acc_t>::infinity();
  return RowState<acc_t>{neg_inf, acc_t(0), neg_inf, acc_t(0), acc_t(0), acc_t(0)};
}

// What a part of a row shifts its exponentials by: its max, so none
// overflows, except where the part is all -inf (masked classes, padding), where
// exp(-inf - -inf) would be nan: shifting by 0 makes each term exp(-inf) = 0.
template <typename acc_t>
TESLOSS_HD acc_t softmax_shift(acc_t part_max) {
  return part_max == -std::numeric_limits<acc_t>::infinity() ? acc_t(0) : part_max;
}

// Combines the statistics of two disjoint parts of a row (vector lanes,
// CPU blocks, CUDA threads). Associative up to rounding.
template <typename acc_t>
TESLOSS_HD RowState<acc_t> row_state_merge(const RowState<acc_t>& a,
                                           const RowState<acc_t>& b) {
  RowState<acc_t> out;
  out.max_vis = nan_max(a.max_vis, b.max_vis);
  out.sum_vis = a.sum_vis * rescale(a.max_vis, out.max_vis) +
                b.sum_vis * rescale(b.max_vis, out.max_vis);
  out.max_txt = nan_max(a.max_txt, b.max_txt);
  const acc_t fa = rescale(a.max_txt, out.max_txt);
  const acc_t fb = rescale(b.max_txt, out.max_txt);
  out.sum_txt = a.sum_txt * fa + b.sum_txt * fb;
  out.ref_dot_vis = weighted(fa, a.ref_dot_vis) + weighted(fb, b.ref_dot_vis);
  out.ref_dot_txt = weighted(fa, a.ref_dot_txt) + weighted(fb, b.ref_dot_txt);
  return out;
}

// lambda * a + (1 - lambda) * b, exact at lambda = 0 and lambda = 1.
template <typename acc_t>
TESLOSS_HD acc_t lambda_mix(acc_t lambda, acc_t a, acc_t b) {
  if (lambda == acc_t(0)) return b;
  if (lambda == acc_t(1)) return a;
  return lambda * a + (acc_t(1) - lambda) * b;
}

// The per-row loss and the parts, from the finished statistics and the
// label's own logits. Writes kNumRowStats values to `out`.
template <typename acc_t>
TESLOSS_HD void row_finalize(const RowState<acc_t>& st, acc_t z_label, acc_t s_label,
                             const RowParams<acc_t>& p, acc_t* out) {
  const acc_t lse_vis = st.max_vis + tes_log(st.sum_vis);
  const acc_t lse_txt = st.max_txt + tes_log(st.sum_txt);
  const acc_t ref_vis = st.ref_dot_vis / st.sum_txt;  // <p_ref, z>
  const acc_t ref_txt = st.ref_dot_txt / st.sum_txt;  // <p_ref, s>
  const acc_t ce_vis = lse_vis - z_label;
  const acc_t ce_txt = lse_txt - s_label;
  // CE(z, q) split as lambda_v * CE(z, p_ref) + (1 - lambda_v) * CE(z, y).
  const acc_t ce_soft = lambda_mix(p.lambda_v, lse_vis - ref_vis, ce_vis);
  out[kRowLoss] = ce_soft + p.lambda_t * ce_txt;
  out[kRowLseVis] = lse_vis;
  out[kRowLseTxt] = lse_txt;
  out[kRowCeVis] = ce_vis;
  out[kRowKlRef] = (ref_txt - lse_txt) - (ref_vis - lse_vis);
  out[kRowCeTxt] = ce_txt;
}

// A row that is ignored: zero loss and parts. Its log-sum-exps are never read.
template <typename acc_t>
TESLOSS_HD void row_ignored(acc_t* out) {
  for (int k = 0; k < kNumRowStats; ++k) out[k] = acc_t(0);
}

// The upstream gradient of one row's loss.
template <typename acc_t>
TESLOSS_HD acc_t row_upstream_grad(const acc_t* grad_loss, int64_t grad_stride,
                                   int64_t row, int64_t reduction, acc_t num_valid) {
  if (reduction == kReduceNone) return grad_loss[row * grad_stride];
  if (reduction == kReduceMean) return grad_loss[0] / num_valid;
  return grad_loss[0];
}

// softmax(x)[c] from x[c] and the row's log-sum-exp.
template <typename T>
TESLOSS_HD T softmax_prob(T x, T lse) {
  return tes_exp(x - lse);
}

// dloss/dz for one column, times the upstream gradient g:
//   g * (p_v - lambda_v * p_ref - (1 - lambda_v) * onehot).
// Generic in T so the CPU kernel runs it on whole vectors (onehot = 0) as well
// as on single columns, always in the accumulation type, so the label's term
// is never rounded to a half type before it is subtracted.
template <typename T>
TESLOSS_HD T vis_grad(T p_v, T p_ref, T onehot, T g, T lambda_v, T one_minus_lambda_v) {
  return g * (p_v - lambda_v * p_ref - one_minus_lambda_v * onehot);
}

// dloss/dt for one column: g_txt * (p_ref - onehot), g_txt = g * lambda_t / tau.
template <typename T>
TESLOSS_HD T txt_grad(T p_ref, T onehot, T g_txt) {
  return g_txt * (p_ref - onehot);
}

// What the backward needs of one row besides its columns.
template <typename acc_t>
struct GradRow {
  acc_t inv_tau;
  acc_t lse_vis;
  acc_t lse_txt;
  acc_t g;      // the row's upstream gradient
  acc_t g_txt;  // g * lambda_t / tau
  acc_t lambda_v;
  acc_t one_minus_lambda_v;
};

// `stats` is the row's kNumRowStats statistics, `g` its upstream gradient.
template <typename acc_t>
TESLOSS_HD GradRow<acc_t> grad_row(const RowParams<acc_t>& p, const acc_t* stats, acc_t g) {
  GradRow<acc_t> r;
  r.inv_tau = p.inv_tau;
  r.lse_vis = stats[kRowLseVis];
  r.lse_txt = stats[kRowLseTxt];
  r.g = g;
  r.g_txt = g * p.lambda_t * p.inv_tau;
  r.lambda_v = p.lambda_v;
  r.one_minus_lambda_v = acc_t(1) - p.lambda_v;
  return r;
}

// Both gradients of one column, in acc_t until the one rounding to scalar_t,
// the label's term included.
template <typename scalar_t, typename acc_t>
TESLOSS_HD void grad_column(scalar_t vis_in, scalar_t txt_in, bool is_label,
                            const GradRow<acc_t>& r, scalar_t& grad_vis, scalar_t& grad_txt) {
  const acc_t onehot = is_label ? acc_t(1) : acc_t(0);
  const acc_t p_v = softmax_prob(static_cast<acc_t>(vis_in), r.lse_vis);
  const acc_t p_ref = softmax_prob(static_cast<acc_t>(txt_in) * r.inv_tau, r.lse_txt);
  grad_vis = static_cast<scalar_t>(
      vis_grad(p_v, p_ref, onehot, r.g, r.lambda_v, r.one_minus_lambda_v));
  grad_txt = static_cast<scalar_t>(txt_grad(p_ref, onehot, r.g_txt));
}

// The batch's loss and logged parts from the sums over rows that are not
// ignored: `sums` holds kNumRowStats sums (only kRowLoss and the parts are
// read). "mean" over zero rows is 0 / 0 = nan, as in F.cross_entropy.
template <typename acc_t>
TESLOSS_HD void batch_finalize(const acc_t* sums, acc_t num_valid, int64_t reduction,
                               acc_t* loss_out, acc_t* batch_stats) {
  if (reduction != kReduceNone) {
    *loss_out = reduction == kReduceMean ? sums[kRowLoss] / num_valid : sums[kRowLoss];
  }
  batch_stats[kBatchValid] = num_valid;
  batch_stats[kBatchCeVis] = sums[kRowCeVis] / num_valid;
  batch_stats[kBatchKlRef] = sums[kRowKlRef] / num_valid;
  batch_stats[kBatchCeTxt] = sums[kRowCeTxt] / num_valid;
}

}  // namespace tesloss
