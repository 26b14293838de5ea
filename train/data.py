"""Synthetic printed-text images for the demo model: training lines on the patch grid, held-out lines and blocks."""

import string
from dataclasses import dataclass
from functools import lru_cache
from typing import List, Optional, Tuple

import numpy as np
from PIL import Image, ImageDraw, ImageFilter, ImageFont

# Printable ASCII: the characters the model reads (glyph class 0 is "no ink": background and space).
CHARSET = "".join(chr(c) for c in range(32, 127))
GLYPH_CLASSES = 1 + len(CHARSET) - 1  # background/space + 94 visible characters
CELL_W, CELL_H = 8, 16  # one glyph per 8x16 cell: one patch column, two patch rows (patch 8)
TRAIN_FONT_PX = 13
BASELINE = 12  # baseline row inside a cell
WIDTHS = (64, 128, 256)  # line image widths (each a pinpoint width); height CELL_H
MAX_CHARS = WIDTHS[-1] // CELL_W

FONT_FILES = {
    "mono": "DejaVuSansMono.ttf",
    "sans": "DejaVuSans.ttf",
    "serif": "DejaVuSerif.ttf",
}


@lru_cache(maxsize=None)
def font(name: str, size: int) -> ImageFont.FreeTypeFont:
    """A contract font: 'mono', 'sans', 'serif' (DejaVu) or 'pillow' (Pillow's built-in scalable font)."""
    if name == "pillow":
        return ImageFont.load_default(size=size)
    try:
        return ImageFont.truetype(FONT_FILES[name], size)
    except OSError:
        return ImageFont.truetype(f"/usr/share/fonts/truetype/dejavu/{FONT_FILES[name]}", size)


def glyph_class(ch: str) -> int:
    return 0 if ch == " " else CHARSET.index(ch)


# -- text -------------------------------------------------------------------------------------

WORDS = ("invoice total amount due date order number customer account balance payment item qty "
         "price tax subtotal ship to bill from ref paid net terms page of the and for with").split()


def random_text(rng: np.random.Generator, max_len: int, min_len: int = 1) -> str:
    """Random printable strings (15% spaces), or words/numbers/prices/dates; no outer spaces."""
    n = int(rng.integers(min_len, max_len + 1))
    kind = rng.random()
    if kind < 0.6:
        chars = [" " if rng.random() < 0.15 else CHARSET[int(rng.integers(1, len(CHARSET)))] for _ in range(n)]
        text = "".join(chars)
    else:
        parts = []
        while len(" ".join(parts)) < n:
            r = rng.random()
            if r < 0.4:
                w = WORDS[int(rng.integers(len(WORDS)))]
                parts.append(w.capitalize() if rng.random() < 0.3 else w.upper() if rng.random() < 0.1 else w)
            elif r < 0.6:
                parts.append(str(int(rng.integers(0, 10 ** int(rng.integers(1, 7))))))
            elif r < 0.8:
                parts.append(f"${rng.integers(0, 10000)}.{rng.integers(0, 100):02d}")
            else:
                parts.append(f"{rng.integers(1, 29):02d}/{rng.integers(1, 13):02d}/{rng.integers(1990, 2031)}")
        text = " ".join(parts)[:n]
    text = text.strip()
    return text or CHARSET[int(rng.integers(1, len(CHARSET)))]


# -- training renderer: glyphs on the patch grid ---------------------------------------------


@dataclass
class Line:
    image: Image.Image  # RGB, CELL_H tall, one of WIDTHS wide
    text: str
    glyphs: np.ndarray  # [CELL_H // 8, width // 8] glyph classes of the patches under the text


def width_for(n_chars: int) -> int:
    return next(w for w in WIDTHS if w >= n_chars * CELL_W)


def _colors(rng):
    paper = int(rng.integers(200, 256))
    ink = int(rng.integers(0, 90))
    return paper, ink


def _degrade(img: Image.Image, rng, max_noise: float = 6.0, max_blur: float = 0.6) -> Image.Image:
    if rng.random() < 0.5:
        img = img.filter(ImageFilter.GaussianBlur(float(rng.uniform(0.1, max_blur))))
    arr = np.asarray(img, dtype=np.float32)
    if max_noise > 0:
        arr = arr + rng.normal(0, rng.uniform(0, max_noise), arr.shape)
    return Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8))


def render_cells(text: str, rng: np.random.Generator, width: Optional[int] = None, scale: int = 1,
                 degrade: bool = True) -> Line:
    """The training renderer: DejaVu Sans Mono, one glyph per 8x16 cell (+-1 px jitter), scale x."""
    width = width or width_for(len(text))
    paper, ink = _colors(rng)
    img = Image.new("L", (width * scale, CELL_H * scale), paper)
    draw = ImageDraw.Draw(img)
    f = font("mono", TRAIN_FONT_PX * scale)
    glyphs = np.zeros((CELL_H // 8, width // 8), dtype=np.int32)
    for i, ch in enumerate(text):
        if ch != " ":
            jx, jy = (int(v) for v in rng.integers(-1, 2, 2))
            x = (i * CELL_W + CELL_W / 2 + jx) * scale
            draw.text((x, (BASELINE + jy) * scale), ch, font=f, fill=ink, anchor="ms")
        glyphs[:, i] = glyph_class(ch)
    if degrade:
        img = _degrade(img, rng)
    return Line(img.convert("RGB"), text, glyphs)


# -- the held-out generator: natural typesetting in the contract's terms ----------------------


def render_natural(lines: List[str], rng: np.random.Generator, font_name: str, px: int,
                   max_blur: float = 0.8, max_rotation: float = 1.5) -> Image.Image:
    """Text as a typesetter draws it: natural advance, font size px, margins, noise, blur, rotation."""
    f = font(font_name, px)
    paper, ink = _colors(rng)
    ascent, descent = f.getmetrics()
    pitch = int(round((ascent + descent) * rng.uniform(1.15, 1.5)))
    widths = [int(f.getlength(t)) for t in lines]
    mx_, my = (int(v) for v in rng.integers(4, 3 * px // 2 + 5, 2))
    W = max(widths) + 2 * mx_
    H = pitch * (len(lines) - 1) + ascent + descent + 2 * my
    img = Image.new("L", (W, H), paper)
    draw = ImageDraw.Draw(img)
    for k, t in enumerate(lines):
        draw.text((mx_, my + k * pitch), t, font=f, fill=ink)
    angle = float(rng.uniform(-max_rotation, max_rotation))
    if abs(angle) > 0.05:
        img = img.rotate(angle, resample=Image.BICUBIC, expand=False, fillcolor=paper)
    img = _degrade(img, rng, max_noise=5.0, max_blur=max_blur)
    return img.convert("RGB")


def text_height_px(font_name: str, px: int) -> int:
    """Cap-top to descender-bottom height of a font size (what the contract calls text height)."""
    f = font(font_name, px)
    box = f.getbbox("Hgjpy|")
    return box[3] - box[1]


def heldout_sample(rng: np.random.Generator, kind: str, font_name: str, text_px: Tuple[int, int] = (16, 36),
                   max_len: int = 64) -> Tuple[Image.Image, str, int]:
    """(image, transcript, font size) of a held-out line or block (2-6 lines) of the contract."""
    target = int(rng.integers(text_px[0], text_px[1] + 1))
    px = max(6, int(round(target * target / max(1, text_height_px(font_name, target)))))
    n_lines = 1 if kind == "line" else int(rng.integers(2, 7))
    lines = [random_text(rng, max_len) for _ in range(n_lines)]
    return render_natural(lines, rng, font_name, px), "\n".join(lines), target


def normalized_line(rng: np.random.Generator, width: int, settings, tries: int = 20) -> Optional[Line]:
    """A naturally typeset DejaVu Sans Mono line (16-36 px, noise, blur, rotation) brought to the
    training geometry by the runtime's own line reader (mlx_llava_next.lines): the inference input."""
    from mlx_llava_next import lines

    hi = width // CELL_W
    lo = 1 if width == WIDTHS[0] else hi // 2 + 1
    for _ in range(tries):
        text = random_text(rng, hi, lo)
        target = int(rng.integers(16, 37))
        px = max(6, int(round(target * target / max(1, text_height_px("mono", target)))))
        straight = rng.random() < 0.8  # most without rotation (and deskew): cheaper, same geometry
        img = render_natural([text], rng, "mono", px, max_rotation=0.0 if straight else 1.5)
        found = lines.split_lines(img, settings, straighten=not straight)
        if len(found) != 1 or len(found[0]) != 1 or found[0][0].leading_spaces or found[0][0].image.width != width:
            continue
        glyphs = np.zeros((CELL_H // 8, width // 8), dtype=np.int32)
        glyphs[:, : len(text)] = [glyph_class(c) for c in text]
        return Line(found[0][0].image, text, glyphs)
    return None


# -- the README's example -------------------------------------------------------------------------

SCAN_TEXT = "INVOICE No. 2024-0117\nDate: 03/12/2024\nWidget A x2      $19.90\nShipping fee      $4.50\nTotal due:       $24.40"


def render_scan(path, px: int = 24) -> str:
    """examples/scan.png: an invoice snippet in DejaVu Sans Mono (px), light blur and noise; returns its text."""
    rng = np.random.default_rng(2024)
    f = font("mono", px)
    k = px / 22
    img = Image.new("L", (int(420 * k), int(200 * k)), 246)
    draw = ImageDraw.Draw(img)
    for i, line in enumerate(SCAN_TEXT.split("\n")):
        draw.text((int(24 * k), int((22 + 32 * i) * k)), line, font=f, fill=30)
    img = img.filter(ImageFilter.GaussianBlur(0.4))
    arr = np.asarray(img, dtype=np.float32) + rng.normal(0, 3, (img.height, img.width))
    Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8)).save(path)
    return SCAN_TEXT


if __name__ == "__main__":
    import sys

    print(render_scan(sys.argv[1] if len(sys.argv) > 1 else "examples/scan.png"))
