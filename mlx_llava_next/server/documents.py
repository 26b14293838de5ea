"""`POST /v1/ocr`: a JSON body with a PDF or image (base64) and `cli.py ocr`'s options -> a validated `OcrRequest`."""

import base64
import binascii
import io
import math
import warnings
from dataclasses import dataclass
from typing import Any, Dict, Optional

from .schema import ApiError, bad

FORMATS = ("txt", "md", "json", "jsonl")  # documents.output.FORMATS
LAYOUTS = ("auto", "whole", "bands")  # documents.layout.LAYOUTS
CONTENT_TYPES = {"txt": "text/plain; charset=utf-8", "md": "text/markdown; charset=utf-8",
                 "json": "application/json", "jsonl": "application/x-ndjson"}
DEFAULT_MAX_TOKENS = 1024  # cli.py ocr's default
FIELDS = {"file", "filename", "pages", "layout", "dpi", "format", "prompt", "max_tokens", "model"}


@dataclass
class OcrRequest:
    data: bytes  # the uploaded file
    kind: str  # "pdf" or "image" (from its first bytes, not its name)
    filename: str  # names the source in the result; never opened
    pages: Optional[str] = None
    layout: str = "auto"
    dpi: Optional[int] = None
    fmt: str = "json"
    prompt: Optional[str] = None
    max_tokens: int = DEFAULT_MAX_TOKENS

    @property
    def content_type(self) -> str:
        return CONTENT_TYPES[self.fmt]


def _decode_file(value: Any) -> bytes:
    if not isinstance(value, str) or not value:
        raise bad("`file` must be the document as a base64 string or a data: URI "
                  "(data:application/pdf;base64,... or data:image/png;base64,...)", param="file")
    if value.startswith("data:"):
        header, sep, value = value[5:].partition(",")
        if not sep or not header.endswith(";base64"):
            raise bad("`file`: data: URIs must be base64 encoded (data:application/pdf;base64,...)", param="file",
                      code="invalid_document")
    try:
        data = base64.b64decode(value.strip(), validate=True)
    except (binascii.Error, ValueError) as e:
        raise bad(f"`file` is not valid base64 ({e})", param="file", code="invalid_document") from None
    if not data:
        raise bad("`file` is empty (0 bytes)", param="file", code="invalid_document")
    return data


def _kind(data: bytes) -> str:
    """"pdf" or "image" from the file's first bytes; 415 for anything else (a 400 for a decompression bomb)."""
    if data[:1024].lstrip().startswith(b"%PDF-"):
        return "pdf"
    from PIL import Image, UnidentifiedImageError

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # the engine's image loader decides
            with Image.open(io.BytesIO(data)):
                return "image"
    except Image.DecompressionBombError as e:
        raise bad(f"`file`: {e}", param="file", code="invalid_document") from None
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError):
        raise ApiError(415, "`file` is neither a PDF (no %PDF- header) nor an image Pillow reads "
                       "(PNG, JPEG, WebP, TIFF, ...)", param="file", code="unsupported_media_type") from None


def _choice(body, name, choices, default):
    value = body.get(name, default)
    if value is None:
        return default
    if value not in choices:
        raise bad(f"`{name}` must be one of {', '.join(choices)}, got {value!r}", param=name)
    return value


def _int(body, name, lo, hi):
    value = body.get(name)
    if value is None:
        return None
    if isinstance(value, float) and math.isfinite(value) and value.is_integer():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int):
        raise bad(f"`{name}` must be an integer, got {value!r}", param=name)
    if not lo <= value <= hi:
        raise bad(f"`{name}` must be between {lo} and {hi}, got {value!r}", param=name)
    return value


def parse_ocr_request(body: Dict[str, Any]) -> OcrRequest:
    """Validate an OCR body; every refusal names the field. Unknown fields are a 400 (a typo'd option
    must not be silently ignored)."""
    from ..documents.sources import DocumentError, parse_pages

    unknown = sorted(set(body) - FIELDS)
    if unknown:
        raise bad(f"unknown field `{unknown[0]}` (fields: {', '.join(sorted(FIELDS))})", param=unknown[0],
                  code="unsupported_parameter")
    if "file" not in body:
        raise bad("`file` is required: the PDF or image as base64 or a data: URI", param="file")
    data = _decode_file(body["file"])
    pages = body.get("pages")
    if isinstance(pages, int) and not isinstance(pages, bool):
        pages = str(pages)
    if pages is not None:
        if not isinstance(pages, str):
            raise bad("`pages` must be a string like \"1-3,7\" or a page number", param="pages")
        try:
            parse_pages(pages)
        except DocumentError as e:
            raise bad(str(e).replace("--pages", "`pages`", 1), param="pages") from None
    filename = body.get("filename")
    if filename is not None and (not isinstance(filename, str) or not filename or len(filename) > 1024):
        raise bad("`filename` must be a non-empty string (at most 1024 characters)", param="filename")
    prompt = body.get("prompt")
    if prompt is not None and not isinstance(prompt, str):
        raise bad("`prompt` must be a string", param="prompt")
    kind = _kind(data)
    return OcrRequest(
        data=data,
        kind=kind,
        filename=filename or ("upload.pdf" if kind == "pdf" else "upload"),
        pages=pages or None,
        layout=_choice(body, "layout", LAYOUTS, "auto"),
        dpi=_int(body, "dpi", 36, 1200),
        fmt=_choice(body, "format", FORMATS, "json"),
        prompt=prompt,
        max_tokens=_int(body, "max_tokens", 1, 1 << 20) or DEFAULT_MAX_TOKENS,
    )
