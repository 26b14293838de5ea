"""CLIP vision tower (transformers' CLIPVisionTransformer), run only as deep as needed.

LLaVA-NeXT reads hidden state -2 (the output of the second-to-last block, no post-LN), so the
last block and `post_layernorm` are never built. Weight names follow transformers without the
`vision_model.` level.
"""

from dataclasses import dataclass
from typing import List

import mlx.core as mx
import mlx.nn as nn


@dataclass
class VisionArgs:
    hidden_size: int = 1024
    intermediate_size: int = 4096
    num_hidden_layers: int = 24
    num_attention_heads: int = 16
    image_size: int = 336
    patch_size: int = 14
    num_channels: int = 3
    layer_norm_eps: float = 1e-5
    hidden_act: str = "quick_gelu"

    @classmethod
    def from_dict(cls, config: dict) -> "VisionArgs":
        fields = cls.__dataclass_fields__
        return cls(**{k: v for k, v in config.items() if k in fields})


# The attention and quick-GELU the tower calls: `fastpath.enable` points them at native kernels on
# x86 Linux CPUs (MLX's CPU exp is scalar there: 0.6 s of attention softmax and 0.4 s of GELU a
# layer for 5 tiles), with the same results to float rounding.
attention = mx.fast.scaled_dot_product_attention
quick_gelu = nn.gelu_fast_approx


def hidden_state_index(layer: int, num_layers: int) -> int:
    """Index into (embeddings, block 1, ..., block N) for a transformers `vision_feature_layer`."""
    return layer if layer >= 0 else num_layers + 1 + layer


class Attention(nn.Module):
    def __init__(self, args: VisionArgs):
        super().__init__()
        dim = args.hidden_size
        self.num_heads = args.num_attention_heads
        self.scale = (dim // self.num_heads) ** -0.5
        self.q_proj = nn.Linear(dim, dim)
        self.k_proj = nn.Linear(dim, dim)
        self.v_proj = nn.Linear(dim, dim)
        self.out_proj = nn.Linear(dim, dim)

    def __call__(self, x: mx.array) -> mx.array:
        B, L, D = x.shape
        q, k, v = (
            proj(x).reshape(B, L, self.num_heads, -1).transpose(0, 2, 1, 3)
            for proj in (self.q_proj, self.k_proj, self.v_proj)
        )
        out = attention(q, k, v, scale=self.scale)
        return self.out_proj(out.transpose(0, 2, 1, 3).reshape(B, L, D))


class MLP(nn.Module):
    def __init__(self, args: VisionArgs):
        super().__init__()
        if args.hidden_act not in ("quick_gelu", "gelu"):
            raise ValueError(f"unsupported CLIP activation {args.hidden_act!r}")
        # quick_gelu is x * sigmoid(1.702 x), which is MLX's "fast" GELU; "gelu" is the erf form.
        self.quick = args.hidden_act == "quick_gelu"
        self.fc1 = nn.Linear(args.hidden_size, args.intermediate_size)
        self.fc2 = nn.Linear(args.intermediate_size, args.hidden_size)

    def __call__(self, x: mx.array) -> mx.array:
        h = self.fc1(x)
        return self.fc2(quick_gelu(h) if self.quick else nn.gelu(h))


class EncoderLayer(nn.Module):
    def __init__(self, args: VisionArgs):
        super().__init__()
        self.self_attn = Attention(args)
        self.layer_norm1 = nn.LayerNorm(args.hidden_size, eps=args.layer_norm_eps)
        self.mlp = MLP(args)
        self.layer_norm2 = nn.LayerNorm(args.hidden_size, eps=args.layer_norm_eps)

    def __call__(self, x: mx.array) -> mx.array:
        x = x + self.self_attn(self.layer_norm1(x))
        return x + self.mlp(self.layer_norm2(x))


class Encoder(nn.Module):
    def __init__(self, args: VisionArgs, num_layers: int):
        super().__init__()
        self.layers = [EncoderLayer(args) for _ in range(num_layers)]


class Embeddings(nn.Module):
    def __init__(self, args: VisionArgs):
        super().__init__()
        self.patch_size = args.patch_size
        self.class_embedding = mx.zeros((args.hidden_size,))
        self.patch_embedding = nn.Conv2d(
            args.num_channels, args.hidden_size, args.patch_size, stride=args.patch_size, bias=False
        )
        num_positions = (args.image_size // args.patch_size) ** 2 + 1
        self.position_embedding = nn.Embedding(num_positions, args.hidden_size)

    def __call__(self, pixels: mx.array) -> mx.array:
        # pixels: [B, H, W, C]. A stride == kernel conv is a matmul over flattened patches
        # (bit-identical, and a single GEMM on CPU BLAS).
        B, H, W, C = pixels.shape
        p = self.patch_size
        weight = self.patch_embedding.weight  # [O, p, p, C]
        patches = pixels.reshape(B, H // p, p, W // p, p, C).transpose(0, 1, 3, 2, 4, 5)
        patches = patches.reshape(B, (H // p) * (W // p), p * p * C)
        x = patches @ weight.reshape(weight.shape[0], -1).T
        cls = mx.broadcast_to(self.class_embedding.astype(x.dtype), (B, 1, x.shape[-1]))
        x = mx.concatenate([cls, x], axis=1)
        return x + self.position_embedding.weight.astype(x.dtype)


class VisionTower(nn.Module):
    def __init__(self, args: VisionArgs, feature_layers: List[int]):
        super().__init__()
        self.args = args
        self.feature_indices = [hidden_state_index(l, args.num_hidden_layers) for l in feature_layers]
        if not all(0 <= i <= args.num_hidden_layers for i in self.feature_indices):
            raise ValueError(f"vision_feature_layer {feature_layers} is out of range")
        self.embeddings = Embeddings(args)
        self.pre_layrnorm = nn.LayerNorm(args.hidden_size, eps=args.layer_norm_eps)
        self.encoder = Encoder(args, max(self.feature_indices))

    def __call__(self, pixels: mx.array) -> mx.array:
        """pixels [B, H, W, C] -> selected hidden states concatenated on the feature axis."""
        x = self.pre_layrnorm(self.embeddings(pixels.astype(self.embeddings.patch_embedding.weight.dtype)))
        states = [x]
        for layer in self.encoder.layers:
            x = layer(x)
            states.append(x)
        return mx.concatenate([states[i] for i in self.feature_indices], axis=-1)

    @staticmethod
    def sanitize(weights: dict, num_kept_layers: int) -> dict:
        """transformers CLIP weights -> ours: drop `vision_model.`, unused blocks and
        post_layernorm; conv OIHW -> OHWI."""
        out = {}
        for key, value in weights.items():
            key = key.replace("vision_model.", "")
            if key.startswith("post_layernorm") or "position_ids" in key:
                continue
            if key.startswith("encoder.layers."):
                if int(key.split(".")[2]) >= num_kept_layers:
                    continue
            if key == "embeddings.patch_embedding.weight":
                value = value.transpose(0, 2, 3, 1)
            out[key] = value
        return out
