// The CPU's exponentials: the scalar exp, and the vector exp the kernels spend
// most of their time in. tes_loss.h includes this header where it is compiled
// for the CPU.
//
// For float vectors on AVX-512 and AVX2 builds: 2^(x log2 e) as 2^n * p(f),
// with n = round(x log2 e), f the rest, in [-1/2, 1/2], and p a degree-6
// polynomial whose constant term is 1, so that exp(0) = 1 exactly.
// csrc/cpu/fit_exp2.py fits the coefficients and prints their error: 6.9e-8
// relative evaluated in float32 as here, below SLEEF's 1-ulp exp, at about a
// third of its cost. Where rounding x log2 e matters (|x| large), the result is
// far below the row's largest term. Other builds take at::vec's exp. fp64
// keeps the exact exp. The vector exp need not carry a nan: the forward finds
// nan logits through the products of weights and logits, the backward through
// the row's statistics.
#pragma once

#include <ATen/cpu/vec/vec.h>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <type_traits>

#include "params.h"

namespace tesloss {

inline float tes_exp(float x) { return ::expf(x); }
// The same, for the backward's weights, which must keep results below 2^-126
// (expf does).
inline float tes_exp_unflushed(float x) { return ::expf(x); }

#if defined(CPU_CAPABILITY_AVX512) || defined(CPU_CAPABILITY_AVX2)
#define TESLOSS_VEC_EXP2 1
// p(f) ~ 2^f on [-1/2, 1/2], highest degree first, as Horner's rule applies them.
inline constexpr float kExp2Coefficients[] = {
    0.00015755544882267714f, 0.0013388795778155327f, 0.009617256000638008f,
    0.055503591895103455f,   0.24022650718688965f,   0.6931471824645996f,
    1.0f,
};
#endif

#if defined(CPU_CAPABILITY_AVX512)
using Floats = __m512;
inline Floats exp2_poly(Floats f) {  // p(f) ~ 2^f for f in [-1/2, 1/2]
  Floats p = _mm512_set1_ps(kExp2Coefficients[0]);
  for (int k = 1; k < 7; ++k) p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(kExp2Coefficients[k]));
  return p;
}
inline Floats nearest(Floats t) {
  return _mm512_roundscale_ps(t, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
}
inline Floats times_pow2(Floats p, Floats n) { return _mm512_scalef_ps(p, n); }
// max(a, b), and b where a is nan (vmaxps returns its second operand then).
inline Floats max_or(Floats a, Floats b) { return _mm512_max_ps(a, b); }
inline constexpr float kExp2Zero = -160.0f;  // 2^kExp2Zero * p(f) rounds to 0

// 2^t of 16 floats: vreduceps gives f = t - round(t) exactly, and gives 0 for
// t = +-inf, so 2^-inf = 0 and 2^inf = inf need no clamp; vscalefps gives
// p(f) * 2^n, inf on overflow and 0 on underflow. A nan stays nan.
inline Floats exp2_vec(Floats t) {
  const Floats f = _mm512_reduce_ps(t, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  return times_pow2(exp2_poly(f), nearest(t));
}
#elif defined(CPU_CAPABILITY_AVX2)
using Floats = __m256;
inline Floats exp2_poly(Floats f) {
  Floats p = _mm256_set1_ps(kExp2Coefficients[0]);
  for (int k = 1; k < 7; ++k) p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(kExp2Coefficients[k]));
  return p;
}
inline Floats nearest(Floats t) {
  return _mm256_round_ps(t, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
}
// p * 2^n for integral n in [-151, 63], as p * 2^(n + 64) * 2^-64: the first
// product is exact, the second rounds once, to a subnormal where the result is
// one; n = -191 would build the bit pattern of 0.
inline constexpr float kExp2Zero = kExp2Underflow;  // times_pow2 gives 0 below
inline Floats times_pow2(Floats p, Floats n) {
  const __m256i biased = _mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127 + 64));
  const Floats scaled = _mm256_mul_ps(p, _mm256_castsi256_ps(_mm256_slli_epi32(biased, 23)));
  return _mm256_mul_ps(scaled, _mm256_set1_ps(0x1p-64f));
}

// max(a, b), and b where a is nan (vmaxps returns its second operand then).
inline Floats max_or(Floats a, Floats b) { return _mm256_max_ps(a, b); }

// 2^t of 8 floats, t clamped to [kExp2Zero, 63] first (every t here is <= 0);
// f = t - n is exact. A nan gives 2^63 (the clamp's min picks 63).
inline Floats exp2_vec(Floats t) {
  t = _mm256_max_ps(_mm256_min_ps(t, _mm256_set1_ps(63.0f)), _mm256_set1_ps(kExp2Zero));
  const Floats n = nearest(t);
  return times_pow2(exp2_poly(_mm256_sub_ps(t, n)), n);
}
#endif

// exp(x * scale) of vectors x, for one scale: the text logits' exp((t - max t) / tau)
// with scale = 1 / tau, and exp(z - max z) with scale = 1 (a product by 1 is exact).
template <typename T>
class ScaledExp {
 public:
  explicit ScaledExp(T scale) : scale_(scale) {}
  at::vec::Vectorized<T> operator()(const at::vec::Vectorized<T>& x) const {
    return (x * scale_).exp();
  }

 private:
  at::vec::Vectorized<T> scale_;
};

#if defined(TESLOSS_VEC_EXP2)
// Base 2: scale * log2 e is rounded once, here.
template <>
class ScaledExp<float> {
 public:
  explicit ScaledExp(float scale)
      : scale_(static_cast<float>(static_cast<double>(scale) * kLog2e)) {}
  at::vec::Vectorized<float> operator()(const at::vec::Vectorized<float>& x) const {
    return exp2_vec(x * scale_);
  }

 private:
  at::vec::Vectorized<float> scale_;
};
#endif

#if !defined(TESLOSS_VEC_EXP2)
inline constexpr float kExp2Zero = kExp2Underflow;  // split_exp's 0
#endif

#if defined(TESLOSS_VEC_EXP2)
// 2^f for |f| <= 1/2, one float at a time, inline (row_exp.h's split_exp).
inline float tes_exp2(float f) {
  float p = kExp2Coefficients[0];
  for (int k = 1; k < 7; ++k) p = std::fma(p, f, kExp2Coefficients[k]);
  return p;
}
#else
inline float tes_exp2(float f) { return ::exp2f(f); }
#endif

// 2^n for integral n in [-126, 127], from its bits.
inline float pow2i(int n) {
  const uint32_t bits = static_cast<uint32_t>(n + 127) << 23;
  float out;
  std::memcpy(&out, &bits, sizeof(out));
  return out;
}

// p * 2^n for p in [1/2, 2] and integral n in [-151, 0], rounded once: to a
// subnormal where the result is one.
inline float times_pow2(float p, int n) { return p * pow2i(n + 64) * 0x1p-64f; }

// The forward's weights exp(d * scale) of vectors d <= 0, as row_exp.h's
// split_exp computes them one at a time (d taken as exact), from
// scale * log2(e) = hi + lo: exactly 1 at d = 0, and as accurate far below the
// row's max as near it. kClamped first clamps d to where the weight is exactly
// 0; without it, AVX-512 still gives 0 for any finite d (vscalefps
// underflows), but d = -inf gives nan, which sends a block of the forward to
// its careful sum, where the clamp is on. fp64 takes at::vec's exp of d * scale.
template <typename T, bool kClamped>
class SplitExp {
 public:
  using Vec = at::vec::Vectorized<T>;
  SplitExp(T scale, T /*hi*/, T /*lo*/) : exp_(scale) {}
  Vec operator()(const Vec& d) const { return exp_(d); }

 private:
  ScaledExp<T> exp_;
};

template <bool kClamped>
class SplitExp<float, kClamped> {
 public:
  using Vec = at::vec::Vectorized<float>;
  SplitExp(float /*scale*/, float hi, float lo) : hi_(hi), lo_(lo), d_min_(kExp2Zero / hi) {}
  Vec operator()(const Vec& d_in) const {
#if defined(TESLOSS_VEC_EXP2)
#if defined(CPU_CAPABILITY_AVX512)
    constexpr bool kClamp = kClamped;
#else
    constexpr bool kClamp = true;  // times_pow2 needs n >= -191
#endif
    const Vec d = kClamp ? at::vec::clamp_min(d_in, d_min_) : d_in;  // a nan stays nan
    const Vec n = nearest(d * hi_);
    const Vec f = at::vec::fmadd(d, lo_, at::vec::fmsub(d, hi_, n));  // d (hi + lo) - n
    return times_pow2(exp2_poly(f), n);
#else
    // Builds without a vector exp2 of their own go lane by lane.
    alignas(64) float lanes[Vec::size()];
    d_in.store(lanes);
    const float hi = hi_[0], lo = lo_[0];
    for (float& d : lanes) {
      const float t = d * hi;
      if (t != t) continue;  // nan stays nan
      if (t < kExp2Zero) {
        d = 0.0f;
        continue;
      }
      const float n = std::nearbyint(t);
      d = times_pow2(tes_exp2(std::fma(d, lo, std::fma(d, hi, -n))), static_cast<int>(n));
    }
    return Vec::loadu(lanes);
#endif
  }

 private:
  at::vec::Vectorized<float> hi_, lo_, d_min_;
};

// The forward's text weights exp((t - max t) / tau).
template <typename T, bool kClamped>
SplitExp<T, kClamped> text_weights(const RowParams<T>& p) {
  return SplitExp<T, kClamped>(p.inv_tau, p.txt_exp_hi, p.txt_exp_lo);
}

}  // namespace tesloss
