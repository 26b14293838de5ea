"""The document OCR engine: `ocr_document` reads a source page by page, recording each finished page in a hidden
state file so an interrupted run resumes; `run` drives many files for the CLI (progress, skip/--force, summary)."""

import json
import os
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Union

from ..errors import LlavaNextError, OutputError
from . import layout as layouts
from . import output as outputs
from .sources import DocumentError, Source, default_dpi, expand, parse_pages, select_pages

STATE_VERSION = 1


def state_path(target: Path) -> Path:
    """The hidden record of finished pages kept beside an output until it is complete."""
    return target.parent / f".{target.name}.ocr-state"


@dataclass
class Settings:
    layout: str = "auto"
    dpi: Optional[int] = None  # None: the model's default (sources.default_dpi)
    pages: Optional[str] = None
    prompt: Optional[str] = None
    max_tokens: int = 1024

    def check(self) -> None:
        if self.layout not in layouts.LAYOUTS:
            raise LlavaNextError(f"--layout {self.layout!r}: choose one of {', '.join(layouts.LAYOUTS)}")
        if self.dpi is not None and not 36 <= self.dpi <= 1200:
            raise LlavaNextError(f"--dpi {self.dpi}: give a resolution between 36 and 1200")
        parse_pages(self.pages)


class PageLog:
    """Append-only JSON-lines record of finished pages: a header naming the source and settings, then one
    line per page, flushed and fsynced as each page ends. A torn last line (kill -9 while writing) is
    ignored and cut off; a header for another file version or other settings starts the record over."""

    def __init__(self, path: Optional[Path], header: dict):
        self.path, self.header, self.records = path, header, {}
        self.restarted = False
        if path is None:
            return
        good = 0
        try:
            with open(path, "rb") as f:
                data = f.read()
        except FileNotFoundError:
            data = b""
        lines = data.split(b"\n")
        for i, raw in enumerate(lines[:-1]):  # the part after the last newline is torn
            try:
                entry = json.loads(raw)
            except ValueError:
                break
            if i == 0:
                if entry != header:
                    self.restarted = True
                    good = 0
                    break
            else:
                self.records[int(entry["page"])] = entry
            good += len(raw) + 1
        if good == 0:
            self.records = {}
        with open(path, "r+b" if good else "wb") as f:
            f.truncate(good)
            if not good:
                f.write((json.dumps(header) + "\n").encode())
                f.flush()
                os.fsync(f.fileno())

    def add(self, record: dict) -> None:
        self.records[record["page"]] = record
        if self.path is None:
            return
        with open(self.path, "ab") as f:
            f.write((json.dumps(record, ensure_ascii=False) + "\n").encode())
            f.flush()
            os.fsync(f.fileno())

    def remove(self) -> None:
        if self.path is not None and self.path.exists():
            self.path.unlink()


def _fingerprint(source: Source, settings: dict, model: str) -> dict:
    """What a page record depends on: the file's version, the model and the settings (not --pages)."""
    settings = {k: v for k, v in settings.items() if k != "pages"}
    st = source.path.stat()
    return {"version": STATE_VERSION, "source": str(source.path.resolve()), "size": st.st_size,
            "mtime_ns": st.st_mtime_ns, "model": model, "settings": settings}


class PageReader:
    """The model bound to the page layout: `read(image) -> (text, bands, layout used)`."""

    def __init__(self, model, processor, reader=None, prompt: Optional[str] = None, max_tokens: int = 1024,
                 layout: str = "auto"):
        from ..generate import generate

        self.geometry = layouts.Geometry.of(processor, reader)
        self.layout = layout
        if prompt is None:
            from ..chat_templates import family
            from ..commands.generate import OCR_PROMPTS

            prompt = OCR_PROMPTS.get(family(model.config, processor.hf_tokenizer), OCR_PROMPTS["default"])
        self.read_image = lambda img: generate(model, processor, prompt, images=[img], max_tokens=max_tokens).text
        self.read_line = None
        if reader is not None:
            from ..lines import model_reader

            self.read_line = model_reader(model, processor)

    @property
    def dpi(self) -> int:
        return default_dpi(self.geometry.line_pitch if self.geometry.reader is None else 2 * self.geometry.line_pitch)

    def read(self, image):
        return layouts.read_page(image, self.layout, self.geometry, self.read_image, self.read_line)


def _settings_record(settings: Settings, dpi: int) -> dict:
    return {"layout": settings.layout, "dpi": dpi, "pages": settings.pages, "prompt": settings.prompt,
            "max_tokens": settings.max_tokens}


def ocr_document(model, processor, source: Union[str, os.PathLike, Source], *, layout: str = "auto",
                 dpi: Optional[int] = None, pages: Optional[str] = None, prompt: Optional[str] = None,
                 max_tokens: int = 1024, model_path: Optional[str] = None, reader=None,
                 state: Optional[Path] = None, on_page: Optional[Callable[[dict], None]] = None,
                 page_reader: Optional[PageReader] = None) -> dict:
    """OCR one image or PDF: {"source", "model", "settings", "pages": [{"page", "text", "bands", "seconds",
    "layout"}], "page_count"}.

    `model_path` names the model in the result and finds its line-reader settings (lines.py) unless
    `reader` is given. With `state` (a file path), each finished page is recorded there first and pages
    already recorded by an earlier, interrupted call with the same source and settings are not redone;
    the caller removes the file once it has written its output. `on_page(record)` follows every page.
    Raises DocumentError / ImageError for an unreadable source."""
    settings = Settings(layout, dpi, pages, prompt, max_tokens)
    settings.check()
    if reader is None and model_path is not None:
        from ..lines import reader_settings

        reader = reader_settings(model_path)
    if isinstance(source, Source):
        src = source
    else:
        errors: List[str] = []
        found = expand([Path(source)], pages=pages, errors=errors)
        if errors:
            raise DocumentError(errors[0])
        src = found[0]
    pr = page_reader or PageReader(model, processor, reader, prompt, max_tokens, layout)
    dpi = dpi or pr.dpi
    record = _settings_record(settings, dpi)
    name = str(model_path) if model_path is not None else ""
    log = PageLog(state, _fingerprint(src, record, name))
    try:
        for page in src.pages:
            if page in log.records:
                continue
            start = time.perf_counter()
            image = src.render(page, dpi)
            text, bands, used = pr.read(image)
            entry = {"page": page, "text": text, "bands": bands, "seconds": round(time.perf_counter() - start, 3),
                     "layout": used}
            log.add(entry)
            if on_page is not None:
                on_page(entry)
    finally:
        src.close()
    return {"source": str(src.path), "model": name, "settings": record,
            "pages": [log.records[p] for p in src.pages], "page_count": src.page_count}


# -- many files (the CLI) -------------------------------------------------------------------


@dataclass
class Job:
    source: Source
    target: Optional[Path]  # None: stdout
    state: Optional[Path]
    todo: int = 0


@dataclass
class Report:
    written: int = 0
    skipped: int = 0
    errors: List[str] = field(default_factory=list)
    pages_done: int = 0
    pages_resumed: int = 0


def plan(paths: Sequence[Path], out: Optional[Path], fmt: str, recursive: bool, settings: Settings, force: bool,
         report: Report) -> List[Job]:
    """Sources -> jobs: outputs named, finished ones skipped (unless force), --force clearing old records."""
    from ..outputs import check_parent

    to_stdout = out is not None and str(out) == "-"
    jobs, targets = [], {}
    for src in expand(paths, recursive=recursive, pages=settings.pages, errors=report.errors):
        if to_stdout:
            jobs.append(Job(src, None, None))
            continue
        target = outputs.target(src.path, out, fmt, src.folder)
        if target in targets:
            report.errors.append(f"{src.path}: its output {target} is also the output of {targets[target]}; "
                                 f"OCR them separately")
            continue
        targets[target] = src.path
        state = state_path(target) if src.kind == "pdf" else None
        if force and state is not None and state.exists():
            state.unlink()
        if target.exists() and not force and not (state is not None and state.exists()):
            report.skipped += 1
            continue
        try:
            check_parent(target)
        except OutputError as e:
            report.errors.append(str(e))
            continue
        jobs.append(Job(src, target, state))
    return jobs


def run(jobs: List[Job], model, processor, settings: Settings, fmt: str, model_path: str, reader, report: Report,
        stream=None, show_progress: bool = True) -> None:
    """OCR the jobs: one progress bar over all pages to do, each file written atomically when complete,
    errors collected per file. KeyboardInterrupt propagates with every finished page recorded."""
    from ..outputs import write_text_atomic

    stream = stream or sys.stdout
    pr = PageReader(model, processor, reader, settings.prompt, settings.max_tokens, settings.layout)
    dpi = settings.dpi or pr.dpi
    for job in jobs:
        done = 0
        if job.state is not None and job.state.exists():
            header = _fingerprint(job.source, _settings_record(settings, dpi), model_path)
            done = len(PageLog(job.state, header).records)
            report.pages_resumed += done
        job.todo = len(job.source.pages) - done
    bar = _Progress(sum(j.todo for j in jobs), show_progress)
    with bar:
        for job in jobs:
            ticks = [0]

            def tick(entry, ticks=ticks):
                ticks[0] += 1
                report.pages_done += 1
                bar.advance()

            try:
                if job.target is not None:
                    from ..outputs import write_errors

                    with write_errors(job.target):  # a subfolder of --out (--recursive), for the record too
                        job.target.parent.mkdir(parents=True, exist_ok=True)
                doc = ocr_document(model, processor, job.source, layout=settings.layout, dpi=dpi,
                                   pages=settings.pages, prompt=settings.prompt, max_tokens=settings.max_tokens,
                                   model_path=model_path, reader=reader, state=job.state, page_reader=pr,
                                   on_page=tick)
                text = outputs.render(doc, fmt)
                if job.target is None:
                    stream.write(text)
                    stream.flush()
                else:
                    write_text_atomic(job.target, text)
                    if job.state is not None:
                        job.state.unlink(missing_ok=True)
                report.written += 1
            except LlavaNextError as e:
                message = " ".join(str(e).split())
                name = str(job.source.path)
                if not (message.startswith(name) or message.startswith(job.source.path.name)):
                    message = f"{name}: {message}"
                report.errors.append(message)
                bar.advance(max(0, job.todo - ticks[0]))  # the pages of a failed file are not coming
            finally:
                job.source.close()


class _Progress:
    """A rich bar over pages with an ETA on stderr (the columns of convert.common.progress)."""

    def __init__(self, total: int, enabled: bool):
        self.total, self.enabled, self._bar = total, enabled and total > 0, None

    def __enter__(self):
        if self.enabled:
            from rich.console import Console
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

            columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn())
            self._bar = Progress(*columns, console=Console(stderr=True), transient=False)
            self._bar.__enter__()
            self._task = self._bar.add_task("OCR pages", total=self.total)
        return self

    def advance(self, n: int = 1) -> None:
        if self._bar is not None and n:
            self._bar.advance(self._task, n)

    def __exit__(self, *exc):
        if self._bar is not None:
            self._bar.__exit__(*exc)
        return False
