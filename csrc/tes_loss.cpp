// The fused TeS loss: op schemas, argument checks, autograd, the CPU kernels and
// their registration. The formulas live in tes_loss.h; this file only moves rows
// through them, vectorized with at::vec and spread over threads.
#include <Python.h>

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <torch/csrc/autograd/custom_function.h>
#include <torch/library.h>

#include <algorithm>
#include <type_traits>

#include "tes_loss.h"

#ifndef TESLOSS_CPU_CAPABILITY_NAME
#define TESLOSS_CPU_CAPABILITY_NAME default
#endif
#define TESLOSS_STR_(x) #x
#define TESLOSS_STR(x) TESLOSS_STR_(x)

namespace tesloss {

// Argument checks and output allocation, shared with the CUDA entry points
// (cuda/tes_loss.cu declares prepare_forward and prepare_backward), so both
// devices refuse the same arguments with the same messages. Label values are
// checked inside the kernels, where each label is read anyway.
using ForwardPrep = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>;
using BackwardPrep = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor,
                                at::Tensor, at::Tensor>;

namespace {

void check_forward_args(const at::Tensor& vis_logits, const at::Tensor& txt_logits,
                        const at::Tensor& target, double tau, int64_t reduction) {
  TORCH_CHECK(vis_logits.dim() == 2, "fused_tes_loss: vis_logits must be 2-D [B, C], got ",
              vis_logits.dim(), "-D of shape ", vis_logits.sizes());
  TORCH_CHECK(txt_logits.sizes() == vis_logits.sizes(),
              "fused_tes_loss: txt_logits must have the shape of vis_logits ",
              vis_logits.sizes(), ", got ", txt_logits.sizes());
  TORCH_CHECK(vis_logits.size(1) > 0, "fused_tes_loss: vis_logits must have C >= 1 classes, got ",
              vis_logits.sizes());
  TORCH_CHECK(at::isFloatingType(vis_logits.scalar_type()),
              "fused_tes_loss: vis_logits must be floating point, got ", vis_logits.scalar_type());
  TORCH_CHECK(txt_logits.scalar_type() == vis_logits.scalar_type(),
              "fused_tes_loss: txt_logits must have the dtype of vis_logits (",
              vis_logits.scalar_type(), "), got ", txt_logits.scalar_type());
  TORCH_CHECK(target.scalar_type() == at::kLong && target.dim() == 1 &&
                  target.size(0) == vis_logits.size(0),
              "fused_tes_loss: target must be int64 of shape [B]=[", vis_logits.size(0),
              "], got ", target.scalar_type(), " of shape ", target.sizes());
  TORCH_CHECK(vis_logits.device() == txt_logits.device() && vis_logits.device() == target.device(),
              "fused_tes_loss: vis_logits, txt_logits and target must be on one device, got ",
              vis_logits.device(), ", ", txt_logits.device(), " and ", target.device());
  TORCH_CHECK(tau > 0 && std::isfinite(tau), "fused_tes_loss: tau must be finite and > 0, got ",
              tau);
  TORCH_CHECK(reduction >= kReduceNone && reduction <= kReduceSum,
              "fused_tes_loss: reduction must be 0 (none), 1 (mean) or 2 (sum), got ", reduction);
}

void check_backward_args(const at::Tensor& grad_loss, const at::Tensor& vis_logits,
                         const at::Tensor& row_stats, const at::Tensor& batch_stats,
                         int64_t reduction) {
  const int64_t B = vis_logits.size(0);
  if (reduction == kReduceNone) {
    TORCH_CHECK(grad_loss.dim() == 1 && grad_loss.size(0) == B,
                "tes_loss_backward: grad_loss must have shape [B]=[", B, "] for reduction none, got ",
                grad_loss.sizes());
  } else {
    TORCH_CHECK(grad_loss.numel() == 1, "tes_loss_backward: grad_loss must be a scalar, got ",
                grad_loss.sizes());
  }
  TORCH_CHECK(row_stats.dim() == 2 && row_stats.size(0) == B && row_stats.size(1) == kNumRowStats,
              "tes_loss_backward: row_stats must have shape [", B, ", ", int(kNumRowStats),
              "], got ", row_stats.sizes());
  TORCH_CHECK(batch_stats.numel() == kNumBatchStats, "tes_loss_backward: batch_stats must have ",
              int(kNumBatchStats), " entries, got ", batch_stats.sizes());
  for (const auto& [name, tensor] : {std::pair<const char*, const at::Tensor&>{"grad_loss", grad_loss},
                                     {"row_stats", row_stats}, {"batch_stats", batch_stats}}) {
    TORCH_CHECK(tensor.device() == vis_logits.device(), "tes_loss_backward: ", name,
                " must be on the device of vis_logits (", vis_logits.device(), "), got ",
                tensor.device());
  }
}

// The kernels read rows through a row stride; only the class stride must be 1.
at::Tensor with_unit_class_stride(const at::Tensor& logits) {
  return (logits.size(1) <= 1 || logits.stride(1) == 1) ? logits : logits.contiguous();
}

at::ScalarType acc_scalar_type(at::ScalarType t) {
  return t == at::kDouble ? at::kDouble : at::kFloat;
}

}  // namespace

// Checks the forward's arguments; returns the logits as the kernels read them
// and the outputs, allocated: (vis_logits, txt_logits, loss, row_stats, batch_stats).
ForwardPrep prepare_forward(const at::Tensor& vis_logits, const at::Tensor& txt_logits,
                            const at::Tensor& target, double tau, int64_t reduction) {
  check_forward_args(vis_logits, txt_logits, target, tau, reduction);
  const int64_t B = vis_logits.size(0);
  const auto acc = vis_logits.options().dtype(acc_scalar_type(vis_logits.scalar_type()));
  return {with_unit_class_stride(vis_logits), with_unit_class_stride(txt_logits),
          reduction == kReduceNone ? at::empty({B}, acc) : at::empty({}, acc),
          at::empty({B, kNumRowStats}, acc), at::empty({kNumBatchStats}, acc)};
}

// Checks the backward's arguments; returns them as the kernels read them and
// the gradients, allocated: (grad_loss, vis_logits, txt_logits, row_stats,
// batch_stats, grad_vis, grad_txt).
BackwardPrep prepare_backward(const at::Tensor& grad_loss, const at::Tensor& vis_logits,
                              const at::Tensor& txt_logits, const at::Tensor& target,
                              const at::Tensor& row_stats, const at::Tensor& batch_stats,
                              double tau, int64_t reduction) {
  check_forward_args(vis_logits, txt_logits, target, tau, reduction);
  check_backward_args(grad_loss, vis_logits, row_stats, batch_stats, reduction);
  const auto acc = acc_scalar_type(vis_logits.scalar_type());
  // Checked first: even a .to() that returns its input costs a dispatch.
  // grad_loss keeps its strides (a [B] gradient may be an expanded scalar).
  const auto as_acc = [acc](const at::Tensor& t) {
    return t.scalar_type() == acc ? t : t.to(acc);
  };
  return {as_acc(grad_loss),
          with_unit_class_stride(vis_logits),
          with_unit_class_stride(txt_logits),
          as_acc(row_stats).contiguous(),
          as_acc(batch_stats).contiguous(),
          at::empty(vis_logits.sizes(), vis_logits.options()),
          at::empty(txt_logits.sizes(), txt_logits.options())};
}

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

template <typename acc_t>
void check_label(int64_t label, int64_t row, int64_t num_classes, const Params<acc_t>& p) {
  TORCH_CHECK_INDEX(is_ignored(label, p) || is_valid_label<acc_t>(label, num_classes),
                    "fused_tes_loss: target[", row, "] = ", label,
                    " is out of range: expected a class index in [0, ", num_classes,
                    ") or ignore_index (", p.ignore_index, ")");
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

// Columns per block: a block of z and t stays in L1 between the forward's two
// sweeps over it, so the row is read from memory once.
constexpr int64_t kBlock = 1024;

// The forward's second sweep over a block of n columns: the sums of
// exponentials, given the block's maxima. The last, partial vector is
// zero-padded and its padded lanes get weight 0. The products e * z and e * t
// need weighted() only where a weight of 0 meets an infinite logit (masked
// classes); that guard costs a compare and a blend per vector, so blocks are
// summed without it first (kGuarded = false) and again with it only if a
// product came out nan.
template <bool kGuarded, typename scalar_t, typename acc_t>
RowState<acc_t> block_state(const scalar_t* vis, const scalar_t* txt, int64_t n,
                            acc_t inv_tau, acc_t max_vis, acc_t max_txt) {
  using Vec = Vectorized<acc_t>;
  constexpr int64_t W = Vec::size();
  const Vec shift_vis(softmax_shift(max_vis)), zero(0);
  const ScaledExp<acc_t> exp_txt(inv_tau, softmax_shift(max_txt));  // exp(t / tau - shift)
  // dot_txt sums e * t; times 1 / tau at the end, it is the sum of e * s.
  Vec sum_vis(0), sum_txt(0), dot_vis(0), dot_txt(0);
  const auto add = [&](const Vec& z, const Vec& t, int64_t lanes) {
    Vec e_vis = tes_exp(z - shift_vis);
    Vec e = exp_txt(t);
    if (lanes < W) {
      e_vis = first_lanes(e_vis, zero, lanes);
      e = first_lanes(e, zero, lanes);
    }
    sum_vis += e_vis;
    sum_txt += e;
    if constexpr (kGuarded) {
      dot_vis += weighted(e, z);
      dot_txt += weighted(e, t);
    } else {
      dot_vis = at::vec::fmadd(e, z, dot_vis);
      dot_txt = at::vec::fmadd(e, t, dot_txt);
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
  return RowState<acc_t>{max_vis, lane_sum(sum_vis), max_txt, lane_sum(sum_txt),
                         lane_sum(dot_vis), lane_sum(dot_txt) * inv_tau};
}

// The statistics of one block of n columns: its maxima (first sweep), then
// block_state (second sweep). The first sweep's max does not look for nan: a
// nan logit makes a product in the second sweep nan, and so does a weight of 0
// against an infinite logit; either sends the block down the careful path,
// which takes maxima that keep nan (so a nan logit makes the row's loss nan)
// and guards the products.
template <typename scalar_t, typename acc_t>
RowState<acc_t> block_row_state(const scalar_t* vis, const scalar_t* txt, int64_t n,
                                acc_t inv_tau) {
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
  // max(t) / tau is max(t / tau): tau > 0 and rounding is monotone.
  const acc_t max_vis = lane_max(max_vis_v);
  const acc_t max_txt = lane_max(max_txt_v) * inv_tau;
  RowState<acc_t> block = block_state<false>(vis, txt, n, inv_tau, max_vis, max_txt);
  if (std::isnan(block.ref_dot_vis) || std::isnan(block.ref_dot_txt)) {
    acc_t careful_max_vis = neg_inf, careful_max_txt = neg_inf;
    for (int64_t j = 0; j < n; ++j) {
      careful_max_vis = nan_max(careful_max_vis, static_cast<acc_t>(vis[j]));
      careful_max_txt = nan_max(careful_max_txt, static_cast<acc_t>(txt[j]) * inv_tau);
    }
    block = block_state<true>(vis, txt, n, inv_tau, careful_max_vis, careful_max_txt);
  }
  return block;
}

// One row of the forward: the online softmax, a block of columns at a time.
template <typename scalar_t, typename acc_t>
void forward_row(const scalar_t* vis, const scalar_t* txt, int64_t C, int64_t label,
                 const Params<acc_t>& p, acc_t* out) {
  RowState<acc_t> row = block_row_state(vis, txt, std::min(kBlock, C), p.inv_tau);
  for (int64_t start = kBlock; start < C; start += kBlock) {
    row = row_state_merge(
        row, block_row_state(vis + start, txt + start, std::min(kBlock, C - start), p.inv_tau));
  }
  const acc_t z_label = static_cast<acc_t>(vis[label]);
  const acc_t s_label = static_cast<acc_t>(txt[label]) * p.inv_tau;
  row_finalize(row, z_label, s_label, p, out);
}

// One row of the backward: reads z and t once, writes both gradients once.
template <typename scalar_t, typename acc_t>
void backward_row(const scalar_t* vis, const scalar_t* txt, int64_t C, int64_t label,
                  acc_t g, const acc_t* stats, const Params<acc_t>& p, scalar_t* grad_vis,
                  scalar_t* grad_txt) {
  using Vec = Vectorized<acc_t>;
  constexpr int64_t W = Vec::size();
  const acc_t lse_vis = stats[kRowLseVis];
  const acc_t lse_txt = stats[kRowLseTxt];
  const acc_t one_minus_lambda_v = acc_t(1) - p.lambda_v;
  const acc_t g_txt = g * p.lambda_t * p.inv_tau;

  const Vec lse_vis_v(lse_vis), g_v(g), g_txt_v(g_txt);
  const Vec lambda_v_v(p.lambda_v), one_minus_v(one_minus_lambda_v), zero(0);
  const ScaledExp<acc_t> p_ref_of(p.inv_tau, lse_txt);  // softmax(t / tau)
  // One column in scalar arithmetic, the label's (onehot = 1) or another's.
  const auto scalar_column = [&](int64_t j, acc_t onehot) {
    const acc_t p_v = softmax_prob(static_cast<acc_t>(vis[j]), lse_vis);
    const acc_t p_ref = softmax_prob(static_cast<acc_t>(txt[j]) * p.inv_tau, lse_txt);
    grad_vis[j] = static_cast<scalar_t>(
        vis_grad(p_v, p_ref, onehot, g, p.lambda_v, one_minus_lambda_v));
    grad_txt[j] = static_cast<scalar_t>(txt_grad(p_ref, onehot, g_txt));
  };
  // A row with a nan logit has a nan log-sum-exp; the vector exp of AVX2
  // builds (exp_u20) would not keep that nan, so such a row takes the scalar
  // path for every column.
  if (std::isnan(lse_vis) || std::isnan(lse_txt)) {
    for (int64_t j = 0; j < C; ++j) scalar_column(j, j == label ? acc_t(1) : acc_t(0));
    return;
  }
  // Whole vectors with onehot = 0; then the last, partial vector, zero-padded;
  // then the label's column again, with onehot = 1.
  const auto grads = [&](const Vec& z, const Vec& t, Vec& gv, Vec& gt) {
    const Vec p_v = softmax_prob(z, lse_vis_v);
    const Vec p_ref = p_ref_of(t);
    gv = vis_grad(p_v, p_ref, zero, g_v, lambda_v_v, one_minus_v);
    gt = txt_grad(p_ref, zero, g_txt_v);
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
  if (n_full < C) {
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
  scalar_column(label, acc_t(1));
}

// Rows per task, so that a task holds about 16K columns: at (256, 100) two
// threads beat one by more than the fork and join cost (0.034 -> 0.024 ms).
int64_t row_grain(int64_t C) { return std::max<int64_t>(1, (int64_t(1) << 14) / C); }

std::tuple<at::Tensor, at::Tensor, at::Tensor> tes_loss_forward_cpu(
    const at::Tensor& vis_logits_in, const at::Tensor& txt_logits_in, const at::Tensor& target,
    double tau, double lambda_v, double lambda_t, int64_t ignore_index, int64_t reduction) {
  // Named tensors, not a structured binding: lambdas below capture them (C++17).
  at::Tensor vis_logits, txt_logits, loss, row_stats, batch_stats;
  std::tie(vis_logits, txt_logits, loss, row_stats, batch_stats) =
      prepare_forward(vis_logits_in, txt_logits_in, target, tau, reduction);
  const int64_t B = vis_logits.size(0);
  const int64_t C = vis_logits.size(1);

  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kBFloat16, at::kHalf, vis_logits.scalar_type(), "tes_loss_forward_cpu", [&] {
        using acc_t = acc_t_of<scalar_t>;
        const auto p = make_params<acc_t>(tau, lambda_v, lambda_t, ignore_index);
        const scalar_t* vis = vis_logits.const_data_ptr<scalar_t>();
        const scalar_t* txt = txt_logits.const_data_ptr<scalar_t>();
        const int64_t vis_stride = vis_logits.stride(0);
        const int64_t txt_stride = txt_logits.stride(0);
        const int64_t* labels = target.const_data_ptr<int64_t>();
        const int64_t label_stride = target.stride(0);
        acc_t* stats = row_stats.mutable_data_ptr<acc_t>();

        at::parallel_for(0, B, row_grain(C), [&](int64_t begin, int64_t end) {
          for (int64_t i = begin; i < end; ++i) {
            const int64_t label = labels[i * label_stride];
            check_label(label, i, C, p);
            acc_t* out = stats + i * kNumRowStats;
            if (is_ignored(label, p)) {
              row_ignored(out);
            } else {
              forward_row(vis + i * vis_stride, txt + i * txt_stride, C, label, p, out);
            }
          }
        });

        // The batch reduction runs over rows in order, so results do not
        // depend on the thread count.
        acc_t sums[kNumRowStats] = {};
        acc_t num_valid = 0;
        acc_t* loss_rows = reduction == kReduceNone ? loss.mutable_data_ptr<acc_t>() : nullptr;
        for (int64_t i = 0; i < B; ++i) {
          const acc_t* row = stats + i * kNumRowStats;
          if (loss_rows) loss_rows[i] = row[kRowLoss];
          if (is_ignored(labels[i * label_stride], p)) continue;
          num_valid += 1;
          for (int k = 0; k < kNumRowStats; ++k) sums[k] += row[k];
        }
        batch_finalize(sums, num_valid, reduction,
                       loss_rows ? nullptr : loss.mutable_data_ptr<acc_t>(),
                       batch_stats.mutable_data_ptr<acc_t>());
      });
  return {loss, row_stats, batch_stats};
}

std::tuple<at::Tensor, at::Tensor> tes_loss_backward_cpu(
    const at::Tensor& grad_loss_in, const at::Tensor& vis_logits_in,
    const at::Tensor& txt_logits_in, const at::Tensor& target, const at::Tensor& row_stats_in,
    const at::Tensor& batch_stats_in, double tau, double lambda_v, double lambda_t,
    int64_t ignore_index, int64_t reduction) {
  at::Tensor grad_loss, vis_logits, txt_logits, row_stats, batch_stats, grad_vis, grad_txt;
  std::tie(grad_loss, vis_logits, txt_logits, row_stats, batch_stats, grad_vis, grad_txt) =
      prepare_backward(grad_loss_in, vis_logits_in, txt_logits_in, target, row_stats_in,
                       batch_stats_in, tau, reduction);
  const int64_t B = vis_logits.size(0);
  const int64_t C = vis_logits.size(1);

  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kBFloat16, at::kHalf, vis_logits.scalar_type(), "tes_loss_backward_cpu", [&] {
        using acc_t = acc_t_of<scalar_t>;
        const auto p = make_params<acc_t>(tau, lambda_v, lambda_t, ignore_index);
        const scalar_t* vis = vis_logits.const_data_ptr<scalar_t>();
        const scalar_t* txt = txt_logits.const_data_ptr<scalar_t>();
        const int64_t vis_stride = vis_logits.stride(0);
        const int64_t txt_stride = txt_logits.stride(0);
        const int64_t* labels = target.const_data_ptr<int64_t>();
        const int64_t label_stride = target.stride(0);
        const acc_t* stats = row_stats.const_data_ptr<acc_t>();
        const acc_t* grad_out = grad_loss.const_data_ptr<acc_t>();
        const int64_t grad_stride = grad_loss.dim() == 1 ? grad_loss.stride(0) : 0;
        const acc_t num_valid = batch_stats.const_data_ptr<acc_t>()[kBatchValid];
        scalar_t* gv = grad_vis.mutable_data_ptr<scalar_t>();
        scalar_t* gt = grad_txt.mutable_data_ptr<scalar_t>();

        at::parallel_for(0, B, row_grain(C), [&](int64_t begin, int64_t end) {
          for (int64_t i = begin; i < end; ++i) {
            const int64_t label = labels[i * label_stride];
            check_label(label, i, C, p);
            if (is_ignored(label, p)) {
              std::fill_n(gv + i * C, C, scalar_t(0));
              std::fill_n(gt + i * C, C, scalar_t(0));
              continue;
            }
            const acc_t g = row_upstream_grad(grad_out, grad_stride, i, reduction, num_valid);
            backward_row(vis + i * vis_stride, txt + i * txt_stride, C, label, g,
                         stats + i * kNumRowStats, p, gv + i * C, gt + i * C);
          }
        });
      });
  return {grad_vis, grad_txt};
}

using ForwardOut = std::tuple<at::Tensor, at::Tensor, at::Tensor>;

ForwardOut call_forward(const at::Tensor& vis_logits, const at::Tensor& txt_logits,
                        const at::Tensor& target, double tau, double lambda_v, double lambda_t,
                        int64_t ignore_index, int64_t reduction) {
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("tesloss::tes_loss_forward", "")
                             .typed<ForwardOut(const at::Tensor&, const at::Tensor&,
                                               const at::Tensor&, double, double, double,
                                               int64_t, int64_t)>();
  return op.call(vis_logits, txt_logits, target, tau, lambda_v, lambda_t, ignore_index,
                 reduction);
}

std::tuple<at::Tensor, at::Tensor> call_backward(
    const at::Tensor& grad_loss, const at::Tensor& vis_logits, const at::Tensor& txt_logits,
    const at::Tensor& target, const at::Tensor& row_stats, const at::Tensor& batch_stats,
    double tau, double lambda_v, double lambda_t, int64_t ignore_index, int64_t reduction) {
  static const auto op =
      c10::Dispatcher::singleton()
          .findSchemaOrThrow("tesloss::tes_loss_backward", "")
          .typed<std::tuple<at::Tensor, at::Tensor>(
              const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
              const at::Tensor&, const at::Tensor&, double, double, double, int64_t, int64_t)>();
  return op.call(grad_loss, vis_logits, txt_logits, target, row_stats, batch_stats, tau,
                 lambda_v, lambda_t, ignore_index, reduction);
}

// Autograd for the forward op, for every device. It is bound in C++ rather than
// with torch.library.register_autograd because that Python wrapper cost about
// 45 us per training step (measured), more than the whole CPU kernel at small
// shapes. The backward op needs no autograd of its own: TeS has no double
// backward.
class TesLossFunction : public torch::autograd::Function<TesLossFunction> {
 public:
  static torch::autograd::variable_list forward(
      torch::autograd::AutogradContext* ctx, const at::Tensor& vis_logits,
      const at::Tensor& txt_logits, const at::Tensor& target, double tau, double lambda_v,
      double lambda_t, int64_t ignore_index, int64_t reduction) {
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    auto [loss, row_stats, batch_stats] = call_forward(
        vis_logits, txt_logits, target, tau, lambda_v, lambda_t, ignore_index, reduction);
    ctx->save_for_backward({vis_logits, txt_logits, target, row_stats, batch_stats});
    ctx->saved_data["tau"] = tau;
    ctx->saved_data["lambda_v"] = lambda_v;
    ctx->saved_data["lambda_t"] = lambda_t;
    ctx->saved_data["ignore_index"] = ignore_index;
    ctx->saved_data["reduction"] = reduction;
    ctx->mark_non_differentiable({row_stats, batch_stats});
    // The statistics get no gradient; without this, autograd would allocate
    // (and on a GPU, fill) zero gradients for them before every backward.
    ctx->set_materialize_grads(false);
    return {loss, row_stats, batch_stats};
  }

  static torch::autograd::variable_list backward(torch::autograd::AutogradContext* ctx,
                                                 torch::autograd::variable_list grads) {
    if (!grads[0].defined()) return torch::autograd::variable_list(8);  // no gradient reached the loss
    const auto saved = ctx->get_saved_variables();
    auto [grad_vis, grad_txt] = call_backward(
        grads[0], saved[0], saved[1], saved[2], saved[3], saved[4],
        ctx->saved_data["tau"].toDouble(), ctx->saved_data["lambda_v"].toDouble(),
        ctx->saved_data["lambda_t"].toDouble(), ctx->saved_data["ignore_index"].toInt(),
        ctx->saved_data["reduction"].toInt());
    return {grad_vis, grad_txt, {}, {}, {}, {}, {}, {}};
  }
};

ForwardOut tes_loss_forward_autograd(const at::Tensor& vis_logits, const at::Tensor& txt_logits,
                                     const at::Tensor& target, double tau, double lambda_v,
                                     double lambda_t, int64_t ignore_index, int64_t reduction) {
  auto out = TesLossFunction::apply(vis_logits, txt_logits, target, tau, lambda_v, lambda_t,
                                    ignore_index, reduction);
  return {out[0], out[1], out[2]};
}

}  // namespace

TORCH_LIBRARY(tesloss, m) {
  // Per-row losses (or their mean / sum), the per-row statistics the backward
  // and the logged parts need, and [count of rows not ignored, mean parts].
  m.def(
      "tes_loss_forward(Tensor vis_logits, Tensor txt_logits, Tensor target, float tau, "
      "float lambda_v, float lambda_t, int ignore_index, int reduction) "
      "-> (Tensor loss, Tensor row_stats, Tensor batch_stats)");
  m.def(
      "tes_loss_backward(Tensor grad_loss, Tensor vis_logits, Tensor txt_logits, Tensor target, "
      "Tensor row_stats, Tensor batch_stats, float tau, float lambda_v, float lambda_t, "
      "int ignore_index, int reduction) -> (Tensor grad_vis_logits, Tensor grad_txt_logits)");
}

TORCH_LIBRARY_IMPL(tesloss, Autograd, m) {
  m.impl("tes_loss_forward", &tes_loss_forward_autograd);
}

TORCH_LIBRARY_IMPL(tesloss, CPU, m) {
  m.impl("tes_loss_forward", &tes_loss_forward_cpu);
  m.impl("tes_loss_backward", &tes_loss_backward_cpu);
}

}  // namespace tesloss

// A Python module with no functions of its own: importing it runs the
// registrations above. It records how the CPU kernels were compiled.
extern "C" PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  PyObject* module = PyModule_Create(&module_def);
  if (module != nullptr) {
    PyModule_AddStringConstant(module, "cpu_capability", TESLOSS_STR(TESLOSS_CPU_CAPABILITY_NAME));
  }
  return module;
}
