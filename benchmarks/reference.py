"""transformers (PyTorch) on a random model of the same shape: the reference runtime's speed.

Same steps as ours: its own image processor (PIL backend), the vision tower with projector and
packing (`get_image_features`), one prefill of the whole prompt (`logits_to_keep=1`, as
`generate` does), then greedy decoding with its KV cache. torch threads = the benchmark's.

A released 7B shape does not fit in memory in float32 here, and torch's bfloat16 matmul on CPUs
without AVX-512 BF16 runs at well under 1 GFLOP/s. `layers=N` runs the reference with N decoder
layers and extrapolates the text model's times linearly to the full depth: the fixed part
(embedding, final norm, head) and the per-layer part come from runs with N and with 1 layer.
"""

import time
from typing import Optional

from .memory import available_bytes, peak_rss, reset_peak_rss
from .shapes import prompt_ids, test_image


def text_params(text: dict, layers: int) -> int:
    H, I, V = text["hidden_size"], text["intermediate_size"], text["vocab_size"]
    heads, kv = text["num_attention_heads"], text["num_key_value_heads"]
    head_dim = text.get("head_dim") or H // heads
    per_layer = H * head_dim * (2 * heads + 2 * kv) + 3 * H * I + 2 * H
    return layers * per_layer + 2 * V * H + H


def vision_params(vision: dict) -> int:
    D, F, L = vision["hidden_size"], vision["intermediate_size"], vision["num_hidden_layers"]
    return L * (4 * D * D + 2 * D * F) + (vision["image_size"] // vision["patch_size"]) ** 2 * D


def gemm_gflops(torch, dtype, n: int = 256, k: int = 1024) -> float:
    a, b = torch.randn(n, k, dtype=dtype), torch.randn(k, k, dtype=dtype)
    a @ b
    start = time.perf_counter()
    a @ b
    return 2 * n * k * k / (time.perf_counter() - start) / 1e9


def build(config: dict, dtype, layers: int, seed: int = 0):
    import torch
    from transformers import LlavaNextConfig, LlavaNextForConditionalGeneration

    hf = dict(config)
    hf["text_config"] = dict(config["text_config"], num_hidden_layers=layers)
    torch.manual_seed(seed)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)  # initialise directly in the target dtype (no float32 copy)
    try:
        model = LlavaNextForConditionalGeneration(LlavaNextConfig(**hf))
    finally:
        torch.set_default_dtype(previous)
    return model.eval()


def text_times(torch, model, embeddings, decode_tokens: int):
    """(prefill seconds, decode tokens/s) of the language model on `embeddings` [1, L, D]."""
    with torch.inference_mode():
        start = time.perf_counter()
        out = model(inputs_embeds=embeddings, use_cache=True, logits_to_keep=1)
        token = out.logits[:, -1].argmax(-1, keepdim=True)
        prefill_s = time.perf_counter() - start
        cache = out.cache
        start = time.perf_counter()
        for _ in range(decode_tokens):
            out = model(input_ids=token, cache=cache, use_cache=True)
            cache = out.cache
            token = out.logits[:, -1].argmax(-1, keepdim=True)
        decode_s = time.perf_counter() - start
    return prefill_s, decode_s


def run(config: dict, dtype: str = "bfloat16", layers: Optional[int] = None, decode_tokens: int = 64,
        threads: int = 2, max_seconds: float = 7200.0) -> dict:
    import torch
    from transformers.models.llava_next.image_processing_pil_llava_next import LlavaNextImageProcessorPil

    torch.set_num_threads(threads)
    torch_dtype = getattr(torch, dtype)
    text = config["text_config"]
    depth = text["num_hidden_layers"]
    layers = depth if layers is None else max(2, min(layers, depth))
    n_prompt = len(prompt_ids(config, 2928))
    size = torch_dtype.itemsize if hasattr(torch_dtype, "itemsize") else torch.finfo(torch_dtype).bits // 8
    params = text_params(text, layers) + vision_params(config["vision_config"])
    need = params * size * 1.2 + (1 << 30)
    result = {"dtype": dtype, "threads": threads, "layers_run": layers, "layers": depth,
              "extrapolated": layers < depth, "vision_s": None, "prefill_tps": None, "ttft_s": None,
              "decode_tps": None, "peak_rss_bytes": None}
    if need > available_bytes():
        result["skipped"] = (f"needs about {need / 1e9:.1f} GB for {dtype} weights, "
                             f"{available_bytes() / 1e9:.1f} GB available (try --transformers-layers)")
        return result
    gflops = gemm_gflops(torch, torch_dtype)
    estimate = 2 * (text_params(text, layers) * n_prompt + vision_params(config["vision_config"]) * 5 * 577) / (gflops * 1e9)
    result["gemm_gflops"] = gflops
    if estimate > max_seconds:
        result["skipped"] = (f"torch {dtype} matmul runs at {gflops:.2f} GFLOP/s here: the run would take about "
                             f"{estimate / 3600:.1f} h (limit {max_seconds / 3600:.1f} h)")
        return result

    model = build(config, torch_dtype, layers)
    processor = LlavaNextImageProcessorPil(image_grid_pinpoints=config["image_grid_pinpoints"],
                                           size={"shortest_edge": 336}, crop_size={"height": 336, "width": 336})
    reset_peak_rss()
    image = test_image()
    with torch.inference_mode():
        start = time.perf_counter()
        batch = processor([image], return_tensors="pt")
        preprocessed = time.perf_counter()
        pixels = batch["pixel_values"].to(torch_dtype)
        features = model.model.get_image_features(pixels, batch["image_sizes"]).pooler_output
        encoded = time.perf_counter()
        n_image = sum(f.shape[0] for f in features)
        ids = torch.tensor([prompt_ids(config, n_image)])
        embeddings = model.get_input_embeddings()(ids)
        mask = ids[0] == config["image_token_index"]
        embeddings[0, mask] = torch.cat(list(features)).to(embeddings.dtype)
        embedded = time.perf_counter()
    prefill_s, decode_s = text_times(torch, model, embeddings, decode_tokens)
    rss = peak_rss()
    if layers < depth:
        # the same with one layer: the per-layer part is the difference
        per_layer_bytes = sum(p.numel() * p.element_size() for p in model.model.language_model.layers[0].parameters())
        model.model.language_model.layers = model.model.language_model.layers[:1]
        model.config.text_config.num_hidden_layers = 1
        prefill_1, decode_1 = text_times(torch, model, embeddings, decode_tokens)
        # a layer cannot take negative time: on tiny models timing noise can make the longer run
        # the faster one, which would extrapolate to a negative total
        scale = (depth - 1) / (layers - 1)
        prefill_s = prefill_1 + max(prefill_s - prefill_1, 0.0) * scale
        decode_s = decode_1 + max(decode_s - decode_1, 0.0) * scale
        rss += (depth - layers) * per_layer_bytes
    result.update({
        "preprocess_s": preprocessed - start,
        "vision_s": encoded - preprocessed,
        "embed_s": embedded - encoded,
        "prompt_tokens": int(ids.shape[1]),
        "prefill_s": prefill_s,
        "prefill_tps": ids.shape[1] / prefill_s,
        "ttft_s": embedded - start + prefill_s,
        "decode_tps": decode_tokens / decode_s,
        "peak_rss_bytes": int(rss),
    })
    return result
