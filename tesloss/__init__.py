"""tesloss: the TeS loss (text-supervised fine-tuning, ICCV 2023) as one fused PyTorch op."""
from . import reference
from ._ops import backend_info
from .functional import Parts, fused_tes_loss
from .modules import TeSHead, TeSLoss

__version__ = "0.1.0"

__all__ = ["Parts", "TeSHead", "TeSLoss", "backend_info", "build_text_head", "fused_tes_loss",
           "load_text_head", "reference", "save_text_head", "text"]

_FROM_TEXT = ("build_text_head", "load_text_head", "save_text_head")


def __getattr__(name):
    # tesloss.text is imported on first use: importing it here would make
    # `python -m tesloss.text` run a module that is already in sys.modules (runpy warns).
    if name == "text" or name in _FROM_TEXT:
        import importlib

        text = importlib.import_module(".text", __name__)
        return text if name == "text" else getattr(text, name)
    raise AttributeError(f"module 'tesloss' has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(__all__))
