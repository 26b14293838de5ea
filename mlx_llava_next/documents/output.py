"""Document OCR outputs: txt (pages separated by form feeds, as pdftotext), md, json and jsonl, named beside the input or in --out."""

import json
from pathlib import Path
from typing import Optional

FORMATS = ("txt", "md", "json", "jsonl")
FORM_FEED = "\f"


def target(source: Path, out: Optional[Path], fmt: str, folder: Path = Path()) -> Path:
    """Where the output of `source` goes: beside it as <name>.<fmt>, or in <out>/<folder>/ where `folder` is
    where the source lies below the folder argument it was found in (--recursive keeps the tree)."""
    return (out / folder if out is not None else source.parent) / f"{source.stem}.{fmt}"


def _page_text(text: str) -> str:
    text = text.strip("\n")
    return text + "\n" if text else ""


def render(document: dict, fmt: str) -> str:
    """The text of an output file for `document` (engine.ocr_document's result)."""
    pages = document["pages"]
    if fmt == "txt":
        return FORM_FEED.join(_page_text(p["text"]) for p in pages)
    if fmt == "md":
        if len(pages) == 1 and document.get("page_count", 1) == 1:
            return _page_text(pages[0]["text"])
        parts = [f"<!-- page {p['page']} -->\n\n{_page_text(p['text'])}" for p in pages]
        return "\n".join(parts)
    if fmt == "json":
        return json.dumps(public(document), indent=2, ensure_ascii=False) + "\n"
    if fmt == "jsonl":
        rows = ({"source": document["source"], **p} for p in document["pages"])
        return "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)
    raise ValueError(f"unknown format {fmt!r}")


def public(document: dict) -> dict:
    """The JSON document: {"source", "model", "settings", "pages": [{"page", "text", "bands", "seconds"}]}."""
    return {k: document[k] for k in ("source", "model", "settings", "pages")}
