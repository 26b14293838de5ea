"""Rotary embeddings with transformers' angles: float32 fidelity on long prompts.

transformers computes the rotary angles as float32 products (`inv_freq.float() @ positions.float()`,
autocast off) even in a float64 model, so its own float64 run carries float32-rounded angles.
`mx.fast.rope` forms them differently; at a few thousand positions that made our float32 logits
about 15x further from transformers' float64 run than transformers' float32 run is. Here the
angles are the same float32 products, their cos/sin are rounded once from float64, and the
rotation is transformers' rotate-half. Anything else (half precision, traditional rope, array
offsets of batched caches) goes to `mx.fast.rope` as before.
"""

from typing import Dict, Optional, Tuple

import mlx.core as mx
import mlx.nn as nn
import numpy as np

# (dims, base, scale) -> (cos, sin) [positions, dims / 2], grown in powers of two.
_TABLES: Dict[Tuple[int, float, float], Tuple[mx.array, mx.array]] = {}
_HOST_TABLES: Dict[Tuple[int, float, float], Tuple[np.ndarray, np.ndarray]] = {}  # the same, numpy


def angle_table(dims: int, base: float, scale: float, length: int) -> Tuple[mx.array, mx.array]:
    """cos and sin of the rotary angles of positions [0, length) (at least), float32."""
    key = (dims, float(base), float(scale))
    cached = _TABLES.get(key)
    if cached is not None and cached[0].shape[0] >= length:
        return cached
    size = max(4096, 1 << (int(length) - 1).bit_length())
    exponents = np.arange(0, dims, 2).astype(np.float32) / np.float32(dims)
    inv_freq = np.float32(1.0) / (np.float64(base) ** exponents.astype(np.float64)).astype(np.float32)
    positions = np.arange(size, dtype=np.float32) * np.float32(scale)
    angles = (positions[:, None] * inv_freq[None, :]).astype(np.float64)  # float32 products, as transformers
    host = (np.cos(angles).astype(np.float32), np.sin(angles).astype(np.float32))
    table = (mx.array(host[0]), mx.array(host[1]))
    _TABLES[key], _HOST_TABLES[key] = table, host
    return table


def angle_row(rope, position: int) -> Optional[Tuple[np.ndarray, np.ndarray]]:
    """(cos, sin) of one position as float32 numpy rows [dims / 2], the values ReferenceRoPE uses
    there, for the native decode step; None for a rope it does not reproduce (traditional, scaled,
    llama3's: those stay on `mx.fast.rope`)."""
    if type(rope) is not ReferenceRoPE or rope.traditional or rope.dims % 2:
        return None
    key = (rope.dims, float(rope.base), float(rope.scale))
    host = _HOST_TABLES.get(key)
    if host is None or host[0].shape[0] <= position:
        angle_table(rope.dims, rope.base, rope.scale, position + 1)
        host = _HOST_TABLES[key]
    return host[0][position], host[1][position]


class ReferenceRoPE(nn.Module):
    """Drop-in for mlx-lm's `nn.RoPE` (same attributes, same call)."""

    def __init__(self, dims: int, traditional: bool = False, base: float = 10000, scale: float = 1.0):
        super().__init__()
        self.dims, self.traditional, self.base, self.scale = dims, traditional, base, scale

    def __call__(self, x: mx.array, offset: int = 0) -> mx.array:
        if self.traditional or x.dtype != mx.float32 or not isinstance(offset, int) or self.dims % 2:
            return mx.fast.rope(x, self.dims, traditional=self.traditional, base=self.base, scale=self.scale, offset=offset)
        length = x.shape[-2]
        cos, sin = angle_table(self.dims, self.base, self.scale, offset + length)
        cos, sin = cos[offset : offset + length], sin[offset : offset + length]
        half = self.dims // 2
        x1, x2 = x[..., :half], x[..., half : self.dims]
        parts = [x1 * cos - x2 * sin, x2 * cos + x1 * sin]
        if self.dims < x.shape[-1]:
            parts.append(x[..., self.dims :])
        return mx.concatenate(parts, axis=-1)


def use_reference_rope(language_model) -> int:
    """Swap every plain `nn.RoPE` of an mlx-lm text model for ReferenceRoPE; returns how many."""
    swapped = 0
    for layer in language_model.layers:
        attn = getattr(layer, "self_attn", None)
        rope = getattr(attn, "rope", None)
        if type(rope) is nn.RoPE:
            attn.rope = ReferenceRoPE(rope.dims, rope.traditional, rope.base, rope.scale)
            swapped += 1
    return swapped
