"""Our runtime on a random model of a released shape: build it in memory, run image -> answer.

The model is built the way `load()` would leave a 4-bit converted checkpoint on the CPU: the
language model quantized (float16 scales and biases, as converted from a half-precision
checkpoint), the CLIP tower and projector in float32, the fast path enabled where it applies.
Weights are drawn lazily and each decoder layer is quantized and evaluated on its own, so the
float32 model never exists whole.
"""

import time
from typing import Optional

import mlx_llava_next  # noqa: F401  (loads an optimized BLAS before mlx.core)

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx.utils import tree_flatten

from mlx_llava_next import fastpath
from mlx_llava_next.config import LlavaNextConfig
from mlx_llava_next.image_processing import ImageProcessor
from mlx_llava_next.model import Model

from . import memory
from .shapes import PROMPT_HEAD, PROMPT_TAIL, kv_cache_bytes, prompt_ids, test_image  # noqa: F401


def build_model(config: dict, bits: int = 4, group_size: int = 64, seed: int = 0, exact: Optional[bool] = None) -> Model:
    mx.random.seed(seed)
    model = Model(LlavaNextConfig.from_dict(config))  # parameters are lazy random arrays

    def quantizable(path, module):
        return model.quant_predicate(path, module) and module.weight.shape[-1] % group_size == 0

    # Half-precision weights before quantizing: scales/biases come out float16, as in a
    # checkpoint converted from the released float16 weights.
    for path, module in model.named_modules():
        if quantizable(path, module):
            module.weight = module.weight.astype(mx.float16)
    nn.quantize(model, group_size=group_size, bits=bits, class_predicate=quantizable)
    for layer in model.language_model.layers:
        mx.eval(layer.parameters())
    mx.eval(model.parameters())
    mx.clear_cache()
    model.eval()
    fastpath.auto_enable(model, exact)
    return model


def parameter_bytes(module) -> int:
    return sum(v.nbytes for _, v in tree_flatten(module.parameters()))


def weight_bytes(model: Model) -> dict:
    """All weights, and what one decode step reads (the text model without the embedding table)."""
    text = parameter_bytes(model.language_model)
    embedding = parameter_bytes(model.language_model.model.embed_tokens)
    return {"weights_bytes": parameter_bytes(model), "decode_read_bytes": text - embedding}


def prefill(model: Model, embeddings: mx.array, cache, step: int) -> mx.array:
    """mlx-lm's generate_step prefill: all tokens but the last in chunks, evaluating the cache
    after each; returns the logits of the last token."""
    lm = model.language_model
    n = embeddings.shape[0]
    done = 0
    while n - done > 1:
        chunk = min(step, n - done - 1)
        lm(None, cache=cache, input_embeddings=embeddings[done : done + chunk][None])
        mx.eval([c.state for c in cache])
        mx.clear_cache()
        done += chunk
    return lm(None, cache=cache, input_embeddings=embeddings[done:][None])[0, -1]


def decode(model: Model, token: mx.array, cache, n: int) -> list:
    """Greedy decoding of n tokens; returns the time after each token."""
    times = []
    for _ in range(n):
        logits = model.language_model(token.reshape(1, 1), cache=cache)[0, -1]
        token = mx.argmax(logits)
        mx.eval(token)
        times.append(time.perf_counter())
    return times


def run(model: Model, config: dict, decode_tokens: int = 64, prefill_step: int = 2048) -> dict:
    """Image -> preprocessing -> vision tower -> prefill -> first token -> decode; times and memory."""
    image = test_image()
    processor = ImageProcessor(image_grid_pinpoints=config["image_grid_pinpoints"])
    rss_reset = memory.reset_peak_rss()
    mx.reset_peak_memory()

    start = time.perf_counter()
    batch = processor([image])
    preprocessed = time.perf_counter()
    features = model.encode_images(batch["pixel_values"], batch["image_sizes"])
    mx.eval(features)
    mx.clear_cache()  # the tower's activations
    encoded = time.perf_counter()
    n_image = features[0].shape[0]
    ids = prompt_ids(config, n_image)
    embeddings = model.embed_inputs(np.asarray(ids)[None], image_features=features)[0]
    mx.eval(embeddings)
    embedded = time.perf_counter()
    cache = model.make_cache()
    first = mx.argmax(prefill(model, embeddings, cache, prefill_step))
    mx.eval(first)
    first_at = time.perf_counter()
    times = decode(model, first, cache, decode_tokens)
    peak_rss = memory.peak_rss()
    mlx_peak = mx.get_peak_memory()
    del cache, embeddings, features
    mx.clear_cache()

    # Decoding right after a short text prompt (what llama-bench's tg test measures).
    short = mx.array(PROMPT_HEAD + PROMPT_TAIL)
    cache = model.make_cache()
    logits = model.language_model(short[None], cache=cache)[0, -1]
    short_start_token = mx.argmax(logits)
    mx.eval(short_start_token)
    short_start = time.perf_counter()
    short_times = decode(model, short_start_token, cache, decode_tokens)

    n_prompt = len(ids)
    return {
        "preprocess_s": preprocessed - start,
        "vision_s": encoded - preprocessed,
        "embed_s": embedded - encoded,
        "prompt_tokens": n_prompt,
        "image_tokens": n_image,
        "prefill_s": first_at - embedded,
        "prefill_tps": n_prompt / (first_at - embedded),
        "ttft_s": first_at - start,
        "decode_tokens": decode_tokens,
        "decode_tps": decode_tokens / (times[-1] - first_at),
        "decode_tps_short": decode_tokens / (short_times[-1] - short_start),
        "peak_rss_bytes": peak_rss,
        "peak_rss_note": None if rss_reset else "includes model building (peak RSS could not be reset)",
        "mlx_peak_bytes": mlx_peak,
        "prefill_step": prefill_step,
        "kv_cache_dtype": getattr(cache[0], "dtype", "float32"),  # kv_cache.py: float16 for this 4-bit model
        "fastpath": fastpath.info(),
        "quantized_layers_fast": sum(isinstance(m, fastpath.FastQuantizedLinear) for _, m in model.named_modules()),
    }


def main(config: dict, bits: int, group_size: int, decode_tokens: int, prefill_step: int,
         gguf_path: Optional[str] = None, exact: Optional[bool] = None) -> dict:
    """The `ours` worker: build, measure, then (optionally) export the same weights for llama.cpp."""
    exact = fastpath.resolve_exact(exact)
    build_start = time.perf_counter()
    model = build_model(config, bits=bits, group_size=group_size, exact=exact)
    result = {"build_s": time.perf_counter() - build_start, "bits": bits, "group_size": group_size, "exact": exact,
              **weight_bytes(model)}
    result.update(run(model, config, decode_tokens=decode_tokens, prefill_step=prefill_step))
    if gguf_path:
        from .llama_cpp import export_text_gguf

        export_start = time.perf_counter()
        export_text_gguf(model, config, gguf_path)
        result["gguf_export_s"] = time.perf_counter() - export_start
    return result
