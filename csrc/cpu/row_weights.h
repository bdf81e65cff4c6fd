// The weights exp((x - max) * scale) of one row's logits x <= max, a vector at
// a time, as row_exp.h's vis_weight and text_weight take them: the forward sums
// them, and the gradients are formed of them, so the forward, the backward and
// the single pass (cpu/grad_sweeps.h) all take the same weights of a row.
#pragma once

#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>

#include "tes_loss.h"

namespace tesloss {
namespace cpu {

using at::vec::Vectorized;

// Where the gradients are fp32 (kExact): the difference to the max exactly
// (diff_lo), the exponent to twice float's precision (scale * log2(e) =
// hi + lo); each is a gradient element's own term, which a rounded difference
// or exponent gets wrong by |x - max| scale 2^-24 relatively. Half types take
// the short exp (ScaledExp), at little more than half the instructions. A
// masked logit (-inf) gives 0. fp64 takes at::vec's exp of (x - max) * scale.
// of_diff takes d = x - max as its caller already rounded it.
template <typename T, bool kExact>
class RowWeights {
 public:
  using Vec = Vectorized<T>;
  RowWeights(T max, T scale, float /*hi*/, float /*lo*/) : max_(max), exp_(scale) {}
  Vec operator()(const Vec& x) const { return of_diff(x, x - max_); }
  Vec of_diff(const Vec& /*x*/, const Vec& d) const { return exp_(d); }

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
  Vec operator()(const Vec& x) const { return of_diff(x, x - max_); }
  Vec of_diff(const Vec& x, const Vec& d_exact) const {
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

// A row's vision weights exp(z - max z) and text weights exp((t - max t) / tau)
// for gradients of scalar_t; `p` is RowParams or GradRow.
template <typename scalar_t, typename acc_t>
using RowWeightsOf = RowWeights<acc_t, kExactWeights<scalar_t>>;
template <typename scalar_t, typename acc_t>
RowWeightsOf<scalar_t, acc_t> row_vis_weights(acc_t max_vis) {
  return RowWeightsOf<scalar_t, acc_t>(max_vis, acc_t(1), kLog2eHi, kLog2eLo);
}
template <typename scalar_t, typename acc_t, typename P>
RowWeightsOf<scalar_t, acc_t> row_txt_weights(acc_t max_txt, const P& p) {
  return RowWeightsOf<scalar_t, acc_t>(max_txt, p.inv_tau, static_cast<float>(p.txt_exp_hi),
                                       static_cast<float>(p.txt_exp_lo));
}

}  // namespace cpu
}  // namespace tesloss
