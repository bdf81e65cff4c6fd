"""nn.Module forms of the loss."""
from torch import nn

from .functional import fused_tes_loss


class TeSLoss(nn.Module):
    """Module form of :func:`tesloss.fused_tes_loss`, configured once like timm's losses.

    ``forward(vis_logits, txt_logits, target)`` returns the loss.
    """

    def __init__(self, tau=0.03, lambda_v=0.1, lambda_t=0.3, ignore_index=-100,
                 reduction="mean"):
        super().__init__()
        self.tau = tau
        self.lambda_v = lambda_v
        self.lambda_t = lambda_t
        self.ignore_index = ignore_index
        self.reduction = reduction

    def forward(self, vis_logits, txt_logits, target):
        return fused_tes_loss(vis_logits, txt_logits, target, tau=self.tau,
                              lambda_v=self.lambda_v, lambda_t=self.lambda_t,
                              ignore_index=self.ignore_index, reduction=self.reduction)

    def extra_repr(self):
        return (f"tau={self.tau}, lambda_v={self.lambda_v}, lambda_t={self.lambda_t}, "
                f"ignore_index={self.ignore_index}, reduction={self.reduction!r}")
