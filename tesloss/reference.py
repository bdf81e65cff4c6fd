"""The published TeS recipe, literally, in plain PyTorch.

It follows the authors' ``TeS_loss`` (idstcv/TeS): soft labels built under
``no_grad`` from the text logits, ``nn.CrossEntropyLoss`` with those
probability targets for the vision term, and a cross-entropy of the text
logits over ``tau`` against the target. The criterion is
``nn.CrossEntropyLoss(label_smoothing=eps)``, and ``onehot(target)`` becomes
the target itself where it is a [B, C] row of class probabilities (timm's
Mixup and CutMix). Ignored rows and the reductions are added the way
``torch.nn.functional.cross_entropy`` has them. Tests and the benchmark
compare the fused op against this function.
"""
from typing import Union

import torch
import torch.nn.functional as F
from torch import nn

from .functional import Parts


def tes_loss(vis_logits: torch.Tensor, txt_logits: torch.Tensor, target: torch.Tensor, *,
             tau: float = 0.03, lambda_v: float = 0.1, lambda_t: float = 0.3,
             ignore_index: int = -100, reduction: str = "mean", label_smoothing: float = 0.0,
             return_parts: bool = False) -> Union[torch.Tensor, tuple[torch.Tensor, Parts]]:
    probs = target.is_floating_point()
    batch = len(target)
    if probs:  # class probabilities: every row counts, ignore_index does not apply
        valid = torch.ones(batch, dtype=torch.bool, device=target.device)
    else:
        valid = target != ignore_index
        label = torch.where(valid, target, 0)  # any class: ignored rows are dropped below
    logits_text = txt_logits / tau

    with torch.no_grad():
        soft_label = lambda_v * torch.softmax(logits_text, dim=1)
        if probs:
            soft_label = soft_label + (1.0 - lambda_v) * target
        else:
            soft_label[torch.arange(batch, device=target.device), label] += 1.0 - lambda_v

    criterion = nn.CrossEntropyLoss(reduction="none", label_smoothing=label_smoothing)
    loss_vision = criterion(vis_logits, soft_label)

    def against_target(logits):  # CE_eps(logits, Y), rows in [B]
        if probs:
            return criterion(logits, target)
        return F.cross_entropy(logits, target, ignore_index=ignore_index, reduction="none",
                               label_smoothing=label_smoothing)

    loss_text = against_target(logits_text)
    rows = torch.where(valid, loss_vision + lambda_t * loss_text, 0.0)

    num_valid = valid.sum()
    if reduction == "none":
        loss = rows
    elif reduction == "sum":
        loss = rows.sum()
    elif reduction == "mean":
        loss = rows.sum() / num_valid
    else:
        raise ValueError(f"tes_loss: reduction must be 'none', 'mean' or 'sum', got {reduction!r}")
    if not return_parts:
        return loss

    with torch.no_grad():
        log_p_vis = F.log_softmax(vis_logits, dim=1)
        log_p_ref = F.log_softmax(logits_text, dim=1)
        kl_ref = F.kl_div(log_p_vis, log_p_ref, log_target=True, reduction="none").sum(dim=1)
        p_ref = log_p_ref.exp()
        entropy_ref = -torch.where(p_ref > 0, p_ref * log_p_ref, 0.0).sum(dim=1)

        def batch_mean(per_row):
            return torch.where(valid, per_row, 0.0).sum() / num_valid

        parts = Parts(batch_mean(against_target(vis_logits)), batch_mean(kl_ref),
                      batch_mean(loss_text.detach()), batch_mean(criterion(vis_logits, p_ref)),
                      batch_mean(entropy_ref))
    return loss, parts
