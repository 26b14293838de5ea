"""Page layout for OCR: read a page whole, or as bands (overlapping strips fitted to the model's grid pinpoints at
the text scale it reads best; one text line each for line-reading models), blank strips skipped, overlaps merged."""

import difflib
from dataclasses import dataclass
from typing import Callable, List, Optional, Sequence, Tuple

import numpy as np
from PIL import Image

from .. import lines

LAYOUTS = ("auto", "whole", "bands")
LINES_PER_TILE = 12  # an ordinary checkpoint reads text best at about 12 lines per vision tile (28 px at 336)
ANALYSIS_HEIGHT = 1600  # ink analysis runs on a copy at most this tall (cheap on 300-dpi pages)
STRIP_OVERLAP = 0.25  # overlap of fixed strips where no clean line gaps are found
MERGE_SIMILARITY = 0.75
READER_PITCH = 1.5  # a line reader's page is box-reduced while its line pitch is over this many model lines  # two transcribed lines this similar (difflib ratio) are the same page line


@dataclass
class Geometry:
    """What the model sees, from its own configuration."""

    tile: int  # the vision tile (crop_size)
    pinpoints: List[Tuple[int, int]]  # anyres resolutions, (height, width)
    reader: Optional[lines.ReaderSettings] = None  # set for models that read one text line at a time

    @classmethod
    def of(cls, processor, reader=None) -> "Geometry":
        ip = processor.image_processor
        tile = int(ip.crop_size["height"])
        pins = [(int(h), int(w)) for h, w in (ip.image_grid_pinpoints or [[tile, tile]])]
        return cls(tile, pins, reader)

    @property
    def line_pitch(self) -> float:
        """Distance between text lines, in model input pixels, at which the model reads best."""
        if self.reader is not None:
            return float(self.reader.line_height)
        return self.tile / LINES_PER_TILE

    def fit_scale(self, height: int, width: int) -> float:
        """The scale anyres gives an image of this size (its best pinpoint, aspect kept)."""
        return max(min(h / height, w / width) for h, w in self.pinpoints)


@dataclass
class PageInk:
    """Cheap ink analysis of a page: line bands in page pixels, content box, paper level."""

    lines: List[Tuple[int, int]]
    box: Optional[Tuple[int, int, int, int]]  # x0, y0, x1, y1 of the ink; None: blank page
    paper: int

    @property
    def blank(self) -> bool:
        return self.box is None

    @property
    def pitch(self) -> float:
        """Median distance between line tops (1.2x the line height for a single line)."""
        if len(self.lines) >= 2:
            return float(np.median(np.diff([a for a, _ in self.lines])))
        if self.lines:
            return 1.2 * (self.lines[0][1] - self.lines[0][0])
        return 0.0


def _has_ink(mask: np.ndarray) -> bool:
    return int(mask.sum()) >= max(8, int(1e-4 * mask.size))


def analyse(image: Image.Image) -> PageInk:
    """Line bands, ink box and paper level of a page, measured on a reduced copy."""
    factor = max(1, int(np.ceil(image.height / ANALYSIS_HEIGHT)))
    small = image.convert("L")
    if factor > 1:
        small = small.reduce(factor)
    g = lines.gray(small)
    mask, paper = lines.ink_mask(g)
    if not _has_ink(mask):
        return PageInk([], None, int(paper))
    rows, cols = np.flatnonzero(mask.any(axis=1)), np.flatnonzero(mask.any(axis=0))
    box = (int(cols[0]) * factor, int(rows[0]) * factor,
           min(image.width, (int(cols[-1]) + 1) * factor), min(image.height, (int(rows[-1]) + 1) * factor))
    found = [(a * factor, min(image.height, b * factor)) for a, b in lines.line_bands(mask)]
    return PageInk(found, box, int(paper))


def choose(layout: str, image: Image.Image, geometry: Geometry, ink: PageInk) -> str:
    """`auto` -> `whole` when the page, fitted whole into the model's input, keeps its text at a readable
    size (or has no clear lines), else `bands`; blank pages -> `blank`. Other layouts pass through."""
    if layout != "auto":
        return layout
    if ink.blank:
        return "blank"
    if not ink.pitch:
        return "whole"
    whole_scale = geometry.fit_scale(image.height, image.width)
    if geometry.reader is not None:  # a line reader's `whole` cuts lines too; bands are per page line
        return "whole" if len(ink.lines) <= 6 else "bands"
    return "whole" if whole_scale * ink.pitch >= 0.8 * geometry.line_pitch else "bands"


@dataclass
class Band:
    box: Tuple[int, int, int, int]  # in page pixels
    image: Image.Image


def _crop(image: Image.Image, box, paper: int) -> Image.Image:
    """`box` of `image`, padded with paper where it leaves the page."""
    x0, y0, x1, y1 = box
    canvas = Image.new("RGB", (x1 - x0, y1 - y0), (paper,) * 3)
    canvas.paste(image.crop((max(0, x0), max(0, y0), min(image.width, x1), min(image.height, y1))),
                 (max(0, -x0), max(0, -y0)))
    return canvas


def strip_shape(geometry: Geometry, ink: PageInk) -> Tuple[float, Tuple[int, int]]:
    """(scale, pinpoint) for the bands of a page: the text as close to the model's best pitch as the
    pinpoints allow for the width of the page's ink, preferring the pinpoint with the most lines."""
    x0, _, x1, _ = ink.box
    width = x1 - x0 + 8
    target = geometry.line_pitch / ink.pitch if ink.pitch else 1.0
    best = None
    for h, w in geometry.pinpoints:
        scale = min(target, w / width)
        key = (round(scale, 4), h / scale)
        if best is None or key > best[0]:
            best = (key, scale, (h, w))
    return best[1], best[2]


def plan_bands(image: Image.Image, geometry: Geometry, ink: PageInk) -> List[Tuple[Tuple[int, int, int, int], int]]:
    """(box in page pixels, most text lines it may share with the band before) for an ordinary model:
    whole lines packed into strips of one pinpoint's shape, consecutive strips sharing their boundary
    line; fixed strips with STRIP_OVERLAP where a line is taller than a strip (figures, no clear gaps)."""
    if ink.blank:
        return []
    scale, (ph, pw) = strip_shape(geometry, ink)
    band_h, band_w = int(round(ph / scale)), int(round(pw / scale))
    x0 = max(0, ink.box[0] - 4)
    pad = max(2, int(0.15 * ink.pitch)) if ink.pitch else 2
    boxes = []
    spans = ink.lines
    i, shares = 0, 0
    while i < len(spans):
        top = spans[i][0]
        if spans[i][1] - top + 2 * pad > band_h:  # a tall thing: fixed overlapping strips over it
            y, end = top - pad, spans[i][1] + pad
            step = max(1, int(band_h * (1 - STRIP_OVERLAP)))
            while True:
                boxes.append(((x0, y, x0 + band_w, y + band_h), 3 if y > top - pad else shares))
                if y + band_h >= end:
                    break
                y += step
            i, shares = i + 1, 3
            continue
        j = i
        while j + 1 < len(spans) and spans[j + 1][1] - top + 2 * pad <= band_h:
            j += 1
        boxes.append(((x0, top - pad, x0 + band_w, top - pad + band_h), shares))
        if j + 1 >= len(spans):
            break
        shares = 1 if j - i >= 2 else 0  # share the last line with the next strip when a strip holds 3+
        i = j if shares else j + 1
    return boxes


def merge_texts(texts: Sequence[str], overlaps: Optional[Sequence[int]] = None, max_overlap: int = 3) -> str:
    """Join band transcriptions top to bottom, dropping the head lines of each that repeat the tail of
    the text so far (the shared boundary lines), compared loosely: a line read twice is kept once.
    `overlaps[i]`: the most lines band i can share with the band before (0: none, so equal
    neighbouring lines of the page are both kept); default `max_overlap` for every band."""
    merged: List[str] = []
    for n, text in enumerate(texts):
        limit = max_overlap if overlaps is None else overlaps[n]
        new = [l.rstrip() for l in text.strip("\n").splitlines()]
        if not new:
            continue
        drop = 0
        for k in range(min(limit, len(merged), len(new)), 0, -1):
            pairs = zip(merged[-k:], new[:k])
            if all(_same_line(a, b) for a, b in pairs):
                drop = k
                break
        merged.extend(new[drop:])
    return "\n".join(merged)


def _same_line(a: str, b: str) -> bool:
    a, b = " ".join(a.split()), " ".join(b.split())
    if not a and not b:
        return True
    return difflib.SequenceMatcher(None, a, b, autojunk=False).ratio() >= MERGE_SIMILARITY


def _sharpest(image: Image.Image, angles) -> float:
    paper = int(lines.ink_mask(lines.gray(image))[1])
    best, best_angle = -1.0, 0.0
    for angle in angles:
        rotated = image.rotate(float(angle), resample=Image.BILINEAR, fillcolor=paper) if angle else image
        rows = lines.ink_mask(lines.gray(rotated))[0].sum(axis=1).astype(np.float64)
        score = float((np.diff(rows) ** 2).sum())
        if score > best:
            best, best_angle = score, float(angle)
    return best_angle


def skew_angle(image: Image.Image, max_angle: float = 2.0, step: float = 0.25) -> float:
    """The rotation (degrees) that makes the row ink profile sharpest: searched on a reduced copy, then
    decided at full resolution between that angle, its neighbours and no rotation (on the reduced copy
    small text blurs into its neighbours, and a straight page could come out turned by a step)."""
    page = image.convert("L")
    factor = max(1, int(np.ceil(page.height / 800)))
    if factor == 1:
        return _sharpest(page, np.arange(-max_angle, max_angle + 1e-6, step))
    coarse = _sharpest(page.reduce(factor), np.arange(-max_angle, max_angle + 1e-6, step))
    near = {0.0} | {round(a, 6) for a in (coarse - step, coarse, coarse + step) if abs(a) <= max_angle + 1e-6}
    return _sharpest(page, sorted(near, key=abs))


def read_page(image: Image.Image, layout: str, geometry: Geometry, read_image: Callable[[Image.Image], str],
              read_line: Optional[Callable[[Image.Image], str]] = None) -> Tuple[str, List[dict], str]:
    """(text, bands, layout used) of one page. `read_image` transcribes an image with the model (an
    ordinary model's whole page or band); `read_line` is a line reader's one-line reading."""
    ink = analyse(image)
    used = choose(layout, image, geometry, ink)
    full = [0, 0, image.width, image.height]
    factor = int(ink.pitch // (READER_PITCH * geometry.line_pitch)) if geometry.reader is not None else 1
    if factor >= 2 and used in ("whole", "bands"):
        # a line reader scales each line to its cap height with a plain (aliasing) resampler: bring text
        # near the model's size first with a box filter (a 300-dpi page read like a 150-dpi one)
        image = image.reduce(factor)
    if used == "blank":
        return "", [], used
    if used == "whole":
        if geometry.reader is not None:
            text = lines.read_block(image, geometry.reader, read_line)
        else:
            text = read_image(image).strip()
        return text, [{"box": full, "text": text}], used
    if geometry.reader is not None:
        text, bands = _read_line_bands(image, geometry.reader, read_line)
        for band in bands:
            band["box"] = [v * max(1, factor) for v in band["box"]]
        return text, bands, used
    bands, texts, overlaps, skipped = [], [], [], False
    for box, shares in plan_bands(image, geometry, ink):
        crop = _crop(image, box, ink.paper)
        if not _has_ink(lines.ink_mask(lines.gray(crop.convert("L")))[0]):
            skipped = True  # a blank strip: no model call, and nothing shared with the next
            continue
        text = read_image(crop).strip()
        bands.append({"box": list(box), "text": text})
        texts.append(text)
        overlaps.append(0 if skipped else shares)
        skipped = False
    return merge_texts(texts, overlaps), bands, used


def _read_line_bands(image: Image.Image, settings, read_line) -> Tuple[str, List[dict]]:
    """A line reader's bands: the page deskewed once, its text lines found by ink projection (lines.py),
    each read in the model's line geometry."""
    angle = skew_angle(image)
    page = image.convert("L")
    g0 = lines.gray(page)
    paper = lines.ink_mask(g0)[1]
    if angle:
        page = page.rotate(angle, resample=Image.BICUBIC, fillcolor=int(paper))
    g = lines.gray(page)
    mask, paper = lines.ink_mask(g)
    out, bands = [], []
    spans = lines.line_bands(mask)
    hint = lines.block_pitch([mask[a:b] for a, b in spans], settings)  # the page's one monospaced grid
    for top, bottom in spans:
        crops = lines.normalize_line(g[top:bottom], mask[top:bottom], paper, settings, hint)
        if not crops:
            continue
        text = ""
        for c in crops:
            text += c.join + " " * c.leading_spaces + read_line(c.image).strip("\n")
        text = text.rstrip()
        bands.append({"box": [0, int(top), image.width, int(bottom)], "text": text})
        out.append(text)
    return "\n".join(out), bands
