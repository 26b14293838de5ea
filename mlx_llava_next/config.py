"""Normalise a llava-hf `config.json` into the values transformers would resolve.

Hub text configs are partial (keys equal to the class defaults are left out), transformers 5
writes `rope_parameters` instead of `rope_theta`, and mlx-lm's own defaults differ from
transformers' (it ties embeddings by default). Everything is filled here, once.
"""

import copy
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Union

from . import checks
from .errors import CheckpointError, UnsupportedModelError

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

    def check(self) -> "LlavaNextConfig":
        """CheckpointError naming the first field of a wrong type or an out-of-bounds size."""
        t, v = self.text_config, self.vision_config
        i = lambda key, value, lo, hi: checks.integer(key, value, lo, hi)  # noqa: E731
        for key, hi in (("vocab_size", 1 << 22), ("hidden_size", 1 << 16), ("intermediate_size", 1 << 18),
                        ("num_hidden_layers", 1024), ("num_attention_heads", 1024), ("num_key_value_heads", 1024),
                        ("head_dim", 4096), ("max_position_embeddings", 1 << 24)):
            t[key] = i(f"text_config.{key}", t.get(key), 1, hi)
        if t["num_attention_heads"] % t["num_key_value_heads"]:
            raise CheckpointError(f"text_config.num_attention_heads ({t['num_attention_heads']}) must be a multiple "
                                  f"of num_key_value_heads ({t['num_key_value_heads']})")
        t["rms_norm_eps"] = checks.number("text_config.rms_norm_eps", t.get("rms_norm_eps"), 0.0, 1.0, low_open=True)
        t["rope_theta"] = checks.number("text_config.rope_theta", t.get("rope_theta"), 0.0, 1e12, low_open=True)
        if t.get("sliding_window") is not None:
            t["sliding_window"] = i("text_config.sliding_window", t["sliding_window"], 1, 1 << 24)
        scaling = t.get("rope_scaling")
        if scaling is not None and not isinstance(scaling, dict):
            raise CheckpointError(f"text_config.rope_scaling must be an object or null, got {scaling!r}"[:300])
        layer_types = t.get("layer_types")
        if layer_types is not None:
            if not isinstance(layer_types, list) or len(layer_types) != t["num_hidden_layers"]:
                raise CheckpointError(f"text_config.layer_types must list one type per layer ({t['num_hidden_layers']})")
            for n, kind in enumerate(layer_types):
                checks.one_of(f"text_config.layer_types[{n}]", kind, ("full_attention", "sliding_attention"))
        for key in ("bos_token_id", "eos_token_id", "pad_token_id"):
            value = t.get(key)
            for n, token in enumerate(value if isinstance(value, list) else [] if value is None else [value]):
                i(f"text_config.{key}", token, 0, t["vocab_size"] - 1 if key != "pad_token_id" else 1 << 22)
        for key, lo, hi in (("hidden_size", 1, 1 << 14), ("intermediate_size", 1, 1 << 16), ("num_hidden_layers", 1, 256),
                            ("num_attention_heads", 1, 256), ("image_size", 1, 4096), ("patch_size", 1, 1024),
                            ("num_channels", 3, 3)):
            v[key] = i(f"vision_config.{key}", v.get(key), lo, hi)
        if v["image_size"] % v["patch_size"] or v["hidden_size"] % v["num_attention_heads"]:
            raise CheckpointError(f"vision_config: image_size ({v['image_size']}) must be a multiple of patch_size "
                                  f"({v['patch_size']}) and hidden_size of num_attention_heads")
        v["layer_norm_eps"] = checks.number("vision_config.layer_norm_eps", v.get("layer_norm_eps"), 0.0, 1.0, low_open=True)
        checks.one_of("vision_config.hidden_act", v.get("hidden_act"), ("quick_gelu", "gelu", "gelu_new", "gelu_pytorch_tanh", "relu"))
        checks.one_of("projector_hidden_act", self.projector_hidden_act, ("gelu", "gelu_new", "gelu_pytorch_tanh", "relu", "silu", "quick_gelu"))
        self.image_token_index = i("image_token_index", self.image_token_index, 0, 1 << 22)
        pins = self.image_grid_pinpoints
        if not isinstance(pins, list) or not 1 <= len(pins) <= 256:
            raise CheckpointError(f"image_grid_pinpoints must be a list of 1 to 256 [height, width] pairs, got {str(pins)[:100]}")
        for n, pair in enumerate(pins):
            if not isinstance(pair, (list, tuple)) or len(pair) != 2:
                raise CheckpointError(f"image_grid_pinpoints[{n}] must be a [height, width] pair, got {pair!r}"[:300])
            for side in pair:  # bounds the anyres canvas (as the image processor does)
                i(f"image_grid_pinpoints[{n}]", side, 1, 8192)
            if pair[0] * pair[1] > 4096 * 4096:
                raise CheckpointError(f"image_grid_pinpoints[{n}] {pair[0]}x{pair[1]} is larger than 4096x4096 pixels")
        layers = self.feature_layers
        if not layers or len(layers) > v["num_hidden_layers"] + 1:
            raise CheckpointError(f"vision_feature_layer must be a layer index or a non-empty list of them, got {self.vision_feature_layer!r}")
        for layer in layers:
            i("vision_feature_layer", layer, -(v["num_hidden_layers"] + 1), v["num_hidden_layers"])
        for key in ("multimodal_projector_bias", "tie_word_embeddings"):
            if not isinstance(getattr(self, key), bool):
                raise CheckpointError(f"{key} must be true or false, got {getattr(self, key)!r}")
        return self

    @classmethod
    def from_dict(cls, config: Dict[str, Any]) -> "LlavaNextConfig":
        """The normalised, checked config (CheckpointError naming a bad field)."""
        if not isinstance(config, dict):
            raise CheckpointError(f"config.json must hold an object, not a {type(config).__name__}")
        for key in ("text_config", "vision_config"):
            if config.get(key) is not None and not isinstance(config[key], dict):
                raise CheckpointError(f"{key} must be an object, got {type(config[key]).__name__}")
        for key in ("model_type",):
            if not isinstance(config.get(key, ""), str):
                raise CheckpointError(f"{key} must be a string, got {config[key]!r}"[:300])
        if not isinstance((config.get("text_config") or {}).get("model_type", ""), (str, type(None))):
            raise CheckpointError("text_config.model_type must be a string")
        if not isinstance((config.get("vision_config") or {}).get("model_type", ""), str):
            raise CheckpointError("vision_config.model_type must be a string")
        try:
            return cls._from_dict(config).check()
        except (TypeError, ValueError, KeyError, AttributeError, OverflowError, ZeroDivisionError) as e:
            if isinstance(e, CheckpointError):
                raise
            raise CheckpointError(f"config.json has a field of the wrong type ({type(e).__name__}: {e})"[:300]) from None

    @classmethod
    def _from_dict(cls, config: Dict[str, Any]) -> "LlavaNextConfig":
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
