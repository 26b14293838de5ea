"""Anyres geometry: the one place that decides grids, resize targets and unpadding.

The processor uses it to count `<image>` tokens and to cut tiles; the model uses it to
pack features. Both sides calling the same functions is what keeps counts in agreement.
All sizes are (height, width), as transformers reads pinpoints and image_sizes.
"""

import math
from typing import Sequence, Tuple

Size = Tuple[int, int]


def select_best_resolution(image_size: Size, pinpoints: Sequence[Sequence[int]]) -> Size:
    """The pinpoint that keeps the most original pixels, then wastes the fewest.

    Ties keep the earlier entry (so small images get the first of two symmetric grids).
    """
    height, width = image_size
    best, best_effective, best_wasted = None, 0, float("inf")
    for th, tw in pinpoints:
        scale = min(tw / width, th / height)
        down_w, down_h = int(width * scale), int(height * scale)
        effective = min(down_w * down_h, width * height)
        wasted = th * tw - effective
        if effective > best_effective or (effective == best_effective and wasted < best_wasted):
            best, best_effective, best_wasted = (th, tw), effective, wasted
    return best


def grid_shape(image_size: Size, pinpoints, tile_size: int) -> Size:
    """(rows, cols) of tiles for an image of (H, W)."""
    th, tw = select_best_resolution(image_size, pinpoints)
    return th // tile_size, tw // tile_size


def num_patches(image_size: Size, pinpoints, tile_size: int) -> int:
    """Tiles the processor emits for one image: the base view plus the grid."""
    th, tw = select_best_resolution(image_size, pinpoints)
    return math.ceil(th / tile_size) * math.ceil(tw / tile_size) + 1


def resized_size(image_size: Size, target: Size) -> Size:
    """Aspect-preserving size that fits `target`; the float ceil matches transformers (449 not 448)."""
    height, width = image_size
    th, tw = target
    scale_w, scale_h = tw / width, th / height
    if scale_w < scale_h:
        return min(math.ceil(height * scale_w), th), tw
    return th, min(math.ceil(width * scale_h), tw)


def unpadded_shape(image_size: Size, feature_size: Size) -> Size:
    """Rows and columns of a (rows*p, cols*p) feature map left after removing the padding.

    transformers rounds to 7 decimals before truncating (the original LLaVA does not).
    """
    height, width = image_size
    cur_h, cur_w = feature_size
    if width / height > cur_w / cur_h:
        new_h = int(round(height * (cur_w / width), 7))
        pad = (cur_h - new_h) // 2
        return cur_h - 2 * pad, cur_w
    new_w = int(round(width * (cur_h / height), 7))
    pad = (cur_w - new_w) // 2
    return cur_h, cur_w - 2 * pad


def unpad_offsets(image_size: Size, feature_size: Size) -> Tuple[int, int]:
    """(top, left) rows/columns removed on each side by unpadding."""
    cur_h, cur_w = feature_size
    kept_h, kept_w = unpadded_shape(image_size, feature_size)
    return (cur_h - kept_h) // 2, (cur_w - kept_w) // 2


def num_image_tokens(
    image_size: Size,
    pinpoints,
    tile_size: int,
    patch_size: int,
    strategy: str = "default",
    num_additional_tokens: int = 1,
) -> int:
    """`<image>` tokens one image expands to: base view + unpadded grid with a newline per row."""
    side = tile_size // patch_size
    rows, cols = grid_shape(image_size, pinpoints, tile_size)
    kept_h, kept_w = unpadded_shape(image_size, (rows * side, cols * side))
    base = side * side + num_additional_tokens
    if strategy == "default":
        base -= 1
    return base + kept_h * (kept_w + 1)
