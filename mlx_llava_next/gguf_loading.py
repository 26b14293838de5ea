"""`load_gguf`: a llama.cpp GGUF pair (text model + mmproj) -> (Model, Processor).

Accepts the directory holding both files or the text file's path with its mmproj beside it.
Both headers are validated by our bounded reader, the config is rebuilt from the metadata and
checked against every tensor's shape before the model is built or `mx.load` touches the data.
`mx.load` returns Q4_0/Q4_1/Q8_0 tensors as MLX affine triples (group 32), so quantized
matrices run as `QuantizedLinear`/`QuantizedEmbedding` without dequantizing; Q/K rows are put
back in transformers' order. The packing of image features stays HF-exact whatever llama.cpp
itself does with the same files.
"""

import json
import math
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import mlx.core as mx
import mlx.nn as nn
from gguf import GGMLQuantizationType

from . import gguf_layout
from .config import LlavaNextConfig, normalize_text_config
from .errors import CheckpointError, UnsupportedModelError
from .gguf_reader import GGUFHeader, check_tiling, read_header
from .image_processing import ImageProcessor
from .model import Model
from .processing import IMAGE_TOKEN, Processor

T = GGMLQuantizationType
# What mx.load reads: Q4_0/Q4_1/Q8_0 as affine triples; K-quants it dequantizes to float16.
LOADABLE = {T.F32, T.F16, T.BF16, T.Q4_0, T.Q4_1, T.Q8_0, T.Q2_K, T.Q4_K, T.Q6_K}


# -- finding the pair -------------------------------------------------------------------------


def find_pair(path: Path) -> Tuple[GGUFHeader, GGUFHeader]:
    """Validated headers of (text GGUF, mmproj GGUF), from a directory or the text file's path."""
    path = Path(path)
    headers: Dict[Path, GGUFHeader] = {}

    def header(f: Path) -> GGUFHeader:
        if f not in headers:
            headers[f] = read_header(f)
        return headers[f]

    if path.is_dir():
        texts = [f for f in sorted(path.glob("*.gguf")) if header(f).architecture != "clip"]
        if len(texts) != 1:
            found = ", ".join(f.name for f in texts) or "none"
            raise CheckpointError(f"{path}: expected one text GGUF beside the mmproj, found {found}; pass the file path")
        text = texts[0]
    elif path.is_file():
        text = path
    else:
        raise CheckpointError(f"no such GGUF file or directory: {path}")
    if header(text).architecture == "clip":
        raise CheckpointError(f"{text.name} is an mmproj (vision) file; pass the text model GGUF or the directory")
    stem, _, qtype = text.stem.rpartition("-")
    preferred = text.with_name(f"mmproj-{stem}-{'f32' if qtype == 'f32' else 'f16'}.gguf")
    if stem and preferred.is_file():
        return header(text), header(preferred)
    # Otherwise the only `clip` file beside it.
    others = [f for f in sorted(text.parent.glob("*.gguf")) if f != text and header(f).architecture == "clip"]
    if len(others) == 1:
        return header(text), header(others[0])
    if not others:
        raise CheckpointError(f"no mmproj GGUF (architecture 'clip') beside {text}: LLaVA-NeXT needs both files")
    raise CheckpointError(f"several mmproj files beside {text.name} ({', '.join(f.name for f in others)}); "
                          f"name the one to use {preferred.name}")


# -- metadata -> config ---------------------------------------------------------------------


def _count(h: GGUFHeader, key: str, default=None) -> int:
    value = h.metadata.get(key, default)
    if value is None:
        raise h.error(f"missing metadata {key}")
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise h.error(f"metadata {key} = {value!r} is not a positive integer")
    return value


def _float(h: GGUFHeader, key: str, default=None) -> float:
    value = h.metadata.get(key, default)
    if value is None:
        raise h.error(f"missing metadata {key}")
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
        raise h.error(f"metadata {key} = {value!r} is not a positive number")
    return float(value)


def _ints(h: GGUFHeader, key: str) -> Optional[List[int]]:
    value = h.metadata.get(key)
    if value is None:
        return None
    if isinstance(value, (str, list)) or getattr(value, "dtype", None) is None or value.dtype.kind not in "iu":
        raise h.error(f"metadata {key} is not an integer array")
    return [int(v) for v in value]


def _tokens(h: GGUFHeader) -> List[str]:
    tokens = h.metadata.get("tokenizer.ggml.tokens")
    if not isinstance(tokens, list) or not tokens or not all(isinstance(t, str) for t in tokens):
        raise h.error("no tokenizer vocabulary (tokenizer.ggml.tokens)")
    return tokens


def text_config_from(h: GGUFHeader) -> Dict:
    arch = h.architecture
    if arch not in ("llama", "qwen2"):
        raise UnsupportedModelError(f"{h.path.name}: text architecture {arch!r} is not supported (llama, qwen2)")
    if len([n for n in h.tensors if n.startswith("blk.")]) < _count(h, f"{arch}.block_count"):
        raise h.error(f"{arch}.block_count is larger than the number of layer tensors")
    hidden = _count(h, f"{arch}.embedding_length")
    heads = _count(h, f"{arch}.attention.head_count")
    head_dim = _count(h, f"{arch}.attention.key_length", hidden // heads or None)
    if _count(h, f"{arch}.attention.value_length", head_dim) != head_dim:
        raise UnsupportedModelError(f"{h.path.name}: value_length != key_length is not supported")
    if _count(h, f"{arch}.rope.dimension_count", head_dim) != head_dim:
        raise UnsupportedModelError(f"{h.path.name}: partial rotary embeddings are not supported")
    if arch == "llama" and head_dim % 2:
        raise h.error(f"head dimension {head_dim} is odd")
    if heads % _count(h, f"{arch}.attention.head_count_kv", heads):
        raise h.error("attention.head_count is not a multiple of head_count_kv")
    scaling_type = h.metadata.get(f"{arch}.rope.scaling.type", "none")
    if scaling_type not in ("none", "linear"):
        raise UnsupportedModelError(f"{h.path.name}: RoPE scaling {scaling_type!r} is not supported")
    embed = h.tensors.get("token_embd.weight")
    if embed is None or len(embed.shape) != 2:
        raise h.error("missing or malformed token_embd.weight")
    text = dict(
        model_type=arch,
        vocab_size=embed.shape[0],
        hidden_size=hidden,
        intermediate_size=_count(h, f"{arch}.feed_forward_length"),
        num_hidden_layers=_count(h, f"{arch}.block_count"),
        num_attention_heads=heads,
        num_key_value_heads=_count(h, f"{arch}.attention.head_count_kv", heads),
        head_dim=head_dim,
        max_position_embeddings=_count(h, f"{arch}.context_length"),
        rms_norm_eps=_float(h, f"{arch}.attention.layer_norm_rms_epsilon"),
        rope_theta=_float(h, f"{arch}.rope.freq_base", 10000.0),
        sliding_window=None,
    )
    if scaling_type == "linear":
        text["rope_scaling"] = {"rope_type": "linear", "factor": _float(h, f"{arch}.rope.scaling.factor")}
    for name, key in (("bos_token_id", "bos_token_id"), ("eos_token_id", "eos_token_id"), ("pad_token_id", "padding_token_id")):
        value = h.metadata.get(f"tokenizer.ggml.{key}")
        text[name] = value if isinstance(value, int) else None
    return normalize_text_config(text)


def vision_names(h: GGUFHeader) -> Dict[str, str]:
    """Canonical GGUF name -> name in the file (legacy newline name, legacy fc1/fc2 swap)."""
    names = {gguf_layout.LEGACY_NAMES.get(n, n): n for n in h.tensors if not n.startswith("v.post_ln.")}
    for n in names:
        if n.startswith("v.blk.") and not n.split(".")[2].isdigit():
            raise h.error(f"tensor {n!r}: the block index {n.split('.')[2]!r} is not a number")
    down = h.tensors.get("v.blk.0.ffn_down.weight")
    dim = h.metadata.get("clip.vision.embedding_length")
    if down is not None and len(down.shape) == 2 and down.shape[1] == dim and down.shape[0] != dim:
        # The legacy script stored fc1 as ffn_down and fc2 as ffn_up (clip.cpp swaps them back too).
        swap = {"ffn_up": "ffn_down", "ffn_down": "ffn_up"}
        names = {_swap_ffn(k, swap): v for k, v in names.items()}
    return names


def _swap_ffn(name: str, swap: Dict[str, str]) -> str:
    parts = name.split(".")
    if len(parts) == 5 and parts[0] == "v" and parts[3] in swap:
        parts[3] = swap[parts[3]]
    return ".".join(parts)


def vision_config_from(h: GGUFHeader) -> Tuple[Dict, Dict]:
    """(vision_config + llava keys for LlavaNextConfig, image processor fields) from clip.* keys."""
    if h.architecture != "clip":
        raise UnsupportedModelError(f"{h.path.name}: architecture {h.architecture!r} is not an mmproj ('clip')")
    if h.metadata.get("clip.has_vision_encoder") is not True:
        raise UnsupportedModelError(f"{h.path.name}: the mmproj has no vision encoder")
    projector = h.metadata.get("clip.projector_type", h.metadata.get("clip.vision.projector_type"))
    if projector != "mlp":
        raise UnsupportedModelError(f"{h.path.name}: projector type {projector!r} is not LLaVA's 'mlp'")
    if h.metadata.get("clip.use_silu"):
        raise UnsupportedModelError(f"{h.path.name}: SiLU vision encoders are not supported")
    merge = h.metadata.get("clip.vision.mm_patch_merge_type", "spatial_unpad")
    if merge != "spatial_unpad":
        raise UnsupportedModelError(f"{h.path.name}: mm_patch_merge_type {merge!r} is not LLaVA-NeXT's spatial_unpad")
    pinpoints = _ints(h, "clip.vision.image_grid_pinpoints")
    if not pinpoints or len(pinpoints) % 2 or min(pinpoints) < 1:
        raise UnsupportedModelError(f"{h.path.name}: no valid clip.vision.image_grid_pinpoints "
                                    "(a LLaVA-1.5 mmproj, not LLaVA-NeXT?)")
    n_blocks = _count(h, "clip.vision.block_count")
    if len([n for n in h.tensors if n.startswith("v.blk.")]) < n_blocks:
        raise h.error("clip.vision.block_count is larger than the number of block tensors")
    layers = _ints(h, "clip.vision.feature_layer")
    if layers is None:  # legacy files: block_count = HF layers - 1, the blocks feature layer -2 needs
        layers = [n_blocks]
    if not layers or not all(0 <= i <= n_blocks for i in layers):
        raise h.error(f"clip.vision.feature_layer {layers} is out of range for {n_blocks} blocks")
    vision = dict(
        model_type="clip_vision_model",
        hidden_size=_count(h, "clip.vision.embedding_length"),
        intermediate_size=_count(h, "clip.vision.feed_forward_length"),
        num_hidden_layers=n_blocks,
        num_attention_heads=_count(h, "clip.vision.attention.head_count"),
        image_size=_count(h, "clip.vision.image_size"),
        patch_size=_count(h, "clip.vision.patch_size"),
        layer_norm_eps=_float(h, "clip.vision.attention.layer_norm_epsilon"),
        hidden_act="gelu" if h.metadata.get("clip.use_gelu") else "quick_gelu",
    )
    if vision["image_size"] % vision["patch_size"] or vision["hidden_size"] % vision["num_attention_heads"]:
        raise h.error("image_size/patch_size or embedding_length/head_count do not divide")
    mean, std = h.metadata.get("clip.vision.image_mean"), h.metadata.get("clip.vision.image_std")
    if getattr(mean, "shape", None) != (3,) or getattr(std, "shape", None) != (3,) or (std <= 0).any():
        raise h.error("clip.vision.image_mean/image_std must hold 3 values (std > 0)")
    size = vision["image_size"]
    image = dict(
        image_grid_pinpoints=[[h_, w] for w, h_ in zip(pinpoints[0::2], pinpoints[1::2])],  # file: (w, h)
        size={"shortest_edge": size}, crop_size={"height": size, "width": size},
        image_mean=[float(v) for v in mean], image_std=[float(v) for v in std],
    )
    llava = dict(vision_config=vision, vision_feature_layer=layers[0] if len(layers) == 1 else layers,
                 image_grid_pinpoints=image["image_grid_pinpoints"])
    return llava, image


def config_from(text_h: GGUFHeader, vision_h: GGUFHeader) -> Tuple[LlavaNextConfig, Dict]:
    text = text_config_from(text_h)
    llava, image = vision_config_from(vision_h)
    tokens = _tokens(text_h)
    if len(tokens) != text["vocab_size"]:  # ids past the embedding table must never reach it
        raise text_h.error(f"{len(tokens)} tokens in the vocabulary but {text['vocab_size']} embedding rows")
    if IMAGE_TOKEN not in tokens:
        raise UnsupportedModelError(f"{text_h.path.name}: the vocabulary has no {IMAGE_TOKEN} token")
    config = LlavaNextConfig.from_dict(dict(
        model_type="llava_next", text_config=text, image_token_index=tokens.index(IMAGE_TOKEN),
        vision_feature_select_strategy="default", projector_hidden_act="gelu",
        multimodal_projector_bias="mm.0.bias" in vision_h.tensors,
        tie_word_embeddings="output.weight" not in text_h.tensors, **llava,
    ))
    return config, image


def check_shapes(h: GGUFHeader, expected: Dict[str, Tuple[int, ...]], names: Dict[str, str], ignore=()) -> None:
    """Every tensor the config implies is present with its shape and a loadable type; nothing else is."""
    for name, shape in expected.items():
        if name not in names:
            raise h.error(f"missing tensor {name} (expected shape {shape})")
        info = h.tensors[names[name]]
        if info.shape != shape:
            raise h.error(f"tensor {info.name} has shape {info.shape}, expected {shape}")
        if info.ggml_type not in LOADABLE:
            raise UnsupportedModelError(f"{h.path.name}: tensor {info.name} has type {info.ggml_type.name}, "
                                        f"not readable here ({', '.join(t.name for t in LOADABLE)})")
    extra = sorted(set(names) - set(expected) - set(ignore))
    if extra:
        raise UnsupportedModelError(f"{h.path.name}: unexpected tensor(s) {', '.join(extra[:5])}")


# -- weights ----------------------------------------------------------------------------------


def read_tensors(h: GGUFHeader, names: Dict[str, str]) -> Dict[str, mx.array]:
    """mx.load on a validated file; tensors under our names (quantized: .scales/.biases too)."""
    try:
        raw = mx.load(str(h.path))
    except Exception as e:
        raise CheckpointError(f"cannot read {h.path.name}: {e}") from None
    out = {}
    for canonical, stored in names.items():
        ours = gguf_layout.from_gguf(canonical)
        if ours is None:
            continue
        out[ours] = raw[stored]
        if stored.endswith(".weight") and stored[: -len("weight")] + "scales" in raw:
            # mx.load names a quantized `x.weight` as x.weight / x.scales / x.biases, as MLX does.
            for part in ("scales", "biases"):
                out[ours[: -len("weight")] + part] = raw[stored[: -len("weight")] + part]
    return out


def unpermute_qk(weights: Dict[str, mx.array], text: Dict) -> None:
    for key in list(weights):
        name = key.rsplit(".", 1)[0] + ".weight" if key.endswith((".scales", ".biases")) else key
        heads = gguf_layout.qk_heads(name, text)
        if heads:
            weights[key] = gguf_layout.unpermute_rows(weights[key], heads)


def settle_quantized(model: Model, weights: Dict[str, mx.array], dtype) -> Dict[str, Dict]:
    """Keep quantized triples only where a Linear/Embedding runs them (dequantize the rest);
    returns {module path: quantization settings}."""
    modules = dict(model.named_modules())
    settings = {}
    for key in [k for k in weights if k.endswith(".scales")]:
        path = key[: -len(".scales")]
        w, scales, biases = weights[f"{path}.weight"], weights.pop(key), weights.pop(f"{path}.biases")
        bits = w.shape[-1] // scales.shape[-1]  # a group of 32 values packs into `bits` uint32 words
        module = modules.get(path)
        quantizable = isinstance(module, (nn.Linear, nn.Embedding)) and not path.endswith("position_embedding")
        if quantizable:
            # Q4_0/Q8_0 scales are float16 and biases -8/-128 times them: float32 holds both exactly.
            weights[f"{path}.scales"] = scales.astype(dtype or scales.dtype)
            weights[f"{path}.biases"] = biases.astype(dtype or biases.dtype)
            settings[path] = {"group_size": 32, "bits": bits, "mode": "affine"}
        else:
            weights[f"{path}.weight"] = mx.dequantize(w, scales.astype(mx.float32), biases.astype(mx.float32),
                                                      group_size=32, bits=bits)
    return settings


def load_weights(model: Model, text_h: GGUFHeader, vision_h: GGUFHeader, text_names, vision_names_, dtype) -> None:
    from .loading import apply_weights

    weights = read_tensors(text_h, text_names)
    weights.update(read_tensors(vision_h, vision_names_))
    unpermute_qk(weights, model.config.text_config)
    settings = settle_quantized(model, weights, dtype)
    if dtype is not None:
        keep = lambda k, v: k.endswith((".scales", ".biases")) or not mx.issubdtype(v.dtype, mx.floating)  # noqa: E731
        weights = {k: v if keep(k, v) else v.astype(dtype) for k, v in weights.items()}
    weights = model.sanitize(weights)
    if settings:
        nn.quantize(model, class_predicate=lambda path, m: settings.get(path, False))
    apply_weights(model, weights, f"{text_h.path.name} + {vision_h.path.name}")


# -- tokenizer --------------------------------------------------------------------------------


def _ggml_backend(h: GGUFHeader):
    """A tokenizers backend rebuilt from `tokenizer.ggml.*` alone (files from other converters)."""
    from transformers.integrations.gguf.gguf_tokenizer_mapping import GGUF_TOKENIZER_MAPPING, convert_gguf_tokenizer

    meta = h.metadata
    tokenizer_dict = {name: meta[f"tokenizer.{key}"] for key, name in GGUF_TOKENIZER_MAPPING["tokenizer"].items()
                      if f"tokenizer.{key}" in meta}
    for key in ("scores", "token_type"):
        if key in tokenizer_dict:
            tokenizer_dict[key] = list(tokenizer_dict[key].tolist())
    try:
        backend, _ = convert_gguf_tokenizer(h.architecture, tokenizer_dict)
    except Exception as e:
        raise CheckpointError(f"{h.path.name}: cannot build a tokenizer from its GGUF vocabulary ({e})") from None
    return backend


def load_tokenizer(h: GGUFHeader):
    """mlx-lm TokenizerWrapper around the transformers tokenizer the GGUF describes."""
    from mlx_lm.tokenizer_utils import BPEStreamingDetokenizer, NaiveStreamingDetokenizer, SPMStreamingDetokenizer
    from mlx_lm.tokenizer_utils import TokenizerWrapper, _is_bpe_decoder, _is_spm_decoder
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    meta, tokens = h.metadata, _tokens(h)
    hf_json = meta.get("tokenizer.huggingface.json")
    try:
        backend = Tokenizer.from_str(hf_json) if isinstance(hf_json, str) else _ggml_backend(h)
    except Exception as e:
        raise CheckpointError(f"{h.path.name}: invalid tokenizer.huggingface.json ({e})") from None

    def token(key):
        i = meta.get(f"tokenizer.ggml.{key}")
        return tokens[i] if isinstance(i, int) and 0 <= i < len(tokens) else None

    special = {"bos_token": token("bos_token_id"), "eos_token": token("eos_token_id"),
               "unk_token": token("unknown_token_id"), "pad_token": token("padding_token_id")}
    special = {k: v for k, v in special.items() if v is not None}
    extra = [t.content for t in backend.get_added_tokens_decoder().values()
             if t.special and t.content not in special.values()]
    kwargs = {}
    if not isinstance(hf_json, str):  # a rebuilt backend: BOS/EOS behaviour from the GGUF flags
        kwargs = {"add_bos_token": bool(meta.get("tokenizer.ggml.add_bos_token", False)),
                  "add_eos_token": bool(meta.get("tokenizer.ggml.add_eos_token", False))}
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, extra_special_tokens=extra, **special, **kwargs)
    tokenizer.chat_template = meta.get("tokenizer.chat_template")
    decoder = json.loads(backend.to_str()).get("decoder")
    detokenizer = (SPMStreamingDetokenizer if _is_spm_decoder(decoder)
                   else BPEStreamingDetokenizer if _is_bpe_decoder(decoder) else NaiveStreamingDetokenizer)
    eos = [meta[k] for k in ("tokenizer.ggml.eos_token_id", "tokenizer.ggml.eot_token_id") if isinstance(meta.get(k), int)]
    return TokenizerWrapper(tokenizer, detokenizer, eos_token_ids=eos)


# -- entry point ------------------------------------------------------------------------------


def load_gguf(path, dtype: Optional[mx.Dtype] = None):
    """(model, processor) from a GGUF pair: a directory holding both files, or the text GGUF
    path with its mmproj beside it."""
    from .loading import default_dtype

    text_h, vision_h = find_pair(Path(path))
    config, image = config_from(text_h, vision_h)
    text_names = {n: n for n in text_h.tensors}
    vision_names_ = vision_names(vision_h)
    check_shapes(text_h, gguf_layout.text_shapes(config.text_config, config.tie_word_embeddings), text_names)
    vision = config.vision_config
    n_blocks = max(config.feature_layers)
    expected = gguf_layout.vision_shapes(vision, n_blocks, vision["hidden_size"] * len(config.feature_layers),
                                         config.text_config["hidden_size"], config.multimodal_projector_bias)
    unused_blocks = [n for n in vision_names_ if n.startswith("v.blk.") and int(n.split(".")[2]) >= n_blocks]
    if "v.image_newline" not in vision_names_:
        raise vision_h.error("missing tensor v.image_newline (LLaVA-NeXT's row separator)")
    check_shapes(vision_h, expected, vision_names_, ignore=unused_blocks)
    for h in (text_h, vision_h):
        check_tiling(h)  # after the shapes: their errors say more
    vision_names_ = {k: v for k, v in vision_names_.items() if k not in unused_blocks}

    # Only now, with every shape known to match the file, build the model and read the data.
    model = Model(config)
    if dtype is None:
        dtype = default_dtype(None)
    load_weights(model, text_h, vision_h, text_names, vision_names_, dtype)
    mx.eval(model.parameters())
    model.eval()
    processor = Processor(load_tokenizer(text_h), ImageProcessor.from_dict(image), config,
                          chat_template=text_h.metadata.get("tokenizer.chat_template"))
    return model, processor
