// The CPU kernels' sweeps over one row, forward and backward: the row's
// columns are read a block at a time and vectorized with at::vec, and every
// formula comes from ../tes_loss.h. tes_loss_cpu.cpp spreads the rows over
// threads and sums the batch. Included there only, once per CPU capability.
#pragma once

#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <type_traits>

#include "cpu/vec_io.h"
#include "tes_loss.h"

namespace tesloss {
namespace cpu {

using at::vec::Vectorized;

// Columns per block: a block of z and t stays in L1 between the forward's two
// sweeps over it, so the row is read from memory once.
inline constexpr int64_t kBlock = 1024;

// Vectors per run: each lane of block_state's sums adds at most this many
// terms in a row, then the run's sum to the block's, in double. Alike terms,
// added one after another, lose half-ulps that add up instead of cancelling,
// up to about kRunVectors / 2 ulps of the sum: with 128 a Mixup row's mass came
// out 11 ulps off where torch's cascade sum is 2, and with 32 (runs summed in
// float) a Mixup row's <Y, max z - z> against masked classes 8 ulps off where
// the recipe's was 0.8 (docs/DESIGN.md).
inline constexpr int64_t kRunVectors = 8;

// The forward's second sweep over a block of n columns: the sums of
// exponentials and the gaps, given the block's maxima, in runs of kRunVectors
// vectors. The last, partial vector is zero-padded and its padded lanes get
// weight 0. Each gap term is a weight times a difference the exponent already
// needed, so the gaps cost one fused multiply-add each. Two things the plain
// sums cannot take are left to a second, careful sum (kCareful): a weight of 0
// against an infinite difference (a masked class) makes nan, where the term is
// 0; and a difference or a lane's gap can overflow where the row's spread is
// near the largest float. The careful sum takes each difference scaled by
// kGapScale (tes_loss.h's scaled_gap; the plain one scales the lane sums) and
// gives a zero weight a zero term. `probs` is the block's target row
// (kHasProbs only); its sum, Y's mass, is also set in `mass`, to near a
// double's precision: see forward_row.
template <bool kCareful, int kTarget, typename scalar_t, typename acc_t>
RowState<acc_t> block_state(const scalar_t* vis, const scalar_t* txt, const acc_t* probs,
                            int64_t n, const RowParams<acc_t>& p, acc_t max_vis, acc_t max_txt,
                            double& mass) {
  using Vec = Vectorized<acc_t>;
  constexpr int64_t W = Vec::size();
  const Vec shift_vis(softmax_shift(max_vis)), shift_txt(softmax_shift(max_txt)), zero(0);
  const Vec gap_scale(static_cast<acc_t>(kGapScale));
  const Vec scaled_shift_vis = shift_vis * gap_scale, scaled_shift_txt = shift_txt * gap_scale;
  const ScaledExp<acc_t> exp_vis(acc_t(1));  // exp(z - max z)
  const auto exp_txt = text_weights<acc_t, kCareful>(p);  // exp((t - max t) / tau), accurately
  // gap_vis, gap_txt -= w * (g_vis, g_txt), for weights w of the columns and
  // the gaps' differences g.
  const auto add_gaps = [&](const Vec& w, const Vec& g_vis, const Vec& g_txt, Vec& gap_vis,
                            Vec& gap_txt) {
    if constexpr (kCareful) {  // as chunk_state does it on CUDA
      gap_vis -= weighted(w, g_vis);
      gap_txt -= weighted(w, g_txt);
    } else {
      gap_vis = at::vec::fnmadd(w, g_vis, gap_vis);
      gap_txt = at::vec::fnmadd(w, g_txt, gap_txt);
    }
  };
  Vec sum_vis(0), sum_txt(0), gap_vis(0), gap_txt(0);
  Vec uni_vis(0), uni_txt(0), y_vis(0), y_txt(0);
  Vec mass_hi(0), mass_lo(0);  // Kahan's sum and (minus) what it lost, per lane
  const auto add = [&](const Vec& z, const Vec& t, const Vec& y, int64_t lanes) {
    const Vec d_vis = z - shift_vis;  // <= 0
    const Vec d_txt = t - shift_txt;
    // The gaps' differences: the exponents' own, or scaled (kCareful).
    Vec g_vis = kCareful ? at::vec::fmsub(z, gap_scale, scaled_shift_vis) : d_vis;
    Vec g_txt = kCareful ? at::vec::fmsub(t, gap_scale, scaled_shift_txt) : d_txt;
    Vec e_vis = exp_vis(d_vis);
    Vec e = exp_txt(d_txt);
    if (lanes < W) {
      e_vis = first_lanes(e_vis, zero, lanes);
      e = first_lanes(e, zero, lanes);
    }
    sum_vis += e_vis;
    sum_txt += e;
    add_gaps(e, g_vis, g_txt, gap_vis, gap_txt);
    if constexpr (kHasProbs<kTarget>) {  // padded lanes have y = 0
      const Vec term = y - mass_lo;
      const Vec sum = mass_hi + term;
      mass_lo = (sum - mass_hi) - term;
      mass_hi = sum;
      add_gaps(y, g_vis, g_txt, y_vis, y_txt);
    }
    if constexpr (kHasUniform<kTarget>) {
      if (lanes < W) {
        g_vis = first_lanes(g_vis, zero, lanes);
        g_txt = first_lanes(g_txt, zero, lanes);
      }
      uni_vis -= g_vis;
      uni_txt -= g_txt;
    }
  };
  const auto load_probs = [&](int64_t j, int64_t count) {
    if constexpr (!kHasProbs<kTarget>) return zero;
    return count < W ? load_acc_tail<acc_t>(probs + j, count) : Vec::loadu(probs + j);
  };
  // The block's sums wait in memory, in double: as registers they pushed the
  // run's out (docs/DESIGN.md), and in double a run's sum adds no rounding to
  // the block's. The first kSums of the run's are those the kind keeps.
  Vec* const run[] = {&sum_vis, &sum_txt, &gap_vis, &gap_txt, &uni_vis, &uni_txt, &y_vis, &y_txt};
  constexpr int kSums = kHasProbs<kTarget> ? 8 : kHasUniform<kTarget> ? 6 : 4;
  double block[kSums][W] = {};
  const auto end_run = [&] {
    for (int k = 0; k < kSums; ++k) {
      add_to_doubles(block[k], *run[k]);
      *run[k] = zero;
    }
  };
  const int64_t n_full = n - n % W;
  for (int64_t start = 0; start < n_full; start += W * kRunVectors) {
    const int64_t end = std::min(start + W * kRunVectors, n_full);
    for (int64_t j = start; j < end; j += W) {
      add(load_acc<acc_t>(vis + j), load_acc<acc_t>(txt + j), load_probs(j, W), W);
    }
    end_run();
  }
  if (n_full < n) {
    add(load_acc_tail<acc_t>(vis + n_full, n - n_full),
        load_acc_tail<acc_t>(txt + n_full, n - n_full), load_probs(n_full, n - n_full),
        n - n_full);
  }
  end_run();
  // Each sum's lanes in double, rounded once; the gaps times kGapScale, exactly.
  const auto total = [&](int k, double scale = 1.0) {
    double sum = 0;
    for (int64_t l = 0; l < W; ++l) sum += block[k][l];
    return static_cast<acc_t>(sum * scale);
  };
  const double lane_scale = kCareful ? 1.0 : kGapScale;
  RowState<acc_t> out = row_state_empty<acc_t>();
  out.max_vis = max_vis;
  out.sum_vis = total(0);
  out.max_txt = max_txt;
  out.sum_txt = total(1);
  out.gap_vis = total(2, lane_scale);
  out.gap_txt = total(3, lane_scale);
  if constexpr (kHasUniform<kTarget>) {
    out.count = static_cast<acc_t>(n);
    out.uni_vis = total(4, lane_scale);
    out.uni_txt = total(5, lane_scale);
  }
  if constexpr (kHasProbs<kTarget>) {
    alignas(64) acc_t hi[W], lo[W];
    mass_hi.store(hi);
    mass_lo.store(lo);
    mass = 0;
    for (int64_t k = 0; k < W; ++k) mass += double(hi[k]) - double(lo[k]);
    out.mass = static_cast<acc_t>(mass);
    out.y_vis = total(6, lane_scale);
    out.y_txt = total(7, lane_scale);
  }
  return out;
}

template <typename acc_t>
bool gaps_finite(const RowState<acc_t>& s) {
  return std::isfinite(s.gap_vis) && std::isfinite(s.gap_txt) && std::isfinite(s.uni_vis) &&
         std::isfinite(s.uni_txt) && std::isfinite(s.y_vis) && std::isfinite(s.y_txt);
}

// The statistics of one block of n columns: its maxima (first sweep), then
// block_state (second sweep). The first sweep's max does not look for nan: a
// nan logit makes a gap in the second sweep nan, and so does a weight of 0
// against an infinite logit; either, or a gap that overflowed, sends the block
// down the careful path, which takes maxima that keep nan (so a nan logit
// makes the row's loss nan) and guards the terms.
template <int kTarget, typename scalar_t, typename acc_t>
RowState<acc_t> block_row_state(const scalar_t* vis, const scalar_t* txt, const acc_t* probs,
                                int64_t n, const RowParams<acc_t>& p, double& mass) {
  using Vec = Vectorized<acc_t>;
  constexpr int64_t W = Vec::size();
  constexpr acc_t neg_inf = -std::numeric_limits<acc_t>::infinity();
  Vec max_vis_v(neg_inf), max_txt_v(neg_inf);
  const int64_t n_full = n - n % W;
  for (int64_t j = 0; j < n_full; j += W) {
    max_vis_v = at::vec::clamp_min(max_vis_v, load_acc<acc_t>(vis + j));
    max_txt_v = at::vec::clamp_min(max_txt_v, load_acc<acc_t>(txt + j));
  }
  if (n_full < n) {
    const Vec pad(neg_inf);
    max_vis_v = at::vec::clamp_min(
        max_vis_v, first_lanes(load_acc_tail<acc_t>(vis + n_full, n - n_full), pad, n - n_full));
    max_txt_v = at::vec::clamp_min(
        max_txt_v, first_lanes(load_acc_tail<acc_t>(txt + n_full, n - n_full), pad, n - n_full));
  }
  const acc_t max_vis = lane_max(max_vis_v);
  const acc_t max_txt = lane_max(max_txt_v);
  RowState<acc_t> block =
      block_state<false, kTarget>(vis, txt, probs, n, p, max_vis, max_txt, mass);
  if (!gaps_finite(block)) {
    acc_t careful_max_vis = neg_inf, careful_max_txt = neg_inf;
    for (int64_t j = 0; j < n; ++j) {
      careful_max_vis = nan_max(careful_max_vis, static_cast<acc_t>(vis[j]));
      careful_max_txt = nan_max(careful_max_txt, static_cast<acc_t>(txt[j]));
    }
    block = block_state<true, kTarget>(vis, txt, probs, n, p, careful_max_vis, careful_max_txt,
                                       mass);
  }
  return block;
}

// One row of the forward: the online softmax, a block of columns at a time.
// `label` is the row's class index (unused for probability targets). Y's mass
// scales every gradient of a probability row, so it is summed apart from the
// merges, Kahan's way within each lane and in double beyond: a Mixup row's
// alike terms, summed plainly, came out up to 5 ulps off in fp32
// (docs/DESIGN.md).
template <int kTarget, typename scalar_t, typename acc_t>
void forward_row(const scalar_t* vis, const scalar_t* txt, const acc_t* probs, int64_t C,
                 int64_t label, const RowParams<acc_t>& p, acc_t* out) {
  double mass = 0;
  const auto block = [&](int64_t start) {
    double block_mass = 0;
    const RowState<acc_t> state = block_row_state<kTarget>(
        vis + start, txt + start, kHasProbs<kTarget> ? probs + start : nullptr,
        std::min(kBlock, C - start), p, block_mass);
    mass += block_mass;
    return state;
  };
  RowState<acc_t> row = block(0);
  for (int64_t start = kBlock; start < C; start += kBlock) {
    row = row_state_merge<kTarget>(row, block(start), p);
  }
  if constexpr (kHasProbs<kTarget>) {
    row.mass = static_cast<acc_t>(mass);
    row_finalize<kTarget>(row, acc_t(0), acc_t(0), p, out);
  } else {
    row_finalize<kTarget>(row, static_cast<acc_t>(vis[label]), static_cast<acc_t>(txt[label]), p,
                          out);
  }
}

// The backward's weights exp((x - max) * scale) of one row's logits x <= max,
// a vector at a time, as row_exp.h's vis_weight and text_weight take them.
// Where the gradients are fp32 (kExact): the difference to the max exactly
// (diff_lo), the exponent to twice float's precision (scale * log2(e) =
// hi + lo); each is a gradient element's own term, which a rounded difference
// or exponent gets wrong by |x - max| scale 2^-24 relatively. Half types take
// the short exp (ScaledExp), at little more than half the instructions. A
// masked logit (-inf) gives 0. fp64 takes at::vec's exp of (x - max) * scale.
template <typename T, bool kExact>
class RowWeights {
 public:
  using Vec = Vectorized<T>;
  RowWeights(T max, T scale, float /*hi*/, float /*lo*/) : max_(max), exp_(scale) {}
  Vec operator()(const Vec& x) const { return exp_(x - max_); }

 private:
  Vec max_;
  ScaledExp<T> exp_;
};

template <>
class RowWeights<float, true> {
 public:
  using Vec = Vectorized<float>;
  RowWeights(float max, float /*scale*/, float hi, float lo)
      : max_(max), hi_(hi), lo_(lo), d_min_(kExp2Zero / hi), lo_bound_(0x1p-8f / hi) {}
  Vec operator()(const Vec& x) const {
    const Vec d_exact = x - max_;
#if defined(TESLOSS_VEC_EXP2)
    const Vec d = at::vec::clamp_min(d_exact, d_min_);  // a masked logit's weight is 0
    // Where d counts (>= d_min) |d_lo * hi| < 2^-16; elsewhere d_lo may be nan
    // (a masked logit) or large (a spread near the largest float): bounded to
    // 2^-8 / hi, it leaves such a weight 0.
    const Vec d_lo = at::vec::clamp_max(Vec(max_or(diff_lo(x, max_, d_exact), -lo_bound_)),
                                        lo_bound_);
    const Vec n = nearest(d * hi_);
    const Vec rest = at::vec::fmadd(d_lo, hi_, at::vec::fmsub(d, hi_, n));
    return times_pow2(exp2_poly(at::vec::fmadd(d, lo_, rest)), n);
#else
    alignas(64) float lanes[Vec::size()];
    alignas(64) float lanes_lo[Vec::size()];
    d_exact.store(lanes);
    diff_lo(x, max_, d_exact).store(lanes_lo);
    for (int k = 0; k < Vec::size(); ++k) {
      lanes[k] = split_exp<true>(lanes[k], lanes_lo[k], hi_[0], lo_[0]);
    }
    return Vec::loadu(lanes);
#endif
  }

 private:
  Vec max_, hi_, lo_, d_min_, lo_bound_;
};

// One row of the backward: reads z, t (and a probability target) once, writes
// both gradients once. Whole vectors take every column; for a class index,
// the label's column is written again at the end.
template <int kTarget, typename scalar_t, typename acc_t>
void backward_row(const scalar_t* vis, const scalar_t* txt, const acc_t* probs, int64_t C,
                  int64_t label, const GradRow<acc_t>& r, scalar_t* grad_vis,
                  scalar_t* grad_txt) {
  using Vec = Vectorized<acc_t>;
  constexpr int64_t W = Vec::size();
  const auto column = [&](int64_t j) {
    if constexpr (kHasProbs<kTarget>) {
      grad_column_probs(vis[j], txt[j], probs[j], r, grad_vis[j], grad_txt[j]);
    } else {
      grad_column<kTarget>(vis[j], txt[j], j == label, r, grad_vis[j], grad_txt[j]);
    }
  };
  // A row with a nan logit has a nan max; the vector exp need not keep that
  // nan, so such a row takes the scalar path for every column.
  if (std::isnan(r.max_vis) || std::isnan(r.max_txt)) {
    for (int64_t j = 0; j < C; ++j) column(j);
    return;
  }
  const Vec g_vis(r.g_vis), g_ref(r.g_ref), g_txt(r.g_txt), g_uni_vis(r.g_uni_vis),
      g_uni_txt(r.g_uni_txt), g_y_vis(r.g_y_vis), g_y_txt(r.g_y_txt);
  using Weights = RowWeights<acc_t, kExactWeights<scalar_t>>;
  const Weights exp_vis(r.max_vis, acc_t(1), kLog2eHi, kLog2eLo);
  const Weights exp_txt(r.max_txt, r.inv_tau, r.txt_exp_hi, r.txt_exp_lo);
  // Columns j.. of one vector: y is the target's weights (kHasProbs only).
  const auto grads = [&](const Vec& z, const Vec& t, const Vec& y, Vec& gv, Vec& gt) {
    const Vec e_vis = exp_vis(z);
    const Vec e_txt = exp_txt(t);
    gv = at::vec::fmsub(g_vis, e_vis, g_ref * e_txt);
    gt = g_txt * e_txt;
    if constexpr (kHasProbs<kTarget>) {
      gv = gv - at::vec::fmadd(g_y_vis, y, g_uni_vis);
      gt = gt - at::vec::fmadd(g_y_txt, y, g_uni_txt);
    } else if constexpr (kHasUniform<kTarget>) {
      gv = gv - g_uni_vis;
      gt = gt - g_uni_txt;
    }
  };
  const auto load_probs = [&](int64_t j, int64_t count) {
    if constexpr (!kHasProbs<kTarget>) return Vec(0);
    return count < W ? load_acc_tail<acc_t>(probs + j, count) : Vec::loadu(probs + j);
  };
  const int64_t n_full = C - C % W;
  Vec gv, gt;
  int64_t j = 0;
  if constexpr (!std::is_same_v<scalar_t, acc_t>) {
    // A vector of a half type holds two float vectors: convert them back
    // together, which costs what converting one alone does.
    Vec gv_hi, gt_hi;
    for (; j + 2 * W <= C; j += 2 * W) {
      grads(load_acc<acc_t>(vis + j), load_acc<acc_t>(txt + j), load_probs(j, W), gv, gt);
      grads(load_acc<acc_t>(vis + j + W), load_acc<acc_t>(txt + j + W), load_probs(j + W, W),
            gv_hi, gt_hi);
      at::vec::convert_from_float<scalar_t>(gv, gv_hi).store(grad_vis + j);
      at::vec::convert_from_float<scalar_t>(gt, gt_hi).store(grad_txt + j);
    }
  }
  for (; j < n_full; j += W) {
    grads(load_acc<acc_t>(vis + j), load_acc<acc_t>(txt + j), load_probs(j, W), gv, gt);
    store_acc(grad_vis + j, gv);
    store_acc(grad_txt + j, gt);
  }
  if (n_full < C) {  // the last, partial vector, zero-padded
    grads(load_acc_tail<acc_t>(vis + n_full, C - n_full),
          load_acc_tail<acc_t>(txt + n_full, C - n_full), load_probs(n_full, C - n_full), gv,
          gt);
    alignas(64) acc_t vis_tail[W];
    alignas(64) acc_t txt_tail[W];
    gv.store(vis_tail);
    gt.store(txt_tail);
    for (int64_t k = 0; k < C - n_full; ++k) {
      grad_vis[n_full + k] = static_cast<scalar_t>(vis_tail[k]);
      grad_txt[n_full + k] = static_cast<scalar_t>(txt_tail[k]);
    }
  }
  if constexpr (!kHasProbs<kTarget>) column(label);
}

}  // namespace cpu
}  // namespace tesloss
