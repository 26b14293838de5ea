"""`ocr`: transcribe images, folders and PDFs page by page (mlx_llava_next.documents), resumable, into txt/md/json/jsonl."""

import os
from pathlib import Path
from typing import Annotated, List, Optional

import typer

from ..errors import LlavaNextError, OutputError
from .common import DEFAULT_MODEL, user_errors
from .generate import (DistributedOpt, ExactOpt, KvCacheOpt, MaxTokensOpt, ModelOpt, check_exact, kv_cache_choice,
                       line_reader, load_model,
                       resolve_model_arg)

FORMATS = ("txt", "md", "json", "jsonl")  # documents.output.FORMATS (not imported: keeps --help fast)
LAYOUTS = ("auto", "whole", "bands")  # documents.layout.LAYOUTS


def ocr_command(
    paths: Annotated[List[Path], typer.Argument(help="Image files, PDFs, or folders of them.")],
    model: ModelOpt = DEFAULT_MODEL,
    out: Annotated[Optional[Path], typer.Option("--out", "-o", help="Write the outputs into this folder instead of beside the inputs; '-' writes to stdout.")] = None,
    fmt: Annotated[str, typer.Option("--format", "-f", help="txt (pages separated by form feeds), md, json (pages with bands and timings) or jsonl (one page a line).")] = "txt",
    pages: Annotated[Optional[str], typer.Option("--pages", help="PDF pages to read, e.g. 1-3,7 or 5- (default: all).")] = None,
    dpi: Annotated[Optional[int], typer.Option("--dpi", help="PDF rendering resolution (default: the one at which body text has the size the model reads best, 150-300).")] = None,
    layout: Annotated[str, typer.Option("--layout", help="auto (per page), whole (the page as one image) or bands (strips at the model's reading scale; one line each for line-reading models).")] = "auto",
    recursive: Annotated[bool, typer.Option("--recursive", "-r", help="Also look in subfolders of folder arguments.")] = False,
    force: Annotated[bool, typer.Option("--force", help="Redo inputs that already have an output (and drop records of interrupted runs).")] = False,
    prompt: Annotated[Optional[str], typer.Option("--prompt", "-p", help="Override the OCR instruction.")] = None,
    max_tokens: MaxTokensOpt = 1024,
    distributed: DistributedOpt = None,
    exact: ExactOpt = None,
    kv_cache: KvCacheOpt = "auto",
):
    """Transcribe images and PDFs: writes <name>.txt (or --format) beside each input (or into --out).

    An interrupted run (Ctrl-C, kill) continues where it stopped when run again; --force starts over.

    Example: python cli.py ocr scans/ report.pdf --pages 1-3 --out texts/
    """
    from ..documents import engine

    if distributed is not None:  # rank 0 chooses, reads and writes (commands/distributed.py): images to .txt
        from . import distributed as split

        with user_errors():
            check_exact(exact, distributed)
            kv_cache_choice(kv_cache, distributed)
            plain = dict(fmt="txt", pages=None, dpi=None, layout="auto", recursive=False)
            given = {"fmt": fmt, "pages": pages, "dpi": dpi, "layout": layout, "recursive": recursive}
            extra = [k for k, v in given.items() if v != plain[k]] + [str(p) for p in paths if p.suffix.lower() == ".pdf"]
            if extra or (out is not None and str(out) == "-"):
                raise LlavaNextError(f"--distributed reads image files into .txt only (not {', '.join(extra) or '--out -'}); "
                                     f"run without --distributed for PDFs and the other options")
            return split.ocr(distributed, model, paths, out, force, prompt, max_tokens)
    report = engine.Report()
    settings = engine.Settings(layout, dpi, pages, prompt, max_tokens)
    to_stdout = out is not None and str(out) == "-"
    with user_errors():  # before any model loading: usable options and --out
        from ..generate import Sampling
        from ..outputs import check_parent, write_errors

        Sampling.from_kwargs(max_tokens=max_tokens)
        kv = kv_cache_choice(kv_cache, None)
        if fmt not in FORMATS:
            raise LlavaNextError(f"--format {fmt!r}: choose one of {', '.join(FORMATS)}")
        settings.check()
        if out is not None and not to_stdout:
            if os.path.lexists(out) and not out.is_dir():
                raise OutputError(f"--out {out} exists and is not a directory; give a directory for the outputs")
            check_parent(out / f"x.{fmt}")
    jobs = engine.plan(paths, out, fmt, recursive, settings, force, report)
    if jobs:
        with user_errors():
            m, processor = load_model(model, exact)
            m.kv_cache = kv  # None: kv_cache.py's default policy
            reader = line_reader(model)
            if out is not None and not to_stdout:
                with write_errors(out):
                    out.mkdir(parents=True, exist_ok=True)
        try:
            engine.run(jobs, m, processor, settings, fmt, str(resolve_model_arg(model)), reader, report)
        except KeyboardInterrupt:
            _summary(report)
            typer.echo(f"interrupted: {report.pages_done} pages done in this run are recorded; run the same "
                       f"command again to continue", err=True)
            raise typer.Exit(130)
    if _summary(report):
        raise typer.Exit(1)


def _summary(report) -> bool:
    """Print the errors and the summary line; True if anything failed."""
    for message in report.errors:
        typer.echo(f"error: {message}", err=True)
    line = f"ocr: {report.written} written, {report.skipped} skipped"
    if report.skipped:
        line += " (already done; --force redoes them)"
    if report.errors:
        line += f", {len(report.errors)} failed"
    line += f"; {report.pages_done} pages read"
    if report.pages_resumed:
        line += f", {report.pages_resumed} resumed from an interrupted run"
    typer.echo(line, err=True)
    return bool(report.errors)
