"""Character error rate and exact-match rate of a model on held-out images of the contract, through `cli.py ocr`'s code path."""

import argparse
import json
import time
from collections import defaultdict

import numpy as np

from mlx_llava_next.text_metrics import edit_distance

from . import data

FONTS = ("mono", "sans", "serif", "pillow")
SIZE_BUCKETS = ((16, 22), (23, 29), (30, 36))


def heldout_set(n: int, seed: int, fonts=FONTS, text_px=(16, 36)):
    """n images: half single lines, half blocks of 2-6 lines, fonts in turn (seed != training's)."""
    rng = np.random.default_rng([seed, 777])
    out = []
    for i in range(n):
        kind = "line" if i % 2 == 0 else "block"
        font = fonts[(i // 2) % len(fonts)]
        img, text, px = data.heldout_sample(rng, kind, font, text_px)
        out.append(dict(kind=kind, font=font, px=px, image=img, text=text))
    return out


def transcriber(model_name: str, path: str = "ocr"):
    """image -> text the way `cli.py ocr` reads an image file: its model loading, line-reader
    detection and page reader (mlx_llava_next.documents: layout `auto`, line reading when the model
    says so)."""
    from mlx_llava_next.commands.generate import line_reader, load_model
    from mlx_llava_next.documents.engine import PageReader

    m, processor = load_model(model_name)
    if path == "chat":  # what `chat`/`generate` do with a line reader's image: lines.read_block
        from mlx_llava_next.commands.generate import read_lines

        settings = line_reader(model_name)
        return lambda img: read_lines(m, processor, settings, [img]).strip()
    reader = PageReader(m, processor, line_reader(model_name))
    return lambda img: reader.read(img)[0].strip()


def bucket(px: int) -> str:
    return next(f"{a}-{b}px" for a, b in SIZE_BUCKETS if a <= px <= b)


def summarize(rows) -> dict:
    def agg(sel):
        errors = sum(r["errors"] for r in sel)
        chars = sum(len(r["text"]) for r in sel)
        return {"n": len(sel), "cer": round(errors / max(1, chars), 4),
                "exact": round(sum(r["got"] == r["text"] for r in sel) / max(1, len(sel)), 4)}

    out = {"all": agg(rows)}
    groups = defaultdict(list)
    for r in rows:
        groups[r["kind"]].append(r)
        groups[f"{r['kind']}/{r['font']}"].append(r)
        groups[f"{r['kind']}/{r['font']}/{bucket(r['px'])}"].append(r)
    out.update({k: agg(v) for k, v in sorted(groups.items())})
    return out


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--model", default="demo")
    p.add_argument("-n", type=int, default=200)
    p.add_argument("--seed", type=int, default=12345)
    p.add_argument("--fonts", default=",".join(FONTS))
    p.add_argument("--path", default="ocr", choices=["ocr", "chat"],
                   help="ocr: cli.py ocr's page reader; chat: what chat/generate do (lines.read_block)")
    p.add_argument("--out", help="write the summary (and every transcription) here as JSON")
    args = p.parse_args(argv)
    read = transcriber(args.model, args.path)
    rows, started = [], time.time()
    for s in heldout_set(args.n, args.seed, tuple(args.fonts.split(","))):
        got = read(s["image"])
        rows.append(dict(kind=s["kind"], font=s["font"], px=s["px"], text=s["text"], got=got,
                         errors=edit_distance(got, s["text"])))
    summary = summarize(rows)
    summary["seconds"] = round(time.time() - started, 1)
    for k, v in summary.items():
        print(f"{k:28s} {v}")
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"model": args.model, "seed": args.seed, "summary": summary, "rows": rows}, f, indent=1)
    return summary


if __name__ == "__main__":
    main()
