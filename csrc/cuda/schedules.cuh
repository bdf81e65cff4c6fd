// The CUDA kernels' thread schedules: which columns thread t of a row's group
// of TPR threads reads and writes, in 16-byte packs where the row allows it,
// and how its columns fold into one RowState. Plain host-and-device code
// without ATen, so that tests/cuda_schedules_on_host.cu runs the very same
// schedules on the host, one thread at a time, where there is no GPU. The
// kernels (tes_loss_cuda.cu) add what only a GPU has: the launch, the
// shuffles and shared memory that merge a group's states, and the batch sums.
#pragma once

#include <cstdint>
#include <limits>
#include <stdexcept>

#include "tes_loss.h"

namespace tesloss {

constexpr int kPackBytes = 16;  // one 128-bit load or store
// Columns a thread folds into one RowState before merging it into its running
// one: each merge costs four exponentials, so merging per pack of 2 doubles or
// 4 floats would double the work of the exponentials themselves. A chunk's
// loads are all issued before its arithmetic, so the chunk is also what a
// thread has in flight: 128 bytes of logits for fp32 (16 columns) and for bf16
// and fp16 (32 columns), enough to cover memory latency where a 512-thread row
// group has a multiprocessor to itself (docs/DESIGN.md has the latency model).
// Doubles take 8, to fit the 128 registers a thread of a 512-thread block has.
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

// The statistics of N columns, padded with -inf where a thread has fewer. z
// and t are in their own units; the text exponent is (t - max t) / tau.
template <typename acc_t, int N>
TESLOSS_HD RowState<acc_t> chunk_state(const acc_t (&z)[N], const acc_t (&t)[N], const RowParams<acc_t>& p) {
  constexpr acc_t neg_inf = -std::numeric_limits<acc_t>::infinity();
  acc_t max_vis = neg_inf;
  acc_t max_txt = neg_inf;
#pragma unroll
  for (int k = 0; k < N; ++k) {
    max_vis = column_max(max_vis, z[k]);
    max_txt = column_max(max_txt, t[k]);
  }
  const acc_t shift_vis = softmax_shift(max_vis);
  const acc_t shift_txt = softmax_shift(max_txt);
  acc_t sum_vis = 0, sum_txt = 0, gap_vis = 0, gap_txt = 0;
#pragma unroll
  for (int k = 0; k < N; ++k) {
    const acc_t d_vis = z[k] - shift_vis;
    const acc_t d_txt = t[k] - shift_txt;
    sum_vis += tes_exp(d_vis);
    const acc_t e = text_exp(d_txt, p);
    sum_txt += e;
    const acc_t w = e * acc_t(kGapScale);  // exact: a power of two
    gap_vis -= weighted(w, d_vis);
    gap_txt -= weighted(w, d_txt);
  }
  return RowState<acc_t>{max_vis, sum_vis, max_txt, sum_txt, gap_vis, gap_txt};
}

// Loads one chunk of whole packs of both logits, packs first + t + u * TPR for
// u < kPacks, so each load instruction of a warp covers consecutive memory; all
// loads come before any arithmetic, so they are in flight together. With
// kChecked, packs past num_packs are left out, and set to zeros where kZeroed
// (the forward reads every pack's lanes; the backward skips those packs, and
// zeroing them there costs registers: sm_90 bf16 backward spills).
template <bool kChecked, bool kZeroed, int TPR, typename scalar_t, int kPacks>
TESLOSS_HD void load_chunk_packs(const scalar_t* __restrict__ vis,
                                 const scalar_t* __restrict__ txt, int num_packs, int first,
                                 int t, PackOf<scalar_t> (&vis_in)[kPacks],
                                 PackOf<scalar_t> (&txt_in)[kPacks]) {
  using PackT = PackOf<scalar_t>;
  const PackT* vis_packs = as_packs(vis);
  const PackT* txt_packs = as_packs(txt);
#pragma unroll
  for (int u = 0; u < kPacks; ++u) {
    const int index = first + t + u * TPR;
    if (!kChecked || index < num_packs) {
      vis_in[u] = vis_packs[index];
      txt_in[u] = txt_packs[index];
    } else if (kZeroed) {
      vis_in[u] = PackT{};
      txt_in[u] = PackT{};
    }
  }
}

// The statistics of one chunk of whole packs.
template <bool kChecked, typename scalar_t, typename acc_t, int TPR>
TESLOSS_HD RowState<acc_t> pack_chunk_state(const scalar_t* __restrict__ vis,
                                            const scalar_t* __restrict__ txt, int num_packs,
                                            int first, int t, const RowParams<acc_t>& p) {
  constexpr int kPack = kPackBytes / sizeof(scalar_t);
  constexpr int kPacks = kChunk<scalar_t> / kPack;
  constexpr acc_t neg_inf = -std::numeric_limits<acc_t>::infinity();
  using PackT = PackOf<scalar_t>;
  PackT vis_in[kPacks];
  PackT txt_in[kPacks];
  load_chunk_packs<kChecked, true, TPR>(vis, txt, num_packs, first, t, vis_in, txt_in);
  acc_t z[kChunk<scalar_t>];
  acc_t txt_acc[kChunk<scalar_t>];
#pragma unroll
  for (int u = 0; u < kPacks; ++u) {
    const bool in_row = !kChecked || first + t + u * TPR < num_packs;
#pragma unroll
    for (int k = 0; k < kPack; ++k) {
      z[u * kPack + k] = in_row ? static_cast<acc_t>(vis_in[u].val[k]) : neg_inf;
      txt_acc[u * kPack + k] = in_row ? static_cast<acc_t>(txt_in[u].val[k]) : neg_inf;
    }
  }
  return chunk_state(z, txt_acc, p);
}

// The statistics of the columns thread t of TPR reads in one row: the head's
// column t, whole packs in chunks, and the rest in strided scalar chunks.
template <typename scalar_t, typename acc_t, int TPR>
TESLOSS_HD RowState<acc_t> thread_row_state(const scalar_t* __restrict__ vis,
                                            const scalar_t* __restrict__ txt, int C, int t,
                                            const RowParams<acc_t>& p) {
  constexpr int kPack = kPackBytes / sizeof(scalar_t);
  constexpr int kPacks = kChunk<scalar_t> / kPack;
  constexpr acc_t neg_inf = -std::numeric_limits<acc_t>::infinity();
  static_assert(kPack <= TPR, "the head and the rest of a packed row need a thread per column");
  const RowSplit split = split_row<scalar_t>(
      C, address(vis), address(vis) % kPackBytes == address(txt) % kPackBytes);

  RowState<acc_t> state = row_state_empty<acc_t>();
  if (t < split.head) {
    const acc_t z[1] = {static_cast<acc_t>(vis[t])};
    const acc_t txt_acc[1] = {static_cast<acc_t>(txt[t])};
    state = chunk_state(z, txt_acc, p);
  }

  const scalar_t* vis_body = vis + split.head;
  const scalar_t* txt_body = txt + split.head;
  int first = 0;
  for (; first + kPacks * TPR <= split.num_packs; first += kPacks * TPR) {
    state = row_state_merge(state,
                            pack_chunk_state<false, scalar_t, acc_t, TPR>(
                                vis_body, txt_body, split.num_packs, first, t, p),
                            p);
  }
  if (first + t < split.num_packs) {
    state = row_state_merge(state,
                            pack_chunk_state<true, scalar_t, acc_t, TPR>(
                                vis_body, txt_body, split.num_packs, first, t, p),
                            p);
  }

  for (int rest = split.rest_begin; rest + t < C; rest += kChunk<scalar_t> * TPR) {
    acc_t z[kChunk<scalar_t>];
    acc_t txt_acc[kChunk<scalar_t>];
#pragma unroll
    for (int k = 0; k < kChunk<scalar_t>; ++k) {
      const int col = rest + t + k * TPR;
      z[k] = col < C ? static_cast<acc_t>(vis[col]) : neg_inf;
      txt_acc[k] = col < C ? static_cast<acc_t>(txt[col]) : neg_inf;
    }
    state = row_state_merge(state, chunk_state(z, txt_acc, p), p);
  }
  return state;
}

// Both gradients of one chunk of whole packs, each pack written once.
template <bool kChecked, typename scalar_t, typename acc_t, int TPR>
TESLOSS_HD void pack_chunk_grad(const scalar_t* __restrict__ vis, const scalar_t* __restrict__ txt,
                                scalar_t* __restrict__ grad_vis, scalar_t* __restrict__ grad_txt,
                                int num_packs, int first, int t, int64_t label_in_body,
                                const GradRow<acc_t>& r) {
  constexpr int kPack = kPackBytes / sizeof(scalar_t);
  constexpr int kPacks = kChunk<scalar_t> / kPack;
  using PackT = PackOf<scalar_t>;
  PackT vis_in[kPacks];
  PackT txt_in[kPacks];
  load_chunk_packs<kChecked, false, TPR>(vis, txt, num_packs, first, t, vis_in, txt_in);
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
}  // namespace tesloss
