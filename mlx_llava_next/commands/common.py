"""Shared CLI helpers: one-line errors and a non-zero exit instead of tracebacks."""

import contextlib
import sys

import typer

from ..errors import LlavaNextError

DEFAULT_MODEL = "llava-hf/llava-v1.6-mistral-7b-hf"


def fail(message: str, code: int = 1):
    typer.echo(f"error: {message}", err=True)
    raise typer.Exit(code)


@contextlib.contextmanager
def user_errors():
    """Turn our errors (and missing files) into `error: ...` on stderr with exit code 1."""
    try:
        yield
    except LlavaNextError as e:
        fail(str(e))
    except FileNotFoundError as e:
        fail(f"no such file: {e.filename or e}")
    except KeyboardInterrupt:
        typer.echo("interrupted", err=True)
        sys.exit(130)
