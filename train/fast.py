"""Training-only fast activations: MLX's CPU exp is scalar, so exp/sigmoid/softmax are rebuilt from a vector-friendly polynomial."""

import contextlib
import math

import mlx.core as mx
import mlx.nn as nn

LOG2E = 1.4426950408889634
_C = (0.6931471805599453, 0.2402265069591007, 0.05550410866482158, 0.009618129107628477,
      0.0013333558146428443, 0.00015403530393381609)


@mx.compile
def _exp(x):
    t = mx.clip(x, -87.0, 88.0) * LOG2E
    n = mx.floor(t)
    f = t - n
    p = 1.0 + f * (_C[0] + f * (_C[1] + f * (_C[2] + f * (_C[3] + f * (_C[4] + f * _C[5])))))
    return p * ((n.astype(mx.int32) + 127) << 23).view(mx.float32)


@mx.custom_function
def exp(x):
    """exp(x) to ~1e-6 relative (inputs clipped to [-87, 88])."""
    return _exp(x)


@exp.vjp
def _exp_vjp(primals, cotangent, output):
    return cotangent * output


@mx.custom_function
def sigmoid(x):
    return 1.0 / (1.0 + exp(-x))


@sigmoid.vjp
def _sigmoid_vjp(primals, cotangent, output):
    return cotangent * output * (1.0 - output)


def quick_gelu(x):
    return x * sigmoid(1.702 * x)


def gelu(x):
    """tanh-form GELU (within 1e-3 of the erf form the runtime uses)."""
    return x * sigmoid(2.0 * math.sqrt(2.0 / math.pi) * (x + 0.044715 * x * x * x))


def silu(x):
    return x * sigmoid(x)


def swiglu(gate, x):
    return silu(gate) * x


def softmax(x, axis=-1):
    e = exp(x - mx.stop_gradient(mx.max(x, axis=axis, keepdims=True)))
    return e / mx.sum(e, axis=axis, keepdims=True)


def logsumexp(x, axis=-1):
    m = mx.stop_gradient(mx.max(x, axis=axis, keepdims=True))
    return (m + mx.log(mx.sum(exp(x - m), axis=axis, keepdims=True))).squeeze(axis)


def attention(q, k, v, scale, mask=None, **kwargs):
    """softmax(q k^T * scale + mask) v with the fast softmax; mask None, 'causal' or additive/bool."""
    scores = (q * scale) @ k.swapaxes(-1, -2)
    if isinstance(mask, str) and mask == "causal":
        L, S = scores.shape[-2:]
        keep = mx.arange(S)[None] <= (mx.arange(L)[:, None] + (S - L))
        scores = mx.where(keep, scores, -1e9)
    elif mask is not None:
        scores = mx.where(mask, scores, -1e9) if mask.dtype == mx.bool_ else scores + mask
    return softmax(scores) @ v


def cross_entropy(logits, targets):
    """Per-position cross entropy (targets int, any shape)."""
    picked = mx.take_along_axis(logits, targets[..., None], axis=-1).squeeze(-1)
    return logsumexp(logits) - picked


@contextlib.contextmanager
def installed():
    """Point the tower, projector and mlx-lm llama at the fast versions while inside (this process only)."""
    import mlx_lm.models.llama as llama

    from mlx_llava_next import model as llava_model
    from mlx_llava_next import vision

    saved = (vision.quick_gelu, vision.attention, llava_model.nn, llama.swiglu, llama.scaled_dot_product_attention)
    vision.quick_gelu = quick_gelu
    vision.attention = lambda q, k, v, scale, mask=None: attention(q, k, v, scale, mask)
    llava_model.nn = _NNProxy()
    llama.swiglu = swiglu
    llama.scaled_dot_product_attention = (
        lambda queries, keys, values, cache, scale, mask, sinks=None: attention(queries, keys, values, scale, mask))
    try:
        yield
    finally:
        (vision.quick_gelu, vision.attention, llava_model.nn, llama.swiglu, llama.scaled_dot_product_attention) = saved


class _NNProxy:
    """mlx.nn with gelu swapped (what model.Projector calls)."""

    def __getattr__(self, name):
        return gelu if name == "gelu" else getattr(nn, name)
