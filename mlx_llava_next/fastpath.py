"""Fast quantized layers for MLX's CPU backend on x86 Linux.

MLX's CPU `quantized_matmul` has no SIMD kernel on x86: decoding streams 4-bit weights at about
0.5-1 GB/s, and a prompt runs through it at about 3 GFLOP/s. `enable(model)` swaps every affine
4/8-bit `QuantizedLinear` for `FastQuantizedLinear`, which computes the same product with the
native kernels in `native/fastpath.c` (built at install time, see setup.py):

- a few rows (decode, M <= SMALL_M): an AVX2+FMA kernel reading the packed weights once per
  call on all cores, at close to memory bandwidth;
- many rows (prefill): tiles of the weights dequantized to float32 and multiplied by the
  process's BLAS (`cblas_sgemm`, OpenBLAS via blas.py), so a layer's float32 copy never
  exceeds one tile of about 32 MB.

On a CPU with AVX2 or AVX-512 VNNI, 4-bit layers whose input width is a multiple of 64 (not the
LM head) quantize their activations to int8 per group by default, as llama.cpp's Q8_0/Q8_1
activations are, and the products run on the integer kernels of `native/qint8.c` (vpdpbusd /
vpmaddubsw, chosen at run time): about 1.5-2x the float kernels' speed in decode and in prefill.
That default (INT8_DEFAULT) is decision (c) of issue 18: the quality report's gate
(quantize/report.py, figures in the README) holds on the trained demo model (int8's KL 2% of the
4-bit weights' own, the bar 10%). `exact=True` (`load(..., exact=True)`, `--exact` on the CLI,
`set_exact`) keeps float32 activations: products equal to `mx.quantized_matmul` to float
rounding (parity runs use it). 8-bit layers and 4-bit ones in groups of 128 always keep float32
(INT8_BITS, INT8_GROUPS): the gate did not hold for them.

Decoding also reads the whole KV cache once a token, and MLX's CPU attention for one query
runs unfused at a tenth of memory speed (2,900 cached tokens: 30 ms a layer). `enable` also
routes mlx-lm's `scaled_dot_product_attention` (llama, qwen2) for a single query without a mask
through a native kernel that reads each cached key/value row once for all heads of its group.
A prompt chunk is held up by something else: MLX's CPU `exp` is scalar on x86, so in a
2,048-token chunk the attention's softmax (3.6 s a layer) and the MLP's SiLU (0.9 s) cost more
than the attention's products. Causal chunks (mask="causal") and mlx-lm's `swiglu` go to
native kernels with a vector exp, the products to the BLAS. Everything else (masks as arrays:
left-padded batches, sliding windows) goes to mlx-lm's functions unchanged. The CLIP tower's
attention (no mask) and quick GELU (`vision.attention`, `vision.quick_gelu`) get the same
treatment.

A decode step pays for something else again: every eager kernel call needs its input
evaluated, and each MLX evaluation hands work to MLX's stream thread and back (250-450 us on a
virtual machine, whose cross-core wake-ups are slow). Computed module by module, a llama block
needs four a token; `FastDecodeBlock` runs the single-token step of a block whose projections
all swapped in numpy around the kernels; on our KV cache (kv_cache.py) rope, the cache write and
the attention are one native call too (native/kv.c), so no MLX evaluation is left in the step.

All of these are eager: the input is evaluated and the result comes back as a new array (the
host views of evaluated MLX arrays are zero-copy). The language-model head stays lazy for many rows
(mlx-lm's chunked prefill builds logits it never evaluates) and uses MLX's dequantize + GEMM.
With exact=True results equal `mx.quantized_matmul` to float rounding (tests/test_fastpath.py);
the int8 kernels are held to their own oracle (tests/test_int8_kernels.py). Nothing changes
without the native module, on other devices (Metal, CUDA), or inside `mx.compile`/`vmap`.
"""

import platform
import sys
from typing import Optional

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from .kv_cache import HostKVCache
from .rope import angle_row

try:
    from . import _fastpath as native
except ImportError:  # not built (no compiler at install time, or not Linux): MLX's kernels
    native = None

# Up to this many rows the streaming kernel beats dequantize + sgemm (measured: M=16 costs
# about 4x M=1 with the streaming kernel, while dequantizing alone costs about 3x M=1).
SMALL_M = 16

DTYPE_CODES = {mx.float32: 0, mx.float16: 1, mx.bfloat16: 2}
HEAD_NAMES = ("lm_head",)
HEAD_EXACT = True  # the LM head keeps float32 activations (its rounding goes straight into the logits)
# Weight formats whose layers take int8 activations: on the trained demo model the quality report's
# gate (quantize/report.py, README) held for 4-bit weights in groups of 32 and 64 (int8's KL 1-4% of
# the weights' own, every continuation token kept) but not for groups of 128 (one of 7 tokens
# changed) nor for 8-bit weights (int8's KL 6-22x theirs), which keep float32 activations.
INT8_BITS = (4,)
INT8_GROUPS = (32, 64)
# int8 activations by default (exact=None)? Decision (c) of issue 18: only if the quality report's
# gate holds; it does on the trained demo model (README; tests/test_int8_kernels.py re-checks it).
INT8_DEFAULT = True


def resolve_exact(exact: Optional[bool]) -> bool:
    """exact=None (no choice made) -> the default: int8 activations where they run if INT8_DEFAULT."""
    return (not INT8_DEFAULT) if exact is None else bool(exact)


def available() -> bool:
    """True when the native kernels are built and this is a Linux x86-64 process."""
    return native is not None and sys.platform.startswith("linux") and platform.machine() in ("x86_64", "AMD64")


def info() -> dict:
    """{'available', 'simd', 'threads', 'cblas_sgemm', 'int8', 'int8_paths', 'kv'} for `info` and the
    benchmark: 'simd' is the float kernels' path, 'int8' the int8-activation kernels' path in use
    ('avx512vnni', 'avx2' or 'scalar'), 'int8_paths' those this CPU can run and 'kv' the decode
    step's (native/kv.c: 'avx512f', 'avx2+fma+f16c' or 'scalar')."""
    if native is None:
        return {"available": False}
    q8 = native.q8_info()
    return {"available": available(), **native.info(), "int8": q8["isa"], "int8_paths": q8["available"],
            "kv": native.kv_simd()[0]}


_int8_path = None  # the int8 kernels' path in use (cached: asked on every product)


def set_int8_path(name=None) -> str:
    """Force the int8 kernels' path ('avx512vnni', 'avx2', 'scalar'; ValueError if this CPU cannot
    run it) or, with None, pick the best one; returns the path in use."""
    global _int8_path
    native.q8_set_isa(name)
    _int8_path = native.q8_info()["isa"]
    return _int8_path


def int8_supported(in_features: int, bits: int = 4, group_size: int = 64) -> bool:
    """Whether a layer of this input width and weight format takes int8 activations on this CPU
    (bits in INT8_BITS, group_size in INT8_GROUPS, a SIMD path, K a multiple of 64); elsewhere the
    float kernels run."""
    path = _int8_path or set_int8_path(native.q8_info()["isa"])
    return bits in INT8_BITS and group_size in INT8_GROUPS and in_features % 64 == 0 and path != "scalar"


def host(a: mx.array) -> np.ndarray:
    """Zero-copy numpy view of an array (evaluates it); bfloat16 comes back as uint16 bits."""
    if a.dtype == mx.bfloat16:
        a = a.view(mx.uint16)
    return np.asarray(a)


def supports(layer) -> bool:
    """Layers the native kernels compute: affine 4/8-bit, group 32/64/128, float scales."""
    return (
        isinstance(layer, nn.QuantizedLinear)
        and getattr(layer, "mode", "affine") == "affine"
        and layer.bits in (4, 8)
        and layer.group_size in (32, 64, 128)
        and layer.get("biases") is not None
        and layer["scales"].dtype in DTYPE_CODES
    )


class _HostWeights:
    """Numpy views of a layer's packed weights, remembered with the arrays they view."""

    def __init__(self, weight, scales, biases):
        self.arrays = (weight, scales, biases)
        self.views = tuple(host(a) for a in self.arrays)
        self.dtype = DTYPE_CODES[scales.dtype]


def quantized_matmul(x: np.ndarray, weights: _HostWeights, out_features: int, bits: int, group_size: int,
                     exact: bool = True, out: Optional[np.ndarray] = None) -> np.ndarray:
    """x [M, K] float32 (C order) @ W^T -> [M, N] float32 (into `out` if given) with the native
    kernels; exact=False: x quantized to int8 per group (native/qint8.c) where `int8_supported`."""
    M, K = x.shape
    if out is None:
        out = np.empty((M, out_features), dtype=np.float32)
    w, s, b = weights.views
    if not exact and int8_supported(K, bits, group_size):
        kernel = native.q8_qmv if M <= SMALL_M else native.q8_qgemm
    else:
        kernel = native.qmv if M <= SMALL_M or not sgemm_available() else native.qgemm
    kernel(x, w, s, b, out, M, out_features, K, bits, group_size, weights.dtype)
    return out


def dequantize(weight: mx.array, scales: mx.array, biases: mx.array, group_size: int, bits: int) -> np.ndarray:
    """The float32 matrix of a quantized weight (like mx.dequantize, much faster on CPU)."""
    hw = _HostWeights(weight, scales, biases)
    N = weight.shape[0]
    K = weight.shape[1] * 32 // bits
    out = np.empty((N, K), dtype=np.float32)
    native.dequantize(*hw.views, out, N, K, bits, group_size, hw.dtype)
    return out


_sgemm = None


def sgemm_available() -> bool:
    global _sgemm
    if _sgemm is None:
        _sgemm = bool(native.info()["cblas_sgemm"])
    return _sgemm


def evaluated(*arrays) -> bool:
    """Evaluate arrays for the native kernels; False inside mx.compile / vmap, where they cannot be."""
    try:
        mx.eval(*arrays)
    except Exception:
        return False
    return True


# Eager results at least this large are written straight into an MLX array through its host view,
# not into numpy and then copied (mx.array): in a 2,048-token chunk's MLP that copy held a fourth
# 117 MB array beside the three the MLP needs, at the prompt's peak memory.
DIRECT_OUT_BYTES = 1 << 24


def output(shape):
    """(host, array): a float32 buffer for a kernel to write into, and the MLX array that is its
    result (None for small results, returned by `result` as a copy: no MLX evaluation to wait
    for, which a decode step's many small calls would each pay)."""
    if 4 * int(np.prod(shape)) < DIRECT_OUT_BYTES:
        return np.empty(shape, np.float32), None
    array = mx.zeros(shape, mx.float32)
    mx.eval(array)
    return np.asarray(array), array  # zero-copy, writable: the array's own memory


def result(host: np.ndarray, array) -> mx.array:
    """What `output` gave, filled, as an MLX array."""
    return mx.array(host) if array is None else array


class FastQuantizedLinear(nn.QuantizedLinear):
    """`nn.QuantizedLinear` computed by the native kernels (same parameters, same results)."""

    lazy_many_rows = False  # True for the LM head (see the module docstring)
    exact = False  # True: float32 activations (set_exact); else int8 where int8_supported

    def _host_weights(self) -> _HostWeights:
        arrays = (self["weight"], self["scales"], self["biases"])
        cached = self.__dict__.get("_host")
        if cached is None or any(a is not b for a, b in zip(arrays, cached.arrays)):
            cached = _HostWeights(*arrays)
            object.__setattr__(self, "_host", cached)
        return cached

    def product(self, x: np.ndarray, out: Optional[np.ndarray] = None) -> np.ndarray:
        """x [M, K] float32 (numpy) -> x @ W^T + bias [M, N] (numpy, `out` if given) on the native kernels."""
        y = quantized_matmul(x, self._host_weights(), self["weight"].shape[0], self.bits, self.group_size, self.exact,
                             out)
        if "bias" in self:
            y += _float32(self, "bias")
        return y

    def __call__(self, x):
        K = x.shape[-1]
        M = x.size // K if K else 0
        if x.dtype != mx.float32 or M == 0 or not supports(self) or mx.default_device() != mx.cpu:
            return super().__call__(x)
        int8 = not self.exact and int8_supported(K, self.bits, self.group_size)
        if M > SMALL_M and (self.lazy_many_rows or not (int8 or sgemm_available())):
            # float32 weights whatever the scales' dtype: half-precision weights would round the product
            scales, biases = self["scales"].astype(mx.float32), self["biases"].astype(mx.float32)
            y = x @ mx.dequantize(self["weight"], scales, biases, self.group_size, self.bits).T
            return y + self["bias"] if "bias" in self else y
        if not evaluated(x):
            return super().__call__(x)
        host, array = output((M, self["weight"].shape[0]))
        self.product(np.ascontiguousarray(np.asarray(x).reshape(M, K)), host)
        y = result(host, array)
        return y.reshape(*x.shape[:-1], y.shape[-1])


# -- attention and SwiGLU ----------------------------------------------------------------------

HOOKED_MODULES = ("mlx_lm.models.llama", "mlx_lm.models.qwen2")


def _attention_kind(queries, keys, values, cache, mask, sinks):
    """'decode' (one query, no mask), 'causal' (a prompt chunk, MLX's mask="causal") or None."""
    if not (
        sinks is None
        and not hasattr(cache, "bits")  # quantized KV cache: mlx-lm's own kernel
        and queries.ndim == 4
        and keys.ndim == 4
        and queries.shape[0] == 1
        and keys.shape[2] > 0
        and queries.shape[1] % keys.shape[1] == 0
        and queries.dtype == keys.dtype == values.dtype == mx.float32
        and mx.default_device() == mx.cpu
    ):
        return None
    if mask is None and queries.shape[2] == 1:
        return "decode"
    if isinstance(mask, str) and mask == "causal" and 1 < queries.shape[2] <= keys.shape[2] and sgemm_available():
        return "causal"
    return None


def scaled_dot_product_attention(queries, keys, values, cache, scale: float, mask=None, sinks=None):
    """mlx-lm's `scaled_dot_product_attention`, with decode steps and causal prompt chunks on the
    native kernels (one query: each cached row read once for its group; a chunk: BLAS products
    and a vector-exp softmax, a block of queries at a time)."""
    from mlx_lm.models import base

    kind = _attention_kind(queries, keys, values, cache, mask, sinks) if native is not None else None
    if kind is not None and evaluated(queries, keys, values):
        q = np.ascontiguousarray(np.asarray(queries))
        k, v = np.asarray(keys), np.asarray(values)  # views of the cache buffer (rows contiguous)
        if k.strides[-1] == v.strides[-1] == 4:
            out, array = output(q.shape)
            (native.attend if kind == "decode" else native.attend_causal)(q, k, v, out, float(scale))
            return result(out, array)
    return base.scaled_dot_product_attention(queries, keys, values, cache, scale=scale, mask=mask, sinks=sinks)


def _elementwise(kernel: str, *arrays):
    """native.<kernel>(*inputs, out) over float32 CPU arrays of one shape, as a new array; None
    where it does not apply (no native module, other dtypes or devices, inside mx.compile)."""
    first = arrays[0]
    if (
        native is None
        or first.size == 0
        or any(a.shape != first.shape or a.dtype != mx.float32 for a in arrays)
        or mx.default_device() != mx.cpu
        or not evaluated(*arrays)
    ):
        return None
    inputs = [np.ascontiguousarray(np.asarray(a)) for a in arrays]
    out, array = output(inputs[0].shape)
    getattr(native, kernel)(*inputs, out)
    return result(out, array)


def swiglu(gate, x):
    """mlx-lm's `swiglu` (silu(gate) * x) in float32 on the native kernel: MLX's scalar exp makes
    it 0.9 s a layer in a prompt chunk, and 0.6 ms a decode step (a third of a step's non-GEMV time)."""
    from mlx_lm.models import activations

    out = _elementwise("swiglu", gate, x)
    return activations.swiglu(gate, x) if out is None else out


def vision_attention(queries, keys, values, scale: float, mask=None):
    """`mx.fast.scaled_dot_product_attention` without a mask ([B, H, L, D], CLIP's attention) on
    the prompt-attention kernel: batch and heads folded together, BLAS products, vector exp."""
    if (
        native is not None
        and mask is None
        and queries.ndim == 4
        and keys.shape == values.shape == queries.shape
        and queries.dtype == keys.dtype == values.dtype == mx.float32
        and queries.size > 0
        and mx.default_device() == mx.cpu
        and sgemm_available()
        and evaluated(queries, keys, values)
    ):
        B, H, L, D = queries.shape
        q, k, v = (np.ascontiguousarray(np.asarray(a)).reshape(1, B * H, L, D) for a in (queries, keys, values))
        out, array = output(q.shape)
        native.attend_causal(q, k, v, out, float(scale), False)
        return result(out, array).reshape(B, H, L, D)
    return mx.fast.scaled_dot_product_attention(queries, keys, values, scale=scale, mask=mask)


def quick_gelu(x):
    """`nn.gelu_fast_approx` (x * sigmoid(1.702 x), CLIP's activation) on the native kernel."""
    out = _elementwise("quick_gelu", x)
    return nn.gelu_fast_approx(x) if out is None else out


def _hooks():
    """(module, attribute, our function, the original) for each function the fast path replaces."""
    import importlib

    from mlx_lm.models import activations, base

    from . import vision

    for name in HOOKED_MODULES:
        module = importlib.import_module(name)
        yield module, "scaled_dot_product_attention", scaled_dot_product_attention, base.scaled_dot_product_attention
        yield module, "swiglu", swiglu, activations.swiglu
    yield vision, "attention", vision_attention, mx.fast.scaled_dot_product_attention
    yield vision, "quick_gelu", quick_gelu, nn.gelu_fast_approx


def install_attention() -> None:
    """Point mlx-lm's llama/qwen2 attention and SwiGLU, and the CLIP tower's attention and GELU,
    at the functions above (idempotent)."""
    for module, attribute, hook, _ in _hooks():
        if getattr(module, attribute, None) is not None:
            setattr(module, attribute, hook)


def uninstall_attention() -> None:
    for module, attribute, hook, original in _hooks():
        if getattr(module, attribute, None) is hook:
            setattr(module, attribute, original)


# -- one decode step of a decoder block -----------------------------------------------------------


def _float32(module: nn.Module, name: str) -> np.ndarray:
    """A parameter as float32 numpy, converted once (a conversion each step would cost an MLX
    evaluation) and again only when the parameter is replaced."""
    array = module[name]
    cached = module.__dict__.get("_float32", {}).get(name)
    if cached is None or cached[0] is not array:
        cached = (array, host(array if array.dtype == mx.float32 else array.astype(mx.float32)))
        module.__dict__.setdefault("_float32", {})[name] = cached
    return cached[1]


def _rms_norm(x: np.ndarray, norm: nn.RMSNorm) -> np.ndarray:
    """nn.RMSNorm of float32 rows in numpy (mean of squares accumulated in float64)."""
    scale = 1.0 / np.sqrt(np.mean(np.square(x, dtype=np.float64), axis=-1, keepdims=True) + norm.eps)
    return (x * scale.astype(np.float32)) * _float32(norm, "weight")


class FastDecodeBlock:
    """Mixin for mlx-lm's llama/qwen2 `TransformerBlock`: the single-token step in numpy and the
    native kernels; on our own cache (kv_cache.HostKVCache) rope, the cache write and the attention
    too (native/kv.c), so the step makes no MLX evaluation.

    Computed layer by layer in MLX, a decode step forces an evaluation before every projection
    (the norms, residual adds and attention reshapes are lazy MLX ops), and each evaluation hands
    work to MLX's stream thread and back: ~4 round trips of 250-450 us a layer on a virtual
    machine, 40-60 ms a token for a 7B model. Here none remains on our cache; on mlx-lm's caches
    (or a rope the native step does not reproduce) one: MLX's rope + cache update + attention.
    Anything else (prompt chunks, batches, masks, half-precision blocks) runs the block unchanged.
    """

    def __call__(self, x, mask=None, cache=None):
        if (
            mask is None
            and cache is not None
            and x.ndim == 3
            and x.shape[0] == 1
            and x.shape[1] == 1
            and self._float32_block(x)
            and mx.default_device() == mx.cpu
            and evaluated(x)
        ):
            return self._decode_step(x, cache)
        return super().__call__(x, mask=mask, cache=cache)

    def _float32_block(self, x) -> bool:
        """True when MLX would run the block in float32: float32 input, or a half-precision one
        (a quantized embedding's output) that the float32 norm and residual promote."""
        if x.dtype == mx.float32:
            return True
        return x.dtype in (mx.float16, mx.bfloat16) and self.input_layernorm.weight.dtype == mx.float32

    def _decode_step(self, x, cache):
        attn, mlp = self.self_attn, self.mlp
        h = np.array(x if x.dtype == mx.float32 else x.astype(mx.float32), dtype=np.float32).reshape(1, -1)
        a = _rms_norm(h, self.input_layernorm)
        rows = angle_row(attn.rope, cache.offset) if isinstance(cache, HostKVCache) else None
        if rows is not None:
            out = self._native_attention(a, cache, rows)
        else:
            out = self._mlx_attention(a, cache)
        h += attn.o_proj.product(out)
        m = _rms_norm(h, self.post_attention_layernorm)
        gate, up = mlp.gate_proj.product(m), mlp.up_proj.product(m)
        act = np.empty_like(gate)
        native.swiglu(gate, up, act)
        h += mlp.down_proj.product(act)
        return mx.array(h.reshape(x.shape[0], x.shape[1], -1))  # from numpy: nothing for MLX to evaluate

    def _native_attention(self, a: np.ndarray, cache, rows) -> np.ndarray:
        """Rope, cache write and attention in one native call (native/kv.c) on our own cache."""
        attn = self.self_attn
        q, k, v = attn.q_proj.product(a), attn.k_proj.product(a), attn.v_proj.product(a)
        head_dim = q.shape[1] // attn.n_heads
        cache.reserve(attn.n_kv_heads, head_dim, v.shape[1] // attn.n_kv_heads, 1)
        out = np.empty_like(q)
        native.kv_decode(q, k, v, rows[0], rows[1], cache.keys, cache.values, cache.offset, out, attn.scale,
                         attn.rope.dims)
        cache.offset += 1
        return out

    def _mlx_attention(self, a: np.ndarray, cache) -> np.ndarray:
        """Rope and the cache update in MLX (other caches and ropes): one MLX evaluation."""
        attn = self.self_attn
        queries = mx.array(attn.q_proj.product(a)).reshape(1, 1, attn.n_heads, -1).transpose(0, 2, 1, 3)
        keys = mx.array(attn.k_proj.product(a)).reshape(1, 1, attn.n_kv_heads, -1).transpose(0, 2, 1, 3)
        values = mx.array(attn.v_proj.product(a)).reshape(1, 1, attn.n_kv_heads, -1).transpose(0, 2, 1, 3)
        queries = attn.rope(queries, offset=cache.offset)
        keys = attn.rope(keys, offset=cache.offset)
        keys, values = cache.update_and_fetch(keys, values)
        out = scaled_dot_product_attention(queries, keys, values, cache=cache, scale=attn.scale)
        # [1, heads, 1, head_dim] in C order is already the [1, heads * head_dim] row o_proj takes
        return np.ascontiguousarray(np.asarray(out), dtype=np.float32).reshape(1, -1)


def _block_supported(block) -> bool:
    """A llama/qwen2 block whose seven projections all run on the native kernels."""
    attn, mlp = getattr(block, "self_attn", None), getattr(block, "mlp", None)
    projections = [getattr(attn, n, None) for n in ("q_proj", "k_proj", "v_proj", "o_proj")]
    projections += [getattr(mlp, n, None) for n in ("gate_proj", "up_proj", "down_proj")]
    return (
        type(block).__module__ in HOOKED_MODULES
        and type(block).__name__ == "TransformerBlock"
        and all(isinstance(p, FastQuantizedLinear) and supports(p) for p in projections)
        and all(isinstance(getattr(block, n, None), nn.RMSNorm) for n in ("input_layernorm", "post_attention_layernorm"))
        and all(hasattr(attn, n) for n in ("rope", "n_heads", "n_kv_heads", "scale"))
    )


_fast_block_classes = {}


def _fast_block_class(cls):
    if cls not in _fast_block_classes:
        _fast_block_classes[cls] = type("Fast" + cls.__name__, (FastDecodeBlock, cls), {})
    return _fast_block_classes[cls]


# -- swapping layers ------------------------------------------------------------------------------


def enable(model: nn.Module, exact: Optional[bool] = None) -> int:
    """Swap the model's supported QuantizedLinear layers for FastQuantizedLinear (in place), route
    mlx-lm's attention and SwiGLU to the native kernels and give llama/qwen2 blocks whose
    projections all swapped the numpy decode step (FastDecodeBlock).

    Returns how many layers were swapped; 0 (and nothing changed) without the native kernels.
    """
    if not available():
        return 0
    exact = resolve_exact(exact)
    count = 0
    for path, module in model.named_modules():
        if type(module) is nn.QuantizedLinear and supports(module):
            module.__class__ = FastQuantizedLinear
            if path.split(".")[-1] in HEAD_NAMES:
                module.lazy_many_rows = True
                module.exact = HEAD_EXACT
            if exact:
                module.exact = True
            count += 1
    if count:  # float models keep mlx-lm's attention untouched
        install_attention()
        for _, module in model.named_modules():
            if _block_supported(module):
                module.__class__ = _fast_block_class(type(module))
    return count


def disable(model: nn.Module) -> int:
    """Undo `enable`: back to MLX's own QuantizedLinear and mlx-lm's attention."""
    if native is not None:
        uninstall_attention()
    for _, module in model.named_modules():
        if isinstance(module, FastDecodeBlock):
            module.__class__ = type(module).__mro__[2]  # (FastX, FastDecodeBlock, X, ...)
    count = 0
    for _, module in model.named_modules():
        if isinstance(module, FastQuantizedLinear):
            module.__class__ = nn.QuantizedLinear
            module.__dict__.pop("_host", None)
            module.__dict__.pop("lazy_many_rows", None)
            module.__dict__.pop("exact", None)
            count += 1
    return count


def should_enable() -> bool:
    """The automatic policy of `load()`: only on the CPU device of an x86-64 Linux process."""
    return available() and mx.default_device() == mx.cpu


def auto_enable(model: nn.Module, exact: Optional[bool] = None) -> int:
    """What `load()` calls: `enable(model, exact)` where `should_enable()`, else nothing."""
    return enable(model, exact) if should_enable() else 0


def set_exact(model: nn.Module, exact: bool = True) -> int:
    """Float32 (True) or int8 (False) activations for the model's fast quantized layers; returns
    how many layers it set."""
    count = 0
    for _, module in model.named_modules():
        if isinstance(module, FastQuantizedLinear):
            module.exact = bool(exact) or (module.lazy_many_rows and HEAD_EXACT)
            count += 1
    return count
