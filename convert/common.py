"""What every converter shares: atomic output directories (mlx_llava_next.outputs) and progress bars."""

from typing import Iterable, Iterator, Optional, TypeVar

from mlx_llava_next.outputs import OutputExistsError, atomic_output_dir, check_output_dir  # noqa: F401  (re-exported)

T = TypeVar("T")


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
