"""Validation where checkpoint input enters: JSON files, config fields, safetensors headers.

Every problem is one CheckpointError naming the file and field, raised before anything is
allocated from the values read (sizes are bounded here).
"""

import json
import math
import os
import struct
from pathlib import Path
from typing import Any, Dict, Iterable, Optional

from .errors import CheckpointError

MAX_JSON_BYTES = 64 << 20
SAFETENSORS_ITEMSIZE = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1,
                        "U64": 8, "U32": 4, "U16": 2, "U8": 1, "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1}
MAX_HEADER_BYTES = 100 << 20


def read_json_object(path, what: Optional[str] = None) -> Dict[str, Any]:
    """A JSON file that must hold one object: UTF-8 (no byte-order mark), parseable, an object."""
    path = Path(path)
    what = what or path.name
    try:
        if path.stat().st_size > MAX_JSON_BYTES:
            raise CheckpointError(f"{path}: {what} is larger than {MAX_JSON_BYTES >> 20} MB; not a config file")
        data = path.read_bytes()
    except OSError as e:
        raise CheckpointError(f"{path}: cannot read {what} ({e.strerror or e})") from None
    if data.startswith(b"\xef\xbb\xbf"):
        raise CheckpointError(f"{path}: {what} starts with a UTF-8 byte-order mark; save it as plain UTF-8 JSON")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise CheckpointError(f"{path}: {what} is not UTF-8 text (byte {e.start})") from None
    try:
        value = json.loads(text)
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path} is not valid JSON: {e}") from None
    except RecursionError:
        raise CheckpointError(f"{path}: {what} is nested too deeply to be a config file") from None
    if not isinstance(value, dict):
        raise CheckpointError(f"{path}: {what} must hold a JSON object, not a {type(value).__name__}")
    return value


def integer(where: str, value, low: int, high: int) -> int:
    """`value` as an int in [low, high]; CheckpointError naming `where` otherwise."""
    if isinstance(value, bool) or not isinstance(value, int) and not (isinstance(value, float) and value.is_integer()):
        raise CheckpointError(f"{where} must be an integer, got {value!r}"[:300])
    if not low <= value <= high:
        raise CheckpointError(f"{where} must be between {low} and {high}, got {value!r}")
    return int(value)


def number(where: str, value, low: float, high: float, low_open: bool = False) -> float:
    """`value` as a finite float in the range; CheckpointError naming `where` otherwise."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise CheckpointError(f"{where} must be a finite number, got {value!r}"[:300])
    if not (low < value if low_open else low <= value) or value > high:
        raise CheckpointError(f"{where} must be {'>' if low_open else '>='} {low} and <= {high}, got {value!r}")
    return float(value)


def one_of(where: str, value, allowed: Iterable) -> Any:
    allowed = list(allowed)
    if isinstance(value, (list, dict)) or value not in allowed:
        raise CheckpointError(f"{where} must be one of {', '.join(map(repr, allowed))}, got {value!r}"[:300])
    return value


def safetensors_header(path) -> Dict[str, dict]:
    """The tensor table of a safetensors file, checked against the file: the header length fits,
    every tensor's dtype and shape match its byte range, the ranges tile the data exactly."""
    path = Path(path)
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise CheckpointError(f"cannot read {path.name}: truncated safetensors file (no header)")
        (n,) = struct.unpack("<Q", head)
        if n > min(size - 8, MAX_HEADER_BYTES):
            raise CheckpointError(f"cannot read {path.name}: truncated or corrupt safetensors file (header of {n} bytes in a {size}-byte file)")
        raw = f.read(n)
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError):
        raise CheckpointError(f"cannot read {path.name}: corrupt safetensors header (not JSON)") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"cannot read {path.name}: corrupt safetensors header (not an object)")
    header.pop("__metadata__", None)
    data = size - 8 - n
    spans = []
    for name, meta in header.items():
        where = f"{path.name}: tensor {name!r}"
        if not isinstance(meta, dict) or not {"dtype", "shape", "data_offsets"} <= set(meta):
            raise CheckpointError(f"{where}: corrupt header entry")
        itemsize = SAFETENSORS_ITEMSIZE.get(meta["dtype"]) if isinstance(meta["dtype"], str) else None
        if itemsize is None:
            raise CheckpointError(f"{where}: unknown dtype {meta['dtype']!r}")
        shape, offsets = meta["shape"], meta["data_offsets"]
        if not isinstance(shape, list) or len(shape) > 8 or not all(isinstance(d, int) and not isinstance(d, bool) and 0 <= d < 2**40 for d in shape):
            raise CheckpointError(f"{where}: bad shape {shape!r}"[:300])
        if not (isinstance(offsets, list) and len(offsets) == 2 and all(isinstance(o, int) and not isinstance(o, bool) for o in offsets)):
            raise CheckpointError(f"{where}: bad data_offsets {offsets!r}"[:300])
        begin, end = offsets
        expected = math.prod(shape) * itemsize
        if not 0 <= begin <= end <= data or end - begin != expected:
            raise CheckpointError(f"{where}: data_offsets {offsets} do not fit its {meta['dtype']} shape {shape} "
                                  f"({expected} bytes) within the file's {data} data bytes (truncated or corrupt)")
        spans.append((begin, end, name))
    spans.sort()
    position = 0
    for begin, end, name in spans:
        if begin != position:
            raise CheckpointError(f"{path.name}: tensor {name!r} starts at byte {begin}, expected {position} "
                                  f"(overlapping or shifted data offsets)")
        position = end
    if position != data:
        raise CheckpointError(f"{path.name}: {data - position} bytes after the last tensor (corrupt or wrong header length)")
    return header
