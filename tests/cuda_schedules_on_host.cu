// The CUDA kernels' thread schedules, run on the host for
// tests/test_cuda_schedules.py. nvcc builds this file as a plain shared library
// (no ATen, no GPU needed) around csrc/cuda/schedules.cuh; the test calls it
// through ctypes.
//
// Each row's group of TPR threads runs one thread at a time. The forward merges
// their states in the kernel's order: lanes_merge's shuffle rounds within each
// warp, then the warps' states in order. The backward can count how many times
// each gradient element is written.
#include "cuda/schedules.cuh"

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <cstring>
#include <vector>

namespace tesloss {

// The problem, as the test passes it (its ctypes mirror builds `params` from
// the op's parameter table). Outside the unnamed namespace, so that the C
// functions below, which take it, keep external linkage.
struct Rows {
  const void* vis;
  const void* txt;
  const int64_t* labels;  // null for probability targets
  const void* probs;      // [B, C] in the accumulation type, class stride 1; or null
  int64_t vis_stride;
  int64_t txt_stride;
  int64_t target_stride;  // between labels or between rows of probs
  int64_t B;
  int C;
  Params params;
};

namespace {

// What thread 0 of the forward kernel holds after the merge. In lanes_merge
// every lane merges its state with lane ^ mask's, all lanes in the same round;
// with more than a warp per row, thread 0 then merges the warps' first lanes.
template <int kTarget, typename acc_t>
RowState<acc_t> group_merge(std::vector<RowState<acc_t>> lanes, const RowParams<acc_t>& p) {
  const int tpr = static_cast<int>(lanes.size());
  const int width = tpr < 32 ? tpr : 32;
  for (int mask = width / 2; mask > 0; mask /= 2) {
    const std::vector<RowState<acc_t>> before = lanes;
    for (int lane = 0; lane < tpr; ++lane) {
      lanes[lane] = row_state_merge<kTarget>(before[lane], before[lane ^ mask], p);
    }
  }
  RowState<acc_t> state = lanes[0];
  for (int warp = 1; warp < tpr / 32; ++warp) {
    state = row_state_merge<kTarget>(state, lanes[warp * 32], p);
  }
  return state;
}

enum Status : int { kOk = 0, kBadShape = 1, kBadLabel = 2, kMisaligned = 3 };

// Row `row`'s class index (0 for probability targets) and probability row.
template <int kTarget>
int64_t row_label(const Rows& in, int64_t row) {
  return kHasProbs<kTarget> ? 0 : in.labels[row * in.target_stride];
}

template <int kTarget, typename acc_t>
const acc_t* row_probs(const Rows& in, int64_t row) {
  return kHasProbs<kTarget> ? static_cast<const acc_t*>(in.probs) + row * in.target_stride
                            : nullptr;
}

template <int kTarget, typename scalar_t, int TPR>
int forward_rows(const Rows& in, void* row_stats_out) {
  using acc_t = acc_t_of<scalar_t>;
  const auto p = row_params<acc_t>(in.params, in.C);
  auto* row_stats = static_cast<acc_t*>(row_stats_out);
  for (int64_t row = 0; row < in.B; ++row) {
    const int64_t label = row_label<kTarget>(in, row);
    acc_t* out = row_stats + row * kNumRowStats;
    if (is_ignored_row<kTarget>(label, p)) {
      row_ignored(out);
      continue;
    }
    if (!is_valid_label<acc_t>(label, in.C)) return kBadLabel;  // the kernel asserts
    const auto* vis = static_cast<const scalar_t*>(in.vis) + row * in.vis_stride;
    const auto* txt = static_cast<const scalar_t*>(in.txt) + row * in.txt_stride;
    std::vector<RowState<acc_t>> lanes(TPR);
    for (int t = 0; t < TPR; ++t) {
      lanes[t] = thread_row_state<kTarget, scalar_t, acc_t, TPR>(
          vis, txt, row_probs<kTarget, acc_t>(in, row), in.C, t, p);
    }
    row_finalize<kTarget>(group_merge<kTarget>(lanes, p), static_cast<acc_t>(vis[label]),
                          static_cast<acc_t>(txt[label]), p, out);
  }
  return kOk;
}

// One thread's share of a row's backward, as tes_backward_kernel runs it.
template <int kTarget, typename scalar_t, typename acc_t, int TPR>
void thread_backward_row(const Rows& in, int64_t row, int t, const RowParams<acc_t>& p,
                         const acc_t* row_stats, const acc_t* upstream, scalar_t* grad_vis,
                         scalar_t* grad_txt) {
  const int64_t label = row_label<kTarget>(in, row);
  if (is_ignored_row<kTarget>(label, p)) {
    thread_row_zero<scalar_t, TPR>(grad_vis, grad_txt, in.C, t);
    return;
  }
  thread_row_grad<kTarget, scalar_t, acc_t, TPR>(
      static_cast<const scalar_t*>(in.vis) + row * in.vis_stride,
      static_cast<const scalar_t*>(in.txt) + row * in.txt_stride,
      row_probs<kTarget, acc_t>(in, row), grad_vis, grad_txt, in.C, t, label,
      grad_row<kTarget>(p, row_stats + row * kNumRowStats, upstream[row]));
}

// Elements no thread has written hold this byte in every position (a nan
// payload no arithmetic produces).
constexpr unsigned char kUnwritten = 0xff;

template <typename scalar_t>
bool written(const scalar_t& x) {
  unsigned char bytes[sizeof(scalar_t)];
  std::memcpy(bytes, &x, sizeof(scalar_t));
  for (unsigned char b : bytes) {
    if (b != kUnwritten) return true;
  }
  return false;
}

// grad_vis and grad_txt are [B, C], contiguous. Without `writes` the threads
// write the gradients in place. With it, `guard` more elements lie before and
// after each gradient, and `writes` ([2, guard + B * C + guard]) counts every
// element a thread changes: each thread runs on gradients reset to kUnwritten
// everywhere, guards included.
template <int kTarget, typename scalar_t, int TPR>
int backward_rows(const Rows& in, const void* row_stats_in, const void* upstream_in,
                  void* grad_vis_out, void* grad_txt_out, int64_t guard, int32_t* writes) {
  using acc_t = acc_t_of<scalar_t>;
  const auto p = row_params<acc_t>(in.params, in.C);
  const auto* row_stats = static_cast<const acc_t*>(row_stats_in);
  const auto* upstream = static_cast<const acc_t*>(upstream_in);
  auto* grad_vis = static_cast<scalar_t*>(grad_vis_out);
  auto* grad_txt = static_cast<scalar_t*>(grad_txt_out);
  for (int64_t row = 0; row < in.B; ++row) {
    const int64_t label = row_label<kTarget>(in, row);
    if (!is_ignored_row<kTarget>(label, p) && !is_valid_label<acc_t>(label, in.C)) {
      return kBadLabel;
    }
  }
  if (writes == nullptr) {
    for (int64_t row = 0; row < in.B; ++row) {
      for (int t = 0; t < TPR; ++t) {
        thread_backward_row<kTarget, scalar_t, acc_t, TPR>(in, row, t, p, row_stats, upstream,
                                                  grad_vis + row * in.C, grad_txt + row * in.C);
      }
    }
    return kOk;
  }
  const int64_t extent = guard + in.B * in.C + guard;
  scalar_t* grads[2] = {grad_vis - guard, grad_txt - guard};
  std::vector<scalar_t> results[2] = {std::vector<scalar_t>(extent),
                                      std::vector<scalar_t>(extent)};
  for (auto& result : results) std::memset(result.data(), kUnwritten, sizeof(scalar_t) * extent);
  for (int64_t row = 0; row < in.B; ++row) {
    for (int t = 0; t < TPR; ++t) {
      for (scalar_t* grad : grads) std::memset(grad, kUnwritten, sizeof(scalar_t) * extent);
      thread_backward_row<kTarget, scalar_t, acc_t, TPR>(in, row, t, p, row_stats, upstream,
                                                grad_vis + row * in.C, grad_txt + row * in.C);
      for (int k = 0; k < 2; ++k) {
        for (int64_t i = 0; i < extent; ++i) {
          if (written(grads[k][i])) writes[k * extent + i] += 1, results[k][i] = grads[k][i];
        }
      }
    }
  }
  for (int k = 0; k < 2; ++k) {
    std::memcpy(grads[k], results[k].data(), sizeof(scalar_t) * extent);
  }
  return kOk;
}

// Calls f(Int<kTarget>{}, scalar_t{}, Int<TPR>{}) for the problem's target
// kind (as the kernels choose it), a dtype code (0: fp64, 1: fp32, 2: bf16,
// 3: fp16) and a launch shape's threads per row; a misaligned pack access
// (expect_pack_aligned) ends the call.
template <typename F>
int with_schedule(const Rows& in, int dtype, int tpr, F&& f) try {
  auto by_tpr = [&](auto zero) {
    auto by_kind = [&](auto threads) {
      if (in.probs != nullptr) return f(std::integral_constant<int, kProbTarget>{}, zero, threads);
      if (in.params.label_smoothing != 0) {
        return f(std::integral_constant<int, kSmoothedIndexTarget>{}, zero, threads);
      }
      return f(std::integral_constant<int, kIndexTarget>{}, zero, threads);
    };
    switch (tpr) {
      case 8: return by_kind(std::integral_constant<int, 8>{});
      case 32: return by_kind(std::integral_constant<int, 32>{});
      case 128: return by_kind(std::integral_constant<int, 128>{});
      case 512: return by_kind(std::integral_constant<int, 512>{});
      default: return int(kBadShape);
    }
  };
  switch (dtype) {
    case 0: return by_tpr(double{});
    case 1: return by_tpr(float{});
    case 2: return by_tpr(c10::BFloat16{});
    case 3: return by_tpr(c10::Half{});
    default: return int(kBadShape);
  }
} catch (const std::logic_error&) {
  return kMisaligned;
}

}  // namespace
}  // namespace tesloss

using tesloss::Rows;

// row_stats: [B, kNumRowStats] in the accumulation type.
extern "C" int tesloss_schedule_forward(int dtype, int tpr, const Rows* in, void* row_stats) {
  return tesloss::with_schedule(*in, dtype, tpr, [&](auto kind, auto zero, auto threads) {
    return tesloss::forward_rows<decltype(kind)::value, decltype(zero), decltype(threads)::value>(
        *in, row_stats);
  });
}

// upstream: [B] in the accumulation type, each row's upstream gradient; writes
// may be null (see backward_rows).
extern "C" int tesloss_schedule_backward(int dtype, int tpr, const Rows* in, const void* row_stats,
                                         const void* upstream, void* grad_vis, void* grad_txt,
                                         int64_t guard, int32_t* writes) {
  return tesloss::with_schedule(*in, dtype, tpr, [&](auto kind, auto zero, auto threads) {
    return tesloss::backward_rows<decltype(kind)::value, decltype(zero), decltype(threads)::value>(
        *in, row_stats, upstream, grad_vis, grad_txt, guard, writes);
  });
}
