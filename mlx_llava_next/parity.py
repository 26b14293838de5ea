"""Parity of our MLX model with the transformers reference, stage by stage.

`compare_models(model, processor, reference, inputs)` runs both on the same inputs and
returns a `ParityReport`: max/mean |Δ| of the CLIP hidden states, projector output, packed
image features and logits (split into text before the image, image positions and text
after), top-1 agreement, KL(reference || ours) of the next-token distributions, and the
first position where the greedy continuations diverge. This is what a user checks after a
conversion or a quantization; `cli.py parity` prints it.
"""

from dataclasses import asdict, dataclass, field
from typing import Dict, List, Optional, Sequence

import mlx.core as mx
import numpy as np

from . import anyres
from .errors import LlavaNextError
from .reference import Outputs


@dataclass
class Diff:
    max_abs: float
    mean_abs: float
    count: int  # compared elements


@dataclass
class ParityReport:
    model: str
    reference: str
    device: str
    dtype: str
    prompt_tokens: int
    image_tokens: int
    vision: Optional[Diff]  # CLIP hidden states of the selected layer(s), CLS included
    projector: Optional[Diff]
    packed: Optional[Diff]  # packed image features (what fills the <image> positions)
    logits: Diff
    logits_before_image: Optional[Diff]
    logits_image: Optional[Diff]
    logits_after_image: Optional[Diff]
    top1_agreement: float  # fraction of positions whose argmax agrees
    top1_last: bool  # the argmax of the next token (last position) agrees
    kl_mean: float  # KL(reference || ours) of next-token distributions, nats
    kl_max: float
    kl_last: float
    tokens: int  # greedy tokens asked for
    greedy_ours: List[int] = field(default_factory=list)
    greedy_reference: List[int] = field(default_factory=list)
    first_divergence: Optional[int] = None  # index into the continuations; None: identical
    text_ours: str = ""
    text_reference: str = ""

    def to_dict(self) -> dict:
        return asdict(self)


class ParityError(LlavaNextError):
    """Our model and the reference cannot be compared (different shapes, vocabularies)."""


def diff(ours, reference, what: str) -> Optional[Diff]:
    if ours is None or reference is None:
        return None
    ours, reference = np.asarray(ours, np.float32), np.asarray(reference, np.float32)
    if ours.shape != reference.shape:
        raise ParityError(f"{what}: our shape {ours.shape} differs from the reference's {reference.shape}")
    if ours.size == 0:
        return None
    delta = np.abs(ours.astype(np.float64) - reference.astype(np.float64))
    return Diff(float(delta.max()), float(delta.mean()), int(delta.size))


def _log_softmax(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float64)
    x = x - x.max(axis=-1, keepdims=True)
    return x - np.log(np.exp(x).sum(axis=-1, keepdims=True))


def kl_divergence(reference_logits: np.ndarray, our_logits: np.ndarray, chunk: int = 256) -> np.ndarray:
    """KL(P_ref || P_ours) per row of [N, V] logits, in float64, a chunk of rows at a time."""
    out = []
    for start in range(0, reference_logits.shape[0], chunk):
        ref = _log_softmax(reference_logits[start : start + chunk])
        ours = _log_softmax(our_logits[start : start + chunk])
        out.append((np.exp(ref) * (ref - ours)).sum(axis=-1))
    return np.maximum(np.concatenate(out), 0.0) if out else np.zeros(0)


def first_divergence(ours: Sequence[int], reference: Sequence[int]) -> Optional[int]:
    for i, (a, b) in enumerate(zip(ours, reference)):
        if a != b:
            return i
    return None if len(ours) == len(reference) else min(len(ours), len(reference))


# -- our side ----------------------------------------------------------------------------------
def _numpy(x: mx.array) -> np.ndarray:
    return np.array(x.astype(mx.float32))


def image_stages(model, pixel_values, image_sizes):
    """Our CLIP hidden states [tiles, 1 + T, Dv·n] and projector output [tiles, T, D] for the
    real tiles of each image (padding tiles dropped by the anyres count, as in encode_images)."""
    sizes = [tuple(int(v) for v in s) for s in np.asarray(image_sizes).reshape(-1, 2)]
    pixels = np.asarray(pixel_values)
    if pixels.ndim == 5:
        counts = [anyres.num_patches(s, model.config.image_grid_pinpoints, model.tile_size) for s in sizes]
        pixels = np.concatenate([pixels[i, :n] for i, n in enumerate(counts)], axis=0)
    hidden = model.vision_tower(mx.array(pixels).transpose(0, 2, 3, 1))
    selected = hidden[:, 1:] if model.config.vision_feature_select_strategy == "default" else hidden
    return _numpy(hidden), _numpy(model.multi_modal_projector(selected))


def greedy(model, inputs: Dict[str, np.ndarray], tokens: int, eos_token_ids: Sequence[int]) -> List[int]:
    """Greedy continuation of row 0 with a KV cache; stops after an EOS id."""
    ids = np.asarray(inputs["input_ids"])[:1]
    cache = model.make_cache()
    logits = model(ids, pixel_values=inputs.get("pixel_values"), image_sizes=inputs.get("image_sizes"), cache=cache)
    out: List[int] = []
    while len(out) < tokens:
        token = int(mx.argmax(logits[0, -1]).item())
        out.append(token)
        if token in eos_token_ids:
            break
        logits = model.language_model(mx.array([[token]]), cache=cache)
    return out


def run_ours(model, inputs: Dict[str, np.ndarray], tokens: int = 0,
             eos_token_ids: Sequence[int] = ()) -> Outputs:
    """Every stage `Reference.run` returns, from our MLX model."""
    pixel_values, image_sizes = inputs.get("pixel_values"), inputs.get("image_sizes")
    logits = model(inputs["input_ids"], pixel_values=pixel_values, image_sizes=image_sizes,
                   attention_mask=inputs.get("attention_mask"))
    out = Outputs(logits=_numpy(logits), device=str(mx.default_device()), dtype="mlx")
    if pixel_values is not None:
        out.vision_hidden_states, out.projector_output = image_stages(model, pixel_values, image_sizes)
        out.image_features = [_numpy(f) for f in model.encode_images(pixel_values, image_sizes)]
    if tokens > 0:
        out.generated = greedy(model, inputs, tokens, eos_token_ids)
    return out


# -- comparison --------------------------------------------------------------------------------
def compare(ours: Outputs, reference: Outputs, inputs: Dict[str, np.ndarray], image_token_id: int,
            model_name: str = "", reference_name: str = "", tokens: int = 0) -> ParityReport:
    ids = np.asarray(inputs["input_ids"])
    if ids.ndim == 1:
        ids = ids[None]
    mask = np.asarray(inputs.get("attention_mask", np.ones_like(ids))).astype(bool)
    if ours.logits.shape[-1] != reference.logits.shape[-1]:
        raise ParityError(
            f"vocabulary sizes differ: ours {ours.logits.shape[-1]}, reference {reference.logits.shape[-1]} "
            "(is --reference the checkpoint this model was converted from?)"
        )

    # Position classes per row: text before the first <image>, <image> positions, text after.
    is_image = ids == image_token_id
    seen_image = np.cumsum(is_image, axis=1) > 0
    before, after = mask & ~seen_image, mask & seen_image & ~is_image
    image = mask & is_image
    logits_ours, logits_ref = ours.logits, reference.logits

    def part(select):
        return diff(logits_ours[select], logits_ref[select], "logits") if select.any() else None

    valid_ours, valid_ref = logits_ours[mask], logits_ref[mask]
    kl = kl_divergence(valid_ref, valid_ours)
    agree = valid_ours.argmax(-1) == valid_ref.argmax(-1)
    features = lambda fs: np.concatenate(fs, axis=0) if fs else None  # noqa: E731
    return ParityReport(
        model=model_name,
        reference=reference_name,
        device=reference.device,
        dtype=reference.dtype,
        prompt_tokens=int(mask.sum()),
        image_tokens=int(image.sum()),
        vision=diff(ours.vision_hidden_states, reference.vision_hidden_states, "CLIP hidden states"),
        projector=diff(ours.projector_output, reference.projector_output, "projector output"),
        packed=diff(features(ours.image_features), features(reference.image_features), "packed image features"),
        logits=diff(valid_ours, valid_ref, "logits"),
        logits_before_image=part(before),
        logits_image=part(image),
        logits_after_image=part(after),
        top1_agreement=float(agree.mean()),
        top1_last=bool(agree[-1]),
        kl_mean=float(kl.mean()),
        kl_max=float(kl.max()),
        kl_last=float(kl[-1]),
        tokens=tokens,
        greedy_ours=list(ours.generated),
        greedy_reference=list(reference.generated),
        first_divergence=first_divergence(ours.generated, reference.generated) if tokens else None,
    )


def compare_models(model, processor, reference, inputs: Dict[str, np.ndarray], tokens: int = 0,
                   model_name: str = "", reference_name: str = "") -> ParityReport:
    """Run our model and a `reference.Reference` on the same single-prompt inputs and compare."""
    if np.asarray(inputs["input_ids"]).shape[0] != 1:
        raise ParityError("parity compares one prompt at a time (input_ids must have batch size 1)")
    eos = sorted(int(e) for e in (getattr(processor.tokenizer, "eos_token_ids", None) or []))
    ours = run_ours(model, inputs, tokens, eos)
    ref = reference.run(inputs, tokens, eos_token_ids=eos or None)
    report = compare(ours, ref, inputs, model.config.image_token_index, model_name, reference_name, tokens)
    report.text_ours = processor.decode(report.greedy_ours)
    report.text_reference = processor.decode(report.greedy_reference)
    return report


# -- text report -------------------------------------------------------------------------------
def _row(label: str, d: Optional[Diff]) -> str:
    if d is None:
        return f"  {label:<26} {'-':>10}   {'-':>10}"
    return f"  {label:<26} {d.max_abs:>10.3e}   {d.mean_abs:>10.3e}"


def format_report(r: ParityReport) -> str:
    lines = [
        f"parity: {r.model} vs transformers ({r.reference}) on {r.device}, {r.dtype}",
        f"prompt: {r.prompt_tokens} tokens, {r.image_tokens} of them image tokens",
        f"  {'':<26} {'max |Δ|':>10}   {'mean |Δ|':>10}",
        _row("CLIP hidden states", r.vision),
        _row("projector output", r.projector),
        _row("packed image features", r.packed),
        _row("logits, all positions", r.logits),
        _row("  text before the image", r.logits_before_image),
        _row("  image positions", r.logits_image),
        _row("  text after the image", r.logits_after_image),
        f"  {'top-1 agreement':<26} {r.top1_agreement:.2%} of positions; next token "
        + ("agrees" if r.top1_last else "DIFFERS"),
        f"  {'KL(reference || ours)':<26} mean {r.kl_mean:.3e}, max {r.kl_max:.3e}, next token {r.kl_last:.3e} nats",
    ]
    if r.tokens:
        if r.first_divergence is None:
            verdict = f"identical ({len(r.greedy_ours)} tokens)"
        else:
            i = r.first_divergence
            a = r.greedy_ours[i] if i < len(r.greedy_ours) else "end"
            b = r.greedy_reference[i] if i < len(r.greedy_reference) else "end"
            verdict = f"diverge at token {i} (ours {a}, reference {b})"
        lines += [
            f"  {'greedy continuation':<26} {verdict}",
            f"    ours:      {r.text_ours!r}",
            f"    reference: {r.text_reference!r}",
        ]
    return "\n".join(lines)
