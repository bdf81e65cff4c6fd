// The CPU kernels' vector plumbing: loads and stores in the accumulation type
// (half types widen to float and round back once), a row's zero-padded last
// vector, and reductions across lanes. Built on at::vec, for the ISA the
// kernels are compiled for.
#pragma once

#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>

#include <cstdint>
#include <cstring>
#include <type_traits>

#if defined(CPU_CAPABILITY_AVX512) || defined(CPU_CAPABILITY_AVX2)
#include <immintrin.h>
#endif

namespace tesloss {

using at::vec::Vectorized;

// Loads one vector of the accumulation type; half types widen to float.
template <typename acc_t, typename scalar_t>
inline Vectorized<acc_t> load_acc(const scalar_t* ptr) {
  if constexpr (std::is_same_v<scalar_t, acc_t>) {
    return Vectorized<acc_t>::loadu(ptr);
  } else {
    Vectorized<float> out;
    at::vec::load_to_float(ptr, out);
    return out;
  }
}

// Stores one vector of the accumulation type as scalar_t, rounding once.
template <typename scalar_t, typename acc_t>
inline void store_acc(scalar_t* ptr, const Vectorized<acc_t>& v) {
  if constexpr (std::is_same_v<scalar_t, acc_t>) {
    v.store(ptr);
  } else {
    at::vec::convert_from_float<scalar_t>(v, v).store(ptr, Vectorized<float>::size());
  }
}

// Stores of a whole vector that bypass the caches (non-temporal), for rows
// written once and not read again while they would still be cached: a plain
// store that misses first reads the line it writes (read for ownership), so
// streaming saves a third of the traffic of writing a row. The address must be
// a multiple of kStreamBytes, a vector's size; builds without streaming
// stores have kStreamBytes = 0. streaming_fence orders them before what
// follows (another thread's reads).
#if defined(CPU_CAPABILITY_AVX512)
inline constexpr int64_t kStreamBytes = 64;
template <typename T>
inline void store_streaming(T* ptr, const Vectorized<T>& v) {
  static_assert(sizeof(v) == 64);
  __m512i bits;
  std::memcpy(&bits, &v, 64);
  _mm512_stream_si512(reinterpret_cast<__m512i*>(ptr), bits);
}
inline void streaming_fence() { _mm_sfence(); }
#elif defined(CPU_CAPABILITY_AVX2)
inline constexpr int64_t kStreamBytes = 32;
template <typename T>
inline void store_streaming(T* ptr, const Vectorized<T>& v) {
  static_assert(sizeof(v) == 32);
  __m256i bits;
  std::memcpy(&bits, &v, 32);
  _mm256_stream_si256(reinterpret_cast<__m256i*>(ptr), bits);
}
inline void streaming_fence() { _mm_sfence(); }
#else
inline constexpr int64_t kStreamBytes = 0;
template <typename T>
inline void store_streaming(T* ptr, const Vectorized<T>& v) {
  v.store(ptr);
}
inline void streaming_fence() {}
#endif

// The next row's inputs, asked of memory while this row's exponentials are
// taken: without it a thread reads a row that is not cached in its maxima
// sweep, with the memory busy and the vector units idle, then takes the
// exponentials with the memory idle. fetch(j) asks for the lines at column j;
// the sweeps call it once per vector. Null pointers ask for nothing.
template <typename scalar_t, typename acc_t>
struct NextRow {
  const scalar_t* vis = nullptr;
  const scalar_t* txt = nullptr;
  const acc_t* probs = nullptr;
  void fetch(int64_t j) const {
#if defined(__GNUC__) || defined(__clang__)
    if (vis == nullptr) return;
    // Locality 2 (the core's L2): a row's inputs at 21843 fp32 classes are
    // 175 KB, 262 KB with Mixup's probabilities.
    __builtin_prefetch(vis + j, 0, 2);
    __builtin_prefetch(txt + j, 0, 2);
    if (probs != nullptr) __builtin_prefetch(probs + j, 0, 2);
#else
    (void)j;
#endif
  }
};

// The last `count` (< one vector) elements of a row, widened to acc_t and
// padded with zeros to a whole vector.
template <typename acc_t, typename scalar_t>
inline Vectorized<acc_t> load_acc_tail(const scalar_t* ptr, int64_t count) {
  if constexpr (std::is_same_v<scalar_t, acc_t>) {
    return Vectorized<acc_t>::loadu(ptr, count);  // a masked load where the ISA has one
  }
  alignas(64) acc_t lanes[Vectorized<acc_t>::size()] = {};
  for (int64_t k = 0; k < count; ++k) lanes[k] = static_cast<acc_t>(ptr[k]);
  return Vectorized<acc_t>::loadu(lanes);
}

// v in the first `count` lanes and `fill` in the rest (Vec::set does this with
// a 16-way switch that the compiler leaves as a call).
template <typename acc_t>
inline Vectorized<acc_t> first_lanes(const Vectorized<acc_t>& v, const Vectorized<acc_t>& fill,
                                     int64_t count) {
  using Vec = Vectorized<acc_t>;
  const Vec lane = Vec::arange(acc_t(0), acc_t(1));
  return Vec::blendv(fill, v, lane < Vec(static_cast<acc_t>(count)));
}

// Horizontal max of one vector, by halving shuffles (at::vec). Not nan-aware:
// the forward finds nan logits another way (block_row_state).
template <typename acc_t>
inline acc_t lane_max(const Vectorized<acc_t>& v) {
  return at::vec::vec_reduce_all<acc_t>(
      [](const Vectorized<acc_t>& a, const Vectorized<acc_t>& b) {
        return at::vec::clamp_min(a, b);
      },
      v);
}

// sums[l] += v[l] for each lane l, in double: a float vector is widened
// (exactly) a half at a time.
template <typename acc_t>
inline void add_to_doubles(double* sums, const Vectorized<acc_t>& v) {
  if constexpr (std::is_same_v<acc_t, double>) {
    (Vectorized<double>::loadu(sums) + v).store(sums);
  } else {
#if defined(CPU_CAPABILITY_AVX512)
    const __m512 x = v;
    const __m256 high = _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(x), 1));
    _mm512_storeu_pd(sums, _mm512_add_pd(_mm512_loadu_pd(sums),
                                         _mm512_cvtps_pd(_mm512_castps512_ps256(x))));
    _mm512_storeu_pd(sums + 8, _mm512_add_pd(_mm512_loadu_pd(sums + 8), _mm512_cvtps_pd(high)));
#elif defined(CPU_CAPABILITY_AVX2)
    const __m256 x = v;
    _mm256_storeu_pd(sums, _mm256_add_pd(_mm256_loadu_pd(sums),
                                         _mm256_cvtps_pd(_mm256_castps256_ps128(x))));
    _mm256_storeu_pd(sums + 4, _mm256_add_pd(_mm256_loadu_pd(sums + 4),
                                             _mm256_cvtps_pd(_mm256_extractf128_ps(x, 1))));
#else
    alignas(64) acc_t lanes[Vectorized<acc_t>::size()];
    v.store(lanes);
    for (int l = 0; l < Vectorized<acc_t>::size(); ++l) sums[l] += lanes[l];
#endif
  }
}

// tes_loss.h's weighted(), lane by lane.
template <typename T>
inline Vectorized<T> weighted(const Vectorized<T>& e, const Vectorized<T>& x) {
  const Vectorized<T> zero(T(0));
  return Vectorized<T>::blendv(e * x, zero, e == zero);
}

}  // namespace tesloss
