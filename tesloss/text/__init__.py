"""Text reference heads: from class names to the fixed [C, D] classifier that TeS trains against.

Each class name fills every template; a frozen text encoder embeds the prompts; each embedding
is L2-normalized, the embeddings of one class are averaged, and the average is normalized again
(the CLIP zero-shot recipe). Tokenization and the forward pass stay in the libraries that define
the encoders: open_clip, sentence-transformers and transformers are imported only when an
encoder of theirs is made, so ``import tesloss`` stays light.

Command line::

    python -m tesloss.text --classnames classes.txt \\
        --encoder open_clip:ViT-B-32-quickgelu:/ckpt/open_clip_pytorch_model.bin \\
        --out head.safetensors
"""
from .cli import main
from .encoders import (ENCODER_SPECS, HFCLIPTextEncoder, OpenCLIPTextEncoder,
                       SentenceTransformerTextEncoder, TextEncoder, encoder_from_spec)
from .heads import (DEFAULT_TEMPLATES, FORMAT, PROGRESS_MIN_CLASSES, TENSOR_KEY,
                    build_text_head, load_text_head, save_text_head)

__all__ = [
    "DEFAULT_TEMPLATES", "ENCODER_SPECS", "FORMAT", "HFCLIPTextEncoder", "OpenCLIPTextEncoder",
    "PROGRESS_MIN_CLASSES", "SentenceTransformerTextEncoder", "TENSOR_KEY", "TextEncoder",
    "build_text_head", "encoder_from_spec", "load_text_head", "main", "save_text_head",
]
