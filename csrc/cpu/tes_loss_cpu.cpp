// The CPU kernels of the fused TeS loss: rows are spread over threads, each
// row takes the sweeps of cpu/row_sweeps.h (forward) and cpu/grad_sweeps.h
// (backward, single pass), and the batch's sums are taken over the rows in
// order.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <c10/util/Exception.h>

#include <algorithm>
#include <type_traits>
#include <vector>

#include "batch_sum.h"
#include "cpu/grad_sweeps.h"
#include "kernels.h"
#include "tes_loss.h"

namespace tesloss {
namespace {

template <typename acc_t>
void check_label(int64_t label, int64_t row, int64_t num_classes, const RowParams<acc_t>& p) {
  TORCH_CHECK_INDEX(is_ignored(label, p) || is_valid_label<acc_t>(label, num_classes),
                    "fused_tes_loss: target[", row, "] = ", label,
                    " is out of range: expected a class index in [0, ", num_classes,
                    ") or ignore_index (", p.ignore_index, ")");
}

// Rows per task, so that a task holds about 16K columns: enough work to pay
// for a fork and join (docs/DESIGN.md).
int64_t row_grain(int64_t C) { return std::max<int64_t>(1, (int64_t(1) << 14) / C); }

// A row's class index, checked where kChecked; 0 for a probability target,
// which has none.
template <int kTarget, bool kChecked = true, typename scalar_t, typename acc_t>
int64_t row_label(const RowInputs<scalar_t, acc_t>& in, int64_t i) {
  if constexpr (kHasProbs<kTarget>) {
    return 0;
  } else {
    const int64_t label = in.labels[i * in.target_stride];
    if constexpr (kChecked) check_label(label, i, in.C, in.p);
    return label;
  }
}

template <int kTarget, typename scalar_t, typename acc_t>
const acc_t* row_probs(const RowInputs<scalar_t, acc_t>& in, int64_t i) {
  return kHasProbs<kTarget> ? in.probs + i * in.target_stride : nullptr;
}

// The batch's loss and parts from the row statistics, and the per-row losses
// for reduction "none". The rows are summed in order, so results do not
// depend on the thread count.
template <int kTarget, typename scalar_t, typename acc_t>
void sum_batch(const RowInputs<scalar_t, acc_t>& in, const ForwardTensors& t,
               const Params& params) {
  const acc_t* stats = t.row_stats.const_data_ptr<acc_t>();
  const bool per_row = params.reduction == kReduceNone;
  acc_t* loss = t.loss.mutable_data_ptr<acc_t>();
  BatchSum sums[kNumBatchSums] = {};
  int64_t num_valid = 0;
  for (int64_t i = 0; i < in.B; ++i) {
    const acc_t* row = stats + i * kNumRowStats;
    if (per_row) loss[i] = row[kRowLoss];
    if (is_ignored_row<kTarget>(row_label<kTarget, false>(in, i), in.p)) continue;
    num_valid += 1;
    add_row(sums, row);
  }
  batch_finalize(sums, num_valid, params.reduction, per_row ? nullptr : loss,
                 t.batch_stats.mutable_data_ptr<acc_t>());
}

// The rows that count, before any row is taken: "mean"'s 1 / num_valid is in
// every gradient the single pass writes. Labels out of range count here and
// are refused as their row is taken.
template <int kTarget, typename scalar_t, typename acc_t>
int64_t count_valid(const RowInputs<scalar_t, acc_t>& in) {
  if constexpr (kHasProbs<kTarget>) return in.B;
  int64_t count = 0;
  for (int64_t i = 0; i < in.B; ++i) {
    count += !is_ignored_row<kTarget>(row_label<kTarget, false>(in, i), in.p);
  }
  return count;
}

// One row's forward sweep into its statistics, or zeros for an ignored row.
template <int kTarget, typename scalar_t, typename acc_t>
void row_statistics(const RowInputs<scalar_t, acc_t>& in, int64_t i, int64_t label,
                    bool ignored, acc_t* stats) {
  acc_t* out = stats + i * kNumRowStats;
  if (ignored) {
    row_ignored(out);
    return;
  }
  cpu::forward_row<kTarget>(in.vis + i * in.vis_stride, in.txt + i * in.txt_stride,
                            row_probs<kTarget>(in, i), in.C, label, in.p, out);
}

// Whether the gradients go past the caches (cpu/vec_io.h's store_streaming):
// where both together are larger than kStreamAbove, about a server's last
// level cache, they would not be read back from the caches anyway. Measured
// in docs/DESIGN.md ("The single pass").
inline constexpr int64_t kStreamAbove = int64_t(16) << 20;

template <typename scalar_t, typename acc_t>
bool streams(const RowInputs<scalar_t, acc_t>& in) {
  return 2 * in.B * in.C * int64_t(sizeof(scalar_t)) > kStreamAbove;
}

// One row's backward sweep, or zeros for an ignored row.
template <int kTarget, typename scalar_t, typename acc_t>
void row_gradients(const RowInputs<scalar_t, acc_t>& in, int64_t i, int64_t label, bool ignored,
                   const acc_t* stats, acc_t g, scalar_t* grad_vis, scalar_t* grad_txt) {
  const int64_t C = in.C;
  if (ignored) {
    std::fill_n(grad_vis + i * C, C, scalar_t(0));
    std::fill_n(grad_txt + i * C, C, scalar_t(0));
    return;
  }
  cpu::backward_row<kTarget>(in.vis + i * in.vis_stride, in.txt + i * in.txt_stride,
                             row_probs<kTarget>(in, i), C, label,
                             grad_row<kTarget>(in.p, stats + i * kNumRowStats, g),
                             grad_vis + i * C, grad_txt + i * C, streams(in));
}

}  // namespace

void tes_loss_forward_cpu(const ForwardTensors& t, const Params& params) {
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kBFloat16, at::kHalf, t.vis_logits.scalar_type(), "tes_loss_forward_cpu", [&] {
        using acc_t = acc_t_of<scalar_t>;
        const auto in = row_inputs<scalar_t, acc_t>(t, params);
        acc_t* stats = t.row_stats.mutable_data_ptr<acc_t>();
        with_target_kind(t.target, params, [&](auto kind) {
          constexpr int kTarget = decltype(kind)::value;
          at::parallel_for(0, in.B, row_grain(in.C), [&](int64_t begin, int64_t end) {
            for (int64_t i = begin; i < end; ++i) {
              const int64_t label = row_label<kTarget>(in, i);
              row_statistics<kTarget>(in, i, label, is_ignored_row<kTarget>(label, in.p), stats);
            }
          });
          sum_batch<kTarget>(in, t, params);
        });
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
        with_target_kind(t.target, params, [&](auto kind) {
          constexpr int kTarget = decltype(kind)::value;
          at::parallel_for(0, in.B, row_grain(C), [&](int64_t begin, int64_t end) {
            for (int64_t i = begin; i < end; ++i) {
              const int64_t label = row_label<kTarget>(in, i);
              const acc_t g = row_upstream_grad(grad_loss, grad_stride, i, params.reduction,
                                                num_valid);
              row_gradients<kTarget>(in, i, label, is_ignored_row<kTarget>(label, in.p), stats,
                                     g, grad_vis, grad_txt);
            }
          });
        });
      });
}

// A training step's single pass: each row's forward sweeps, then at once its
// gradients, for an upstream gradient of 1, of the weights the forward took
// (cpu/grad_sweeps.h's step_row). The same weights and formulas as the two
// passes, so the same bits. The weights wait in the gradient rows where those
// are acc_t and not streamed, else in a scratch of the thread's.
void tes_loss_step_cpu(const StepTensors& t, const Params& params) {
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kBFloat16, at::kHalf, t.vis_logits.scalar_type(), "tes_loss_step_cpu", [&] {
        using acc_t = acc_t_of<scalar_t>;
        const auto in = row_inputs<scalar_t, acc_t>(t, params);
        acc_t* stats = t.row_stats.mutable_data_ptr<acc_t>();
        scalar_t* grad_vis = t.grad_vis.mutable_data_ptr<scalar_t>();
        scalar_t* grad_txt = t.grad_txt.mutable_data_ptr<scalar_t>();
        with_target_kind(t.target, params, [&](auto kind) {
          constexpr int kTarget = decltype(kind)::value;
          const acc_t one(1);
          const acc_t num_valid = static_cast<acc_t>(count_valid<kTarget>(in));
          const int64_t C = in.C;
          const bool stream = streams(in);
          const bool in_place = std::is_same_v<scalar_t, acc_t> && !stream;
          at::parallel_for(0, in.B, row_grain(C), [&](int64_t begin, int64_t end) {
            std::vector<acc_t> scratch(in_place ? 0 : 2 * C);
            for (int64_t i = begin; i < end; ++i) {
              const int64_t label = row_label<kTarget>(in, i);
              if (is_ignored_row<kTarget>(label, in.p)) {
                row_statistics<kTarget>(in, i, label, true, stats);
                row_gradients<kTarget>(in, i, label, true, stats, one, grad_vis, grad_txt);
                continue;
              }
              const acc_t g = row_upstream_grad(&one, 0, i, params.reduction, num_valid);
              acc_t* w_vis = scratch.data();
              acc_t* w_txt = w_vis + C;
              if (in_place) {
                w_vis = reinterpret_cast<acc_t*>(grad_vis + i * C);
                w_txt = reinterpret_cast<acc_t*>(grad_txt + i * C);
              }
              NextRow<scalar_t, acc_t> next;
              if (i + 1 < end) {
                next = {in.vis + (i + 1) * in.vis_stride, in.txt + (i + 1) * in.txt_stride,
                        row_probs<kTarget>(in, i + 1)};
              }
              cpu::step_row<kTarget>(in.vis + i * in.vis_stride, in.txt + i * in.txt_stride,
                                     row_probs<kTarget>(in, i), C, label, in.p, g,
                                     stats + i * kNumRowStats, w_vis, w_txt, grad_vis + i * C,
                                     grad_txt + i * C, stream, next);
            }
          });
          sum_batch<kTarget>(in, t, params);
        });
      });
}

}  // namespace tesloss
