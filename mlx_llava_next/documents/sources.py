"""Inputs for document OCR: image files, folders and PDFs expanded into sources, page ranges, PDF rasterisation."""

import ctypes
import os
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, List, Optional, Tuple

from ..errors import ImageError, LlavaNextError

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff"}
PDF_SUFFIXES = {".pdf"}
POINTS_PER_INCH = 72.0
BODY_LINE_PITCH_PT = 13.0  # 11-pt body text set with the usual 1.2 leading
DPI_RANGE = (150, 300)  # below 150 dpi scans lose strokes; above 300 only costs time


class DocumentError(LlavaNextError, ValueError):
    """A document (PDF) cannot be read: broken, truncated, encrypted, no pages, or a bad page range."""


@contextmanager
def ctrl_c_kept():
    """Ctrl-C that lands while ctypes converts a PDFium call's arguments (pypdfium2 objects pass
    themselves through a Python property) comes out of ctypes as ArgumentError("argument 1:
    KeyboardInterrupt: "): give it back as the KeyboardInterrupt it was, so an interrupted run
    stops as any other does."""
    try:
        yield
    except ctypes.ArgumentError as e:
        if "KeyboardInterrupt" in str(e):
            raise KeyboardInterrupt from None
        raise


def parse_pages(spec: Optional[str]) -> Optional[List[Tuple[int, Optional[int]]]]:
    """`1-3,7,10-` -> [(1, 3), (7, 7), (10, None)] (1-based, inclusive; None: to the end); None: all.
    Raises DocumentError naming the bad part."""
    if spec is None or not spec.strip():
        return None
    ranges = []
    for part in spec.split(","):
        part = part.strip()
        if not part:
            raise DocumentError(f"--pages {spec!r}: empty range between commas")
        first, dash, last = part.partition("-")
        try:
            a = int(first)
            b = (int(last) if last.strip() else None) if dash else a
        except ValueError:
            raise DocumentError(f"--pages {spec!r}: {part!r} is not a page number or a range like 2-5") from None
        if a < 1 or (b is not None and b < 1):
            raise DocumentError(f"--pages {spec!r}: pages are numbered from 1")
        if b is not None and b < a:
            raise DocumentError(f"--pages {spec!r}: range {part!r} runs backwards")
        ranges.append((a, b))
    return ranges


def select_pages(ranges, count: int, name: str) -> List[int]:
    """The 1-based page numbers `ranges` picks from a document of `count` pages, in order, once each."""
    if count == 0:
        raise DocumentError(f"{name}: the document has no pages")
    if ranges is None:
        return list(range(1, count + 1))
    chosen = sorted({p for a, b in ranges for p in range(a, min(count, b or count) + 1)})
    if not chosen:
        raise DocumentError(f"{name}: --pages selects no page of this {count}-page document")
    return chosen


def default_dpi(line_pitch_px: float) -> int:
    """The rendering resolution at which 11-pt body text has the line pitch the model reads best
    (`layout.Geometry.line_pitch`), within DPI_RANGE."""
    dpi = line_pitch_px / (BODY_LINE_PITCH_PT / POINTS_PER_INCH)
    return int(min(max(round(dpi / 10) * 10, DPI_RANGE[0]), DPI_RANGE[1]))


@dataclass
class Source:
    """One input file: an image (one page) or a PDF (its selected pages)."""

    path: Path
    kind: str  # "image" or "pdf"
    pages: List[int] = field(default_factory=lambda: [1])
    page_count: int = 1
    folder: Path = Path()  # where it lies below the folder argument it was found in (outputs keep that place)
    _pdf: object = None

    def render(self, page: int, dpi: int):
        """Page `page` (1-based) as an RGB PIL image: images are loaded with the decompression guard,
        PDF pages rasterised at `dpi` with the same pixel limit."""
        if self.kind == "image":
            from ..image_processing import load_image

            return load_image(str(self.path))
        with ctrl_c_kept():
            return _render_pdf_page(self._document(), page, dpi, str(self.path))

    def _document(self):
        if self._pdf is None:
            self._pdf = _open_pdf(self.path)
        return self._pdf

    def close(self) -> None:
        if self._pdf is not None:
            with ctrl_c_kept():
                self._pdf.close()
            self._pdf = None


def _open_pdf(path: Path):
    try:
        import pypdfium2 as pdfium
    except ImportError:
        raise DocumentError(f"{path}: reading PDFs needs pypdfium2: pip install -e '.[pdf]'") from None
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(1024)
            f.seek(max(0, size - 2048))
            tail = f.read()
    except OSError as e:
        raise DocumentError(f"{path}: cannot read ({os.strerror(e.errno) if e.errno else e})") from None
    if not head.lstrip().startswith(b"%PDF-"):
        raise DocumentError(f"{path}: not a PDF (no %PDF- header)")
    if b"%%EOF" not in tail:
        raise DocumentError(f"{path}: truncated PDF (no %%EOF marker at the end; the file was cut short)")
    try:
        return pdfium.PdfDocument(str(path))
    except pdfium.PdfiumError as e:
        text = str(e)
    data = path.read_bytes()  # PDFium's last-error code outlives the call that set it: check the file
    if b"/Encrypt" in data:
        raise DocumentError(f"{path}: the PDF is encrypted (password protected); decrypt it first, "
                            f"e.g. qpdf --decrypt --password=... in.pdf out.pdf")
    if not _has_page_object(data):
        raise DocumentError(f"{path}: the PDF has no pages")
    raise DocumentError(f"{path}: broken PDF ({text})")


def _has_page_object(data: bytes) -> bool:
    """Whether the file holds a /Type /Page object (PDFium refuses a document with an empty page tree
    with no error code of its own). Compressed object streams count as 'maybe'."""
    import re

    return bool(re.search(rb"/Type\s*/Page(?![a-zA-Z])", data)) or b"/ObjStm" in data


def _render_pdf_page(pdf, page: int, dpi: int, name: str):
    from PIL import Image

    import pypdfium2 as pdfium

    try:
        handle = pdf[page - 1]
    except (pdfium.PdfiumError, IndexError) as e:
        raise DocumentError(f"{name}: cannot load page {page} ({e})") from None
    try:
        w_pt, h_pt = handle.get_size()
        scale = dpi / POINTS_PER_INCH
        w, h = round(w_pt * scale), round(h_pt * scale)
        limit = Image.MAX_IMAGE_PIXELS
        if limit and w * h > limit:
            raise ImageError(f"{name}: page {page} at {dpi} dpi would be {w}x{h} pixels, over the decompression-bomb "
                             f"limit of {limit} (PIL.Image.MAX_IMAGE_PIXELS); lower --dpi")
        if w < 1 or h < 1:
            raise DocumentError(f"{name}: page {page} has no area ({w_pt:.0f}x{h_pt:.0f} pt)")
        try:
            # pypdfium2 sizes the bitmap ceil(size * scale): a page box that is a float a hair over a whole
            # number of pixels (792 pt * 150/72 = 1650.0000000000002; a 19.2-pt strip) gets one more row,
            # and PDFium stretches the page onto it, blurring every glyph. A scale 1e-6 smaller renders the
            # page at its size (no visible change: under 0.01 pixel across a 300-dpi page)
            bitmap = handle.render(scale=scale * (1 - 1e-6))
        except pdfium.PdfiumError as e:
            raise DocumentError(f"{name}: cannot render page {page} ({e})") from None
        return bitmap.to_pil().convert("RGB")
    finally:
        handle.close()


def expand(paths: Iterable[Path], recursive: bool = False, pages: Optional[str] = None,
           errors: Optional[List[str]] = None) -> List[Source]:
    """Inputs -> sources (PDFs opened to count their pages; nothing rendered). Problems go to `errors`
    as one line per file and the rest goes on; a bad --pages spec raises DocumentError."""
    ranges = parse_pages(pages)
    errors = [] if errors is None else errors
    files: List[Tuple[Path, Path]] = []  # (file, its folder below the folder argument)
    for path in map(Path, paths):
        if path.is_dir():
            walk = path.rglob("*") if recursive else path.iterdir()
            found = sorted(p for p in walk if p.is_file() and _wanted(p.relative_to(path)))
            if not found:
                more = "" if recursive else " (--recursive also looks in its subfolders)"
                errors.append(f"{path}: no image or PDF files in this folder{more}")
            files.extend((p, p.parent.relative_to(path)) for p in found)
        elif path.is_file():
            files.append((path, Path()))
        else:
            errors.append(f"{path}: file not found")
    sources = []
    for f, folder in files:
        if f.suffix.lower() in PDF_SUFFIXES:
            try:
                with ctrl_c_kept():
                    pdf = _open_pdf(f)
                    try:
                        count = len(pdf)
                    finally:
                        pdf.close()
                sources.append(Source(f, "pdf", select_pages(ranges, count, str(f)), count, folder))
            except LlavaNextError as e:
                errors.append(str(e) if str(e).startswith((f.name, str(f))) else f"{f}: {e}")
        else:
            sources.append(Source(f, "image", folder=folder))
    return sources


def _wanted(relative: Path) -> bool:
    """Images and PDFs found in a folder, except hidden files and anything in hidden folders (.git,
    .thumbnails, the run's own .ocr-state records); other files are passed over without a word."""
    return (not any(part.startswith(".") for part in relative.parts)
            and relative.suffix.lower() in IMAGE_SUFFIXES | PDF_SUFFIXES)
