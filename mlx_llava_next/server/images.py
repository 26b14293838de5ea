"""Image URLs of a request -> decoded images: data: URIs, http(s) (timeout, size cap), file:// under --media-dir."""

import base64
import binascii
import os
import time
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass
from typing import Optional

from ..errors import ImageError
from ..image_processing import load_image
from .schema import ApiError, bad


@dataclass(frozen=True)
class ImagePolicy:
    """Where images may come from, and how big they may be."""

    media_dir: Optional[str] = None  # file:// URLs only below this directory (None: refused)
    max_bytes: int = 20 * 1024 * 1024  # encoded size of one image
    timeout: float = 10.0  # seconds for a whole http(s) fetch
    allow_remote: bool = True  # http(s) URLs


def _data_uri(url: str, param: str, policy: ImagePolicy) -> bytes:
    header, sep, payload = url[5:].partition(",")
    if not sep or not header.endswith(";base64"):
        raise bad("data: image URLs must be base64 encoded (data:image/png;base64,...)", param=param, code="invalid_image")
    if len(payload) * 3 // 4 > policy.max_bytes:
        raise bad(f"image larger than the {policy.max_bytes} byte limit", param=param, code="image_too_large")
    try:
        return base64.b64decode(payload.strip(), validate=True)
    except (binascii.Error, ValueError) as e:
        raise bad(f"the data: image URL is not valid base64 ({e})", param=param, code="invalid_image") from None


def _http(url: str, param: str, policy: ImagePolicy) -> bytes:
    if not policy.allow_remote:
        raise bad("http(s) image URLs are disabled on this server (--no-fetch)", param=param, code="image_url_refused")
    deadline = time.monotonic() + policy.timeout
    try:
        with urllib.request.urlopen(urllib.request.Request(url, headers={"User-Agent": "mlx-llava-next"}),
                                    timeout=policy.timeout) as response:
            declared = response.headers.get("Content-Length")
            if declared and declared.isdigit() and int(declared) > policy.max_bytes:
                raise bad(f"{url}: image larger than the {policy.max_bytes} byte limit", param=param, code="image_too_large")
            chunks, size = [], 0
            while True:
                if time.monotonic() > deadline:
                    raise TimeoutError(f"timed out after {policy.timeout:g} s")
                chunk = response.read(65536)
                if not chunk:
                    return b"".join(chunks)
                size += len(chunk)
                if size > policy.max_bytes:
                    raise bad(f"{url}: image larger than the {policy.max_bytes} byte limit", param=param, code="image_too_large")
                chunks.append(chunk)
    except ApiError:
        raise
    except urllib.error.HTTPError as e:
        raise bad(f"{url}: fetching the image failed: HTTP {e.code} {e.reason}", param=param, code="image_fetch_failed") from None
    except (urllib.error.URLError, OSError, ValueError) as e:
        reason = getattr(e, "reason", None) or e
        raise bad(f"{url}: fetching the image failed: {reason}", param=param, code="image_fetch_failed") from None


def _file(url: str, param: str, policy: ImagePolicy) -> bytes:
    if policy.media_dir is None:
        raise bad("file:// image URLs are refused: the server was started without --media-dir", param=param,
                  code="image_url_refused")
    parsed = urllib.parse.urlparse(url)
    if parsed.netloc not in ("", "localhost"):
        raise bad(f"{url}: file:// URLs must name a local path", param=param, code="image_url_refused")
    root = os.path.realpath(policy.media_dir)
    path = os.path.realpath(urllib.request.url2pathname(parsed.path))  # symlinks resolved before the check
    if os.path.commonpath([root, path]) != root:
        raise bad(f"{url}: outside the media directory; file:// URLs are only served from --media-dir", param=param,
                  code="image_url_refused")
    if not os.path.isfile(path):
        raise bad(f"{url}: no such file in the media directory", param=param, code="invalid_image")
    if os.path.getsize(path) > policy.max_bytes:
        raise bad(f"{url}: image larger than the {policy.max_bytes} byte limit", param=param, code="image_too_large")
    with open(path, "rb") as f:
        return f.read()


def fetch_image(url: str, param: str, policy: ImagePolicy):
    """A decoded RGB PIL image, or an ApiError (400) naming the URL's place in the request."""
    scheme = url.split(":", 1)[0].lower() if ":" in url else ""
    if scheme == "data":
        data = _data_uri(url, param, policy)
    elif scheme in ("http", "https"):
        data = _http(url, param, policy)
    elif scheme == "file":
        data = _file(url, param, policy)
    else:
        raise bad(f"unsupported image URL scheme {scheme or url[:20]!r} (data:, http(s):// or file://)", param=param,
                  code="invalid_image")
    try:
        return load_image(data)  # Pillow's decompression-bomb limit applies here
    except ImageError as e:
        raise bad(f"{param}: {e}", param=param, code="invalid_image") from None
