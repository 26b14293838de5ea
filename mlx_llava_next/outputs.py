"""Safe outputs: check a target before any work, write it atomically, replace only our own.

Every output directory gets a marker file (`MARKER`); `--force` replaces a directory only when
it carries one, so it can never delete a user's directory, a file, or the source checkpoint.
Write failures (read-only, full disk, name too long, ...) become one `OutputError`, and the
temporary directory or file is removed, so no partial output is left.
"""

import contextlib
import os
import shutil
import tempfile
from pathlib import Path
from typing import Iterable, Iterator

from .errors import OutputError

MARKER = ".mlx-llava-next-output"


class OutputExistsError(OutputError):
    """The output exists and --force was not given."""


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _inside(path: str, parent: str) -> bool:
    return path == parent or path.startswith(parent.rstrip(os.sep) + os.sep)


def _describe(e: OSError) -> str:
    return os.strerror(e.errno) if e.errno else str(e)


def check_parent(target: Path) -> None:
    """Raise OutputError unless `target` could be created: the nearest existing ancestor is a
    writable directory and the name fits the file system."""
    name_max = 255
    ancestor = target.parent
    while not os.path.lexists(ancestor) and ancestor != ancestor.parent:
        ancestor = ancestor.parent
    if os.path.islink(ancestor) and not os.path.exists(ancestor):
        raise OutputError(f"cannot write {target}: {ancestor} is a broken symbolic link (or a symlink loop)")
    if not os.path.isdir(ancestor):
        raise OutputError(f"cannot write {target}: {ancestor} is a file, not a directory")
    if not os.access(ancestor, os.W_OK | os.X_OK):
        raise OutputError(f"cannot write {target}: {ancestor} is not writable (read-only)")
    with contextlib.suppress(OSError, ValueError):
        name_max = os.pathconf(ancestor, "PC_NAME_MAX")
    for part in target.parts:
        if len(os.fsencode(part)) > name_max:
            raise OutputError(f"cannot write {target}: the name {part[:40]}... is longer than {name_max} bytes")


def check_output_dir(target, force: bool = False, sources: Iterable = ()) -> Path:
    """Raise OutputError unless `target` may be written now (before any slow work).

    An existing target is refused without `force`; with `force` only a directory we wrote (it
    holds `MARKER`) is replaced. A target that is, holds or is reached through a link to one of
    `sources` is always refused."""
    target = Path(target)
    real = os.path.realpath(target)
    for source in sources:
        src = os.path.realpath(source)
        if _inside(src, real):
            raise OutputError(f"--out {target} is (or contains) the source {source}; choose another output directory")
    if os.path.islink(target) and not os.path.exists(target):
        raise OutputError(f"--out {target} is a broken symbolic link (or a symlink loop); remove it or choose another path")
    if os.path.lexists(target):
        if not force:
            raise OutputExistsError(f"{target} already exists; pass --force to replace it")
        if os.path.islink(target):
            raise OutputError(f"--out {target} is a symbolic link; --force replaces only a directory written by this tool")
        if not target.is_dir():
            raise OutputError(f"--out {target} is a file, not an earlier output; --force replaces only a directory written by this tool")
        if not (target / MARKER).is_file():
            raise OutputError(
                f"--out {target} is not an output of mlx-llava-next (no {MARKER} file in it); --force refuses to "
                f"replace it: remove it yourself or choose another directory"
            )
    check_parent(target)
    return target


def _remove(path: Path) -> None:
    """Remove a file or directory tree, making read-only parts writable first."""
    if path.is_dir() and not path.is_symlink():

        def retry(function, name, _exc):
            with contextlib.suppress(OSError):
                os.chmod(os.path.dirname(name), 0o700)
                function(name)

        shutil.rmtree(path, onerror=retry)
    else:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)


@contextlib.contextmanager
def write_errors(target) -> Iterator[None]:
    """OSError while writing `target` -> OutputError naming it (full disk, read-only, ...)."""
    try:
        yield
    except OutputError:
        raise
    except OSError as e:
        if isinstance(e, FileNotFoundError) and e.filename and not _inside(os.path.abspath(e.filename), os.path.abspath(Path(target).parent)):
            raise  # a missing input, not the output
        raise OutputError(f"cannot write {target}: {_describe(e)}") from None


@contextlib.contextmanager
def atomic_output_dir(target, force: bool = False, sources: Iterable = ()) -> Iterator[Path]:
    """Yield a temporary directory beside `target`; rename it onto `target` only on success.

    The target is checked first (`check_output_dir`). An interrupted or failed run leaves no
    `target` and no half-written files: the temporary directory is removed, or, after a hard
    kill, left under a `.tmp-` name that `load()` never looks at. The output gets the usual
    permissions (0777 and 0666 less the umask) and the marker file."""
    target = check_output_dir(target, force, sources)
    with write_errors(target):
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{target.name[:64]}-", dir=target.parent))
    try:
        with write_errors(target):
            os.chmod(tmp, 0o777 & ~_umask())
            (tmp / MARKER).write_text("written by mlx-llava-next; `--force` may replace this directory\n")
            yield tmp
            check_output_dir(target, force, sources)  # nothing swapped in meanwhile
            if os.path.lexists(target):
                backup = Path(tempfile.mkdtemp(prefix=f".tmp-old-{target.name[:64]}-", dir=target.parent))
                os.rename(target, backup / "old")
                os.rename(tmp, target)
                _remove(backup)
            else:
                os.rename(tmp, target)
    except BaseException:
        _remove(tmp)
        raise


def write_text_atomic(target, text: str, force: bool = True) -> Path:
    """Write a text file via a temporary file and a rename (no partial file on failure).
    An existing regular file is replaced only with `force`; a directory or a link never."""
    target = Path(target)
    if os.path.islink(target):
        raise OutputError(f"cannot write {target}: it is a symbolic link")
    if os.path.lexists(target):
        if not target.is_file():
            raise OutputError(f"cannot write {target}: it exists and is not a regular file")
        if not force:
            raise OutputExistsError(f"{target} already exists")
    check_parent(target)
    tmp = None
    with write_errors(target):
        target.parent.mkdir(parents=True, exist_ok=True)
        try:
            fd, tmp = tempfile.mkstemp(prefix=f".{target.name[:64]}.", suffix=".tmp", dir=target.parent)
            os.fchmod(fd, 0o666 & ~_umask())
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                f.write(text)
                f.flush()
            os.replace(tmp, target)
        except BaseException:
            if tmp is not None:
                with contextlib.suppress(OSError):
                    os.unlink(tmp)
            raise
    return target


__all__ = ["MARKER", "OutputError", "OutputExistsError", "atomic_output_dir", "check_output_dir",
           "check_parent", "write_errors", "write_text_atomic"]
