"""tesloss: the TeS loss (text-supervised fine-tuning, ICCV 2023) as one fused PyTorch op."""
from . import reference
from ._ops import backend_info
from .functional import Parts, fused_tes_loss
from .modules import TeSLoss

__version__ = "0.1.0"

__all__ = ["Parts", "TeSLoss", "backend_info", "fused_tes_loss", "reference"]
