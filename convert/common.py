"""What every converter shares: atomic output directories and progress bars."""

import contextlib
import os
import shutil
import tempfile
from pathlib import Path
from typing import Iterable, Iterator, Optional, TypeVar

from mlx_llava_next.errors import LlavaNextError

T = TypeVar("T")


class OutputExistsError(LlavaNextError):
    """The output directory exists and --force was not given."""


@contextlib.contextmanager
def atomic_output_dir(target, force: bool = False) -> Iterator[Path]:
    """Yield a temporary directory beside `target`; rename it onto `target` only on success.

    An interrupted or failed run leaves no `target` (and no half-written files in it): the
    temporary directory is removed, or, after a hard kill, left under a `.tmp-` name that
    `load()` never looks at.
    """
    target = Path(target)
    if target.exists() and not force:
        raise OutputExistsError(f"{target} already exists; pass --force to replace it")
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{target.name}-", dir=target.parent))
    try:
        yield tmp
        if target.exists():
            backup = target.with_name(f".old-{target.name}-{os.getpid()}")
            os.rename(target, backup)
            os.rename(tmp, target)
            shutil.rmtree(backup, ignore_errors=True)
        else:
            os.rename(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def progress(items: Iterable[T], total: Optional[int] = None, description: str = "", enabled: bool = True) -> Iterator[T]:
    """A rich progress bar over `items` on stderr (silent when disabled or not a terminal)."""
    if not enabled:
        yield from items
        return
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
    from rich.console import Console

    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn())
    with Progress(*columns, console=Console(stderr=True), transient=False) as bar:
        task = bar.add_task(description, total=total)
        for item in items:
            yield item
            bar.advance(task)
