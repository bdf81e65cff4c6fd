"""nn.Module forms: the loss, and the head that gives it its two sets of logits."""
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from .functional import fused_tes_loss


class TeSLoss(nn.Module):
    """Module form of :func:`tesloss.fused_tes_loss`, configured once like timm's losses.

    ``forward(vis_logits, txt_logits, target)`` returns the loss; ``target`` holds
    class indices or class probabilities.
    """

    def __init__(self, tau: float = 0.03, lambda_v: float = 0.1, lambda_t: float = 0.3,
                 ignore_index: int = -100, reduction: str = "mean",
                 label_smoothing: float = 0.0) -> None:
        super().__init__()
        self.tau = tau
        self.lambda_v = lambda_v
        self.lambda_t = lambda_t
        self.ignore_index = ignore_index
        self.reduction = reduction
        self.label_smoothing = label_smoothing

    def forward(self, vis_logits: torch.Tensor, txt_logits: torch.Tensor,
                target: torch.Tensor) -> torch.Tensor:
        return fused_tes_loss(vis_logits, txt_logits, target, tau=self.tau,
                              lambda_v=self.lambda_v, lambda_t=self.lambda_t,
                              ignore_index=self.ignore_index, reduction=self.reduction,
                              label_smoothing=self.label_smoothing)

    def extra_repr(self):
        return (f"tau={self.tau}, lambda_v={self.lambda_v}, lambda_t={self.lambda_t}, "
                f"ignore_index={self.ignore_index}, reduction={self.reduction!r}, "
                f"label_smoothing={self.label_smoothing}")


class TeSHead(nn.Module):
    """The two heads TeS trains on top of a backbone's pooled features.

    - ``classifier``: ``Linear(in_features, C)``, the vision head; inference uses it alone.
    - ``projection``: ``Linear -> BatchNorm1d -> ReLU -> Linear`` to the text dimension D,
      then L2 normalization, as in the authors' model.
    - ``text_head``: the fixed [C, D] text reference classifier with unit rows (from
      :func:`tesloss.build_text_head`), a persistent buffer: it is saved in the
      ``state_dict``, moves with ``.to()``, and no optimizer sees it.

    ``forward(features)`` returns ``(vis_logits, txt_logits)``, both [B, C]; ``txt_logits``
    are cosine similarities between the projected features and the class rows, ready for
    :func:`tesloss.fused_tes_loss`, which divides them by ``tau``.

    Args:
        in_features: width of the backbone's pooled features.
        text_head: [C, D] floating-point tensor with L2-normalized rows.
        proj_hidden: hidden width of the projection; default ``in_features`` (the authors
            use 2048 -> 2048 -> 512 on a ResNet-50).

    With timm, create the backbone without its classifier; its output width is
    ``head_hidden_size``, which differs from ``num_features`` where the model has a
    pre-logits layer (e.g. MobileNetV3)::

        backbone = timm.create_model("resnet50", pretrained=True, num_classes=0)
        width = getattr(backbone, "head_hidden_size", backbone.num_features)
        head = TeSHead(width, tesloss.load_text_head("head.safetensors", classnames=names))
        vis_logits, txt_logits = head(backbone(images))
        loss = tesloss.fused_tes_loss(vis_logits, txt_logits, target)
    """

    def __init__(self, in_features: int, text_head: torch.Tensor,
                 proj_hidden: Optional[int] = None) -> None:
        super().__init__()
        if isinstance(in_features, bool) or not isinstance(in_features, int) or in_features < 1:
            raise ValueError(f"TeSHead: in_features must be an int >= 1, got {in_features!r}")
        if proj_hidden is None:
            proj_hidden = in_features
        if isinstance(proj_hidden, bool) or not isinstance(proj_hidden, int) or proj_hidden < 1:
            raise ValueError(f"TeSHead: proj_hidden must be None or an int >= 1, "
                             f"got {proj_hidden!r}")
        if (not isinstance(text_head, torch.Tensor) or not text_head.is_floating_point()
                or text_head.dim() != 2 or 0 in text_head.shape):
            got = (f"{text_head.dtype} of shape {list(text_head.shape)}"
                   if isinstance(text_head, torch.Tensor) else type(text_head).__name__)
            raise ValueError(f"TeSHead: text_head must be a floating-point tensor [C, D] with "
                             f"C, D >= 1, got {got}")
        # Cosine similarities need unit rows; an unnormalized head would silently rescale
        # the text logits, and with them the effective temperature.
        norms = text_head.detach().float().norm(dim=1)
        off = (norms - 1).abs() > 1e-3
        if off.any():
            row = int(off.nonzero()[0, 0])
            raise ValueError(f"TeSHead: text_head rows must be L2-normalized, but row {row} has "
                             f"norm {float(norms[row]):.6g}; build it with "
                             f"tesloss.build_text_head or normalize it with F.normalize(head, "
                             f"dim=1)")
        num_classes, dim = text_head.shape
        self.classifier = nn.Linear(in_features, num_classes)
        self.projection = nn.Sequential(
            nn.Linear(in_features, proj_hidden),
            nn.BatchNorm1d(proj_hidden),
            nn.ReLU(),
            nn.Linear(proj_hidden, dim),
        )
        self.register_buffer("text_head", text_head.detach().to(torch.float32).clone())

    @property
    def num_classes(self) -> int:
        return self.text_head.shape[0]

    def forward(self, features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if features.dim() != 2 or features.shape[1] != self.classifier.in_features:
            raise ValueError(f"TeSHead: features must be [B, in_features]=[B, "
                             f"{self.classifier.in_features}] (pooled backbone features), "
                             f"got shape {list(features.shape)}")
        vis_logits = self.classifier(features)
        projected = F.normalize(self.projection(features), dim=1)
        txt_logits = projected @ self.text_head.to(projected.dtype).T
        return vis_logits, txt_logits

    def extra_repr(self):
        return (f"in_features={self.classifier.in_features}, num_classes={self.num_classes}, "
                f"text_dim={self.text_head.shape[1]}")
