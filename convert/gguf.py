"""HF / Hub LLaVA-NeXT checkpoint -> a GGUF pair llama.cpp runs: `<name>-<qtype>.gguf` (the
language model, architecture `llama` or `qwen2`) and `mmproj-<name>-<f32|f16>.gguf` (CLIP tower,
projector and newline, architecture `clip`, the keys and tensor names clip.cpp loads).

llama.cpp's own converter rejects LlavaNextForConditionalGeneration; its legacy mmproj path
needs transformers 4.x and three scripts. This writes both files in one pass, tensor by
tensor (a 7B model never sits in memory whole), into a temporary directory renamed onto the
output only on success.

Choices that differ from the legacy llama.cpp scripts, so that llama.cpp runs the vision
feature layer transformers uses: the mmproj stores `clip.vision.feature_layer` (transformers'
hidden-state index, made non-negative) and only the blocks up to it; grid pinpoints are written
as (width, height) pairs, which is how clip.cpp reads them.
"""

import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import gguf
import mlx.core as mx
import numpy as np

from convert.common import atomic_output_dir, check_output_dir, progress as progress_bar
from convert.gguf_vocab import write_tokenizer
from mlx_llava_next import chat_templates
from mlx_llava_next.config import LlavaNextConfig
from mlx_llava_next.errors import CheckpointError, UnsupportedModelError
from mlx_llava_next.gguf_layout import TEXT_ARCH, permute_rows, qk_heads, text_shapes, to_gguf, vision_shapes
from mlx_llava_next.image_processing import ImageProcessor
from mlx_llava_next.loading import canonical_weights, read_config, read_weights, resolve_model_path
from mlx_llava_next.processing import read_chat_template
from mlx_llava_next.vision import hidden_state_index
from quantize.ggml import FILE_TYPES, check_qtype, encode, nbytes, tensor_type


@dataclass
class Planned:
    gguf_name: str
    source: str  # our (transformers) name
    shape: Tuple[int, ...]
    ggml_type: gguf.GGMLQuantizationType
    permute_heads: Optional[int] = None


def output_names(name: str, qtype: str) -> Tuple[str, str]:
    vision_type = "f32" if qtype == "f32" else "f16"
    return f"{name}-{qtype}.gguf", f"mmproj-{name}-{vision_type}.gguf"


def model_name(src, model_dir: Path) -> str:
    text = str(src).rstrip("/")
    name = text.split("/")[-1] if not Path(text).expanduser().exists() else model_dir.name
    return re.sub(r"[^A-Za-z0-9._-]+", "-", name) or "model"


def check_exportable(config: LlavaNextConfig) -> None:
    """Reject what llama.cpp's llama/qwen2 + clip `mlp` graphs cannot express."""
    text = config.text_config
    if text["model_type"] not in TEXT_ARCH:
        raise UnsupportedModelError(f"text model_type {text['model_type']!r} has no llama.cpp architecture")
    if text["model_type"] != "qwen2" and (text.get("attention_bias") or text.get("mlp_bias")):
        raise UnsupportedModelError("llama-type text models with attention/MLP biases are not supported for GGUF")
    scaling = text.get("rope_scaling")
    if scaling and scaling.get("rope_type", scaling.get("type")) != "linear":
        raise UnsupportedModelError(f"RoPE scaling {scaling!r} is not supported for GGUF (default or linear only)")
    if config.vision_feature_select_strategy != "default":
        raise UnsupportedModelError("llama.cpp always drops the CLS feature: vision_feature_select_strategy must be 'default'")
    if not config.multimodal_projector_bias:
        raise UnsupportedModelError("clip.cpp's llava projector needs biases (multimodal_projector_bias=false)")
    if config.vision_config.get("hidden_act") not in ("quick_gelu", "gelu"):
        raise UnsupportedModelError(f"CLIP activation {config.vision_config.get('hidden_act')!r} is not supported")


def feature_indices(config: LlavaNextConfig) -> List[int]:
    n = config.vision_config["num_hidden_layers"]
    return [hidden_state_index(layer, n) for layer in config.feature_layers]


def source_weights(model_dir: Path) -> Dict[str, mx.array]:
    """Checkpoint tensors (lazy) under our names, vision weights without `vision_model.`."""
    weights = canonical_weights(read_weights(model_dir))
    return {k.replace("vision_tower.vision_model.", "vision_tower."): v for k, v in weights.items()}


def plan(shapes: Dict[str, Tuple[int, ...]], weights: Dict[str, mx.array], qtype: str, text: Dict,
         source: str) -> List[Planned]:
    """One entry per GGUF tensor, checked against the checkpoint before anything is written."""
    by_gguf = {}
    for name in weights:
        g = to_gguf(name)
        if g is not None:
            by_gguf[g] = name
    planned = []
    for g, shape in shapes.items():
        if g not in by_gguf:
            raise CheckpointError(f"{source}: missing tensor for {g} (expected shape {shape})")
        name = by_gguf[g]
        if tuple(weights[name].shape) != shape:
            raise CheckpointError(f"{source}: tensor {name} has shape {tuple(weights[name].shape)}, expected {shape}")
        planned.append(Planned(g, name, shape, tensor_type(g, shape, qtype), qk_heads(name, text)))
    return planned


def write_gguf(path: Path, writer: gguf.GGUFWriter, planned: List[Planned], weights, show: bool, label: str) -> None:
    """Tensor table first, then each tensor converted and appended (bounded memory)."""
    for p in planned:
        writer.add_tensor_info(p.gguf_name, p.shape, np.float32, nbytes(p.shape, p.ggml_type), raw_dtype=p.ggml_type)
    writer.write_header_to_file(path)
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    for p in progress_bar(planned, len(planned), label, enabled=show):
        array = np.array(weights[p.source].astype(mx.float32))
        if p.permute_heads:
            array = permute_rows(array, p.permute_heads)
        writer.write_tensor_data(encode(array, p.ggml_type))
    writer.close()


def text_hyperparameters(writer: gguf.GGUFWriter, text: dict, name: str, qtype: str) -> None:
    """The `<arch>.*` sizes llama.cpp reads for a text model (shared with the benchmark)."""
    writer.add_type(gguf.GGUFType.MODEL)
    writer.add_name(name)
    writer.add_file_type(FILE_TYPES[qtype])
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    writer.add_vocab_size(text["vocab_size"])
    writer.add_context_length(text["max_position_embeddings"])
    writer.add_embedding_length(text["hidden_size"])
    writer.add_feed_forward_length(text["intermediate_size"])
    writer.add_block_count(text["num_hidden_layers"])
    writer.add_head_count(text["num_attention_heads"])
    writer.add_head_count_kv(text["num_key_value_heads"])
    writer.add_key_length(text["head_dim"])
    writer.add_value_length(text["head_dim"])
    writer.add_rope_dimension_count(text["head_dim"])
    writer.add_rope_freq_base(float(text["rope_theta"]))
    writer.add_layer_norm_rms_eps(float(text["rms_norm_eps"]))


def text_metadata(writer: gguf.GGUFWriter, config: LlavaNextConfig, name: str, qtype: str, tokenizer,
                  chat_template: str) -> None:
    text = config.text_config
    text_hyperparameters(writer, text, name, qtype)
    scaling = text.get("rope_scaling")
    if scaling:
        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(float(scaling["factor"]))
    write_tokenizer(writer, tokenizer, text["vocab_size"], chat_template)


def vision_metadata(writer: gguf.GGUFWriter, config: LlavaNextConfig, image_processor: ImageProcessor, name: str,
                    vision_type: str, n_blocks: int) -> None:
    vision = config.vision_config
    writer.add_type(gguf.GGUFType.MMPROJ)
    writer.add_name(name)
    writer.add_description("LLaVA-NeXT image encoder (CLIP + projector) written by mlx-llava-next")
    writer.add_file_type(FILE_TYPES[vision_type])
    writer.add_bool("clip.has_text_encoder", False)
    writer.add_bool("clip.has_vision_encoder", True)
    writer.add_bool("clip.has_llava_projector", True)
    writer.add_string("clip.projector_type", "mlp")
    writer.add_bool("clip.use_gelu", vision["hidden_act"] == "gelu")
    writer.add_uint32("clip.vision.image_size", vision["image_size"])
    writer.add_uint32("clip.vision.patch_size", vision["patch_size"])
    writer.add_uint32("clip.vision.embedding_length", vision["hidden_size"])
    writer.add_uint32("clip.vision.feed_forward_length", vision["intermediate_size"])
    writer.add_uint32("clip.vision.projection_dim", config.text_config["hidden_size"])
    writer.add_uint32("clip.vision.attention.head_count", vision["num_attention_heads"])
    writer.add_float32("clip.vision.attention.layer_norm_epsilon", float(vision["layer_norm_eps"]))
    writer.add_uint32("clip.vision.block_count", n_blocks)
    writer.add_array("clip.vision.feature_layer", [int(i) for i in feature_indices(config)])
    # transformers lists pinpoints as (height, width); clip.cpp reads (width, height).
    writer.add_array("clip.vision.image_grid_pinpoints", [int(v) for h, w in config.image_grid_pinpoints for v in (w, h)])
    writer.add_string("clip.vision.image_aspect_ratio", "anyres")
    writer.add_string("clip.vision.mm_patch_merge_type", "spatial_unpad")
    writer.add_array("clip.vision.image_mean", [float(v) for v in image_processor.image_mean])
    writer.add_array("clip.vision.image_std", [float(v) for v in image_processor.image_std])


def load_tokenizer(model_dir: Path):
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(model_dir)
    except Exception as e:
        raise CheckpointError(f"{model_dir}: cannot load the tokenizer ({e})") from None
    if not getattr(tokenizer, "is_fast", False):
        raise UnsupportedModelError(f"{model_dir}: GGUF export needs a fast (tokenizers) tokenizer")
    return tokenizer


def convert_to_gguf(src, out_dir, qtype: str = "f16", force: bool = False, progress: bool = True,
                    revision: Optional[str] = None) -> Tuple[Path, Path]:
    """Write `<name>-<qtype>.gguf` and `mmproj-<name>-<f32|f16>.gguf` into `out_dir`.

    src: a local llava-hf directory or a Hub id (with an optional `revision`). qtype: f32, f16,
    q8_0 or q4_0 for the language model; the mmproj is f32 when qtype is f32, else f16.
    Returns the two paths."""
    qtype = check_qtype(qtype)
    check_output_dir(out_dir, force, [src] if os.path.exists(str(src)) else [])  # before any work
    model_dir = resolve_model_path(src, revision)
    if not model_dir.is_dir():
        raise CheckpointError(f"{model_dir} is not a model directory")
    config = LlavaNextConfig.from_dict(read_config(model_dir))
    check_exportable(config)
    name = model_name(src, model_dir)
    tokenizer = load_tokenizer(model_dir)
    chat_template = read_chat_template(model_dir) or chat_templates.builtin_for(config, tokenizer)[0]
    image_processor = ImageProcessor.from_pretrained(model_dir)
    weights = source_weights(model_dir)

    text = config.text_config
    tied = config.tie_word_embeddings
    text_plan = plan(text_shapes(text, tied), weights, qtype, text, str(model_dir))
    vision_type = "f32" if qtype == "f32" else "f16"
    n_blocks = max(feature_indices(config))
    projector_in = config.vision_config["hidden_size"] * len(config.feature_layers)
    shapes = vision_shapes(config.vision_config, n_blocks, projector_in, text["hidden_size"], bias=True)
    vision_plan = plan(shapes, weights, vision_type, text, str(model_dir))

    text_name, mmproj_name = output_names(name, qtype)
    out_dir = Path(out_dir)
    with atomic_output_dir(out_dir, force, sources=[model_dir]) as tmp:
        writer = gguf.GGUFWriter(None, TEXT_ARCH[text["model_type"]])
        text_metadata(writer, config, name, qtype, tokenizer, chat_template)
        write_gguf(tmp / text_name, writer, text_plan, weights, progress, f"text  {qtype}")
        writer = gguf.GGUFWriter(None, "clip")
        vision_metadata(writer, config, image_processor, name, vision_type, n_blocks)
        write_gguf(tmp / mmproj_name, writer, vision_plan, weights, progress, f"mmproj {vision_type}")
    return out_dir / text_name, out_dir / mmproj_name
