// The CPU's exponentials: the scalar exp, and the vector exp the kernels spend
// most of their time in. tes_loss.h includes this header where it is compiled
// for the CPU.
//
// For float vectors: exp2_avx512 below where the kernels are built for
// AVX-512, else ATen's exp_u20, a short polynomial. Both are much cheaper than
// SLEEF's 1-ulp exp and leave the fp32 results as accurate as SLEEF does
// against the fp64 reference, because the rounding of s = t / tau and of the
// log-sum-exps dominates (docs/DESIGN.md). exp_u20 maps nan to a large number,
// so no caller relies on exp to carry a nan: the forward finds nan logits
// through the products e * z and e * t, the backward through the row's
// log-sum-exps. fp64 keeps the exact exp.
#pragma once

#include <ATen/cpu/vec/vec.h>

#include <cmath>
#include <type_traits>

namespace tesloss {

inline float tes_exp(float x) { return ::expf(x); }

#if defined(CPU_CAPABILITY_AVX512)
// 2^t of 16 floats in eight instructions, as 2^n * 2^f with n = round(t) and
// f = t - n: vreduceps gives f exactly, and gives 0 for t = +-inf, so 2^-inf
// = 0 and 2^inf = inf need no clamp; a degree-5 polynomial gives 2^f on
// [-1/2, 1/2]; vscalefps gives 2^n, inf on overflow and 0 on underflow. A nan
// stays nan. csrc/cpu/fit_exp2.py fits the coefficients, prints their error
// (1.8e-7 relative, evaluated in float32 as here) and checks this header.
inline __m512 exp2_avx512(__m512 t) {
  constexpr int kNearest = _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC;
  const __m512 n = _mm512_roundscale_ps(t, kNearest);
  const __m512 f = _mm512_reduce_ps(t, kNearest);
  __m512 p = _mm512_set1_ps(0.0013276472454890609f);
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(0.009675540961325169f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(0.05550713092088699f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(0.24022120237350464f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(0.6931470036506653f));
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

}  // namespace tesloss
