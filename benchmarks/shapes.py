"""Model shapes the benchmark builds with random weights, and the prompt it runs.

`mistral-7b` is llava-hf/llava-v1.6-mistral-7b-hf's config.json (transformers' resolved values);
`tiny` keeps its image geometry (336 px tiles, the released pinpoints: the same 2,928 image
tokens for a 672x672 image) with a toy-sized tower and text model, for CI smoke runs.
"""

import copy

RELEASED_PINPOINTS = [[336, 672], [672, 336], [672, 672], [1008, 336], [336, 1008]]

_MISTRAL_7B = {
    "model_type": "llava_next",
    "image_token_index": 32000,
    "image_grid_pinpoints": RELEASED_PINPOINTS,
    "vision_feature_layer": -2,
    "vision_feature_select_strategy": "default",
    "projector_hidden_act": "gelu",
    "tie_word_embeddings": False,
    "text_config": {
        "model_type": "mistral", "hidden_size": 4096, "intermediate_size": 14336, "num_hidden_layers": 32,
        "num_attention_heads": 32, "num_key_value_heads": 8, "vocab_size": 32064, "rope_theta": 1000000.0,
        "rms_norm_eps": 1e-5, "max_position_embeddings": 32768, "sliding_window": None,
    },
    "vision_config": {
        "model_type": "clip_vision_model", "hidden_size": 1024, "intermediate_size": 4096, "num_hidden_layers": 24,
        "num_attention_heads": 16, "image_size": 336, "patch_size": 14, "projection_dim": 768,
        "hidden_act": "quick_gelu", "layer_norm_eps": 1e-5,
    },
}

_TINY = copy.deepcopy(_MISTRAL_7B)
_TINY["text_config"].update(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                            num_key_value_heads=2)
_TINY["vision_config"].update(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                              projection_dim=32)

SHAPES = {"mistral-7b": _MISTRAL_7B, "tiny": _TINY}

IMAGE_SIZE = (672, 672)  # (H, W): 5 tiles at 336 px, 2,928 image tokens
# "[INST] <image>\nWhat is shown in this image? [/INST]" in Mistral's ids (the values only have to
# be valid ids: the weights are random).
PROMPT_HEAD = [1, 733, 16289, 28793, 28705]
PROMPT_TAIL = [13, 3195, 349, 4894, 297, 456, 3469, 28804, 733, 28748, 16289, 28793]


# The parent's machine probes (read bandwidth, float32 GEMM), sized so a tiny run takes seconds:
# a 1 GB buffer and a 1024x4096x4096 GEMM took ~15 s a round on a busy 2-core machine; a tiny model's limits are moot.
PROBES = {
    "mistral-7b": {"bandwidth_bytes": 1 << 30, "gemm_mnk": (1024, 4096, 4096)},
    "tiny": {"bandwidth_bytes": 1 << 27, "gemm_mnk": (256, 1024, 1024)},
}


def config(shape: str) -> dict:
    if shape not in SHAPES:
        raise ValueError(f"unknown shape {shape!r} (choose from {', '.join(SHAPES)})")
    return copy.deepcopy(SHAPES[shape])


def prompt_ids(config: dict, n_image_tokens: int) -> list:
    return PROMPT_HEAD + [config["image_token_index"]] * n_image_tokens + PROMPT_TAIL


def test_image():
    """A deterministic 672x672 RGB image with structure (gradients and a grid), no file needed."""
    import numpy as np
    from PIL import Image

    h, w = IMAGE_SIZE
    y, x = np.mgrid[0:h, 0:w]
    rgb = np.stack([(x * 255 // w), (y * 255 // h), ((x // 24 + y // 24) % 2) * 200 + 20], axis=-1)
    return Image.fromarray(rgb.astype(np.uint8))


def kv_cache_bytes(config: dict, tokens: int, dtype_bytes: int = 4) -> int:
    """mlx-lm's KVCache keeps keys and values in the activation dtype (float32 on the CPU)."""
    from mlx_llava_next.config import LlavaNextConfig  # light: no mlx

    text = LlavaNextConfig.from_dict(config).text_config
    per_token = 2 * text["num_hidden_layers"] * text["num_key_value_heads"] * text["head_dim"] * dtype_bytes
    return per_token * tokens
