"""Document OCR measured: letter-size pages rendered to PDF (150 and 300 dpi, 10-12 pt), CER and seconds per page
of `--layout whole` vs `bands`, and the model's CER on the same text as single lines.

    python -m benchmarks.document_ocr --model demo --pages 2 --json benchmarks/results/document_ocr.json
"""

import argparse
import json
import time
from pathlib import Path
from typing import List, Sequence, Tuple

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from mlx_llava_next.text_metrics import edit_distance

MONO = "/usr/share/fonts/truetype/dejavu/DejaVuSansMono.ttf"
WORDS = ("invoice total paid order number date account balance office street north river market lamp "
         "window garden paper ledger copy page print scan line table chair model train value price due").split()
LETTER_IN = (8.5, 11.0)
MARGIN_IN = 1.0


def page_font(pt: float, dpi: int):
    px = max(6, round(pt * dpi / 72))
    try:
        return ImageFont.truetype(MONO, px)
    except OSError:
        return ImageFont.load_default(size=px)


def random_line(rng: np.random.Generator, max_chars: int) -> str:
    """Words, numbers, prices and dates, as in a printed page (ASCII)."""
    parts: List[str] = []
    limit = int(rng.integers(max_chars // 2, max_chars + 1))
    while True:
        kind = rng.integers(0, 6)
        if kind == 0:
            w = f"{rng.integers(1, 9999)}"
        elif kind == 1:
            w = f"${rng.integers(1, 999)}.{rng.integers(0, 100):02d}"
        elif kind == 2:
            w = f"{rng.integers(2000, 2030)}-{rng.integers(1, 13):02d}-{rng.integers(1, 29):02d}"
        else:
            w = str(rng.choice(WORDS))
            if rng.random() < 0.2:
                w = w.capitalize()
            if rng.random() < 0.1:
                w += str(rng.choice([",", ".", ":", ";"]))
        if len(" ".join(parts + [w])) > limit:
            break
        parts.append(w)
    return " ".join(parts) or "x"


def letter_page(lines: Sequence[str], dpi: int, pt: float = 11.0, leading: float = 1.25) -> Image.Image:
    """A white letter-size page at `dpi` with `lines` set in DejaVu Sans Mono from the 1-inch margin."""
    w, h = round(LETTER_IN[0] * dpi), round(LETTER_IN[1] * dpi)
    page = Image.new("L", (w, h), 255)
    draw = ImageDraw.Draw(page)
    font = page_font(pt, dpi)
    y = MARGIN_IN * dpi
    step = pt * leading * dpi / 72
    for line in lines:
        draw.text((MARGIN_IN * dpi, y), line, fill=0, font=font)
        y += step
    return page.convert("RGB")


def document(n_pages: int, lines_per_page: int, dpi: int, pt: float = 11.0, seed: int = 0,
             max_chars: int = 60) -> Tuple[List[Image.Image], List[str]]:
    """(page images, the text of each page): the oracle is the text that was drawn."""
    rng = np.random.default_rng([seed, dpi, int(pt * 10)])
    images, texts = [], []
    for _ in range(n_pages):
        lines = [random_line(rng, max_chars) for _ in range(lines_per_page)]
        images.append(letter_page(lines, dpi, pt))
        texts.append("\n".join(lines))
    return images, texts


def save_pdf(path, images: Sequence[Image.Image], dpi: int) -> Path:
    """A multi-page PDF of the images, each page sized so it prints at `dpi` (Pillow's PDF writer)."""
    images[0].save(path, save_all=True, append_images=list(images[1:]), resolution=float(dpi))
    return Path(path)


def _norm(s: str) -> str:
    return "\n".join(" ".join(l.split()) for l in s.strip().splitlines() if l.strip())


def cer(reference: str, hypothesis: str) -> float:
    """Character error rate over the lines (whitespace runs collapsed, line breaks kept)."""
    ref, hyp = _norm(reference), _norm(hypothesis)
    return edit_distance(ref, hyp) / max(1, len(ref))


def errors_and_chars(references: Sequence[str], hypotheses: Sequence[str]) -> Tuple[int, int]:
    """(wrong characters, characters) over pages, as `cer` counts them."""
    pairs = [(_norm(r), _norm(h)) for r, h in zip(references, hypotheses)]
    return sum(edit_distance(r, h) for r, h in pairs), sum(len(r) for r, _ in pairs)


def machine() -> dict:
    """Where a result was measured: CPU, cores, platform and the git commit of the code."""
    import os
    import platform
    import subprocess

    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((l.split(":", 1)[1].strip() for l in f if l.startswith("model name")), cpu)
    except OSError:
        pass
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                cwd=Path(__file__).resolve().parent, timeout=10).stdout.strip() or None
        dirty = bool(subprocess.run(["git", "status", "--porcelain", "--", "mlx_llava_next", "benchmarks"],
                                    capture_output=True, text=True, cwd=Path(__file__).resolve().parent,
                                    timeout=10).stdout.strip())
    except (OSError, subprocess.SubprocessError):
        commit, dirty = None, None
    return {"cpu": cpu, "cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version(),
            "commit": commit, "uncommitted_changes": dirty, "load_average": list(os.getloadavg())}


def single_line_cer(model, processor, reader, texts: Sequence[str], dpi: int, pt: float, counts: bool = False):
    """The model's CER on the same lines, each set alone at the same size on a strip of paper that goes
    through the same PDF writer and renderer as the pages (same JPEG), read as one image (`whole`).
    With `counts`: (CER, wrong characters, characters)."""
    import tempfile

    from mlx_llava_next.documents.engine import PageReader
    from mlx_llava_next.documents.sources import expand

    pr = PageReader(model, processor, reader, layout="whole")
    errors = chars = 0
    pad = round(0.5 * pt * dpi / 72)
    font = page_font(pt, dpi)
    with tempfile.TemporaryDirectory() as tmp:
        for n, text in enumerate(texts):
            for k, line in enumerate(text.splitlines()):
                _, _, right, bottom = font.getbbox(line)
                img = Image.new("L", (right + 2 * pad, bottom + 2 * pad), 255)
                ImageDraw.Draw(img).text((pad, pad), line, fill=0, font=font)
                pdf = save_pdf(Path(tmp) / f"line-{n}-{k}.pdf", [img.convert("RGB")], dpi)
                src = expand([pdf])[0]
                got, _, _ = pr.read(src.render(1, dpi))
                src.close()
                errors += edit_distance(" ".join(line.split()), " ".join(got.split()))
                chars += len(" ".join(line.split()))
    return (errors / max(1, chars), errors, chars) if counts else errors / max(1, chars)


def _as_one_image(model, processor, pdf, dpi, max_tokens=256) -> dict:
    """What `ocr` did before documents: each page to the model whole, through generate (no line cutting)."""
    from mlx_llava_next.commands.generate import OCR_PROMPTS
    from mlx_llava_next.documents.sources import expand
    from mlx_llava_next.generate import generate

    src = expand([pdf])[0]
    pages = []
    for p in src.pages:
        text = generate(model, processor, OCR_PROMPTS["default"], images=[src.render(p, dpi)], max_tokens=max_tokens).text
        pages.append({"page": p, "text": text, "bands": [None]})
    src.close()
    return {"pages": pages}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="demo")
    ap.add_argument("--pages", type=int, default=2, help="pages per document")
    ap.add_argument("--lines", type=int, default=20, help="text lines per page")
    ap.add_argument("--dpi", type=int, nargs="+", default=[150, 300])
    ap.add_argument("--pt", type=float, nargs="+", default=[10.0, 12.0])
    ap.add_argument("--layouts", nargs="+", default=["whole", "bands"],
                    help="whole, bands, auto, or image (each page through generate as one image)")
    ap.add_argument("--seed", type=int, default=1, help="seed of the page text")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args(argv)

    import tempfile

    from mlx_llava_next.commands.generate import line_reader, load_model, resolve_model_arg
    from mlx_llava_next.documents.engine import ocr_document

    model, processor = load_model(args.model)
    reader = line_reader(args.model)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for dpi in args.dpi:
            for pt in args.pt:
                images, texts = document(args.pages, args.lines, dpi, pt, seed=args.seed)
                pdf = save_pdf(Path(tmp) / f"letter-{dpi}-{pt}.pdf", images, dpi)
                # the same lines as the pages hold (every page), each alone
                line, line_errors, line_chars = single_line_cer(model, processor, reader, texts, dpi, pt, counts=True)
                for lay in args.layouts:
                    start = time.perf_counter()
                    if lay == "image":  # the page given to the model as one image, no line cutting
                        doc = _as_one_image(model, processor, pdf, dpi)
                    else:
                        doc = ocr_document(model, processor, pdf, layout=lay, dpi=dpi, reader=reader,
                                           model_path=resolve_model_arg(args.model))
                    secs = (time.perf_counter() - start) / len(doc["pages"])
                    wrong, chars = errors_and_chars(texts, [p["text"] for p in doc["pages"]])
                    page_cer = wrong / max(1, chars)  # over all pages' characters, as the single lines are counted
                    row = dict(dpi=dpi, pt=pt, layout=lay, cer=round(page_cer, 4), line_cer=round(line, 4),
                               errors=wrong, chars=chars, line_errors=line_errors, line_chars=line_chars,
                               seconds_per_page=round(secs, 2), calls_per_page=float(np.mean([len(p["bands"]) for p in doc["pages"]])))
                    rows.append(row)
                    print(json.dumps(row), flush=True)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        settings = {"pages": args.pages, "lines": args.lines, "seed": args.seed, "layouts": args.layouts}
        args.json.write_text(json.dumps({"model": args.model, "settings": settings, "machine": machine(),
                                         "rows": rows}, indent=2) + "\n")
    print("\n| dpi | pt | layout | page CER | single-line CER | s/page |\n|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['dpi']} | {r['pt']:g} | {r['layout']} | {r['cer']:.1%} | {r['line_cer']:.1%} | {r['seconds_per_page']:.1f} |")


if __name__ == "__main__":
    main()
