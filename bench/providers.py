"""The providers bench_loss.py times: each setup returns a loss function
(vis_logits, txt_logits, target) -> loss, or raises Unavailable saying why it cannot run here.
"""
import functools

import torch
import torch.nn.functional as F

import tesloss
from tesloss import reference

IGNORE_INDEX = -100
SMOOTHING = 0.1  # timm train.py's default, for the smoothed and mixup targets
NAMES = ("tesloss", "two_pass", "eager", "torch_compile", "liger")
LABELS = {"tesloss": "tesloss", "two_pass": "two passes", "eager": "eager",
          "torch_compile": "torch.compile", "liger": "Liger"}
# What each provider is, for the printed report.
DESCRIPTIONS = {
    "tesloss": "tesloss.fused_tes_loss, the fused op",
    "two_pass": "tesloss's raw ops, tes_loss_forward then tes_loss_backward, under a Python "
                "autograd.Function (its few microseconds a call included): the kernels "
                "before the single pass",
    "eager": "tesloss.reference.tes_loss, the published recipe in plain PyTorch",
    "torch_compile": "torch.compile(tesloss.reference.tes_loss, dynamic=False), compiled and "
                     "warmed up per shape and dtype outside the timed region",
    "liger": "Liger-Kernel's cross-entropy and KL losses composed into the TeS loss "
             "(CUDA, class indices only)",
}


class Unavailable(Exception):
    pass


def tesloss_provider(device):
    info = tesloss.backend_info()
    if device not in info["kernels_for"]:
        # Timing the fallback under the fused op's name would be a false number.
        raise Unavailable(f"the compiled extension has no {device} kernels (backend_info: {info})")
    return tesloss.fused_tes_loss


class _TwoPasses(torch.autograd.Function):
    @staticmethod
    def forward(ctx, vis_logits, txt_logits, target, params):
        loss, row_stats, batch_stats = torch.ops.tesloss.tes_loss_forward(
            vis_logits, txt_logits, target, *params)
        ctx.save_for_backward(vis_logits, txt_logits, target, row_stats, batch_stats)
        ctx.params = params
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        grads = torch.ops.tesloss.tes_loss_backward(grad_loss, *ctx.saved_tensors, *ctx.params)
        return (*grads, None, None)


def two_pass_provider(device):
    tesloss_provider(device)  # the same kernels, so the same conditions

    def two_passes(vis_logits, txt_logits, target, tau=0.03, lambda_v=0.1, lambda_t=0.3,
                   label_smoothing=0.0):
        mean = tesloss._ops.REDUCTIONS["mean"]
        return _TwoPasses.apply(vis_logits, txt_logits, target,
                                (tau, lambda_v, lambda_t, IGNORE_INDEX, mean, label_smoothing))

    return two_passes


def eager_provider(device):
    return reference.tes_loss


def torch_compile_provider(device):
    # A fresh dynamo cache per shape and dtype: with dynamic=False every new shape recompiles,
    # and past the recompile limit dynamo would quietly run the function eagerly.
    torch._dynamo.reset()
    return torch.compile(reference.tes_loss, dynamic=False)


def liger_provider(device):
    """The text term is LigerCrossEntropyLoss on txt_logits / tau; the vision term is
    CE(z, q) = KL(q || softmax z) + H(q), with LigerKLDIVLoss on log_softmax(z) and q built
    under no_grad as the recipe builds it."""
    if device != "cuda":
        raise Unavailable("Liger-Kernel's Triton kernels need CUDA")
    try:
        from liger_kernel.transformers.cross_entropy import LigerCrossEntropyLoss
        from liger_kernel.transformers.kl_div import LigerKLDIVLoss
    except Exception as error:  # not installed, or built for another torch or triton
        raise Unavailable(f"liger_kernel is not importable ({type(error).__name__}: {error})")
    text_ce = LigerCrossEntropyLoss(ignore_index=IGNORE_INDEX, reduction="mean")
    vision_kl = LigerKLDIVLoss(reduction="sum", log_target=False)

    def liger_tes_loss(vis_logits, txt_logits, target, tau=0.03, lambda_v=0.1, lambda_t=0.3):
        valid = target != IGNORE_INDEX
        label = torch.where(valid, target, 0)
        logits_text = txt_logits / tau
        with torch.no_grad():
            soft_label = lambda_v * torch.softmax(logits_text, dim=1)
            soft_label[torch.arange(len(target), device=target.device), label] += 1.0 - lambda_v
            # An all-zero target row adds nothing to the KL sum and gets no gradient.
            soft_label *= valid.unsqueeze(1)
            # The KL kernel gives CE(z, q) - H(q); H(q) has no gradient but is in the loss.
            entropy = -torch.special.xlogy(soft_label, soft_label).sum(
                dtype=torch.promote_types(soft_label.dtype, torch.float32))
        loss_vision = vision_kl(F.log_softmax(vis_logits, dim=1), soft_label) + entropy
        # After soft_label: Liger writes its gradient into logits_text in place.
        loss_text = text_ce(logits_text, target)
        return loss_vision / valid.sum() + lambda_t * loss_text

    return liger_tes_loss


SETUPS = {"tesloss": tesloss_provider, "two_pass": two_pass_provider, "eager": eager_provider,
          "torch_compile": torch_compile_provider, "liger": liger_provider}
PER_CASE = {"torch_compile"}  # set up afresh for every shape and dtype


def with_target_form(fn, target_form):
    """The provider's loss function for this form of target: smoothed ones take
    label_smoothing, as the recipe does (mixup targets come smoothed)."""
    if target_form != "smoothed":
        return fn
    return functools.partial(fn, label_smoothing=SMOOTHING)
