"""LLaVA-NeXT image input (OmniConfig.image_resize "anyres"): a grid of tiles at the best of a few resolutions,
the whole image as one more tile, and how many `<image>` tokens that makes.

The same sizes, order and values as transformers' LlavaNextImageProcessor (PIL backend) and LlavaNextProcessor,
so imported checkpoints see the pixels and tokens they were trained with:

1. the best resolution: of `image_grid_pinpoints` ((height, width) pairs, multiples of the tile side), the
   one that keeps most of the image's pixels once it is scaled to fit inside, and of those the one that
   wastes least (`best_resolution`);
2. the image is resized bicubically to fit inside it, keeping its aspect ratio (the side that fits exactly
   is that side, the other rounded up), and centred on a black canvas of that resolution;
3. the canvas is cut into tiles, row by row; the whole image, resized to a square (the processor's `size`),
   goes first;
4. each of those tiles is resized and centre-cropped as CLIP's processor does (a no-op on tiles already at
   the tile size), then /255 and (x - mean) / std.

The model then sees every tile's patch features, the whole image's as they are and the grid's laid out
as one large feature map, with the rows and columns that are only padding cut off again (`feature_window`,
transformers' `unpad_image`) and `image_newline` after each row. The prompt holds one `<image>` per
feature: the whole image's tile, plus rows × (columns + 1) for the window (`token_count`).

Each image's layout travels beside its pixels, not in them: `Prompt.image_layouts` holds one `Layout` per
image (its grid and the feature window), the way `Prompt.qformer_input_ids` holds InstructBLIP's instruction,
and generation, serving and training pass it on to `OmniModel.forward(..., image_layouts=...)`. Pixel values
are [tiles, 3, S, S], exactly LlavaNextImageProcessor's, so nothing that reads, casts or joins them (bf16,
batching, hashing) can corrupt a layout.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from PIL import Image

from tinyomni.errors import InputError
from tinyomni.processing.image import (
    DEFAULT_MAX_PIXELS,
    ImageSource,
    centre_crop,
    image_to_tensor,
    load_image,
    resize_shortest_edge,
)

BICUBIC = Image.Resampling.BICUBIC


@dataclass(frozen=True)
class Layout:
    """One image's tile grid (rows × cols tiles, after the whole image's) and the feature window the model keeps
    of that grid's rows·side × cols·side feature map: [top, bottom) × [left, right)."""

    rows: int
    cols: int
    top: int
    bottom: int
    left: int
    right: int

    @property
    def tiles(self) -> int:
        return 1 + self.rows * self.cols  # the whole image, then the grid


# --- geometry ------------------------------------------------------------------------------------------
def best_resolution(height: int, width: int, pinpoints: Sequence[Sequence[int]]) -> tuple[int, int]:
    """Step 1: the (height, width) of `pinpoints` that keeps most of the image, then wastes least; the first
    such one on a tie (transformers' `select_best_resolution`, with its int truncations)."""
    best, most_kept, least_wasted = None, 0, float("inf")
    for h, w in pinpoints:
        scale = min(w / width, h / height)
        kept = min(int(width * scale) * int(height * scale), width * height)
        wasted = w * h - kept
        if kept > most_kept or (kept == most_kept and wasted < least_wasted):
            best, most_kept, least_wasted = (h, w), kept, wasted
    if best is None:
        raise InputError(f"no grid resolution fits a {width}x{height} image (image_grid_pinpoints {list(pinpoints)})")
    return best


def fitted_size(height: int, width: int, target_height: int, target_width: int) -> tuple[int, int]:
    """Step 2's (height, width): scaled to fit the target, the other side rounded up (at most the target)."""
    scale_w, scale_h = target_width / width, target_height / height
    if scale_w < scale_h:
        return min(math.ceil(height * scale_w), target_height), target_width
    return target_height, min(math.ceil(width * scale_h), target_width)


def feature_window(height: int, width: int, rows: int, cols: int) -> tuple[int, int, int, int]:
    """(top, bottom, left, right) of the rows × cols feature map that is the image, not the padding of step 2,
    exactly as transformers' `unpad_image` (and LlavaNextProcessor's count) round it."""
    if width / height > cols / rows:  # wider than the grid: padding above and below
        kept = int(round(height * (cols / width), 7))
        pad = (rows - kept) // 2
        return pad, rows - pad, 0, cols
    kept = int(round(width * (rows / height), 7))
    pad = (cols - kept) // 2
    return 0, rows, pad, cols - pad


def image_layout(width: int, height: int, tile: int, side: int, pinpoints: Sequence[Sequence[int]]) -> Layout:
    """The grid and feature window for a width × height image; `tile` the tile's pixels, `side` its patches."""
    if width <= 0 or height <= 0:
        raise InputError(f"image size must be positive, got {width}x{height}")
    grid_h, grid_w = best_resolution(height, width, pinpoints)
    rows, cols = grid_h // tile, grid_w // tile
    return Layout(rows, cols, *feature_window(height, width, rows * side, cols * side))


def most_tiles(tile: int, pinpoints: Sequence[Sequence[int]]) -> int:
    """The most tiles an image can become: the whole image plus the largest grid of `pinpoints`."""
    return 1 + max((h // tile) * (w // tile) for h, w in pinpoints)


def token_count(layout: Layout, tokens_per_tile: int) -> int:
    """`<image>` tokens for one image: the whole image's tile, then each kept row and its image_newline."""
    return tokens_per_tile + (layout.bottom - layout.top) * (layout.right - layout.left + 1)


# --- pixels --------------------------------------------------------------------------------------------
def anyres_tiles(image: Image.Image, tile: int, pinpoints: Sequence[Sequence[int]], base_size: tuple[int, int],
                 shortest_edge: int | None) -> list[Image.Image]:
    """Steps 1-3 and the resize/crop of step 4: the whole image first, then the grid's tiles row by row.
    `base_size` is the (height, width) the whole image is resized to; `shortest_edge` the processor's per-tile
    shortest-edge resize (None: its size is a fixed height × width equal to the tile)."""
    grid_h, grid_w = best_resolution(image.height, image.width, pinpoints)
    new_h, new_w = fitted_size(image.height, image.width, grid_h, grid_w)
    canvas = Image.new("RGB", (grid_w, grid_h))  # black, as transformers pads with zeros
    canvas.paste(image.resize((new_w, new_h), BICUBIC), ((grid_w - new_w) // 2, (grid_h - new_h) // 2))
    pieces = [image.resize((base_size[1], base_size[0]), BICUBIC)]
    pieces += [canvas.crop((x, y, x + tile, y + tile)) for y in range(0, grid_h, tile) for x in range(0, grid_w, tile)]
    if shortest_edge is None:
        return [p.resize((tile, tile), BICUBIC) for p in pieces]
    return [centre_crop(resize_shortest_edge(p, shortest_edge), tile) for p in pieces]


def preprocess_anyres_image(source: ImageSource, tile: int, side: int, pinpoints: Sequence[Sequence[int]],
                            shortest_edge: int | None = None, mean: Sequence[float] = (0.5, 0.5, 0.5),
                            std: Sequence[float] = (0.5, 0.5, 0.5),
                            max_pixels: int | None = DEFAULT_MAX_PIXELS) -> tuple[torch.Tensor, Layout]:
    """One image → (pixel values [tiles, 3, tile, tile], its Layout; `token_count` gives its `<image>` tokens).
    `side` is the tower's patch grid side; `shortest_edge` as in `anyres_tiles` (the base image is resized to
    shortest_edge² then, else to tile²)."""
    image = load_image(source, max_pixels=max_pixels)
    base = (shortest_edge, shortest_edge) if shortest_edge is not None else (tile, tile)
    pixels = image_to_tensor(anyres_tiles(image, tile, pinpoints, base, shortest_edge), tile, mean, std)
    layout = image_layout(image.width, image.height, tile, side, pinpoints)
    if pixels.shape[0] != layout.tiles:  # the grid cut and the grid counted must agree
        raise InputError(f"{pixels.shape[0]} tiles for a layout of {layout.tiles}")
    return pixels, layout
