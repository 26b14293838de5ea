"""GGML tensor types for GGUF export: which tensor gets which type, and the encoding.

Q4_0 and Q8_0 blocks come from gguf-py's numpy reference quantizer, whose output is
byte-identical to `llama-quantize --pure`. The type rules follow llama-quantize with `--pure`:
only 2-D `*.weight` tensors are quantized (token embedding and output included), never norms,
position or patch embeddings; a row length that is not a multiple of the block size falls
back to F16; 1-D tensors stay F32.
"""

from typing import Sequence

import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, LlamaFileType
from gguf.quants import quantize as ggml_quantize

T = GGMLQuantizationType

QTYPES = {"f32": T.F32, "f16": T.F16, "q8_0": T.Q8_0, "q4_0": T.Q4_0}
FILE_TYPES = {"f32": LlamaFileType.ALL_F32, "f16": LlamaFileType.MOSTLY_F16,
              "q8_0": LlamaFileType.MOSTLY_Q8_0, "q4_0": LlamaFileType.MOSTLY_Q4_0}

# Substrings llama-quantize never quantizes (src/llama-quant.cpp, tensor_allows_quantization).
_KEEP = ("_norm.weight", ".position_embd", ".patch_embd", "ffn_gate_inp.weight")

# Elements quantized at a time: bounds the numpy temporaries for 7B-size matrices.
_CHUNK = 1 << 22


def check_qtype(qtype: str) -> str:
    qtype = qtype.lower()
    if qtype not in QTYPES:
        raise ValueError(f"unknown GGUF type {qtype!r} (choose from {', '.join(QTYPES)})")
    return qtype


def may_quantize(name: str, shape: Sequence[int]) -> bool:
    return len(shape) >= 2 and name.endswith("weight") and not any(k in name for k in _KEEP)


def tensor_type(name: str, shape: Sequence[int], qtype: str) -> GGMLQuantizationType:
    """The GGML type of one tensor (numpy `shape`) in a file of type `qtype`."""
    target = QTYPES[check_qtype(qtype)]
    if len(shape) < 2 or target == T.F32:
        return T.F32
    if target == T.F16 or not may_quantize(name, shape):
        return T.F16
    block = GGML_QUANT_SIZES[target][0]
    return target if shape[-1] % block == 0 else T.F16


def nbytes(shape: Sequence[int], ggml_type: GGMLQuantizationType) -> int:
    block, size = GGML_QUANT_SIZES[ggml_type]
    return int(np.prod(shape)) // block * size


def encode(array: np.ndarray, ggml_type: GGMLQuantizationType) -> np.ndarray:
    """float array -> the bytes GGUF stores (quantized types as uint8 rows of blocks)."""
    array = np.asarray(array, dtype=np.float32)
    if ggml_type == T.F32:
        return array
    if ggml_type == T.F16:
        return array.astype(np.float16)
    rows = array.reshape(-1, array.shape[-1])
    block, size = GGML_QUANT_SIZES[ggml_type]
    out = np.empty((rows.shape[0], rows.shape[1] // block * size), dtype=np.uint8)
    step = max(1, _CHUNK // rows.shape[1])
    for start in range(0, rows.shape[0], step):
        out[start : start + step] = ggml_quantize(rows[start : start + step], ggml_type)
    return out
