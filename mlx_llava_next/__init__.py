"""LLaVA-NeXT (LLaVA-1.6) in MLX, numerically equal to transformers."""

import sys
import types

from .blas import use_fast_blas

use_fast_blas()  # must run before mlx.core is imported (see blas.py)


from .errors import CheckpointError, ImageError, LlavaNextError, PromptError, UnsupportedModelError

# The public functions load on first use, so `import mlx_llava_next` (and `cli.py --help`) pays for
# neither mlx nor mlx-lm, whose tokenizer module imports transformers and, through it, torch.
_LAZY = {"load": "loading", "generate": "generate", "stream_generate": "generate", "ChatSession": "generate"}


def __getattr__(name):
    if name not in _LAZY:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    import importlib

    value = getattr(importlib.import_module(f"{__name__}.{_LAZY[name]}"), name)
    globals()[name] = value
    return value


def __dir__():
    return sorted(set(globals()) | set(_LAZY))


class _Package(types.ModuleType):
    """`mlx_llava_next.generate` stays the function when the submodule of that name is imported."""

    def __setattr__(self, name, value):
        if name == "generate" and isinstance(value, types.ModuleType):
            return  # the submodule stays reachable as sys.modules["mlx_llava_next.generate"]
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package

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
