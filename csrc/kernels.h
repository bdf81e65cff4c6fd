// The tensors of each pass as the kernels read and write them, and each
// device's kernels, declared once. ops.cpp checks the op's arguments, fills
// these structs (prepare_forward, prepare_backward) and binds the kernels to
// the dispatcher; the kernels only read inputs and fill outputs.
#pragma once

#include <ATen/core/Tensor.h>
#include <ATen/core/ivalue.h>

#include <type_traits>

#include "params.h"

// The op's library: tesloss, or, where tests/cuda_emulator builds ops.cpp
// with the CUDA kernels compiled for the host, tesloss_emulated, whose CPU
// tensors those kernels take, beside the real one in the same process.
#if defined(TESLOSS_CUDA_EMULATOR)
#define TESLOSS_LIBRARY tesloss_emulated
#else
#define TESLOSS_LIBRARY tesloss
#endif

namespace tesloss {

struct ForwardTensors {
  at::Tensor vis_logits;   // [B, C], class stride 1; rows may be strided
  at::Tensor txt_logits;   // [B, C], vis_logits' dtype, class stride 1
  at::Tensor target;       // [B] int64, any stride; or [B, C] probabilities in the
                           // accumulation type, class stride 1
  at::Tensor loss;         // out: [B] for reduction none, else [], accumulation type
  at::Tensor row_stats;    // out: [B, kNumRowStats], contiguous, accumulation type
  at::Tensor batch_stats;  // out: [kNumBatchStats], accumulation type
};

struct BackwardTensors {
  at::Tensor grad_loss;    // [B] (any stride) or one value, accumulation type
  at::Tensor vis_logits;   // as in ForwardTensors
  at::Tensor txt_logits;
  at::Tensor target;
  at::Tensor row_stats;    // the forward's, contiguous, accumulation type
  at::Tensor batch_stats;  // the forward's, contiguous, accumulation type
  at::Tensor grad_vis;     // out: [B, C], contiguous, the logits' dtype
  at::Tensor grad_txt;     // out: [B, C], contiguous, the logits' dtype
};

// The single pass of a training step: the forward's tensors, and both
// gradients for an upstream gradient of 1, written in the same pass.
struct StepTensors : ForwardTensors {
  at::Tensor grad_vis;     // out: [B, C], contiguous, the logits' dtype
  at::Tensor grad_txt;     // out: [B, C], contiguous, the logits' dtype
};

// The kernels read rows through a row stride; only the class stride must be 1.
inline at::Tensor with_unit_class_stride(const at::Tensor& rows) {
  return (rows.size(1) <= 1 || rows.stride(1) == 1) ? rows : rows.contiguous();
}

// The target as the kernels read it: class indices as they are; class
// probabilities in the accumulation type (a copy, for another dtype), class
// stride 1.
inline at::Tensor kernel_target(const at::Tensor& target, at::ScalarType acc) {
  if (target.dim() == 1) return target;
  return with_unit_class_stride(target.scalar_type() == acc ? target : target.to(acc));
}

// What both passes read of the rows, as the kernels index them. A target is
// either labels (a class index per row) or probs (a row of probabilities).
template <typename scalar_t, typename acc_t>
struct RowInputs {
  const scalar_t* vis;
  const scalar_t* txt;
  const int64_t* labels;  // null for probability targets
  const acc_t* probs;     // null for class indices
  int64_t vis_stride;
  int64_t txt_stride;
  int64_t target_stride;  // between labels, or between rows of probs
  int64_t B;
  int64_t C;
  RowParams<acc_t> p;
};

// From ForwardTensors or BackwardTensors.
template <typename scalar_t, typename acc_t, typename Tensors>
RowInputs<scalar_t, acc_t> row_inputs(const Tensors& t, const Params& params) {
  const bool probs = t.target.dim() == 2;
  return RowInputs<scalar_t, acc_t>{
      t.vis_logits.template const_data_ptr<scalar_t>(),
      t.txt_logits.template const_data_ptr<scalar_t>(),
      probs ? nullptr : t.target.template const_data_ptr<int64_t>(),
      probs ? t.target.template const_data_ptr<acc_t>() : nullptr,
      t.vis_logits.stride(0),
      t.txt_logits.stride(0),
      t.target.stride(0),
      t.vis_logits.size(0),
      t.vis_logits.size(1),
      row_params<acc_t>(params, t.vis_logits.size(1))};
}

// Calls f(std::integral_constant<int, kind>) for the target's TargetKind, so
// that each kernel is compiled once per kind and the published recipe's
// (kIndexTarget) carries nothing of the others.
template <typename F>
void with_target_kind(const at::Tensor& target, const Params& params, F&& f) {
  if (target.dim() == 2) {
    f(std::integral_constant<int, kProbTarget>{});
  } else if (params.label_smoothing != 0) {
    f(std::integral_constant<int, kSmoothedIndexTarget>{});
  } else {
    f(std::integral_constant<int, kIndexTarget>{});
  }
}

// The op's arguments as the dispatcher hands them over (tensors.cpp): the
// parameters, each checked against params.h's table, and each pass's tensors,
// checked, laid out for the kernels and with their outputs allocated.
Params read_params(c10::ArrayRef<c10::IValue> args, const char* op);
ForwardTensors prepare_forward(const at::Tensor& vis_logits, const at::Tensor& txt_logits,
                               const at::Tensor& target, const Params& p);
// tensors: grad_loss, vis_logits, txt_logits, target, row_stats, batch_stats.
BackwardTensors prepare_backward(c10::ArrayRef<c10::IValue> tensors, const Params& p);
StepTensors prepare_step(const at::Tensor& vis_logits, const at::Tensor& txt_logits,
                         const at::Tensor& target, const Params& p);

// The accumulation dtype of logits of dtype t (params.h's acc_t_of).
at::ScalarType acc_scalar_type(at::ScalarType t);

// The smallest tau the kernels take for logits of dtype t (params.h's kMinTau).
double min_tau(at::ScalarType t);

using ForwardKernel = void (*)(const ForwardTensors&, const Params&);
using BackwardKernel = void (*)(const BackwardTensors&, const Params&);
using StepKernel = void (*)(const StepTensors&, const Params&);

void tes_loss_forward_cpu(const ForwardTensors& t, const Params& params);
void tes_loss_backward_cpu(const BackwardTensors& t, const Params& params);
void tes_loss_step_cpu(const StepTensors& t, const Params& params);

#if defined(WITH_CUDA) || defined(TESLOSS_CUDA_EMULATOR)
void tes_loss_forward_cuda(const ForwardTensors& t, const Params& params);
void tes_loss_backward_cuda(const BackwardTensors& t, const Params& params);
void tes_loss_step_cuda(const StepTensors& t, const Params& params);
// The single pass's gradients times the upstream gradient grad_loss (one
// value, or one per row), in place, read on the device: rows whose value is
// exactly 1, and rows that a class index target ignores, are not touched.
void tes_scale_gradients_cuda(const at::Tensor& grad_vis, const at::Tensor& grad_txt,
                              const at::Tensor& grad_loss, const at::Tensor& target,
                              int64_t ignore_index);
#endif

}  // namespace tesloss
