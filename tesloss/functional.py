"""fused_tes_loss: argument checks, then the compiled op (or, if it is missing, the reference)."""
import math
import numbers
import warnings
from typing import NamedTuple, Union

import torch

from . import _ops

_REDUCTIONS = ("none", "mean", "sum")  # F.cross_entropy's; the op's codes come from _ops


class Parts(NamedTuple):
    """Detached batch means over the rows that are not ignored, for logging.

    The cross-entropies are smoothed by ``label_smoothing`` as the loss is.
    With every kind of target and any ``label_smoothing``, the mean loss is::

        (1 - lambda_v) * ce_vision + lambda_v * ce_ref + lambda_t * ce_text

    (times the count of rows not ignored for ``reduction="sum"``), and with
    ``label_smoothing=0``, ``ce_ref = kl_ref + entropy_ref``.
    """

    ce_vision: torch.Tensor  # CE_eps(vis_logits, target)
    kl_ref: torch.Tensor  # KL(p_ref || softmax(vis_logits)), not smoothed
    ce_text: torch.Tensor  # CE_eps(txt_logits / tau, target)
    ce_ref: torch.Tensor  # CE_eps(vis_logits, p_ref)
    entropy_ref: torch.Tensor  # H(p_ref), the entropy of the text reference


# Where each part sits in the op's batch_stats, found by name.
_PART_INDEX = tuple(_ops.BATCH_STATS.index(name) for name in Parts._fields) if _ops.LOADED else ()


def fused_tes_loss(vis_logits: torch.Tensor, txt_logits: torch.Tensor, target: torch.Tensor, *,
                   tau: float = 0.03, lambda_v: float = 0.1, lambda_t: float = 0.3,
                   ignore_index: int = -100, reduction: str = "mean",
                   label_smoothing: float = 0.0, return_parts: bool = False,
                   ) -> Union[torch.Tensor, tuple[torch.Tensor, Parts]]:
    """The TeS loss of a batch, fused into one pass over the logits.

    For each row i that is not ignored, with z = vis_logits[i],
    s = txt_logits[i] / tau, eps = label_smoothing and Y the target's row
    (``onehot(target[i])`` for class indices, ``target[i]`` for class
    probabilities)::

        p_ref  = softmax(s)                                  (no gradient)
        q      = lambda_v * p_ref + (1 - lambda_v) * Y        (no gradient)
        loss_i = CE_eps(z, q) + lambda_t * CE_eps(s, Y)
        CE_eps(x, w) = -sum_c ((1 - eps) * w_c + eps / C) * log_softmax(x)_c

    ``CE_eps`` is ``nn.CrossEntropyLoss(label_smoothing=eps)`` on probability
    targets: with ``lambda_v = lambda_t = 0`` the op is
    ``F.cross_entropy(vis_logits, target, label_smoothing=eps)``.

    Args:
        vis_logits: [B, C] floating-point logits of the vision classifier.
        txt_logits: [B, C] logits of the fixed text classifier (cosine
            similarities), before division by ``tau``. A dtype that differs
            from ``vis_logits`` is promoted to the common one.
        target: [B] int64 class indices (or ``ignore_index``), or [B, C]
            floating-point class probabilities, such as timm's Mixup and
            CutMix make; their rows need not sum to 1, and are read in the
            accumulation dtype (a copy where their dtype differs). A target
            weight of 0 adds 0 even against a logit of -inf, as a class index
            does (``F.cross_entropy`` gives nan there). The target gets no
            gradient and must not require one.
        tau: temperature of the text logits, > 0 (and 1 / tau finite in the
            accumulation dtype: tau >= 4.2e-39 for fp32 accumulation).
        lambda_v: weight of the text reference in the soft target, in [0, 1].
        lambda_t: weight of the text cross-entropy, >= 0.
        ignore_index: rows with this class index add 0 loss and 0 gradient
            (class probabilities have no ignored rows).
        reduction: "mean" over rows not ignored (nan if there are none; all
            B rows for class probabilities), "sum", or "none" for the [B]
            per-row losses.
        label_smoothing: eps in [0, 1], as in ``F.cross_entropy``: both
            cross-entropies take the target mixed with the uniform 1 / C.
        return_parts: also return a :class:`Parts` of detached batch means.

    Returns:
        The loss, float32 (float64 for float64 inputs); with ``return_parts``,
        ``(loss, parts)``. Gradients reach ``vis_logits`` and ``txt_logits``
        in their own dtypes, and are differentiable again
        (``create_graph=True``), with ``q`` a constant as in the recipe. Each
        row's loss is unchanged by a constant added to its logits, and >= 0
        where the target's entries are >= 0 (negative probabilities are taken
        as ``F.cross_entropy`` takes them, and can make a row's loss negative).
    """
    _check(vis_logits, txt_logits, target, tau, lambda_v, lambda_t, ignore_index, reduction,
           label_smoothing)
    if vis_logits.dtype != txt_logits.dtype:  # the kernels read one dtype
        common = torch.promote_types(vis_logits.dtype, txt_logits.dtype)
        vis_logits, txt_logits = vis_logits.to(common), txt_logits.to(common)
    if not _ops.has_kernel(_device_type(vis_logits)):
        return _fallback(vis_logits, txt_logits, target, tau=tau, lambda_v=lambda_v,
                         lambda_t=lambda_t, ignore_index=ignore_index, reduction=reduction,
                         label_smoothing=label_smoothing, return_parts=return_parts)
    loss, _, batch_stats = _ops.FORWARD(
        vis_logits, txt_logits, target, float(tau), float(lambda_v), float(lambda_t),
        int(ignore_index), _ops.REDUCTIONS[reduction], float(label_smoothing),
    )
    if not return_parts:
        return loss
    return loss, Parts(*(batch_stats[i] for i in _PART_INDEX))


def _check(vis_logits, txt_logits, target, tau, lambda_v, lambda_t, ignore_index, reduction,
           label_smoothing):
    """Validates everything but label values (the kernels check those as they read them).

    It runs in every training step, so the common case is cheap: each test is the
    plainest that decides it, and messages are built only for an error (docs/DESIGN.md,
    "Per-call overhead in Python")."""
    for name, logits in (("vis_logits", vis_logits), ("txt_logits", txt_logits)):
        if not isinstance(logits, torch.Tensor):
            raise TypeError(f"fused_tes_loss: {name} must be a torch.Tensor of shape [B, C], "
                            f"got {type(logits).__name__}")
        if not logits.is_floating_point():
            raise TypeError(f"fused_tes_loss: {name} must be floating point, got {logits.dtype}")
        if logits.dim() != 2:
            raise ValueError(f"fused_tes_loss: {name} must be 2-D [B, C], "
                             f"got shape {list(logits.shape)}")
    shape = vis_logits.shape
    if txt_logits.shape != shape:
        raise ValueError(f"fused_tes_loss: txt_logits must have the shape of vis_logits "
                         f"{list(shape)}, got {list(txt_logits.shape)}")
    batch, num_classes = shape
    if num_classes == 0:
        raise ValueError(f"fused_tes_loss: vis_logits must have C >= 1 classes, "
                         f"got shape {list(shape)}")
    _check_target(target, batch, num_classes)
    if not _on_one_device(vis_logits, txt_logits, target):
        raise ValueError(f"fused_tes_loss: vis_logits, txt_logits and target must be on one "
                         f"device, got {vis_logits.device}, {txt_logits.device} and {target.device}")
    # A plain float in range passes each scalar test at once (as callgrind counts
    # it, a function call apiece costs a third of what this saves); anything else
    # takes the full test, which names the argument.
    if not (type(tau) is float and _TAU_FITS_EVERY_DTYPE <= tau < math.inf):
        _check_number("tau", tau, "a finite number > 0", lambda v: 0 < v < math.inf)
        _check_tau_for_dtype(tau, torch.promote_types(vis_logits.dtype, txt_logits.dtype))
    if not (type(lambda_v) is float and 0.0 <= lambda_v <= 1.0):
        _check_number("lambda_v", lambda_v, "a number in [0, 1]", lambda v: 0 <= v <= 1)
    if not (type(lambda_t) is float and 0.0 <= lambda_t < math.inf):
        _check_number("lambda_t", lambda_t, "a finite number >= 0",
                      lambda v: 0 <= v < math.inf)
    if type(ignore_index) is not int and (
            isinstance(ignore_index, bool) or not isinstance(ignore_index, numbers.Integral)):
        raise TypeError(f"fused_tes_loss: ignore_index must be an int, got {ignore_index!r}")
    if reduction not in _REDUCTIONS:
        raise ValueError(f"fused_tes_loss: reduction must be one of {list(_REDUCTIONS)}, "
                         f"got {reduction!r}")
    if not (type(label_smoothing) is float and 0.0 <= label_smoothing <= 1.0):
        _check_number("label_smoothing", label_smoothing, "a number in [0, 1]",
                      lambda v: 0 <= v <= 1)


# A tau at least this large has a finite 1 / tau in every accumulation dtype, so the
# per-dtype test can be skipped (the kernels' least tau is 4.2e-39, for fp32). Without
# the library there is no least tau, but the bound must still refuse tau = 0.
_TAU_FITS_EVERY_DTYPE = max(_ops._MIN_TAU.values(), default=0.0) or math.ulp(0.0)


def _check_target(target, batch, num_classes):
    if not isinstance(target, torch.Tensor):
        raise TypeError(f"fused_tes_loss: target must be a torch.Tensor of "
                        f"{_target_forms(batch, num_classes)}, got {type(target).__name__}")
    if target.is_floating_point():
        if target.dim() == 1:
            raise TypeError(f"fused_tes_loss: a target of shape [B] must hold int64 class "
                            f"indices, got {_described(target)} (class probabilities are "
                            f"[B, C]=[{batch}, {num_classes}])")
        if target.shape != (batch, num_classes):
            raise ValueError(f"fused_tes_loss: target must be "
                             f"{_target_forms(batch, num_classes)}, got {_described(target)}")
        if target.requires_grad:
            raise ValueError("fused_tes_loss: target must not require grad, got a target "
                             "that does: the loss has no gradient for it (pass "
                             "target.detach())")
    elif target.dtype != torch.int64:
        raise TypeError(f"fused_tes_loss: target must be {_target_forms(batch, num_classes)}, "
                        f"got {_described(target)}")
    elif target.shape != (batch,):
        raise ValueError(f"fused_tes_loss: target must be {_target_forms(batch, num_classes)}, "
                         f"got {_described(target)}")


def _target_forms(batch, num_classes):
    return (f"int64 class indices of shape [B]=[{batch}] or floating-point class "
            f"probabilities of shape [B, C]=[{batch}, {num_classes}]")


def _described(target):
    return f"{str(target.dtype).replace('torch.', '')} of shape {list(target.shape)}"


# Tensor.device builds a torch.device object, a cost in every training step
# (docs/DESIGN.md); is_cpu, is_cuda and get_device() answer the common cases
# without one.
def _device_type(tensor):
    return "cpu" if tensor.is_cpu else "cuda" if tensor.is_cuda else tensor.device.type


def _on_one_device(a, b, c):
    if a.is_cpu and b.is_cpu and c.is_cpu:
        return True
    if a.is_cuda and b.is_cuda and c.is_cuda:
        return a.get_device() == b.get_device() == c.get_device()
    return a.device == b.device == c.device


def _check_number(name, value, expected, ok):
    # A tensor is refused too: reading its value would synchronize with the device.
    # The exact-type test first is only for speed: isinstance against the
    # numbers ABC costs more than the rest of a check.
    if type(value) is not float and type(value) is not int and (
            isinstance(value, bool) or not isinstance(value, numbers.Real)):
        raise TypeError(f"fused_tes_loss: {name} must be {expected} (a Python number), "
                        f"got {type(value).__name__}")
    try:
        number = float(value)
    except OverflowError:  # an int past float's range
        number = math.inf if value > 0 else -math.inf
    if not ok(number):  # nan fails every comparison
        shown = repr(value) if len(repr(value)) <= 40 else f"{repr(value)[:20]}... ({number})"
        raise ValueError(f"fused_tes_loss: {name} must be {expected}, got {shown}")


def _check_tau_for_dtype(tau, dtype):
    least = _ops.min_tau(dtype)
    if tau < least:
        raise ValueError(f"fused_tes_loss: tau must be at least {least:.5g} for {dtype} logits "
                         f"(1 / tau must be finite in {_ops.acc_dtype(dtype)}), got {tau!r}")


_warned_fallback = set()


def _fallback(vis_logits, txt_logits, target, **kwargs):
    device = vis_logits.device.type
    reason = _ops.LOAD_ERROR or f"it has no kernels for {device} tensors"
    message = (f"tesloss: the compiled extension is not used ({reason}); "
               f"running the pure-PyTorch reference instead, which is slower. "
               f"{_ops.BUILD_HINT}")
    if _ops.extension_required():
        raise RuntimeError(message.replace("running the pure-PyTorch reference instead, which "
                                           "is slower.", "TESLOSS_REQUIRE_EXTENSION is set."))
    if device not in _warned_fallback:
        _warned_fallback.add(device)
        warnings.warn(message, RuntimeWarning, stacklevel=3)
    probs = target.is_floating_point()
    if device == "cpu" and not probs:  # the reference's index errors are less clear
        _check_labels(target, vis_logits.shape[1], kwargs["ignore_index"])
    from .reference import tes_loss

    # What the compiled op returns: the loss in the accumulation dtype (fp32 for half
    # types), and exact zero gradients for ignored rows, whatever their logits hold.
    acc = torch.float64 if vis_logits.dtype == torch.float64 else torch.float32
    if probs:
        target = target.to(acc)
    else:
        rows = (target != kwargs["ignore_index"])[:, None]
        vis_logits, txt_logits = (torch.where(rows, x, 0) for x in (vis_logits, txt_logits))
    return tes_loss(vis_logits.to(acc), txt_logits.to(acc), target, **kwargs)


def _check_labels(target, num_classes, ignore_index):
    bad = (target != ignore_index) & ((target < 0) | (target >= num_classes))
    if bad.any():
        row = int(bad.nonzero()[0, 0])
        raise IndexError(f"fused_tes_loss: target[{row}] = {int(target[row])} is out of range: "
                         f"expected a class index in [0, {num_classes}) or ignore_index "
                         f"({ignore_index})")
