#!/usr/bin/env python3
"""mlx-llava-next command line: chat, generate, ocr, info, convert, quantize, parity, bench.

Each group of commands lives in `mlx_llava_next/commands/`; this file only assembles them.
"""

import signal
import sys


def _interrupted(signum=None, frame=None):
    sys.stderr.write("interrupted\n")
    sys.exit(130)


_previous = signal.signal(signal.SIGINT, _interrupted)  # Ctrl-C while starting up: no traceback (restored below)

import typer  # noqa: E402

from mlx_llava_next.commands import register_all  # noqa: E402

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,  # plain click help: importing rich costs ~0.3 s of every start-up
    help="LLaVA-NeXT (LLaVA-1.6) in MLX: chat with images, OCR scans, convert to MLX/GGUF.",
)


@app.callback()
def main():
    """Always a command group, even while only one command is registered (`cli.py parity ...`)."""


register_all(app)

if __name__ == "__main__":
    signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        app()
    except KeyboardInterrupt:
        _interrupted()
else:
    signal.signal(signal.SIGINT, _previous)
