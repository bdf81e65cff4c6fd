// The CUDA kernels of the fused TeS loss and their launches. The formulas come
// from ../tes_loss.h and which thread reads which columns from schedules.cuh;
// this file adds the GPU's part: the merge of a row group's states, the batch
// sums, and the launch shapes.
//
// Forward: a group of TPR threads owns a row. Each thread keeps online-softmax
// statistics of the columns it reads, the group merges them in a fixed order
// (shuffles, then shared memory across warps), and the group's first thread
// finalizes the row. Every block also sums its rows in a fixed order into one
// partial; a one-block kernel sums the partials in a fixed tree and finalizes
// the batch. No floating-point atomics, so results are bitwise the same on
// every run on one device.
//
// Backward: the same groups read each row once and write both gradients once.
#include <ATen/Dispatch.h>
#include <ATen/ops/empty.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>

#include <algorithm>
#include <cstdint>
#include <limits>
#include <type_traits>

#include "cuda/launch_shapes.h"
#include "cuda/schedules.cuh"
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

// Writes the block's partial: its row groups' sums, added in group order.
template <int RPB>
__device__ __forceinline__ void write_block_partial(const BlockPartial& part, int group, int t,
                                                    BlockPartial* partials) {
  __shared__ BlockPartial group_parts[RPB];
  if (t == 0) group_parts[group] = part;
  __syncthreads();
  if (threadIdx.x == 0) {
    BlockPartial block = group_parts[0];
    for (int g = 1; g < RPB; ++g) block.add(group_parts[g]);
    partials[blockIdx.x] = block;
  }
}

// TPR threads per row, RPB rows per block. The loop over rows runs the same
// number of times in every thread of a block, so the barriers and shuffles of
// the merge are reached by all of them, rows past the end and ignored rows too.
template <int kTarget, typename scalar_t, typename acc_t, int TPR, int RPB>
__global__ void __launch_bounds__(TPR * RPB)
    tes_forward_kernel(const ForwardArgs<scalar_t, acc_t> a) {
  constexpr bool kProbs = kHasProbs<kTarget>;
  const int group = threadIdx.x / TPR;
  const int t = threadIdx.x % TPR;
  const int C = static_cast<int>(a.C);  // at most kMaxColumns (check_columns)
  BlockPartial part = {};  // sums over this row group's rows, in row order

  for (int64_t first_row = int64_t(blockIdx.x) * RPB; first_row < a.B;
       first_row += int64_t(gridDim.x) * RPB) {
    const int64_t row = first_row + group;
    const bool active = row < a.B;
    // A probability target has no label to read or check, and no ignored rows.
    const int64_t label = kProbs ? 0 : active ? a.labels[row * a.target_stride] : a.p.ignore_index;
    const bool ignored = is_ignored_row<kTarget>(label, a.p);
    const bool valid = is_valid_label<acc_t>(label, C);
    if (active && t == 0) {
      CUDA_KERNEL_ASSERT(ignored || valid);
    }
    const bool work = active && !ignored && valid;

    RowState<acc_t> state = row_state_empty<acc_t>();
    acc_t z_label = 0;
    acc_t t_label = 0;
    if (work) {
      const scalar_t* vis_row = a.vis + row * a.vis_stride;
      const scalar_t* txt_row = a.txt + row * a.txt_stride;
      if (!kProbs && t == 0) {  // loaded before the sweep, which then hides its latency
        z_label = static_cast<acc_t>(vis_row[label]);
        t_label = static_cast<acc_t>(txt_row[label]);
      }
      const acc_t* probs_row = kProbs ? a.probs + row * a.target_stride : nullptr;
      state = thread_row_state<kTarget, scalar_t, acc_t, TPR>(vis_row, txt_row, probs_row, C, t,
                                                              a.p);
    }
    state = group_merge<kTarget, acc_t, TPR, RPB>(state, group, t, a.p);
    if (active && t == 0) {
      finish_row<kTarget>(a, row, work, ignored, state, z_label, t_label, part);
    }
  }
  write_block_partial<RPB>(part, group, t, a.partials);
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

template <typename scalar_t, typename acc_t>
struct BackwardArgs : RowInputs<scalar_t, acc_t> {
  const acc_t* row_stats;    // [B, kNumRowStats], contiguous
  const acc_t* grad_loss;    // [B] or one value
  const acc_t* batch_stats;  // the count of rows not ignored, read here on the device
  int64_t grad_stride;
  int64_t reduction;
  scalar_t* grad_vis;  // [B, C], contiguous
  scalar_t* grad_txt;
};

// No merge between threads, so the loop over rows need not be uniform.
template <int kTarget, typename scalar_t, typename acc_t, int TPR, int RPB>
__global__ void __launch_bounds__(TPR * RPB)
    tes_backward_kernel(const BackwardArgs<scalar_t, acc_t> a) {
  constexpr bool kProbs = kHasProbs<kTarget>;
  const int group = threadIdx.x / TPR;
  const int t = threadIdx.x % TPR;
  const int C = static_cast<int>(a.C);  // at most kMaxColumns (check_columns)
  const acc_t num_valid = a.batch_stats[kBatchValid];

  for (int64_t row = int64_t(blockIdx.x) * RPB + group; row < a.B;
       row += int64_t(gridDim.x) * RPB) {
    const int64_t label = kProbs ? 0 : a.labels[row * a.target_stride];
    if (!kProbs && t == 0) {
      CUDA_KERNEL_ASSERT(is_ignored(label, a.p) || is_valid_label<acc_t>(label, C));
    }
    scalar_t* grad_vis_row = a.grad_vis + row * C;
    scalar_t* grad_txt_row = a.grad_txt + row * C;
    if (is_ignored_row<kTarget>(label, a.p)) {
      thread_row_zero<scalar_t, TPR>(grad_vis_row, grad_txt_row, C, t);
      continue;
    }
    const acc_t g = row_upstream_grad(a.grad_loss, a.grad_stride, row, a.reduction, num_valid);
    thread_row_grad<kTarget, scalar_t, acc_t, TPR>(
        a.vis + row * a.vis_stride, a.txt + row * a.txt_stride,
        kProbs ? a.probs + row * a.target_stride : nullptr, grad_vis_row, grad_txt_row, C, t,
        label, grad_row<kTarget>(a.p, a.row_stats + row * kNumRowStats, g));
  }
}

DeviceSize current_device_size() {
  const cudaDeviceProp* props = at::cuda::getCurrentDeviceProperties();
  return DeviceSize{props->multiProcessorCount, props->maxThreadsPerMultiProcessor};
}

// Columns are indexed with 32-bit integers inside a row, with room for a
// sweep's stride past the last one. (The dispatcher's CUDA key and ops.cpp's
// one-device checks bring only CUDA tensors here.)
constexpr int64_t kMaxColumns = int64_t(1) << 30;

void check_columns(const char* op, const at::Tensor& vis_logits) {
  TORCH_CHECK(vis_logits.size(1) <= kMaxColumns, op, ": vis_logits must have at most ",
              kMaxColumns, " classes on CUDA, got ", vis_logits.size(1));
}

// Every kernel starts here, on `blocks` blocks of `threads` threads, so that
// the host emulator of tests/cuda_emulator, which defines a launch of its own,
// runs exactly the launch shapes chosen below.
#if !defined(TESLOSS_CUDA_EMULATOR)
template <auto kKernel, typename... Args>
void launch(int blocks, int threads, cudaStream_t stream, const Args&... args) {
  kKernel<<<blocks, threads, 0, stream>>>(args...);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}
#endif

}  // namespace

void tes_loss_forward_cuda(const ForwardTensors& t, const Params& params) {
  check_columns("fused_tes_loss", t.vis_logits);
  const c10::cuda::CUDAGuard device_guard(t.vis_logits.device());
  const int64_t B = t.vis_logits.size(0);
  const int64_t C = t.vis_logits.size(1);
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  const DeviceSize device = current_device_size();
  const int tpr = threads_per_row(B, C, device.sm_count * device.threads_per_sm);
  const bool per_row = params.reduction == kReduceNone;

  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kBFloat16, at::kHalf, t.vis_logits.scalar_type(), "tes_loss_forward_cuda", [&] {
        using acc_t = acc_t_of<scalar_t>;
        ForwardArgs<scalar_t, acc_t> args{row_inputs<scalar_t, acc_t>(t, params)};
        args.row_stats = t.row_stats.mutable_data_ptr<acc_t>();
        args.loss_rows = per_row ? t.loss.mutable_data_ptr<acc_t>() : nullptr;
        args.partials = nullptr;

        int num_partials = 0;
        at::Tensor partials;  // bytes holding num_partials BlockPartials
        with_target_kind(t.target, params, [&](auto kind) {
          with_row_shape(tpr, [&](auto threads, auto rows) {
            constexpr int kTarget = decltype(kind)::value;
            constexpr int TPR = decltype(threads)::value;
            constexpr int RPB = decltype(rows)::value;
            num_partials = row_blocks(B, RPB, TPR * RPB, device);
            partials = at::empty({int64_t(num_partials) * int64_t(sizeof(BlockPartial))},
                                 t.row_stats.options().dtype(at::kByte));
            if (num_partials == 0) return;  // B == 0: the finish kernel alone gives the empty sums
            args.partials = reinterpret_cast<BlockPartial*>(partials.mutable_data_ptr());
            launch<tes_forward_kernel<kTarget, scalar_t, acc_t, TPR, RPB>>(
                num_partials, TPR * RPB, stream, args);
          });
        });
        launch<tes_finish_kernel<acc_t>>(1, kFinishThreads, stream, args.partials, num_partials,
                                         params.reduction,
                                         per_row ? nullptr : t.loss.mutable_data_ptr<acc_t>(),
                                         t.batch_stats.mutable_data_ptr<acc_t>());
      });
}

void tes_loss_backward_cuda(const BackwardTensors& t, const Params& params) {
  check_columns("tes_loss_backward", t.vis_logits);
  const int64_t B = t.vis_logits.size(0);
  const int64_t C = t.vis_logits.size(1);
  if (B == 0) return;
  const c10::cuda::CUDAGuard device_guard(t.vis_logits.device());
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  const DeviceSize device = current_device_size();
  const int tpr = threads_per_row(B, C, device.sm_count * device.threads_per_sm);

  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kBFloat16, at::kHalf, t.vis_logits.scalar_type(), "tes_loss_backward_cuda", [&] {
        using acc_t = acc_t_of<scalar_t>;
        BackwardArgs<scalar_t, acc_t> args{row_inputs<scalar_t, acc_t>(t, params)};
        args.row_stats = t.row_stats.const_data_ptr<acc_t>();
        args.grad_loss = t.grad_loss.const_data_ptr<acc_t>();
        args.batch_stats = t.batch_stats.const_data_ptr<acc_t>();
        args.grad_stride = t.grad_loss.dim() == 1 ? t.grad_loss.stride(0) : 0;
        args.reduction = params.reduction;
        args.grad_vis = t.grad_vis.mutable_data_ptr<scalar_t>();
        args.grad_txt = t.grad_txt.mutable_data_ptr<scalar_t>();
        with_target_kind(t.target, params, [&](auto kind) {
          with_row_shape(tpr, [&](auto threads, auto rows) {
            constexpr int kTarget = decltype(kind)::value;
            constexpr int TPR = decltype(threads)::value;
            constexpr int RPB = decltype(rows)::value;
            launch<tes_backward_kernel<kTarget, scalar_t, acc_t, TPR, RPB>>(
                row_blocks(B, RPB, TPR * RPB, device), TPR * RPB, stream, args);
          });
        });
      });
}

}  // namespace tesloss
