"""Idefics3 / SmolVLM image input: the longest-edge resize, the split into tiles plus a global image, and
the prompt with its row/column tags.

The same sizes, roundings and order as transformers' Idefics3ImageProcessor / SmolVLMImageProcessor
(PIL backend, Lanczos) and Idefics3Processor / SmolVLMProcessor, so imported checkpoints see the pixels
and tokens they were trained with:

1. the longer side becomes `longest_edge` (the shorter one keeps the aspect ratio, truncated, then made
   even), at most 4096 px a side;
2. with splitting: both sides are rounded up to whole tiles (the second side from the first one's
   aspect ratio), the picture is cut into rows × columns tiles, row by row, and the whole resized picture
   is added as a last, "global" tile; a picture of one tile is that tile alone (0 rows, 0 columns).
   Without splitting: one tile, the picture squashed to a square;
3. /255 and (x - mean) / std (`image.image_to_tensor`).

Training and inference both come here through `ChatProcessor`, so there is one copy of these steps.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from PIL import Image

from tinyomni.errors import InputError
from tinyomni.processing.image import DEFAULT_MAX_PIXELS, ImageSource, image_to_tensor, load_image

MAX_SIDE = 4096  # transformers' MAX_IMAGE_SIZE: no side is resized beyond it
LANCZOS = Image.Resampling.LANCZOS


def longest_edge_size(width: int, height: int, longest_edge: int) -> tuple[int, int]:
    """(width, height) after step 1: the longer side to `longest_edge`, the other truncated and made even."""
    if width <= 0 or height <= 0 or longest_edge <= 0:
        raise InputError(f"image size and longest_edge must be positive, got {width}x{height}, {longest_edge}")
    aspect = width / height
    if width >= height:
        width, height = longest_edge, int(longest_edge / aspect)
        height += height % 2
    else:
        height, width = longest_edge, int(longest_edge * aspect)
        width += width % 2
    width, height = max(width, 1), max(height, 1)
    aspect = width / height  # the cap at MAX_SIDE, from the size just computed
    if width >= height and width > MAX_SIDE:
        width, height = MAX_SIDE, int(MAX_SIDE / aspect)
    elif height > width and height > MAX_SIDE:
        height, width = MAX_SIDE, int(MAX_SIDE * aspect)
    return max(width, 1), max(height, 1)


def whole_tiles_size(width: int, height: int, tile: int) -> tuple[int, int]:
    """(width, height) rounded up to whole tiles; the shorter side starts from the longer one's aspect ratio."""
    aspect = width / height
    if width >= height:
        width = math.ceil(width / tile) * tile
        height = math.ceil(int(width / aspect) / tile) * tile
    else:
        height = math.ceil(height / tile) * tile
        width = math.ceil(int(height * aspect) / tile) * tile
    return width, height


def split_grid(width: int, height: int, tile: int, longest_edge: int, splitting: bool = True) -> tuple[int, int]:
    """(rows, columns) of the tiles a width × height picture is cut into; (0, 0): one tile, no split."""
    if not splitting:
        return 0, 0
    w, h = whole_tiles_size(*longest_edge_size(width, height, longest_edge), tile)
    if w <= tile and h <= tile:
        return 0, 0
    return h // tile, w // tile


def split_image(image: Image.Image, tile: int, longest_edge: int,
                splitting: bool = True) -> tuple[list[Image.Image], int, int]:
    """(tiles, rows, columns): the rows × columns tiles row by row and the global image last, or one tile."""
    image = image.resize(longest_edge_size(image.width, image.height, longest_edge), LANCZOS)
    if not splitting:
        return [image.resize((tile, tile), LANCZOS)], 0, 0
    image = image.resize(whole_tiles_size(image.width, image.height, tile), LANCZOS)
    if image.width <= tile and image.height <= tile:
        return [image], 0, 0
    rows, cols = image.height // tile, image.width // tile
    tiles = [image.crop((c * tile, r * tile, (c + 1) * tile, (r + 1) * tile)) for r in range(rows) for c in range(cols)]
    return [*tiles, image.resize((tile, tile), LANCZOS)], rows, cols


def preprocess_split_image(source: ImageSource, tile: int, longest_edge: int | None = None, splitting: bool = True,
                           mean: Sequence[float] = (0.5, 0.5, 0.5), std: Sequence[float] = (0.5, 0.5, 0.5),
                           max_pixels: int | None = DEFAULT_MAX_PIXELS) -> tuple[torch.Tensor, int, int]:
    """Load, split and normalise one image: (float32 [tiles, 3, tile, tile], rows, columns)."""
    image = load_image(source, max_pixels=max_pixels)
    tiles, rows, cols = split_image(image, tile, longest_edge or tile, splitting)
    return image_to_tensor(tiles, tile, mean, std), rows, cols


def image_prompt(rows: int, cols: int, tokens_per_tile: int, around: str, image_token: str,
                 global_token: str) -> str:
    """The text Idefics3Processor / SmolVLMProcessor write for one image (`around` is
    `<fake_token_around_image>`): each tile's tag and run, a newline after each row, then the global image."""
    run = image_token * tokens_per_tile
    whole = f"{around}{global_token}{run}{around}"
    if rows == 0 and cols == 0:
        return whole
    grid = "".join("".join(f"{around}<row_{r + 1}_col_{c + 1}>{run}" for c in range(cols)) + "\n"
                   for r in range(rows))
    return f"{grid}\n{whole}"
