"""`cli.py parity`: compare a model we load (any format) with the transformers reference."""

import contextlib
import json
import sys
from pathlib import Path
from typing import Optional

import typer

from .common import fail, user_errors

DEFAULT_QUESTION = "What is shown in this image?"


def resolve_reference(model: str, reference: Optional[str]) -> str:
    """The llava-hf checkpoint to run in transformers: --reference, else MODEL itself."""
    if reference:
        return reference
    from ..loading import resolve_model_path
    from ..reference import is_hf_checkpoint

    if is_hf_checkpoint(resolve_model_path(model)):
        return model
    fail(
        f"{model} is not a llava-hf (transformers) checkpoint, so it cannot be its own reference; "
        "pass --reference HF_DIR_OR_ID (the checkpoint it was converted from)"
    )


def build_prompt(processor, prompt: str) -> str:
    """A prompt with an `<image>` marker is used as is; otherwise the chat template wraps it."""
    if processor.image_token in prompt:
        return prompt
    content = [{"type": "image"}, {"type": "text", "text": prompt}]
    return processor.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True)


def run(model: str, image: Path, prompt: str, reference: Optional[str], device: Optional[str],
        dtype: str, tokens: int, exact: bool = True):
    from .. import load
    from ..image_processing import load_image
    from ..parity import compare_models
    from ..reference import DTYPES, Reference

    if dtype not in DTYPES:
        fail(f"unknown --dtype {dtype!r} (use one of {', '.join(DTYPES)})")
    if device not in (None, "cuda", "cpu"):
        fail(f"unknown --device {device!r} (use cuda or cpu)")
    if tokens < 0:
        fail("--tokens must be 0 or more")
    reference_path = resolve_reference(model, reference)
    picture = load_image(image)
    ref = Reference(reference_path, device=device, dtype=dtype)  # first: fails fast without torch/CUDA
    ours, processor = load(model, exact=exact)
    inputs = processor(build_prompt(processor, prompt), images=[picture])
    return compare_models(ours, processor, ref, inputs, tokens, model_name=model, reference_name=reference_path)


def register(app: typer.Typer) -> None:
    @app.command("parity")
    def parity(
        model: str = typer.Argument(..., help="What load() accepts: HF dir or Hub id, converted MLX dir, GGUF."),
        image: Path = typer.Option(..., "--image", help="Image file to run both models on."),
        prompt: str = typer.Option(DEFAULT_QUESTION, "--prompt", help="Question (chat template applied) or a raw prompt with <image>."),
        reference: Optional[str] = typer.Option(
            None, "--reference", help="llava-hf checkpoint (dir or Hub id) for transformers; default MODEL."
        ),
        device: Optional[str] = typer.Option(None, "--device", help="cuda or cpu for the reference (default: cuda if available)."),
        dtype: str = typer.Option("float32", "--dtype", help="Reference dtype: float32, float16 or bfloat16."),
        tokens: int = typer.Option(16, "--tokens", help="Greedy tokens to compare (0: logits only)."),
        as_json: bool = typer.Option(False, "--json", help="Print one JSON object instead of the report."),
        exact: bool = typer.Option(
            True, "--exact/--int8", help="Float32 activations in quantized layers (default), or the int8 ones generate uses on x86."
        ),
    ):
        """Compare MODEL with transformers' LlavaNextForConditionalGeneration on one image and prompt."""
        from ..parity import format_report

        with user_errors():
            # With --json, stdout carries exactly one JSON object: library chatter goes to stderr.
            quiet = contextlib.redirect_stdout(sys.stderr) if as_json else contextlib.nullcontext()
            with quiet:
                report = run(model, image, prompt, reference, device, dtype, tokens, exact)
        if as_json:
            typer.echo(json.dumps(report.to_dict()))
        else:
            typer.echo(format_report(report))
