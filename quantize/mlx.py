"""MLX affine group quantization of LLaVA-NeXT: which layers, with what settings.

One plan (`quant_plan`) decides per layer; the streaming converter applies it tensor by tensor
and `quantize_model` applies it to a model in memory, so both give the same bits. The language
model is quantized; the CLIP tower and projector stay float unless asked (`quantize_vision`),
and the vision position embedding and patch conv never are (they are read as plain arrays).
Mixed recipes are mlx-lm's `mixed_quant_predicate_builder` (more bits for v_proj/down_proj in
sensitive layers and for lm_head). The `quantization` block is in mlx-lm's format.
"""

import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, Optional, Tuple

import mlx.core as mx
import mlx.nn as nn

from mlx_llava_next.errors import LlavaNextError

MODE = "affine"
BITS = (2, 3, 4, 5, 6, 8)
GROUP_SIZES = (32, 64, 128)
RECIPES = ("mixed_2_6", "mixed_3_4", "mixed_3_6", "mixed_4_6")
VISION_PREFIXES = ("vision_tower.encoder.", "multi_modal_projector.")


class QuantizationError(LlavaNextError, ValueError):
    """Impossible quantization settings (bits, group size, recipe)."""


def to_stderr(message: str) -> None:
    print(message, file=sys.stderr)


@dataclass(frozen=True)
class QuantConfig:
    bits: int = 4
    group_size: int = 64
    quantize_vision: bool = False
    recipe: Optional[str] = None  # an mlx-lm mixed recipe for the language model

    def __post_init__(self):
        if self.bits not in BITS:
            raise QuantizationError(f"bits must be one of {BITS}, got {self.bits}")
        if self.group_size not in GROUP_SIZES:
            raise QuantizationError(f"group size must be one of {GROUP_SIZES}, got {self.group_size}")
        if self.recipe is not None and self.recipe not in RECIPES:
            raise QuantizationError(f"unknown recipe {self.recipe!r} (choose from {', '.join(RECIPES)})")

    @property
    def params(self) -> dict:
        return {"group_size": self.group_size, "bits": self.bits, "mode": MODE}

    def describe(self) -> str:
        text = self.recipe or f"{self.bits}-bit"
        text += f", group size {self.group_size}"
        return text + (", vision tower and projector quantized" if self.quantize_vision else "")


def _wanted(path: str, module: nn.Module, quantize_vision: bool) -> bool:
    if not hasattr(module, "to_quantized"):
        return False
    if path.startswith("language_model."):
        return True
    return quantize_vision and path.startswith(VISION_PREFIXES) and isinstance(module, nn.Linear)


def quant_plan(model: nn.Module, config: QuantConfig, warn: Callable[[str], None] = to_stderr) -> Dict[str, dict]:
    """{module path: {"group_size", "bits", "mode"}} for every layer to quantize.

    `model` may be lazy (never evaluated): only its module tree and shapes are read. A layer
    whose input size is not a multiple of its group size stays float; `warn` names it.
    """
    mixed = None
    if config.recipe is not None:
        from mlx_lm.convert import mixed_quant_predicate_builder

        mixed = mixed_quant_predicate_builder(config.recipe, model, config.group_size)
    plan = {}
    for path, module in sorted(model.named_modules(), key=lambda item: item[0]):
        if not _wanted(path, module, config.quantize_vision):
            continue
        params = mixed(path, module) if mixed is not None and path.startswith("language_model.") else config.params
        in_dim = module.weight.shape[-1]
        if in_dim % params["group_size"]:
            warn(f"warning: {path} not quantized: its input size {in_dim} is not a multiple of "
                 f"group size {params['group_size']}; it stays float")
            continue
        plan[path] = dict(params)
    if not plan:
        warn("warning: no layer could be quantized with these settings")
    return plan


def quantization_block(config: QuantConfig, plan: Dict[str, dict]) -> dict:
    """config.json's `quantization` (mlx-lm format): defaults plus the layers that differ.

    A layer is quantized on loading iff its `.scales` exist, so layers kept float need no entry.
    """
    block = dict(config.params)
    block.update({path: params for path, params in sorted(plan.items()) if params != config.params})
    return block


def quantize_weight(weight: mx.array, params: dict) -> Tuple[mx.array, mx.array, mx.array]:
    """(packed weight, scales, biases), lazily; scales and biases take the weight's dtype."""
    return mx.quantize(weight, group_size=params["group_size"], bits=params["bits"], mode=params["mode"])


def quantize_model(model: nn.Module, config: QuantConfig, warn: Callable[[str], None] = to_stderr) -> dict:
    """Quantize `model` in place with the converter's plan; return the `quantization` block."""
    plan = quant_plan(model, config, warn)
    nn.quantize(model, class_predicate=lambda path, module: plan.get(path, False))
    return quantization_block(config, plan)


def quantize_dir(src, out, config: QuantConfig, force: bool = False, show_progress: bool = True,
                 warn: Callable[[str], None] = to_stderr) -> Path:
    """Quantize an already converted (float) MLX directory into `out`, keeping its dtype."""
    from convert.mlx import convert, stored_float_dtype
    from mlx_llava_next.errors import CheckpointError
    from mlx_llava_next.loading import MLX_FORMAT_KEY, read_config, resolve_model_path

    src_dir = resolve_model_path(src)
    if read_config(src_dir).get(MLX_FORMAT_KEY) is None:
        raise CheckpointError(f"{src} is not a converted MLX directory; use `convert` for Hub/HF checkpoints")
    return convert(src_dir, out, dtype=stored_float_dtype(src_dir), quantization=config, force=force,
                   show_progress=show_progress, warn=warn)
