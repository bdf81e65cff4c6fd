// The CPU kernels of the fused TeS loss. Rows are spread over threads; each
// row's columns are read a block at a time and vectorized with at::vec, and
// every formula comes from ../tes_loss.h.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <c10/util/Exception.h>

#include <algorithm>
#include <type_traits>

#include "kernels.h"
#include "tes_loss.h"

namespace tesloss {
namespace {

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

// Horizontal sum and max of one vector, by halving shuffles (at::vec).
template <typename acc_t>
inline acc_t lane_sum(const Vectorized<acc_t>& v) {
  return at::vec::vec_reduce_all<acc_t>(
      [](const Vectorized<acc_t>& a, const Vectorized<acc_t>& b) { return a + b; }, v);
}

// Not nan-aware: the forward finds nan logits another way (block_row_state).
template <typename acc_t>
inline acc_t lane_max(const Vectorized<acc_t>& v) {
  return at::vec::vec_reduce_all<acc_t>(
      [](const Vectorized<acc_t>& a, const Vectorized<acc_t>& b) {
        return at::vec::clamp_min(a, b);
      },
      v);
}

// tes_loss.h's weighted(), lane by lane.
template <typename T>
inline Vectorized<T> weighted(const Vectorized<T>& e, const Vectorized<T>& x) {
  const Vectorized<T> zero(T(0));
  return Vectorized<T>::blendv(e * x, zero, e == zero);
}

template <typename acc_t>
void check_label(int64_t label, int64_t row, int64_t num_classes, const RowParams<acc_t>& p) {
  TORCH_CHECK_INDEX(is_ignored(label, p) || is_valid_label<acc_t>(label, num_classes),
                    "fused_tes_loss: target[", row, "] = ", label,
                    " is out of range: expected a class index in [0, ", num_classes,
                    ") or ignore_index (", p.ignore_index, ")");
}

// Columns per block: a block of z and t stays in L1 between the forward's two
// sweeps over it, so the row is read from memory once.
constexpr int64_t kBlock = 1024;

// The forward's second sweep over a block of n columns: the sums of
// exponentials and the gaps, given the block's maxima. The last, partial
// vector is zero-padded and its padded lanes get weight 0. Each gap term is a
// weight times a difference the exponent already needed, so the gaps cost one
// fused multiply-add each. Two things the plain sums cannot take are left to
// a second, careful sum (kCareful): a weight of 0 against an infinite
// difference (a masked class) makes nan, where the term is 0; and a lane's gap
// can overflow where the row's spread is near the largest float. The careful
// sum scales each term by kGapScale (the plain one scales the lane sums) and
// gives a zero weight a zero term.
template <bool kCareful, typename scalar_t, typename acc_t>
RowState<acc_t> block_state(const scalar_t* vis, const scalar_t* txt, int64_t n,
                            const RowParams<acc_t>& p, acc_t max_vis, acc_t max_txt) {
  using Vec = Vectorized<acc_t>;
  constexpr int64_t W = Vec::size();
  const Vec shift_vis(softmax_shift(max_vis)), shift_txt(softmax_shift(max_txt)), zero(0);
  const Vec gap_scale(static_cast<acc_t>(kCareful ? kGapScale : 1.0));
  const ScaledExp<acc_t> exp_vis(acc_t(1));  // exp(z - max z)
  const TextExp<acc_t, kCareful> exp_txt(p);  // exp((t - max t) / tau), accurately
  Vec sum_vis(0), sum_txt(0), gap_vis(0), gap_txt(0);
  const auto add = [&](const Vec& z, const Vec& t, int64_t lanes) {
    const Vec d_vis = z - shift_vis;  // <= 0
    const Vec d_txt = t - shift_txt;
    Vec e_vis = exp_vis(d_vis);
    Vec e = exp_txt(d_txt);
    if (lanes < W) {
      e_vis = first_lanes(e_vis, zero, lanes);
      e = first_lanes(e, zero, lanes);
    }
    sum_vis += e_vis;
    sum_txt += e;
    if constexpr (kCareful) {  // as chunk_state does it on CUDA
      const Vec w = e * gap_scale;
      gap_vis -= weighted(w, d_vis);
      gap_txt -= weighted(w, d_txt);
    } else {
      gap_vis = at::vec::fnmadd(e, d_vis, gap_vis);
      gap_txt = at::vec::fnmadd(e, d_txt, gap_txt);
    }
  };
  const int64_t n_full = n - n % W;
  for (int64_t j = 0; j < n_full; j += W) {
    add(load_acc<acc_t>(vis + j), load_acc<acc_t>(txt + j), W);
  }
  if (n_full < n) {
    add(load_acc_tail<acc_t>(vis + n_full, n - n_full),
        load_acc_tail<acc_t>(txt + n_full, n - n_full), n - n_full);
  }
  const Vec lane_scale(static_cast<acc_t>(kCareful ? 1.0 : kGapScale));
  return RowState<acc_t>{max_vis, lane_sum(sum_vis), max_txt, lane_sum(sum_txt),
                         lane_sum(gap_vis * lane_scale), lane_sum(gap_txt * lane_scale)};
}

// The statistics of one block of n columns: its maxima (first sweep), then
// block_state (second sweep). The first sweep's max does not look for nan: a
// nan logit makes a gap in the second sweep nan, and so does a weight of 0
// against an infinite logit; either, or a gap that overflowed, sends the block
// down the careful path, which takes maxima that keep nan (so a nan logit
// makes the row's loss nan) and guards the terms.
template <typename scalar_t, typename acc_t>
RowState<acc_t> block_row_state(const scalar_t* vis, const scalar_t* txt, int64_t n,
                                const RowParams<acc_t>& p) {
  using Vec = Vectorized<acc_t>;
  constexpr int64_t W = Vec::size();
  constexpr acc_t neg_inf = -std::numeric_limits<acc_t>::infinity();
  Vec max_vis_v(neg_inf), max_txt_v(neg_inf);
  const int64_t n_full = n - n % W;
  for (int64_t j = 0; j < n_full; j += W) {
    max_vis_v = at::vec::clamp_min(max_vis_v, load_acc<acc_t>(vis + j));
    max_txt_v = at::vec::clamp_min(max_txt_v, load_acc<acc_t>(txt + j));
  }
  if (n_full < n) {
    const Vec pad(neg_inf);
    max_vis_v = at::vec::clamp_min(
        max_vis_v, first_lanes(load_acc_tail<acc_t>(vis + n_full, n - n_full), pad, n - n_full));
    max_txt_v = at::vec::clamp_min(
        max_txt_v, first_lanes(load_acc_tail<acc_t>(txt + n_full, n - n_full), pad, n - n_full));
  }
  const acc_t max_vis = lane_max(max_vis_v);
  const acc_t max_txt = lane_max(max_txt_v);
  RowState<acc_t> block = block_state<false>(vis, txt, n, p, max_vis, max_txt);
  if (!std::isfinite(block.gap_vis) || !std::isfinite(block.gap_txt)) {
    acc_t careful_max_vis = neg_inf, careful_max_txt = neg_inf;
    for (int64_t j = 0; j < n; ++j) {
      careful_max_vis = nan_max(careful_max_vis, static_cast<acc_t>(vis[j]));
      careful_max_txt = nan_max(careful_max_txt, static_cast<acc_t>(txt[j]));
    }
    block = block_state<true>(vis, txt, n, p, careful_max_vis, careful_max_txt);
  }
  return block;
}

// One row of the forward: the online softmax, a block of columns at a time.
template <typename scalar_t, typename acc_t>
void forward_row(const scalar_t* vis, const scalar_t* txt, int64_t C, int64_t label,
                 const RowParams<acc_t>& p, acc_t* out) {
  RowState<acc_t> row = block_row_state(vis, txt, std::min(kBlock, C), p);
  for (int64_t start = kBlock; start < C; start += kBlock) {
    row = row_state_merge(
        row, block_row_state(vis + start, txt + start, std::min(kBlock, C - start), p), p);
  }
  row_finalize(row, static_cast<acc_t>(vis[label]), static_cast<acc_t>(txt[label]), p, out);
}

// One row of the backward: reads z and t once, writes both gradients once.
// Whole vectors take the columns that are not the label; the label's column
// is written again at the end.
template <typename scalar_t, typename acc_t>
void backward_row(const scalar_t* vis, const scalar_t* txt, int64_t C, int64_t label,
                  const GradRow<acc_t>& r, scalar_t* grad_vis, scalar_t* grad_txt) {
  using Vec = Vectorized<acc_t>;
  constexpr int64_t W = Vec::size();
  // A row with a nan logit has a nan max; the vector exp need not keep that
  // nan, so such a row takes the scalar path for every column.
  if (std::isnan(r.max_vis) || std::isnan(r.max_txt)) {
    for (int64_t j = 0; j < C; ++j) grad_column(vis[j], txt[j], j == label, r, grad_vis[j], grad_txt[j]);
    return;
  }
  const Vec max_vis(r.max_vis), max_txt(r.max_txt), g_vis(r.g_vis), g_ref(r.g_ref),
      g_txt(r.g_txt);
  const ScaledExp<acc_t> exp_vis(acc_t(1)), exp_txt(r.inv_tau);
  const auto grads = [&](const Vec& z, const Vec& t, Vec& gv, Vec& gt) {
    const Vec e_vis = exp_vis(z - max_vis);
    const Vec e_txt = exp_txt(t - max_txt);
    gv = at::vec::fmsub(g_vis, e_vis, g_ref * e_txt);
    gt = g_txt * e_txt;
  };
  const int64_t n_full = C - C % W;
  Vec gv, gt;
  int64_t j = 0;
  if constexpr (!std::is_same_v<scalar_t, acc_t>) {
    // A vector of a half type holds two float vectors: convert them back
    // together, which costs what converting one alone does.
    Vec gv_hi, gt_hi;
    for (; j + 2 * W <= C; j += 2 * W) {
      grads(load_acc<acc_t>(vis + j), load_acc<acc_t>(txt + j), gv, gt);
      grads(load_acc<acc_t>(vis + j + W), load_acc<acc_t>(txt + j + W), gv_hi, gt_hi);
      at::vec::convert_from_float<scalar_t>(gv, gv_hi).store(grad_vis + j);
      at::vec::convert_from_float<scalar_t>(gt, gt_hi).store(grad_txt + j);
    }
  }
  for (; j < n_full; j += W) {
    grads(load_acc<acc_t>(vis + j), load_acc<acc_t>(txt + j), gv, gt);
    store_acc(grad_vis + j, gv);
    store_acc(grad_txt + j, gt);
  }
  if (n_full < C) {  // the last, partial vector, zero-padded
    grads(load_acc_tail<acc_t>(vis + n_full, C - n_full),
          load_acc_tail<acc_t>(txt + n_full, C - n_full), gv, gt);
    alignas(64) acc_t vis_tail[W];
    alignas(64) acc_t txt_tail[W];
    gv.store(vis_tail);
    gt.store(txt_tail);
    for (int64_t k = 0; k < C - n_full; ++k) {
      grad_vis[n_full + k] = static_cast<scalar_t>(vis_tail[k]);
      grad_txt[n_full + k] = static_cast<scalar_t>(txt_tail[k]);
    }
  }
  grad_column(vis[label], txt[label], true, r, grad_vis[label], grad_txt[label]);
}

// Rows per task, so that a task holds about 16K columns: enough work to pay
// for a fork and join (docs/DESIGN.md).
int64_t row_grain(int64_t C) { return std::max<int64_t>(1, (int64_t(1) << 14) / C); }

}  // namespace

void tes_loss_forward_cpu(const ForwardTensors& t, const Params& params) {
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kBFloat16, at::kHalf, t.vis_logits.scalar_type(), "tes_loss_forward_cpu", [&] {
        using acc_t = acc_t_of<scalar_t>;
        const auto in = row_inputs<scalar_t, acc_t>(t, params);
        acc_t* stats = t.row_stats.mutable_data_ptr<acc_t>();
        at::parallel_for(0, in.B, row_grain(in.C), [&](int64_t begin, int64_t end) {
          for (int64_t i = begin; i < end; ++i) {
            const int64_t label = in.labels[i * in.label_stride];
            check_label(label, i, in.C, in.p);
            acc_t* out = stats + i * kNumRowStats;
            if (is_ignored(label, in.p)) {
              row_ignored(out);
            } else {
              forward_row(in.vis + i * in.vis_stride, in.txt + i * in.txt_stride, in.C, label,
                          in.p, out);
            }
          }
        });

        // The batch reduction runs over rows in order, so results do not
        // depend on the thread count.
        BatchSum sums[kNumBatchSums] = {};
        int64_t num_valid = 0;
        const bool per_row = params.reduction == kReduceNone;
        acc_t* loss = t.loss.mutable_data_ptr<acc_t>();
        for (int64_t i = 0; i < in.B; ++i) {
          const acc_t* row = stats + i * kNumRowStats;
          if (per_row) loss[i] = row[kRowLoss];
          if (is_ignored(in.labels[i * in.label_stride], in.p)) continue;
          num_valid += 1;
          add_row(sums, row);
        }
        batch_finalize(sums, num_valid, params.reduction, per_row ? nullptr : loss,
                       t.batch_stats.mutable_data_ptr<acc_t>());
      });
}

void tes_loss_backward_cpu(const BackwardTensors& t, const Params& params) {
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kBFloat16, at::kHalf, t.vis_logits.scalar_type(), "tes_loss_backward_cpu", [&] {
        using acc_t = acc_t_of<scalar_t>;
        const auto in = row_inputs<scalar_t, acc_t>(t, params);
        const int64_t C = in.C;
        const acc_t* stats = t.row_stats.const_data_ptr<acc_t>();
        const acc_t* grad_loss = t.grad_loss.const_data_ptr<acc_t>();
        const int64_t grad_stride = t.grad_loss.dim() == 1 ? t.grad_loss.stride(0) : 0;
        const acc_t num_valid = t.batch_stats.const_data_ptr<acc_t>()[kBatchValid];
        scalar_t* grad_vis = t.grad_vis.mutable_data_ptr<scalar_t>();
        scalar_t* grad_txt = t.grad_txt.mutable_data_ptr<scalar_t>();
        at::parallel_for(0, in.B, row_grain(C), [&](int64_t begin, int64_t end) {
          for (int64_t i = begin; i < end; ++i) {
            const int64_t label = in.labels[i * in.label_stride];
            check_label(label, i, C, in.p);
            if (is_ignored(label, in.p)) {
              std::fill_n(grad_vis + i * C, C, scalar_t(0));
              std::fill_n(grad_txt + i * C, C, scalar_t(0));
              continue;
            }
            const acc_t g = row_upstream_grad(grad_loss, grad_stride, i, params.reduction,
                                              num_valid);
            backward_row(in.vis + i * in.vis_stride, in.txt + i * in.txt_stride, C, label,
                         grad_row(in.p, stats + i * kNumRowStats, g), grad_vis + i * C,
                         grad_txt + i * C);
          }
        });
      });
}

}  // namespace tesloss
