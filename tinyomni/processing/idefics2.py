"""Idefics2 image input (OmniConfig.image_resize "native", image_prompt "tile_runs"): images near their own
size, optionally split into quarters, padded together; the prompt of `<image>` runs between
`<fake_token_around_image>`.

The same sizes, order and values as transformers' Idefics2ImageProcessor (PIL backend) and
Idefics2Processor, so imported checkpoints see the pixels and tokens they were trained with:

1. with splitting, the image is cut at half its width and half its height (integer halves) into four
   quarters, top-left, top-right, bottom-left, bottom-right, and the whole image comes last;
2. each of those is resized bilinearly (Pillow) only if needed: a longer side beyond `longest_edge` comes
   down to it (the other side keeps the aspect ratio, truncated), then each side below `shortest_edge`
   goes up to it (that one alone, so the aspect ratio may change);
3. /255 and (x - mean) / std;
4. every tile of a prompt is padded at the bottom and right to the largest height and width among them.
   The padding is NaN (transformers pads zeros and sends a pixel mask beside them): no pixel is NaN, so the
   mask travels inside the pixels wherever they go, and the model reads it back (model/resampler.py).

The prompt: each tile is `<fake_token_around_image>` + `<image>` × resampler_n_latents, and a closing
`<fake_token_around_image>`; two images with nothing between them share the one between them, and a space
goes after the closing one when a word (anything but whitespace or "<") follows. Training and inference
both come here through `ChatProcessor`.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from PIL import Image

from tinyomni.errors import InputError
from tinyomni.processing.image import DEFAULT_MAX_PIXELS, ImageSource, load_image, to_rgb

BILINEAR = Image.Resampling.BILINEAR


def native_size(width: int, height: int, shortest_edge: int, longest_edge: int) -> tuple[int, int]:
    """(width, height) after step 2: the longer side at most `longest_edge`, each side at least `shortest_edge`."""
    if min(width, height, shortest_edge, longest_edge) <= 0:
        raise InputError(f"image size and edges must be positive, got {width}x{height}, "
                         f"shortest {shortest_edge}, longest {longest_edge}")
    aspect = width / height
    if width >= height and width > longest_edge:
        width, height = longest_edge, int(longest_edge / aspect)
    elif height > width and height > longest_edge:
        height, width = longest_edge, int(longest_edge * aspect)
    return max(width, shortest_edge), max(height, shortest_edge)


def split_quarters(image: Image.Image) -> list[Image.Image]:
    """Step 1: the four quarters, row by row, then the whole image."""
    w, h = image.width // 2, image.height // 2
    boxes = [(0, 0, w, h), (w, 0, image.width, h), (0, h, w, image.height), (w, h, image.width, image.height)]
    return [*(image.crop(box) for box in boxes), image]


def to_tensor(image: Image.Image, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """Step 3 for one image of any size: float32 [3, h, w] (the arithmetic of `image.image_to_tensor`)."""
    pixels = torch.from_numpy(np.array(to_rgb(image), dtype=np.uint8)).permute(2, 0, 1).to(torch.float32).div(255)
    mean_t = torch.tensor(mean, dtype=torch.float32).view(3, 1, 1)
    std_t = torch.tensor(std, dtype=torch.float32).view(3, 1, 1)
    return pixels.sub(mean_t).div(std_t).contiguous()


def pad_tiles(tiles: Sequence[torch.Tensor]) -> torch.Tensor:
    """Step 4: [3, h, w] or [k, 3, h, w] tensors → one [n, 3, H, W], NaN where padding. Tensors of one size
    are concatenated as they are."""
    tiles = [t[None] if t.dim() == 3 else t for t in tiles]
    height = max(t.shape[-2] for t in tiles)
    width = max(t.shape[-1] for t in tiles)
    if all(t.shape[-2:] == (height, width) for t in tiles):
        return torch.cat(tiles)
    out = torch.full((sum(t.shape[0] for t in tiles), 3, height, width), float("nan"))
    at = 0
    for t in tiles:
        out[at:at + t.shape[0], :, : t.shape[-2], : t.shape[-1]] = t
        at += t.shape[0]
    return out


def preprocess_native_image(source: ImageSource, shortest_edge: int, longest_edge: int, splitting: bool = False,
                            mean: Sequence[float] = (0.5, 0.5, 0.5), std: Sequence[float] = (0.5, 0.5, 0.5),
                            max_pixels: int | None = DEFAULT_MAX_PIXELS) -> torch.Tensor:
    """Steps 1-3 for one image, its tiles padded to their largest: float32 [1 or 5, 3, H, W]."""
    image = load_image(source, max_pixels=max_pixels)
    if splitting and min(image.size) < 2:  # transformers fails on such an image (a quarter of 0 px)
        raise InputError(f"an image of {image.width}x{image.height} px cannot be split into quarters (image "
                         "splitting needs at least 2 px a side)")
    parts = split_quarters(image) if splitting else [image]
    tiles = []
    for part in parts:
        size = native_size(part.width, part.height, shortest_edge, longest_edge)
        tiles.append(to_tensor(part if part.size == size else part.resize(size, BILINEAR), mean, std))
    return pad_tiles(tiles)


def tile_runs_ids(tiles: int, tokens_per_tile: int, around_id: int, image_id: int) -> list[int]:
    """One image's placeholder ids: around, then each tile's run followed by around."""
    return [around_id, *([image_id] * tokens_per_tile + [around_id]) * tiles]
