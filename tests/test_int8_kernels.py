"""The int8-activation kernels (native/qint8.c via mlx_llava_next.fastpath) against independent oracles.

Oracle 1, the same integer math in numpy: x quantized per group (d = max|x| / 127, xq = rint(x / d)),
sum(q * xq) as exact integers (float64 matmuls of integers below 2^53), then
sum_g scale * d * dot + bias * xsum in float64. The kernels must equal it to float rounding.
Oracle 2, `mx.quantized_matmul` on float activations: the int8 result may differ from it by at
most what rounding x to d * xq can move it, sum |scale * q| * d / 2 (the bias term is exact),
plus float rounding.
Every ISA path this CPU runs is forced in turn (fastpath.set_int8_path); the others skip.
"""

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest

from mlx_llava_next import fastpath

pytestmark = pytest.mark.skipif(not fastpath.available(), reason="native kernels not built (or not x86-64 Linux)")

PATHS = ["avx512vnni", "avx2", "scalar"]
DTYPES = {"f32": mx.float32, "f16": mx.float16, "bf16": mx.bfloat16}
ROUNDING = 1e-6  # of the sum of |terms|: float32 accumulation, several times what the kernels show


@pytest.fixture(params=PATHS)
def path(request):
    available = fastpath.info()["int8_paths"] if fastpath.available() else []
    if request.param not in available:
        pytest.skip(f"this CPU cannot run the {request.param} path (it runs {', '.join(available)})")
    fastpath.set_int8_path(request.param)
    yield request.param
    fastpath.set_int8_path(None)


# -- the oracle ------------------------------------------------------------------------------------


def quantize_x(x: np.ndarray, group: int):
    """(xq int8, d float32, xsum float32, sum|d xq| float64) per group, as the kernels define them:
    xsum is the rounded x's sum, d * sum(xq), so the bias term meets the same x as the scale term."""
    M, K = x.shape
    xg = x.reshape(M, K // group, group)
    d = (np.abs(xg).max(-1) / np.float32(127)).astype(np.float32)
    with np.errstate(divide="ignore", invalid="ignore"):
        q = np.where(d[..., None] > 0, np.rint(xg / d[..., None]), 0)
    q = np.clip(q, -127, 127).astype(np.int8).reshape(M, K)
    qg = q.reshape(M, K // group, group).astype(np.int64)
    xsum = (d * qg.sum(-1).astype(np.float32)).astype(np.float32)  # one float32 product, as the kernels
    return q, d, xsum, d.astype(np.float64) * np.abs(qg).sum(-1)


def unpack(w: np.ndarray, bits: int) -> np.ndarray:
    """uint32 words -> integer values, low bits first (MLX's packing)."""
    per = 32 // bits
    shifts = (np.arange(per, dtype=np.uint32) * bits)[None, None, :]
    return ((w[:, :, None] >> shifts) & np.uint32((1 << bits) - 1)).reshape(w.shape[0], -1)


def int8_oracle(x, w, s, b, bits, group, integer_dots=True):
    """(y, scale of float rounding, bound of the int8 rounding against float activations), float64.

    integer_dots: the per-group integer dot products computed as such (exact integers); else, for
    wide matrices, the same sum as one float64 product (xq d) @ (q s)^T, whose terms are exact
    in float64 (8 + 24 bits each) and whose sum is within 1e-15 of it."""
    q, d, xsum, xabs = quantize_x(x, group)
    Q = unpack(np.asarray(w), bits).astype(np.float64)
    (M, K), N, G = x.shape, Q.shape[0], x.shape[1] // group
    S = np.asarray(s.astype(mx.float32), dtype=np.float64)
    B = np.asarray(b.astype(mx.float32), dtype=np.float64)
    if integer_dots:
        xg = q.astype(np.float64).reshape(M, G, group).transpose(1, 0, 2)  # [G, M, group]
        wg = Q.reshape(N, G, group).transpose(1, 2, 0)  # [G, group, N]
        dots = np.matmul(xg, wg).transpose(1, 2, 0)  # [M, N, G], exact integers
        scaled = S[None] * d[:, None, :].astype(np.float64) * dots
        y = scaled.sum(-1)
        magnitude = np.abs(scaled).sum(-1)
    else:
        xd = q.astype(np.float64) * np.repeat(d.astype(np.float64), group, axis=1)
        qs = Q * np.repeat(S, group, axis=1)
        y = xd @ qs.T
        magnitude = np.abs(xd) @ np.abs(qs).T
    y += xsum.astype(np.float64) @ B.T
    rounding = magnitude + xabs @ np.abs(B).T
    # |x - d * xq| <= d / 2 per element, met by the weight s q_k + b: the product moves by at most
    # sum_k |s q_k + b| d_g / 2
    wabs = np.abs(Q.reshape(N, G, group) * S[..., None] + B[..., None]).sum(-1)  # [N, G]
    bound = (d.astype(np.float64) / 2) @ wabs.T
    return y, rounding, bound


def random_weights(n, k, bits, group, dtype, seed=0):
    """Packed random q (all bit patterns) with trained-model-like scales (~0.002-0.01, bias ~ -8 s)."""
    rng = np.random.default_rng(seed)
    w = rng.integers(0, 2**32, size=(n, k * bits // 32), dtype=np.uint32)
    s = (0.002 + 0.008 * rng.random((n, k // group))).astype(np.float32)
    b = (-s * (2 ** (bits - 1)) * (1 + 0.1 * rng.standard_normal(s.shape))).astype(np.float32)
    return mx.array(w), mx.array(s).astype(dtype), mx.array(b).astype(dtype)


def run(kernel, x, w, s, b, bits, group):
    out = np.empty((x.shape[0], w.shape[0]), dtype=np.float32)
    views = fastpath._HostWeights(w, s, b)
    kernel(np.ascontiguousarray(x, dtype=np.float32), *views.views, out, x.shape[0], w.shape[0], x.shape[1],
           bits, group, views.dtype)
    return out


def check(x, w, s, b, bits, group, against_mlx=True, integer_dots=True):
    y, rounding, bound = int8_oracle(x, w, s, b, bits, group, integer_dots)
    for kernel in (fastpath.native.q8_qmv, fastpath.native.q8_qgemm):
        ours = run(kernel, x, w, s, b, bits, group)
        err = np.abs(ours.astype(np.float64) - y)
        assert np.all(err <= ROUNDING * rounding + 1e-30), (kernel.__name__, float(np.max(err / rounding)))
    if against_mlx:
        # MLX on the rounded activations d * xq: the same product to float rounding (the int8 path
        # only rounds x; a bias term on the unrounded x would miss this by up to the bound)
        q, d, _, _ = quantize_x(x, group)
        rounded = (q.reshape(len(x), -1, group) * d[..., None]).reshape(x.shape).astype(np.float32)
        theirs = np.asarray(mx.quantized_matmul(mx.array(rounded), w, s, b, True, group, bits).astype(mx.float32))
        W = np.asarray(mx.dequantize(w, s.astype(mx.float32), b.astype(mx.float32), group, bits), dtype=np.float64)
        terms = np.abs(rounded.astype(np.float64)) @ np.abs(W).T  # MLX's float32 sum runs over these
        assert np.all(np.abs(ours.astype(np.float64) - theirs) <= ROUNDING * (rounding + terms))
        # MLX on x itself: apart by at most what x's rounding implies
        theirs = np.asarray(mx.quantized_matmul(mx.array(x), w, s, b, True, group, bits).astype(mx.float32))
        gap = np.abs(ours.astype(np.float64) - theirs)
        assert np.all(gap <= bound + 2 * ROUNDING * rounding), float(np.max(gap - bound))
        return float(np.max(gap / bound))


# -- the activation quantization ---------------------------------------------------------------------


def test_quantize_equals_numpy_bit_for_bit(path):
    """On each path: scalar C on the scalar one, 8-lane AVX2 code on the others."""
    rng = np.random.default_rng(0)
    for group in (32, 64, 128):
        x = (rng.standard_normal((9, 512)) * rng.choice([1e-3, 1.0, 50.0], (9, 1))).astype(np.float32)
        x[3, :group] = 0  # an all-zero group: d = 0, xq = 0
        x[4, :group] = np.arange(group) - group / 2 + 0.5  # ties: x / d lands on halves
        x[4, 0] = 127.0  # d = 1: exact halves round to even
        q, d, xsum = np.empty(x.shape, np.int8), np.empty((9, 512 // group), np.float32), np.empty((9, 512 // group), np.float32)
        fastpath.native.q8_quantize(x, q, d, xsum, 9, 512, group)
        eq, ed, esum, _ = quantize_x(x, group)
        assert np.array_equal(q, eq) and np.array_equal(d, ed) and np.array_equal(xsum, esum)
        assert np.abs(q).max() == 127 and d[3, 0] == 0 and not q[3, :group].any()


# -- every format on every path ------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES, ids=list(DTYPES))
@pytest.mark.parametrize("group", [32, 64, 128])
@pytest.mark.parametrize("bits", [4, 8])
def test_every_format(path, bits, group, dtype):
    w, s, b = random_weights(72, 384, bits, group, DTYPES[dtype])  # 72 rows: partial 16- and 64-row blocks
    x = np.random.default_rng(1).standard_normal((40, 384)).astype(np.float32)
    for m in (1, 2, 3, 4, 5, 8, 16, 17, 40):
        check(x[:m], w, s, b, bits, group)


# The (out, in) widths of the released models' projections: q/o (H, H), k/v (kv, H), gate/up (I, H),
# down (H, I); the full input width K, output rows sliced to keep the oracle fast.
SHAPES = {
    "mistral-7b": [(4096, 4096), (1024, 4096), (14336, 4096), (4096, 14336)],
    "vicuna-7b": [(11008, 4096), (4096, 11008)],
    "vicuna-13b": [(5120, 5120), (13824, 5120), (5120, 13824)],
    "yi-34b": [(7168, 7168), (1024, 7168), (20480, 7168), (7168, 20480)],
    "llama3-8b": [(14336, 4096), (1024, 4096), (4096, 14336)],
    "qwen-72b": [(8192, 8192), (1024, 8192), (29568, 8192), (8192, 29568)],
    "qwen-110b": [(49152, 8192), (8192, 49152)],
    "clip-vit-l": [(1024, 1024), (4096, 1024), (1024, 4096)],
}
CASES = [(name, n, k) for name, shapes in SHAPES.items() for n, k in shapes]


@pytest.mark.parametrize("case", range(len(CASES)), ids=[f"{c[0]}-{c[1]}x{c[2]}" for c in CASES])
def test_model_shapes(path, case):
    name, n, k = CASES[case]
    # formats rotate over the cases so each bits / group / scale dtype meets many widths
    bits, group, dtype = (4, 8)[case % 2], (32, 64, 128)[case % 3], list(DTYPES.values())[(case // 2) % 3]
    rows = min(n, 48 if path != "scalar" else 24)  # 48: a partial 64-row block
    w, s, b = random_weights(rows, k, bits, group, dtype, seed=case)
    rng = np.random.default_rng(case)
    ms = (1, 2, 5, 13, 16, 17, 23, 300) if path != "scalar" else (1, 2, 17)  # GEMM remainders (of 8 rows) 0, 1, 2, 4, 5, 7
    x = rng.standard_normal((max(ms), k)).astype(np.float32)
    for m in ms:
        check(x[:m], w, s, b, bits, group, against_mlx=m <= 17, integer_dots=False)


def test_many_rows_decode(path):
    """1,024 rows of the 7B down projection (full K 14336), one row of x: many claims per thread."""
    if path == "scalar":
        pytest.skip("the scalar path on 1,024 x 14,336 takes too long; its formats are tested above")
    w, s, b = random_weights(1024, 14336, 4, 64, mx.float16, seed=3)
    x = np.random.default_rng(3).standard_normal((1, 14336)).astype(np.float32)
    check(x, w, s, b, 4, 64, against_mlx=False, integer_dots=False)


# -- errors and selection -------------------------------------------------------------------------------


def test_bad_arguments_and_paths_are_refused():
    w, s, b = random_weights(8, 96, 4, 32, mx.float32)
    with pytest.raises(ValueError, match="multiple of 64"):
        run(fastpath.native.q8_qmv, np.zeros((1, 96), np.float32), w, s, b, 4, 32)
    with pytest.raises(ValueError, match="unknown int8 path"):
        fastpath.set_int8_path("sse9")
    unavailable = [p for p in PATHS if p not in fastpath.info()["int8_paths"]]
    for p in unavailable:
        with pytest.raises(ValueError, match="cannot run"):
            fastpath.set_int8_path(p)
    assert fastpath.set_int8_path(None) == fastpath.info()["int8_paths"][0]  # the best one


# -- the layer and load() ------------------------------------------------------------------------------------


def fast_layer(in_dims, exact, seed=0):
    mx.random.seed(seed)
    layer = nn.QuantizedLinear(in_dims, 48, bias=True, group_size=32, bits=4)
    layer.update({"weight": random_weights(48, in_dims, 4, 32, mx.float16, seed)[0]})
    mx.eval(layer.parameters())
    plain = nn.QuantizedLinear(in_dims, 48, bias=True, group_size=32, bits=4)
    plain.update(layer.parameters())
    assert fastpath.enable(layer, exact=exact) == 1
    return layer, plain


@pytest.mark.parametrize("rows", [1, 40])
def test_layer_uses_int8_unless_exact(rows):
    x = mx.random.normal((rows, 256))
    layer, plain = fast_layer(256, exact=False)
    w, s, b = layer["weight"], layer["scales"], layer["biases"]
    expected, rounding, _ = int8_oracle(np.asarray(x), w, s, b, 4, 32)
    expected += np.asarray(layer["bias"])
    assert np.all(np.abs(np.asarray(layer(x)) - expected) <= ROUNDING * rounding + 1e-6)
    assert fastpath.set_exact(layer, True) == 1
    assert np.allclose(np.asarray(layer(x)), np.asarray(plain(x)), rtol=1e-5, atol=1e-5)
    assert not np.allclose(np.asarray(layer(x)), expected, rtol=1e-7, atol=1e-7)  # the modes differ


def test_layer_too_narrow_for_int8_keeps_float():
    layer, plain = fast_layer(96, exact=False)  # 96 is not a multiple of 64
    x = mx.random.normal((3, 96))
    assert np.allclose(np.asarray(layer(x)), np.asarray(plain(x)), rtol=1e-5, atol=1e-5)


def test_load_default_exact_and_int8(tiny_checkpoint, tmp_path):
    """int8 activations unless asked for exact ones (the gate holds on the trained demo model: README)."""
    from convert.mlx import convert
    from quantize.mlx import QuantConfig

    from mlx_llava_next import load

    out = convert(tiny_checkpoint("llama").path, tmp_path / "q4", dtype="float16",
                  quantization=QuantConfig(bits=4, group_size=64), show_progress=False)
    assert fastpath.INT8_DEFAULT
    for exact in (True, False):
        kwargs = {"exact": True} if exact else {}
        model, _ = load(out, **kwargs)
        layers = {p: m for p, m in model.named_modules() if isinstance(m, fastpath.FastQuantizedLinear)}
        head = layers.pop("language_model.lm_head")
        assert layers and all(m.exact is exact for m in layers.values())
        assert head.exact is fastpath.HEAD_EXACT or exact  # the head keeps float activations
        assert fastpath.set_exact(model, False) == len(layers) + 1 and head.exact is fastpath.HEAD_EXACT


@pytest.mark.parametrize("bits,group", [(8, 64), (4, 128)])
def test_formats_that_failed_the_gate_keep_float(bits, group):
    """8-bit weights and 4-bit ones in groups of 128 failed the quality gate (README): their layers
    keep float32 activations, even when int8 is asked for."""
    mx.random.seed(2)
    layer = nn.QuantizedLinear(256, 48, bias=False, group_size=group, bits=bits)
    mx.eval(layer.parameters())
    plain = nn.QuantizedLinear(256, 48, bias=False, group_size=group, bits=bits)
    plain.update(layer.parameters())
    assert fastpath.enable(layer, exact=False) == 1 and not layer.exact
    assert not fastpath.int8_supported(256, bits, group)
    x = mx.random.normal((2, 256))
    assert np.allclose(np.asarray(layer(x)), np.asarray(plain(x)), rtol=1e-5, atol=1e-5)


def test_quality_report_gate(tiny_checkpoint, tmp_path):
    """The report's (c) section: KL of int8 against float activations and the gate's arithmetic."""
    from convert.mlx import convert
    from quantize.mlx import QuantConfig
    from quantize.report import INT8_AGREEMENT, INT8_KL_FRACTION, format_report, quality_report

    source = tiny_checkpoint("llama").path
    out = convert(source, tmp_path / "q4", dtype="float16", quantization=QuantConfig(bits=4, group_size=64),
                  show_progress=False)
    report = quality_report(source, out)
    a, gate = report["int8_activations"], report["int8_activations"]["gate"]
    assert a["path"] == fastpath.info()["int8"] and a["positions"] > a["continuation_positions"]
    assert 5 <= a["continuation_positions"] <= 5 * 32  # each continuation ends at 32 tokens or an EOS
    assert 0 < a["mean_kl"] < gate["weights_kl"]  # int8 activations cost far less than 4-bit weights
    assert gate["kl_fraction"] == pytest.approx(a["mean_kl"] / gate["weights_kl"])
    assert gate["passed"] == (gate["kl_fraction"] <= INT8_KL_FRACTION and a["continuation_agreement"] >= INT8_AGREEMENT)
    assert "int8 activations vs float" in format_report(report)
    assert fastpath.INT8_BITS == (4,)


@pytest.mark.parametrize("bits,group", [(4, 32), (4, 64), (4, 128), (8, 64)])
def test_int8_default_follows_the_gate_on_the_trained_demo_model(tmp_path, bits, group):
    """Decision (c): int8 activations are the default only where the quality report's gate holds on
    a trained checkpoint. models/demo in this format, on the report's own prompts and on eight
    in-domain text lines: the gate must hold on both exactly for the formats that take int8
    (fastpath.INT8_DEFAULT, INT8_BITS, INT8_GROUPS)."""
    import sys as _sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    _sys.path.insert(0, str(root))
    from convert.mlx import convert
    from quantize.mlx import QuantConfig
    from quantize.report import quality_report
    from train.data import random_text, render_cells

    out = convert(root / "models" / "demo", tmp_path / "q", dtype="float16",
                  quantization=QuantConfig(bits=bits, group_size=group), show_progress=False)
    rng = np.random.default_rng(7)
    lines = [(f"line-{i}", "Transcribe the text.", [render_cells(random_text(rng, 30, 12), rng).image])
             for i in range(8)]
    gates = [quality_report(root / "models" / "demo", out, **kw)["int8_activations"]["gate"]
             for kw in ({}, {"prompts": lines})]
    takes_int8 = fastpath.INT8_DEFAULT and bits in fastpath.INT8_BITS and group in fastpath.INT8_GROUPS
    assert all(g["passed"] for g in gates) == takes_int8, gates
