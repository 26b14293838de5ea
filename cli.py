#!/usr/bin/env python3
"""mlx-llava-next command line: chat, generate, ocr, info, convert, quantize, parity, bench.

Each group of commands lives in `mlx_llava_next/commands/`; this file only assembles them.
"""

import typer

from mlx_llava_next.commands import register_all

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    help="LLaVA-NeXT (LLaVA-1.6) in MLX: chat with images, OCR scans, convert to MLX/GGUF.",
)


@app.callback()
def main():
    """Always a command group, even while only one command is registered (`cli.py parity ...`)."""


register_all(app)

if __name__ == "__main__":
    app()
