// The fused TeS loss as torch sees it: the op schemas, the argument checks,
// autograd (to any order), and the binding of each device's kernels.
// module.cpp is the Python module that carries the op's constants.
//
// Kernels are bound as boxed functions: the dispatcher hands over the schema's
// arguments as a stack, from which read_params builds one Params (checking
// each value against params.h's table) and prepare_* the named tensors the
// kernels take. Autograd passes the parameters on as the IValues it was given.
// So no signature lists the parameters one by one, and a new parameter needs
// no change here.
#include <ATen/ATen.h>
#include <ATen/core/stack.h>
#include <torch/csrc/autograd/custom_function.h>
#include <torch/library.h>

#include <utility>

#include "kernels.h"
#include "params.h"

namespace tesloss {

at::ScalarType acc_scalar_type(at::ScalarType t) {
  return AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, t, "acc_scalar_type", [] {
    return c10::CppTypeToScalarType<acc_t_of<scalar_t>>::value;
  });
}

double min_tau(at::ScalarType t) {
  return acc_scalar_type(t) == at::kDouble ? kMinTau<double> : kMinTau<float>;
}

namespace {

using torch::jit::Stack;

constexpr int kForwardTensorArgs = 3;   // vis_logits, txt_logits, target
constexpr int kBackwardTensorArgs = 6;  // grad_loss, the forward's three, row_stats, batch_stats

// ", float tau, float lambda_v, ...": the parameters' part of both schemas.
#define TESLOSS_SCHEMA_ARG(type, name, schema_type, ...) ", " schema_type " " #name
#define TESLOSS_SCHEMA_PARAMS TESLOSS_FOR_EACH_PARAM(TESLOSS_SCHEMA_ARG)

// A device's forward kernel as the dispatcher calls it: the schema's arguments
// in, (loss, row_stats, batch_stats) out.
template <ForwardKernel kernel>
void boxed_forward(const c10::OperatorHandle&, Stack* stack) {
  constexpr size_t kArgs = kForwardTensorArgs + kNumParams;
  const auto args = torch::jit::last(*stack, kArgs);
  const Params p = read_params(args.slice(kForwardTensorArgs), "tes_loss_forward");
  const ForwardTensors t =
      prepare_forward(args[0].toTensor(), args[1].toTensor(), args[2].toTensor(), p);
  kernel(t, p);
  torch::jit::drop(*stack, kArgs);
  torch::jit::push(*stack, t.loss, t.row_stats, t.batch_stats);
}

// A device's single-pass kernel as the dispatcher calls it: the forward's
// arguments in, (loss, row_stats, batch_stats, grad_vis, grad_txt) out.
template <StepKernel kernel>
void boxed_step(const c10::OperatorHandle&, Stack* stack) {
  constexpr size_t kArgs = kForwardTensorArgs + kNumParams;
  const auto args = torch::jit::last(*stack, kArgs);
  const Params p = read_params(args.slice(kForwardTensorArgs), "tes_loss_step");
  const StepTensors t =
      prepare_step(args[0].toTensor(), args[1].toTensor(), args[2].toTensor(), p);
  kernel(t, p);
  torch::jit::drop(*stack, kArgs);
  torch::jit::push(*stack, t.loss, t.row_stats, t.batch_stats, t.grad_vis, t.grad_txt);
}

// A device's backward kernel as the dispatcher calls it: (grad_vis, grad_txt) out.
template <BackwardKernel kernel>
void boxed_backward(const c10::OperatorHandle&, Stack* stack) {
  constexpr size_t kArgs = kBackwardTensorArgs + kNumParams;
  const auto args = torch::jit::last(*stack, kArgs);
  const Params p = read_params(args.slice(kBackwardTensorArgs), "tes_loss_backward");
  const BackwardTensors t = prepare_backward(args.slice(0, kBackwardTensorArgs), p);
  kernel(t, p);
  torch::jit::drop(*stack, kArgs);
  torch::jit::push(*stack, t.grad_vis, t.grad_txt);
}

// Calls an op with these tensors and the schema's parameter values (the device
// binding checks them); returns its outputs.
Stack call_op(const c10::OperatorHandle& op, Stack stack, const c10::IValue& params) {
  const auto& values = params.toTupleRef().elements();
  stack.insert(stack.end(), values.begin(), values.end());
  op.callBoxed(stack);
  return stack;
}

const c10::OperatorHandle& forward_op() {
  static const auto op = c10::Dispatcher::singleton().findSchemaOrThrow(
      C10_STRINGIZE(TESLOSS_LIBRARY) "::tes_loss_forward", "");
  return op;
}

const c10::OperatorHandle& step_op() {
  static const auto op = c10::Dispatcher::singleton().findSchemaOrThrow(
      C10_STRINGIZE(TESLOSS_LIBRARY) "::tes_loss_step", "");
  return op;
}

const c10::OperatorHandle& backward_op() {
  static const auto op = c10::Dispatcher::singleton().findSchemaOrThrow(
      C10_STRINGIZE(TESLOSS_LIBRARY) "::tes_loss_backward", "");
  return op;
}

// The gradient of the backward op's outputs, for double backward (gradient
// penalties): with g_i a row's upstream gradient, u and v what reaches
// grad_vis and grad_txt, p_v = softmax(z), p_ref = softmax(t / tau), and the
// smoothed targets w' = (1 - eps) q + eps / C and Y' = (1 - eps) Y + eps / C
// (tes_loss.h),
//   d/dz       = g_i * sum(w') * p_v * (u - <p_v, u>)
//   d/dt       = g_i * lambda_t / tau^2 * sum(Y') * p_ref * (v - <p_ref, v>)
//   d/dg_i     = <u, sum(w') p_v - w'> + lambda_t / tau * <v, sum(Y') p_ref - Y'>
// and d/dgrad_loss from d/dg_i through the reduction. The soft target q is a
// constant here as in the forward (the recipe builds it under no_grad), so
// grad_vis has no derivative in t. Written in ATen ops, so it is
// differentiable in turn; ignored rows get exact zeros.
torch::autograd::variable_list double_backward(const at::Tensor& u_in, const at::Tensor& v_in,
                                               const at::Tensor& grad_loss,
                                               const at::Tensor& vis_logits,
                                               const at::Tensor& txt_logits,
                                               const at::Tensor& target,
                                               const at::Tensor& batch_stats, const Params& p) {
  const auto acc = acc_scalar_type(vis_logits.scalar_type());
  const at::Tensor z = vis_logits.to(acc);
  const bool probs = target.dim() == 2;
  const at::Tensor valid = probs ? at::ones({z.size(0)}, z.options().dtype(at::kBool))
                                 : target != p.ignore_index;
  const at::Tensor rows = valid.unsqueeze(1);
  const at::Tensor y = probs ? target.to(acc)
                             : at::zeros_like(z).scatter_(
                                   1, at::where(valid, target, 0).unsqueeze(1), 1.0);
  const at::Tensor p_v = at::where(rows, z, 0).softmax(1);
  const at::Tensor p_ref = at::where(rows, txt_logits.to(acc) / p.tau, 0).softmax(1);
  const at::Tensor u = u_in.defined() ? u_in.to(acc) : at::zeros_like(z);
  const at::Tensor v = v_in.defined() ? v_in.to(acc) : at::zeros_like(z);

  const at::Tensor num_valid = batch_stats.select(0, kBatchValid);
  const at::Tensor g_out = grad_loss.to(acc);
  at::Tensor g = p.reduction == kReduceNone ? g_out : g_out.expand({z.size(0)});
  if (p.reduction == kReduceMean) g = g / num_valid;
  g = at::where(valid, g, 0).unsqueeze(1);

  const double eps = p.label_smoothing;
  const double uniform = eps / static_cast<double>(z.size(1));
  const double txt_scale = p.lambda_t / p.tau;
  const at::Tensor w_vis = (1 - eps) * (p.lambda_v * p_ref + (1 - p.lambda_v) * y) + uniform;
  const at::Tensor w_txt = (1 - eps) * y + uniform;
  const at::Tensor vis_mass = w_vis.sum(1, true);
  const at::Tensor txt_mass = w_txt.sum(1, true);
  const at::Tensor grad_z = g * vis_mass * p_v * (u - (p_v * u).sum(1, true));
  const at::Tensor grad_t =
      g * (txt_scale / p.tau) * txt_mass * p_ref * (v - (p_ref * v).sum(1, true));
  const at::Tensor per_row =
      at::where(valid,
                (u * (vis_mass * p_v - w_vis)).sum(1) +
                    txt_scale * (v * (txt_mass * p_ref - w_txt)).sum(1),
                0);
  at::Tensor grad_g = per_row;
  if (p.reduction == kReduceSum) grad_g = per_row.sum();
  if (p.reduction == kReduceMean) grad_g = per_row.sum() / num_valid;
  return {grad_g.to(grad_loss.scalar_type()).reshape(grad_loss.sizes()),
          grad_z.to(vis_logits.scalar_type()), grad_t.to(txt_logits.scalar_type())};
}

// Autograd for the backward op, so that create_graph=True gives second
// derivatives instead of torch's warning and a dropped term.
class TesLossBackwardFunction : public torch::autograd::Function<TesLossBackwardFunction> {
 public:
  static torch::autograd::variable_list forward(
      torch::autograd::AutogradContext* ctx, const at::Tensor& grad_loss,
      const at::Tensor& vis_logits, const at::Tensor& txt_logits, const at::Tensor& target,
      const at::Tensor& row_stats, const at::Tensor& batch_stats, const c10::IValue& params) {
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    const Stack out = call_op(
        backward_op(), {grad_loss, vis_logits, txt_logits, target, row_stats, batch_stats}, params);
    ctx->save_for_backward({grad_loss, vis_logits, txt_logits, target, row_stats, batch_stats});
    ctx->saved_data["params"] = params;
    return {out[0].toTensor(), out[1].toTensor()};
  }

  static torch::autograd::variable_list backward(torch::autograd::AutogradContext* ctx,
                                                 torch::autograd::variable_list grads) {
    const auto s = ctx->get_saved_variables();
    const auto& values = ctx->saved_data["params"].toTupleRef().elements();
    const Params p = read_params(values, "tes_loss_backward");
    auto d = double_backward(grads[0], grads[1], s[0], s[1], s[2], s[3], s[5], p);
    return {d[0], d[1], d[2], {}, {}, {}, {}};
  }
};

// The value of a one-element CPU tensor, read from its memory where it is the
// loss's dtype: Tensor::item goes through the dispatcher, a cost in every step.
[[maybe_unused]] double cpu_scalar(const at::Tensor& g) {
  if (g.scalar_type() == at::kFloat) return *g.const_data_ptr<float>();
  if (g.scalar_type() == at::kDouble) return *g.const_data_ptr<double>();
  return g.item<double>();
}

// Autograd for the forward op, for every device, bound in C++ rather than with
// torch.library.register_autograd, whose Python wrapper costs more than the
// whole CPU kernel at small shapes (docs/DESIGN.md). With `single_pass`, the
// forward is tes_loss_step, and its gradients (for an upstream gradient of 1)
// wait in saved_data until the backward hands them over, once.
class TesLossFunction : public torch::autograd::Function<TesLossFunction> {
 public:
  static torch::autograd::variable_list forward(torch::autograd::AutogradContext* ctx,
                                                const at::Tensor& vis_logits,
                                                const at::Tensor& txt_logits,
                                                const at::Tensor& target,
                                                const c10::IValue& params, bool single_pass) {
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    const Stack out =
        call_op(single_pass ? step_op() : forward_op(), {vis_logits, txt_logits, target}, params);
    const at::Tensor& row_stats = out[1].toTensor();
    const at::Tensor& batch_stats = out[2].toTensor();
    ctx->save_for_backward({vis_logits, txt_logits, target, row_stats, batch_stats});
    ctx->saved_data["params"] = params;
    if (single_pass) {
      ctx->saved_data[kGradients] = c10::List<at::Tensor>({out[3].toTensor(), out[4].toTensor()});
    }
    ctx->mark_non_differentiable({row_stats, batch_stats});
    // The statistics get no gradient; without this, autograd would allocate
    // (and on a GPU, fill) zero gradients for them before every backward.
    ctx->set_materialize_grads(false);
    return {out[0].toTensor(), row_stats, batch_stats};
  }

  static torch::autograd::variable_list backward(torch::autograd::AutogradContext* ctx,
                                                 torch::autograd::variable_list grads) {
    // The single pass's gradients, taken out: autograd gets the only
    // reference (so it need not copy them into .grad), and a second backward
    // (retain_graph) computes afresh rather than hand out a buffer twice.
    c10::optional<c10::List<at::Tensor>> ready;
    if (const auto found = ctx->saved_data.find(kGradients); found != ctx->saved_data.end()) {
      ready = found->second.toTensorList();
      ctx->saved_data.erase(found);
    }
    if (!grads[0].defined()) return {{}, {}, {}, {}, {}};  // no gradient reached the loss
    const c10::IValue& params = ctx->saved_data["params"];
    if (!at::GradMode::is_enabled()) {  // a plain backward: no graph to record
      at::AutoDispatchBelowADInplaceOrView below_autograd;
      if (ready && scaled(ready->get(0), ready->get(1), grads[0], ctx, params)) {
        return {ready->get(0), ready->get(1), {}, {}, {}};
      }
      const auto saved = ctx->get_saved_variables();
      const Stack out = call_op(
          backward_op(), {grads[0], saved[0], saved[1], saved[2], saved[3], saved[4]}, params);
      return {out[0].toTensor(), out[1].toTensor(), {}, {}, {}};
    }
    const auto saved = ctx->get_saved_variables();
    auto out = TesLossBackwardFunction::apply(grads[0], saved[0], saved[1], saved[2], saved[3],
                                              saved[4], params);
    return {out[0], out[1], {}, {}, {}};
  }

 private:
  static constexpr const char* kGradients = "gradients";

  // The single pass's gradients were written for an upstream gradient of 1:
  // another is a multiplication in place (one more rounding). On a GPU it is
  // read there (tes_scale_gradients_cuda; the single pass takes no fp16
  // there). On the CPU, where reading it costs no wait, fp16 takes the
  // backward's own pass instead (false) unless it is 1: its gradients below
  // 6e-8 underflowed at 1 where a GradScaler's g would have kept them.
  // An ignored row's zeros are left as they are, as the two passes and
  // F.cross_entropy leave them: g times 0 is nan for g = inf and -0 for g < 0.
  static bool scaled(const at::Tensor& grad_vis, const at::Tensor& grad_txt,
                     const at::Tensor& g, torch::autograd::AutogradContext* ctx,
                     const c10::IValue& params) {
    // Read only past the g = 1 test on the CPU: a plain loss.backward() needs
    // neither (unpacking the saved tensors costs a few microseconds a step).
    const auto target = [&] { return ctx->get_saved_variables()[2]; };
    const auto ignore_index = [&] {
      return read_params(params.toTupleRef().elements(), "tes_loss_backward").ignore_index;
    };
#if defined(TESLOSS_CUDA_EMULATOR)
    tes_scale_gradients_cuda(grad_vis, grad_txt, g, target(), ignore_index());
    return true;
#else
#ifdef WITH_CUDA
    if (grad_vis.is_cuda()) {
      tes_scale_gradients_cuda(grad_vis, grad_txt, g, target(), ignore_index());
      return true;
    }
#endif
    const bool unit = g.numel() == 1 ? cpu_scalar(g) == 1.0 : at::all(g == 1).item<bool>();
    if (unit) return true;
    if (grad_vis.scalar_type() == at::kHalf) return false;
    at::Tensor factor = g.dim() == 1 ? g.unsqueeze(1) : g.expand({grad_vis.size(0), 1});
    const at::Tensor labels = target();
    if (!labels.is_floating_point()) {  // a probability target ignores no row
      factor = at::where((labels == ignore_index()).unsqueeze(1), at::ones({}, g.options()),
                         factor);
    }
    grad_vis.mul_(factor);
    grad_txt.mul_(factor);
    return true;
#endif
  }
};

// Whether this call's forward is the single pass: only when both logits will
// get a gradient, and only for plain tensors: tracing (torch.compile's fake
// and functional tensors) takes the two passes, whose backward needs no value
// of the upstream gradient. On a GPU (and the emulated one) fp16 takes the two
// passes: its backward could not tell a GradScaler's g from 1 without a wait.
bool takes_single_pass(const at::Tensor& vis_logits, const at::Tensor& txt_logits) {
  const auto traced = c10::DispatchKeySet({c10::DispatchKey::Python,
                                           c10::DispatchKey::PythonTLSSnapshot,
                                           c10::DispatchKey::Functionalize});
  if (!at::GradMode::is_enabled() || !vis_logits.requires_grad() ||
      !txt_logits.requires_grad() || vis_logits.key_set().has_any(traced) ||
      txt_logits.key_set().has_any(traced)) {
    return false;
  }
#if defined(TESLOSS_CUDA_EMULATOR)
  return vis_logits.scalar_type() != at::kHalf;
#else
  return vis_logits.is_cpu() || (vis_logits.is_cuda() && vis_logits.scalar_type() != at::kHalf);
#endif
}

void autograd_forward(const c10::OperatorHandle&, Stack* stack) {
  constexpr size_t kArgs = kForwardTensorArgs + kNumParams;
  const auto args = torch::jit::last(*stack, kArgs);
  const auto params = args.slice(kForwardTensorArgs);
  // The target is a constant of the loss (q is built without gradient): a
  // target that wants one would silently get none.
  TORCH_CHECK(!args[2].toTensor().requires_grad(),
              "fused_tes_loss: target must not require grad, got a target that does: the loss "
              "has no gradient for it (pass target.detach())");
  auto out = TesLossFunction::apply(args[0].toTensor(), args[1].toTensor(), args[2].toTensor(),
                                    c10::IValue(c10::ivalue::Tuple::create(params.vec())),
                                    takes_single_pass(args[0].toTensor(), args[1].toTensor()));
  torch::jit::drop(*stack, kArgs);
  torch::jit::push(*stack, std::move(out[0]), std::move(out[1]), std::move(out[2]));
}

void autograd_backward(const c10::OperatorHandle&, Stack* stack) {
  constexpr size_t kArgs = kBackwardTensorArgs + kNumParams;
  const auto args = torch::jit::last(*stack, kArgs);
  const auto params = args.slice(kBackwardTensorArgs);
  auto out = TesLossBackwardFunction::apply(
      args[0].toTensor(), args[1].toTensor(), args[2].toTensor(), args[3].toTensor(),
      args[4].toTensor(), args[5].toTensor(),
      c10::IValue(c10::ivalue::Tuple::create(params.vec())));
  torch::jit::drop(*stack, kArgs);
  torch::jit::push(*stack, std::move(out[0]), std::move(out[1]));
}

}  // namespace

TORCH_LIBRARY(TESLOSS_LIBRARY, m) {
  // Per-row losses (or their mean / sum), the per-row statistics the backward
  // and the logged parts need, and [count of rows not ignored, mean parts].
  m.def("tes_loss_forward(Tensor vis_logits, Tensor txt_logits, Tensor target"
        TESLOSS_SCHEMA_PARAMS ") -> (Tensor loss, Tensor row_stats, Tensor batch_stats)");
  m.def("tes_loss_backward(Tensor grad_loss, Tensor vis_logits, Tensor txt_logits, "
        "Tensor target, Tensor row_stats, Tensor batch_stats" TESLOSS_SCHEMA_PARAMS
        ") -> (Tensor grad_vis_logits, Tensor grad_txt_logits)");
  // The forward and both gradients for an upstream gradient of 1, in one pass.
  m.def("tes_loss_step(Tensor vis_logits, Tensor txt_logits, Tensor target"
        TESLOSS_SCHEMA_PARAMS ") -> (Tensor loss, Tensor row_stats, Tensor batch_stats, "
        "Tensor grad_vis_logits, Tensor grad_txt_logits)");
}

TORCH_LIBRARY_IMPL(TESLOSS_LIBRARY, Autograd, m) {
  m.impl("tes_loss_forward", torch::CppFunction::makeFromBoxedFunction<&autograd_forward>());
  m.impl("tes_loss_backward", torch::CppFunction::makeFromBoxedFunction<&autograd_backward>());
  // The single pass is a forward and its gradients at once, for TesLossFunction
  // to call below autograd: it has no derivative of its own to offer, so its
  // outputs carry none.
  m.impl("tes_loss_step", torch::CppFunction::makeFallthrough());
}

#define TESLOSS_BIND_KERNELS(key, forward, backward, step)                                \
  TORCH_LIBRARY_IMPL(TESLOSS_LIBRARY, key, m) {                                          \
    m.impl("tes_loss_forward",                                                           \
           torch::CppFunction::makeFromBoxedFunction<&boxed_forward<&forward>>());       \
    m.impl("tes_loss_backward",                                                          \
           torch::CppFunction::makeFromBoxedFunction<&boxed_backward<&backward>>());     \
    m.impl("tes_loss_step", torch::CppFunction::makeFromBoxedFunction<&boxed_step<&step>>()); \
  }
#if defined(TESLOSS_CUDA_EMULATOR)
TESLOSS_BIND_KERNELS(CPU, tes_loss_forward_cuda, tes_loss_backward_cuda, tes_loss_step_cuda)
#else
TESLOSS_BIND_KERNELS(CPU, tes_loss_forward_cpu, tes_loss_backward_cpu, tes_loss_step_cpu)
#ifdef WITH_CUDA
TESLOSS_BIND_KERNELS(CUDA, tes_loss_forward_cuda, tes_loss_backward_cuda, tes_loss_step_cuda)
#endif
#endif

}  // namespace tesloss
