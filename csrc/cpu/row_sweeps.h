// The CPU forward's sweeps over one row: the row's maxima, then its sums,
// vectorized with at::vec, every formula from ../tes_loss.h. The sums take the
// row's own weights (cpu/row_weights.h), the backward's, and can keep them for
// the single pass's gradients (cpu/grad_sweeps.h). Included there only, once
// per CPU capability.
#pragma once

#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <type_traits>

#include "cpu/row_weights.h"
#include "cpu/vec_io.h"
#include "tes_loss.h"

namespace tesloss {
namespace cpu {

using at::vec::Vectorized;

// Vectors per run: each lane of sweep_state's sums adds at most this many
// terms in a row, then the run's sum to the row's, in double. Alike terms,
// added one after another, lose half-ulps that add up instead of cancelling,
// up to about kRunVectors / 2 ulps of the sum: with 128 a Mixup row's mass came
// out 11 ulps off where torch's cascade sum is 2, and with 32 (runs summed in
// float) a Mixup row's <Y, max z - z> against masked classes 8 ulps off where
// the recipe's was 0.8 (docs/DESIGN.md).
inline constexpr int64_t kRunVectors = 8;

// The forward's second sweep over a row of n columns: the sums of exponentials
// and the gaps, given the row's maxima, in runs of kRunVectors vectors. The
// last, partial vector is zero-padded and its padded lanes get weight 0. The
// weights are the backward's (row_weights.h), of the difference to the max;
// kStore also writes them to w_vis and w_txt (n each), and the sweep asks for
// the `next` row meanwhile (vec_io.h's NextRow). Each gap term is a weight
// times a difference the exponent already needed, so the gaps cost one fused
// multiply-add each. Two things the plain sums cannot take are left to a
// second, careful sum (kCareful): a weight of 0 against an infinite difference
// (a masked class) makes nan, where the term is 0; and a difference or a lane's
// gap can overflow where the row's spread is near the largest float. The
// careful sum takes each difference scaled by kGapScale (tes_loss.h's
// scaled_gap; the plain one scales the lane sums) and gives a zero weight a
// zero term, with the forward's own weights, which keep a nan max's nan (where
// the plain sum has a nan, the row's maxima are finite: a nan or infinite logit
// makes a nan gap). `probs` is the row's target (kHasProbs only); its sum, Y's
// mass, is also set in `mass`, to near a double's precision: see forward_row.
template <bool kCareful, int kTarget, bool kStore = false, typename scalar_t, typename acc_t>
RowState<acc_t> sweep_state(const scalar_t* vis, const scalar_t* txt, const acc_t* probs,
                            int64_t n, const RowParams<acc_t>& p, acc_t max_vis, acc_t max_txt,
                            double& mass, acc_t* w_vis = nullptr, acc_t* w_txt = nullptr,
                            const NextRow<scalar_t, acc_t>& next = {}) {
  static_assert(!(kCareful && kStore), "the careful sum keeps no weights");
  using Vec = Vectorized<acc_t>;
  constexpr int64_t W = Vec::size();
  const Vec shift_vis(softmax_shift(max_vis)), shift_txt(softmax_shift(max_txt)), zero(0);
  const Vec gap_scale(static_cast<acc_t>(kGapScale));
  const Vec scaled_shift_vis = shift_vis * gap_scale, scaled_shift_txt = shift_txt * gap_scale;
  const ScaledExp<acc_t> careful_vis(acc_t(1));  // exp(z - max z)
  const auto careful_txt = text_weights<acc_t, true>(p);  // exp((t - max t) / tau)
  const auto exp_vis = row_vis_weights<scalar_t>(max_vis);
  const auto exp_txt = row_txt_weights<scalar_t>(max_txt, p);
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
  const auto add = [&](int64_t j, const Vec& z, const Vec& t, const Vec& y, int64_t lanes) {
    const Vec d_vis = z - shift_vis;  // <= 0
    const Vec d_txt = t - shift_txt;
    // The gaps' differences: the exponents' own, or scaled (kCareful).
    Vec g_vis = kCareful ? at::vec::fmsub(z, gap_scale, scaled_shift_vis) : d_vis;
    Vec g_txt = kCareful ? at::vec::fmsub(t, gap_scale, scaled_shift_txt) : d_txt;
    Vec e_vis = kCareful ? careful_vis(d_vis) : exp_vis.of_diff(z, d_vis);
    Vec e = kCareful ? careful_txt(d_txt) : exp_txt.of_diff(t, d_txt);
    if (lanes < W) {
      e_vis = first_lanes(e_vis, zero, lanes);
      e = first_lanes(e, zero, lanes);
    }
    if constexpr (kStore) {
      e_vis.store(w_vis + j, static_cast<int>(lanes));
      e.store(w_txt + j, static_cast<int>(lanes));
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
  // The row's sums wait in memory, in double: as registers they pushed the
  // run's out (docs/DESIGN.md), and in double a run's sum adds no rounding to
  // the row's. The first kSums of the run's are those the kind keeps.
  Vec* const run[] = {&sum_vis, &sum_txt, &gap_vis, &gap_txt, &uni_vis, &uni_txt, &y_vis, &y_txt};
  constexpr int kSums = kHasProbs<kTarget> ? 8 : kHasUniform<kTarget> ? 6 : 4;
  double sums[kSums][W] = {};
  const auto end_run = [&] {
    for (int k = 0; k < kSums; ++k) {
      add_to_doubles(sums[k], *run[k]);
      *run[k] = zero;
    }
  };
  const int64_t n_full = n - n % W;
  for (int64_t start = 0; start < n_full; start += W * kRunVectors) {
    const int64_t end = std::min(start + W * kRunVectors, n_full);
    for (int64_t j = start; j < end; j += W) {
      next.fetch(j);
      add(j, load_acc<acc_t>(vis + j), load_acc<acc_t>(txt + j), load_probs(j, W), W);
    }
    end_run();
  }
  if (n_full < n) {
    add(n_full, load_acc_tail<acc_t>(vis + n_full, n - n_full),
        load_acc_tail<acc_t>(txt + n_full, n - n_full), load_probs(n_full, n - n_full),
        n - n_full);
  }
  end_run();
  // Each sum's lanes in double, rounded once; the gaps times kGapScale, exactly.
  const auto total = [&](int k, double scale = 1.0) {
    double sum = 0;
    for (int64_t l = 0; l < W; ++l) sum += sums[k][l];
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

// A row's maxima, as one vector sweep. It does not look for nan: a nan logit
// makes a gap of sweep_state's nan, and so does a weight of 0 against an
// infinite logit; either, or a gap that overflowed, sends the row down the
// careful path (row_state), which takes maxima that keep nan (so a nan logit
// makes the row's loss nan) and guards the terms.
template <typename scalar_t, typename acc_t>
void row_maxima(const scalar_t* vis, const scalar_t* txt, int64_t n, acc_t& max_vis,
                acc_t& max_txt) {
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
  max_vis = lane_max(max_vis_v);
  max_txt = lane_max(max_txt_v);
}

// The statistics of a row whose plain sums were not finite: the careful sum,
// from maxima that keep nan.
template <int kTarget, typename scalar_t, typename acc_t>
RowState<acc_t> careful_row_state(const scalar_t* vis, const scalar_t* txt, const acc_t* probs,
                                  int64_t n, const RowParams<acc_t>& p, double& mass) {
  acc_t max_vis = -std::numeric_limits<acc_t>::infinity(), max_txt = max_vis;
  for (int64_t j = 0; j < n; ++j) {
    max_vis = nan_max(max_vis, static_cast<acc_t>(vis[j]));
    max_txt = nan_max(max_txt, static_cast<acc_t>(txt[j]));
  }
  return sweep_state<true, kTarget>(vis, txt, probs, n, p, max_vis, max_txt, mass);
}

// The loss and the statistics of a row (kNumRowStats values to `out`) from
// its state; `label` is the row's class index (unused for probability targets).
template <int kTarget, typename scalar_t, typename acc_t>
void finish_row(RowState<acc_t> row, double mass, const scalar_t* vis, const scalar_t* txt,
                int64_t label, const RowParams<acc_t>& p, acc_t* out) {
  if constexpr (kHasProbs<kTarget>) {
    row.mass = static_cast<acc_t>(mass);
    row_finalize<kTarget>(row, acc_t(0), acc_t(0), p, out);
  } else {
    row_finalize<kTarget>(row, static_cast<acc_t>(vis[label]), static_cast<acc_t>(txt[label]), p,
                          out);
  }
}

// One row of the forward: its maxima, then its sums, over the whole row (two
// reads of it: the second mostly from the caches). Y's mass scales every
// gradient of a probability row, so it is summed Kahan's way within each lane
// and in double beyond: a Mixup row's alike terms, summed plainly, came out up
// to 5 ulps off in fp32 (docs/DESIGN.md).
template <int kTarget, typename scalar_t, typename acc_t>
void forward_row(const scalar_t* vis, const scalar_t* txt, const acc_t* probs, int64_t C,
                 int64_t label, const RowParams<acc_t>& p, acc_t* out) {
  acc_t max_vis, max_txt;
  row_maxima(vis, txt, C, max_vis, max_txt);
  double mass = 0;
  RowState<acc_t> row = sweep_state<false, kTarget>(vis, txt, probs, C, p, max_vis, max_txt, mass);
  if (!gaps_finite(row)) row = careful_row_state<kTarget>(vis, txt, probs, C, p, mass);
  finish_row<kTarget>(row, mass, vis, txt, label, p, out);
}

}  // namespace cpu
}  // namespace tesloss
