// The fp32 exp of the CUDA kernels. tes_loss.h includes this header where nvcc
// compiles it.
//
// On the GPU it is 2^(x log2 e) from the MUFU unit's ex2.approx.ftz: two
// instructions where expf takes eight, chosen from the compiled kernels'
// instruction counts (docs/DESIGN.md). Rounding x log2 e to fp32 errs by
// about |x| 2^-24 relative, and ex2.approx by about 2 ulp; every x here is a
// logit minus its row's max or log-sum-exp, and the terms that matter have
// |x| < 20. Results below 2^-126 flush to 0. Host code that nvcc compiles
// (tests/test_cuda_schedules.py runs the thread schedules on the host) rounds
// the same product and flushes alike, leaving out only ex2.approx's own error.
#pragma once

#include <cmath>
#include <limits>

namespace tesloss {

__host__ __device__ __forceinline__ float tes_exp(float x) {
  const float t = x * 1.44269504088896341f;  // log2 e
#if defined(__CUDA_ARCH__)
  float y;
  asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(t));
  return y;
#else
  const float y = ::exp2f(t);
  return y < std::numeric_limits<float>::min() ? 0.0f : y;
#endif
}

// 2^x: ex2.approx on the GPU (about 2 ulp), exp2f on the host.
__host__ __device__ __forceinline__ float tes_exp2(float x) {
#if defined(__CUDA_ARCH__)
  float y;
  asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));
  return y;
#else
  return ::exp2f(x);
#endif
}

// exp(x) as tes_exp takes it, but kept where it is below 2^-126: the
// backward multiplies a weight by a factor that may bring it back among the
// normal floats. 2^(x log2 e + 64) is normal down to x log2 e = -190, and the
// product by 2^-64 rounds once into the subnormals (the kernels are compiled
// without flushing them): one instruction more than tes_exp.
__host__ __device__ __forceinline__ float tes_exp_unflushed(float x) {
  const float t = fmaf(x, 1.44269504088896341f, 64.0f);  // log2 e, and 2^64
  return tes_exp2(t) * 0x1p-64f;
}

// p * 2^n for p in [1/2, 2] and integral n in [-151, 0], rounded once: the
// first product is exact, the second rounds, to a subnormal where the result
// is one (the kernels are compiled without flushing them to zero).
__host__ __device__ __forceinline__ float times_pow2(float p, int n) {
#if defined(__CUDA_ARCH__)
  return p * __int_as_float((n + 127 + 64) << 23) * 0x1p-64f;
#else
  return p * std::ldexp(1.0f, n + 64) * 0x1p-64f;
#endif
}

}  // namespace tesloss
