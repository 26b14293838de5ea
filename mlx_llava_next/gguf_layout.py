"""The GGUF layout of LLaVA-NeXT, shared by the exporter (convert/gguf.py) and the loader
(gguf_loading.py): tensor names as llama.cpp and clip.cpp load them, and llama.cpp's Q/K
row permutation.

Names on our side are transformers' names below the `language_model.`, `vision_tower.`
(without `vision_model.`) and top-level prefixes; conv weights stay OIHW here.
"""

import re
from typing import Dict, Optional, Tuple

import numpy as np

# Text architectures llama.cpp runs, by transformers text model_type.
TEXT_ARCH = {"llama": "llama", "mistral": "llama", "qwen2": "qwen2"}

TEXT_GLOBAL = {
    "language_model.model.embed_tokens.weight": "token_embd.weight",
    "language_model.model.norm.weight": "output_norm.weight",
    "language_model.lm_head.weight": "output.weight",
}
TEXT_LAYER = {
    "input_layernorm.weight": "attn_norm.weight",
    "self_attn.q_proj.weight": "attn_q.weight",
    "self_attn.k_proj.weight": "attn_k.weight",
    "self_attn.v_proj.weight": "attn_v.weight",
    "self_attn.q_proj.bias": "attn_q.bias",
    "self_attn.k_proj.bias": "attn_k.bias",
    "self_attn.v_proj.bias": "attn_v.bias",
    "self_attn.o_proj.weight": "attn_output.weight",
    "post_attention_layernorm.weight": "ffn_norm.weight",
    "mlp.gate_proj.weight": "ffn_gate.weight",
    "mlp.up_proj.weight": "ffn_up.weight",
    "mlp.down_proj.weight": "ffn_down.weight",
}
VISION_GLOBAL = {
    "vision_tower.embeddings.class_embedding": "v.class_embd",
    "vision_tower.embeddings.patch_embedding.weight": "v.patch_embd.weight",
    "vision_tower.embeddings.position_embedding.weight": "v.position_embd.weight",
    "vision_tower.pre_layrnorm.weight": "v.pre_ln.weight",
    "vision_tower.pre_layrnorm.bias": "v.pre_ln.bias",
    "multi_modal_projector.linear_1.weight": "mm.0.weight",
    "multi_modal_projector.linear_1.bias": "mm.0.bias",
    "multi_modal_projector.linear_2.weight": "mm.2.weight",
    "multi_modal_projector.linear_2.bias": "mm.2.bias",
    # clip.cpp's name (it loads, and does not use, the newline for llava); legacy files say model.image_newline.
    "image_newline": "v.image_newline",
}
VISION_LAYER = {
    "self_attn.q_proj.weight": "attn_q.weight",
    "self_attn.q_proj.bias": "attn_q.bias",
    "self_attn.k_proj.weight": "attn_k.weight",
    "self_attn.k_proj.bias": "attn_k.bias",
    "self_attn.v_proj.weight": "attn_v.weight",
    "self_attn.v_proj.bias": "attn_v.bias",
    "self_attn.out_proj.weight": "attn_out.weight",
    "self_attn.out_proj.bias": "attn_out.bias",
    "layer_norm1.weight": "ln1.weight",
    "layer_norm1.bias": "ln1.bias",
    "layer_norm2.weight": "ln2.weight",
    "layer_norm2.bias": "ln2.bias",
    # fc1 is the up projection (the legacy llama.cpp script swapped these; clip.cpp accepts both).
    "mlp.fc1.weight": "ffn_up.weight",
    "mlp.fc1.bias": "ffn_up.bias",
    "mlp.fc2.weight": "ffn_down.weight",
    "mlp.fc2.bias": "ffn_down.bias",
}
LEGACY_NAMES = {"model.image_newline": "v.image_newline"}

_TEXT_LAYER_RE = re.compile(r"^language_model\.model\.layers\.(\d+)\.(.+)$")
_VISION_LAYER_RE = re.compile(r"^vision_tower\.encoder\.layers\.(\d+)\.(.+)$")
_GGUF_LAYER_RE = re.compile(r"^(v\.)?blk\.(\d+)\.(.+)$")


def to_gguf(name: str) -> Optional[str]:
    """Our (transformers) name -> GGUF name, or None for tensors GGUF has no place for."""
    if name in TEXT_GLOBAL:
        return TEXT_GLOBAL[name]
    if name in VISION_GLOBAL:
        return VISION_GLOBAL[name]
    m = _TEXT_LAYER_RE.match(name)
    if m and m.group(2) in TEXT_LAYER:
        return f"blk.{m.group(1)}.{TEXT_LAYER[m.group(2)]}"
    m = _VISION_LAYER_RE.match(name)
    if m and m.group(2) in VISION_LAYER:
        return f"v.blk.{m.group(1)}.{VISION_LAYER[m.group(2)]}"
    return None


_FROM_GGUF = {v: k for k, v in {**TEXT_GLOBAL, **VISION_GLOBAL}.items()}
_TEXT_LAYER_BACK = {v: k for k, v in TEXT_LAYER.items()}
_VISION_LAYER_BACK = {v: k for k, v in VISION_LAYER.items()}


def from_gguf(name: str) -> Optional[str]:
    """GGUF name -> our (transformers) name, or None if it is not a LLaVA-NeXT tensor."""
    name = LEGACY_NAMES.get(name, name)
    if name in _FROM_GGUF:
        return _FROM_GGUF[name]
    m = _GGUF_LAYER_RE.match(name)
    if not m:
        return None
    vision, index, rest = m.groups()
    if vision:
        return f"vision_tower.encoder.layers.{index}.{_VISION_LAYER_BACK[rest]}" if rest in _VISION_LAYER_BACK else None
    return f"language_model.model.layers.{index}.{_TEXT_LAYER_BACK[rest]}" if rest in _TEXT_LAYER_BACK else None


# -- Q/K permutation ----------------------------------------------------------------------
# llama.cpp's llama architecture applies RoPE to interleaved pairs; transformers rotates
# halves. Its converter regroups the rows of q_proj/k_proj (and their biases) per head so
# that the same model comes out (convert_hf_to_gguf LlamaModel.permute). qwen2 uses NEOX
# (half) rotation in llama.cpp and is not permuted.


def permute_rows(w: np.ndarray, n_head: int) -> np.ndarray:
    """HF rows (per head: first half, second half) -> llama.cpp rows (pairs interleaved)."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def unpermute_rows(w, n_head: int):
    """Inverse of `permute_rows`; works on numpy and mlx arrays (and on packed quantized rows)."""
    rest = tuple(w.shape[1:])
    return w.reshape(n_head, w.shape[0] // n_head // 2, 2, *rest).swapaxes(1, 2).reshape(w.shape)


def qk_heads(name: str, text_config: Dict) -> Optional[int]:
    """Head count to (un)permute a llama-architecture tensor with, None if it is not Q/K."""
    if TEXT_ARCH[text_config["model_type"]] != "llama" or not name.startswith("language_model."):
        return None
    if re.search(r"self_attn\.q_proj\.(weight|bias)$", name):
        return text_config["num_attention_heads"]
    if re.search(r"self_attn\.k_proj\.(weight|bias)$", name):
        return text_config["num_key_value_heads"]
    return None


def text_shapes(text: Dict, tied: bool) -> Dict[str, Tuple[int, ...]]:
    """GGUF name -> numpy shape of every text tensor a config implies."""
    H, I, V = text["hidden_size"], text["intermediate_size"], text["vocab_size"]
    q = text["num_attention_heads"] * text["head_dim"]
    kv = text["num_key_value_heads"] * text["head_dim"]
    shapes = {"token_embd.weight": (V, H), "output_norm.weight": (H,)}
    if not tied:
        shapes["output.weight"] = (V, H)
    layer = {"attn_norm.weight": (H,), "attn_q.weight": (q, H), "attn_k.weight": (kv, H),
             "attn_v.weight": (kv, H), "attn_output.weight": (H, q), "ffn_norm.weight": (H,),
             "ffn_gate.weight": (I, H), "ffn_up.weight": (I, H), "ffn_down.weight": (H, I)}
    if text["model_type"] == "qwen2":
        layer.update({"attn_q.bias": (q,), "attn_k.bias": (kv,), "attn_v.bias": (kv,)})
    for i in range(text["num_hidden_layers"]):
        shapes.update({f"blk.{i}.{k}": v for k, v in layer.items()})
    return shapes


def vision_shapes(vision: Dict, n_blocks: int, projector_in: int, text_hidden: int, bias: bool) -> Dict[str, Tuple[int, ...]]:
    """GGUF name -> numpy shape of every mmproj tensor a config implies."""
    D, F, p = vision["hidden_size"], vision["intermediate_size"], vision["patch_size"]
    positions = (vision["image_size"] // p) ** 2 + 1
    shapes = {
        "v.class_embd": (D,), "v.patch_embd.weight": (D, vision.get("num_channels", 3), p, p),
        "v.position_embd.weight": (positions, D), "v.pre_ln.weight": (D,), "v.pre_ln.bias": (D,),
        "mm.0.weight": (text_hidden, projector_in), "mm.2.weight": (text_hidden, text_hidden),
        "v.image_newline": (text_hidden,),
    }
    if bias:
        shapes.update({"mm.0.bias": (text_hidden,), "mm.2.bias": (text_hidden,)})
    layer = {"attn_q.weight": (D, D), "attn_k.weight": (D, D), "attn_v.weight": (D, D), "attn_out.weight": (D, D),
             "attn_q.bias": (D,), "attn_k.bias": (D,), "attn_v.bias": (D,), "attn_out.bias": (D,),
             "ln1.weight": (D,), "ln1.bias": (D,), "ln2.weight": (D,), "ln2.bias": (D,),
             "ffn_up.weight": (F, D), "ffn_up.bias": (F,), "ffn_down.weight": (D, F), "ffn_down.bias": (D,)}
    for i in range(n_blocks):
        shapes.update({f"v.blk.{i}.{k}": v for k, v in layer.items()})
    return shapes
