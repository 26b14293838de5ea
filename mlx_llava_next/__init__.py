"""LLaVA-NeXT (LLaVA-1.6) in MLX, numerically equal to transformers."""

from .blas import use_fast_blas

use_fast_blas()  # must run before mlx.core is imported (see blas.py)


from .errors import CheckpointError, ImageError, LlavaNextError, PromptError, UnsupportedModelError
from .generate import ChatSession, generate, stream_generate
from .loading import load

__all__ = [
    "load",
    "generate",
    "stream_generate",
    "ChatSession",
    "LlavaNextError",
    "ImageError",
    "PromptError",
    "CheckpointError",
    "UnsupportedModelError",
]
__version__ = "0.1.0"
