"""LLaVA-NeXT: CLIP tower + projector + anyres packing + an mlx-lm text model.

Mirrors transformers' LlavaNextForConditionalGeneration. The packing follows
`pack_image_features` exactly: base view first (no newlines), the grid re-assembled into
one feature map, padding rows/columns removed, one `image_newline` after every row.
"""

import importlib
from typing import List, Optional, Sequence

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx_lm.models.cache import BatchKVCache, BatchRotatingKVCache, make_prompt_cache

from . import anyres, attention
from .config import LlavaNextConfig
from .errors import PromptError
from .kv_cache import adopt
from .rope import use_reference_rope
from .vision import VisionArgs, VisionTower


class Projector(nn.Module):
    def __init__(self, in_dim: int, out_dim: int, bias: bool, act: str):
        super().__init__()
        if act != "gelu":
            raise ValueError(f"unsupported projector_hidden_act {act!r}")
        self.linear_1 = nn.Linear(in_dim, out_dim, bias=bias)
        self.linear_2 = nn.Linear(out_dim, out_dim, bias=bias)

    def __call__(self, x: mx.array) -> mx.array:
        # transformers' "gelu" is the exact erf form.
        return self.linear_2(nn.gelu(self.linear_1(x)))


def text_model_module(arch: str):
    return importlib.import_module(f"mlx_lm.models.{arch}")


def use_sliding_window(language_model, window: int) -> None:
    """Make every layer of an mlx-lm llama attend to the last `window` tokens (Mistral).

    mlx-lm builds sliding layers only beside at least one full-attention layer; Mistral's are
    all sliding, so they are switched after construction: the window mask comes from layer 0's
    cache and `make_cache` gives each layer a rotating cache of `window` entries.
    """
    inner = language_model.model
    for layer in inner.layers:
        layer.use_sliding = True
    inner.sliding_window = window
    inner.swa_idx = 0


class Model(nn.Module):
    def __init__(self, config: LlavaNextConfig):
        super().__init__()
        self.config = config
        vision_args = VisionArgs.from_dict(config.vision_config)
        self.vision_tower = VisionTower(vision_args, config.feature_layers)
        text_hidden = config.text_config["hidden_size"]
        self.multi_modal_projector = Projector(
            vision_args.hidden_size * len(config.feature_layers),
            text_hidden,
            config.multimodal_projector_bias,
            config.projector_hidden_act,
        )
        self.image_newline = mx.zeros((text_hidden,))
        arch = text_model_module(config.text_arch)
        self.language_model = arch.Model(arch.ModelArgs.from_dict(config.mlx_lm_args()))
        if config.sliding_window is not None:
            use_sliding_window(self.language_model, config.sliding_window)
        use_reference_rope(self.language_model)  # transformers' float32 angles (rope.py)
        attention.install()  # float32 prompt attention with an accurate softmax (attention.py)

    # -- geometry -------------------------------------------------------------------------
    @property
    def tile_size(self) -> int:
        return self.vision_tower.args.image_size

    @property
    def tokens_per_side(self) -> int:
        return self.tile_size // self.vision_tower.args.patch_size

    @property
    def layers(self):
        return self.language_model.layers

    # -- images ---------------------------------------------------------------------------
    def encode_images(self, pixel_values, image_sizes) -> List[mx.array]:
        """Per image, the packed features [n_tokens, D] that replace its `<image>` tokens.

        pixel_values: [B, max_patches, C, H, W] (padding tiles are dropped using the count
        anyres derives from image_sizes, never by looking for zeros) or [sum patches, C, H, W].
        """
        sizes = [tuple(int(v) for v in s) for s in np.asarray(image_sizes).reshape(-1, 2)]
        pinpoints = self.config.image_grid_pinpoints
        counts = [anyres.num_patches(s, pinpoints, self.tile_size) for s in sizes]
        pixels = mx.array(pixel_values) if not isinstance(pixel_values, mx.array) else pixel_values
        if pixels.ndim == 5:
            if pixels.shape[0] != len(sizes):
                raise PromptError(f"{pixels.shape[0]} images in pixel_values but {len(sizes)} image_sizes")
            if max(counts) > pixels.shape[1]:
                raise PromptError("pixel_values hold fewer tiles than image_sizes require")
            pixels = mx.concatenate([pixels[i, :n] for i, n in enumerate(counts)], axis=0)
        elif pixels.shape[0] != sum(counts):
            raise PromptError(f"expected {sum(counts)} tiles in pixel_values, got {pixels.shape[0]}")
        features = self.vision_tower(pixels.transpose(0, 2, 3, 1))
        if self.config.vision_feature_select_strategy == "default":
            features = features[:, 1:]
        features = self.multi_modal_projector(features)
        splits = np.cumsum(counts)[:-1].tolist()
        return [self.pack(f, s) for f, s in zip(mx.split(features, splits, axis=0), sizes)]

    def pack(self, features: mx.array, image_size) -> mx.array:
        """[N, tokens_per_tile, D] features of one image -> [n_tokens, D] (HF spatial_unpad)."""
        newline = self.image_newline.astype(features.dtype)[None]
        base = features[0]
        if features.shape[0] == 1:
            return mx.concatenate([base, newline], axis=0)
        side = self.tokens_per_side
        if features.shape[1] != side * side:
            raise ValueError(
                "anyres packing needs one token per patch; use vision_feature_select_strategy='default' with CLIP"
            )
        rows, cols = anyres.grid_shape(image_size, self.config.image_grid_pinpoints, self.tile_size)
        D = features.shape[-1]
        grid = features[1:].reshape(rows, cols, side, side, D).transpose(0, 2, 1, 3, 4)
        grid = grid.reshape(rows * side, cols * side, D)
        kept_h, kept_w = anyres.unpadded_shape(image_size, (rows * side, cols * side))
        top, left = anyres.unpad_offsets(image_size, (rows * side, cols * side))
        grid = grid[top : top + kept_h, left : left + kept_w]
        grid = mx.concatenate([grid, mx.broadcast_to(newline[None], (kept_h, 1, D))], axis=1)
        return mx.concatenate([base, grid.reshape(-1, D)], axis=0)

    # -- text -----------------------------------------------------------------------------
    def embed_inputs(
        self,
        input_ids,
        pixel_values=None,
        image_sizes=None,
        image_features: Optional[Sequence[mx.array]] = None,
    ) -> mx.array:
        """Token embeddings with image features scattered into the `<image>` positions."""
        ids = np.asarray(input_ids)
        if ids.ndim == 1:
            ids = ids[None]
        embed = self.language_model.model.embed_tokens
        embeddings = embed(mx.array(ids))
        positions = np.flatnonzero(ids.reshape(-1) == self.config.image_token_index)
        if image_features is None and pixel_values is not None:
            image_features = self.encode_images(pixel_values, image_sizes)
        n_features = sum(f.shape[0] for f in image_features) if image_features else 0
        if n_features != len(positions):
            raise PromptError(
                f"image features and image tokens do not match: {len(positions)} `<image>` tokens "
                f"in the prompt, {n_features} image features"
            )
        if n_features == 0:
            return embeddings
        B, L, D = embeddings.shape
        features = mx.concatenate(list(image_features), axis=0).astype(embeddings.dtype)
        flat = embeddings.reshape(B * L, D)
        flat[mx.array(positions)] = features
        return flat.reshape(B, L, D)

    def make_cache(self, left_padding: Optional[Sequence[int]] = None):
        """A KV cache per layer; a batch cache when rows are left-padded."""
        if left_padding is None or not any(left_padding):
            return adopt(self, make_prompt_cache(self.language_model))  # ours where kv_cache.py's policy says
        window = self.config.sliding_window
        if window is not None:
            return [BatchRotatingKVCache(window, list(left_padding)) for _ in self.layers]
        return [BatchKVCache(list(left_padding)) for _ in self.layers]

    def __call__(
        self,
        input_ids,
        pixel_values=None,
        image_sizes=None,
        attention_mask=None,
        cache=None,
        input_embeddings: Optional[mx.array] = None,
        image_features: Optional[Sequence[mx.array]] = None,
    ) -> mx.array:
        """Logits [B, L, vocab]. Left padding (zeros at the start of attention_mask) is masked
        and positions start at each row's first real token, as transformers' generate does."""
        if input_embeddings is None:
            input_embeddings = self.embed_inputs(input_ids, pixel_values, image_sizes, image_features)
        if cache is None and attention_mask is not None:
            mask = np.asarray(attention_mask).reshape(input_embeddings.shape[0], -1)
            left_padding = (mask.cumsum(axis=1) == 0).sum(axis=1).tolist()
            if any(left_padding):
                cache = self.make_cache(left_padding)
        return self.language_model(None, cache=cache, input_embeddings=input_embeddings)

    # -- weights --------------------------------------------------------------------------
    def sanitize(self, weights: dict) -> dict:
        """Weights in our module names (see `loading.canonical_weights`) -> loadable set."""
        vision = {k[len("vision_tower.") :]: v for k, v in weights.items() if k.startswith("vision_tower.")}
        out = {k: v for k, v in weights.items() if not k.startswith("vision_tower.")}
        kept = len(self.vision_tower.encoder.layers)
        out.update({f"vision_tower.{k}": v for k, v in VisionTower.sanitize(vision, kept).items()})
        text = {k[len("language_model.") :]: v for k, v in out.items() if k.startswith("language_model.")}
        out = {k: v for k, v in out.items() if not k.startswith("language_model.")}
        out.update({f"language_model.{k}": v for k, v in self.language_model.sanitize(text).items()})
        return out

    @property
    def quant_predicate(self):
        """Quantize the language model only; the tower, projector and newline stay float."""
        return lambda path, module: path.startswith("language_model.") and hasattr(module, "to_quantized")
