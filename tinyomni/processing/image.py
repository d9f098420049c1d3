"""Image input: load anything a user may hand us as an RGB picture, then cut it into InternVL tiles.

`load_image` accepts a path, raw bytes, base64, a data URL or a PIL image and returns an RGB image
with EXIF orientation applied and transparency composited onto white. `dynamic_preprocess` is
InternVL's dynamic-resolution tiling, kept pixel-identical to the published code so that imported
InternVL weights see exactly the inputs they were trained on. `preprocess_image` chains the two and
normalises the tiles into the float tensor the vision encoder takes; training and inference both
call it, so there is one copy of this step.
"""

from __future__ import annotations

import base64
import binascii
import io
import os
import re
import urllib.parse
import urllib.request
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

from tinyomni.errors import InputError

ImageSource = str | os.PathLike | bytes | bytearray | memoryview | Image.Image

DEFAULT_MAX_PIXELS = 50_000_000
DEFAULT_MEAN = (0.5, 0.5, 0.5)
DEFAULT_STD = (0.5, 0.5, 0.5)
# What InternVL checkpoints were trained with (SigLIP-style models use DEFAULT_MEAN/STD).
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

_BASE64_RE = re.compile(r"^[A-Za-z0-9+/_-]+={0,2}$")
# Shorter strings that are not files are far more likely to be mistyped paths than base64 data.
_MIN_BASE64_CHARS = 64
_MAX_PATH_CHARS = 4096


# --- sources -------------------------------------------------------------------------------------
@dataclass
class ResolvedSource:
    """Where the bytes of a media input live (a file or memory) and a short name for messages."""

    name: str
    path: Path | None = None
    data: bytes | None = None

    def open(self) -> BinaryIO:
        if self.path is not None:
            return open(self.path, "rb")
        return io.BytesIO(self.data or b"")


def resolve_source(source: str | os.PathLike | bytes | bytearray | memoryview) -> ResolvedSource:
    """Work out whether `source` is a path, base64, a data URL or raw bytes, without decoding media.

    Shared by image, video and audio loading so every modality accepts the same kinds of input.
    """
    if isinstance(source, (bytes, bytearray, memoryview)):
        data = bytes(source)
        if not data:
            raise InputError("<bytes, 0 bytes>: no data (the input is empty)")
        return ResolvedSource(name=f"<bytes, {len(data)} bytes>", data=data)
    if isinstance(source, os.PathLike):
        return _resolve_path(Path(source))
    if not isinstance(source, str):
        raise InputError(f"cannot read media from a {type(source).__name__}; "
                         "pass a path, bytes, a base64 string, a data URL or a PIL image")
    text = source.strip()
    if not text:
        raise InputError("an empty string is not a path, base64 data or a data URL")
    if text.startswith("data:"):
        return _resolve_data_url(text)
    if text.startswith(("http://", "https://")):
        raise InputError(f"{_short(text)} is a URL; tinyomni does not fetch URLs, download it first "
                         "and pass the path or the bytes")
    if text.startswith("file://"):
        return _resolve_path(Path(urllib.request.url2pathname(urllib.parse.urlparse(text).path)))
    if len(text) <= _MAX_PATH_CHARS and os.path.exists(text):
        return _resolve_path(Path(text))
    compact = "".join(text.split())
    if len(compact) >= _MIN_BASE64_CHARS and _BASE64_RE.match(compact):
        return ResolvedSource(name=f"<base64, {len(compact)} chars>",
                              data=_b64decode(compact, f"<base64, {len(compact)} chars>"))
    return _resolve_path(Path(text))


def _resolve_path(path: Path) -> ResolvedSource:
    name = _short(str(path))
    try:
        exists = path.exists()
    except (OSError, ValueError):  # names too long for the file system, or with NUL bytes
        exists = False
    if not exists:
        raise InputError(f"file not found: {name}")
    if path.is_dir():
        raise InputError(f"{name} is a directory, not a file")
    if not os.access(path, os.R_OK):
        raise InputError(f"{name} is not readable (permission denied)")
    if path.stat().st_size == 0:
        raise InputError(f"{name} is empty (0 bytes)")
    return ResolvedSource(name=name, path=path)


def _resolve_data_url(text: str) -> ResolvedSource:
    header, comma, payload = text.partition(",")
    media_type = header[5:].split(";")[0] or "text/plain"
    name = f"<data URL {media_type}, {len(text)} chars>"
    if not comma:
        raise InputError(f"{name}: malformed data URL (no ',' before the data)")
    if ";base64" in header:
        data = _b64decode("".join(urllib.parse.unquote(payload).split()), name)
    else:
        data = urllib.parse.unquote_to_bytes(payload)
    if not data:
        raise InputError(f"{name}: no data (the data URL is empty)")
    return ResolvedSource(name=name, data=data)


def _b64decode(text: str, name: str) -> bytes:
    # Accept both alphabets (standard and URL-safe) and missing padding; browsers and clients vary.
    text = text.replace("-", "+").replace("_", "/")
    text += "=" * (-len(text) % 4)
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise InputError(f"{name}: invalid base64 data") from None


def _short(text: str, limit: int = 120) -> str:
    return text if len(text) <= limit else text[: limit - 3] + "..."


def describe_image(image: Image.Image) -> str:
    return f"<PIL image {image.width}x{image.height} {image.mode}>"


# --- loading -------------------------------------------------------------------------------------
def load_image(source: ImageSource, max_pixels: int | None = DEFAULT_MAX_PIXELS) -> Image.Image:
    """Load `source` as an RGB image, upright (EXIF orientation applied), alpha composited on white.

    `max_pixels` rejects images larger than width × height before their pixels are decoded (None:
    no limit of ours; Pillow's own decompression-bomb guard, `Image.MAX_IMAGE_PIXELS`, still applies).
    """
    if isinstance(source, Image.Image):
        name = describe_image(source)
        _check_size(source.size, max_pixels, name)
        try:
            source.load()
        except Exception as e:
            raise InputError(f"{name}: the image data is corrupt or truncated ({e})") from None
        return _finish(source, name)

    resolved = resolve_source(source)
    name = resolved.name
    try:
        with resolved.open() as fp:
            image = Image.open(fp)
            _check_size(image.size, max_pixels, name)
            # Image.open only reads the header; decode now, inside the try, so a corrupt or
            # truncated file fails here with its name rather than later inside the model.
            image.load()
    except InputError:
        raise
    except Image.DecompressionBombError as e:
        raise InputError(f"{name}: refused as a possible decompression bomb ({e})") from None
    except UnidentifiedImageError:
        raise InputError(f"{name}: not an image, or a format Pillow cannot read") from None
    except OSError as e:
        raise InputError(f"{name}: the image data is corrupt or truncated ({e})") from None
    except Exception as e:  # decoders for malformed files also raise SyntaxError, ValueError, ...
        raise InputError(f"{name}: the image data is corrupt ({type(e).__name__}: {e})") from None
    return _finish(image, name)


def _check_size(size: tuple[int, int], max_pixels: int | None, name: str) -> None:
    width, height = size
    if width <= 0 or height <= 0:
        raise InputError(f"{name}: the image is empty ({width}x{height} pixels)")
    if max_pixels is not None and width * height > max_pixels:
        raise InputError(f"{name}: the image is too large ({width}x{height} = {width * height:,} pixels; "
                         f"the limit is max_pixels={max_pixels:,})")


def _finish(image: Image.Image, name: str) -> Image.Image:
    try:
        image = ImageOps.exif_transpose(image)
    except Exception:
        pass  # a broken EXIF block should not cost the user a perfectly decodable picture
    try:
        return to_rgb(image)
    except (OSError, ValueError) as e:
        raise InputError(f"{name}: cannot convert image mode {image.mode} to RGB ({e})") from None


_ALPHA_MODES = {"RGBA", "RGBa", "LA", "PA"}
_HIGH_DEPTH_MODES = {"I", "F", "I;16", "I;16L", "I;16B", "I;16N"}


def to_rgb(image: Image.Image) -> Image.Image:
    """Convert any Pillow mode to 8-bit RGB the way a person would see the picture.

    Transparent pixels become white (dropping alpha would expose whatever colour the encoder left
    under them, often black); 16-bit and float grey levels are scaled to 0-255 instead of clipped.
    """
    if image.mode == "RGB" and "transparency" not in image.info:
        return image
    if image.mode == "La":
        image = image.convert("LA")  # Pillow converts premultiplied grey+alpha only to LA
    if image.mode == "LAB":
        return _lab_to_rgb(image)
    if image.mode in _HIGH_DEPTH_MODES:
        return Image.fromarray(_to_uint8(np.asarray(image), image.mode), mode="L").convert("RGB")
    if image.mode in _ALPHA_MODES or "transparency" in image.info:
        rgba = image.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return image.convert("RGB")


def _lab_to_rgb(image: Image.Image) -> Image.Image:
    # Pillow's plain convert() treats LAB channels as if they were RGB; a colour transform is right.
    from PIL import ImageCms

    transform = ImageCms.buildTransform(ImageCms.createProfile("LAB"), ImageCms.createProfile("sRGB"),
                                        "LAB", "RGB")
    return ImageCms.applyTransform(image, transform)


def _to_uint8(array: np.ndarray, mode: str) -> np.ndarray:
    values = array.astype(np.float64)
    if mode.startswith("I;16"):
        scaled = values / 257.0
    else:
        values = np.nan_to_num(values, nan=0.0, posinf=0.0, neginf=0.0)
        lo, hi = float(values.min()), float(values.max())
        # The mode does not say the range, so infer it from the values: float images are usually
        # 0-1, 32-bit integer ones usually hold 8- or 16-bit data (old 16-bit PNG decoding).
        if mode == "F" and lo >= 0.0 and hi <= 1.0:
            scaled = values * 255.0
        elif lo >= 0.0 and hi <= 255.0:
            scaled = values
        elif mode == "I" and lo >= 0.0 and hi <= 65535.0:
            scaled = values / 257.0
        elif hi > lo:
            scaled = (values - lo) * (255.0 / (hi - lo))
        else:
            scaled = np.zeros_like(values)
    return np.clip(np.round(scaled), 0, 255).astype(np.uint8)


# --- InternVL dynamic resolution ---------------------------------------------------------------
def target_ratios(min_num: int, max_num: int) -> list[tuple[int, int]]:
    """Every (columns, rows) grid with min_num <= columns·rows <= max_num, ordered as InternVL orders them."""
    if min_num < 1 or max_num < min_num:
        raise InputError(f"tile limits must satisfy 1 <= min_num <= max_num (got {min_num}, {max_num})")
    # Built exactly like the reference (a set, then a stable sort by area): the order of grids of
    # equal area decides ties in find_closest_aspect_ratio, and set order is deterministic for ints.
    ratios = set(
        (i, j) for n in range(min_num, max_num + 1) for i in range(1, n + 1) for j in range(1, n + 1)
        if i * j <= max_num and i * j >= min_num)
    return sorted(ratios, key=lambda x: x[0] * x[1])


def find_closest_aspect_ratio(aspect_ratio: float, target_ratios: Sequence[tuple[int, int]],
                              width: int, height: int, image_size: int) -> tuple[int, int]:
    """InternVL's grid choice: the closest aspect ratio; on a tie, the later (larger) grid if the
    image has more than half that grid's pixels, so small images are not blown up."""
    best_ratio_diff = float("inf")
    best_ratio = (1, 1)
    area = width * height
    for ratio in target_ratios:
        target_aspect_ratio = ratio[0] / ratio[1]
        ratio_diff = abs(aspect_ratio - target_aspect_ratio)
        if ratio_diff < best_ratio_diff:
            best_ratio_diff = ratio_diff
            best_ratio = ratio
        elif ratio_diff == best_ratio_diff:
            if area > 0.5 * image_size * image_size * ratio[0] * ratio[1]:
                best_ratio = ratio
    return best_ratio


def tile_grid(width: int, height: int, image_size: int = 448, min_num: int = 1,
              max_num: int = 6) -> tuple[int, int]:
    """The (columns, rows) grid dynamic_preprocess uses for a width × height image."""
    if width <= 0 or height <= 0:
        raise InputError(f"image size must be positive, got {width}x{height}")
    if image_size <= 0:
        raise InputError(f"image_size must be positive, got {image_size}")
    ratios = target_ratios(min_num, max_num)
    return find_closest_aspect_ratio(width / height, ratios, width, height, image_size)


def dynamic_preprocess(image: Image.Image, min_num: int = 1, max_num: int = 6, image_size: int = 448,
                       use_thumbnail: bool = False) -> list[Image.Image]:
    """Split `image` into a grid of image_size² tiles, row by row, plus an optional thumbnail.

    Pixel-identical to InternVL's `dynamic_preprocess`, including its resize call (Pillow's default
    resampling), which is what InternVL checkpoints saw in training.
    """
    cols, rows = tile_grid(image.width, image.height, image_size, min_num, max_num)
    resized = image.resize((image_size * cols, image_size * rows))
    tiles = []
    for i in range(cols * rows):
        x, y = (i % cols) * image_size, (i // cols) * image_size
        tiles.append(resized.crop((x, y, x + image_size, y + image_size)))
    if use_thumbnail and len(tiles) != 1:
        tiles.append(image.resize((image_size, image_size)))
    return tiles


def count_tiles(width: int, height: int, image_size: int = 448, min_tiles: int = 1, max_tiles: int = 6,
                use_thumbnail: bool = True) -> int:
    """How many tiles preprocess_image makes for a width × height image, without touching pixels."""
    cols, rows = tile_grid(width, height, image_size, min_tiles, max_tiles)
    return cols * rows + (1 if use_thumbnail and cols * rows != 1 else 0)


# --- tensors -------------------------------------------------------------------------------------
def image_to_tensor(images: Sequence[Image.Image], image_size: int,
                    mean: Sequence[float] = DEFAULT_MEAN, std: Sequence[float] = DEFAULT_STD) -> torch.Tensor:
    """Stack images into a float32 [n, 3, S, S] tensor: bicubic resize to S×S, /255, (x - mean) / std.

    Matches torchvision's Resize(BICUBIC) → ToTensor → Normalize on PIL images, as InternVL uses.
    """
    if image_size <= 0:
        raise InputError(f"image_size must be positive, got {image_size}")
    if len(mean) != 3 or len(std) != 3:
        raise InputError(f"mean and std need 3 values (one per channel), got {len(mean)} and {len(std)}")
    if any(s == 0 for s in std):
        raise InputError(f"std must not contain zeros, got {tuple(std)}")
    arrays = []
    for image in images:
        image = to_rgb(image)
        if image.size != (image_size, image_size):
            image = image.resize((image_size, image_size), Image.Resampling.BICUBIC)
        arrays.append(np.asarray(image, dtype=np.uint8))
    if not arrays:
        return torch.empty(0, 3, image_size, image_size)
    pixels = torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).to(torch.float32).div(255)
    mean_t = torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1)
    std_t = torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1)
    return pixels.sub(mean_t).div(std_t).contiguous()


def preprocess_image(source: ImageSource, image_size: int = 448, min_tiles: int = 1, max_tiles: int = 6,
                     use_thumbnail: bool = True, mean: Sequence[float] = DEFAULT_MEAN,
                     std: Sequence[float] = DEFAULT_STD,
                     max_pixels: int | None = DEFAULT_MAX_PIXELS, resize: str = "tiles",
                     shortest_edge: int | None = None, pad_square: bool = False) -> torch.Tensor:
    """Load, tile and normalise one image: float32 [tiles, 3, image_size, image_size].

    `resize` "tiles" is InternVL's dynamic resolution; "shortest_edge" is CLIP's one-tile preprocessing
    (`resize_shortest_edge` to `shortest_edge`, default image_size, then `centre_crop`). `pad_square`
    first pads the image to a square in the mean colour (`pad_to_square`, LLaVA's "pad" mode).
    """
    image = load_image(source, max_pixels=max_pixels)
    if pad_square:
        image = pad_to_square(image, mean)
    if resize == "shortest_edge":
        tiles = [centre_crop(resize_shortest_edge(image, shortest_edge or image_size), image_size)]
    elif resize == "tiles":
        tiles = dynamic_preprocess(image, min_tiles, max_tiles, image_size, use_thumbnail)
    else:
        raise InputError(f"unknown image resize mode {resize!r} (tiles, shortest_edge; Idefics3's "
                         "longest_edge split is processing.smolvlm.preprocess_split_image)")
    return image_to_tensor(tiles, image_size, mean, std)


# --- CLIP / LLaVA one-tile preprocessing -----------------------------------------------------------
# The same steps, sizes and roundings as transformers' CLIPImageProcessor and LlavaImageProcessor
# (PIL backend), so LLaVA checkpoints see the pixels they were evaluated with.
def pad_to_square(image: Image.Image, mean: Sequence[float]) -> Image.Image:
    """Centre `image` on a square of its longer side, filled with the mean colour (each channel's
    mean × 255, truncated), as LLaVA pads before resizing."""
    width, height = image.size
    if width == height:
        return image
    side = max(width, height)
    canvas = Image.new("RGB", (side, side), tuple(int(m * 255) for m in mean))
    canvas.paste(image, ((side - width) // 2, (side - height) // 2))
    return canvas


def resize_shortest_edge(image: Image.Image, shortest_edge: int) -> Image.Image:
    """Bicubic resize so the shorter side is `shortest_edge`; the longer one is truncated, not rounded."""
    width, height = image.size
    short, long = (width, height) if width <= height else (height, width)
    new_long = int(shortest_edge * long / short)
    size = (shortest_edge, new_long) if width <= height else (new_long, shortest_edge)
    return image.resize(size, Image.Resampling.BICUBIC)


def centre_crop(image: Image.Image, size: int) -> Image.Image:
    """The centred size × size square; an image smaller than that is first padded with black, centred
    (rounding the padding up on the top and left, as transformers does)."""
    width, height = image.size
    top, left = (height - size) // 2, (width - size) // 2
    if top >= 0 and left >= 0:
        return image.crop((left, top, left + size, top + size))
    new_height, new_width = max(size, height), max(size, width)
    top_pad, left_pad = -(-(new_height - height) // 2), -(-(new_width - width) // 2)  # ceil
    canvas = Image.new("RGB", (new_width, new_height))
    canvas.paste(image, (left_pad, top_pad))
    top, left = top + top_pad, left + left_pad
    return canvas.crop((max(0, left), max(0, top), min(new_width, left + size), min(new_height, top + size)))
