"""Line reading for models that read one text line at a time (the demo model): cut a block image into
text lines by ink projection, bring each line to the model's training geometry, read, join.

A model says it reads lines with a `line_reader` entry in its config.json (or a `reader.json` beside
its weights, e.g. next to a GGUF pair): the line image height, the baseline row, the advance of one
character and the cap height it was trained on, and the widest line image it takes.

Per block: deskew (the angle in +-2 degrees that makes the row profile sharpest), split rows into
bands of ink, and per band find the baseline (the last row holding much ink) and the cap line (the
first row with ink). The band is scaled so its cap height matches training; for a monospaced line
the character pitch is then measured from the column profile (autocorrelation) and the cell grid
fitted to the inter-character gaps, so every character lands in its own patch column, as in
training. In a block of several lines, a line with no clear period of its own (digits and dashes
fill their cells) takes the pitch its neighbours agree on. Lines wider than the model takes are read in pieces of whole cells.
"""

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, List, Optional, Tuple

import numpy as np
from PIL import Image


@dataclass
class ReaderSettings:
    line_height: int = 16
    baseline: int = 12
    char_width: int = 8
    cap_height: float = 9.0
    max_width: int = 256
    widths: Tuple[int, ...] = (64, 128, 256)

    @classmethod
    def from_dict(cls, d: dict) -> "ReaderSettings":
        fields = cls.__dataclass_fields__
        kw = {k: v for k, v in d.items() if k in fields}
        if "widths" in kw:
            kw["widths"] = tuple(int(w) for w in kw["widths"])
        return cls(**kw)


def reader_settings(model_path) -> Optional[ReaderSettings]:
    """The line-reader settings of a model directory or GGUF file; None for ordinary models."""
    path = Path(model_path)
    folder = path if path.is_dir() else path.parent
    config = folder / "config.json"
    if config.exists():
        try:
            entry = json.loads(config.read_text()).get("line_reader")
        except (json.JSONDecodeError, OSError, AttributeError):
            entry = None
        if entry:
            return ReaderSettings.from_dict(entry)
    reader = folder / "reader.json"
    if reader.exists():
        return ReaderSettings.from_dict(json.loads(reader.read_text()))
    return None


# -- ink analysis ---------------------------------------------------------------------------------


def gray(image) -> np.ndarray:
    if isinstance(image, Image.Image):
        return np.asarray(image.convert("L"), dtype=np.float32)
    arr = np.asarray(image, dtype=np.float32)
    return arr.mean(axis=-1) if arr.ndim == 3 else arr


def ink_mask(g: np.ndarray) -> Tuple[np.ndarray, float]:
    """(ink mask, paper level): ink is darker than halfway between paper and the darkest ink."""
    paper = float(np.percentile(g, 90))
    dark = float(np.percentile(g, 0.5))
    if paper - dark < 40:
        return np.zeros(g.shape, bool), paper
    return g < (paper + dark) / 2, paper


def _profile_sharpness(mask: np.ndarray) -> float:
    rows = mask.sum(axis=1).astype(np.float64)
    return float((np.diff(rows) ** 2).sum())


def deskew(image: Image.Image, max_angle: float = 2.0, step: float = 0.25) -> Image.Image:
    """The image rotated by the angle whose horizontal ink profile is sharpest."""
    g = gray(image)
    _, paper = ink_mask(g)
    best, best_angle = -1.0, 0.0
    small = image.convert("L")
    for angle in np.arange(-max_angle, max_angle + 1e-6, step):
        rotated = small.rotate(float(angle), resample=Image.BILINEAR, fillcolor=int(paper)) if angle else small
        score = _profile_sharpness(ink_mask(gray(rotated))[0])
        if score > best:
            best, best_angle = score, float(angle)
    if best_angle == 0.0:
        return image.convert("L")
    return image.convert("L").rotate(best_angle, resample=Image.BICUBIC, fillcolor=int(paper))


def line_bands(mask: np.ndarray) -> List[Tuple[int, int]]:
    """[top, bottom) row ranges of text lines: runs of rows with ink, tiny gaps and specks merged."""
    rows = mask.sum(axis=1)
    has = rows >= max(1, 0.002 * mask.shape[1])
    bands, start = [], None
    for i, h in enumerate(list(has) + [False]):
        if h and start is None:
            start = i
        elif not h and start is not None:
            bands.append([start, i])
            start = None
    if not bands:
        return []
    merged = [bands[0]]
    for b in bands[1:]:
        if b[0] - merged[-1][1] <= 1:
            merged[-1][1] = b[1]
        else:
            merged.append(b)
    tallest = max(b - a for a, b in merged)
    kept = []
    for a, b in merged:
        if b - a < 0.3 * tallest:
            # an accent, underscore or speck: join it to the nearest line
            if kept and a - kept[-1][1] < tallest * 0.5:
                kept[-1][1] = b
                continue
            if b - a < 3:
                continue
        kept.append([a, b])
    return [(a, b) for a, b in kept]


def cap_and_baseline(mask: np.ndarray) -> Tuple[int, int]:
    """(cap row, baseline row) of one line band: first row with ink, last row holding much ink."""
    rows = mask.sum(axis=1).astype(np.float64)
    top = int(np.flatnonzero(rows > 0)[0])
    heavy = np.flatnonzero(rows >= 0.35 * rows.max())
    return top, int(heavy[-1])


def char_pitch(columns: np.ndarray, expected: float) -> Optional[float]:
    """The period of a column ink profile near `expected` (autocorrelation peak), or None."""
    x = columns.astype(np.float64)
    x = x - x.mean()
    n = len(x)
    if n < 4 * expected or not x.any():
        return None
    ac = np.correlate(x, x, mode="full")[n - 1:] / np.arange(n, 0, -1)
    lo, hi = int(expected * 0.8), int(np.ceil(expected * 1.25)) + 1
    if hi >= n // 2:
        return None
    lag = lo + int(np.argmax(ac[lo:hi]))
    if ac[lag] <= 0.1 * ac[0]:
        return None
    # parabolic refinement, then average with the peaks at 2x and 3x lag for precision
    y0, y1, y2 = ac[lag - 1], ac[lag], ac[lag + 1]
    denom = y0 - 2 * y1 + y2
    period = lag + (0.5 * (y0 - y2) / denom if denom else 0.0)
    estimates = [period]
    for k in (2, 3, 4):
        c = int(round(period * k))
        if 3 <= c and c + 3 < n // 2:
            seg = ac[c - 2:c + 3]
            j = c - 2 + int(np.argmax(seg))
            if 1 <= j < len(ac) - 1:
                y0, y1, y2 = ac[j - 1], ac[j], ac[j + 1]
                denom = y0 - 2 * y1 + y2
                estimates.append((j + (0.5 * (y0 - y2) / denom if denom else 0.0)) / k)
    return float(np.median(estimates))


def grid_phase(columns: np.ndarray, pitch: float) -> float:
    """Offset of the cell boundaries that pass through the least ink (the inter-character gaps)."""
    best, best_cost = 0.0, None
    xs = np.arange(len(columns))
    for phase in np.arange(0.0, pitch, 0.25):
        cells = np.floor((xs - phase) / pitch)
        frac = (xs - phase) / pitch - cells
        near = np.minimum(frac, 1 - frac) < 0.12
        cost = columns[near].sum() / max(1, near.sum())
        if best_cost is None or cost < best_cost:
            best, best_cost = float(phase), cost
    return best


# -- normalisation ----------------------------------------------------------------------------------


@dataclass
class LineCrop:
    image: Image.Image  # settings.line_height tall, at most settings.max_width wide
    leading_spaces: int = 0  # blank cells cut off the front (a piece of a monospaced line)
    join: str = ""  # text to put before this piece ("" for the first piece of a line)


def _line_pitch(mask: np.ndarray, s: ReaderSettings) -> Tuple[float, Optional[float], int]:
    """(expected pitch from the cap height, measured character pitch or None, ink width) of a line band."""
    cols_any = np.flatnonzero(mask.any(axis=0))
    top, base = cap_and_baseline(mask)
    expected = s.char_width * max(1, base - top + 1) / s.cap_height
    x0, x1 = int(cols_any[0]), int(cols_any[-1]) + 1
    columns = mask[:, x0:x1].sum(axis=0).astype(np.float64)
    # short lines have too few gaps to fit a grid reliably: they keep the cap-height scale
    pitch = char_pitch(columns, expected) if (x1 - x0) >= 10 * expected else None
    if pitch is not None and abs(pitch / expected - 1) >= 0.2:
        pitch = None
    return expected, pitch, x1 - x0


def block_pitch(masks: List[np.ndarray], s: ReaderSettings) -> Optional[float]:
    """The character pitch shared by the monospaced lines of a block or page: the median of the lines'
    own measurements when at least two agree within 2%, else None. A line whose column profile has no
    clear period (digits and dashes fill their cells) is read on this grid instead of its cap height's."""
    found = [p for m in masks if m.any() for p in [_line_pitch(m, s)[1]] if p is not None]
    if len(found) < 2:
        return None
    median = float(np.median(found))
    agree = [p for p in found if abs(p / median - 1) <= 0.02]
    return float(np.median(agree)) if len(agree) >= max(2, len(found) // 2) else None


def normalize_line(g: np.ndarray, mask: np.ndarray, paper: float, s: ReaderSettings,
                   pitch_hint: Optional[float] = None) -> List[LineCrop]:
    """A line band (gray + ink mask) -> line images in the training geometry (pieces of a wide line).
    `pitch_hint` (block_pitch of the block it is in) replaces the line's own pitch where that is missing
    or off by more than 3%, for lines of at least 3 cells whose cap height agrees with it (within 20%)."""
    cols_any = np.flatnonzero(mask.any(axis=0))
    if not len(cols_any):
        return []
    top, base = cap_and_baseline(mask)
    cap = max(1, base - top + 1)
    scale = s.cap_height / cap
    H = s.line_height
    # vertical: baseline to s.baseline; horizontal: first the same scale
    x0, x1 = int(cols_any[0]), int(cols_any[-1]) + 1
    columns = mask[:, x0:x1].sum(axis=0).astype(np.float64)
    expected, pitch, width = _line_pitch(mask, s)
    if (pitch_hint is not None and abs(pitch_hint / expected - 1) < 0.2 and width >= 3 * pitch_hint
            and (pitch is None or abs(pitch / pitch_hint - 1) > 0.03)):
        pitch = pitch_hint
    if pitch is not None:
        sx = s.char_width / pitch
        phase = grid_phase(columns, pitch)
        # the last cell boundary at or just inside the first ink column (never cut a glyph in half)
        start = x0 + phase - (pitch if phase > 0.15 * pitch else 0.0)
        mono = True
    else:
        sx = scale
        start = x0 - 1 / scale
        mono = False
    # resample the band: output row y <- source row base + (y - s.baseline) / scale
    out_w = int(np.ceil((x1 - start) * sx)) + 1
    if mono:
        out_w = int(np.ceil(out_w / s.char_width)) * s.char_width
    src_top = base - (s.baseline + 0.5) / scale + 0.5
    box = (start, src_top, start + out_w / sx, src_top + H / scale)
    img = Image.fromarray(np.clip(g, 0, 255).astype(np.uint8))
    line = img.transform((out_w, H), Image.EXTENT, box, resample=Image.BILINEAR, fillcolor=int(paper))
    return _pieces(line, paper, s, mono)


def _pieces(line: Image.Image, paper: float, s: ReaderSettings, mono: bool) -> List[LineCrop]:
    """Cut a normalised line into pieces the model takes, each padded to a trained width."""
    arr = np.asarray(line, dtype=np.float32)
    m, _ = ink_mask(arr) if arr.size else (np.zeros_like(arr, bool), paper)
    ink_cols = m.sum(axis=0)
    out: List[LineCrop] = []
    W = arr.shape[1]
    if mono:
        cw = s.char_width
        cells = W // cw
        blank = [ink_cols[i * cw:(i + 1) * cw].sum() == 0 for i in range(cells)]
        per = s.max_width // cw
        i = 0
        while i < cells:
            j = min(cells, i + per)
            lead = 0
            while i + lead < j and blank[i + lead]:
                lead += 1
            a = i + lead
            if a < j:
                out.append(LineCrop(_pad(line.crop((a * cw, 0, j * cw, s.line_height)), paper, s), lead))
            elif out:
                out[-1].leading_spaces += 0
            i = j
        return out
    x = 0
    while x < W:
        end = min(W, x + s.max_width)
        if end < W:  # cut at the widest gap in the second half of the window
            window = ink_cols[x + s.max_width // 2:end] == 0
            best, run, best_end = 0, 0, end
            for k, b in enumerate(window):
                run = run + 1 if b else 0
                if run > best:
                    best, best_end = run, x + s.max_width // 2 + k + 1 - run // 2
            end = best_end
        piece = line.crop((x, 0, end, s.line_height))
        pm = ink_mask(np.asarray(piece, dtype=np.float32))[0]
        if pm.any():
            c = np.flatnonzero(pm.any(axis=0))
            piece = piece.crop((max(0, int(c[0]) - 1), 0, int(c[-1]) + 2, s.line_height))
            out.append(LineCrop(_pad(piece, paper, s), 0, " " if out else ""))
        x = end
    return out


def _pad(piece: Image.Image, paper: float, s: ReaderSettings) -> Image.Image:
    """Right-pad a piece with paper to the narrowest trained width that holds it."""
    width = next((w for w in s.widths if w >= piece.width), s.widths[-1])
    canvas = Image.new("L", (width, s.line_height), int(paper))
    canvas.paste(piece.crop((0, 0, min(piece.width, width), s.line_height)), (0, 0))
    return canvas.convert("RGB")


def split_lines(image, settings: ReaderSettings, straighten: bool = True) -> List[List[LineCrop]]:
    """A block image -> per text line, the model-ready line images."""
    img = image if isinstance(image, Image.Image) else Image.fromarray(np.asarray(image).astype(np.uint8))
    straight = deskew(img) if straighten else img.convert("L")
    g = gray(straight)
    mask, paper = ink_mask(g)
    lines = []
    bands = line_bands(mask)
    hint = block_pitch([mask[a:b] for a, b in bands], settings)
    for top, bottom in bands:
        crops = normalize_line(g[top:bottom], mask[top:bottom], paper, settings, hint)
        if crops:
            lines.append(crops)
    return lines


def read_block(image, settings: ReaderSettings, read_line: Callable[[Image.Image], str]) -> str:
    """Transcribe a block: each line image through `read_line`, lines joined with newlines."""
    out = []
    for crops in split_lines(image, settings):
        text = ""
        for c in crops:
            text += c.join + " " * c.leading_spaces + read_line(c.image).strip("\n")
        out.append(text.rstrip())
    return "\n".join(out)


def model_reader(model, processor, max_tokens: Optional[int] = None) -> Callable[[Image.Image], str]:
    """A `read_line` that runs the model greedily on one line image."""
    from .generate import generate

    limit = max_tokens or 64

    def read(line: Image.Image) -> str:
        return generate(model, processor, "Transcribe the text.", images=[line], max_tokens=limit).text

    return read
