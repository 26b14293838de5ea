"""A Hub id or local LLaVA-NeXT checkpoint (any key layout) -> an MLX directory, streaming.

The source shards are opened lazily (`mx.load` reads a tensor only when it is evaluated) and
an un-evaluated model gives the target names, shapes and which layers to quantize. Each output
tensor is then renamed, cast, quantized, written and dropped in turn, so peak memory stays
near one tensor, not the model. Everything is written to a temporary directory beside the
target and renamed at the end (`atomic_output_dir`).

Output: safetensors shards (<= 5 GiB, with an index) in our module names, config.json with
the MLX format marker and an mlx-lm `quantization` block, the tokenizer, processor and chat
template files, and a README.md model card.
"""

import os
import json
import shutil
from pathlib import Path
from typing import Callable, Dict, Optional

import mlx.core as mx

from mlx_llava_next import __version__
from mlx_llava_next.config import LlavaNextConfig
from mlx_llava_next.errors import CheckpointError
from mlx_llava_next.loading import (
    MLX_FORMAT_KEY,
    check_weights,
    read_config,
    read_weights,
    resolve_model_path,
    to_model_names,
)
from mlx_llava_next.model import Model
from quantize.mlx import QuantConfig, quant_plan, quantization_block, quantize_weight, to_stderr

from .common import atomic_output_dir, check_output_dir, progress
from .shards import MAX_SHARD_BYTES, write_shards

DTYPES = {"float16": mx.float16, "bfloat16": mx.bfloat16, "float32": mx.float32}

# Beside the weights: tokenizer, image processor, processor, chat template, generation config.
SIDE_FILE_PATTERNS = ["*.json", "tokenizer.model", "*.jinja", "*.txt", "*.tiktoken"]
NOT_COPIED = {"config.json", "model.safetensors.index.json", "quantization_report.json"}


def output_tensors(weights: Dict[str, mx.array], dtype: mx.Dtype, plan: Dict[str, dict]) -> Dict[str, mx.array]:
    """Lazy output arrays: floats cast to `dtype`, planned layers as (weight, scales, biases).

    Quantizing after the cast is what `nn.quantize` does to a model loaded in `dtype`.
    """
    out = {}
    for name, value in weights.items():
        if mx.issubdtype(value.dtype, mx.floating):
            value = value.astype(dtype)
        path, _, leaf = name.rpartition(".")
        if leaf == "weight" and path in plan:
            out[name], out[f"{path}.scales"], out[f"{path}.biases"] = quantize_weight(value, plan[path])
        else:
            out[name] = value
    return out


def output_config(raw_config: dict, quantization: Optional[QuantConfig], plan: Dict[str, dict]) -> dict:
    config = {k: v for k, v in raw_config.items() if k not in ("quantization", "quantization_config")}
    config[MLX_FORMAT_KEY] = 1
    if quantization is not None:
        config["quantization"] = quantization_block(quantization, plan)
        config["quantization_config"] = config["quantization"]  # mlx-lm mirrors it for HF tools
    return config


def copy_side_files(src_dir: Path, out_dir: Path) -> None:
    for pattern in SIDE_FILE_PATTERNS:
        for path in sorted(src_dir.glob(pattern)):
            if path.name not in NOT_COPIED and not path.name.endswith(".index.json"):
                shutil.copyfile(path, out_dir / path.name)  # follows Hub-cache symlinks


def model_card(source: str, dtype: str, quantization: Optional[QuantConfig], plan: Dict[str, dict]) -> str:
    if quantization is None:
        weights = f"all weights in {dtype}"
    else:
        kept = "quantized too" if quantization.quantize_vision else f"kept in {dtype}"
        weights = (f"language model quantized ({quantization.describe()}, MLX affine, {len(plan)} layers); "
                   f"other weights in {dtype}; the CLIP vision tower, projector and image_newline {kept}")
    return f"""---
library_name: mlx
pipeline_tag: image-text-to-text
tags: [mlx, llava-next]
---

# {Path(str(source)).name} (MLX)

Converted from `{source}` with mlx-llava-next {__version__}: {weights}.
Tensors use mlx-llava-next's module names; `config.json` carries the `quantization` block in mlx-lm's format.

```python
from mlx_llava_next import load, generate

model, processor = load("path/to/this/directory")
```
"""


def stored_float_dtype(model_dir: Path) -> str:
    """The dtype an MLX directory keeps its (unquantized) float weights in."""
    for name, value in read_weights(Path(model_dir)).items():
        if mx.issubdtype(value.dtype, mx.floating) and not name.endswith((".scales", ".biases")):
            return next(k for k, v in DTYPES.items() if v == value.dtype)
    raise CheckpointError(f"{model_dir} holds no float weights")


def convert(
    src,
    out,
    dtype: str = "float16",
    quantization: Optional[QuantConfig] = None,
    force: bool = False,
    revision: Optional[str] = None,
    show_progress: bool = True,
    warn: Callable[[str], None] = to_stderr,
    max_shard_bytes: int = MAX_SHARD_BYTES,
) -> Path:
    """Convert `src` (Hub id, llava-hf directory, mlx-vlm or our MLX directory) into `out`."""
    if dtype not in DTYPES:
        raise CheckpointError(f"dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    out = Path(out)
    check_output_dir(out, force, [src] if os.path.exists(str(src)) else [])  # before any download
    src_dir = resolve_model_path(src, revision)
    if not src_dir.is_dir():
        raise CheckpointError(f"{src} is not a model directory")
    raw_config = read_config(src_dir)
    model = Model(LlavaNextConfig.from_dict(raw_config))  # never evaluated: names and shapes only
    if raw_config.get("quantization"):
        raise CheckpointError(f"{src} is already quantized; convert or quantize its float original instead")
    weights = to_model_names(model, raw_config, read_weights(src_dir))
    check_weights(model, weights, str(src_dir))
    plan = quant_plan(model, quantization, warn) if quantization is not None else {}
    tensors = output_tensors(weights, DTYPES[dtype], plan)
    del weights, model

    def bar(items, total):
        return progress(items, total, "converting", enabled=show_progress)

    with atomic_output_dir(out, force, sources=[src_dir]) as tmp:
        write_shards(tmp, tensors, max_shard_bytes, progress=bar)
        (tmp / "config.json").write_text(json.dumps(output_config(raw_config, quantization, plan), indent=2))
        copy_side_files(src_dir, tmp)
        (tmp / "README.md").write_text(model_card(str(src), dtype, quantization, plan))
    return out
