"""The native x86 kernels (native/fastpath.c via mlx_llava_next.fastpath) against independent oracles.

Oracle for products: the packed bits unpacked in numpy and multiplied in float64 (what MLX's
affine format means: w = scale * q + bias). Errors are measured relative to |x| @ |W|^T, the
scale of float rounding in a dot product; `mx.quantized_matmul` is held to the same bound.
"""

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest

from mlx_llava_next import fastpath

pytestmark = pytest.mark.skipif(not fastpath.available(), reason="native kernels not built (or not x86-64 Linux)")
# Kernels that hand their GEMMs to the process's BLAS (loaded by blas.py) need one bound.
needs_cblas = pytest.mark.skipif(
    not (fastpath.available() and fastpath.sgemm_available()),
    reason="no cblas_sgemm in the process (no OpenBLAS/BLIS found; see mlx_llava_next/blas.py)",
)

# float32 accumulation over K terms ends within a few eps * sqrt(K)-ish of the exact value;
# 1e-6 of |x|@|W|^T is ~8 eps and several times what either implementation shows.
TOLERANCE = 1e-6


def unpack(w: np.ndarray, bits: int) -> np.ndarray:
    """uint32 words -> integer values, low bits first (MLX's packing)."""
    per = 32 // bits
    shifts = (np.arange(per, dtype=np.uint32) * bits)[None, None, :]
    q = (w[:, :, None] >> shifts) & np.uint32((1 << bits) - 1)
    return q.reshape(w.shape[0], -1).astype(np.float64)


def exact_weight(w, scales, biases, group_size, bits) -> np.ndarray:
    q = unpack(np.asarray(w), bits)
    s = np.repeat(np.asarray(scales.astype(mx.float32), dtype=np.float64), group_size, axis=1)
    b = np.repeat(np.asarray(biases.astype(mx.float32), dtype=np.float64), group_size, axis=1)
    return s * q + b


def quantized(n, k, group_size, bits, dtype=mx.float16, seed=0):
    mx.random.seed(seed)
    w, s, b = mx.quantize(mx.random.normal((n, k)).astype(dtype), group_size, bits)
    mx.eval(w, s, b)
    return w, s, b


def relative_error(y, x, W):
    x = np.asarray(x, dtype=np.float64)
    exact = x @ W.T
    scale = np.abs(x) @ np.abs(W).T
    return float(np.max(np.abs(np.asarray(y, dtype=np.float64) - exact) / scale))


def fast_product(x, w, s, b, group_size, bits):
    weights = fastpath._HostWeights(w, s, b)
    return fastpath.quantized_matmul(np.ascontiguousarray(x, dtype=np.float32), weights, w.shape[0], bits, group_size)


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("group_size", [32, 64, 128])
@pytest.mark.parametrize("dtype", [mx.float32, mx.float16, mx.bfloat16], ids=["f32", "f16", "bf16"])
def test_small_shapes_every_format(bits, group_size, dtype):
    w, s, b = quantized(72, 384, group_size, bits, dtype)
    W = exact_weight(w, s, b, group_size, bits)
    x = np.random.default_rng(1).standard_normal((40, 384)).astype(np.float32)
    for m in (1, 2, 3, 4, 5, 8, 16, 17, 40):  # streaming kernel up to SMALL_M, tiles + sgemm above
        y = fast_product(x[:m], w, s, b, group_size, bits)
        assert y.shape == (m, 72)
        assert relative_error(y, x[:m], W) < TOLERANCE, m
    reference = np.asarray(mx.quantized_matmul(mx.array(x), w, s, b, True, group_size, bits).astype(mx.float32))
    assert relative_error(reference, x, W) < TOLERANCE  # the bound is one MLX meets too


# The layers of the released 7B text models (q/o 4096x4096, gate/up 14336x4096, down 4096x14336).
@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("shape", [(4096, 4096), (14336, 4096), (4096, 14336)], ids=["qo", "gate_up", "down"])
def test_model_shapes(bits, shape):
    n, k = shape
    w, s, b = quantized(n, k, 64, bits)
    # Every output row is computed alone; check a sample (both ends of each thread's share
    # included) against the float64 oracle to keep the test fast.
    rows = np.unique(np.concatenate([np.arange(0, n, 37), [0, n // 2 - 1, n // 2, n - 1]]))
    W = exact_weight(w[mx.array(rows)], s[mx.array(rows)], b[mx.array(rows)], 64, bits)
    x = np.random.default_rng(2).standard_normal((8, k)).astype(np.float32)
    for m in range(1, 9):
        y = fast_product(x[:m], w, s, b, 64, bits)
        assert y.shape == (m, n)
        assert relative_error(y[:, rows], x[:m], W) < TOLERANCE, m
    theirs = np.asarray(mx.quantized_matmul(mx.array(x[:1]), w, s, b, True, 64, bits))[:, rows]
    assert relative_error(theirs, x[:1], W) < TOLERANCE


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("group_size", [32, 64, 128])
def test_dequantize_equals_mlx_bit_for_bit(bits, group_size):
    w, s, b = quantized(96, 512, group_size, bits, mx.float32)
    ours = fastpath.dequantize(w, s, b, group_size, bits)
    assert np.array_equal(ours, np.asarray(mx.dequantize(w, s, b, group_size, bits)))


@pytest.mark.parametrize("dtype", [mx.float16, mx.bfloat16], ids=["f16", "bf16"])
def test_dequantize_half_scales_is_exact_in_float32(dtype):
    w, s, b = quantized(64, 256, 64, 4, dtype)
    W = exact_weight(w, s, b, 64, 4)
    ours = fastpath.dequantize(w, s, b, 64, 4)
    assert np.array_equal(ours, W.astype(np.float32)) or np.max(np.abs(ours - W) / np.abs(W).max()) < 2 ** -23


def test_thread_count_does_not_change_results():
    w, s, b = quantized(1000, 512, 64, 4)  # N not a multiple of the thread split
    x = np.random.default_rng(3).standard_normal((3, 512)).astype(np.float32)
    try:
        fastpath.native.set_num_threads(1)
        one = fast_product(x, w, s, b, 64, 4)
        fastpath.native.set_num_threads(3)
        three = fast_product(x, w, s, b, 64, 4)
    finally:
        fastpath.native.set_num_threads(0)
    assert np.array_equal(one, three)


def test_scalar_fallback_matches():
    """The path for CPUs without AVX2 (forced here) computes the same product."""
    w, s, b = quantized(48, 256, 32, 4)
    W = exact_weight(w, s, b, 32, 4)
    x = np.random.default_rng(4).standard_normal((5, 256)).astype(np.float32)
    try:
        fastpath.native.set_simd(False)
        assert fastpath.native.info()["simd"] == "scalar"
        scalar = fast_product(x, w, s, b, 32, 4)
        dequantized = fastpath.dequantize(w, s, b, 32, 4)
    finally:
        fastpath.native.set_simd(True)
    assert relative_error(scalar, x, W) < TOLERANCE
    assert np.max(np.abs(dequantized - W)) < 1e-6 * np.abs(W).max()


def test_bad_buffers_are_rejected():
    w, s, b = quantized(32, 128, 64, 4)
    out = np.empty((1, 32), np.float32)
    with pytest.raises(ValueError, match="x: expected"):
        fastpath.native.qmv(np.zeros(64, np.float32), *fastpath._HostWeights(w, s, b).views, out, 1, 32, 128, 4, 64, 1)
    with pytest.raises(ValueError, match="bits"):
        fastpath.native.qmv(np.zeros(128, np.float32), *fastpath._HostWeights(w, s, b).views, out, 1, 32, 128, 3, 64, 1)


# -- decode attention ---------------------------------------------------------------------------


def attention64(q, k, v, scale):
    """softmax(q K^T * scale) V per head in float64, query heads grouped over kv heads."""
    q, k, v = (np.asarray(a, dtype=np.float64) for a in (q, k, v))
    group = q.shape[1] // k.shape[1]
    k, v = np.repeat(k, group, axis=1), np.repeat(v, group, axis=1)
    s = q @ k.swapaxes(-1, -2) * scale
    p = np.exp(s - s.max(-1, keepdims=True))
    return (p / p.sum(-1, keepdims=True)) @ v


@pytest.mark.parametrize("heads, kv_heads, length, dim", [(32, 8, 2945, 128), (4, 4, 1, 64), (14, 2, 37, 64), (8, 1, 300, 80)])
def test_decode_attention_matches_float64(heads, kv_heads, length, dim):
    from mlx_lm.models.cache import KVCache

    cache = KVCache()  # rows live in a bigger buffer: the kernel reads strided views of it
    mx.random.seed(6)
    if length > 1:
        shape = (1, kv_heads, length - 1, dim)
        cache.update_and_fetch(mx.random.normal(shape), mx.random.normal(shape))
    k, v = cache.update_and_fetch(mx.random.normal((1, kv_heads, 1, dim)), mx.random.normal((1, kv_heads, 1, dim)))
    q = mx.random.normal((1, heads, 1, dim))
    scale = dim ** -0.5
    ours = fastpath.scaled_dot_product_attention(q, k, v, cache, scale=scale)
    exact = attention64(q, k, v, scale)
    assert ours.shape == (1, heads, 1, dim) and ours.dtype == mx.float32
    assert np.max(np.abs(np.asarray(ours) - exact)) < 1e-5 * np.max(np.abs(exact))


def causal_attention64(q, k, v, scale):
    """The float64 oracle with MLX's mask="causal": query i of L sees keys [0, S - L + i]."""
    L, S = q.shape[2], k.shape[2]
    q, k, v = (np.asarray(a, dtype=np.float64) for a in (q, k, v))
    group = q.shape[1] // k.shape[1]
    k, v = np.repeat(k, group, axis=1), np.repeat(v, group, axis=1)
    s = q @ k.swapaxes(-1, -2) * scale
    s = np.where(np.arange(S)[None, :] > np.arange(L)[:, None] + (S - L), -np.inf, s)
    p = np.exp(s - s.max(-1, keepdims=True))
    return (p / p.sum(-1, keepdims=True)) @ v


# (heads, kv heads, cached tokens before the chunk, chunk length, head dim); 300+ queries
# cross the kernel's 256-query blocks
@needs_cblas
@pytest.mark.parametrize("heads, kv_heads, cached, length, dim",
                         [(32, 8, 0, 300, 128), (14, 2, 50, 37, 64), (8, 1, 7, 513, 80), (4, 4, 0, 2, 64)])
def test_causal_prompt_attention_matches_float64_and_mlx(heads, kv_heads, cached, length, dim):
    from mlx_lm.models.cache import KVCache

    cache = KVCache()  # keys/values are strided views of the cache's buffer
    mx.random.seed(8)
    if cached:
        shape = (1, kv_heads, cached, dim)
        cache.update_and_fetch(mx.random.normal(shape), mx.random.normal(shape))
    shape = (1, kv_heads, length, dim)
    k, v = cache.update_and_fetch(mx.random.normal(shape), mx.random.normal(shape))
    q = mx.random.normal((1, heads, length, dim)) * 3  # peaked softmax rows
    scale = dim ** -0.5
    assert fastpath._attention_kind(q, k, v, cache, "causal", None) == "causal"
    ours = fastpath.scaled_dot_product_attention(q, k, v, cache, scale=scale, mask="causal")
    exact = causal_attention64(q, k, v, scale)
    mlx = np.asarray(mx.fast.scaled_dot_product_attention(q, k, v, scale=scale, mask="causal"))
    assert ours.shape == (1, heads, length, dim) and ours.dtype == mx.float32
    bound = 1e-5 * np.max(np.abs(exact))
    assert np.max(np.abs(np.asarray(ours) - exact)) < bound
    assert np.max(np.abs(mlx - exact)) < bound  # the same alignment of the mask as MLX's


def test_attention_hands_other_cases_to_mlx_lm(monkeypatch):
    from mlx_lm.models import base

    calls = []
    monkeypatch.setattr(base, "scaled_dot_product_attention", lambda *a, **k: calls.append(k) or "mlx-lm")
    q, k = mx.zeros((1, 4, 3, 8)), mx.zeros((1, 2, 3, 8))
    mask = mx.zeros((3, 3), dtype=mx.bool_)  # an array mask: padded batch, sliding window
    assert fastpath.scaled_dot_product_attention(q, k, k, None, scale=1.0, mask=mask) == "mlx-lm"
    assert fastpath.scaled_dot_product_attention(q, k[:, :, :2], k[:, :, :2], None, scale=1.0,
                                                 mask="causal") == "mlx-lm"  # fewer keys than queries
    q1 = mx.zeros((1, 4, 1, 8))
    assert fastpath.scaled_dot_product_attention(q1, k, k, None, scale=1.0, mask=mx.zeros((1, 3))) == "mlx-lm"
    assert fastpath.scaled_dot_product_attention(q1.astype(mx.float16), k.astype(mx.float16), k.astype(mx.float16),
                                                 None, scale=1.0) == "mlx-lm"
    assert fastpath.scaled_dot_product_attention(mx.zeros((2, 4, 3, 8)), mx.zeros((2, 2, 3, 8)),
                                                 mx.zeros((2, 2, 3, 8)), None, scale=1.0, mask="causal") == "mlx-lm"
    assert len(calls) == 5


def test_swiglu_matches_float64_and_mlx_lm():
    from mlx_lm.models.activations import swiglu as mlx_swiglu

    rng = np.random.default_rng(9)
    gate = rng.standard_normal((1, 40, 301)).astype(np.float32) * 4  # odd width
    gate[0, 0, :6] = [0.0, -0.0, 100.0, -100.0, 88.0, -90.0]
    x = rng.standard_normal((1, 40, 301)).astype(np.float32)
    ours = fastpath.swiglu(mx.array(gate), mx.array(x))
    g64 = gate.astype(np.float64)
    exact = g64 / (1 + np.exp(-g64)) * x
    assert ours.shape == gate.shape and ours.dtype == mx.float32
    assert np.allclose(np.asarray(ours), exact, rtol=1e-6, atol=1e-30)
    assert np.allclose(np.asarray(mlx_swiglu(mx.array(gate), mx.array(x))), exact, rtol=1e-6, atol=1e-30)
    few = fastpath.swiglu(mx.array(gate[:, :1]), mx.array(x[:, :1]))  # a decode step's single row
    assert np.allclose(np.asarray(few), exact[:, :1], rtol=1e-6, atol=1e-30)


# CLIP: [tiles, heads, 577, 64] in the released tower; 300 queries cross the 256-query blocks
@pytest.mark.parametrize("batch, heads, length, dim", [(5, 16, 577, 64), (2, 3, 300, 16), (1, 1, 1, 8)])
def test_vision_attention_matches_float64_and_mlx(batch, heads, length, dim):
    mx.random.seed(11)
    # transposed views, as the tower passes them
    q, k, v = (mx.random.normal((batch, length, heads, dim)).transpose(0, 2, 1, 3) * 3 for _ in range(3))
    scale = dim ** -0.5
    ours = fastpath.vision_attention(q, k, v, scale=scale)
    exact = attention64(q, k, v, scale)
    theirs = np.asarray(mx.fast.scaled_dot_product_attention(q, k, v, scale=scale))
    assert ours.shape == q.shape and ours.dtype == mx.float32
    assert np.max(np.abs(np.asarray(ours) - exact)) < 1e-5 * np.max(np.abs(exact))
    assert np.max(np.abs(np.asarray(ours) - theirs)) < 1e-5 * np.max(np.abs(exact))


def test_vision_attention_hands_other_cases_to_mlx():
    q = mx.random.normal((1, 2, 5, 8))
    mask = mx.zeros((5, 5))
    for args in ((q.astype(mx.float16),) * 3, (q, q[:, :, :3], q[:, :, :3])):
        ours = fastpath.vision_attention(*args, scale=0.5)
        assert np.array_equal(np.asarray(ours), np.asarray(mx.fast.scaled_dot_product_attention(*args, scale=0.5)))
    ours = fastpath.vision_attention(q, q, q, scale=0.5, mask=mask)
    assert np.array_equal(np.asarray(ours), np.asarray(mx.fast.scaled_dot_product_attention(q, q, q, scale=0.5, mask=mask)))


def test_quick_gelu_matches_float64_and_mlx():
    x = np.random.default_rng(12).standard_normal((3, 7, 301)).astype(np.float32) * 4  # odd width
    x[0, 0, :6] = [0.0, -0.0, 100.0, -100.0, 60.0, -60.0]
    x64 = x.astype(np.float64)
    exact = x64 / (1 + np.exp(-1.702 * x64))
    ours = fastpath.quick_gelu(mx.array(x))
    assert ours.shape == x.shape and ours.dtype == mx.float32
    assert np.allclose(np.asarray(ours), exact, rtol=2e-6, atol=1e-30)
    assert np.allclose(np.asarray(nn.gelu_fast_approx(mx.array(x))), exact, rtol=2e-6, atol=1e-30)


@needs_cblas
def test_prefill_tiles_cover_every_row():
    w, s, b = quantized(1000, 384, 64, 4)  # 1000 rows: 3 full 256-row tiles and a partial one
    W = exact_weight(w, s, b, 64, 4)
    x = np.random.default_rng(3).standard_normal((40, 384)).astype(np.float32)
    hw = fastpath._HostWeights(w, s, b)
    for tile_bytes in (1, 256 * 384 * 4, 1 << 30):  # smallest tile (256 rows), exactly 256, one tile
        out = np.empty((40, 1000), np.float32)
        fastpath.native.qgemm(x, *hw.views, out, 40, 1000, 384, 4, 64, hw.dtype, tile_bytes)
        assert relative_error(out, x, W) < TOLERANCE, tile_bytes


def test_enable_routes_mlx_lm_attention_and_disable_restores():
    from mlx_lm.models import base, llama

    model = nn.Sequential(nn.QuantizedLinear(128, 32, group_size=64, bits=4))
    fastpath.enable(model)
    from mlx_lm.models import activations, qwen2

    from mlx_llava_next import vision

    assert llama.scaled_dot_product_attention is fastpath.scaled_dot_product_attention
    assert llama.swiglu is qwen2.swiglu is fastpath.swiglu
    assert vision.attention is fastpath.vision_attention and vision.quick_gelu is fastpath.quick_gelu
    fastpath.disable(model)
    assert llama.scaled_dot_product_attention is base.scaled_dot_product_attention
    assert llama.swiglu is qwen2.swiglu is activations.swiglu
    assert vision.attention is mx.fast.scaled_dot_product_attention and vision.quick_gelu is nn.gelu_fast_approx
    fastpath.enable(model)  # leave it as load() would


# -- the layer ----------------------------------------------------------------------------------


def fast_layer(in_dims=256, out_dims=96, bias=True, bits=4, group_size=64):
    mx.random.seed(5)
    layer = nn.QuantizedLinear(in_dims, out_dims, bias=bias, group_size=group_size, bits=bits)
    if bias:
        layer.bias = mx.random.normal((out_dims,))
    mx.eval(layer.parameters())
    plain = nn.QuantizedLinear(in_dims, out_dims, bias=bias, group_size=group_size, bits=bits)
    plain.update(layer.parameters())
    # exact: float32 activations, products equal to MLX's (int8 ones: tests/test_int8_kernels.py)
    assert fastpath.enable(layer, exact=True) == 1 and isinstance(layer, fastpath.FastQuantizedLinear)
    return layer, plain


@pytest.mark.parametrize("shape", [(1, 1, 256), (2, 3, 256), (1, 40, 256)])
def test_layer_equals_quantized_linear(shape):
    layer, plain = fast_layer()
    x = mx.random.normal(shape)
    ours, theirs = layer(x), plain(x)
    assert ours.shape == theirs.shape and ours.dtype == mx.float32
    assert np.allclose(np.asarray(ours), np.asarray(theirs), rtol=1e-5, atol=1e-5)


def test_layer_falls_back_inside_compile_and_for_half_inputs():
    layer, plain = fast_layer()
    x = mx.random.normal((1, 256))
    compiled = mx.compile(lambda v: layer(v))
    assert np.allclose(np.asarray(compiled(x)), np.asarray(plain(x)), rtol=1e-5, atol=1e-5)
    half = x.astype(mx.float16)  # MLX's own kernel computes half-precision inputs
    assert layer(half).dtype == plain(half).dtype
    assert np.array_equal(np.asarray(layer(half)), np.asarray(plain(half)))


def test_layer_sees_replaced_weights():
    layer, plain = fast_layer(bias=False)
    x = mx.random.normal((1, 256))
    layer(x)  # caches host views of the current weights
    w, s, b = quantized(96, 256, 64, 4, mx.float32, seed=9)
    layer.update({"weight": w, "scales": s, "biases": b})
    plain.update({"weight": w, "scales": s, "biases": b})
    assert np.allclose(np.asarray(layer(x)), np.asarray(plain(x)), rtol=1e-5, atol=1e-5)


def test_enable_is_a_no_op_without_native_kernels(monkeypatch):
    layer = nn.QuantizedLinear(128, 32, group_size=64, bits=4)
    monkeypatch.setattr(fastpath, "native", None)
    assert fastpath.enable(layer) == 0 and type(layer) is nn.QuantizedLinear


def test_enable_skips_unsupported_layers():
    model = nn.Sequential(nn.QuantizedLinear(128, 32, group_size=64, bits=3),
                          nn.QuantizedLinear(128, 32, group_size=64, bits=4, mode="affine"),
                          nn.Linear(128, 32))
    assert fastpath.enable(model) == 1
    assert type(model.layers[0]) is nn.QuantizedLinear and isinstance(model.layers[1], fastpath.FastQuantizedLinear)
    assert fastpath.disable(model) == 1 and type(model.layers[1]) is nn.QuantizedLinear


# -- a whole model, loaded the way users load it -------------------------------------------------


@pytest.fixture(scope="session")
def quantized_checkpoint(tiny_checkpoint, tmp_path_factory):
    from convert.mlx import convert
    from quantize.mlx import QuantConfig

    source = tiny_checkpoint("mistral")
    out = tmp_path_factory.mktemp("fastpath") / "mistral-4bit"
    convert(source.path, out, dtype="float16", quantization=QuantConfig(bits=4, group_size=32), show_progress=False)
    return source, out


def test_load_enables_fast_path_and_logits_match(quantized_checkpoint, make_image):
    from mlx_llava_next import load

    source, path = quantized_checkpoint
    model, processor = load(path, exact=True)
    fast = [m for _, m in model.named_modules() if isinstance(m, fastpath.FastQuantizedLinear)]
    assert len(fast) == 2 * 7 + 1  # 2 layers x (q, k, v, o, gate, up, down) + lm_head
    inputs = processor(source.prompt(), images=[make_image(100, 150)])
    assert inputs["input_ids"].shape[1] > fastpath.SMALL_M  # the prompt takes the tiled GEMM path
    ours = np.asarray(model(inputs["input_ids"], pixel_values=inputs["pixel_values"], image_sizes=inputs["image_sizes"]))

    fastpath.disable(model)
    try:
        theirs = np.asarray(model(inputs["input_ids"], pixel_values=inputs["pixel_values"],
                                  image_sizes=inputs["image_sizes"]))
    finally:
        fastpath.enable(model)
    assert np.max(np.abs(ours - theirs)) <= 1e-4 * np.max(np.abs(theirs))


@pytest.fixture(scope="session")
def quantized_backbone(tiny_checkpoint, tmp_path_factory):
    """Factory: the tiny checkpoint of a backbone converted to 4-bit MLX (built once each)."""
    from convert.mlx import convert
    from quantize.mlx import QuantConfig

    built = {}

    def get(name):
        if name not in built:
            out = tmp_path_factory.mktemp("fastpath") / f"{name}-4bit"
            convert(tiny_checkpoint(name).path, out, dtype="float16",
                    quantization=QuantConfig(bits=4, group_size=32), show_progress=False)
            built[name] = out
        return built[name]

    return get


# mistral_window: a 16-token rotating cache, which the 24 tokens below wrap around
@pytest.mark.parametrize("backbone", ["mistral", "llama", "qwen2", "mistral_window"])
def test_decoding_with_cache_matches(backbone, quantized_backbone, monkeypatch):
    """Token by token through the KV cache: the numpy decode step of every block (M = 1: the
    streaming kernel) against MLX's own layers."""
    from mlx_llava_next import load

    model, _ = load(quantized_backbone(backbone), exact=True)
    blocks = model.language_model.model.layers
    assert all(isinstance(b, fastpath.FastDecodeBlock) for b in blocks)
    steps = []
    decode_step = fastpath.FastDecodeBlock._decode_step
    monkeypatch.setattr(fastpath.FastDecodeBlock, "_decode_step",
                        lambda self, x, cache: steps.append(1) or decode_step(self, x, cache))
    ids = mx.array(np.random.default_rng(4).integers(0, 200, (1, 24)))

    def run():
        cache = model.make_cache()
        logits = [model.language_model(ids[:, :3], cache=cache)[0, -1]]
        for i in range(3, ids.shape[1]):
            logits.append(model.language_model(ids[:, i : i + 1], cache=cache)[0, -1])
        return np.stack([np.asarray(v) for v in logits])

    ours = run()
    assert len(steps) == 21 * len(blocks)  # every single-token step took the numpy path
    block_class = type(blocks[0])
    fastpath.disable(model)
    try:
        assert not any(isinstance(b, fastpath.FastDecodeBlock) for b in blocks)
        assert type(blocks[0]) is block_class.__mro__[2]
        theirs = run()
    finally:
        fastpath.enable(model)
    assert len(steps) == 21 * len(blocks)
    assert np.max(np.abs(ours - theirs)) <= 1e-4 * np.max(np.abs(theirs))


@needs_cblas
def test_large_results_are_written_into_mlx_arrays(monkeypatch):
    """Eager results of DIRECT_OUT_BYTES or more are written into an MLX array's own memory (no
    numpy copy beside it at the prompt's peak): with every result written so, each kernel gives
    what the copied path gives, bit for bit."""
    host, array = fastpath.output((2048, 2048))  # 16 MB
    assert array is not None and np.shares_memory(np.asarray(array), host) and host.flags.writeable
    assert fastpath.output((4, 4))[1] is None  # small: numpy, copied (no MLX evaluation to wait for)

    layer, _ = fast_layer()
    mx.random.seed(13)
    x, g = mx.random.normal((1, 40, 256)), mx.random.normal((1, 40, 301))
    q, k, v = (mx.random.normal((1, 4, 37, 16)) for _ in range(3))

    def run():
        return [layer(x), fastpath.swiglu(g, x[..., :1] + g), fastpath.quick_gelu(g),
                fastpath.scaled_dot_product_attention(q, k, v, None, scale=0.25, mask="causal"),
                fastpath.vision_attention(q, k, v, scale=0.25)]

    copied = [np.array(a) for a in run()]
    monkeypatch.setattr(fastpath, "DIRECT_OUT_BYTES", 0)
    direct = run()
    for ours, theirs in zip(direct, copied):
        assert np.array_equal(np.asarray(ours), theirs)
