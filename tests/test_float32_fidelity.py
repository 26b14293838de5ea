"""Float32 on long prompts: our logits against a float64 transformers run, next to transformers' own float32 run."""

import numpy as np
import pytest

from checkpoints import BACKBONES, build_processor, build_reference

# The issue's bar: 2x transformers' float32 distance from float64, for every backbone. Measured at
# 3,000 tokens (scale 0.15), llama / mistral / qwen2: 1.23x / 1.20x / 0.99x on fastpath's native prompt
# kernel (x86 Linux with a BLAS), 1.10x / 1.25x / 1.17x on attention.py's float64 softmax (elsewhere);
# 1.78x / 2.53x / 1.84x with MLX's CPU exp, 13-17x with mx.fast.rope as well (rope.py). Mistral at
# 8,192 tokens (scale 0.1): 0.92x native (13-60 s here), 0.91x float64 softmax (134 s).
BAR = 2.0


def distances(name, tokens, scale, tmp_path):
    """(ours, transformers float32) max |logit - float64 transformers| over the last 64 positions."""
    torch = pytest.importorskip("torch")
    import mlx.core as mx

    from mlx_llava_next import load

    model, tok, config = build_reference(name, seed=3, text_overrides={"max_position_embeddings": max(4096, tokens)})
    with torch.no_grad():  # realistic scales: logits of about 5-7
        for key, p in model.named_parameters():
            p.normal_(0.0, scale)
            if "norm" in key:
                p.add_(1.0)
    model.save_pretrained(tmp_path)
    build_processor(tok, BACKBONES[name][2]).save_pretrained(tmp_path)
    ids = np.random.default_rng(0).integers(10, 200, size=(1, tokens))
    with torch.no_grad():
        truth = model.double()(input_ids=torch.tensor(ids)).logits[0, -64:].numpy()
        theirs = model.float()(input_ids=torch.tensor(ids)).logits[0, -64:].double().numpy()
    ours_model, _ = load(tmp_path)
    ours = np.array(ours_model(mx.array(ids))[0, -64:]).astype(np.float64)
    assert np.abs(truth).max() > 3.0
    return np.abs(ours - truth).max(), np.abs(theirs - truth).max()


@pytest.mark.parametrize("name", ["llama", "mistral", "qwen2"])
def test_long_prompt_float32_is_as_close_to_float64_as_transformers(name, tmp_path):
    our_error, their_error = distances(name, 3000, 0.15, tmp_path)
    assert our_error <= BAR * their_error, (our_error, their_error)


@pytest.mark.slow  # transformers float64 + float32 and ours over 8,192 tokens
def test_8k_prompt_float32_is_as_close_to_float64_as_transformers(tmp_path):
    our_error, their_error = distances("mistral", 8192, 0.1, tmp_path)
    assert our_error <= BAR * their_error, (our_error, their_error)


def test_reference_rope_matches_transformers_rotary_embedding():
    """The rotation itself, position by position, against transformers' rotary code in float32."""
    torch = pytest.importorskip("torch")
    import mlx.core as mx
    from transformers.models.llama.modeling_llama import LlamaConfig, LlamaRotaryEmbedding, apply_rotary_pos_emb

    from mlx_llava_next.rope import ReferenceRoPE

    dims, base, offset, length = 32, 1e6, 2900, 200
    x = np.random.default_rng(1).standard_normal((1, 2, length, dims)).astype(np.float32)
    emb = LlamaRotaryEmbedding(LlamaConfig(hidden_size=dims * 2, num_attention_heads=2, rope_theta=base,
                                           max_position_embeddings=8192))
    positions = torch.arange(offset, offset + length)[None]
    cos, sin = emb(torch.tensor(x), positions)
    expected, _ = apply_rotary_pos_emb(torch.tensor(x), torch.tensor(x), cos, sin)
    got = np.array(ReferenceRoPE(dims, base=base)(mx.array(x), offset=offset))
    assert np.abs(got - expected.numpy()).max() <= 2e-6
    fast = np.array(mx.fast.rope(mx.array(x), dims, traditional=False, base=base, scale=1.0, offset=offset))
    assert np.abs(got - expected.numpy()).max() < np.abs(fast - expected.numpy()).max()


def _float64_attention(q, k, v, scale, keep):
    """softmax(q k^T * scale) v in float64 over the keys `keep` [L, S] allows, GQA by repetition."""
    group = q.shape[1] // k.shape[1]
    k, v = (np.repeat(a.astype(np.float64), group, axis=1) for a in (k, v))
    scores = np.where(keep, q.astype(np.float64) @ k.swapaxes(-1, -2) * scale, -np.inf)
    weights = np.exp(scores - scores.max(-1, keepdims=True))
    return (weights / weights.sum(-1, keepdims=True)) @ v


@pytest.mark.parametrize("case, path", [("causal", "float64"), ("causal-chunk", "float64"), ("window", "float64"),
                                        ("additive", "float64"), ("causal", "native"), ("causal-chunk", "native")])
def test_prompt_attention_softmax_matches_float64(case, path, monkeypatch):
    """attention.py against float64 NumPy: the causal mask (also a chunk after cached keys), a
    boolean sliding-window mask and an additive one, grouped heads, blocks of queries. Queries and
    keys are multiples of 1/2, so their float32 products are exact and what is left is the softmax
    and the weighted sum; MLX's own function (its CPU exp) is further from float64. Both paths: the
    float64 softmax and, for a causal prompt where it runs, fastpath's native kernel."""
    import mlx.core as mx

    from mlx_llava_next import attention, fastpath

    attention.install()
    if path == "native" and (fastpath.native is None or not fastpath.sgemm_available()):
        pytest.skip("fastpath's native prompt kernel needs the native module and a system cblas_sgemm")
    if path == "float64":
        monkeypatch.setattr(attention, "_native_causal", lambda *args: None)
    else:
        taken = []
        real = attention._native_causal
        monkeypatch.setattr(attention, "_native_causal", lambda *args: taken.append(1) or real(*args))
    L, S, D = 200, 600 if case != "causal-chunk" else 720, 16
    monkeypatch.setattr(attention, "BLOCK_BYTES", 8 * 4 * S * 48)  # 48 queries a block: 5 blocks
    rng = np.random.default_rng(5)
    q = (rng.integers(-8, 9, (1, 4, L, D)) / 2).astype(np.float32)  # scores of a few units after the scale
    k = (rng.integers(-8, 9, (1, 2, S, D)) / 2).astype(np.float32)
    v = rng.standard_normal((1, 2, S, D)).astype(np.float32)
    rows, cols = np.arange(S - L, S)[:, None], np.arange(S)[None]
    keep = rows >= cols
    mask = "causal"
    if case == "window":
        keep = keep & (rows - cols < 64)
        mask = mx.array(keep)
    elif case == "additive":
        mask = mx.array(np.where(keep, 0.0, -np.inf).astype(np.float32))
    expected = _float64_attention(q, k, v, 0.25, keep)
    device = mx.default_device()
    mx.set_default_device(mx.cpu)
    try:
        args = (mx.array(q), mx.array(k), mx.array(v))
        ours = np.array(attention.scaled_dot_product_attention(*args, None, scale=0.25, mask=mask))
        mlx = np.array(mx.fast.scaled_dot_product_attention(*args, scale=0.25, mask=mask))
    finally:
        mx.set_default_device(device)
    rms = lambda a: np.sqrt(np.mean((a - expected) ** 2))  # noqa: E731
    assert path == "float64" or taken
    assert np.abs(ours - expected).max() <= 2.5e-6
    assert rms(ours) < rms(mlx), (rms(ours), rms(mlx))


def test_prompt_attention_leaves_other_cases_to_mlx_lm(monkeypatch):
    """A decode step (one query), half precision and attention sinks go to mlx-lm's function."""
    import mlx.core as mx

    from mlx_llava_next import attention

    attention.install()
    calls = []
    monkeypatch.setattr(attention, "_original", lambda *a, **k: calls.append(k) or "mlx-lm")
    q, k = mx.zeros((1, 4, 1, 8)), mx.zeros((1, 2, 3, 8))
    assert attention.scaled_dot_product_attention(q, k, k, None, scale=1.0) == "mlx-lm"
    q3 = mx.zeros((1, 4, 3, 8), dtype=mx.float16)
    assert attention.scaled_dot_product_attention(q3, k.astype(mx.float16), k.astype(mx.float16), None,
                                                  scale=1.0, mask="causal") == "mlx-lm"
    assert attention.scaled_dot_product_attention(q3.astype(mx.float32), k, k, None, scale=1.0, mask="causal",
                                                  sinks=mx.zeros((4,))) == "mlx-lm"
    assert len(calls) == 3
    from mlx_lm.models import base, llama, qwen2

    assert base.scaled_dot_product_attention is attention.scaled_dot_product_attention
    assert qwen2.scaled_dot_product_attention in (attention.scaled_dot_product_attention, getattr(
        __import__("mlx_llava_next.fastpath", fromlist=["x"]), "scaled_dot_product_attention"))
    assert llama.scaled_dot_product_attention in (attention.scaled_dot_product_attention, getattr(
        __import__("mlx_llava_next.fastpath", fromlist=["x"]), "scaled_dot_product_attention"))


def test_prompt_attention_query_that_sees_no_key_is_finite_like_mlx():
    """Left padding: a query row whose boolean mask is all False averages the values, as MLX's own
    function does (a NaN there would reach the real positions through that row's keys and values)."""
    import mlx.core as mx

    from mlx_llava_next import attention

    attention.install()
    rng = np.random.default_rng(6)
    q, k, v = (mx.array(rng.standard_normal((2, 4, 6, 8)).astype(np.float32)) for _ in range(3))
    keep = np.tril(np.ones((6, 6), bool))[None, None].repeat(2, 0)
    keep[1, :, :, :2] = False  # the second prompt is left-padded by two: its first two rows see nothing
    mask = mx.array(keep)
    ours = np.array(attention.scaled_dot_product_attention(q, k, v, None, scale=0.5, mask=mask))
    mlx = np.array(mx.fast.scaled_dot_product_attention(q, k, v, scale=0.5, mask=mask))
    assert np.isfinite(ours).all() and np.abs(ours - mlx).max() < 1e-5
