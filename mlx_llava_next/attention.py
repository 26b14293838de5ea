"""Prompt attention of float32 CPU models with a softmax as accurate as transformers'.

MLX's CPU `exp` is an approximation (up to 1.8e-6 relative, ~15 float32 ulp, on [-30, 0]; NumPy's
and torch's are within 1-2 ulp). In the attention of a few-thousand-token prompt that alone made our
float32 logits 1.8-2.5x further from a float64 transformers run than transformers' own float32 run
(after rope.py's fix). Here the scores stay float32 products (as in transformers), the scale,
the mask and the softmax are applied in float64 (the C library's exp) and rounded once to float32,
and the weights times the values is a float32 product, a block of queries at a time (the float64
scores of a block stay under `BLOCK_BYTES`). Everything else (one query: a decode step; half
precision; other devices; attention sinks; quantized caches) goes to mlx-lm's function unchanged.

Where fastpath's native prompt kernel runs (x86 Linux with a BLAS, one prompt, mask="causal") it
takes the chunk instead: BLAS products and a Cephes exp (about 1 ulp), as accurate and faster
than MLX's own path, where the float64 softmax costs about twice MLX's attention.

`install()` points mlx-lm's `base.scaled_dot_product_attention` (which fastpath's hook falls
back to) and the llama/qwen2 modules' imported name at this function; `load()` calls it.
"""

import importlib

import mlx.core as mx
import numpy as np

MODULES = ("mlx_lm.models.llama", "mlx_lm.models.qwen2")
BLOCK_BYTES = 1 << 27  # float64 scores of one block of queries: 128 MiB
_original = None  # mlx-lm's own function
# What a False entry of a boolean mask (or the causal mask) leaves of a score: float32's lowest, as
# MLX fills it, so a query that sees no key at all (a left-padded row) averages the values as MLX
# does instead of giving NaN (which its key and value rows would then carry into later layers).
_MASKED = float(mx.finfo(mx.float32).min)


def _applies(queries, keys, values, cache, mask, sinks) -> bool:
    return (
        sinks is None
        and not hasattr(cache, "bits")  # a quantized KV cache: mlx-lm's quantized kernel
        and queries.ndim == keys.ndim == values.ndim == 4
        and queries.shape[2] > 1
        and queries.shape[1] % keys.shape[1] == 0
        and keys.shape[2] > 0
        and queries.dtype == keys.dtype == values.dtype == mx.float32
        and (mask is None or isinstance(mask, mx.array) or (isinstance(mask, str) and mask == "causal"))
        and mx.default_device() == mx.cpu
    )


def _group_mask(mask: mx.array, heads: int, kv_heads: int) -> mx.array:
    """A mask broadcastable to [B, heads, L, S] -> broadcastable to [B, kv_heads, group, L, S]."""
    if mask.ndim == 4:
        if mask.shape[1] == heads and heads > 1:
            return mask.reshape(mask.shape[0], kv_heads, heads // kv_heads, *mask.shape[2:])
        return mask[:, :, None]
    return mask


def _native_causal(queries, keys, values, scale: float, mask):
    """fastpath's native prompt attention where it runs, else None."""
    from . import fastpath

    if (
        fastpath.native is None
        or not isinstance(mask, str)
        or queries.shape[0] != 1
        or queries.shape[2] > keys.shape[2]
        or not fastpath.sgemm_available()
        or not fastpath.evaluated(queries, keys, values)
    ):
        return None
    q = np.ascontiguousarray(np.asarray(queries))
    k, v = np.asarray(keys), np.asarray(values)  # views of the cache buffer
    if k.strides[-1] != 4 or v.strides[-1] != 4:
        return None
    out, array = fastpath.output(q.shape)
    fastpath.native.attend_causal(q, k, v, out, float(scale))
    return fastpath.result(out, array)


def scaled_dot_product_attention(queries, keys, values, cache, scale: float, mask=None, sinks=None):
    """mlx-lm's `scaled_dot_product_attention`; float32 prompt chunks on the CPU with an accurate softmax."""
    if not _applies(queries, keys, values, cache, mask, sinks):
        return _original(queries, keys, values, cache, scale=scale, mask=mask, sinks=sinks)
    out = _native_causal(queries, keys, values, scale, mask)
    if out is not None:
        return out
    B, H, L, D = queries.shape
    Hkv, S = keys.shape[1], keys.shape[2]
    q = queries.reshape(B, Hkv, H // Hkv, L, D)
    kt, v = keys[:, :, None].swapaxes(-1, -2), values[:, :, None]
    if isinstance(mask, mx.array):
        mask = _group_mask(mask, H, Hkv)
    block = max(1, min(L, BLOCK_BYTES // (8 * B * H * S)))
    outputs = []
    for i0 in range(0, L, block):
        rows = min(block, L - i0)
        scores = (q[..., i0 : i0 + rows, :] @ kt).astype(mx.float64) * scale
        if isinstance(mask, str):  # query i sees keys [0, S - L + i], MLX's mask="causal"
            seen = mx.arange(S - L + i0, S - L + i0 + rows)[:, None] >= mx.arange(S)[None]
            scores = mx.where(seen, scores, _MASKED)
        elif mask is not None:
            part = mask[..., i0 : i0 + rows, :] if mask.ndim >= 2 and mask.shape[-2] == L else mask
            scores = mx.where(part, scores, _MASKED) if part.dtype == mx.bool_ else scores + part.astype(mx.float64)
        weights = mx.exp(scores - scores.max(axis=-1, keepdims=True))
        weights = (weights / weights.sum(axis=-1, keepdims=True)).astype(mx.float32)
        outputs.append(weights @ v)
    out = outputs[0] if len(outputs) == 1 else mx.concatenate(outputs, axis=-2)
    return out.reshape(B, H, L, D)


def install() -> None:
    """Route mlx-lm's llama/qwen2 attention (and its base function) here; idempotent."""
    global _original
    from mlx_lm.models import base

    if _original is None:
        _original = base.scaled_dot_product_attention
        base.scaled_dot_product_attention = scaled_dot_product_attention
    for name in MODULES:
        module = importlib.import_module(name)
        if getattr(module, "scaled_dot_product_attention", None) is _original:
            module.scaled_dot_product_attention = scaled_dot_product_attention
