"""The PyTorch reference: transformers' LlavaNextForConditionalGeneration on our exact inputs.

Test and CLI side only. torch and transformers are imported inside functions, so importing
this module (e.g. from the CLI) costs nothing and the runtime never needs them. The model
runs on CUDA when it is available (float32, float16 or bfloat16), else on the CPU.

`Reference(path).run(inputs, tokens=N)` takes the numpy dict our processor returns
(input_ids, attention_mask, pixel_values, image_sizes) and returns every stage that
`parity` compares: CLIP hidden states of the selected layer(s), projector output, packed
image features, logits and a greedy continuation, all as float32 numpy arrays.
"""

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import numpy as np

from .errors import LlavaNextError

DTYPES = ("float32", "float16", "bfloat16")


class ReferenceModelError(LlavaNextError):
    """The reference cannot run: torch/transformers missing, no CUDA, bad dtype or directory."""


@dataclass
class Outputs:
    """One forward (and optional greedy decode): every stage parity compares, float32 numpy.

    Filled by the reference here and, for our MLX model, by `parity.run_ours`."""

    logits: np.ndarray  # [B, L, V]
    vision_hidden_states: Optional[np.ndarray] = None  # [tiles, 1 + T, Dv * n_layers], CLS included
    projector_output: Optional[np.ndarray] = None  # [tiles, T, D]
    image_features: List[np.ndarray] = field(default_factory=list)  # per image, packed [n_i, D]
    generated: List[int] = field(default_factory=list)  # greedy continuation of row 0
    device: str = "cpu"
    dtype: str = "float32"


def _import_torch():
    try:
        import torch
        import transformers  # noqa: F401
    except ImportError as e:
        raise ReferenceModelError(
            f"the PyTorch reference needs torch and transformers ({e.name} is missing): "
            "pip install 'mlx-llava-next[test]'"
        ) from None
    return torch


def default_device() -> str:
    torch = _import_torch()
    return "cuda" if torch.cuda.is_available() else "cpu"


def _numpy(tensor) -> np.ndarray:
    return tensor.detach().float().cpu().numpy()


def is_hf_checkpoint(path) -> bool:
    """A llava-hf style directory transformers can load (not one of our MLX conversions)."""
    from .loading import MLX_FORMAT_KEY

    path = Path(path)
    config = path / "config.json"
    if not path.is_dir() or not config.exists():
        return False
    try:
        raw = json.loads(config.read_text())
    except ValueError:
        return False
    return raw.get(MLX_FORMAT_KEY) is None and any(path.glob("*.safetensors"))


class Reference:
    """transformers' LLaVA-NeXT loaded from a llava-hf directory or Hub id (safetensors only)."""

    def __init__(self, path_or_repo, device: Optional[str] = None, dtype: str = "float32"):
        torch = _import_torch()
        if dtype not in DTYPES:
            raise ReferenceModelError(f"unknown reference dtype {dtype!r} (use one of {', '.join(DTYPES)})")
        device = device or default_device()
        if device not in ("cuda", "cpu"):
            raise ReferenceModelError(f"unknown reference device {device!r} (use cuda or cpu)")
        if device == "cuda" and not torch.cuda.is_available():
            raise ReferenceModelError("device cuda was asked for but torch sees no CUDA device (CPU-only torch build?)")
        if device == "cuda" and dtype == "float32":
            # TF32 would turn a float32 reference into a ~1e-3 one (cuDNN convs default to it).
            torch.backends.cuda.matmul.allow_tf32 = False
            torch.backends.cudnn.allow_tf32 = False
        self.device, self.dtype = device, dtype
        self.torch_dtype = getattr(torch, dtype)
        self.model = self._load(path_or_repo).to(device).eval()

    def _load(self, path_or_repo):
        from transformers import LlavaNextForConditionalGeneration

        from .loading import resolve_model_path

        path = resolve_model_path(path_or_repo)
        if not is_hf_checkpoint(path):
            raise ReferenceModelError(
                f"{path_or_repo} is not a llava-hf checkpoint directory (config.json + *.safetensors); "
                "the reference must be the transformers checkpoint the model came from"
            )
        try:
            return LlavaNextForConditionalGeneration.from_pretrained(
                str(path), dtype=self.torch_dtype, use_safetensors=True, attn_implementation="eager"
            )
        except (OSError, ValueError) as e:
            raise ReferenceModelError(f"transformers cannot load {path_or_repo}: {e}") from None

    # -- pieces -----------------------------------------------------------------------------
    def _tensors(self, inputs: Dict[str, np.ndarray]):
        torch = _import_torch()
        out = {
            "input_ids": torch.as_tensor(np.asarray(inputs["input_ids"]), dtype=torch.long),
            "attention_mask": torch.as_tensor(
                np.asarray(inputs.get("attention_mask", np.ones_like(inputs["input_ids"]))), dtype=torch.long
            ),
        }
        if inputs.get("pixel_values") is not None:
            out["pixel_values"] = torch.as_tensor(np.asarray(inputs["pixel_values"]), dtype=self.torch_dtype)
            out["image_sizes"] = torch.as_tensor(np.asarray(inputs["image_sizes"]), dtype=torch.long)
        return {k: v.to(self.device) for k, v in out.items()}

    def real_tiles(self, pixel_values, image_sizes):
        """The tiles the model encodes: the first N_i of each image (transformers' own count)."""
        torch = _import_torch()
        from transformers.models.llava_next.modeling_llava_next import image_size_to_num_patches

        config = self.model.config
        if pixel_values.dim() == 4:
            return pixel_values
        counts = [
            image_size_to_num_patches(s, config.image_grid_pinpoints, config.vision_config.image_size)
            for s in image_sizes
        ]
        return torch.cat([p[:n] for p, n in zip(pixel_values, counts)], dim=0)

    def vision_hidden_states(self, tiles):
        """CLIP hidden states of `vision_feature_layer` (concatenated in list order), CLS kept."""
        config = self.model.config
        states = self.model.model.vision_tower(tiles, output_hidden_states=True).hidden_states
        layers = config.vision_feature_layer
        layers = [layers] if isinstance(layers, int) else list(layers)
        return _import_torch().cat([states[i] for i in layers], dim=-1)

    # -- the whole thing --------------------------------------------------------------------
    def run(self, inputs: Dict[str, np.ndarray], tokens: int = 0,
            eos_token_ids: Optional[Sequence[int]] = None) -> Outputs:
        """Forward on `inputs` (plus a `tokens`-step greedy decode of row 0 when tokens > 0)."""
        torch = _import_torch()
        tensors = self._tensors(inputs)
        captured = {}
        hook = self.model.model.multi_modal_projector.register_forward_hook(
            lambda module, args, output: captured.__setitem__("projector", output)
        )
        try:
            with torch.inference_mode():
                output = self.model(**tensors)
                result = Outputs(logits=_numpy(output.logits), device=self.device, dtype=self.dtype)
                if "pixel_values" in tensors:
                    tiles = self.real_tiles(tensors["pixel_values"], tensors["image_sizes"])
                    result.vision_hidden_states = _numpy(self.vision_hidden_states(tiles))
                    result.projector_output = _numpy(captured["projector"])
                    result.image_features = [_numpy(f) for f in output.image_outputs.pooler_output]
        finally:
            hook.remove()
        if tokens > 0:
            result.generated = self.greedy(inputs, tokens, eos_token_ids)
        return result

    def greedy(self, inputs: Dict[str, np.ndarray], tokens: int,
               eos_token_ids: Optional[Sequence[int]] = None) -> List[int]:
        """transformers' own `generate` (greedy, KV cache) for row 0; stops after an EOS id."""
        torch = _import_torch()
        tensors = {k: v[:1] for k, v in self._tensors(inputs).items()}
        if eos_token_ids is None:
            eos_token_ids = self.model.generation_config.eos_token_id
        eos = [int(e) for e in np.atleast_1d(eos_token_ids)] if eos_token_ids is not None else None
        pad = self.model.generation_config.pad_token_id
        pad = pad if pad is not None else (eos[0] if eos else 0)
        with torch.inference_mode():
            sequences = self.model.generate(
                **tensors, max_new_tokens=tokens, do_sample=False, num_beams=1,
                eos_token_id=eos, pad_token_id=pad, temperature=None, top_p=None, top_k=None,
            )
        generated = sequences[0, tensors["input_ids"].shape[1]:].tolist()
        if eos:  # generate pads after EOS when batched; keep up to and including the first EOS
            for i, token in enumerate(generated):
                if token in eos:
                    return generated[: i + 1]
        return generated
