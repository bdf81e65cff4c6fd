// Row math of the TeS loss: the one copy of the formulas, shared by the CPU
// kernel (tes_loss.cpp) and the CUDA kernels (cuda/tes_loss.cu).
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
#include <type_traits>

#if defined(__CUDACC__) || defined(__HIPCC__)
#define TESLOSS_HD __host__ __device__ __forceinline__
#else
#define TESLOSS_HD inline
#include <ATen/cpu/vec/vec.h>
#endif

namespace tesloss {

// Columns of the [B, kNumRowStats] tensor the forward saves for the backward
// and for the logged parts.
enum RowStat : int {
  kRowLoss = 0,
  kRowLseVis = 1,
  kRowLseTxt = 2,
  kRowCeVis = 3,   // CE(z, y), the hard-label vision loss
  kRowKlRef = 4,   // KL(p_ref || p_v)
  kRowCeTxt = 5,   // CE(s, y)
  kNumRowStats = 6,
};

// Entries of the [kNumBatchStats] tensor: the count of rows that are not
// ignored, and the means of the parts over those rows.
enum BatchStat : int {
  kBatchValid = 0,
  kBatchCeVis = 1,
  kBatchKlRef = 2,
  kBatchCeTxt = 3,
  kNumBatchStats = 4,
};

// Same numbering as at::Reduction, so the Python side passes PyTorch's own.
enum Reduction : int64_t { kReduceNone = 0, kReduceMean = 1, kReduceSum = 2 };

template <typename acc_t>
struct Params {
  acc_t inv_tau;
  acc_t lambda_v;
  acc_t lambda_t;
  int64_t ignore_index;
};

// Accumulation type: fp64 for fp64 logits, fp32 for every other dtype.
template <typename scalar_t>
using acc_t_of = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;

template <typename acc_t>
inline Params<acc_t> make_params(double tau, double lambda_v, double lambda_t,
                                 int64_t ignore_index) {
  return Params<acc_t>{static_cast<acc_t>(1.0 / tau), static_cast<acc_t>(lambda_v),
                       static_cast<acc_t>(lambda_t), ignore_index};
}

#if defined(__CUDACC__)
// On the GPU, an fp32 exp is 2^(x log2 e) from the MUFU unit's ex2.approx.ftz:
// two instructions where expf takes eight. The forward kernel takes two or more
// exponentials per column and, with expf, was bound by instruction issue rather
// than memory in bf16 (sm_90 SASS: 42 instructions per column, 3 columns per
// clock per multiprocessor, about 3.2 TB/s of bf16 logits on an H200). Rounding
// x log2 e to fp32 errs by about |x| 2^-24 relative, and ex2.approx by about 2
// ulp; every x here is a logit minus its row's max or log-sum-exp, and the terms
// that matter have |x| < 20. Results below 2^-126 flush to 0. Host code that
// nvcc compiles (only tests/test_cuda_schedules.py runs any) rounds the same
// product and flushes alike, leaving out only ex2.approx's own error.
TESLOSS_HD float tes_exp(float x) {
  const float t = x * 1.44269504088896341f;
#if defined(__CUDA_ARCH__)
  float y;
  asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(t));
  return y;
#else
  const float y = ::exp2f(t);
  return y < std::numeric_limits<float>::min() ? 0.0f : y;
#endif
}
#else
TESLOSS_HD float tes_exp(float x) { return ::expf(x); }
#endif
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

#if !defined(__CUDACC__) && !defined(__HIPCC__)
// Vector forms of the element functions, for the CPU kernel.
// For float (see tes_exp below): exp_avx512 where the kernels are built for AVX-512, else
// ATen's exp_u20, a short polynomial. Both are much cheaper than SLEEF's 1-ulp
// exp (the CPU kernels spend most of their time in exp) and leave the fp32
// results as accurate as SLEEF does, measured against the fp64 reference: the
// rounding of s = t / tau and of the log-sum-exps dominates. exp_u20 maps nan
// to a large number, so no caller relies on exp to carry a nan: the forward
// finds nan logits through the products e * z and e * t, the backward through
// the row's log-sum-exps. fp64 keeps the exact exp.
#if defined(CPU_CAPABILITY_AVX512)
// 2^t of 16 floats in eight instructions, as 2^n * 2^f with n = round(t) and
// f = t - n: vreduceps gives f exactly, and gives 0 for t = +-inf, so 2^-inf
// = 0 and 2^inf = inf need no clamp; a degree-5 polynomial gives 2^f on
// [-1/2, 1/2] (relative error 1.4e-7, fitted for this file); vscalefps gives
// 2^n, inf on overflow and 0 on underflow. A nan stays nan. Its error, like
// exp_u20's, stays far below the fp32 rounding of t / tau (tests/conftest.py).
inline __m512 exp2_avx512(__m512 t) {
  constexpr int kNearest = _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC;
  const __m512 n = _mm512_roundscale_ps(t, kNearest);
  const __m512 f = _mm512_reduce_ps(t, kNearest);
  __m512 p = _mm512_set1_ps(0.0013266970636323094f);
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(0.009675459936261177f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(0.05550742521882057f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(0.24022121727466583f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(0.6931469440460205f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.0000001192092896f));
  return _mm512_scalef_ps(p, n);
}

constexpr float kLog2e = 1.44269504088896341f;

inline at::vec::Vectorized<float> exp_avx512(const at::vec::Vectorized<float>& x) {
  return exp2_avx512(_mm512_mul_ps(x, _mm512_set1_ps(kLog2e)));
}
#endif

template <typename T>
inline at::vec::Vectorized<T> tes_exp(const at::vec::Vectorized<T>& x) {
  if constexpr (std::is_same_v<T, float>) {
#if defined(CPU_CAPABILITY_AVX512)
    return exp_avx512(x);
#else
    return x.exp_u20();
#endif
  } else {
    return x.exp();
  }
}

// exp(x * scale - shift) of vectors x, for one scale and shift: the text
// logits' exp(t / tau - shift), where s = t / tau is never needed by itself.
template <typename T>
class ScaledExp {
 public:
  ScaledExp(T scale, T shift) : scale_(scale), shift_(shift) {}
  at::vec::Vectorized<T> operator()(const at::vec::Vectorized<T>& x) const {
    return tes_exp(x * scale_ - shift_);
  }

 private:
  at::vec::Vectorized<T> scale_, shift_;
};

#if defined(CPU_CAPABILITY_AVX512)
// On AVX-512, the scaling, the shift and the change to base 2 are one fma:
// 2^(x * (scale log2 e) - shift log2 e). Rounding scale log2 e and shift log2 e
// errs by about as much as rounding t / tau does, which the tests allow for.
template <>
class ScaledExp<float> {
 public:
  ScaledExp(float scale, float shift)
      : scale_log2e_(_mm512_set1_ps(scale * kLog2e)),
        shift_log2e_(_mm512_set1_ps(shift * kLog2e)) {}
  at::vec::Vectorized<float> operator()(const at::vec::Vectorized<float>& x) const {
    return exp2_avx512(_mm512_fmsub_ps(x, scale_log2e_, shift_log2e_));
  }

 private:
  __m512 scale_log2e_, shift_log2e_;
};
#endif

template <typename T>
inline at::vec::Vectorized<T> weighted(const at::vec::Vectorized<T>& e,
                                       const at::vec::Vectorized<T>& x) {
  using Vec = at::vec::Vectorized<T>;
  const Vec zero(T(0));
  return Vec::blendv(e * x, zero, e == zero);
}
#endif

// exp(old_max - new_max), the factor that moves a running sum to a new max.
// Equal maxima (including both -inf for an empty partial) give exactly 1.
template <typename acc_t>
TESLOSS_HD acc_t rescale(acc_t old_max, acc_t new_max) {
  return old_max == new_max ? acc_t(1) : tes_exp(old_max - new_max);
}

template <typename acc_t>
TESLOSS_HD bool is_ignored(int64_t label, const Params<acc_t>& p) {
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
                             const Params<acc_t>& p, acc_t* out) {
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
// Generic in T so the CPU kernel runs it on whole vectors (onehot = 0) and on
// the label's column (onehot = 1), always in the accumulation type, so the
// label's term is never rounded to a half type before it is subtracted.
template <typename T>
TESLOSS_HD T vis_grad(T p_v, T p_ref, T onehot, T g, T lambda_v, T one_minus_lambda_v) {
  return g * (p_v - lambda_v * p_ref - one_minus_lambda_v * onehot);
}

// dloss/dt for one column: g_txt * (p_ref - onehot), g_txt = g * lambda_t / tau.
template <typename T>
TESLOSS_HD T txt_grad(T p_ref, T onehot, T g_txt) {
  return g_txt * (p_ref - onehot);
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
