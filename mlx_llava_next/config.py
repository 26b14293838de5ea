"""Normalise a llava-hf `config.json` into the values transformers would resolve.

Hub text configs are partial (keys equal to the class defaults are left out), transformers 5
writes `rope_parameters` instead of `rope_theta`, and mlx-lm's own defaults differ from
transformers' (it ties embeddings by default). Everything is filled here, once.
"""

import copy
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Union

from .errors import UnsupportedModelError

# transformers 5 config-class defaults for the text backbones LLaVA-NeXT ships with.
TEXT_DEFAULTS: Dict[str, Dict[str, Any]] = {
    "llama": dict(
        vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
        num_attention_heads=32, num_key_value_heads=None, head_dim=None,
        max_position_embeddings=2048, rms_norm_eps=1e-6, rope_theta=10000.0,
        attention_bias=False, mlp_bias=False, sliding_window=None,
        bos_token_id=1, eos_token_id=2, pad_token_id=None,
    ),
    "mistral": dict(
        vocab_size=32000, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
        num_attention_heads=32, num_key_value_heads=8, head_dim=None,
        max_position_embeddings=131072, rms_norm_eps=1e-6, rope_theta=10000.0,
        attention_bias=False, mlp_bias=False, sliding_window=4096,
        bos_token_id=1, eos_token_id=2, pad_token_id=None,
    ),
    "qwen2": dict(
        vocab_size=151936, hidden_size=4096, intermediate_size=22016, num_hidden_layers=32,
        num_attention_heads=32, num_key_value_heads=32, head_dim=None,
        max_position_embeddings=32768, rms_norm_eps=1e-6, rope_theta=10000.0,
        sliding_window=None, use_sliding_window=False,
        bos_token_id=None, eos_token_id=None, pad_token_id=None,
    ),
}

# The mlx-lm module that runs each text backbone.
MLX_LM_ARCH = {"llama": "llama", "mistral": "llama", "qwen2": "qwen2"}

# LlavaNextConfig's vision default is CLIP ViT-L/14-336, not CLIPVisionConfig's own defaults.
VISION_DEFAULTS: Dict[str, Any] = dict(
    hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
    image_size=336, patch_size=14, num_channels=3, hidden_act="quick_gelu", layer_norm_eps=1e-5,
)

DEFAULT_PINPOINTS = [[336, 672], [672, 336], [672, 672], [1008, 336], [336, 1008]]


def _rope(text: Dict[str, Any]) -> Dict[str, Any]:
    """Read rope theta/scaling from either the 4.x keys or transformers 5 `rope_parameters`."""
    params = text.pop("rope_parameters", None) or {}
    if "rope_theta" in params and text.get("rope_theta") is None:
        text["rope_theta"] = params["rope_theta"]
    rope_type = params.get("rope_type", params.get("type", "default"))
    if rope_type != "default" and not text.get("rope_scaling"):
        text["rope_scaling"] = {k: v for k, v in params.items() if k != "rope_theta"}
    scaling = text.get("rope_scaling")
    if scaling and scaling.get("rope_type", scaling.get("type")) == "default":
        text["rope_scaling"] = None
    return text


def normalize_text_config(text_config: Optional[Dict[str, Any]]) -> Dict[str, Any]:
    """A complete text config (transformers' resolved values) from a possibly partial one."""
    text = copy.deepcopy(text_config or {})
    model_type = text.get("model_type") or "llama"
    if model_type not in TEXT_DEFAULTS:
        raise UnsupportedModelError(
            f"text model_type {model_type!r} is not supported "
            f"(supported: {', '.join(sorted(TEXT_DEFAULTS))})"
        )
    text = _rope(text)
    resolved = dict(TEXT_DEFAULTS[model_type])
    resolved.update(text)
    resolved["model_type"] = model_type
    if resolved.get("rope_theta") is None:
        resolved["rope_theta"] = TEXT_DEFAULTS[model_type]["rope_theta"]
    if resolved.get("num_key_value_heads") is None:
        resolved["num_key_value_heads"] = resolved["num_attention_heads"]
    if resolved.get("head_dim") is None:
        resolved["head_dim"] = resolved["hidden_size"] // resolved["num_attention_heads"]
    if model_type == "qwen2" and not resolved.get("use_sliding_window"):
        resolved["sliding_window"] = None
    return resolved


@dataclass
class LlavaNextConfig:
    text_config: Dict[str, Any]
    vision_config: Dict[str, Any]
    image_token_index: int = 32000
    image_grid_pinpoints: List[List[int]] = field(default_factory=lambda: DEFAULT_PINPOINTS)
    vision_feature_layer: Union[int, List[int]] = -2
    vision_feature_select_strategy: str = "default"
    projector_hidden_act: str = "gelu"
    multimodal_projector_bias: bool = True
    tie_word_embeddings: bool = False

    @property
    def feature_layers(self) -> List[int]:
        layer = self.vision_feature_layer
        return list(layer) if isinstance(layer, (list, tuple)) else [layer]

    @property
    def text_arch(self) -> str:
        return MLX_LM_ARCH[self.text_config["model_type"]]

    @property
    def sliding_window(self) -> Optional[int]:
        """Mistral's attention window (None: full attention); Qwen2 here never slides."""
        if self.text_config["model_type"] != "mistral":
            return None
        return self.text_config.get("sliding_window")

    def mlx_lm_args(self) -> Dict[str, Any]:
        """Keyword arguments for mlx-lm's `ModelArgs.from_dict` of the text backbone.

        The sliding window is applied by `model.Model` (mlx-lm's llama needs at least one
        full-attention layer, Mistral has none)."""
        args = dict(self.text_config)
        args["model_type"] = self.text_arch
        args["tie_word_embeddings"] = self.tie_word_embeddings
        args["sliding_window"] = None
        args.pop("layer_types", None)
        return args

    @classmethod
    def from_dict(cls, config: Dict[str, Any]) -> "LlavaNextConfig":
        model_type = config.get("model_type", "llava_next")
        if model_type != "llava_next":
            raise UnsupportedModelError(
                f"model_type {model_type!r} is not LLaVA-NeXT (expected 'llava_next')"
            )
        vision = dict(VISION_DEFAULTS)
        vision.update(config.get("vision_config") or {})
        vision_type = vision.get("model_type", "clip_vision_model")
        if vision_type not in ("clip_vision_model", "clip"):
            raise UnsupportedModelError(f"vision model_type {vision_type!r} is not supported (CLIP only)")
        text = normalize_text_config(config.get("text_config"))
        tie = config.get("tie_word_embeddings")
        if tie is None:
            tie = (config.get("text_config") or {}).get("tie_word_embeddings", False)
        image_token = config.get("image_token_index", config.get("image_token_id"))
        strategy = config.get("vision_feature_select_strategy", "default")
        if strategy not in ("default", "full"):
            raise UnsupportedModelError(f"vision_feature_select_strategy {strategy!r} is not supported")
        return cls(
            text_config=text,
            vision_config=vision,
            image_token_index=32000 if image_token is None else int(image_token),
            image_grid_pinpoints=config.get("image_grid_pinpoints") or DEFAULT_PINPOINTS,
            vision_feature_layer=config.get("vision_feature_layer", -2),
            vision_feature_select_strategy=strategy,
            projector_hidden_act=config.get("projector_hidden_act", "gelu"),
            multimodal_projector_bias=config.get("multimodal_projector_bias", True),
            tie_word_embeddings=bool(tie),
        )
