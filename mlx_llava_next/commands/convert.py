"""`convert` (Hub/HF checkpoint -> MLX directory, or GGUF with --gguf) and `quantize` (MLX -> MLX)."""

import contextlib
import signal
from enum import Enum
from pathlib import Path
from typing import Optional

import typer

from .common import fail, user_errors


class DType(str, Enum):
    float16 = "float16"
    bfloat16 = "bfloat16"
    float32 = "float32"


class GGUFType(str, Enum):
    f32 = "f32"
    f16 = "f16"
    q8_0 = "q8_0"
    q4_0 = "q4_0"


@contextlib.contextmanager
def terminate_as_interrupt():
    """SIGTERM (`kill`, a closing terminal) unwinds like Ctrl-C, so the temporary output
    directory is removed and no half-written target is left."""

    def interrupt(signum, frame):
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _warn(message: str) -> None:
    typer.echo(message, err=True)


def _report(reference, out: Path) -> None:
    from quantize.report import format_report, quality_report, save_report

    report = quality_report(reference, out)
    typer.echo(format_report(report))
    typer.echo(f"report saved to {save_report(report, out)}")


def _quant_config(bits: int, group_size: int, quantize_vision: bool, recipe: Optional[str]):
    from quantize.mlx import QuantConfig

    return QuantConfig(bits=bits, group_size=group_size, quantize_vision=quantize_vision, recipe=recipe)


BITS = typer.Option(4, "--bits", help="Bits per weight: 4 or 8 (2, 3, 5, 6 also work).")
GROUP = typer.Option(64, "--group-size", help="Weights sharing one scale and bias: 32, 64 or 128.")
VISION = typer.Option(False, "--quantize-vision", help="Also quantize the CLIP tower and projector.")
RECIPE = typer.Option(None, "--recipe", help="mlx-lm mixed recipe for the language model: mixed_2_6, "
                      "mixed_3_4, mixed_3_6 or mixed_4_6 (more bits for sensitive layers and lm_head).")
REPORT = typer.Option(False, "--report", help="Compare with the unquantized model on built-in prompts "
                      "(KL, top-1 agreement, bits per weight, size); saved as quantization_report.json.")
FORCE = typer.Option(False, "--force", help="Replace an existing output directory.")
PROGRESS = typer.Option(True, "--progress/--no-progress", help="Show a progress bar over tensors.")


def convert_command(
    src: str = typer.Argument(..., help="Hub id (llava-hf/...) or a local LLaVA-NeXT directory."),
    out: Path = typer.Option(..., "--out", "-o", help="Output directory."),
    dtype: DType = typer.Option(DType.float16, "--dtype", help="Storage dtype of unquantized weights."),
    quantize: bool = typer.Option(False, "--quantize", "-q", help="Quantize the language model."),
    bits: int = BITS,
    group_size: int = GROUP,
    quantize_vision: bool = VISION,
    recipe: Optional[str] = RECIPE,
    report: bool = REPORT,
    force: bool = FORCE,
    revision: Optional[str] = typer.Option(None, "--revision", help="Hub branch, tag or commit."),
    gguf: bool = typer.Option(False, "--gguf", help="Write a GGUF pair (text model + mmproj) for llama.cpp."),
    qtype: GGUFType = typer.Option(GGUFType.f16, "--qtype", help="GGUF tensor type (with --gguf)."),
    show_progress: bool = PROGRESS,
):
    """Convert a LLaVA-NeXT checkpoint to an MLX directory (or, with --gguf, to GGUF)."""
    with user_errors(), terminate_as_interrupt():
        if gguf:
            if quantize or quantize_vision or recipe or report or dtype is not DType.float16:
                fail("--gguf takes --qtype; -q/--bits/--group-size/--recipe/--quantize-vision/--dtype/--report are for MLX output")
            try:
                from convert.gguf import convert_to_gguf
            except ModuleNotFoundError as e:
                if e.name != "convert.gguf":
                    raise
                fail("GGUF export is not available in this installation")
            convert_to_gguf(src, out, qtype=qtype.value, force=force, progress=show_progress)
            return
        from convert.mlx import convert

        if quantize_vision and not (quantize or recipe):
            fail("--quantize-vision needs -q/--quantize")
        quant = _quant_config(bits, group_size, quantize_vision, recipe) if quantize or recipe else None
        convert(src, out, dtype=dtype.value, quantization=quant, force=force, revision=revision,
                show_progress=show_progress, warn=_warn)
        typer.echo(f"wrote {out}")
        if report:
            from mlx_llava_next.loading import resolve_model_path

            _report(resolve_model_path(src, revision), out)


def quantize_command(
    src: Path = typer.Argument(..., help="A converted (unquantized) MLX directory."),
    out: Path = typer.Option(..., "--out", "-o", help="Output directory."),
    bits: int = BITS,
    group_size: int = GROUP,
    quantize_vision: bool = VISION,
    recipe: Optional[str] = RECIPE,
    report: bool = REPORT,
    force: bool = FORCE,
    show_progress: bool = PROGRESS,
):
    """Quantize an already converted MLX directory (keeps its float dtype)."""
    with user_errors(), terminate_as_interrupt():
        from quantize.mlx import quantize_dir

        quantize_dir(src, out, _quant_config(bits, group_size, quantize_vision, recipe), force=force,
                     show_progress=show_progress, warn=_warn)
        typer.echo(f"wrote {out}")
        if report:
            _report(src, out)


def register(app) -> None:
    app.command("convert")(convert_command)
    app.command("quantize")(quantize_command)
