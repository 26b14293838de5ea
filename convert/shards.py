"""Write lazy MLX arrays to safetensors shards one tensor at a time.

`mx.save_safetensors` needs every array of a file in memory at once. Here a shard's header is
written from the arrays' shapes and dtypes (known before evaluation), then each tensor is
evaluated, written and dropped, so peak memory is about one tensor (plus its inputs), not one
shard. The files are ordinary safetensors (`mx.load`, `safetensors`, transformers read them).
"""

import json
import struct
from pathlib import Path
from typing import Callable, Dict, Iterable, List

import mlx.core as mx
import numpy as np

MAX_SHARD_BYTES = 5 << 30  # 5 GiB, as mlx-lm and the Hub

SAFETENSORS_DTYPES = {
    mx.bool_: "BOOL", mx.uint8: "U8", mx.int8: "I8", mx.uint16: "U16", mx.int16: "I16",
    mx.uint32: "U32", mx.int32: "I32", mx.uint64: "U64", mx.int64: "I64",
    mx.float16: "F16", mx.bfloat16: "BF16", mx.float32: "F32", mx.float64: "F64",
}


def plan_shards(tensors: Dict[str, mx.array], max_bytes: int = MAX_SHARD_BYTES) -> List[List[str]]:
    """Names in sorted order, split so that no shard passes `max_bytes` (a bigger tensor gets its own)."""
    shards: List[List[str]] = []
    size = 0
    for name in sorted(tensors):
        nbytes = tensors[name].nbytes
        if not shards or size + nbytes > max_bytes:
            shards.append([])
            size = 0
        shards[-1].append(name)
        size += nbytes
    return shards


def shard_names(count: int) -> List[str]:
    if count == 1:
        return ["model.safetensors"]
    return [f"model-{i + 1:05d}-of-{count:05d}.safetensors" for i in range(count)]


def _header(tensors: Dict[str, mx.array], names: List[str], metadata: Dict[str, str]) -> bytes:
    header, offset = {"__metadata__": metadata}, 0
    for name in names:
        array = tensors[name]
        header[name] = {
            "dtype": SAFETENSORS_DTYPES[array.dtype],
            "shape": list(array.shape),
            "data_offsets": [offset, offset + array.nbytes],
        }
        offset += array.nbytes
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)  # the data starts 8-byte aligned
    return struct.pack("<Q", len(text)) + text


def _raw_bytes(array: mx.array) -> memoryview:
    flat = mx.contiguous(array.reshape(-1)).view(mx.uint8)
    return memoryview(np.asarray(flat))


def write_shards(
    out_dir,
    tensors: Dict[str, mx.array],
    max_bytes: int = MAX_SHARD_BYTES,
    metadata: Dict[str, str] = None,
    progress: Callable[[Iterable, int], Iterable] = lambda items, total: items,
) -> dict:
    """Write `tensors` (consumed: each is dropped once written) and the index; return the index.

    Arrays that share a computation (e.g. a weight and its quantization scales) should sit next
    to each other in name order so that each is computed once and kept only briefly.
    """
    out_dir = Path(out_dir)
    shards = plan_shards(tensors, max_bytes)
    files = shard_names(len(shards))
    index = {"metadata": {"total_size": sum(t.nbytes for t in tensors.values())}, "weight_map": {}}
    metadata = metadata or {"format": "mlx"}
    order = [(i, name) for i, names in enumerate(shards) for name in names]
    handle, current = None, None
    try:
        for i, name in progress(order, len(order)):
            if i != current:
                if handle is not None:
                    handle.close()
                handle, current = open(out_dir / files[i], "wb"), i
                handle.write(_header(tensors, shards[i], metadata))
            array = tensors.pop(name)
            mx.eval(array)
            handle.write(_raw_bytes(array))
            index["weight_map"][name] = files[i]
            del array
            mx.clear_cache()
    finally:
        if handle is not None:
            handle.close()
    index["weight_map"] = dict(sorted(index["weight_map"].items()))
    (out_dir / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    return index
