"""Our KV cache (mlx_llava_next/kv_cache.py) and its native decode step (native/kv.c).

- What we rely on in mlx-lm's KVCache is pinned here: the same calls on both caches give the
  same offsets, fetched rows, state, masks and sizes, so an mlx-lm upgrade that changes them fails.
- The native step (rope + cache write + attention) against float64 numpy softmax attention with
  transformers' rotate-half rope, for the released models' head layouts, on each ISA path this
  CPU runs; float16 rounding against numpy's.
- Whole models: a float32 cache decodes exactly as mlx-lm's cache does; a float16 one stays within
  a KL bound of it.
"""

import copy

import mlx.core as mx
import numpy as np
import pytest
from mlx_lm.models import cache as mlx_cache

from mlx_llava_next import fastpath
from mlx_llava_next.kv_cache import HostKVCache, adopt, for_saving

native = fastpath.native
needs_native = pytest.mark.skipif(not fastpath.available(), reason="native kernels not built (x86-64 Linux only)")


ISA = {"scalar": "scalar", "avx2": "avx2+fma+f16c", "avx512": "avx512f"}


def isa_paths():
    """Each path of kv.c; those this CPU cannot run skip with the reason."""
    runs = native.kv_simd()[1] if native is not None else []
    return [pytest.param(name, id=short, marks=pytest.mark.skipif(name not in runs, reason=f"this CPU cannot run {name}"))
            for short, name in ISA.items()]


@pytest.fixture
def isa(request):
    native.kv_set_simd(request.param)
    yield request.param
    native.kv_set_simd(None)


# -- the mlx-lm behaviour we mirror -------------------------------------------------------------


def _rows(rng, n, heads=2, dim=8):
    return mx.array(rng.standard_normal((1, heads, n, dim)).astype(np.float32))


def test_same_calls_same_results_as_mlx_lm_kvcache():
    """update_and_fetch / offset / trim / state / make_mask / nbytes / step / is_trimmable of
    mlx-lm's KVCache, call for call (float32: exact), across a buffer growth and trims."""
    rng = np.random.default_rng(0)
    theirs, ours = mlx_cache.KVCache(), HostKVCache("float32")
    assert HostKVCache.step == mlx_cache.KVCache.step == 256
    assert theirs.empty() and ours.empty() and theirs.nbytes == ours.nbytes == 0
    for n, trim in [(5, 0), (1, 0), (300, 2), (1, 0), (250, 0), (1, 400)]:
        k, v = _rows(rng, n), _rows(rng, n)
        tk, tv = theirs.update_and_fetch(k, v)
        ok, ov = ours.update_and_fetch(k, v)
        assert ours.offset == theirs.offset == ours.size() == theirs.size()
        assert ok.shape == tk.shape == (1, 2, theirs.offset, 8) and ok.dtype == tk.dtype
        assert np.array_equal(np.asarray(ok), np.asarray(tk)) and np.array_equal(np.asarray(ov), np.asarray(tv))
        # nbytes: the buffers as allocated (theirs grow by concatenation, ours in whole steps)
        assert theirs.nbytes == theirs.keys.nbytes + theirs.values.nbytes
        assert ours.nbytes == ours.keys.nbytes + ours.values.nbytes == 2 * 2 * 8 * 4 * ours.keys.shape[2]
        assert ours.keys.shape[2] % 256 == 0 and ours.keys.shape[2] - 256 < ours.offset <= ours.keys.shape[2]
        for N in (1, 3):
            for return_array in (False, True):
                tm = theirs.make_mask(N, return_array=return_array, window_size=None)
                om = ours.make_mask(N, return_array=return_array, window_size=None)
                assert type(om) is type(tm) and (tm is None or isinstance(tm, str) and om == tm
                                                 or np.array_equal(np.asarray(om), np.asarray(tm)))
        assert ours.is_trimmable() and theirs.is_trimmable()
        assert ours.trim(trim) == theirs.trim(trim)
        (sk, sv, so), (qk, qv, qo) = theirs.state, ours.state
        assert so == qo == theirs.offset  # state is (keys, values, offset); the used rows agree
        assert np.array_equal(np.asarray(sk[:, :, :so]), np.asarray(qk)) and np.array_equal(
            np.asarray(sv[:, :, :so]), np.asarray(qv))
    assert mlx_cache.can_trim_prompt_cache([ours]) and mlx_cache.trim_prompt_cache([ours], 1) == 1


@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_batches_as_mlx_lm_kvcache(dtype):
    """A batch of two rows (a prompt without padding), through numpy: mlx-lm's rows, rounded."""
    rng = np.random.default_rng(9)
    theirs, ours = mlx_cache.KVCache(), HostKVCache(dtype)
    for n in (3, 1, 260):
        k = mx.array(rng.standard_normal((2, 2, n, 8)).astype(np.float32))
        tk, _ = theirs.update_and_fetch(k, k)
        ok, _ = ours.update_and_fetch(k, k)
        expected = np.asarray(tk).astype(np.float16 if dtype == "float16" else np.float32).astype(np.float32)
        assert ok.shape == tk.shape and np.array_equal(np.asarray(ok), expected)
    with pytest.raises(ValueError, match="batch of 2"):
        ours.update_and_fetch(k[:1], k[:1])


def test_mlx_lm_cache_plumbing_we_rely_on(tmp_path):
    """The model asks the cache for its mask; prompt-cache files name their classes in mlx-lm's
    module (so ours is saved as a KVCache); the LRU prompt cache deep-copies what it hands out
    and sizes entries by `nbytes`."""
    from mlx_lm.models import base

    ours = HostKVCache("float16")
    ours.update_and_fetch(_rows(np.random.default_rng(1), 4), _rows(np.random.default_rng(2), 4))
    assert base.create_attention_mask(mx.zeros((1, 3, 8)), ours) == "causal"
    assert base.create_attention_mask(mx.zeros((1, 1, 8)), ours) is None
    mlx_cache.save_prompt_cache(str(tmp_path / "raw.safetensors"), [ours])
    with pytest.raises(KeyError, match="HostKVCache"):  # classes are looked up by name in mlx-lm's module
        mlx_cache.load_prompt_cache(str(tmp_path / "raw.safetensors"))
    lru = mlx_cache.LRUPromptCache(max_size=2)
    lru.insert_cache("m", [1, 2, 3, 4], [ours])
    assert lru.nbytes == ours.nbytes
    got, rest = lru.fetch_nearest_cache("m", [1, 2, 3, 4, 5])
    assert rest == [5] and got[0] is not ours and isinstance(got[0], HostKVCache)
    got[0].trim(2)
    assert ours.offset == 4 and got[0].offset == 2  # a copy
    assert np.array_equal(got[0].keys[:, :, :2], ours.keys[:, :, :2])


def test_save_and_load_through_mlx_lm_prompt_cache_files(tmp_path):
    rng = np.random.default_rng(3)
    ours = [HostKVCache("float16") for _ in range(2)]
    for c in ours:
        c.update_and_fetch(_rows(rng, 7), _rows(rng, 7))
    path = str(tmp_path / "c.safetensors")
    mlx_cache.save_prompt_cache(path, for_saving(ours))
    loaded = mlx_cache.load_prompt_cache(path)
    assert [type(c) for c in loaded] == [mlx_cache.KVCache] * 2

    class Quantized:  # what adopt() asks of a model: its choice (or the fast-path policy)
        kv_cache = "float16"
        layers = []

    back = adopt(Quantized(), loaded)
    for a, b in zip(ours, back):
        assert isinstance(b, HostKVCache) and b.offset == a.offset == 7
        assert np.array_equal(b.keys[:, :, :7], a.keys[:, :, :7]) and np.array_equal(b.values[:, :, :7], a.values[:, :, :7])


def test_deepcopy_is_independent():
    c = HostKVCache("float32")
    c.update_and_fetch(_rows(np.random.default_rng(5), 3), _rows(np.random.default_rng(6), 3))
    d = copy.deepcopy(c)
    d.keys[...] = 0
    assert c.keys[:, :, :3].any() and d.offset == 3


@pytest.mark.parametrize("dtype", ["float16", "float32"])
def test_state_is_the_cache_memory_and_keeps_its_rows(dtype):
    """mlx-lm's prompt loop evaluates every cache's state after each chunk: ours hands back slices of
    its own buffers (no copy of the cache), whose rows later updates leave as they were."""
    rng = np.random.default_rng(8)
    c = HostKVCache(dtype)
    c.update_and_fetch(_rows(rng, 5), _rows(rng, 5))
    keys, values, offset = c.state
    mx.eval(keys, values)
    assert offset == 5 and keys.shape[2] == 5
    assert np.shares_memory(np.asarray(keys), c.keys) and np.shares_memory(np.asarray(values), c.values)
    before = np.array(keys), np.array(values)
    c.update_and_fetch(_rows(rng, 7), _rows(rng, 7))  # room for 12 rows: no new buffer
    assert np.array_equal(np.asarray(keys), before[0]) and np.array_equal(np.asarray(values), before[1])
    assert np.array_equal(np.asarray(c.state[0])[:, :, :5], before[0])


# -- the native step against float64 --------------------------------------------------------

# (query heads, kv heads, head dim) of the released models' language models
LAYOUTS = {
    "mistral-7b/llama3-8b": (32, 8, 128),
    "vicuna-7b": (32, 32, 128),
    "vicuna-13b": (40, 40, 128),
    "yi-34b": (56, 8, 128),
    "qwen-72b": (64, 8, 128),
}


def rotate_half64(x, cos, sin):
    """transformers' apply_rotary_pos_emb on [heads, D] rows in float64 (cos/sin: [dims/2])."""
    half = cos.shape[0]
    x = x.astype(np.float64)
    x1, x2 = x[:, :half], x[:, half : 2 * half]
    c, s = cos.astype(np.float64), sin.astype(np.float64)
    return np.concatenate([x1 * c - x2 * s, x2 * c + x1 * s, x[:, 2 * half :]], axis=1)


def rope32(x, cos, sin):
    """The same in float32 products and sums (what the kernel computes before rounding)."""
    half = cos.shape[0]
    x1, x2 = x[:, :half], x[:, half : 2 * half]
    return np.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin, x[:, 2 * half :]], axis=1)


def decode_cases():
    """Every layout at lengths 1, 17 and 3,000 on the AVX2 path; the scalar and AVX-512 paths (the
    same structure) at 3,000 tokens for two layouts (7 and 8 query heads a group: 4-head blocks, full
    and partial)."""
    for isa in isa_paths():
        for layout in LAYOUTS:
            for length in (1, 17, 3000):
                if isa.id != "avx2" and length == 3000 and layout not in ("mistral-7b/llama3-8b", "yi-34b"):
                    continue
                yield pytest.param(isa.values[0], layout, length, marks=isa.marks, id=f"{isa.id}-{layout}-{length}")


@needs_native
@pytest.mark.parametrize("dtype", ["float32", "float16"])
@pytest.mark.parametrize("isa,layout,length", list(decode_cases()), indirect=["isa"])
def test_native_decode_step_matches_float64(layout, length, dtype, isa):
    H, Hkv, D = LAYOUTS[layout]
    rng = np.random.default_rng(length + H)
    cache = HostKVCache(dtype)
    cache.reserve(Hkv, D, D, length)
    store = np.float16 if dtype == "float16" else np.float32
    old = rng.standard_normal((1, Hkv, length - 1, D), dtype=np.float32)
    cache.keys[:, :, : length - 1] = old.astype(store)
    cache.values[:, :, : length - 1] = (old[..., ::-1] * 0.5).astype(store)
    cache.offset = length - 1
    q, k, v = (rng.standard_normal((1, n * D)).astype(np.float32) for n in (H, Hkv, Hkv))
    angles = rng.uniform(-np.pi, np.pi, D // 2)
    cos, sin = np.cos(angles).astype(np.float32), np.sin(angles).astype(np.float32)
    scale = D**-0.5
    q0, k0 = q.copy(), k.copy()
    out = np.empty_like(q)
    native.kv_decode(q, k, v, cos, sin, cache.keys, cache.values, cache.offset, out, scale, D)

    # the new row: float32 rope, then rounded as numpy rounds
    k_row = rope32(k0.reshape(Hkv, D), cos, sin).astype(store)
    assert np.array_equal(cache.keys[0, :, length - 1], k_row)
    assert np.array_equal(cache.values[0, :, length - 1], v.reshape(Hkv, D).astype(store))
    # float64 attention over what the cache holds, with the float64-roped query
    keys = cache.keys[0, :, :length].astype(np.float64)
    values = cache.values[0, :, :length].astype(np.float64)
    qh = rotate_half64(q0.reshape(H, D), cos, sin).reshape(Hkv, H // Hkv, D)
    scores = (qh @ keys.transpose(0, 2, 1)) * scale  # [Hkv, G, L]
    p = np.exp(scores - scores.max(-1, keepdims=True))
    expected = ((p / p.sum(-1, keepdims=True)) @ values).reshape(1, H * D)
    assert np.max(np.abs(out - expected)) <= 2e-5 * np.max(np.abs(expected))


@needs_native
@pytest.mark.parametrize("isa", isa_paths(), indirect=True)
def test_float16_rounding_equals_numpy(isa):
    """kv_store rounds as numpy's float16 cast (to nearest even; subnormals, overflow, inf, nan)
    and kv_load widens exactly."""
    rng = np.random.default_rng(7)
    special = np.array([0.0, -0.0, 65504.0, 65519.9, 65520.0, 1e6, -1e6, np.inf, -np.inf, 6.1e-5, 6.0e-8,
                        2.9802322e-08, 2.9802326e-08, 1e-9, -3.0e-6, 1.0 + 2.0**-11, 1.0 + 3 * 2.0**-11], np.float32)
    values = np.concatenate([special, rng.standard_normal(3 * 64 * 8 - special.size).astype(np.float32)
                             * np.float32(10.0) ** rng.integers(-8, 5, 3 * 64 * 8 - special.size)])
    rows = values.reshape(1, 3, 64, 8).astype(np.float32)
    cache = np.zeros((1, 3, 70, 8), np.float16)
    native.kv_store(rows, cache, 5)
    with np.errstate(over="ignore"):
        expected = rows.astype(np.float16)
    assert np.array_equal(cache[:, :, 5:69].view(np.uint16), expected.view(np.uint16))
    out = np.empty((1, 3, 69, 8), np.float32)
    native.kv_load(cache, out)
    assert np.array_equal(out, cache[:, :, :69].astype(np.float32))
    nan = np.full((1, 3, 1, 8), np.nan, np.float32)
    native.kv_store(nan, cache, 0)
    assert np.isnan(cache[0, 0, 0]).all()


@needs_native
def test_bad_buffers_are_rejected():
    cache = np.zeros((1, 2, 4, 8), np.float16)
    q, k, cs = np.zeros(16, np.float32), np.zeros(16, np.float32), np.zeros(4, np.float32)
    out = np.zeros(16, np.float32)
    with pytest.raises(ValueError, match="pos"):
        native.kv_decode(q, k, k.copy(), cs, cs, cache, cache.copy(), 4, out, 1.0, 8)
    with pytest.raises(ValueError, match="differ"):
        native.kv_decode(q, k, k.copy(), cs, cs, cache, np.zeros((1, 2, 4, 8), np.float32), 0, out, 1.0, 8)
    with pytest.raises(ValueError, match="q"):
        native.kv_decode(np.zeros(24, np.float32), k, k.copy(), cs, cs, cache, cache.copy(), 0,
                         np.zeros(24, np.float32), 1.0, 8)
    with pytest.raises(ValueError, match="cache"):
        native.kv_store(np.zeros((1, 2, 1, 8), np.float32), np.zeros((2, 4, 8), np.float16), 0)
    with pytest.raises(ValueError, match="fit"):
        native.kv_store(np.zeros((1, 2, 3, 8), np.float32), cache, 2)


# -- whole models ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def quantized_model(tiny_checkpoint, tmp_path_factory):
    """Factory: (checkpoint, 4-bit MLX directory) of a tiny backbone (built once each)."""
    from convert.mlx import convert
    from quantize.mlx import QuantConfig

    built = {}

    def get(name):
        if name not in built:
            out = tmp_path_factory.mktemp("kvcache") / f"{name}-4bit"
            convert(tiny_checkpoint(name).path, out, dtype="float16",
                    quantization=QuantConfig(bits=4, group_size=32), show_progress=False)
            built[name] = (tiny_checkpoint(name), out)
        return built[name]

    return get


def _greedy(model, processor, checkpoint, image, steps_seen=None):
    from mlx_llava_next import stream_generate

    responses = list(stream_generate(model, processor, checkpoint.prompt(), [image], max_tokens=24,
                                     eos_token_ids=()))
    return [r.token for r in responses], np.stack([np.asarray(r.logprobs, dtype=np.float64) for r in responses])


def _kl(p_log, q_log):
    """KL(P || Q) per row, from float32 log-probabilities renormalised in float64 (else their
    rounding, ~1e-6, swamps a KL this small)."""
    def norm(x):
        top = x.max(-1, keepdims=True)
        return x - top - np.log(np.exp(x - top).sum(-1, keepdims=True))

    p_log, q_log = norm(p_log), norm(q_log)
    return np.sum(np.exp(p_log) * (p_log - q_log), axis=-1)


@needs_native
@pytest.mark.parametrize("backbone", ["llama", "qwen2"])
def test_float32_cache_decodes_as_mlx_lm_cache_and_float16_stays_close(backbone, quantized_model, make_image,
                                                                       monkeypatch):
    """Greedy decoding (image prompt: prefill through MLX and the causal kernel, then 23 native
    decode steps) with our float32 cache gives mlx-lm's cache's tokens and log-probabilities bit for
    bit; the float16 cache stays within the KL bound below."""
    from mlx_llava_next import kv_cache, load

    if hasattr(fastpath.FastQuantizedLinear, "exact"):  # float activations: the cache's effect alone
        monkeypatch.setattr(fastpath.FastQuantizedLinear, "exact", True)
    checkpoint, path = quantized_model(backbone)
    image = make_image(100, 150)
    model, processor = load(path, kv_cache="float32")
    assert all(isinstance(c, HostKVCache) and c.dtype == "float32" for c in model.make_cache())
    native_steps = []
    step = fastpath.FastDecodeBlock._native_attention
    monkeypatch.setattr(fastpath.FastDecodeBlock, "_native_attention",
                        lambda self, a, cache, rows: native_steps.append(1) or step(self, a, cache, rows))
    best = native.kv_simd()[0]
    ours_best, ours_best_logp = _greedy(model, processor, checkpoint, image)
    # every single-token step of every block: the prompt's last token, 23 decode steps and the one
    # mlx-lm's generate_step computes ahead
    assert len(native_steps) == 25 * len(model.layers)
    try:  # the AVX2 path does fastpath.attend's arithmetic: bit for bit what the MLX path gives
        native.kv_set_simd("avx2+fma+f16c")
        ours, ours_logp = _greedy(model, processor, checkpoint, image)
    finally:
        native.kv_set_simd(None)

    with monkeypatch.context() as m:  # today's path: mlx-lm's KVCache, rope and cache update in MLX
        m.setattr(kv_cache, "wants_host_cache", lambda model: None)
        assert all(type(c) is mlx_cache.KVCache for c in model.make_cache())
        theirs, theirs_logp = _greedy(model, processor, checkpoint, image)
    assert ours == theirs
    assert np.array_equal(ours_logp, theirs_logp)
    assert ours_best == theirs  # the best path (AVX-512 here?) sums in another order: rounding apart
    assert np.max(np.abs(ours_best_logp - theirs_logp)) <= (0 if best == "avx2+fma+f16c" else 1e-5)

    model.kv_cache = "float16"
    half, half_logp = _greedy(model, processor, checkpoint, image)
    same = next((i for i, (a, b) in enumerate(zip(half, ours)) if a != b), len(ours))
    kl = _kl(ours_logp[: same + 1], half_logp[: same + 1])  # positions with the same context
    print(f"{backbone}: float16 cache, {same} of {len(ours)} tokens equal, KL mean {kl.mean():.2e} max {kl.max():.2e}")
    assert kl.max() <= KL_BOUND


# float16 keeps 11 significant bits (relative rounding <= 2^-12 of each K/V value); KL between two
# close distributions is second order in the logit change, here ~1e-5 on logits ~0.3. Measured
# on these tiny models: KL max 4.8e-13 (llama), 6.8e-13 (qwen2). The bound leaves 150x for other
# seeds and machines while a wrong cache row or a misread value gives KL ~1e-4 and up.
KL_BOUND = 1e-10


@needs_native
def test_native_decode_step_uses_no_mlx(quantized_model, monkeypatch):
    """A block's single-token step on our cache: MLX's rope, the cache's MLX update, the attention
    hook and mx.eval are never called, and the result is the MLX path's."""
    from mlx_llava_next import load

    _, path = quantized_model("llama")
    model, _ = load(path, kv_cache="float32")
    block = model.layers[0]
    rng = np.random.default_rng(8)
    prompt = mx.array(rng.standard_normal((1, 5, 64)).astype(np.float32))
    x = mx.array(rng.standard_normal((1, 1, 64)).astype(np.float32))
    ours, theirs = HostKVCache("float32"), mlx_cache.KVCache()
    block(prompt, mask="causal", cache=ours)
    block(prompt, mask="causal", cache=theirs)
    expected = np.asarray(block(x, cache=theirs))

    def forbidden(*args, **kwargs):
        raise AssertionError("MLX was called in the native decode step")

    with monkeypatch.context() as m:
        m.setattr(type(block.self_attn.rope), "__call__", forbidden)
        m.setattr(HostKVCache, "update_and_fetch", forbidden)
        m.setattr(fastpath, "scaled_dot_product_attention", forbidden)
        m.setattr(fastpath, "evaluated", lambda *a: True)  # x came from numpy: nothing to evaluate
        m.setattr(mx, "eval", forbidden)
        out = block(x, cache=ours)
    assert ours.offset == theirs.offset == 6
    assert np.array_equal(np.asarray(out), expected)


def test_quality_report_prints_the_float16_cache_figure(quantized_model):
    """(b): the quality report's KL(float32 cache || float16 cache) on its prompts (text and image)."""
    from quantize.report import format_report, quality_report

    checkpoint, path = quantized_model("llama")
    report = quality_report(checkpoint.path, path)
    kv = report["kv_cache_float16"]
    assert kv["positions"] == report["positions"] > 0
    assert 0 <= kv["mean_kl"] <= kv["max_kl"]
    # measured: 2.6e-8 with int8 activations (whose rounding turns the cache's tiny changes into
    # larger ones), 2.0e-12 with float ones, against 1.7e-5 for 4-bit quantization itself
    assert kv["mean_kl"] < report["mean_kl"] / 100
    assert "float16 KV cache vs float32" in format_report(report)


@pytest.mark.parametrize("command", ["generate", "ocr"])
def test_cli_kv_cache_flag(quantized_model, tmp_path, monkeypatch, command):
    """--kv-cache float32|float16|auto reaches the caches generation makes; anything else is one
    error line naming the flag's values, before the model loads."""
    import sys
    from pathlib import Path

    from typer.testing import CliRunner

    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from cli import app

    checkpoint, path = quantized_model("llama")
    made = []
    init = HostKVCache.__init__
    monkeypatch.setattr(HostKVCache, "__init__", lambda self, dtype="float16": made.append(dtype) or init(self, dtype))
    args = ["generate", "--model", str(path), "--prompt", "Hi", "--max-tokens", "3", "--json"]
    if command == "ocr":
        from PIL import Image, ImageDraw

        page = Image.new("RGB", (160, 48), (250, 250, 250))
        ImageDraw.Draw(page).text((8, 16), "Total 42", fill=(10, 10, 10))  # ink, or ocr skips it as blank
        page.save(tmp_path / "page.png")
        args = ["ocr", str(tmp_path / "page.png"), "--model", str(path), "--max-tokens", "3", "--out", "-"]
    for choice, expected in [("float32", "float32"), ("auto", "float16")]:
        made.clear()
        result = CliRunner().invoke(app, args + ["--kv-cache", choice])
        assert result.exit_code == 0, result.output
        assert made and set(made) == {expected}
    result = CliRunner().invoke(app, args + ["--kv-cache", "int8"])
    assert result.exit_code == 1 and isinstance(result.exception, SystemExit)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: kv_cache must be one of auto, float16, float32"), lines


def test_serve_kv_cache_flag_checked_before_loading():
    """`serve --kv-cache` takes the same values; a bad one is one error line before the model loads."""
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    done = subprocess.run([sys.executable, "cli.py", "serve", "--model", "no-such-model", "--kv-cache", "int8"],
                          cwd=root, capture_output=True, text=True, timeout=60)
    assert done.returncode == 1, done.stderr
    assert done.stderr.strip().splitlines() == ["error: kv_cache must be one of auto, float16, float32, got 'int8'"]
