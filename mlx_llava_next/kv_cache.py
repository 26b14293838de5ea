"""Our KV cache: numpy-owned float16/float32 buffers that mlx-lm's attention accepts.

`HostKVCache` is a sibling of mlx-lm's `KVCache` (same interface: `update_and_fetch`, `offset`,
`state`, `trim`, `make_mask`, `nbytes`, ...; tests/test_kv_cache.py pins the behaviour of mlx-lm's
that it mirrors). Its buffers [batch, kv heads, capacity, head dim], grown in steps of 256 rows
like mlx-lm's, are MLX arrays of its own written through zero-copy numpy views, so the native
decode step (fastpath.FastDecodeBlock, native/kv.c) ropes, writes and attends in place with no
MLX evaluation, a float16 cache halves what a decode step reads at depth, and `state` (which
mlx-lm's prompt loop evaluates after every chunk) is a slice of them, not a copy. Prompt chunks go
through MLX: `update_and_fetch` writes the chunk (rounded to float16 by F16C for a float16 cache)
and hands back the whole cache as MLX arrays of the chunk's dtype, which mlx-lm's attention (or the
native causal kernel) then reads.

Which cache a model gets (`Model.make_cache`): `kv_cache="float16"` or `"float32"` asks for ours;
by default quantized models on the CPU fast path get float16, everything else mlx-lm's KVCache.
"""

import copy
from typing import Optional

import mlx.core as mx
import numpy as np

CHOICES = ("auto", "float16", "float32")
_NUMPY = {"float16": np.float16, "float32": np.float32}


def _native():
    from .fastpath import native

    return native


def check_choice(kv_cache: Optional[str]) -> Optional[str]:
    """None/"auto" -> None (the default policy); "float16"/"float32" as given; else a PromptError."""
    from .errors import PromptError

    if kv_cache is None or kv_cache == "auto":
        return None
    if kv_cache not in _NUMPY:
        raise PromptError(f"kv_cache must be one of {', '.join(CHOICES)}, got {kv_cache!r}")
    return kv_cache


class HostKVCache:
    """A per-layer KV cache in numpy buffers (float16 or float32), grown `step` rows at a time."""

    step = 256

    def __init__(self, dtype: str = "float16"):
        if dtype not in _NUMPY:
            raise ValueError(f"HostKVCache dtype must be float16 or float32, got {dtype!r}")
        self.dtype = dtype
        self.keys: Optional[np.ndarray] = None  # [batch, kv heads, capacity, head dim]: views of _buffers
        self.values: Optional[np.ndarray] = None
        self._buffers = None  # the MLX arrays (keys, values) that own the memory
        self.offset = 0

    # -- room -----------------------------------------------------------------------------
    def reserve(self, n_kv_heads: int, head_dim: int, v_head_dim: int, n: int, batch: int = 1) -> None:
        """Make room for n more rows (a new buffer of whole steps, the used rows copied over)."""
        if self.keys is not None and self.keys.shape[0] != batch:
            raise ValueError(f"this cache holds a batch of {self.keys.shape[0]}, not {batch}")
        need = self.offset + n
        if self.keys is not None and need <= self.keys.shape[2]:
            return
        rows = (need + self.step - 1) // self.step * self.step
        dt = getattr(mx, self.dtype)
        buffers = mx.zeros((batch, n_kv_heads, rows, head_dim), dt), mx.zeros((batch, n_kv_heads, rows, v_head_dim), dt)
        mx.eval(*buffers)
        keys, values = (np.asarray(b) for b in buffers)  # zero-copy and writable (evaluated CPU arrays)
        if self.keys is not None:
            keys[:, :, : self.offset] = self.keys[:, :, : self.offset]
            values[:, :, : self.offset] = self.values[:, :, : self.offset]
        self.keys, self.values, self._buffers = keys, values, buffers

    def _store(self, buffer: np.ndarray, rows: mx.array, start: int) -> None:
        x = np.ascontiguousarray(np.asarray(rows if rows.dtype == mx.float32 else rows.astype(mx.float32)))
        native = _native()
        if native is not None and buffer.shape[0] == 1:
            native.kv_store(x, buffer, start)  # F16C rounding; numpy's float16 cast is scalar
        else:
            buffer[:, :, start : start + x.shape[2]] = x

    def _fetch(self, buffer: np.ndarray, dtype) -> mx.array:
        """Rows [0, offset) as an MLX array of `dtype` (float32 read through F16C for a float16 cache)."""
        used = buffer[:, :, : self.offset]
        if dtype == mx.float32 and self.dtype == "float16" and _native() is not None and buffer.shape[0] == 1:
            from .fastpath import output, result

            out, array = output(used.shape)
            _native().kv_load(buffer, out)
            return result(out, array)
        array = mx.array(used)
        return array if array.dtype == dtype else array.astype(dtype)

    # -- mlx-lm's KVCache interface -------------------------------------------------------
    def update_and_fetch(self, keys: mx.array, values: mx.array):
        """Append keys/values [batch, kv heads, n, head dim]; all cached rows back, in the input dtype."""
        n = keys.shape[2]
        self.reserve(keys.shape[1], keys.shape[3], values.shape[3], n, keys.shape[0])
        prev = self.offset
        mx.eval(keys, values)
        self._store(self.keys, keys, prev)
        self._store(self.values, values, prev)
        self.offset += n
        return self._fetch(self.keys, keys.dtype), self._fetch(self.values, values.dtype)

    def keys_and_values(self):
        return self._fetch(self.keys, mx.float32), self._fetch(self.values, mx.float32)

    def size(self) -> int:
        return self.offset

    def empty(self) -> bool:
        return self.keys is None

    @property
    def nbytes(self) -> int:
        return 0 if self.keys is None else self.keys.nbytes + self.values.nbytes

    @property
    def state(self):
        """(keys, values, offset) as mlx-lm's KVCache.state: the used rows, as slices of the cache's
        own MLX buffers (no copy: mlx-lm evaluates every cache's state after each prompt chunk, and
        copies of a 7B's cache at 3,000 tokens were 0.39 GB at the peak). Rows [0, offset) are never
        written again unless the cache is trimmed; `to_kv_cache` (session files) and deepcopy (the
        server's prompt cache) copy."""
        if self.keys is None:
            return None, None, 0
        keys, values = self._buffers
        return keys[:, :, : self.offset], values[:, :, : self.offset], self.offset

    @state.setter
    def state(self, v) -> None:
        keys, values, offset = v
        if keys is None:
            self.keys = self.values = self._buffers = None
            self.offset = 0
            return
        self.keys = self.values = self._buffers = None
        self.offset = 0
        self.reserve(keys.shape[1], keys.shape[3], values.shape[3], int(offset), keys.shape[0])
        self._store(self.keys, keys[:, :, :offset], 0)
        self._store(self.values, values[:, :, :offset], 0)
        self.offset = int(offset)

    def is_trimmable(self) -> bool:
        return True

    def trim(self, n: int) -> int:
        n = min(self.offset, n)
        self.offset -= n
        return n

    def make_mask(self, *args, **kwargs):
        from mlx_lm.models.cache import create_attention_mask

        return create_attention_mask(*args, offset=self.offset, **kwargs)

    def to_quantized(self, group_size: int = 64, bits: int = 4):
        return self.to_kv_cache().to_quantized(group_size=group_size, bits=bits)

    # -- conversions and copies -----------------------------------------------------------
    def to_kv_cache(self):
        """An mlx-lm KVCache holding the same rows (what prompt-cache files store)."""
        from mlx_lm.models.cache import KVCache

        c = KVCache()
        if self.keys is not None and self.offset:
            c.keys, c.values = mx.array(self.keys[:, :, : self.offset]), mx.array(self.values[:, :, : self.offset])
            c.offset = self.offset
        return c

    @classmethod
    def from_kv_cache(cls, c, dtype: str) -> "HostKVCache":
        ours = cls(dtype)
        if c.keys is not None and c.offset:
            ours.state = (c.keys, c.values, c.offset)
        return ours

    def __deepcopy__(self, memo) -> "HostKVCache":
        """A copy of the used rows (mlx-lm's LRUPromptCache deep-copies what it hands out)."""
        other = copy.copy(self)
        other.keys = other.values = other._buffers = None
        other.offset = 0
        if self.keys is not None:
            other.reserve(self.keys.shape[1], self.keys.shape[3], self.values.shape[3], self.offset, self.keys.shape[0])
            other.keys[:, :, : self.offset] = self.keys[:, :, : self.offset]
            other.values[:, :, : self.offset] = self.values[:, :, : self.offset]
            other.offset = self.offset
        return other

    def __repr__(self) -> str:
        return f"HostKVCache({self.dtype}, offset={self.offset}, nbytes={self.nbytes})"


def use_kv_cache(loaded, kv_cache: Optional[str]):
    """(model, processor) with the model's KV-cache choice set (None: the default policy)."""
    if kv_cache is not None:
        loaded[0].kv_cache = kv_cache
    return loaded


def wants_host_cache(model) -> Optional[str]:
    """The dtype of our cache for `model` (None: mlx-lm's KVCache): the model's `kv_cache` choice,
    else float16 where a block runs the native decode step (a quantized model on the CPU fast path).
    A pipelined language model (distributed.py) keeps mlx-lm's: its last rank ties the cache's keys
    to the send (`cache[-1].keys = mx.depends(...)`), which needs MLX arrays there."""
    inner = getattr(getattr(model, "language_model", None), "model", None)
    if getattr(inner, "pipeline_size", 1) > 1:
        return None
    choice = getattr(model, "kv_cache", None)
    if choice is not None:
        return choice
    from . import fastpath

    layers = getattr(model, "layers", [])
    return "float16" if any(isinstance(b, fastpath.FastDecodeBlock) for b in layers) else None


def adopt(model, caches):
    """mlx-lm KVCaches (a fresh make_prompt_cache list, a loaded prompt-cache file) as ours where the
    model's policy wants ours; other caches (rotating, batch) unchanged."""
    from mlx_lm.models.cache import KVCache

    dtype = wants_host_cache(model)
    if dtype is None:
        return caches
    return [HostKVCache.from_kv_cache(c, dtype) if type(c) is KVCache else c for c in caches]


def for_saving(caches):
    """Our caches as mlx-lm KVCaches, which `save_prompt_cache`/`load_prompt_cache` know by name."""
    return [c.to_kv_cache() if isinstance(c, HostKVCache) else c for c in caches]
