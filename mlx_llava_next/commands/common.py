"""Shared CLI helpers: one-line errors and a non-zero exit instead of tracebacks."""

import contextlib
import sys
import warnings

import typer

from ..errors import LlavaNextError

DEFAULT_MODEL = "llava-hf/llava-v1.6-mistral-7b-hf"


def _note(message, category, filename, lineno, line=None) -> str:
    return f"note: {message}\n"


warnings.formatwarning = _note  # warnings reach CLI users as one `note:` line, not a source location


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
    except OSError as e:  # permissions, a full disk, a name too long: one line, no traceback
        fail(f"{e.filename + ': ' if e.filename else ''}{e.strerror or e}")
    except KeyboardInterrupt:
        typer.echo("interrupted", err=True)
        sys.exit(130)
