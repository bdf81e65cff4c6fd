// What a CUDA block's threads do together: a row group's TPR threads merge
// their states into thread 0's (shuffles within a warp, then shared memory
// across warps, in a fixed order), thread 0 finishes the row, and the block
// sums its rows into one partial; and the one-block kernels over the batch:
// the sum of the partials, and the single pass's count of rows. Included by
// tes_loss_cuda.cu (and through it by tests/cuda_emulator).
#pragma once

#include <cstdint>
#include <limits>

#include "batch_sum.h"
#include "kernels.h"
#include "tes_loss.h"

namespace tesloss {
namespace {

// Lane ^ lane_mask's state: the fields the target's kind keeps, and nothing
// for the others.
template <int kTarget, typename acc_t>
__device__ __forceinline__ RowState<acc_t> shfl_xor_state(const RowState<acc_t>& s, int lane_mask,
                                                          int width) {
  const auto from = [&](acc_t x) { return __shfl_xor_sync(0xffffffffu, x, lane_mask, width); };
  RowState<acc_t> out = row_state_empty<acc_t>();
  out.max_vis = from(s.max_vis);
  out.sum_vis = from(s.sum_vis);
  out.max_txt = from(s.max_txt);
  out.sum_txt = from(s.sum_txt);
  out.gap_vis = from(s.gap_vis);
  out.gap_txt = from(s.gap_txt);
  if constexpr (kHasUniform<kTarget>) {
    out.count = from(s.count);
    out.uni_vis = from(s.uni_vis);
    out.uni_txt = from(s.uni_txt);
  }
  if constexpr (kHasProbs<kTarget>) {
    out.mass = from(s.mass);
    out.y_vis = from(s.y_vis);
    out.y_txt = from(s.y_txt);
  }
  return out;
}

// Merges the states of kLanes consecutive lanes; every lane of the warp must
// call it, whatever its row.
template <int kTarget, typename acc_t, int kLanes>
__device__ __forceinline__ RowState<acc_t> lanes_merge(RowState<acc_t> state, const RowParams<acc_t>& p) {
#pragma unroll
  for (int lane_mask = kLanes / 2; lane_mask > 0; lane_mask /= 2) {
    state = row_state_merge<kTarget>(state, shfl_xor_state<kTarget>(state, lane_mask, kLanes), p);
  }
  return state;
}

// The merged state of a row group's TPR threads, in thread t = 0: shuffles
// within each warp, then, for a row of several warps, the warps' states in
// order through shared memory. Every thread of the block must call it.
template <int kTarget, typename acc_t, int TPR, int RPB>
__device__ __forceinline__ RowState<acc_t> group_merge(RowState<acc_t> state, int group, int t,
                                                       const RowParams<acc_t>& p) {
  static_assert(TPR <= 32 ? 32 % TPR == 0 : TPR % 32 == 0, "a row's threads tile warps");
  if constexpr (TPR <= 32) {
    return lanes_merge<kTarget, acc_t, TPR>(state, p);
  } else {
    constexpr int kWarpsPerRow = TPR / 32;
    __shared__ RowState<acc_t> warp_states[RPB][kWarpsPerRow];
    state = lanes_merge<kTarget, acc_t, 32>(state, p);
    __syncthreads();  // the previous row's states have been read
    if (t % 32 == 0) warp_states[group][t / 32] = state;
    __syncthreads();
    if (t == 0) {
      state = warp_states[group][0];
#pragma unroll
      for (int w = 1; w < kWarpsPerRow; ++w) {
        state = row_state_merge<kTarget>(state, warp_states[group][w], p);
      }
    }
    return state;
  }
}

// What each block leaves for the finish kernel: its rows' sums and the count
// of its rows that are not ignored.
struct BlockPartial {
  BatchSum sums[kNumBatchSums];
  long long count;

  __device__ void add(const BlockPartial& other) {
#pragma unroll
    for (int k = 0; k < kNumBatchSums; ++k) sums[k].add(other.sums[k]);
    count += other.count;
  }
};

template <typename scalar_t, typename acc_t>
struct ForwardArgs : RowInputs<scalar_t, acc_t> {
  acc_t* row_stats;  // [B, kNumRowStats]
  acc_t* loss_rows;  // [B] for reduction "none", else null
  BlockPartial* partials;  // [gridDim.x]
};

// Thread 0's part of a merged row: its statistics, its loss for reduction
// "none", and, unless it is ignored, its share of the group's sums.
template <int kTarget, typename scalar_t, typename acc_t>
__device__ __forceinline__ void finish_row(const ForwardArgs<scalar_t, acc_t>& a, int64_t row,
                                           bool work, bool ignored, const RowState<acc_t>& state,
                                           acc_t z_label, acc_t t_label, BlockPartial& part) {
  acc_t out[kNumRowStats];
  if (work) {
    row_finalize<kTarget>(state, z_label, t_label, a.p, out);
  } else if (ignored) {
    row_ignored(out);
  } else {  // a bad label, reached only where kernel asserts are compiled out
#pragma unroll
    for (int k = 0; k < kNumRowStats; ++k) out[k] = std::numeric_limits<acc_t>::quiet_NaN();
  }
  acc_t* stats = a.row_stats + row * kNumRowStats;
#pragma unroll
  for (int k = 0; k < kNumRowStats; ++k) stats[k] = out[k];
  if (a.loss_rows != nullptr) a.loss_rows[row] = out[kRowLoss];
  if (!ignored) {
    add_row(part.sums, out);
    part.count += 1;
  }
}

// Writes the block's partial: its row groups' sums (group_parts, in shared
// memory, each added to by its group's thread 0 only), added in group order.
template <int RPB>
__device__ __forceinline__ void write_block_partial(const BlockPartial (&group_parts)[RPB],
                                                    BlockPartial* partials) {
  __syncthreads();
  if (threadIdx.x == 0) {
    BlockPartial block = group_parts[0];
    for (int g = 1; g < RPB; ++g) block.add(group_parts[g]);
    partials[blockIdx.x] = block;
  }
}

constexpr int kFinishThreads = 256;

// Adds the forward's per-block partials in a fixed tree and writes the loss
// (for "mean" and "sum") and batch_stats. The row count is an integer, so it
// is exact for any batch.
template <typename acc_t>
__global__ void __launch_bounds__(kFinishThreads)
    tes_finish_kernel(const BlockPartial* __restrict__ partials, int num_partials,
                      int64_t reduction, acc_t* __restrict__ loss,
                      acc_t* __restrict__ batch_stats) {
  __shared__ BlockPartial tree[kFinishThreads];
  const int tid = threadIdx.x;
  BlockPartial sum = {};
  for (int i = tid; i < num_partials; i += kFinishThreads) sum.add(partials[i]);
  tree[tid] = sum;
  __syncthreads();
  for (int half = kFinishThreads / 2; half > 0; half /= 2) {
    if (tid < half) tree[tid].add(tree[tid + half]);
    __syncthreads();
  }
  if (tid == 0) {
    batch_finalize(tree[0].sums, static_cast<int64_t>(tree[0].count), reduction,
                   reduction == kReduceNone ? nullptr : loss, batch_stats);
  }
}

// The rows that are not ignored, counted on the device before the single
// pass takes any: "mean"'s divisor is in every gradient it writes. Kept in
// acc_t, as batch_stats keeps the forward's count; every row of a
// probability target counts.
template <typename acc_t>
__global__ void __launch_bounds__(kFinishThreads)
    tes_count_kernel(const int64_t* __restrict__ labels, int64_t stride, int64_t B,
                     int64_t ignore_index, acc_t* __restrict__ count) {
  __shared__ long long tree[kFinishThreads];
  const int tid = threadIdx.x;
  long long n = 0;
  for (int64_t i = tid; i < B; i += kFinishThreads) {
    n += labels == nullptr || labels[i * stride] != ignore_index ? 1 : 0;
  }
  tree[tid] = n;
  __syncthreads();
  for (int half = kFinishThreads / 2; half > 0; half /= 2) {
    if (tid < half) tree[tid] += tree[tid + half];
    __syncthreads();
  }
  if (tid == 0) *count = static_cast<acc_t>(tree[0]);
}

}  // namespace
}  // namespace tesloss
