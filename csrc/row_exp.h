// The exponentials and logs of the row math (tes_loss.h), for each device:
// the device's own exp comes first (cuda/device_exp.cuh where nvcc compiles,
// and where tests/cuda_emulator compiles the CUDA kernels as host code;
// cpu/vec_exp.h for the CPU), then the weights the forward and the backward
// take of it, accurate to the last bits of their exponents.
#pragma once

#include <cmath>

#include "params.h"

// The element functions differ by device: each device's exp comes first, so
// the templates below find it. tests/cuda_emulator compiles the CUDA kernels
// as host code, with the CUDA kernels' exp.
#if defined(__CUDACC__) || defined(__HIPCC__) || defined(TESLOSS_CUDA_EMULATOR)
#define TESLOSS_HD __host__ __device__ __forceinline__
#include "cuda/device_exp.cuh"
#else
#define TESLOSS_HD inline
#include "cpu/vec_exp.h"
#endif

namespace tesloss {

TESLOSS_HD double tes_exp(double x) { return ::exp(x); }
TESLOSS_HD double tes_exp_unflushed(double x) { return ::exp(x); }
TESLOSS_HD float tes_log(float x) { return ::logf(x); }
TESLOSS_HD double tes_log(double x) { return ::log(x); }

// x - y = d + diff_lo(x, y, d) exactly, where d is x - y rounded (Knuth's
// TwoSum; acc_t may also be a CPU vector). Between a logit and its row's max
// d loses up to half an ulp of itself: at d = -30, 9.5e-7, and as much of
// exp(d) relatively.
template <typename acc_t>
TESLOSS_HD acc_t diff_lo(acc_t x, acc_t y, acc_t d) {
  const acc_t y_part = d - x;
  const acc_t x_part = d - y_part;
  return (x - x_part) - (y + y_part);
}

// exp((d + d_lo) * s) for d <= 0, where log2(e) * s = hi + lo to twice float's
// precision: 2^(n + f), with the exponent's integer part n = round(d * hi) and
// the rest f = d * hi - n + d_lo * hi + d * lo, each fused multiply-add
// rounding once, so f is right to its last bit however large |d| * s is.
// Rounding the exponent d * log2(e) * s to float instead errs by
// |d * s| 2^-24 relatively, 1e-6 at d * s = -10: a weight far below the row's
// max is as accurate as one near it. kWithLo takes d_lo (the backward, where
// each weight is a gradient element's own term); without it d is taken as
// exact (the forward, where weights are only summed). Weights below 2^-126
// are subnormal, not 0: the backward multiplies them by factors up to
// lambda_t / tau, which bring them back among the normal numbers.
template <bool kWithLo>
TESLOSS_HD float split_exp(float d, float d_lo, float hi, float lo) {
  const float t = d * hi;
  if (t != t) return t;
  if (t < kExp2Underflow) return 0.0f;
  const float n = rintf(t);
  const float rest = fmaf(d, hi, -n);
  const float f = fmaf(d, lo, kWithLo ? fmaf(d_lo, hi, rest) : rest);
  return times_pow2(tes_exp2(f), static_cast<int>(n));
}

// A text weight exp(d / tau), d = t - max t <= 0, and a vision weight
// exp(d), d = z - max z <= 0, each as split_exp takes it; `p` is RowParams or
// GradRow. The forward's vision weights take the shorter tes_exp: only their
// sum is kept, and a weight's error there is that weight's share of an ulp of
// the row's log-sum-exp. fp64 takes its exact exp of d (d_lo is far below
// what the rule asks of fp64).
template <typename P>
TESLOSS_HD double text_exp(double d, const P& p) {
  return tes_exp(d * p.inv_tau);
}
template <typename P>
TESLOSS_HD float text_exp(float d, const P& p) {
  return split_exp<false>(d, 0.0f, p.txt_exp_hi, p.txt_exp_lo);
}
template <typename P>
TESLOSS_HD double text_exp(double d, double /*d_lo*/, const P& p) {
  return text_exp(d, p);
}
template <typename P>
TESLOSS_HD float text_exp(float d, float d_lo, const P& p) {
  return split_exp<true>(d, d_lo, p.txt_exp_hi, p.txt_exp_lo);
}
TESLOSS_HD double vis_exp(double d, double /*d_lo*/) { return tes_exp(d); }
TESLOSS_HD float vis_exp(float d, float d_lo) {
  return split_exp<true>(d, d_lo, kLog2eHi, kLog2eLo);
}

// The backward's weights exp(z - max) and exp((t - max) / tau) for gradients
// of scalar_t: of the difference to the max exactly where they are fp32 (or
// fp64), the forward's forms for half types, whose rounding (an ulp of fp16 is
// 4.9e-4 relatively) swamps those forms' error, at most 9e-6 relatively
// where a weight is not 0 (cpu/row_sweeps.h's RowWeights is the CPU's vector
// form). Either keeps a subnormal weight: bf16 holds what a factor makes of it.
template <typename scalar_t>
inline constexpr bool kExactWeights = sizeof(scalar_t) >= 4;

template <typename scalar_t, typename acc_t>
TESLOSS_HD acc_t vis_weight(acc_t z, acc_t max_vis) {
  const acc_t d = z - max_vis;
  if constexpr (!kExactWeights<scalar_t>) return tes_exp_unflushed(d);
  return vis_exp(d, diff_lo(z, max_vis, d));
}
template <typename scalar_t, typename acc_t, typename P>
TESLOSS_HD acc_t text_weight(acc_t t, acc_t max_txt, const P& p) {
  const acc_t d = t - max_txt;
  if constexpr (!kExactWeights<scalar_t>) return text_exp(d, p);
  return text_exp(d, diff_lo(t, max_txt, d), p);
}

// exp(old_max - new_max), the factor that moves a running sum of exp(z - max)
// to a new max. Equal maxima (including both -inf for an empty partial) give
// exactly 1.
template <typename acc_t>
TESLOSS_HD acc_t rescale(acc_t old_max, acc_t new_max) {
  return old_max == new_max ? acc_t(1) : tes_exp(old_max - new_max);
}

// The factor that moves a running sum of text weights to a new max.
template <typename acc_t>
TESLOSS_HD acc_t rescale_txt(acc_t old_max, acc_t new_max, const RowParams<acc_t>& p) {
  return old_max == new_max ? acc_t(1) : text_exp(old_max - new_max, p);
}

}  // namespace tesloss
