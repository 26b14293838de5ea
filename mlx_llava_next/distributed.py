"""LLaVA-NeXT over several processes (mlx.launch): split loading with mlx-lm's shard()/pipeline() and rank-0 broadcasts.

Under `mlx.launch`, `load(path, "tensor")` splits every decoder layer across the ranks with
mlx-lm's own `Model.shard(group)` (llama and qwen2 backbones); `load(path, "pipeline")` gives
each rank a run of layers with `model.model.pipeline(group)` (qwen2 only). The weights are
loaded lazily, split, and only then evaluated, so a rank reads just the tensors (or slices of
tensors) it keeps: its peak is about the language model / N, plus what every rank holds whole
(embeddings, head, final norm, the vision tower and projector). The vision tower runs on every
rank (README, "Several machines"): no rank waits for another's features.

Every rank must make the same calls with the same inputs. `share(obj)` sends rank 0's inputs
(JSON values and numpy arrays) to the others with one `all_sum` of a zero buffer.
"""

import hashlib
import json
import struct
from pathlib import Path
from typing import Any, Optional

import mlx.core as mx
import numpy as np
from mlx.utils import tree_flatten

from .errors import LlavaNextError, UnsupportedModelError

MODES = ("tensor", "pipeline")

# Files whose contents must be equal on every rank (the ranks tokenize and preprocess themselves).
SHARED_FILES = ("config.json", "tokenizer.json", "tokenizer.model", "tokenizer_config.json",
                "preprocessor_config.json", "processor_config.json", "chat_template.json", "chat_template.jinja",
                "special_tokens_map.json", "generation_config.json")


class DistributedError(LlavaNextError):
    """The ranks cannot work together (no group, a lost rank, different files or results)."""


# -- the group ----------------------------------------------------------------------------


def check_mode(mode: str) -> str:
    if mode not in MODES:
        raise DistributedError(f"distributed must be one of {', '.join(MODES)}, got {mode!r}")
    return mode


def group(mode: str = "tensor"):
    """The launch's group; an error when this process is alone (not started by mlx.launch)."""
    check_mode(mode)
    world = mx.distributed.init()
    if world.size() < 2:
        raise DistributedError(
            f"--distributed {mode} needs two or more processes, but this one is alone: start every rank with "
            f"mlx.launch, e.g. `mlx.launch --backend ring -n 2 --python $(which python) cli.py ...` "
            f"(or --hostfile hosts.json for several machines)"
        )
    return world


def lost_connection(error: BaseException) -> Optional[str]:
    """A one-line message when `error` is a backend's 'peer gone' error, else None."""
    text = " ".join(str(error).split())
    if isinstance(error, RuntimeError) and text.startswith(("[ring]", "[jaccl]", "[mpi]", "[nccl]")):
        return f"lost the connection to another rank ({text}); every rank stops"
    return None


# -- rank 0 -> every rank ---------------------------------------------------------------------


def encode(obj: Any) -> bytes:
    """JSON values with numpy arrays anywhere inside -> bytes (never a pickle)."""
    arrays = []

    def walk(x):
        if isinstance(x, np.ndarray):
            arrays.append(np.ascontiguousarray(x))
            return {"__array__": len(arrays) - 1, "dtype": x.dtype.str, "shape": list(x.shape)}
        if isinstance(x, dict):
            return {str(k): walk(v) for k, v in x.items()}
        if isinstance(x, (list, tuple)):
            return [walk(v) for v in x]
        return x

    header = json.dumps(walk(obj)).encode()
    return struct.pack("<Q", len(header)) + header + b"".join(a.tobytes() for a in arrays)


def decode(data: bytes) -> Any:
    (n,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8 : 8 + n])
    offset = 8 + n

    def walk(x):
        nonlocal offset
        if isinstance(x, dict) and "__array__" in x:
            dtype = np.dtype(x["dtype"])
            size = int(np.prod(x["shape"], dtype=np.int64)) * dtype.itemsize
            a = np.frombuffer(data, dtype=dtype, count=size // dtype.itemsize, offset=offset).reshape(x["shape"])
            offset += size
            return a
        if isinstance(x, dict):
            return {k: walk(v) for k, v in x.items()}
        if isinstance(x, list):
            return [walk(v) for v in x]
        return x

    return walk(header)


def quiesce() -> None:
    """Wait for every stream: mlx-lm computes the next token ahead on its own stream, and a
    collective of ours overtaking the model's would pair with another rank's different one."""
    from mlx_lm.generate import generation_stream

    mx.synchronize(generation_stream)
    mx.synchronize()


def broadcast_bytes(data: Optional[bytes], world) -> bytes:
    """Rank 0's bytes on every rank: an all_sum where the other ranks add zeros."""
    quiesce()
    mine = data if world.rank() == 0 else b""
    n = mx.distributed.all_sum(mx.array([len(mine)], dtype=mx.int32), group=world, stream=mx.cpu)
    size = int(n.item())
    buffer = np.frombuffer(mine, dtype=np.uint8) if world.rank() == 0 else np.zeros(size, dtype=np.uint8)
    if size == 0:
        return b""
    out = mx.distributed.all_sum(mx.array(buffer), group=world, stream=mx.cpu)
    return bytes(np.asarray(out))


def share(obj: Any = None, world=None) -> Any:
    """Rank 0's `obj` (JSON values and numpy arrays; tuples come back as lists) on every rank."""
    world = world or mx.distributed.init()
    if world.size() == 1:
        return obj
    return decode(broadcast_bytes(encode(obj) if world.rank() == 0 else None, world))


def digest(values) -> str:
    return hashlib.sha256(json.dumps(values).encode()).hexdigest()


def environment_digest(model_dir: Path) -> str:
    """What must agree between ranks: the files each rank tokenizes and preprocesses with, and the
    versions of the code that computes (checked before any weight is read)."""
    import mlx_lm

    from . import __version__

    h = hashlib.sha256(f"mlx {mx.__version__} mlx-lm {mlx_lm.__version__} mlx-llava-next {__version__}".encode())
    for name in SHARED_FILES:
        path = Path(model_dir) / name
        if path.exists():
            h.update(name.encode() + b"\0" + path.read_bytes())
    return h.hexdigest()


# -- what can be split --------------------------------------------------------------------------


def _has_pipeline(arch: str) -> bool:
    from .model import text_model_module

    module = text_model_module(arch)
    return any(isinstance(v, type) and hasattr(v, "pipeline") for v in vars(module).values())


def _group_sizes(raw_config: dict):
    quant = raw_config.get("quantization")
    if not quant:
        return []
    sizes = {quant.get("group_size", 64)}
    sizes.update(v["group_size"] for v in quant.values() if isinstance(v, dict) and "group_size" in v)
    return sorted(sizes)


def check_splittable(config, raw_config: dict, mode: str, n: int) -> None:
    """Raise a clear error when the text model cannot be split `n` ways in `mode` (no weight read)."""
    check_mode(mode)
    text = config.text_config
    arch = config.text_arch
    if mode == "pipeline":
        if not _has_pipeline(arch):
            raise UnsupportedModelError(
                f"pipeline parallelism needs a backbone with mlx-lm's pipeline() (qwen2); this checkpoint's "
                f"{text['model_type']} backbone runs as mlx-lm's {arch}, which has none: use --distributed tensor"
            )
        if text["num_hidden_layers"] < n:
            raise UnsupportedModelError(
                f"the text model has {text['num_hidden_layers']} layers, fewer than the {n} pipeline ranks"
            )
        return
    heads, kv_heads = text["num_attention_heads"], text["num_key_value_heads"]
    for name, value in (("attention heads", heads), ("key/value heads", kv_heads),
                        ("MLP width (intermediate_size)", text["intermediate_size"])):
        if value % n:
            raise UnsupportedModelError(
                f"tensor parallelism splits the {name} across the ranks, but {value} is not divisible by {n} ranks; "
                f"use a rank count that divides it" + (" or --distributed pipeline" if _has_pipeline(arch) else "")
            )
    inner = {"attention output": heads * text["head_dim"], "MLP down projection": text["intermediate_size"]}
    for group_size in _group_sizes(raw_config):
        for name, width in inner.items():
            if (width // group_size) % n:
                raise UnsupportedModelError(
                    f"the quantized {name} has {width // group_size} groups of {group_size} per row, which {n} ranks "
                    f"cannot split evenly; quantize with a smaller group size or use another rank count"
                )


# -- loading ----------------------------------------------------------------------------------


def check_source(path: Path) -> None:
    """GGUF input cannot be split: a clear error before anything is read."""
    path = Path(path)
    if path.suffix == ".gguf" or (path.is_dir() and any(path.glob("*.gguf")) and not (path / "config.json").exists()):
        raise UnsupportedModelError(
            f"{path}: GGUF checkpoints cannot be split across ranks; run the llava-hf or converted MLX "
            f"directory instead (cli.py convert makes one, 4/8-bit included)"
        )


def load(path_or_repo, mode: str = "tensor", dtype: Optional[mx.Dtype] = None, revision: Optional[str] = None, world=None):
    """(model, processor) of this rank: the language model split `mode` ways over the launch's ranks.

    Every check (a group of two or more, not GGUF, splittable shapes) runs before any weight is read."""
    from . import fastpath
    from .config import LlavaNextConfig
    from .loading import (apply_weights, cast, default_dtype, load_tokenizer, quantize_like, read_config,
                          read_weights, resolve_model_path, to_model_names)
    from .model import Model
    from .processing import Processor

    check_mode(mode)
    world = world or group(mode)
    path = resolve_model_path(path_or_repo, revision)
    check_source(path)
    raw_config = read_config(path)
    config = LlavaNextConfig.from_dict(raw_config)
    check_splittable(config, raw_config, mode, world.size())

    model = Model(config)
    weights = to_model_names(model, raw_config, read_weights(path))  # lazy: nothing read yet
    quantize_like(model, raw_config, weights)
    apply_weights(model, cast(weights, dtype or default_dtype(weights)), str(path))
    del weights  # the full tensors must not outlive the split
    if mode == "tensor":
        model.language_model.shard(world)
    else:
        model.language_model.model.pipeline(world)  # drops the layers this rank does not run
    # Read only what this rank keeps, one tensor at a time: evaluated together, the full tensors
    # the slices come from could all be alive at once.
    for _, value in tree_flatten(model.parameters()):
        mx.eval(value)
    model.eval()
    # After the split: the sharded layers keep MLX's kernels, whose activations are float32, and the
    # rest does the same (exact) so a split model computes what one process does with --exact.
    fastpath.auto_enable(model, exact=True)
    mx.eval(mx.distributed.all_sum(mx.array(1.0), group=world, stream=mx.cpu))  # every rank loaded
    processor = Processor.from_pretrained(path, model.config, load_tokenizer(path, raw_config))
    return model, processor
