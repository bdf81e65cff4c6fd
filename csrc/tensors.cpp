// The op's arguments checked and made into the tensors each pass reads and
// writes (kernels.h's structs), for the dispatcher's kernels and autograd alike.
#include <ATen/ATen.h>

#include <utility>

#include "kernels.h"
#include "params.h"

namespace tesloss {

// The parameters from the schema's arguments, each checked against its
// condition in params.h. The same check serves the forward and the backward op.
Params read_params(c10::ArrayRef<c10::IValue> args, const char* op) {
  TORCH_INTERNAL_ASSERT(args.size() == kNumParams, op, ": expected ", kNumParams,
                        " parameters, got ", args.size());
  Params p;
  size_t next = 0;
#define TESLOSS_READ_PARAM(type, name, schema_type, condition, expected)          \
  {                                                                               \
    const type value = args[next++].to<type>();                                   \
    TORCH_CHECK(condition, op, ": " #name " must be " expected ", got ", value);  \
    p.name = value;                                                               \
  }
  TESLOSS_FOR_EACH_PARAM(TESLOSS_READ_PARAM)
#undef TESLOSS_READ_PARAM
  return p;
}

namespace {

// The tensor checks both devices share, so both refuse the same arguments with
// the same messages. Label values are checked by the kernels, which read each
// label anyway.
void check_forward_tensors(const at::Tensor& vis_logits, const at::Tensor& txt_logits,
                           const at::Tensor& target) {
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
  const int64_t B = vis_logits.size(0);
  const int64_t C = vis_logits.size(1);
  const bool indices = target.scalar_type() == at::kLong && target.dim() == 1 &&
                       target.size(0) == B;
  const bool probs = at::isFloatingType(target.scalar_type()) && target.dim() == 2 &&
                     target.size(0) == B && target.size(1) == C;
  TORCH_CHECK(indices || probs, "fused_tes_loss: target must be int64 class indices of shape [B]=[",
              B, "] or floating class probabilities of shape [B, C]=[", B, ", ", C, "], got ",
              target.scalar_type(), " of shape ", target.sizes());
  TORCH_CHECK(vis_logits.device() == txt_logits.device() && vis_logits.device() == target.device(),
              "fused_tes_loss: vis_logits, txt_logits and target must be on one device, got ",
              vis_logits.device(), ", ", txt_logits.device(), " and ", target.device());
}

void check_backward_tensors(const at::Tensor& grad_loss, const at::Tensor& vis_logits,
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

// The one parameter check that depends on the dtype: the kernels scale by
// 1 / tau (times log2 e) in the accumulation type.
void check_tau(const char* op, double tau, at::ScalarType dtype) {
  const double least = min_tau(dtype);
  TORCH_CHECK(tau >= least, op, ": tau must be at least ", least, " for ", dtype,
              " logits (1 / tau must be finite in ", acc_scalar_type(dtype), "), got ", tau);
}

// A gradient buffer for logits: their shape and dtype, contiguous.
at::Tensor gradient_for(const at::Tensor& logits) {
  return at::empty(logits.sizes(), logits.options());
}

}  // namespace

ForwardTensors prepare_forward(const at::Tensor& vis_logits, const at::Tensor& txt_logits,
                               const at::Tensor& target, const Params& p) {
  check_forward_tensors(vis_logits, txt_logits, target);
  check_tau("tes_loss_forward", p.tau, vis_logits.scalar_type());
  const int64_t B = vis_logits.size(0);
  const auto acc = vis_logits.options().dtype(acc_scalar_type(vis_logits.scalar_type()));
  return ForwardTensors{with_unit_class_stride(vis_logits),
                        with_unit_class_stride(txt_logits),
                        kernel_target(target, acc.dtype().toScalarType()),
                        p.reduction == kReduceNone ? at::empty({B}, acc) : at::empty({}, acc),
                        at::empty({B, kNumRowStats}, acc),
                        at::empty({kNumBatchStats}, acc)};
}

BackwardTensors prepare_backward(c10::ArrayRef<c10::IValue> tensors, const Params& p) {
  const at::Tensor& grad_loss = tensors[0].toTensor();
  const at::Tensor& vis_logits = tensors[1].toTensor();
  const at::Tensor& txt_logits = tensors[2].toTensor();
  const at::Tensor& target = tensors[3].toTensor();
  const at::Tensor& row_stats = tensors[4].toTensor();
  const at::Tensor& batch_stats = tensors[5].toTensor();
  check_forward_tensors(vis_logits, txt_logits, target);
  check_backward_tensors(grad_loss, vis_logits, row_stats, batch_stats, p.reduction);
  check_tau("tes_loss_backward", p.tau, vis_logits.scalar_type());
  const auto acc = acc_scalar_type(vis_logits.scalar_type());
  // Checked first: even a .to() that returns its input costs a dispatch.
  // grad_loss keeps its strides (a [B] gradient may be an expanded scalar).
  const auto as_acc = [acc](const at::Tensor& t) {
    return t.scalar_type() == acc ? t : t.to(acc);
  };
  return BackwardTensors{as_acc(grad_loss),
                         with_unit_class_stride(vis_logits),
                         with_unit_class_stride(txt_logits),
                         kernel_target(target, acc),
                         as_acc(row_stats).contiguous(),
                         as_acc(batch_stats).contiguous(),
                         gradient_for(vis_logits),
                         gradient_for(txt_logits)};
}

StepTensors prepare_step(const at::Tensor& vis_logits, const at::Tensor& txt_logits,
                         const at::Tensor& target, const Params& p) {
  return StepTensors{prepare_forward(vis_logits, txt_logits, target, p), gradient_for(vis_logits),
                     gradient_for(txt_logits)};
}

}  // namespace tesloss
