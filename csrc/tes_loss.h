// Row math of the TeS loss: the one copy of the formulas, shared by the CPU
// kernels (cpu/tes_loss_cpu.cpp) and the CUDA kernels (cuda/), so the CPU tests
// also test the GPU's arithmetic.
//
// For one row with target Y (onehot(y) for a class index y, or a row of class
// probabilities), vision logits z, text logits t and label smoothing eps:
//   s      = t / tau
//   p_ref  = softmax(s)                      (a constant: no gradient)
//   p_v    = softmax(z)
//   q      = lambda_v * p_ref + (1 - lambda_v) * Y
//   CE_eps(x, w) = -sum_c ((1 - eps) w_c + eps / C) log_softmax(x)_c
//                = (1 - eps) CE(x, w) + eps CE(x, U),   U = the uniform 1 / C
//   loss   = CE_eps(z, q) + lambda_t * CE_eps(s, Y)
//          = (1 - eps) (lambda_v CE(z, p_ref) + (1 - lambda_v) CE(z, Y)) + eps CE(z, U)
//            + lambda_t ((1 - eps) CE(s, Y) + eps CE(s, U))
//   dloss/dz = sum(w') p_v - w',                    w' = (1 - eps) q + eps / C
//   dloss/dt = (lambda_t / tau) (sum(Y') p_ref - Y'), Y' = (1 - eps) Y + eps / C
// (sum(w') = sum(Y') = 1 for a class index; a probability row need not sum to 1.)
//
// Every cross-entropy is written as a sum of parts that are >= 0, so that no
// two large numbers cancel and a constant added to a row's z or t changes
// nothing but the rounding of differences within the row:
//   CE(z, y)     = log(sum_c exp(z_c - max z)) + (max z - z_y)
//   CE(s, y)     = log(sum_c exp(s_c - max s)) + (max t - t_y) / tau
//   CE(z, p_ref) = log(sum_c exp(z_c - max z)) + <p_ref, max z - z>
//   CE(z, Y)     = sum(Y) log(sum_c exp(z_c - max z)) + <Y, max z - z>
//   CE(z, U)     = log(sum_c exp(z_c - max z)) + <U, max z - z>
// The text exponent is (t - max t) / tau: the max class gets exactly 0, so
// exp gives exactly 1 and each sum is >= 1, whatever tau.
//
// One read of a row is enough for the forward: an online softmax keeps, for
// each part of a row, the maxima of z and t, the sums of exponentials, and the
// p_ref-weighted gaps sum_c exp(s_c - max s) * (max z - z_c) and
// sum_c exp(s_c - max s) * (max t - t_c), whose terms are all >= 0, and as
// the target needs them the uniform gaps sum_c (max - x_c) and Y's mass and
// gaps <Y, max - x>; parts merge with row_state_merge. The backward needs the
// maxima, the sums and Y's mass only.
#pragma once

#include <cmath>
#include <cstdint>
#include <limits>

#include "params.h"
#include "row_exp.h"

namespace tesloss {

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

template <typename acc_t>
TESLOSS_HD bool is_ignored(int64_t label, const RowParams<acc_t>& p) {
  return label == p.ignore_index;
}

// A row that adds nothing: its class index is ignore_index. A probability
// target has none, and every row counts.
template <int kTarget, typename acc_t>
TESLOSS_HD bool is_ignored_row(int64_t label, const RowParams<acc_t>& p) {
  return !kHasProbs<kTarget> && is_ignored(label, p);
}

template <typename acc_t>
TESLOSS_HD bool is_valid_label(int64_t label, int64_t num_classes) {
  return label >= 0 && label < num_classes;
}

// The gaps are kept times kGapScale = 2^-32, exactly (a power of two), so
// that their sums stay finite: each term is at most the row's spread of
// logits, which may be close to twice the largest float, and up to 2^30 of
// them are added. A difference is scaled before it is taken (scaled_gap), so
// that it too stays finite, and a weight is never scaled: a weight of 1e-35
// times 2^-32 would be subnormal, and lose its bits. Only a difference below
// 2^-94 loses bits to the scaling, where it is far below the rounding of the
// log-sum-exp it is added to.
inline constexpr double kGapScale = 1.0 / 4294967296.0;

// (x - max) * kGapScale, rounded once (both products are exact), and finite
// for any finite x and max.
template <typename acc_t>
TESLOSS_HD acc_t scaled_gap(acc_t x, acc_t scaled_max) {
  return x * acc_t(kGapScale) - scaled_max;
}

// Online-softmax statistics of one row, or of any part of one. The last six
// are the target's (params.h's TargetKind): kept where the kind has them, and
// 0 and never read where it does not.
template <typename acc_t>
struct RowState {
  acc_t max_vis;  // running max of z
  acc_t sum_vis;  // sum of exp(z - max_vis)
  acc_t max_txt;  // running max of t (units of t)
  acc_t sum_txt;  // sum of exp((t - max_txt) / tau)
  acc_t gap_vis;  // kGapScale * sum of exp((t - max_txt) / tau) * (max_vis - z), >= 0
  acc_t gap_txt;  // kGapScale * sum of exp((t - max_txt) / tau) * (max_txt - t), >= 0
  acc_t count;    // columns (kHasUniform)
  acc_t uni_vis;  // kGapScale * sum of (max_vis - z), >= 0 (kHasUniform)
  acc_t uni_txt;  // kGapScale * sum of (max_txt - t), >= 0 (kHasUniform)
  acc_t mass;     // sum of Y (kHasProbs)
  acc_t y_vis;    // kGapScale * sum of Y * (max_vis - z) (kHasProbs)
  acc_t y_txt;    // kGapScale * sum of Y * (max_txt - t) (kHasProbs)
};

template <typename acc_t>
TESLOSS_HD RowState<acc_t> row_state_empty() {
  const acc_t neg_inf = -std::numeric_limits<acc_t>::infinity();
  return RowState<acc_t>{neg_inf, acc_t(0), neg_inf, acc_t(0), acc_t(0), acc_t(0),
                         acc_t(0), acc_t(0), acc_t(0), acc_t(0), acc_t(0), acc_t(0)};
}

// What a part of a row shifts its exponentials by: its max, so none
// overflows, except where the part is all -inf (masked classes, padding), where
// exp(-inf - -inf) would be nan: shifting by 0 makes each term exp(-inf) = 0.
template <typename acc_t>
TESLOSS_HD acc_t softmax_shift(acc_t part_max) {
  return part_max == -std::numeric_limits<acc_t>::infinity() ? acc_t(0) : part_max;
}

// A part's gap measured from a larger max: each of its terms grows by
// (new_max - old_max) times its weight. A part without weight adds nothing,
// even where its max is -inf.
template <typename acc_t>
TESLOSS_HD acc_t regap(acc_t gap, acc_t old_max, acc_t new_max, acc_t weight_sum) {
  if (weight_sum == acc_t(0) || old_max == new_max) return gap;
  return gap + scaled_gap(new_max, old_max * acc_t(kGapScale)) * weight_sum;
}

// Combines the statistics of two disjoint parts of a row (vector lanes,
// CPU blocks, CUDA threads) for a target of kind kTarget. Associative up to
// rounding.
template <int kTarget, typename acc_t>
TESLOSS_HD RowState<acc_t> row_state_merge(const RowState<acc_t>& a, const RowState<acc_t>& b,
                                           const RowParams<acc_t>& p) {
  RowState<acc_t> out = row_state_empty<acc_t>();
  out.max_vis = nan_max(a.max_vis, b.max_vis);
  out.sum_vis = a.sum_vis * rescale(a.max_vis, out.max_vis) +
                b.sum_vis * rescale(b.max_vis, out.max_vis);
  out.max_txt = nan_max(a.max_txt, b.max_txt);
  const acc_t fa = rescale_txt(a.max_txt, out.max_txt, p);
  const acc_t fb = rescale_txt(b.max_txt, out.max_txt, p);
  out.sum_txt = a.sum_txt * fa + b.sum_txt * fb;
  out.gap_vis = weighted(fa, regap(a.gap_vis, a.max_vis, out.max_vis, a.sum_txt)) +
                weighted(fb, regap(b.gap_vis, b.max_vis, out.max_vis, b.sum_txt));
  out.gap_txt = weighted(fa, regap(a.gap_txt, a.max_txt, out.max_txt, a.sum_txt)) +
                weighted(fb, regap(b.gap_txt, b.max_txt, out.max_txt, b.sum_txt));
  // The target's weights are not exponentials: only the gaps move with the max.
  if constexpr (kHasUniform<kTarget>) {
    out.count = a.count + b.count;
    out.uni_vis = regap(a.uni_vis, a.max_vis, out.max_vis, a.count) +
                  regap(b.uni_vis, b.max_vis, out.max_vis, b.count);
    out.uni_txt = regap(a.uni_txt, a.max_txt, out.max_txt, a.count) +
                  regap(b.uni_txt, b.max_txt, out.max_txt, b.count);
  }
  if constexpr (kHasProbs<kTarget>) {
    out.mass = a.mass + b.mass;
    out.y_vis = regap(a.y_vis, a.max_vis, out.max_vis, a.mass) +
                regap(b.y_vis, b.max_vis, out.max_vis, b.mass);
    out.y_txt = regap(a.y_txt, a.max_txt, out.max_txt, a.mass) +
                regap(b.y_txt, b.max_txt, out.max_txt, b.mass);
  }
  return out;
}

// lambda * a + one_minus_lambda * b, exact at lambda = 0 and lambda = 1 (where
// the other term may be inf or nan). one_minus_lambda is the params' 1 - lambda,
// formed in double (row_params).
template <typename acc_t>
TESLOSS_HD acc_t lambda_mix(acc_t lambda, acc_t one_minus_lambda, acc_t a, acc_t b) {
  if (lambda == acc_t(0)) return b;
  if (one_minus_lambda == acc_t(0)) return a;
  return lambda * a + one_minus_lambda * b;
}

// log of a sum of exponentials that includes exp(0) = 1: >= 0, and kept so
// where rounding would take it below (a nan stays nan).
template <typename acc_t>
TESLOSS_HD acc_t log_of_sum(acc_t sum) {
  const acc_t log_sum = tes_log(sum);
  return log_sum < acc_t(0) ? acc_t(0) : log_sum;
}

// (1 - eps) * of_target + eps * of_uniform: label smoothing's mix, exact at
// eps = 0 and eps = 1.
template <typename acc_t>
TESLOSS_HD acc_t smoothed(const RowParams<acc_t>& p, acc_t of_target, acc_t of_uniform) {
  return lambda_mix(p.smoothing, p.one_minus_smoothing, of_uniform, of_target);
}

// The per-row loss and the parts, from the finished statistics and, for a
// class index, the label's own logits (unused for probability targets).
// Writes kNumRowStats values to `out`. Every cross-entropy is formed times
// kGapScale, as the gaps are kept, and unscaled last: a part may pass the
// largest float where the loss, which weighs it, does not (the scalings are
// exact, so nothing else changes).
template <int kTarget, typename acc_t>
TESLOSS_HD void row_finalize(const RowState<acc_t>& st, acc_t z_label, acc_t t_label,
                             const RowParams<acc_t>& p, acc_t* out) {
  constexpr acc_t kScale = acc_t(kGapScale);
  constexpr acc_t kUnscale = acc_t(1.0 / kGapScale);
  const acc_t lse_vis = log_of_sum(st.sum_vis) * kScale;
  const acc_t lse_txt = log_of_sum(st.sum_txt) * kScale;
  acc_t mass = acc_t(1);
  acc_t ce_vis, ce_txt;  // CE(z, Y), CE(s, Y)
  if constexpr (kHasProbs<kTarget>) {
    mass = st.mass;
    ce_vis = mass * lse_vis + st.y_vis;
    ce_txt = mass * lse_txt + st.y_txt * p.inv_tau;
  } else {
    ce_vis = lse_vis + scaled_gap(st.max_vis, z_label * kScale);
    ce_txt = lse_txt + scaled_gap(st.max_txt, t_label * kScale) * p.inv_tau;
  }
  const acc_t ce_ref = lse_vis + st.gap_vis / st.sum_txt;  // CE(z, p_ref)
  const acc_t entropy_ref = lse_txt + st.gap_txt / st.sum_txt * p.inv_tau;
  const acc_t kl_ref = ce_ref - entropy_ref;
  acc_t vision = lambda_mix(p.lambda_v, p.one_minus_lambda_v, ce_ref, ce_vis);  // CE(z, q)
  acc_t ce_ref_eps = ce_ref;
  if constexpr (kHasUniform<kTarget>) {
    const acc_t ce_uni_vis = lse_vis + st.uni_vis * p.inv_num_classes;  // CE(z, U)
    const acc_t ce_uni_txt = lse_txt + st.uni_txt * p.inv_num_classes * p.inv_tau;
    vision = smoothed(p, vision, ce_uni_vis);
    ce_vis = smoothed(p, ce_vis, ce_uni_vis);
    ce_txt = smoothed(p, ce_txt, ce_uni_txt);
    ce_ref_eps = smoothed(p, ce_ref, ce_uni_vis);
  }
  out[kRowLoss] = (vision + p.lambda_t * ce_txt) * kUnscale;
  out[kRowMaxVis] = st.max_vis;
  out[kRowSumVis] = st.sum_vis;
  out[kRowMaxTxt] = st.max_txt;
  out[kRowSumTxt] = st.sum_txt;
  out[kRowMass] = mass;
  out[kRowCeVis] = ce_vis * kUnscale;
  out[kRowKlRef] = kl_ref * kUnscale;
  out[kRowCeTxt] = ce_txt * kUnscale;
  out[kRowCeRef] = ce_ref_eps * kUnscale;
  out[kRowEntRef] = entropy_ref * kUnscale;
}

// A row that is ignored: zero loss and parts. Its other statistics are never read.
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

// What the backward needs of one row besides its columns. With Y_c the
// target's weight of column c (onehot for a class index), its gradients are
//   dloss/dz_c = g_vis * exp(z_c - max_vis) - g_ref * exp((t_c - max_txt) / tau)
//                - (g_y_vis * Y_c + g_uni_vis)
//   dloss/dt_c = g_txt * exp((t_c - max_txt) / tau) - (g_y_txt * Y_c + g_uni_txt)
// with the sums' reciprocals folded into the factors, so that the exponentials
// are taken of differences within the row, never of a logit minus a rounded
// log-sum-exp. Each factor is formed in double and rounded once.
template <typename acc_t>
struct GradRow {
  acc_t inv_tau;     // text_exp's share of RowParams
  acc_t txt_exp_hi;
  acc_t txt_exp_lo;
  acc_t max_vis;
  acc_t max_txt;
  acc_t g_vis;       // g * sum(w') / sum_vis
  acc_t g_ref;       // g * (1 - eps) * lambda_v / sum_txt
  acc_t g_txt;       // g * lambda_t / tau * sum(Y') / sum_txt
  acc_t g_uni_vis;   // g * eps / C
  acc_t g_uni_txt;   // g * lambda_t / tau * eps / C
  acc_t g_y_vis;     // g * (1 - eps) * (1 - lambda_v)
  acc_t g_y_txt;     // g * lambda_t / tau * (1 - eps)
  // A class index's label column (grad_column):
  acc_t g;           // the row's upstream gradient
  acc_t g_lt;        // g * lambda_t / tau
  acc_t inv_sum_vis;
  acc_t inv_sum_txt;
  acc_t ref_weight;  // (1 - eps) * lambda_v: p_ref's share of w'
  acc_t vis_at;      // label_vis = (p_v - vis_at) + ref_weight (ref_at - p_ref) + vis_rest
  acc_t ref_at;
  acc_t vis_rest;
  acc_t txt_at;      // label_txt = (p_ref - txt_at) + txt_rest
  acc_t txt_rest;
};

// `stats` is the row's kNumRowStats statistics, `g` its upstream gradient.
template <int kTarget, typename acc_t>
TESLOSS_HD GradRow<acc_t> grad_row(const RowParams<acc_t>& p, const acc_t* stats, acc_t g) {
  const double eps = p.label_smoothing;
  // sum(w') and sum(Y'), exactly 1 for a class index.
  double vis_mass = 1;
  double txt_mass = 1;
  if constexpr (kHasProbs<kTarget>) {
    const double mass = stats[kRowMass];
    vis_mass = p.ref_weight + p.target_weight * mass + eps;
    txt_mass = p.txt_target_weight * mass + eps;
  }
  const double g_in = g;
  const double g_lt = g_in * p.lambda_t_over_tau;
  const double sum_vis = stats[kRowSumVis];
  const double sum_txt = stats[kRowSumTxt];
  GradRow<acc_t> r;
  r.inv_tau = p.inv_tau;
  r.txt_exp_hi = p.txt_exp_hi;
  r.txt_exp_lo = p.txt_exp_lo;
  r.max_vis = stats[kRowMaxVis];
  r.max_txt = stats[kRowMaxTxt];
  r.g_vis = static_cast<acc_t>(g_in * vis_mass / sum_vis);
  r.g_ref = static_cast<acc_t>(g_in * p.ref_weight / sum_txt);
  r.g_txt = static_cast<acc_t>(g_lt * txt_mass / sum_txt);
  r.g_uni_vis = static_cast<acc_t>(g_in * p.uniform);
  r.g_uni_txt = static_cast<acc_t>(g_lt * p.uniform);
  r.g_y_vis = static_cast<acc_t>(g_in * p.target_weight);
  r.g_y_txt = static_cast<acc_t>(g_lt * p.txt_target_weight);
  r.g = g;
  r.g_lt = static_cast<acc_t>(g_lt);
  r.inv_sum_vis = acc_t(1) / stats[kRowSumVis];
  r.inv_sum_txt = acc_t(1) / stats[kRowSumTxt];
  r.ref_weight = static_cast<acc_t>(p.ref_weight);
  // The label's weight w'_y = target_weight + ref_weight p_ref + eps / C, and
  // Y'_y = (1 - eps) + eps / C. Where the target's share is at least 1/2,
  // p - w'_y is taken as (p - 1) + (1 - w'_y), whose parts are small where
  // the row is confident (1 - w'_y = ref_weight (1 - p_ref) + off_label);
  // else as (p - target_weight) - ref_weight p_ref - eps / C, whose parts are
  // small where the label weighs little (lambda_v or eps near 1).
  const bool vis_near_one = p.target_weight >= 0.5;
  r.vis_at = static_cast<acc_t>(vis_near_one ? 1.0 : p.target_weight);
  r.ref_at = vis_near_one ? acc_t(1) : acc_t(0);
  r.vis_rest = static_cast<acc_t>(vis_near_one ? p.off_label : -p.uniform);
  const bool txt_near_one = p.txt_target_weight >= 0.5;
  r.txt_at = static_cast<acc_t>(txt_near_one ? 1.0 : p.txt_target_weight);
  r.txt_rest = static_cast<acc_t>(txt_near_one ? p.off_label : -p.uniform);
  return r;
}

TESLOSS_HD float fused_mul_add(float a, float b, float c) { return fmaf(a, b, c); }
TESLOSS_HD double fused_mul_add(double a, double b, double c) { return fma(a, b, c); }

// Both gradients of one column for a class index target, in acc_t until the
// one rounding to scalar_t. The label's column takes grad_row's form of
// p - w'_y, with p - at in one rounding.
// Both forms are computed and one selected, without a branch: CUDA runs this
// on every column of unrolled chunks, where a branch cost registers.
template <int kTarget, typename scalar_t, typename acc_t>
TESLOSS_HD void grad_column(scalar_t vis_in, scalar_t txt_in, bool is_label,
                            const GradRow<acc_t>& r, scalar_t& grad_vis, scalar_t& grad_txt) {
  static_assert(!kHasProbs<kTarget>, "probability targets take grad_column_probs");
  const acc_t e_vis = vis_weight<scalar_t>(static_cast<acc_t>(vis_in), r.max_vis);
  const acc_t e_txt = text_weight<scalar_t>(static_cast<acc_t>(txt_in), r.max_txt, r);
  const acc_t p_ref = e_txt * r.inv_sum_txt;
  acc_t label_vis = fused_mul_add(e_vis, r.inv_sum_vis, -r.vis_at) +
                    r.ref_weight * (r.ref_at - p_ref);
  acc_t label_txt = fused_mul_add(e_txt, r.inv_sum_txt, -r.txt_at);
  if constexpr (kHasUniform<kTarget>) {  // else both rests are 0
    label_vis += r.vis_rest;
    label_txt += r.txt_rest;
  }
  label_vis = r.g * label_vis;
  label_txt = r.g_lt * label_txt;
  acc_t plain_vis = r.g_vis * e_vis - r.g_ref * e_txt;
  acc_t plain_txt = r.g_txt * e_txt;
  if constexpr (kHasUniform<kTarget>) {
    plain_vis -= r.g_uni_vis;
    plain_txt -= r.g_uni_txt;
  }
  grad_vis = static_cast<scalar_t>(is_label ? label_vis : plain_vis);
  grad_txt = static_cast<scalar_t>(is_label ? label_txt : plain_txt);
}

// Both gradients of one column for a probability target, whose weight of the
// column is y.
template <typename scalar_t, typename acc_t>
TESLOSS_HD void grad_column_probs(scalar_t vis_in, scalar_t txt_in, acc_t y,
                                  const GradRow<acc_t>& r, scalar_t& grad_vis,
                                  scalar_t& grad_txt) {
  const acc_t e_vis = vis_weight<scalar_t>(static_cast<acc_t>(vis_in), r.max_vis);
  const acc_t e_txt = text_weight<scalar_t>(static_cast<acc_t>(txt_in), r.max_txt, r);
  grad_vis = static_cast<scalar_t>(r.g_vis * e_vis - r.g_ref * e_txt -
                                   (r.g_y_vis * y + r.g_uni_vis));
  grad_txt = static_cast<scalar_t>(r.g_txt * e_txt - (r.g_y_txt * y + r.g_uni_txt));
}

}  // namespace tesloss
