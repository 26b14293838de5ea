"""A bounded GGUF header reader: every count, length and offset is checked against the file
size before anything is sized by it.

`mx.load` (C++) and gguf-py's `GGUFReader` trust the header: a truncated file or a header that
claims 2**60 tensors or a 1 TB string can make them loop, read out of range or allocate without
limit. `read_header` parses the header itself (numbers little-endian, GGUF v2/v3) and raises
`CheckpointError` on anything that does not fit in the file, so callers hand `mx.load` only
files whose tensor data lies inside them.
"""

import math
import mmap
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Tuple

import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, GGUFValueType

from .errors import CheckpointError

MAGIC = b"GGUF"
MAX_DIMS = 4  # GGML_MAX_DIMS
MAX_NAME = 256  # ggml allows 64; leave room, but never megabytes
MAX_ARRAY_DEPTH = 2
MAX_ALIGNMENT = 1 << 16

_SCALARS = {
    GGUFValueType.UINT8: "<u1", GGUFValueType.INT8: "<i1", GGUFValueType.UINT16: "<u2",
    GGUFValueType.INT16: "<i2", GGUFValueType.UINT32: "<u4", GGUFValueType.INT32: "<i4",
    GGUFValueType.FLOAT32: "<f4", GGUFValueType.BOOL: "<u1", GGUFValueType.UINT64: "<u8",
    GGUFValueType.INT64: "<i8", GGUFValueType.FLOAT64: "<f8",
}
_STRUCT = {t: struct.Struct("<" + c) for t, c in zip(_SCALARS, "BbHhIifBQqd")}
_U32, _U64 = struct.Struct("<I"), struct.Struct("<Q")


# The fewest bytes one value of a type occupies (a string is at least its 8-byte length).
_MIN_SIZE = {**{t: np.dtype(d).itemsize for t, d in _SCALARS.items()},
             GGUFValueType.STRING: 8, GGUFValueType.ARRAY: 12}


@dataclass(frozen=True)
class TensorInfo:
    name: str
    shape: Tuple[int, ...]  # numpy order: GGUF's ne reversed, in elements (not bytes)
    ggml_type: GGMLQuantizationType
    offset: int  # absolute position in the file
    nbytes: int


@dataclass
class GGUFHeader:
    path: Path
    version: int
    metadata: Dict[str, Any]  # numbers as Python scalars, numeric arrays as numpy, strings as str
    tensors: Dict[str, TensorInfo]
    alignment: int = 32
    size: int = 0  # file size in bytes

    @property
    def architecture(self) -> str:
        return str(self.metadata.get("general.architecture", ""))

    def error(self, message: str) -> CheckpointError:
        return CheckpointError(f"{self.path.name}: {message}")


class _Cursor:
    """Reads from a byte buffer, refusing to step past its end."""

    def __init__(self, buffer, name: str):
        self.buffer, self.name, self.pos, self.size = buffer, name, 0, len(buffer)

    @property
    def remaining(self) -> int:
        return self.size - self.pos

    def fail(self, message: str) -> CheckpointError:
        return CheckpointError(f"{self.name}: truncated or corrupt GGUF file: {message} (at byte {self.pos} of {self.size})")

    def take(self, n: int, what: str) -> bytes:
        if n > self.remaining:
            raise self.fail(f"{what} needs {n} bytes, only {self.remaining} left")
        data = self.buffer[self.pos : self.pos + n]
        self.pos += n
        return data

    def number(self, vtype: GGUFValueType, what: str):
        fmt = _STRUCT[vtype]
        value = fmt.unpack(self.take(fmt.size, what))[0]
        return bool(value) if vtype == GGUFValueType.BOOL else value

    def u32(self, what: str) -> int:
        return _U32.unpack(self.take(4, what))[0]

    def u64(self, what: str) -> int:
        return _U64.unpack(self.take(8, what))[0]

    def string(self, what: str, limit: int = None) -> str:
        n = self.u64(f"length of {what}")
        if n > self.remaining or (limit is not None and n > limit):
            raise self.fail(f"{what} claims {n} bytes")
        try:
            return self.take(n, what).decode("utf-8")
        except UnicodeDecodeError:
            raise self.fail(f"{what} is not valid UTF-8") from None

    def value_type(self, what: str) -> GGUFValueType:
        raw = self.u32(f"type of {what}")
        try:
            return GGUFValueType(raw)
        except ValueError:
            raise self.fail(f"{what} has unknown value type {raw}") from None

    def value(self, vtype: GGUFValueType, what: str, depth: int = 0):
        if vtype == GGUFValueType.STRING:
            return self.string(what)
        if vtype != GGUFValueType.ARRAY:
            return self.number(vtype, what)
        if depth >= MAX_ARRAY_DEPTH:
            raise self.fail(f"{what}: arrays nested deeper than {MAX_ARRAY_DEPTH}")
        item_type = self.value_type(f"items of {what}")
        count = self.u64(f"length of {what}")
        if count * _MIN_SIZE[item_type] > self.remaining:
            raise self.fail(f"{what} claims {count} items, more than the file holds")
        if item_type in _SCALARS:
            dtype = np.dtype(_SCALARS[item_type])
            array = np.frombuffer(self.take(count * dtype.itemsize, what), dtype=dtype)
            return array.astype(bool) if item_type == GGUFValueType.BOOL else array.copy()
        if item_type == GGUFValueType.STRING:
            return self.strings(count, what)
        return [self.value(item_type, what, depth + 1) for _ in range(count)]

    def strings(self, count: int, what: str) -> List[str]:
        """`count` strings (a vocabulary): the same checks as `string`, in one tight loop."""
        buffer, pos, end, out = self.buffer, self.pos, self.size, []
        try:
            for _ in range(count):
                if pos + 8 > end:
                    raise ValueError("truncated")
                n = _U64.unpack_from(buffer, pos)[0]
                if n > end - pos - 8:
                    raise ValueError(f"a string claims {n} bytes")
                out.append(str(buffer[pos + 8 : pos + 8 + n], "utf-8"))
                pos += 8 + n
        except (ValueError, UnicodeDecodeError) as e:
            self.pos = pos
            raise self.fail(f"{what}: item {len(out)}: {e}") from None
        self.pos = pos
        return out


def _open(path: Path):
    try:
        with open(path, "rb") as f:
            size = f.seek(0, 2)
            if size == 0:
                raise CheckpointError(f"{path.name}: file is empty (0 bytes)")
            return mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
    except OSError as e:
        raise CheckpointError(f"cannot read {path}: {e}") from None


def read_header(path) -> GGUFHeader:
    """Parse and validate a GGUF file's metadata and tensor table (tensor data is not read)."""
    path = Path(path)
    buffer = _open(path)
    try:
        return _parse(buffer, path)
    finally:
        buffer.close()


def _parse(buffer, path: Path) -> GGUFHeader:
    cur = _Cursor(buffer, path.name)
    if cur.remaining < 4 or cur.take(4, "magic") != MAGIC:
        raise CheckpointError(f"{path.name}: not a GGUF file (bad magic)")
    version = cur.u32("version")
    if version not in (2, 3):
        hint = " (big-endian files are not supported)" if version >= 1 << 16 else ""
        raise CheckpointError(f"{path.name}: unsupported GGUF version {version}{hint}")
    n_tensors = cur.u64("tensor count")
    n_kv = cur.u64("metadata count")
    # Each entry takes at least this many bytes, so the counts are bounded by the file size.
    if n_kv * 13 > cur.remaining or n_tensors * 32 > cur.remaining:
        raise cur.fail(f"header claims {n_kv} metadata entries and {n_tensors} tensors, more than the file holds")

    metadata: Dict[str, Any] = {}
    for _ in range(n_kv):
        key = cur.string("metadata key", limit=MAX_NAME * 4)
        vtype = cur.value_type(key)
        if key in metadata:
            raise cur.fail(f"duplicate metadata key {key!r}")
        metadata[key] = cur.value(vtype, key)

    alignment = metadata.get("general.alignment", 32)
    if not isinstance(alignment, int) or not 0 < alignment <= MAX_ALIGNMENT or alignment & (alignment - 1):
        raise CheckpointError(f"{path.name}: invalid general.alignment {alignment!r}")

    entries = []
    for _ in range(n_tensors):
        name = cur.string("tensor name", limit=MAX_NAME)
        n_dims = cur.u32(f"dimension count of {name}")
        if not 1 <= n_dims <= MAX_DIMS:
            raise cur.fail(f"tensor {name!r} has {n_dims} dimensions")
        ne = [cur.u64(f"dimensions of {name}") for _ in range(n_dims)]
        raw_type = cur.u32(f"type of {name}")
        offset = cur.u64(f"offset of {name}")
        entries.append((name, ne, raw_type, offset))

    data_start = (cur.pos + alignment - 1) // alignment * alignment
    tensors: Dict[str, TensorInfo] = {}
    for name, ne, raw_type, offset in entries:
        if name in tensors:
            raise CheckpointError(f"{path.name}: duplicate tensor {name!r}")
        try:
            ggml_type = GGMLQuantizationType(raw_type)
            block, type_size = GGML_QUANT_SIZES[ggml_type]
        except (ValueError, KeyError):
            raise CheckpointError(f"{path.name}: tensor {name!r} has unknown GGML type {raw_type}") from None
        if block > 1 and len(ne) < 2:
            raise CheckpointError(f"{path.name}: tensor {name!r} is 1-D but has the block-quantized type "
                                  f"{ggml_type.name} (only matrices are quantized)")
        if any(d == 0 for d in ne):
            raise CheckpointError(f"{path.name}: tensor {name!r} has an empty dimension {ne}")
        if ne[0] % block:
            raise CheckpointError(f"{path.name}: tensor {name!r}: row length {ne[0]} is not a multiple of "
                                  f"the {ggml_type.name} block size {block}")
        nbytes = math.prod(ne) // block * type_size  # Python ints: no overflow
        start = data_start + offset
        if offset % alignment or start + nbytes > cur.size:
            raise CheckpointError(
                f"{path.name}: truncated or corrupt GGUF file: data of tensor {name!r} "
                f"({nbytes} bytes at offset {offset}) lies outside the file ({cur.size} bytes)"
            )
        tensors[name] = TensorInfo(name, tuple(int(d) for d in reversed(ne)), ggml_type, start, nbytes)
    spans = sorted((t.offset, t.offset + t.nbytes, t.name) for t in tensors.values())
    for (_, end, first), (start, _, second) in zip(spans, spans[1:]):
        if start < end:
            raise CheckpointError(f"{path.name}: corrupt GGUF file: data of tensors {first!r} and {second!r} overlap")
    return GGUFHeader(path, version, metadata, tensors, alignment, cur.size)


def check_tiling(h: "GGUFHeader") -> None:
    """CheckpointError unless the tensors' data tile the file: writers pad each tensor to the
    alignment and no more, so a larger gap means a wrong type or shape in the header."""
    spans = sorted((t.offset, t.offset + t.nbytes, t.name) for t in h.tensors.values())
    for (_, end, first), (start, _, _) in zip(spans, spans[1:]):
        if start >= end + h.alignment:
            raise h.error(f"corrupt GGUF file: {start - end} unused bytes after tensor {first!r} (a wrong type or shape?)")
    if spans and h.size >= spans[-1][1] + h.alignment:
        raise h.error(f"corrupt GGUF file: {h.size - spans[-1][1]} bytes after the last tensor {spans[-1][2]!r} "
                      f"(a wrong type or shape?)")

