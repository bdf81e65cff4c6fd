// The CUDA kernels of the fused TeS loss and their launches. The formulas come
// from ../tes_loss.h, which thread reads which columns from schedules.cuh, and
// how a row group's threads merge and a block sums its rows from
// row_groups.cuh; this file adds the kernels and the launch shapes.
//
// Forward: a group of TPR threads owns a row. Each thread keeps online-softmax
// statistics of the columns it reads, the group merges them in a fixed order,
// and the group's first thread finalizes the row. Every block also sums its
// rows in a fixed order into one partial; a one-block kernel sums the partials
// in a fixed tree and finalizes the batch. No floating-point atomics, so
// results are bitwise the same on every run on one device.
//
// Backward: the same groups read each row once and write both gradients once.
//
// Single pass (a training step): the forward's kernel, in which each group,
// once its row is finished, reads the row again (from L2, where the forward's
// read left it) and writes both gradients for an upstream gradient of 1; the
// count of rows that are not ignored, "mean"'s divisor, is taken on the device
// first. The backward then scales them on the device, and leaves them as they
// are where the upstream gradient is 1.
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
#include "cuda/row_groups.cuh"
#include "cuda/schedules.cuh"
#include "batch_sum.h"
#include "kernels.h"
#include "tes_loss.h"

namespace tesloss {
namespace {

template <typename scalar_t, typename acc_t>
struct StepArgs : ForwardArgs<scalar_t, acc_t> {
  const acc_t* num_valid;  // one value, tes_count_kernel's
  int64_t reduction;
  scalar_t* grad_vis;  // [B, C], contiguous
  scalar_t* grad_txt;
};

// Thread t's share of a row's gradients for upstream gradient g, from the
// row's statistics; an ignored row's are zeros, and its logits are not read.
template <int kTarget, typename scalar_t, typename acc_t, int TPR>
__device__ __forceinline__ void write_row_grads(const RowInputs<scalar_t, acc_t>& a,
                                                const acc_t* row_stats, int64_t row,
                                                int64_t label, acc_t g, int t,
                                                scalar_t* grad_vis, scalar_t* grad_txt) {
  const int C = static_cast<int>(a.C);
  scalar_t* grad_vis_row = grad_vis + row * C;
  scalar_t* grad_txt_row = grad_txt + row * C;
  if (is_ignored_row<kTarget>(label, a.p)) {
    thread_row_zero<scalar_t, TPR>(grad_vis_row, grad_txt_row, C, t);
    return;
  }
  thread_row_grad<kTarget, scalar_t, acc_t, TPR>(
      a.vis + row * a.vis_stride, a.txt + row * a.txt_stride,
      kHasProbs<kTarget> ? a.probs + row * a.target_stride : nullptr, grad_vis_row, grad_txt_row,
      C, t, label, grad_row<kTarget>(a.p, row_stats + row * kNumRowStats, g));
}

// TPR threads per row, RPB rows per block. The loop over rows runs the same
// number of times in every thread of a block, so the barriers and shuffles of
// the merge are reached by all of them, rows past the end and ignored rows too.
// With kStep (the single pass), each row's gradients follow at once, once
// thread 0 has written its statistics.
template <bool kStep, int kTarget, typename scalar_t, typename acc_t, int TPR, int RPB>
__device__ __forceinline__ void forward_rows(const StepArgs<scalar_t, acc_t>& a) {
  constexpr bool kProbs = kHasProbs<kTarget>;
  const int group = threadIdx.x / TPR;
  const int t = threadIdx.x % TPR;
  const int C = static_cast<int>(a.C);  // at most kMaxColumns (check_columns)
  // The sums over this row group's rows, in row order, in shared memory: in
  // registers, held across the row loop, they cost the single pass's gradient
  // sweep 26 registers (spills).
  __shared__ BlockPartial group_parts[RPB];
  BlockPartial& part = group_parts[group];
  if (t == 0) part = BlockPartial{};
  acc_t one = 1;
  const acc_t num_valid = kStep ? *a.num_valid : acc_t(0);

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
    if constexpr (kStep) {
      __syncthreads();  // thread 0's statistics are written and seen
      if (active) {
        const acc_t g = row_upstream_grad(&one, 0, row, a.reduction, num_valid);
        write_row_grads<kTarget, scalar_t, acc_t, TPR>(a, a.row_stats, row, label, g, t,
                                                       a.grad_vis, a.grad_txt);
      }
    }
  }
  write_block_partial<RPB>(group_parts, a.partials);
}

template <int kTarget, typename scalar_t, typename acc_t, int TPR, int RPB>
__global__ void __launch_bounds__(TPR * RPB)
    tes_forward_kernel(const StepArgs<scalar_t, acc_t> a) {
  forward_rows<false, kTarget, scalar_t, acc_t, TPR, RPB>(a);
}

template <int kTarget, typename scalar_t, typename acc_t, int TPR, int RPB>
__global__ void __launch_bounds__(TPR * RPB)
    tes_step_kernel(const StepArgs<scalar_t, acc_t> a) {
  forward_rows<true, kTarget, scalar_t, acc_t, TPR, RPB>(a);
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
    const acc_t g = row_upstream_grad(a.grad_loss, a.grad_stride, row, a.reduction, num_valid);
    write_row_grads<kTarget, scalar_t, acc_t, TPR>(a, a.row_stats, row, label, g, t, a.grad_vis,
                                                   a.grad_txt);
  }
}

constexpr int kScaleThreads = 256;

// The single pass's gradients times the upstream gradient g, in place, row by
// row (g's stride is 0 for "mean" and "sum": one g for the batch); a row whose
// g is exactly 1, as in a plain loss.backward(), is left as it is, so that a
// scalar g of 1 costs one read per block. So is a row that `labels` (class
// indices, or null) ignores: its zeros stay +0 whatever g is, as the two
// passes leave them. Each product is formed in acc_t and rounded once.
template <typename scalar_t, typename acc_t>
__global__ void __launch_bounds__(kScaleThreads)
    tes_scale_kernel(const acc_t* __restrict__ g, int64_t g_stride,
                     const int64_t* __restrict__ labels, int64_t label_stride,
                     int64_t ignore_index, int64_t B, int64_t C,
                     scalar_t* __restrict__ grad_vis, scalar_t* __restrict__ grad_txt) {
  if (g_stride == 0 && g[0] == acc_t(1)) return;
  for (int64_t row = blockIdx.x; row < B; row += gridDim.x) {
    const acc_t factor = g[row * g_stride];
    if (factor == acc_t(1)) continue;
    if (labels != nullptr && labels[row * label_stride] == ignore_index) continue;
    for (int64_t col = threadIdx.x; col < C; col += kScaleThreads) {
      const int64_t k = row * C + col;
      grad_vis[k] = static_cast<scalar_t>(static_cast<acc_t>(grad_vis[k]) * factor);
      grad_txt[k] = static_cast<scalar_t>(static_cast<acc_t>(grad_txt[k]) * factor);
    }
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

// The forward's launches, or with kStep (t is then StepTensors) the single
// pass's: the count of rows that count, the rows, the finish kernel.
template <bool kStep, typename Tensors>
void launch_forward(const Tensors& t, const Params& params) {
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
        StepArgs<scalar_t, acc_t> args{{row_inputs<scalar_t, acc_t>(t, params)}};
        args.row_stats = t.row_stats.template mutable_data_ptr<acc_t>();
        args.loss_rows = per_row ? t.loss.template mutable_data_ptr<acc_t>() : nullptr;
        args.partials = nullptr;
        args.num_valid = nullptr;
        args.reduction = params.reduction;
        args.grad_vis = nullptr;
        args.grad_txt = nullptr;
        at::Tensor num_valid;  // one acc_t, on the device
        if constexpr (kStep) {
          args.grad_vis = t.grad_vis.template mutable_data_ptr<scalar_t>();
          args.grad_txt = t.grad_txt.template mutable_data_ptr<scalar_t>();
          num_valid = at::empty({1}, t.row_stats.options());
          args.num_valid = num_valid.template const_data_ptr<acc_t>();
          if (B > 0) {
            launch<tes_count_kernel<acc_t>>(1, kFinishThreads, stream, args.labels,
                                            args.target_stride, B, args.p.ignore_index,
                                            num_valid.template mutable_data_ptr<acc_t>());
          }
        }

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
            if constexpr (kStep) {
              launch<tes_step_kernel<kTarget, scalar_t, acc_t, TPR, RPB>>(
                  num_partials, TPR * RPB, stream, args);
            } else {
              launch<tes_forward_kernel<kTarget, scalar_t, acc_t, TPR, RPB>>(
                  num_partials, TPR * RPB, stream, args);
            }
          });
        });
        launch<tes_finish_kernel<acc_t>>(1, kFinishThreads, stream, args.partials, num_partials,
                                         params.reduction,
                                         per_row ? nullptr : t.loss.template mutable_data_ptr<acc_t>(),
                                         t.batch_stats.template mutable_data_ptr<acc_t>());
      });
}

}  // namespace

void tes_loss_forward_cuda(const ForwardTensors& t, const Params& params) {
  launch_forward<false>(t, params);
}

void tes_loss_step_cuda(const StepTensors& t, const Params& params) {
  launch_forward<true>(t, params);
}

void tes_scale_gradients_cuda(const at::Tensor& grad_vis, const at::Tensor& grad_txt,
                              const at::Tensor& grad_loss, const at::Tensor& target,
                              int64_t ignore_index) {
  const int64_t B = grad_vis.size(0);
  const int64_t C = grad_vis.size(1);
  if (B == 0 || C == 0) return;
  const c10::cuda::CUDAGuard device_guard(grad_vis.device());
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  const DeviceSize device = current_device_size();
  const int blocks = static_cast<int>(
      std::min<int64_t>(B, int64_t(device.sm_count) * device.threads_per_sm / kScaleThreads));
  const int64_t g_stride = grad_loss.dim() == 1 ? grad_loss.stride(0) : 0;
  const bool indices = !target.is_floating_point();  // a probability target ignores no row
  const int64_t* labels = indices ? target.const_data_ptr<int64_t>() : nullptr;
  const int64_t label_stride = indices ? target.stride(0) : 0;
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kBFloat16, at::kHalf, grad_vis.scalar_type(), "tes_scale_gradients_cuda", [&] {
        using acc_t = acc_t_of<scalar_t>;
        launch<tes_scale_kernel<scalar_t, acc_t>>(
            blocks, kScaleThreads, stream, grad_loss.const_data_ptr<acc_t>(), g_stride, labels,
            label_stride, ignore_index, B, C,
            grad_vis.mutable_data_ptr<scalar_t>(), grad_txt.mutable_data_ptr<scalar_t>());
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
