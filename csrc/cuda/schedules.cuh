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

#include "cuda/packs.cuh"
#include "tes_loss.h"

namespace tesloss {

// Columns a thread folds into one RowState before merging it into its running
// one: each merge costs four exponentials, so merging per pack of 2 doubles or
// 4 floats would double the work of the exponentials themselves. A chunk's
// loads are all issued before its arithmetic, so the chunk is also what a
// thread has in flight: 128 bytes of logits for fp32 (16 columns) and for bf16
// and fp16 (32 columns), enough to cover memory latency where a 512-thread row
// group has a multiprocessor to itself (docs/DESIGN.md has the latency model).
// Doubles take 8, to fit the 128 registers a thread of a 512-thread block has.
// A probability target adds a third stream, in the accumulation type, so its
// chunks are half as wide: about as many bytes in flight, and registers to
// hold them.
template <typename scalar_t, int kTarget>
constexpr int kChunk = (sizeof(scalar_t) == 8 ? 8 : sizeof(scalar_t) == 4 ? 16 : 32) /
                       (kHasProbs<kTarget> ? 2 : 1);

// The max of a chunk's columns drops nan (one fmax instruction, where nan_max
// takes three): a nan column still makes the chunk's sum nan, as exp(nan) is
// nan, and that reaches the row's log-sum-exp and loss.
TESLOSS_HD float column_max(float a, float b) { return fmaxf(a, b); }
TESLOSS_HD double column_max(double a, double b) { return fmax(a, b); }

// The statistics of N columns for a target of kind kTarget, of which the
// first `live` are the row's and the rest padding: -inf logits (no weight in
// the softmax) and a target weight y of 0. z and t are in their own units;
// the text exponent is (t - max t) / tau.
template <int kTarget, typename acc_t, int N>
TESLOSS_HD RowState<acc_t> chunk_state(const acc_t (&z)[N], const acc_t (&t)[N],
                                       const acc_t (&y)[N], int live,
                                       const RowParams<acc_t>& p) {
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
  const acc_t scaled_shift_vis = shift_vis * acc_t(kGapScale);
  const acc_t scaled_shift_txt = shift_txt * acc_t(kGapScale);
  RowState<acc_t> s = row_state_empty<acc_t>();
  s.max_vis = max_vis;
  s.max_txt = max_txt;
  s.count = static_cast<acc_t>(live);
#pragma unroll
  for (int k = 0; k < N; ++k) {
    s.sum_vis += tes_exp(z[k] - shift_vis);
    const acc_t e = text_exp(t[k] - shift_txt, p);
    s.sum_txt += e;
    // The gaps' differences, scaled before they are taken (tes_loss.h's scaled_gap).
    const acc_t g_vis = scaled_gap(z[k], scaled_shift_vis);
    const acc_t g_txt = scaled_gap(t[k], scaled_shift_txt);
    s.gap_vis -= weighted(e, g_vis);
    s.gap_txt -= weighted(e, g_txt);
    if constexpr (kHasUniform<kTarget>) {  // padding adds nothing
      s.uni_vis -= k < live ? g_vis : acc_t(0);
      s.uni_txt -= k < live ? g_txt : acc_t(0);
    }
    if constexpr (kHasProbs<kTarget>) {
      s.mass += y[k];
      s.y_vis -= weighted(y[k], g_vis);
      s.y_txt -= weighted(y[k], g_txt);
    }
  }
  return s;
}

// Loads one chunk of whole packs of both logits (and, where kProbs, of the
// target), packs first + t + u * TPR for u < kPacks, so each load instruction
// of a warp covers consecutive memory; all loads come before any arithmetic,
// so they are in flight together. With kChecked, packs past num_packs are
// left out, and set to zeros where kZeroed (the forward reads every pack's
// lanes; the backward skips those packs, and zeroing them there costs
// registers: sm_90 bf16 backward spills).
template <bool kChecked, bool kZeroed, bool kProbs, int TPR, typename scalar_t, typename acc_t,
          int kPacks, int kYPacks>
TESLOSS_HD void load_chunk_packs(const scalar_t* __restrict__ vis,
                                 const scalar_t* __restrict__ txt,
                                 const acc_t* __restrict__ probs, int num_packs, int first,
                                 int t, PackOf<scalar_t> (&vis_in)[kPacks],
                                 PackOf<scalar_t> (&txt_in)[kPacks],
                                 PackOf<acc_t> (&y_in)[kYPacks]) {
  using PackT = PackOf<scalar_t>;
  using PackY = PackOf<acc_t>;
  constexpr int kSub = kYPacks / kPacks;
  const PackT* vis_packs = as_packs(vis);
  const PackT* txt_packs = as_packs(txt);
#pragma unroll
  for (int u = 0; u < kPacks; ++u) {
    const int index = first + t + u * TPR;
    if (!kChecked || index < num_packs) {
      vis_in[u] = vis_packs[index];
      txt_in[u] = txt_packs[index];
      if constexpr (kProbs) {
        const PackY* y_packs = as_packs(probs);
#pragma unroll
        for (int k = 0; k < kSub; ++k) y_in[u * kSub + k] = y_packs[index * kSub + k];
      }
    } else if (kZeroed) {
      vis_in[u] = PackT{};
      txt_in[u] = PackT{};
#pragma unroll
      for (int k = 0; k < kSub; ++k) y_in[u * kSub + k] = PackY{};
    }
  }
}

// Column k of pack u of a chunk's target packs.
template <typename scalar_t, typename acc_t, int kYPacks>
TESLOSS_HD acc_t pack_weight(const PackOf<acc_t> (&y_in)[kYPacks], int u, int k) {
  constexpr int kPerY = kPackBytes / sizeof(acc_t);
  const int column = u * (kPackBytes / sizeof(scalar_t)) + k;
  return y_in[column / kPerY].val[column % kPerY];
}

// The statistics of one chunk of whole packs.
template <bool kChecked, int kTarget, typename scalar_t, typename acc_t, int TPR>
TESLOSS_HD RowState<acc_t> pack_chunk_state(const scalar_t* __restrict__ vis,
                                            const scalar_t* __restrict__ txt,
                                            const acc_t* __restrict__ probs, int num_packs,
                                            int first, int t, const RowParams<acc_t>& p) {
  constexpr int kPack = kPackBytes / sizeof(scalar_t);
  constexpr int kPacks = kChunk<scalar_t, kTarget> / kPack;
  constexpr int kYPacks = kPacks * kTargetPacks<scalar_t>;
  constexpr acc_t neg_inf = -std::numeric_limits<acc_t>::infinity();
  using PackT = PackOf<scalar_t>;
  PackT vis_in[kPacks];
  PackT txt_in[kPacks];
  PackOf<acc_t> y_in[kYPacks];
  load_chunk_packs<kChecked, true, kHasProbs<kTarget>, TPR>(vis, txt, probs, num_packs, first, t,
                                                            vis_in, txt_in, y_in);
  acc_t z[kChunk<scalar_t, kTarget>];
  acc_t txt_acc[kChunk<scalar_t, kTarget>];
  acc_t y[kChunk<scalar_t, kTarget>];
  int live = 0;
#pragma unroll
  for (int u = 0; u < kPacks; ++u) {
    const bool in_row = !kChecked || first + t + u * TPR < num_packs;
    live += in_row ? kPack : 0;
#pragma unroll
    for (int k = 0; k < kPack; ++k) {
      z[u * kPack + k] = in_row ? static_cast<acc_t>(vis_in[u].val[k]) : neg_inf;
      txt_acc[u * kPack + k] = in_row ? static_cast<acc_t>(txt_in[u].val[k]) : neg_inf;
      y[u * kPack + k] = kHasProbs<kTarget> ? pack_weight<scalar_t>(y_in, u, k) : acc_t(0);
    }
  }
  return chunk_state<kTarget>(z, txt_acc, y, live, p);
}

// The statistics of the columns thread t of TPR reads in one row: the head's
// column t, whole packs in chunks, and the rest in strided scalar chunks.
// `probs` is the row's probability target (kHasProbs only).
template <int kTarget, typename scalar_t, typename acc_t, int TPR>
TESLOSS_HD RowState<acc_t> thread_row_state(const scalar_t* __restrict__ vis,
                                            const scalar_t* __restrict__ txt,
                                            const acc_t* __restrict__ probs, int C, int t,
                                            const RowParams<acc_t>& p) {
  constexpr int kPack = kPackBytes / sizeof(scalar_t);
  constexpr int kPacks = kChunk<scalar_t, kTarget> / kPack;
  constexpr acc_t neg_inf = -std::numeric_limits<acc_t>::infinity();
  constexpr bool kProbs = kHasProbs<kTarget>;
  static_assert(kPack <= TPR, "the head and the rest of a packed row need a thread per column");
  const RowSplit split = split_row_with<scalar_t>(
      C, address(vis), address(vis) % kPackBytes == address(txt) % kPackBytes,
      kProbs ? probs : nullptr);

  RowState<acc_t> state = row_state_empty<acc_t>();
  if (t < split.head) {
    const acc_t z[1] = {static_cast<acc_t>(vis[t])};
    const acc_t txt_acc[1] = {static_cast<acc_t>(txt[t])};
    const acc_t y[1] = {kProbs ? probs[t] : acc_t(0)};
    state = chunk_state<kTarget>(z, txt_acc, y, 1, p);
  }

  const scalar_t* vis_body = vis + split.head;
  const scalar_t* txt_body = txt + split.head;
  const acc_t* probs_body = kProbs ? probs + split.head : nullptr;
  int first = 0;
  for (; first + kPacks * TPR <= split.num_packs; first += kPacks * TPR) {
    state = row_state_merge<kTarget>(state,
                                     pack_chunk_state<false, kTarget, scalar_t, acc_t, TPR>(
                                         vis_body, txt_body, probs_body, split.num_packs, first,
                                         t, p),
                                     p);
  }
  if (first + t < split.num_packs) {
    state = row_state_merge<kTarget>(state,
                                     pack_chunk_state<true, kTarget, scalar_t, acc_t, TPR>(
                                         vis_body, txt_body, probs_body, split.num_packs, first,
                                         t, p),
                                     p);
  }

  for (int rest = split.rest_begin; rest + t < C; rest += kChunk<scalar_t, kTarget> * TPR) {
    acc_t z[kChunk<scalar_t, kTarget>];
    acc_t txt_acc[kChunk<scalar_t, kTarget>];
    acc_t y[kChunk<scalar_t, kTarget>];
    int live = 0;
#pragma unroll
    for (int k = 0; k < kChunk<scalar_t, kTarget>; ++k) {
      const int col = rest + t + k * TPR;
      live += col < C ? 1 : 0;
      z[k] = col < C ? static_cast<acc_t>(vis[col]) : neg_inf;
      txt_acc[k] = col < C ? static_cast<acc_t>(txt[col]) : neg_inf;
      y[k] = kProbs && col < C ? probs[col] : acc_t(0);
    }
    state = row_state_merge<kTarget>(state, chunk_state<kTarget>(z, txt_acc, y, live, p), p);
  }
  return state;
}

// Both gradients of one column: the target's weight y for probability
// targets, whether it is the label for class indices.
template <int kTarget, typename scalar_t, typename acc_t>
TESLOSS_HD void target_grad_column(scalar_t vis_in, scalar_t txt_in, acc_t y, bool is_label,
                                   const GradRow<acc_t>& r, scalar_t& grad_vis,
                                   scalar_t& grad_txt) {
  if constexpr (kHasProbs<kTarget>) {
    grad_column_probs(vis_in, txt_in, y, r, grad_vis, grad_txt);
  } else {
    grad_column<kTarget>(vis_in, txt_in, is_label, r, grad_vis, grad_txt);
  }
}

// Both gradients of one chunk of whole packs, each pack written once.
template <bool kChecked, int kTarget, typename scalar_t, typename acc_t, int TPR>
TESLOSS_HD void pack_chunk_grad(const scalar_t* __restrict__ vis, const scalar_t* __restrict__ txt,
                                const acc_t* __restrict__ probs, scalar_t* __restrict__ grad_vis,
                                scalar_t* __restrict__ grad_txt, int num_packs, int first, int t,
                                int64_t label_in_body, const GradRow<acc_t>& r) {
  constexpr int kPack = kPackBytes / sizeof(scalar_t);
  constexpr int kPacks = kChunk<scalar_t, kTarget> / kPack;
  constexpr int kYPacks = kPacks * kTargetPacks<scalar_t>;
  using PackT = PackOf<scalar_t>;
  PackT vis_in[kPacks];
  PackT txt_in[kPacks];
  PackOf<acc_t> y_in[kYPacks];
  load_chunk_packs<kChecked, false, kHasProbs<kTarget>, TPR>(vis, txt, probs, num_packs, first,
                                                             t, vis_in, txt_in, y_in);
#pragma unroll
  for (int u = 0; u < kPacks; ++u) {
    const int index = first + t + u * TPR;
    if (kChecked && index >= num_packs) continue;
    PackT vis_out;
    PackT txt_out;
#pragma unroll
    for (int k = 0; k < kPack; ++k) {
      const acc_t y = kHasProbs<kTarget> ? pack_weight<scalar_t>(y_in, u, k) : acc_t(0);
      target_grad_column<kTarget>(vis_in[u].val[k], txt_in[u].val[k], y,
                                  int64_t(index) * kPack + k == label_in_body, r, vis_out.val[k],
                                  txt_out.val[k]);
    }
    as_packs(grad_vis)[index] = vis_out;
    as_packs(grad_txt)[index] = txt_out;
  }
}

// Thread t's share of one row of the backward, split like the forward.
template <int kTarget, typename scalar_t, typename acc_t, int TPR>
TESLOSS_HD void thread_row_grad(const scalar_t* __restrict__ vis, const scalar_t* __restrict__ txt,
                                const acc_t* __restrict__ probs, scalar_t* __restrict__ grad_vis,
                                scalar_t* __restrict__ grad_txt, int C, int t, int64_t label,
                                const GradRow<acc_t>& r) {
  constexpr int kPack = kPackBytes / sizeof(scalar_t);
  constexpr int kPacks = kChunk<scalar_t, kTarget> / kPack;
  constexpr bool kProbs = kHasProbs<kTarget>;
  static_assert(kPack <= TPR, "the head and the rest of a packed row need a thread per column");
  const uintptr_t offset = address(vis) % kPackBytes;
  const bool same_offset = address(txt) % kPackBytes == offset &&
                           address(grad_vis) % kPackBytes == offset &&
                           address(grad_txt) % kPackBytes == offset;
  const RowSplit split =
      split_row_with<scalar_t>(C, address(vis), same_offset, kProbs ? probs : nullptr);
  const auto weight = [&](int col) { return kProbs ? probs[col] : acc_t(0); };

  if (t < split.head) {
    target_grad_column<kTarget>(vis[t], txt[t], weight(t), t == label, r, grad_vis[t],
                                grad_txt[t]);
  }
  const int64_t label_in_body = label - split.head;
  const acc_t* probs_body = kProbs ? probs + split.head : nullptr;
  int first = 0;
  for (; first + kPacks * TPR <= split.num_packs; first += kPacks * TPR) {
    pack_chunk_grad<false, kTarget, scalar_t, acc_t, TPR>(
        vis + split.head, txt + split.head, probs_body, grad_vis + split.head,
        grad_txt + split.head, split.num_packs, first, t, label_in_body, r);
  }
  if (first + t < split.num_packs) {
    pack_chunk_grad<true, kTarget, scalar_t, acc_t, TPR>(
        vis + split.head, txt + split.head, probs_body, grad_vis + split.head,
        grad_txt + split.head, split.num_packs, first, t, label_in_body, r);
  }
#pragma unroll 4
  for (int col = split.rest_begin + t; col < C; col += TPR) {
    target_grad_column<kTarget>(vis[col], txt[col], weight(col), col == label, r, grad_vis[col],
                                grad_txt[col]);
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
