// CUDA kernels of the fused TeS loss and their registration. The formulas
// live in ../tes_loss.h, shared with the CPU kernel; this file only decides
// which thread reads which columns and in what order partial results meet.
//
// Forward: a group of TPR threads owns a row. Each thread keeps online-softmax
// statistics of the columns it reads (tes_loss.h's RowState), the group merges
// them in a fixed order (shuffles, then shared memory across warps), and the
// group's first thread finalizes the row. Every block also sums its rows in a
// fixed order into one partial; a one-block kernel sums the partials in a
// fixed tree and finalizes the batch. No floating-point atomics, so results
// are bitwise the same on every run on one device.
//
// Backward: the same groups read each row once and write both gradients once.
//
// The file has two parts. The first, the thread schedules (which columns
// thread t of a row's group reads and writes, and in what order the group's
// states merge), is plain host-and-device code: with TESLOSS_SCHEDULES_ONLY
// defined it is all that compiles, without ATen, so that
// tests/test_cuda_schedules.py can run it on the host, one thread at a time,
// where there is no GPU. The second holds the kernels, their launch shapes and
// their registration.
#include <algorithm>
#include <cstdint>
#include <limits>
#include <stdexcept>
#include <type_traits>

#include "tes_loss.h"

namespace tesloss {
namespace {

constexpr int kPackBytes = 16;  // one 128-bit load or store
// Columns a thread folds into one RowState before merging it into its running
// one: each merge costs four exponentials, so merging per pack of 2 doubles or
// 4 floats would double the work of the exponentials themselves. A chunk's
// loads are all issued before its arithmetic, so the chunk is also what a
// thread has in flight: 128 bytes of logits for fp32 (16 columns) and for bf16
// and fp16 (32 columns). With 16 bf16 columns, a 512-thread row group (one
// block per multiprocessor) would keep too few bytes in flight to cover memory
// latency while it computes. Doubles take 8, to fit the 128 registers a thread
// of a 512-thread block has (2-byte types use about 122).
template <typename scalar_t>
constexpr int kChunk = sizeof(scalar_t) == 8 ? 8 : sizeof(scalar_t) == 4 ? 16 : 32;

template <typename T, int N>
struct alignas(sizeof(T) * N) Pack {
  T val[N];
};

template <typename scalar_t>
using PackOf = Pack<scalar_t, kPackBytes / sizeof(scalar_t)>;

template <typename T>
TESLOSS_HD uintptr_t address(const T* ptr) {
  return reinterpret_cast<uintptr_t>(ptr);
}

// Packs must start on a 16-byte boundary. The GPU faults on one that does not;
// on the host (tests/test_cuda_schedules.py) this throws instead.
TESLOSS_HD void expect_pack_aligned(const void* packs) {
#if !defined(__CUDA_ARCH__)
  if (address(packs) % kPackBytes != 0) {
    throw std::logic_error("tesloss: a 16-byte pack access is not 16-byte aligned");
  }
#endif
}

template <typename scalar_t>
TESLOSS_HD const PackOf<scalar_t>* as_packs(const scalar_t* row) {
  expect_pack_aligned(row);
  return reinterpret_cast<const PackOf<scalar_t>*>(row);
}

template <typename scalar_t>
TESLOSS_HD PackOf<scalar_t>* as_packs(scalar_t* row) {
  expect_pack_aligned(row);
  return reinterpret_cast<PackOf<scalar_t>*>(row);
}

// How a row's columns fall into a scalar head (before the first 16-byte
// boundary), whole packs, and a scalar rest. When the row pointers of a pass
// sit at different offsets from a 16-byte boundary no column can be read as a
// pack of every array at once, and the whole row is the scalar rest.
struct RowSplit {
  int head;
  int num_packs;
  int rest_begin;
};

template <typename scalar_t>
TESLOSS_HD RowSplit split_row(int C, uintptr_t first_address, bool same_offset) {
  constexpr int kPack = kPackBytes / sizeof(scalar_t);
  const int offset = static_cast<int>(first_address % kPackBytes);
  if (!same_offset || offset % sizeof(scalar_t) != 0) return RowSplit{0, 0, 0};
  const int to_boundary = (kPackBytes - offset) % kPackBytes / static_cast<int>(sizeof(scalar_t));
  const int head = to_boundary < C ? to_boundary : C;
  const int num_packs = (C - head) / kPack;
  return RowSplit{head, num_packs, head + num_packs * kPack};
}

// The max of a chunk's columns drops nan (one fmax instruction, where nan_max
// takes three): a nan column still makes the chunk's sum nan, as exp(nan) is
// nan, and that reaches the row's log-sum-exp and loss.
TESLOSS_HD float column_max(float a, float b) { return fmaxf(a, b); }
TESLOSS_HD double column_max(double a, double b) { return fmax(a, b); }

// The statistics of N columns, padded with -inf where a thread has fewer.
template <typename acc_t, int N>
TESLOSS_HD RowState<acc_t> chunk_state(const acc_t (&z)[N], const acc_t (&s)[N]) {
  constexpr acc_t neg_inf = -std::numeric_limits<acc_t>::infinity();
  acc_t max_vis = neg_inf;
  acc_t max_txt = neg_inf;
#pragma unroll
  for (int k = 0; k < N; ++k) {
    max_vis = column_max(max_vis, z[k]);
    max_txt = column_max(max_txt, s[k]);
  }
  const acc_t shift_vis = softmax_shift(max_vis);
  const acc_t shift_txt = softmax_shift(max_txt);
  acc_t sum_vis = 0, sum_txt = 0, dot_vis = 0, dot_txt = 0;
#pragma unroll
  for (int k = 0; k < N; ++k) {
    sum_vis += tes_exp(z[k] - shift_vis);
    const acc_t e = tes_exp(s[k] - shift_txt);
    sum_txt += e;
    dot_vis += weighted(e, z[k]);
    dot_txt += weighted(e, s[k]);
  }
  return RowState<acc_t>{max_vis, sum_vis, max_txt, sum_txt, dot_vis, dot_txt};
}

// One chunk of whole packs: packs first + t + u * TPR for u < kPacks, so each
// load instruction of a warp covers consecutive memory.
template <bool kChecked, typename scalar_t, typename acc_t, int TPR>
TESLOSS_HD RowState<acc_t> pack_chunk_state(const scalar_t* __restrict__ vis,
                                            const scalar_t* __restrict__ txt, int num_packs,
                                            int first, int t, acc_t inv_tau) {
  constexpr int kPack = kPackBytes / sizeof(scalar_t);
  constexpr int kPacks = kChunk<scalar_t> / kPack;
  constexpr acc_t neg_inf = -std::numeric_limits<acc_t>::infinity();
  using PackT = PackOf<scalar_t>;
  const PackT* vis_packs = as_packs(vis);
  const PackT* txt_packs = as_packs(txt);
  PackT vis_in[kPacks];
  PackT txt_in[kPacks];
  // All loads before any arithmetic, so they are in flight together.
#pragma unroll
  for (int u = 0; u < kPacks; ++u) {
    const int index = first + t + u * TPR;
    if (!kChecked || index < num_packs) {
      vis_in[u] = vis_packs[index];
      txt_in[u] = txt_packs[index];
    } else {
      vis_in[u] = PackT{};
      txt_in[u] = PackT{};
    }
  }
  acc_t z[kChunk<scalar_t>];
  acc_t s[kChunk<scalar_t>];
#pragma unroll
  for (int u = 0; u < kPacks; ++u) {
    const bool in_row = !kChecked || first + t + u * TPR < num_packs;
#pragma unroll
    for (int k = 0; k < kPack; ++k) {
      z[u * kPack + k] = in_row ? static_cast<acc_t>(vis_in[u].val[k]) : neg_inf;
      s[u * kPack + k] = in_row ? static_cast<acc_t>(txt_in[u].val[k]) * inv_tau : neg_inf;
    }
  }
  return chunk_state(z, s);
}

// The statistics of the columns thread t of TPR reads in one row: the head's
// column t, whole packs in chunks, and the rest in strided scalar chunks.
template <typename scalar_t, typename acc_t, int TPR>
TESLOSS_HD RowState<acc_t> thread_row_state(const scalar_t* __restrict__ vis,
                                            const scalar_t* __restrict__ txt, int C, int t,
                                            acc_t inv_tau) {
  constexpr int kPack = kPackBytes / sizeof(scalar_t);
  constexpr int kPacks = kChunk<scalar_t> / kPack;
  constexpr acc_t neg_inf = -std::numeric_limits<acc_t>::infinity();
  static_assert(kPack <= TPR, "the head and the rest of a packed row need a thread per column");
  const RowSplit split = split_row<scalar_t>(
      C, address(vis), address(vis) % kPackBytes == address(txt) % kPackBytes);

  RowState<acc_t> state = row_state_empty<acc_t>();
  if (t < split.head) {
    const acc_t z[1] = {static_cast<acc_t>(vis[t])};
    const acc_t s[1] = {static_cast<acc_t>(txt[t]) * inv_tau};
    state = chunk_state(z, s);
  }

  const scalar_t* vis_body = vis + split.head;
  const scalar_t* txt_body = txt + split.head;
  int first = 0;
  for (; first + kPacks * TPR <= split.num_packs; first += kPacks * TPR) {
    state = row_state_merge(state, pack_chunk_state<false, scalar_t, acc_t, TPR>(
                                       vis_body, txt_body, split.num_packs, first, t, inv_tau));
  }
  if (first + t < split.num_packs) {
    state = row_state_merge(state, pack_chunk_state<true, scalar_t, acc_t, TPR>(
                                       vis_body, txt_body, split.num_packs, first, t, inv_tau));
  }

  for (int rest = split.rest_begin; rest + t < C; rest += kChunk<scalar_t> * TPR) {
    acc_t z[kChunk<scalar_t>];
    acc_t s[kChunk<scalar_t>];
#pragma unroll
    for (int k = 0; k < kChunk<scalar_t>; ++k) {
      const int col = rest + t + k * TPR;
      z[k] = col < C ? static_cast<acc_t>(vis[col]) : neg_inf;
      s[k] = col < C ? static_cast<acc_t>(txt[col]) * inv_tau : neg_inf;
    }
    state = row_state_merge(state, chunk_state(z, s));
  }
  return state;
}

// What the backward needs of one row besides its columns.
template <typename acc_t>
struct GradRow {
  acc_t inv_tau;
  acc_t lse_vis;
  acc_t lse_txt;
  acc_t g;
  acc_t g_txt;
  acc_t lambda_v;
  acc_t one_minus_lambda_v;
};

// Both gradients of one column, in acc_t until the one rounding to scalar_t,
// the label's term included.
template <typename scalar_t, typename acc_t>
TESLOSS_HD void grad_column(scalar_t vis_in, scalar_t txt_in, bool is_label,
                            const GradRow<acc_t>& r, scalar_t& grad_vis, scalar_t& grad_txt) {
  const acc_t onehot = is_label ? acc_t(1) : acc_t(0);
  const acc_t p_v = softmax_prob(static_cast<acc_t>(vis_in), r.lse_vis);
  const acc_t p_ref = softmax_prob(static_cast<acc_t>(txt_in) * r.inv_tau, r.lse_txt);
  grad_vis = static_cast<scalar_t>(
      vis_grad(p_v, p_ref, onehot, r.g, r.lambda_v, r.one_minus_lambda_v));
  grad_txt = static_cast<scalar_t>(txt_grad(p_ref, onehot, r.g_txt));
}

template <bool kChecked, typename scalar_t, typename acc_t, int TPR>
TESLOSS_HD void pack_chunk_grad(const scalar_t* __restrict__ vis, const scalar_t* __restrict__ txt,
                                scalar_t* __restrict__ grad_vis, scalar_t* __restrict__ grad_txt,
                                int num_packs, int first, int t, int64_t label_in_body,
                                const GradRow<acc_t>& r) {
  constexpr int kPack = kPackBytes / sizeof(scalar_t);
  constexpr int kPacks = kChunk<scalar_t> / kPack;
  using PackT = PackOf<scalar_t>;
  const PackT* vis_packs = as_packs(vis);
  const PackT* txt_packs = as_packs(txt);
  PackT vis_in[kPacks];
  PackT txt_in[kPacks];
#pragma unroll
  for (int u = 0; u < kPacks; ++u) {
    const int index = first + t + u * TPR;
    if (!kChecked || index < num_packs) {
      vis_in[u] = vis_packs[index];
      txt_in[u] = txt_packs[index];
    }
  }
#pragma unroll
  for (int u = 0; u < kPacks; ++u) {
    const int index = first + t + u * TPR;
    if (kChecked && index >= num_packs) continue;
    PackT vis_out;
    PackT txt_out;
#pragma unroll
    for (int k = 0; k < kPack; ++k) {
      grad_column(vis_in[u].val[k], txt_in[u].val[k],
                  int64_t(index) * kPack + k == label_in_body, r, vis_out.val[k],
                  txt_out.val[k]);
    }
    as_packs(grad_vis)[index] = vis_out;
    as_packs(grad_txt)[index] = txt_out;
  }
}

// Thread t's share of one row of the backward, split like the forward.
template <typename scalar_t, typename acc_t, int TPR>
TESLOSS_HD void thread_row_grad(const scalar_t* __restrict__ vis, const scalar_t* __restrict__ txt,
                                scalar_t* __restrict__ grad_vis, scalar_t* __restrict__ grad_txt,
                                int C, int t, int64_t label, const GradRow<acc_t>& r) {
  constexpr int kPack = kPackBytes / sizeof(scalar_t);
  constexpr int kPacks = kChunk<scalar_t> / kPack;
  static_assert(kPack <= TPR, "the head and the rest of a packed row need a thread per column");
  const uintptr_t offset = address(vis) % kPackBytes;
  const bool same_offset = address(txt) % kPackBytes == offset &&
                           address(grad_vis) % kPackBytes == offset &&
                           address(grad_txt) % kPackBytes == offset;
  const RowSplit split = split_row<scalar_t>(C, address(vis), same_offset);

  if (t < split.head) {
    grad_column(vis[t], txt[t], t == label, r, grad_vis[t], grad_txt[t]);
  }
  const int64_t label_in_body = label - split.head;
  int first = 0;
  for (; first + kPacks * TPR <= split.num_packs; first += kPacks * TPR) {
    pack_chunk_grad<false, scalar_t, acc_t, TPR>(
        vis + split.head, txt + split.head, grad_vis + split.head, grad_txt + split.head,
        split.num_packs, first, t, label_in_body, r);
  }
  if (first + t < split.num_packs) {
    pack_chunk_grad<true, scalar_t, acc_t, TPR>(
        vis + split.head, txt + split.head, grad_vis + split.head, grad_txt + split.head,
        split.num_packs, first, t, label_in_body, r);
  }
#pragma unroll 4
  for (int col = split.rest_begin + t; col < C; col += TPR) {
    grad_column(vis[col], txt[col], col == label, r, grad_vis[col], grad_txt[col]);
  }
}

// An ignored row's gradients are zeros; its logits are not read.
template <typename scalar_t, int TPR>
TESLOSS_HD void thread_row_zero(scalar_t* __restrict__ grad_vis, scalar_t* __restrict__ grad_txt,
                                int C, int t) {
  constexpr int kPack = kPackBytes / sizeof(scalar_t);
  using PackT = PackOf<scalar_t>;
  const RowSplit split = split_row<scalar_t>(
      C, address(grad_vis), address(grad_vis) % kPackBytes == address(grad_txt) % kPackBytes);
  if (t < split.head) {
    grad_vis[t] = scalar_t(0);
    grad_txt[t] = scalar_t(0);
  }
  PackT zeros;
#pragma unroll
  for (int k = 0; k < kPack; ++k) zeros.val[k] = scalar_t(0);
  for (int index = t; index < split.num_packs; index += TPR) {
    as_packs(grad_vis + split.head)[index] = zeros;
    as_packs(grad_txt + split.head)[index] = zeros;
  }
  for (int col = split.rest_begin + t; col < C; col += TPR) {
    grad_vis[col] = scalar_t(0);
    grad_txt[col] = scalar_t(0);
  }
}

template <typename acc_t>
__device__ __forceinline__ RowState<acc_t> shfl_xor_state(const RowState<acc_t>& s, int lane_mask,
                                                          int width) {
  constexpr unsigned kAllLanes = 0xffffffffu;
  return RowState<acc_t>{__shfl_xor_sync(kAllLanes, s.max_vis, lane_mask, width),
                         __shfl_xor_sync(kAllLanes, s.sum_vis, lane_mask, width),
                         __shfl_xor_sync(kAllLanes, s.max_txt, lane_mask, width),
                         __shfl_xor_sync(kAllLanes, s.sum_txt, lane_mask, width),
                         __shfl_xor_sync(kAllLanes, s.ref_dot_vis, lane_mask, width),
                         __shfl_xor_sync(kAllLanes, s.ref_dot_txt, lane_mask, width)};
}

// Merges the states of kLanes consecutive lanes; every lane of the warp must
// call it, whatever its row.
template <typename acc_t, int kLanes>
__device__ __forceinline__ RowState<acc_t> lanes_merge(RowState<acc_t> state) {
#pragma unroll
  for (int lane_mask = kLanes / 2; lane_mask > 0; lane_mask /= 2) {
    state = row_state_merge(state, shfl_xor_state(state, lane_mask, kLanes));
  }
  return state;
}

}  // namespace
}  // namespace tesloss

#ifndef TESLOSS_SCHEDULES_ONLY  // the kernels, their launch shapes and registration
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

namespace tesloss {

// Defined in tes_loss.cpp and linked into the same library, so both devices
// refuse the same arguments with the same messages and allocate alike.
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> prepare_forward(
    const at::Tensor& vis_logits, const at::Tensor& txt_logits, const at::Tensor& target,
    double tau, int64_t reduction);
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>
prepare_backward(const at::Tensor& grad_loss, const at::Tensor& vis_logits,
                 const at::Tensor& txt_logits, const at::Tensor& target,
                 const at::Tensor& row_stats, const at::Tensor& batch_stats, double tau,
                 int64_t reduction);

namespace {

// Entries of the per-block partial sums the forward leaves for the finish kernel.
enum Partial : int {
  kPartLoss = 0,
  kPartCeVis = 1,
  kPartKlRef = 2,
  kPartCeTxt = 3,
  kPartCount = 4,
  kNumPartials = 5,
};

// What both passes read: the rows of both logits and the labels.
template <typename scalar_t, typename acc_t>
struct RowInputs {
  const scalar_t* vis;
  const scalar_t* txt;
  const int64_t* labels;
  int64_t vis_stride;
  int64_t txt_stride;
  int64_t label_stride;
  int64_t B;
  int C;
  Params<acc_t> p;
};

template <typename scalar_t, typename acc_t>
struct ForwardArgs : RowInputs<scalar_t, acc_t> {
  acc_t* row_stats;  // [B, kNumRowStats]
  acc_t* loss_rows;  // [B] for reduction "none", else null
  acc_t* partials;   // [gridDim.x, kNumPartials]
};

// TPR threads per row, RPB rows per block. The loop over rows runs the same
// number of times in every thread of a block, so the barriers and shuffles of
// the merge are reached by all of them, rows past the end and ignored rows too.
template <typename scalar_t, typename acc_t, int TPR, int RPB>
__global__ void __launch_bounds__(TPR * RPB)
    tes_forward_kernel(const ForwardArgs<scalar_t, acc_t> a) {
  constexpr int kWarpsPerRow = TPR > 32 ? TPR / 32 : 1;
  static_assert(TPR <= 32 ? 32 % TPR == 0 : TPR % 32 == 0, "a row's threads tile warps");
  __shared__ RowState<acc_t> warp_states[RPB][kWarpsPerRow];
  __shared__ acc_t row_group_parts[RPB][kNumPartials];

  const int group = threadIdx.x / TPR;
  const int t = threadIdx.x % TPR;
  acc_t parts[kNumPartials] = {};  // sums over this row group's rows, in row order

  for (int64_t first_row = int64_t(blockIdx.x) * RPB; first_row < a.B;
       first_row += int64_t(gridDim.x) * RPB) {
    const int64_t row = first_row + group;
    const bool active = row < a.B;
    const int64_t label = active ? a.labels[row * a.label_stride] : a.p.ignore_index;
    const bool ignored = is_ignored(label, a.p);
    const bool valid = is_valid_label<acc_t>(label, a.C);
    if (active && t == 0) {
      CUDA_KERNEL_ASSERT(ignored || valid);
    }
    const bool work = active && !ignored && valid;

    RowState<acc_t> state = row_state_empty<acc_t>();
    acc_t z_label = 0;
    acc_t s_label = 0;
    if (work) {
      const scalar_t* vis_row = a.vis + row * a.vis_stride;
      const scalar_t* txt_row = a.txt + row * a.txt_stride;
      if (t == 0) {  // loaded before the sweep, which then hides its latency
        z_label = static_cast<acc_t>(vis_row[label]);
        s_label = static_cast<acc_t>(txt_row[label]) * a.p.inv_tau;
      }
      state = thread_row_state<scalar_t, acc_t, TPR>(vis_row, txt_row, a.C, t, a.p.inv_tau);
    }

    if constexpr (TPR <= 32) {
      state = lanes_merge<acc_t, TPR>(state);
    } else {
      state = lanes_merge<acc_t, 32>(state);
      const int warp = t / 32;
      __syncthreads();  // the previous row's states have been read
      if (t % 32 == 0) warp_states[group][warp] = state;
      __syncthreads();
      if (t == 0) {
        state = warp_states[group][0];
#pragma unroll
        for (int w = 1; w < kWarpsPerRow; ++w) state = row_state_merge(state, warp_states[group][w]);
      }
    }

    if (active && t == 0) {
      acc_t out[kNumRowStats];
      if (work) {
        row_finalize(state, z_label, s_label, a.p, out);
      } else if (ignored) {
        row_ignored(out);
      } else {  // reached only where kernel asserts are compiled out
#pragma unroll
        for (int k = 0; k < kNumRowStats; ++k) out[k] = std::numeric_limits<acc_t>::quiet_NaN();
      }
      acc_t* stats = a.row_stats + row * kNumRowStats;
#pragma unroll
      for (int k = 0; k < kNumRowStats; ++k) stats[k] = out[k];
      if (a.loss_rows != nullptr) a.loss_rows[row] = out[kRowLoss];
      if (!ignored) {
        parts[kPartLoss] += out[kRowLoss];
        parts[kPartCeVis] += out[kRowCeVis];
        parts[kPartKlRef] += out[kRowKlRef];
        parts[kPartCeTxt] += out[kRowCeTxt];
        parts[kPartCount] += acc_t(1);
      }
    }
  }

  if (t == 0) {
#pragma unroll
    for (int k = 0; k < kNumPartials; ++k) row_group_parts[group][k] = parts[k];
  }
  __syncthreads();
  if (threadIdx.x == 0) {
    acc_t block_parts[kNumPartials];
#pragma unroll
    for (int k = 0; k < kNumPartials; ++k) block_parts[k] = row_group_parts[0][k];
    for (int g = 1; g < RPB; ++g) {
#pragma unroll
      for (int k = 0; k < kNumPartials; ++k) block_parts[k] += row_group_parts[g][k];
    }
#pragma unroll
    for (int k = 0; k < kNumPartials; ++k) {
      a.partials[int64_t(blockIdx.x) * kNumPartials + k] = block_parts[k];
    }
  }
}

constexpr int kFinishThreads = 256;

// Sums the forward's per-block partials in a fixed tree and writes the loss
// (for "mean" and "sum") and batch_stats. The row count is summed as an
// integer, so it is exact for any batch.
template <typename acc_t>
__global__ void __launch_bounds__(kFinishThreads)
    tes_finish_kernel(const acc_t* __restrict__ partials, int num_partials, int64_t reduction,
                      acc_t* __restrict__ loss, acc_t* __restrict__ batch_stats) {
  constexpr int kNumSums = kPartCount;
  __shared__ acc_t sums[kNumSums][kFinishThreads];
  __shared__ long long counts[kFinishThreads];
  const int tid = threadIdx.x;

  acc_t sum[kNumSums] = {};
  long long count = 0;
  for (int i = tid; i < num_partials; i += kFinishThreads) {
    const acc_t* part = partials + int64_t(i) * kNumPartials;
#pragma unroll
    for (int k = 0; k < kNumSums; ++k) sum[k] += part[k];
    count += static_cast<long long>(part[kPartCount]);
  }
#pragma unroll
  for (int k = 0; k < kNumSums; ++k) sums[k][tid] = sum[k];
  counts[tid] = count;
  __syncthreads();
  for (int half = kFinishThreads / 2; half > 0; half /= 2) {
    if (tid < half) {
#pragma unroll
      for (int k = 0; k < kNumSums; ++k) sums[k][tid] += sums[k][tid + half];
      counts[tid] += counts[tid + half];
    }
    __syncthreads();
  }
  if (tid == 0) {
    acc_t row_sums[kNumRowStats] = {};
    row_sums[kRowLoss] = sums[kPartLoss][0];
    row_sums[kRowCeVis] = sums[kPartCeVis][0];
    row_sums[kRowKlRef] = sums[kPartKlRef][0];
    row_sums[kRowCeTxt] = sums[kPartCeTxt][0];
    batch_finalize(row_sums, static_cast<acc_t>(counts[0]), reduction,
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
template <typename scalar_t, typename acc_t, int TPR, int RPB>
__global__ void __launch_bounds__(TPR * RPB)
    tes_backward_kernel(const BackwardArgs<scalar_t, acc_t> a) {
  const int group = threadIdx.x / TPR;
  const int t = threadIdx.x % TPR;
  const acc_t num_valid = a.batch_stats[kBatchValid];
  GradRow<acc_t> r;
  r.inv_tau = a.p.inv_tau;
  r.lambda_v = a.p.lambda_v;
  r.one_minus_lambda_v = acc_t(1) - a.p.lambda_v;

  for (int64_t row = int64_t(blockIdx.x) * RPB + group; row < a.B;
       row += int64_t(gridDim.x) * RPB) {
    const int64_t label = a.labels[row * a.label_stride];
    if (t == 0) {
      CUDA_KERNEL_ASSERT(is_ignored(label, a.p) || is_valid_label<acc_t>(label, a.C));
    }
    scalar_t* grad_vis_row = a.grad_vis + row * a.C;
    scalar_t* grad_txt_row = a.grad_txt + row * a.C;
    if (is_ignored(label, a.p)) {
      thread_row_zero<scalar_t, TPR>(grad_vis_row, grad_txt_row, a.C, t);
      continue;
    }
    const acc_t* stats = a.row_stats + row * kNumRowStats;
    r.lse_vis = stats[kRowLseVis];
    r.lse_txt = stats[kRowLseTxt];
    r.g = row_upstream_grad(a.grad_loss, a.grad_stride, row, a.reduction, num_valid);
    r.g_txt = r.g * a.p.lambda_t * a.p.inv_tau;
    thread_row_grad<scalar_t, acc_t, TPR>(a.vis + row * a.vis_stride, a.txt + row * a.txt_stride,
                                          grad_vis_row, grad_txt_row, a.C, t, label, r);
  }
}

template <int N>
using Int = std::integral_constant<int, N>;

// Threads per row: by C, from 8 for tiny rows to a warp (C <= 1024), four warps
// (C <= 8192) and a block of 512 beyond, so each thread reads a few chunks. A
// batch too small to fill the device gets four times more threads per row, while
// each thread still has columns to read: a grid of a few dozen blocks would leave
// most multiprocessors idle (256 rows of 1000 classes give 32 blocks of 8 rows).
int threads_per_row(int64_t B, int64_t C, int64_t device_threads) {
  int tpr = C <= 128 ? 8 : C <= 1024 ? 32 : C <= 8192 ? 128 : 512;
  while (tpr < 512 && B * tpr * 4 <= device_threads && C >= int64_t(tpr) * 16) tpr *= 4;
  return tpr;
}

// Calls launch(Int<TPR>, Int<RPB>): TPR threads per row, RPB rows per block.
template <typename Launch>
void with_row_shape(int tpr, Launch&& launch) {
  switch (tpr) {
    case 8:
      launch(Int<8>{}, Int<32>{});
      break;
    case 32:
      launch(Int<32>{}, Int<8>{});
      break;
    case 128:
      launch(Int<128>{}, Int<2>{});
      break;
    default:
      launch(Int<512>{}, Int<1>{});
      break;
  }
}

struct DeviceSize {
  int64_t sm_count;
  int64_t threads_per_sm;
};

DeviceSize current_device_size() {
  const cudaDeviceProp* props = at::cuda::getCurrentDeviceProperties();
  return DeviceSize{props->multiProcessorCount, props->maxThreadsPerMultiProcessor};
}

// Enough blocks to fill the device, no more: the forward writes one partial
// per block, and the finish kernel reads them all. A function of the shape and
// the device only, so the order of every sum is too.
int row_blocks(int64_t B, int rows_per_block, int threads_per_block, const DeviceSize& device) {
  const int64_t resident =
      device.sm_count * std::max<int64_t>(1, device.threads_per_sm / threads_per_block);
  const int64_t needed = (B + rows_per_block - 1) / rows_per_block;
  return static_cast<int>(std::min(needed, resident));
}

// Columns are indexed with 32-bit integers inside a row, with room for a
// sweep's stride past the last one.
constexpr int64_t kMaxColumns = int64_t(1) << 30;

void check_cuda_args(const char* op, const at::Tensor& vis_logits) {
  TORCH_CHECK(vis_logits.is_cuda(), op, ": vis_logits must be a CUDA tensor, got ",
              vis_logits.device());
  TORCH_CHECK(vis_logits.size(1) <= kMaxColumns, op, ": vis_logits must have at most ",
              kMaxColumns, " classes on CUDA, got ", vis_logits.size(1));
}

template <typename scalar_t, typename acc_t>
void fill_row_inputs(RowInputs<scalar_t, acc_t>& in, const at::Tensor& vis_logits,
                     const at::Tensor& txt_logits, const at::Tensor& target, double tau,
                     double lambda_v, double lambda_t, int64_t ignore_index) {
  in.vis = vis_logits.const_data_ptr<scalar_t>();
  in.txt = txt_logits.const_data_ptr<scalar_t>();
  in.labels = target.const_data_ptr<int64_t>();
  in.vis_stride = vis_logits.stride(0);
  in.txt_stride = txt_logits.stride(0);
  in.label_stride = target.stride(0);
  in.B = vis_logits.size(0);
  in.C = static_cast<int>(vis_logits.size(1));
  in.p = make_params<acc_t>(tau, lambda_v, lambda_t, ignore_index);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> tes_loss_forward_cuda(
    const at::Tensor& vis_logits_in, const at::Tensor& txt_logits_in, const at::Tensor& target,
    double tau, double lambda_v, double lambda_t, int64_t ignore_index, int64_t reduction) {
  const c10::cuda::CUDAGuard device_guard(vis_logits_in.device());
  // Named tensors, not a structured binding: lambdas below capture them (C++17).
  at::Tensor vis_logits, txt_logits, loss, row_stats, batch_stats;
  std::tie(vis_logits, txt_logits, loss, row_stats, batch_stats) =
      prepare_forward(vis_logits_in, txt_logits_in, target, tau, reduction);
  check_cuda_args("fused_tes_loss", vis_logits);
  const int64_t B = vis_logits.size(0);
  const int64_t C = vis_logits.size(1);
  const auto acc_options = row_stats.options();
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  const DeviceSize device = current_device_size();
  const int tpr = threads_per_row(B, C, device.sm_count * device.threads_per_sm);

  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kBFloat16, at::kHalf, vis_logits.scalar_type(), "tes_loss_forward_cuda", [&] {
        using acc_t = acc_t_of<scalar_t>;
        ForwardArgs<scalar_t, acc_t> args;
        fill_row_inputs(args, vis_logits, txt_logits, target, tau, lambda_v, lambda_t,
                        ignore_index);
        args.row_stats = row_stats.mutable_data_ptr<acc_t>();
        args.loss_rows = reduction == kReduceNone ? loss.mutable_data_ptr<acc_t>() : nullptr;
        args.partials = nullptr;

        int num_partials = 0;
        at::Tensor partials;
        with_row_shape(tpr, [&](auto threads, auto rows) {
          constexpr int TPR = decltype(threads)::value;
          constexpr int RPB = decltype(rows)::value;
          num_partials = row_blocks(B, RPB, TPR * RPB, device);
          partials = at::empty({int64_t(num_partials), int64_t(kNumPartials)}, acc_options);
          if (num_partials == 0) return;  // B == 0: the finish kernel alone gives the empty sums
          args.partials = partials.mutable_data_ptr<acc_t>();
          tes_forward_kernel<scalar_t, acc_t, TPR, RPB>
              <<<num_partials, TPR * RPB, 0, stream>>>(args);
          C10_CUDA_KERNEL_LAUNCH_CHECK();
        });
        tes_finish_kernel<acc_t><<<1, kFinishThreads, 0, stream>>>(
            args.partials, num_partials, reduction,
            reduction == kReduceNone ? nullptr : loss.mutable_data_ptr<acc_t>(),
            batch_stats.mutable_data_ptr<acc_t>());
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      });
  return {loss, row_stats, batch_stats};
}

std::tuple<at::Tensor, at::Tensor> tes_loss_backward_cuda(
    const at::Tensor& grad_loss_in, const at::Tensor& vis_logits_in,
    const at::Tensor& txt_logits_in, const at::Tensor& target, const at::Tensor& row_stats_in,
    const at::Tensor& batch_stats_in, double tau, double lambda_v, double lambda_t,
    int64_t ignore_index, int64_t reduction) {
  const c10::cuda::CUDAGuard device_guard(vis_logits_in.device());
  at::Tensor grad_loss, vis_logits, txt_logits, row_stats, batch_stats, grad_vis, grad_txt;
  std::tie(grad_loss, vis_logits, txt_logits, row_stats, batch_stats, grad_vis, grad_txt) =
      prepare_backward(grad_loss_in, vis_logits_in, txt_logits_in, target, row_stats_in,
                       batch_stats_in, tau, reduction);
  check_cuda_args("tes_loss_backward", vis_logits);
  const int64_t B = vis_logits.size(0);
  const int64_t C = vis_logits.size(1);
  if (B == 0) return {grad_vis, grad_txt};
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  const DeviceSize device = current_device_size();
  const int tpr = threads_per_row(B, C, device.sm_count * device.threads_per_sm);

  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kBFloat16, at::kHalf, vis_logits.scalar_type(), "tes_loss_backward_cuda", [&] {
        using acc_t = acc_t_of<scalar_t>;
        BackwardArgs<scalar_t, acc_t> args;
        fill_row_inputs(args, vis_logits, txt_logits, target, tau, lambda_v, lambda_t,
                        ignore_index);
        args.row_stats = row_stats.const_data_ptr<acc_t>();
        args.grad_loss = grad_loss.const_data_ptr<acc_t>();
        args.batch_stats = batch_stats.const_data_ptr<acc_t>();
        args.grad_stride = grad_loss.dim() == 1 ? grad_loss.stride(0) : 0;
        args.reduction = reduction;
        args.grad_vis = grad_vis.mutable_data_ptr<scalar_t>();
        args.grad_txt = grad_txt.mutable_data_ptr<scalar_t>();
        with_row_shape(tpr, [&](auto threads, auto rows) {
          constexpr int TPR = decltype(threads)::value;
          constexpr int RPB = decltype(rows)::value;
          tes_backward_kernel<scalar_t, acc_t, TPR, RPB>
              <<<row_blocks(B, RPB, TPR * RPB, device), TPR * RPB, 0, stream>>>(args);
          C10_CUDA_KERNEL_LAUNCH_CHECK();
        });
      });
  return {grad_vis, grad_txt};
}

}  // namespace

TORCH_LIBRARY_IMPL(tesloss, CUDA, m) {
  m.impl("tes_loss_forward", &tes_loss_forward_cuda);
  m.impl("tes_loss_backward", &tes_loss_backward_cuda);
}

}  // namespace tesloss
#endif  // TESLOSS_SCHEDULES_ONLY
