"""Aria image input (OmniConfig.image_resize "aria"): one tile per image, its longer side resized to the tile,
padded bottom and right to the square.

The same sizes, order and values as transformers' AriaImageProcessor (PIL backend) without image splitting,
so imported checkpoints see the pixels they were trained with:

1. scale = tile / the longer side; the longer side becomes the tile, the other int(side * scale) but at least
   `min_size` (AriaImageProcessor's min_image_size), resized bicubically (Pillow) to that size;
2. /255 and (x - mean) / std;
3. padded at the bottom and right to tile x tile. transformers pads zeros before normalising and sends a pixel
   mask beside them; here the padding is NaN, so the mask travels inside the pixels, and the model
   (model/aria_projector.py, `aria_padding`) puts the normalised zero back and masks the patches that hold no
   image pixel, as Aria's patch mask does (a patch counts as image when any of its pixels is).

The prompt: the chat template writes the image token once per image (`images_in_template`), and it becomes
`aria_num_queries` image tokens (AriaProcessor's size_conversion for the tile); nothing else is added.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from PIL import Image

from tinyomni.errors import InputError
from tinyomni.processing.idefics2 import to_tensor
from tinyomni.processing.image import DEFAULT_MAX_PIXELS, ImageSource, load_image

BICUBIC = Image.Resampling.BICUBIC


def aria_size(width: int, height: int, tile: int, min_size: int) -> tuple[int, int]:
    """(width, height) after step 1."""
    if min(width, height) <= 0:
        raise InputError(f"image size must be positive, got {width}x{height}")
    scale = tile / max(height, width)
    if width >= height:
        return tile, max(int(height * scale), min_size)
    return max(int(width * scale), min_size), tile


def preprocess_aria_image(source: ImageSource, tile: int, min_size: int, mean: Sequence[float] = (0.5, 0.5, 0.5),
                          std: Sequence[float] = (0.5, 0.5, 0.5),
                          max_pixels: int | None = DEFAULT_MAX_PIXELS) -> torch.Tensor:
    """Steps 1-3 for one image: float32 [1, 3, tile, tile], NaN where padding."""
    if not 0 < min_size <= tile:
        raise InputError(f"Aria's min_image_size {min_size} must be in (0, {tile}]")
    image = load_image(source, max_pixels=max_pixels)
    width, height = aria_size(image.width, image.height, tile, min_size)
    pixels = to_tensor(image.convert("RGB").resize((width, height), BICUBIC), mean, std)
    out = torch.full((1, 3, tile, tile), float("nan"))
    out[0, :, :height, :width] = pixels
    return out
