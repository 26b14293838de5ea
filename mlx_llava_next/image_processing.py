"""LLaVA-NeXT image preprocessing with numpy and Pillow only.

Bit-exact with transformers 5.24's `LlavaNextImageProcessorPil`: same RGB conversion, same Pillow resizes in
the same order, rescale in float64 then float32, normalise in float32. Geometry comes from `anyres`.
Arrays are handled channel-last (H, W, C) here; the output is channel-first like transformers'.
"""

import io
import json
import math
import os
import warnings
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Dict, List, Sequence, Tuple

import numpy as np
from PIL import Image, ImageOps

from . import anyres
from .errors import CheckpointError, ImageError

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
DEFAULT_PINPOINTS = [[336, 672], [672, 336], [672, 672], [1008, 336], [336, 1008]]
MAX_SIDE = 4096  # the largest size / crop_size a processor config may ask for
MAX_PINPOINT_SIDE, MAX_PINPOINT_PIXELS = 8192, 4096 * 4096  # bounds the anyres canvas


# ---------------------------------------------------------------------------------------------------------------
# Decoding and RGB conversion


def _open_checked(source) -> Tuple[Image.Image, str]:
    """Open a path or bytes and fully decode it, turning every failure into an ImageError naming the source."""
    if isinstance(source, (bytes, bytearray)):
        name, data = "<bytes>", bytes(source)
        if not data:
            raise ImageError(f"{name}: no image data (0 bytes)")
        opener = lambda: Image.open(io.BytesIO(data))  # noqa: E731
    else:
        name = os.fspath(source)
        if name.startswith(("http://", "https://")):
            raise ImageError(f"{name}: URLs are not fetched; download the image and pass the file path")
        if not os.path.exists(name):
            raise ImageError(f"{name}: file not found")
        if not os.path.isfile(name):
            raise ImageError(f"{name}: not a file")
        if os.path.getsize(name) == 0:
            raise ImageError(f"{name}: file is empty (0 bytes)")
        opener = lambda: Image.open(name)  # noqa: E731
    try:
        with warnings.catch_warnings():
            # Pillow only warns between 1x and 2x the limit; treat that as the error it warns about.
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = opener()
            _check_pixel_limit(image.size, name)
            image.load()  # decode now: truncated files fail here, not later inside a resize
    except ImageError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise ImageError(f"{name}: image too large: {e} (limit: PIL.Image.MAX_IMAGE_PIXELS)") from e
    except Image.UnidentifiedImageError as e:
        raise ImageError(f"{name}: not a recognised image file") from e
    except Exception as e:  # Pillow raises OSError, SyntaxError, ValueError, struct.error ... on corrupt data
        raise ImageError(f"{name}: cannot decode image ({type(e).__name__}: {e})") from e
    return image, name


def _check_pixel_limit(size: Tuple[int, int], name: str) -> None:
    limit = Image.MAX_IMAGE_PIXELS
    if limit is not None and size[0] * size[1] > limit:
        raise ImageError(f"{name}: image too large: {size[0]}x{size[1]} pixels exceeds the decompression-bomb "
                         f"limit of {limit} (PIL.Image.MAX_IMAGE_PIXELS)")


def load_image(source) -> Image.Image:
    """An RGB PIL image from a path, bytes, PIL image or uint8 array.

    Paths, bytes and PIL images follow `transformers.image_utils.load_image` (which the HF processor uses for
    path inputs): EXIF orientation applied, then `convert("RGB")`, which drops alpha rather than compositing.
    Arrays follow the processor's array conversion (alpha composited over white).
    """
    if isinstance(source, Image.Image):
        image, name = source, "image"
    elif isinstance(source, (str, os.PathLike, bytes, bytearray)):
        image, name = _open_checked(source)
        with image:  # closes the file (multi-frame images keep it open after load)
            return _exif_rgb(image, name)
    elif hasattr(source, "__array__"):
        return Image.fromarray(_array_to_rgb(np.asarray(source), "image array"))
    else:
        raise ImageError(f"unsupported image source of type {type(source).__name__}")
    return _exif_rgb(image, name)


def _exif_rgb(image: Image.Image, name: str) -> Image.Image:
    try:
        return ImageOps.exif_transpose(image).convert("RGB")
    except Exception as e:  # truncated lazy images, modes Pillow cannot convert (e.g. "La")
        raise ImageError(f"{name}: cannot read mode {image.mode!r} image as RGB ({type(e).__name__}: {e})") from e


def _pil_to_rgb(image: Image.Image, name: str) -> np.ndarray:
    """transformers 5.x: any alpha band or palette/colour-key transparency is composited over opaque white."""
    try:
        if "A" in image.getbands() or image.info.get("transparency") is not None:
            rgba = image.convert("RGBA")
            white = Image.new("RGBA", image.size, (255, 255, 255, 255))
            image = Image.alpha_composite(white, rgba)
        return np.asarray(image.convert("RGB"))  # I;16 clips at 255 here, as in transformers
    except Exception as e:
        raise ImageError(f"{name}: cannot convert mode {image.mode!r} to RGB ({type(e).__name__}: {e})") from e


def _array_to_hwc(array: np.ndarray, name: str) -> np.ndarray:
    """(H, W, C) uint8 view of a 3-D array whose channel axis (1, 3 or 4) is first or last; first wins ties."""
    if array.ndim != 3:
        raise ImageError(
            f"{name}: expected a 3-D image array (H, W, C) or (C, H, W), got shape {array.shape}"
            + ("; add a channel axis to grayscale arrays" if array.ndim == 2 else "")
        )
    if array.shape[0] in (1, 3, 4):
        array = np.moveaxis(array, 0, -1)
    elif array.shape[2] not in (1, 3, 4):
        raise ImageError(f"{name}: cannot find a channel axis of size 1, 3 or 4 in shape {array.shape}")
    _check_pixel_limit((array.shape[1], array.shape[0]), name)  # before any copy (broadcast views, memmaps)
    if array.dtype != np.uint8:
        # Float input would be rescaled twice by transformers; only accept integers that fit uint8.
        if array.dtype.kind not in "ui" or array.size and (array.min() < 0 or array.max() > 255):
            raise ImageError(f"{name}: expected uint8 pixel values (0-255), got dtype {array.dtype}")
        array = array.astype(np.uint8)
    return array


def _array_to_rgb(array: np.ndarray, name: str) -> np.ndarray:
    hwc = _array_to_hwc(array, name)
    if hwc.shape[2] == 1:
        return np.repeat(hwc, 3, axis=-1)
    if hwc.shape[2] == 4:  # same float64 expression as transformers' convert_to_rgb
        alpha = hwc[..., 3:4] / 255
        return np.round(alpha * hwc[..., :3] + (1 - alpha) * 255).astype(np.uint8)
    return hwc


def _flatten(images, out: list) -> list:
    """Flatten nested lists in order; a 4-D array is a batch of 3-D images."""
    if isinstance(images, (list, tuple)):
        for item in images:
            _flatten(item, out)
    elif isinstance(images, np.ndarray) and images.ndim == 4:
        out.extend(images)
    else:
        out.append(images)
    return out


# ---------------------------------------------------------------------------------------------------------------
# Pixel operations on (H, W, C) uint8 arrays


def _resize(image, size: Tuple[int, int], resample: int) -> np.ndarray:
    """Pillow resize to (height, width); the same size is an exact copy in Pillow, so it is skipped."""
    if isinstance(image, np.ndarray):
        if image.shape[:2] == tuple(size):
            return image
        image = Image.fromarray(np.ascontiguousarray(image))
    return np.asarray(image.resize((size[1], size[0]), resample=resample))


def _pad_centered(array: np.ndarray, target: Tuple[int, int]) -> np.ndarray:
    """Zero-pad to target, centred; the odd pixel goes bottom/right."""
    top, left = (target[0] - array.shape[0]) // 2, (target[1] - array.shape[1]) // 2
    bottom, right = target[0] - array.shape[0] - top, target[1] - array.shape[1] - left
    return np.pad(array, ((top, bottom), (left, right), (0, 0)))


def _center_crop(array: np.ndarray, height: int, width: int) -> np.ndarray:
    """transformers' center_crop: crop, or zero-pad (extra pixel top/left) when the image is too small."""
    h, w = array.shape[:2]
    top, left = (h - height) // 2, (w - width) // 2
    if top >= 0 and left >= 0:
        return array[top : top + height, left : left + width]
    new_h, new_w = max(height, h), max(width, w)
    pad_top, pad_left = math.ceil((new_h - h) / 2), math.ceil((new_w - w) / 2)
    canvas = np.zeros((new_h, new_w, array.shape[2]), dtype=array.dtype)
    canvas[pad_top : pad_top + h, pad_left : pad_left + w] = array
    top, left = top + pad_top, left + pad_left
    return canvas[max(0, top) : min(new_h, top + height), max(0, left) : min(new_w, left + width)]


def _size_dict(value, square: bool) -> Dict[str, int]:
    """Normalise a size the way transformers' get_size_dict does (ints: square crop, shortest-edge size)."""
    if isinstance(value, int):
        return {"height": value, "width": value} if square else {"shortest_edge": value}
    if isinstance(value, (list, tuple)) and len(value) == 2:
        return {"height": int(value[0]), "width": int(value[1])}
    if isinstance(value, dict):
        value = {k: int(v) for k, v in value.items() if v is not None}
        if set(value) in ({"shortest_edge"}, {"height", "width"}):
            return value
    raise ValueError(f"unsupported image size {value!r}: expected an int, [h, w], {{'shortest_edge': n}} "
                     "or {'height': h, 'width': w}")


# ---------------------------------------------------------------------------------------------------------------
# The processor


@dataclass
class ImageProcessor:
    """Fields of a llava-hf `preprocessor_config.json`; defaults are the llava-hf (not the class) values.

    `do_pad` is kept for round-tripping configs only: `__call__` pads unless told not to.
    """

    image_grid_pinpoints: List[List[int]] = field(default_factory=lambda: [list(p) for p in DEFAULT_PINPOINTS])
    size: Dict[str, int] = field(default_factory=lambda: {"shortest_edge": 336})
    crop_size: Dict[str, int] = field(default_factory=lambda: {"height": 336, "width": 336})
    resample: int = 3  # PIL bicubic
    rescale_factor: float = 1 / 255
    image_mean: Sequence[float] = CLIP_MEAN
    image_std: Sequence[float] = CLIP_STD
    do_resize: bool = True
    do_center_crop: bool = True
    do_rescale: bool = True
    do_normalize: bool = True
    do_convert_rgb: bool = True
    do_pad: bool = True

    def __post_init__(self):
        self.image_grid_pinpoints = [[int(h), int(w)] for h, w in self.image_grid_pinpoints]
        self.size = _size_dict(self.size, square=False)
        self.crop_size = _size_dict(self.crop_size, square=True)
        if "height" not in self.crop_size:
            raise ValueError(f"crop_size needs height and width, got {self.crop_size}")
        self.resample = int(self.resample)
        self.image_mean = tuple(float(m) for m in np.broadcast_to(self.image_mean, (3,)))
        self.image_std = tuple(float(s) for s in np.broadcast_to(self.image_std, (3,)))
        self._check()

    def _check(self) -> None:
        """ValueError naming the first field out of bounds (sizes bounded before any allocation)."""
        sides = [("size", v) for v in self.size.values()] + [("crop_size", v) for v in self.crop_size.values()]
        for key, side in sides:
            if not 1 <= side <= MAX_SIDE:
                raise ValueError(f"{key} {side} is out of bounds (1 to {MAX_SIDE} pixels)")
        if not 1 <= len(self.image_grid_pinpoints) <= 256:
            raise ValueError(f"image_grid_pinpoints must hold 1 to 256 [height, width] pairs, got {len(self.image_grid_pinpoints)}")
        for h, w in self.image_grid_pinpoints:
            if not (1 <= h <= MAX_PINPOINT_SIDE and 1 <= w <= MAX_PINPOINT_SIDE and h * w <= MAX_PINPOINT_PIXELS):
                raise ValueError(f"image_grid_pinpoints entry {h}x{w} is out of bounds (sides 1 to {MAX_PINPOINT_SIDE}, "
                                 f"at most {MAX_PINPOINT_PIXELS} pixels)")
        if self.resample not in range(6):
            raise ValueError(f"resample must be a PIL filter 0-5, got {self.resample}")
        values = list(self.image_mean) + list(self.image_std) + [self.rescale_factor]
        if not all(isinstance(v, (int, float)) and not isinstance(v, bool) and np.isfinite(v) for v in values) or 0 in self.image_std:
            raise ValueError(f"image_mean, image_std and rescale_factor must be finite numbers (std non-zero), got "
                             f"{self.image_mean}, {self.image_std}, {self.rescale_factor!r}")
        for key in ("do_resize", "do_center_crop", "do_rescale", "do_normalize", "do_convert_rgb", "do_pad"):
            if not isinstance(getattr(self, key), (bool, int)):
                raise ValueError(f"{key} must be true or false, got {getattr(self, key)!r}")

    @classmethod
    def from_dict(cls, config: dict) -> "ImageProcessor":
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in config.items() if k in names and v is not None})

    @classmethod
    def from_pretrained(cls, path) -> "ImageProcessor":
        """From a checkpoint folder or a JSON file. As in transformers 5, the `image_processor` dict nested in
        `processor_config.json` (what 5.x `save_pretrained` writes) wins over `preprocessor_config.json`."""
        path = Path(path)
        if path.is_file():
            file, config = path, _read_json(path)
            config = config.get("image_processor", config)
        else:
            file, config = path / "processor_config.json", None
            if file.is_file():
                config = _read_json(file).get("image_processor")
            if not isinstance(config, dict):
                file = path / "preprocessor_config.json"
                if not file.is_file():
                    raise CheckpointError(f"{path}: no preprocessor_config.json and no image_processor entry "
                                          "in processor_config.json")
                config = _read_json(file)
        try:
            return cls.from_dict(config)
        except (TypeError, ValueError, OverflowError, KeyError, AttributeError) as e:
            raise CheckpointError(f"{file}: invalid image processor config ({e})") from e

    @property
    def tile_size(self) -> int:
        """Side of the square tiles cut from the canvas (crop_size height, as transformers uses)."""
        return self.crop_size["height"]

    @property
    def base_size(self) -> Tuple[int, int]:
        """(height, width) the whole image is squashed to for the base view."""
        if "height" in self.size:
            return self.size["height"], self.size["width"]
        return self.size["shortest_edge"], self.size["shortest_edge"]

    def num_patches(self, image_size) -> int:
        return anyres.num_patches(tuple(image_size), self.image_grid_pinpoints, self.tile_size)

    def num_image_tokens(self, image_size, patch_size: int = 14, strategy: str = "default",
                         num_additional: int = 1) -> int:
        return anyres.num_image_tokens(tuple(image_size), self.image_grid_pinpoints, self.tile_size,
                                       patch_size, strategy, num_additional)

    def __call__(self, images, do_pad: bool = True):
        """{"pixel_values": float32 [B, max_N, 3, P, P] (a list of [N_i, 3, P, P] when do_pad=False),
        "image_sizes": int64 [B, 2] as (H, W)}. `do_pad` defaults to True whatever the config says, as
        LlavaNextProcessor forces it; the model needs the stacked form."""
        items = _flatten(images, [])
        if not items:
            raise ImageError("no images given")
        rgbs = [self._to_rgb(item, i) for i, item in enumerate(items)]
        for i, rgb in enumerate(rgbs):
            if 0 in rgb.shape[:2]:
                raise ImageError(f"image {i}: empty image of shape {rgb.shape[:2]}")
        pixel_values = [self._process(rgb) for rgb in rgbs]
        image_sizes = np.array([rgb.shape[:2] for rgb in rgbs], dtype=np.int64)
        if do_pad:
            pixel_values = _pad_patches(pixel_values)
        return {"pixel_values": pixel_values, "image_sizes": image_sizes}

    def _to_rgb(self, item, index: int) -> np.ndarray:
        """(H, W, 3) uint8 for one input, as transformers' process_image converts it."""
        if isinstance(item, (str, os.PathLike, bytes, bytearray)):
            item = load_image(item)  # transformers loads path inputs with load_image (alpha dropped)
        if isinstance(item, Image.Image):
            name = getattr(item, "filename", "") or f"image {index}"
            if self.do_convert_rgb:
                return _pil_to_rgb(item, name)
            if item.mode != "RGB":
                raise ImageError(f"{name}: mode {item.mode!r} needs do_convert_rgb=True")
            return np.asarray(item)
        if hasattr(item, "__array__"):
            array = np.asarray(item)
            if self.do_convert_rgb:
                return _array_to_rgb(array, f"image {index}")
            hwc = _array_to_hwc(array, f"image {index}")
            if hwc.shape[2] != 3:
                raise ImageError(f"image {index}: {hwc.shape[2]} channels need do_convert_rgb=True")
            return hwc
        raise ImageError(f"image {index}: unsupported image type {type(item).__name__}")

    def _process(self, rgb: np.ndarray) -> np.ndarray:
        """[N, 3, P, P] float32: the squashed base view, then the canvas tiles row-major."""
        size = rgb.shape[:2]
        image = Image.fromarray(rgb)
        target = anyres.select_best_resolution(size, self.image_grid_pinpoints)
        canvas = _pad_centered(_resize(image, anyres.resized_size(size, target), self.resample), target)
        p = self.tile_size
        tiles = [canvas[i : i + p, j : j + p] for i in range(0, target[0], p) for j in range(0, target[1], p)]
        base = _resize(image, self.base_size, self.resample)
        return np.stack([self._finish_view(view) for view in [base] + tiles])

    def _finish_view(self, view: np.ndarray) -> np.ndarray:
        """Per-view resize, centre crop, rescale and normalise (no-ops for 336-tiles except the last two)."""
        if self.do_resize:
            view = _resize(view, self._view_size(view.shape[:2]), self.resample)
        if self.do_center_crop:
            view = _center_crop(view, self.crop_size["height"], self.crop_size["width"])
        pixels = view.transpose(2, 0, 1)
        if self.do_rescale:  # float64 product, then float32, exactly as transformers' rescale
            pixels = (pixels.astype(np.float64) * self.rescale_factor).astype(np.float32)
        if self.do_normalize:
            pixels = pixels.astype(np.float32)
            mean = np.array(self.image_mean, dtype=np.float32)[:, None, None]
            std = np.array(self.image_std, dtype=np.float32)[:, None, None]
            pixels = (pixels - mean) / std
        return pixels.astype(np.float32, copy=False)

    def _view_size(self, size: Tuple[int, int]) -> Tuple[int, int]:
        """Output (height, width) of the per-view resize (transformers' get_resize_output_image_size)."""
        if "height" in self.size:
            return self.size["height"], self.size["width"]
        height, width = size
        short, long = (width, height) if width <= height else (height, width)
        new_short, new_long = self.size["shortest_edge"], int(self.size["shortest_edge"] * long / short)
        return (new_long, new_short) if width <= height else (new_short, new_long)


def _read_json(file: Path) -> dict:
    from .checks import read_json_object

    return read_json_object(file, "the image processor config")


def _pad_patches(pixel_values: List[np.ndarray]) -> np.ndarray:
    """Stack images, appending all-zero patches so each has the batch's largest patch count."""
    max_n = max(len(p) for p in pixel_values)
    out = np.zeros((len(pixel_values), max_n) + pixel_values[0].shape[1:], dtype=np.float32)
    for i, patches in enumerate(pixel_values):
        out[i, : len(patches)] = patches
    return out
