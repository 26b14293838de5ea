"""What quantization cost: the unquantized and the quantized model on the same prompts.

Both models read a small built-in set of text and image prompts (teacher-forced, one forward
pass each). At every text position we compare the next-token distributions: KL(P_ref ||
P_quant) and whether the top-1 tokens agree; the report gives the means over those positions,
plus bits per weight and size on disk read from the files. Positions whose input is an image
feature are left out: nothing ever reads a prediction made there (as llama.cpp's KL tool
scores text only), and on random test weights their flat distributions make top-1 a coin toss. The reference runs first and is
freed before the quantized model is loaded, so only one model is in memory at a time.
"""

import json
import os
from pathlib import Path
from typing import Dict, Optional, Tuple

import mlx.core as mx
import numpy as np

from mlx_llava_next.loading import (
    MLX_FORMAT_KEY,
    canonical_weights,
    load,
    load_model,
    read_config,
    read_weights,
    resolve_model_path,
)

REPORT_FILE = "quantization_report.json"

# (name, question, images): image specs are (height, width, pattern), drawn by `synthetic_image`.
PROMPTS = [
    ("text-story", "Write a short story about a lighthouse keeper who finds a message in a bottle.", []),
    ("text-facts", "List three facts about the water cycle and explain each in one sentence.", []),
    ("text-code", "What does this Python line do? print(sorted(set(x.lower() for x in words)))", []),
    ("image-chart", "Describe the colours and shapes in this picture.", [(240, 320, "blocks")]),
    ("image-page", "Transcribe the text on this page.", [(400, 300, "page")]),
]


def synthetic_image(height: int, width: int, pattern: str):
    """Deterministic pictures (no files needed): colour blocks on a gradient, or a 'page'."""
    from PIL import Image

    y, x = np.mgrid[0:height, 0:width]
    if pattern == "page":
        rgb = np.full((height, width, 3), 245, dtype=np.uint8)
        rows = (y // 12) % 3 == 0
        words = ((x // 17 + y // 36) % 5) != 0
        margin = (x > width // 10) & (x < width * 9 // 10)
        rgb[rows & words & margin] = 30
    else:
        rgb = np.stack([x * 255 // width, y * 255 // height, (x + y) * 255 // (width + height)], -1)
        rgb = rgb.astype(np.uint8)
        rgb[height // 5 : height // 2, width // 6 : width // 2] = (220, 40, 40)
        rgb[height // 2 : height * 4 // 5, width // 2 : width * 5 // 6] = (40, 60, 200)
    return Image.fromarray(rgb)


def prompt_inputs(processor, question: str, images) -> dict:
    content = [{"type": "image"} for _ in images] + [{"type": "text", "text": question}]
    text = processor.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True)
    pictures = [spec if hasattr(spec, "convert") else synthetic_image(*spec) for spec in images]  # PIL or a spec
    return processor(text, images=pictures or None)


def next_token_logits(model, batch: dict, image_token_id: int, cache=None) -> np.ndarray:
    """Logits [n, vocab] at the text positions of a one-prompt batch (through `cache` if given)."""
    logits = model(batch["input_ids"], pixel_values=batch.get("pixel_values"), image_sizes=batch.get("image_sizes"),
                   cache=cache)
    text = np.asarray(batch["input_ids"])[0] != image_token_id
    return np.array(logits[0].astype(mx.float32))[text]


def _log_softmax(logits: np.ndarray) -> np.ndarray:
    logits = logits.astype(np.float64)
    top = logits.max(axis=-1, keepdims=True)
    return logits - top - np.log(np.exp(logits - top).sum(axis=-1, keepdims=True))


def kl_and_top1(ref_logits: np.ndarray, q_logits: np.ndarray, chunk: int = 256) -> Tuple[np.ndarray, np.ndarray]:
    """Per position: KL(P_ref || P_q) in nats, and whether the argmax tokens agree.

    In float64 (by chunks of positions): small KLs are sums of many tiny terms, which
    float32 cancels into noise (even negative values).
    """
    kl = []
    for start in range(0, len(ref_logits), chunk):
        ref_logp = _log_softmax(ref_logits[start : start + chunk])
        q_logp = _log_softmax(q_logits[start : start + chunk])
        kl.append((np.exp(ref_logp) * (ref_logp - q_logp)).sum(axis=-1))
    agree = ref_logits.argmax(axis=-1) == q_logits.argmax(axis=-1)
    return np.concatenate(kl), agree


def _quant_bits(config: dict, path: str) -> Optional[int]:
    quant = config.get("quantization") or {}
    layer = quant.get(path)
    return (layer if isinstance(layer, dict) else quant).get("bits")


def weight_stats(model_dir) -> Dict[str, float]:
    """Bits per weight (whole model and language model) and bytes on disk, from the files.

    A quantized weight counts its unpacked size in parameters; scales and biases count only
    bytes (mlx-lm's `compute_bits_per_weight` convention).
    """
    model_dir = Path(model_dir)
    config = read_config(model_dir)
    tensors = read_weights(model_dir)  # lazy: shapes and dtypes only
    if config.get(MLX_FORMAT_KEY) is None:
        tensors = canonical_weights(tensors)
    params = {"all": 0, "text": 0}
    nbytes = {"all": 0, "text": 0}
    for name, array in tensors.items():
        path = name.rpartition(".")[0]
        if name.endswith((".scales", ".biases")):
            count = 0
        elif name.endswith(".weight") and f"{path}.scales" in tensors:
            count = array.size * 32 // _quant_bits(config, path)
        else:
            count = array.size
        for part in ("all", "text") if name.startswith("language_model.") else ("all",):
            params[part] += count
            nbytes[part] += array.nbytes
    on_disk = sum(os.path.getsize(p) for p in model_dir.glob("*.safetensors"))
    return {
        "bits_per_weight": 8 * nbytes["all"] / params["all"],
        "text_bits_per_weight": 8 * nbytes["text"] / max(params["text"], 1),
        "size_on_disk_bytes": on_disk,
    }


def quality_report(reference, quantized, dtype: Optional[mx.Dtype] = None, prompts=PROMPTS) -> dict:
    """Compare `quantized` (a converted directory) with `reference` (its unquantized source)."""
    reference_dir, quantized_dir = resolve_model_path(reference), resolve_model_path(quantized)
    model, processor = load(reference_dir, dtype=dtype)
    batches = [prompt_inputs(processor, question, images) for _, question, images in prompts]
    image_token = processor.image_token_id
    expected = [next_token_logits(model, batch, image_token) for batch in batches]
    eos = set(processor.tokenizer.eos_token_ids)
    continued = [_greedy_logits(model, batch, image_token, eos=eos) for batch in batches]  # (c)'s positions
    del model
    mx.clear_cache()
    model, _ = load_model(quantized_dir, dtype=dtype, exact=True)  # the weights' cost alone
    per_prompt, all_kl, all_agree = [], [], []
    for (name, _, _), batch, ref_logits in zip(prompts, batches, expected):
        kl, agree = kl_and_top1(ref_logits, next_token_logits(model, batch, image_token))
        all_kl.append(kl)
        all_agree.append(agree)
        per_prompt.append({"prompt": name, "tokens": int(kl.size), "mean_kl": float(kl.mean()),
                           "top1_agreement": float(agree.mean())})
    kl = np.concatenate(all_kl)
    activations = int8_effect(model, batches, image_token, continued)  # (c)
    kv_cache = kv_cache_effect(model, batches, image_token)  # (b): float16 against float32 KV cache
    kl, agree = np.concatenate(all_kl), np.concatenate(all_agree)
    return {
        "kv_cache_float16": kv_cache,
        "int8_activations": activations,
        "reference": str(reference),
        "quantized": str(quantized),
        "quantization": read_config(quantized_dir).get("quantization"),
        "positions": int(kl.size),
        "mean_kl": float(kl.mean()),
        "max_kl": float(kl.max()),
        "top1_agreement": float(agree.mean()),
        "reference_weights": weight_stats(reference_dir),
        "quantized_weights": weight_stats(quantized_dir),
        "per_prompt": per_prompt,
    }


def kv_cache_effect(model, batches, image_token_id: int) -> dict:
    """KL(float32 KV cache || float16 KV cache) of the quantized model on the report's prompts: each
    prompt prefilled through our cache (kv_cache.py), whose float16 rows every later position reads."""
    from mlx_llava_next.kv_cache import HostKVCache

    kls, agrees = [], []
    for batch in batches:
        logits = [next_token_logits(model, batch, image_token_id, [HostKVCache(dt) for _ in model.layers])
                  for dt in ("float32", "float16")]
        kl, agree = kl_and_top1(*logits)
        kls.append(kl)
        agrees.append(agree)
    kl, agree = np.concatenate(kls), np.concatenate(agrees)
    return {"positions": int(kl.size), "mean_kl": float(kl.mean()), "max_kl": float(kl.max()),
            "top1_agreement": float(agree.mean())}


# The gate for int8 activations by default (issue 18 c): their KL from float activations at most this
# fraction of the weights' own KL, and the greedy continuations' top-1 agreeing this often.
INT8_KL_FRACTION = 0.10
INT8_AGREEMENT = 0.99
CONTINUATION_TOKENS = 32


def _greedy_logits(model, batch: dict, image_token_id: int, tokens=None, n: int = CONTINUATION_TOKENS, eos=()):
    """Prefill the prompt through a cache, then decode up to n tokens: greedily (tokens=None; the
    continuation ends at an `eos` token, as generation does: what follows is never read) or fed
    `tokens` (teacher-forced on another run's continuation). Returns (logits [text positions +
    len(tokens), vocab], the tokens fed or chosen)."""
    if tokens is not None:
        n = len(tokens)
    cache = model.make_cache()
    logits = model(batch["input_ids"], pixel_values=batch.get("pixel_values"), image_sizes=batch.get("image_sizes"),
                   cache=cache)[0]
    text = np.asarray(batch["input_ids"])[0] != image_token_id
    rows = [np.array(logits.astype(mx.float32))[text]]
    chosen = []
    for i in range(n):
        if tokens is None:
            last = rows[-1][-1].copy()
            last[image_token_id] = -np.inf  # an image token would need image features
            token = int(np.argmax(last))
        else:
            token = int(tokens[i])
        chosen.append(token)
        if token in eos:
            break
        if i + 1 < n:
            step = model(mx.array([[token]]), cache=cache)[0]
            rows.append(np.array(step.astype(mx.float32)))
    return np.concatenate(rows), chosen


def int8_effect(model, batches, image_token_id: int, reference_runs) -> Optional[dict]:
    """KL(float activations || int8 activations) of the quantized model (fastpath.py's two modes)
    against KL(reference || quantized, float activations), both at the same positions: the prompts'
    text and the reference's greedy continuation (`reference_runs`: (logits, tokens) per prompt from
    `_greedy_logits`; the quantized runs are teacher-forced on those tokens, so one early
    difference does not decide every later position). The gate: int8's KL <= INT8_KL_FRACTION of the
    weights', and the float and int8 runs' top-1 agree on >= INT8_AGREEMENT of the continuation's
    positions. None where the int8 kernels do not run (no fast path, other CPUs). Measured for every
    weight format the kernels run, including those that keep float activations (fastpath.INT8_BITS,
    INT8_GROUPS)."""
    from mlx_llava_next import fastpath

    layers = [m for _, m in model.named_modules() if isinstance(m, fastpath.FastQuantizedLinear)]
    formats = fastpath.INT8_BITS, fastpath.INT8_GROUPS
    fastpath.INT8_BITS, fastpath.INT8_GROUPS = (4, 8), (32, 64, 128)  # what the kernels can run
    try:
        if not any(fastpath.int8_supported(m["weight"].shape[1] * 32 // m.bits, m.bits, m.group_size) for m in layers):
            return None
        return _int8_effect(model, batches, image_token_id, reference_runs)
    finally:
        fastpath.INT8_BITS, fastpath.INT8_GROUPS = formats
        fastpath.set_exact(model, fastpath.resolve_exact(None))  # as load() leaves it


def _int8_effect(model, batches, image_token_id: int, reference_runs) -> dict:
    from mlx_llava_next import fastpath

    per_prompt, weights_kls, int8_kls, continuation = [], [], [], []
    for batch, (reference, tokens) in zip(batches, reference_runs):
        fastpath.set_exact(model, True)
        exact, _ = _greedy_logits(model, batch, image_token_id, tokens)
        fastpath.set_exact(model, False)
        int8, _ = _greedy_logits(model, batch, image_token_id, tokens)
        weights_kl, _ = kl_and_top1(reference, exact)
        kl, agree = kl_and_top1(exact, int8)
        n = len(tokens)  # rows predicting the continuation: the prompt's last, then n - 1 steps
        weights_kls.append(weights_kl)
        int8_kls.append(kl)
        continuation.append(agree[-n:])
        per_prompt.append({"mean_kl": float(kl.mean()), "weights_kl": float(weights_kl.mean()),
                           "continuation_agreement": float(agree[-n:].mean())})
    kl, agree = np.concatenate(int8_kls), np.concatenate(continuation)
    weights_kl = float(np.concatenate(weights_kls).mean())
    gate = {"kl_fraction_max": INT8_KL_FRACTION, "agreement_min": INT8_AGREEMENT, "weights_kl": weights_kl,
            "kl_fraction": float(kl.mean()) / weights_kl if weights_kl > 0 else float("inf")}
    gate["passed"] = bool(gate["kl_fraction"] <= INT8_KL_FRACTION and agree.mean() >= INT8_AGREEMENT)
    return {"path": fastpath.info()["int8"], "positions": int(kl.size), "mean_kl": float(kl.mean()),
            "max_kl": float(kl.max()), "continuation_positions": int(agree.size),
            "continuation_agreement": float(agree.mean()), "per_prompt": per_prompt, "gate": gate}


def format_report(report: dict) -> str:
    ref, q = report["reference_weights"], report["quantized_weights"]
    lines = [
        f"quality of {report['quantized']} against {report['reference']}",
        f"  mean KL (next-token, {report['positions']} text positions): {report['mean_kl']:.3e} nats"
        f"  (max {report['max_kl']:.3e})",
        f"  top-1 agreement: {100 * report['top1_agreement']:.2f}%",
        f"  bits per weight: {q['bits_per_weight']:.3f} (language model {q['text_bits_per_weight']:.3f});"
        f" reference {ref['bits_per_weight']:.3f}",
        f"  size on disk: {q['size_on_disk_bytes'] / 2**20:.1f} MiB; reference {ref['size_on_disk_bytes'] / 2**20:.1f} MiB",
    ]
    kv = report.get("kv_cache_float16")
    if kv:
        lines.append(f"  float16 KV cache vs float32 (quantized model): mean KL {kv['mean_kl']:.3e} nats"
                     f"  (max {kv['max_kl']:.3e}), top-1 agreement {100 * kv['top1_agreement']:.2f}%")
    a = report.get("int8_activations")
    if a:
        g = a["gate"]
        lines.append(f"  int8 activations vs float ({a['path']} kernels): mean KL {a['mean_kl']:.3e} nats"
                     f" = {100 * g['kl_fraction']:.2f}% of the weights' {g['weights_kl']:.3e} at the same"
                     f" {a['positions']} positions (gate <= {100 * g['kl_fraction_max']:.0f}%);"
                     f" greedy continuations agree on {100 * a['continuation_agreement']:.2f}% of"
                     f" {a['continuation_positions']} positions (gate >= {100 * g['agreement_min']:.0f}%):"
                     f" {'passed' if g['passed'] else 'FAILED'}")
    for i, row in enumerate(report["per_prompt"]):
        int8 = (a or {}).get("per_prompt", [None] * (i + 1))[i]
        lines.append(f"    {row['prompt']:<12} {row['tokens']:>6} tokens  KL {row['mean_kl']:.3e}"
                     f"  top-1 {100 * row['top1_agreement']:.1f}%"
                     + (f"  int8 KL {int8['mean_kl']:.3e}, continuation {100 * int8['continuation_agreement']:.1f}%"
                        if int8 else ""))
    return "\n".join(lines)


def save_report(report: dict, out_dir) -> Path:
    """Write REPORT_FILE into `out_dir` atomically (a finished directory is never left half-written)."""
    path = Path(out_dir) / REPORT_FILE
    tmp = path.with_name(f".{REPORT_FILE}.tmp")
    tmp.write_text(json.dumps(report, indent=2))
    os.replace(tmp, path)
    return path
