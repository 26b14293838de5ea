"""`load()`: a Hub id, a local llava-hf directory, a converted MLX directory or a GGUF pair
-> (Model, Processor).

HF directories come in three key layouts (Hub 4.x saves, transformers 5 `save_pretrained`,
transformers' in-memory names); `canonical_weights` maps all of them onto our module names.
Converted MLX directories already use our names (and may be quantized); mlx-vlm's LLaVA-NeXT
conversions use the Hub names with an OHWI conv (`is_mlx_vlm_layout`).
"""

import json
import os
from pathlib import Path
from typing import Dict, Optional, Tuple

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten

from . import fastpath
from .checks import read_json_object, safetensors_header
from .config import LlavaNextConfig
from .errors import CheckpointError
from .model import Model
from .processing import Processor

# Marker written into config.json by our converter: weights use our names and layouts.
MLX_FORMAT_KEY = "mlx_llava_next_format"

# Files a checkpoint needs; never pickles, never remote code.
HUB_ALLOW_PATTERNS = ["*.json", "*.safetensors", "tokenizer.model", "*.jinja", "*.txt", "*.tiktoken", "*.gguf"]

# (prefix in a checkpoint, our prefix); first match wins.
KEY_PREFIXES = [
    ("model.language_model.", "language_model.model."),  # transformers in-memory
    ("lm_head.", "language_model.lm_head."),
    ("model.vision_tower.", "vision_tower."),
    ("model.multi_modal_projector.", "multi_modal_projector."),
    ("model.image_newline", "image_newline"),
    ("language_model.", "language_model."),  # Hub and save_pretrained
    ("vision_tower.", "vision_tower."),
    ("multi_modal_projector.", "multi_modal_projector."),
    ("image_newline", "image_newline"),
]


def canonical_weights(weights: Dict[str, mx.array]) -> Dict[str, mx.array]:
    """Any transformers LLaVA-NeXT key layout -> our module names (values untouched)."""
    out = {}
    for key, value in weights.items():
        for prefix, ours in KEY_PREFIXES:
            if key.startswith(prefix):
                out[ours + key[len(prefix) :]] = value
                break
        else:
            raise CheckpointError(f"unexpected tensor {key!r}: not a LLaVA-NeXT weight name")
    return out


# mlx-vlm (Blaizzy/mlx-vlm) saves LLaVA-NeXT conversions from its own module tree, which mirrors
# the llava-hf Hub names: `vision_tower.vision_model.*` (all CLIP blocks and post_layernorm),
# `language_model.model.*`, `language_model.lm_head`, `multi_modal_projector.linear_{1,2}`,
# `image_newline`, with mlx-lm `.scales`/`.biases` beside quantized weights. The one difference
# from the Hub is the patch-embedding conv, already stored in MLX's OHWI order.
MLX_VLM_CONV_KEY = "vision_tower.vision_model.embeddings.patch_embedding.weight"


def is_mlx_vlm_layout(raw_config: dict, weights: Dict[str, mx.array]) -> bool:
    conv = weights.get(MLX_VLM_CONV_KEY)
    channels = (raw_config.get("vision_config") or {}).get("num_channels", 3)
    # OIHW has the channels at axis 1, OHWI at axis 3 (a patch side is never 3 for CLIP).
    return conv is not None and conv.ndim == 4 and conv.shape[3] == channels and conv.shape[1] != channels


def from_mlx_vlm(weights: Dict[str, mx.array]) -> Dict[str, mx.array]:
    """mlx-vlm weights -> the Hub layout (conv back to OIHW), which `canonical_weights` reads."""
    out = dict(weights)
    out[MLX_VLM_CONV_KEY] = out[MLX_VLM_CONV_KEY].transpose(0, 3, 1, 2)
    return out


def to_model_names(model: Model, raw_config: dict, weights: Dict[str, mx.array]) -> Dict[str, mx.array]:
    """Checkpoint tensors (any supported layout) -> `model.parameters()` names and layouts."""
    if raw_config.get(MLX_FORMAT_KEY) is not None:
        return weights
    if is_mlx_vlm_layout(raw_config, weights):
        weights = from_mlx_vlm(weights)
    return model.sanitize(canonical_weights(weights))


def resolve_model_path(path_or_repo, revision: Optional[str] = None) -> Path:
    """A local path as is; otherwise download (or find in the cache) a Hub repo's files."""
    path = Path(path_or_repo).expanduser()
    if path.exists():
        return path
    text = str(path_or_repo)
    if text.startswith((".", "/", "~")) or text.count("/") != 1:
        raise CheckpointError(f"no such model directory or file: {text}")
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError, RepositoryNotFoundError

    try:
        return Path(snapshot_download(text, revision=revision, allow_patterns=HUB_ALLOW_PATTERNS))
    except RepositoryNotFoundError:
        raise CheckpointError(f"model {text!r} was not found on the Hugging Face Hub") from None
    except LocalEntryNotFoundError:
        raise CheckpointError(
            f"model {text!r} is not in the local Hugging Face cache and the Hub cannot be reached "
            f"(offline?). Download it on a connected machine, or pass a local directory path"
        ) from None
    except (HfHubHTTPError, OSError) as e:
        raise CheckpointError(f"could not download {text!r}: {e}") from None


def read_config(model_dir: Path) -> dict:
    path = model_dir / "config.json"
    if not path.exists():
        raise CheckpointError(f"{model_dir} has no config.json: not a model directory")
    return read_json_object(path)


def weight_files(model_dir: Path):
    """The safetensors files of a checkpoint; with an index, every shard it names must exist."""
    index = model_dir / "model.safetensors.index.json"
    if index.exists():
        names = sorted(set(index_weight_map(index).values()))
        missing = [n for n in names if not (model_dir / n).exists()]
        if missing:
            raise CheckpointError(f"{model_dir}: shard(s) named in the index are missing: {', '.join(missing)}")
        return [model_dir / n for n in names]
    files = sorted(model_dir.glob("*.safetensors"))
    if not files:
        raise CheckpointError(f"{model_dir} has no .safetensors weights (pickled .bin files are never loaded)")
    return files


def index_weight_map(index: Path) -> Dict[str, str]:
    """The index's tensor -> shard map, checked (shards are plain file names in the directory)."""
    weight_map = read_json_object(index).get("weight_map")
    if not isinstance(weight_map, dict) or not weight_map:
        raise CheckpointError(f"{index}: no weight_map (tensor name -> shard file) in the index")
    for key, name in weight_map.items():
        if not isinstance(name, str) or not name.endswith(".safetensors") or os.path.basename(name) != name or name.startswith("."):
            raise CheckpointError(f"{index}: weight_map[{key!r}] must name a .safetensors file in the directory, got {name!r}"[:300])
    return weight_map


def read_safetensors(path: Path) -> Dict[str, mx.array]:
    safetensors_header(path)  # lengths and offsets against the file, before MLX maps it
    try:
        return mx.load(str(path))
    except Exception as e:  # mlx raises RuntimeError/ValueError on truncated or corrupt files
        raise CheckpointError(f"cannot read {path.name}: truncated or corrupt safetensors file ({e})") from None


def read_weights(model_dir: Path) -> Dict[str, mx.array]:
    weights = {}
    index = model_dir / "model.safetensors.index.json"
    weight_map = index_weight_map(index) if index.exists() else None
    for path in weight_files(model_dir):
        shard = read_safetensors(path)
        for key in shard:
            if key in weights:
                raise CheckpointError(f"{model_dir}: tensor {key!r} is stored twice (in {path.name} and an earlier shard)")
            if weight_map is not None and weight_map.get(key) != path.name:
                raise CheckpointError(f"{path}: tensor {key!r} is not listed for this shard in {index.name}")
        weights.update(shard)
    return weights


def default_dtype(weights) -> Optional[mx.Dtype]:
    """float32 on the CPU (MLX's CPU half-precision kernels are 10-25x slower), else as stored."""
    if mx.default_device() == mx.cpu:
        return mx.float32
    return None


def check_weights(model: Model, weights: Dict[str, mx.array], source: str) -> None:
    """Every parameter present with its shape, nothing extra; errors name the tensor."""
    expected = dict(tree_flatten(model.parameters()))
    missing = sorted(set(expected) - set(weights))
    unexpected = sorted(set(weights) - set(expected))
    if missing:
        raise CheckpointError(f"{source}: missing tensor(s): {', '.join(missing[:5])}" + (" ..." if len(missing) > 5 else ""))
    if unexpected:
        raise CheckpointError(f"{source}: unexpected tensor(s): {', '.join(unexpected[:5])}" + (" ..." if len(unexpected) > 5 else ""))
    for key, value in weights.items():
        if tuple(value.shape) != tuple(expected[key].shape):
            raise CheckpointError(
                f"{source}: tensor {key} has shape {tuple(value.shape)}, expected {tuple(expected[key].shape)}"
            )


def apply_weights(model: Model, weights: Dict[str, mx.array], source: str) -> None:
    """Load weights strictly, turning MLX's messages into errors that name the tensor."""
    check_weights(model, weights, source)
    model.load_weights(list(weights.items()), strict=True)


def quantize_like(model: Model, config: dict, weights: Dict[str, mx.array]) -> None:
    """Re-create the quantized layers a converted checkpoint holds (per-layer settings win)."""
    quant = config.get("quantization")
    if not quant:
        return

    def predicate(path, module):
        if f"{path}.scales" not in weights:
            return False
        layer = quant.get(path)
        return layer if isinstance(layer, dict) else True

    nn.quantize(model, group_size=quant["group_size"], bits=quant["bits"],
                mode=quant.get("mode", "affine"), class_predicate=predicate)


def cast(weights: Dict[str, mx.array], dtype: Optional[mx.Dtype]) -> Dict[str, mx.array]:
    """Float tensors to `dtype`; quantized layers keep their stored scales and biases."""
    if dtype is None:
        return weights

    def keep(key, value):
        return key.endswith((".scales", ".biases")) or not mx.issubdtype(value.dtype, mx.floating)

    return {k: v if keep(k, v) else v.astype(dtype) for k, v in weights.items()}


def load_model(model_dir, dtype: Optional[mx.Dtype] = None, lazy: bool = False,
               exact: Optional[bool] = None) -> Tuple[Model, dict]:
    from .blas import warn_if_reference

    warn_if_reference()  # once a process, on Linux without an optimized BLAS
    model_dir = Path(model_dir)
    raw_config = read_config(model_dir)
    config = LlavaNextConfig.from_dict(raw_config)
    model = Model(config)
    weights = to_model_names(model, raw_config, read_weights(model_dir))
    quantize_like(model, raw_config, weights)
    if dtype is None:
        dtype = default_dtype(weights)
    apply_weights(model, cast(weights, dtype), str(model_dir))
    if not lazy:
        mx.eval(model.parameters())
    model.eval()
    fastpath.auto_enable(model, exact)  # native quantized kernels on x86 Linux CPUs; no-op elsewhere
    return model, raw_config


def load_tokenizer(model_dir: Path, raw_config: dict):
    from mlx_lm.tokenizer_utils import load as load_mlx_tokenizer

    eos = None
    generation = model_dir / "generation_config.json"
    if generation.exists():
        eos = json.loads(generation.read_text()).get("eos_token_id")
    try:
        return load_mlx_tokenizer(model_dir, eos_token_ids=eos)
    except Exception as e:
        raise CheckpointError(f"{model_dir}: cannot load the tokenizer ({e})") from None


def load(path_or_repo, dtype: Optional[mx.Dtype] = None, revision: Optional[str] = None, lazy: bool = False,
         distributed: Optional[str] = None, kv_cache: Optional[str] = None, exact: Optional[bool] = None):
    """(model, processor) from a Hub id, a local HF or converted MLX directory, or a GGUF pair.

    distributed="tensor" | "pipeline": under mlx.launch, this rank's part of a split language model
    (see distributed.py). kv_cache="float16" | "float32" | "auto" (None): the KV cache's dtype;
    auto is float16 for quantized models on the CPU fast path, else mlx-lm's cache (kv_cache.py).
    exact: on the CPU fast path, quantized layers take float32 activations (True; products equal
    to mx.quantized_matmul to rounding) or int8 ones (False: faster, see fastpath.py); None: the
    default, int8 for 4-bit layers where the int8 kernels run (fastpath.INT8_DEFAULT)."""
    from .kv_cache import check_choice, use_kv_cache

    kv_cache = check_choice(kv_cache)
    if distributed is not None:
        from .distributed import load as load_split

        return use_kv_cache(load_split(path_or_repo, distributed, dtype=dtype, revision=revision), kv_cache)
    path = resolve_model_path(path_or_repo, revision)
    if path.suffix == ".gguf" or (path.is_dir() and any(path.glob("*.gguf")) and not (path / "config.json").exists()):
        from .gguf_loading import load_gguf

        return use_kv_cache(load_gguf(path, dtype=dtype), kv_cache)
    if not path.is_dir():
        raise CheckpointError(f"{path} is not a model directory")
    model, raw_config = load_model(path, dtype=dtype, lazy=lazy, exact=exact)
    processor = Processor.from_pretrained(path, model.config, load_tokenizer(path, raw_config))
    return use_kv_cache((model, processor), kv_cache)
