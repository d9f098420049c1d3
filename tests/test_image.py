"""Image loading and InternVL dynamic tiling: exact agreement with the published code, mode
conversions, EXIF orientation, every source kind, and the errors a user sees."""

from __future__ import annotations

import base64
import io
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from tinyomni.errors import InputError
from tinyomni.processing.image import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    count_tiles,
    dynamic_preprocess,
    image_to_tensor,
    load_image,
    preprocess_image,
    tile_grid,
)


# --- InternVL's published code, verbatim (InternVL2/2.5/3 model cards, "Quick Start") -------------
def find_closest_aspect_ratio_ref(aspect_ratio, target_ratios, width, height, image_size):
    best_ratio_diff = float('inf')
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


def dynamic_preprocess_ref(image, min_num=1, max_num=12, image_size=448, use_thumbnail=False):
    orig_width, orig_height = image.size
    aspect_ratio = orig_width / orig_height

    # calculate the existing image aspect ratio
    target_ratios = set(
        (i, j) for n in range(min_num, max_num + 1) for i in range(1, n + 1) for j in range(1, n + 1) if
        i * j <= max_num and i * j >= min_num)
    target_ratios = sorted(target_ratios, key=lambda x: x[0] * x[1])

    # find the closest aspect ratio to the target
    target_aspect_ratio = find_closest_aspect_ratio_ref(
        aspect_ratio, target_ratios, orig_width, orig_height, image_size)

    # calculate the target width and height
    target_width = image_size * target_aspect_ratio[0]
    target_height = image_size * target_aspect_ratio[1]
    blocks = target_aspect_ratio[0] * target_aspect_ratio[1]

    # resize the image
    resized_img = image.resize((target_width, target_height))
    processed_images = []
    for i in range(blocks):
        box = (
            (i % (target_width // image_size)) * image_size,
            (i // (target_width // image_size)) * image_size,
            ((i % (target_width // image_size)) + 1) * image_size,
            ((i // (target_width // image_size)) + 1) * image_size
        )
        # split the image
        split_img = resized_img.crop(box)
        processed_images.append(split_img)
    assert len(processed_images) == blocks
    if use_thumbnail and len(processed_images) != 1:
        thumbnail_img = image.resize((image_size, image_size))
        processed_images.append(thumbnail_img)
    return processed_images, target_aspect_ratio  # (the grid is returned too, for the test)


def noise(width: int, height: int, seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))


# (width, height, min_num, max_num, image_size, use_thumbnail)
TILING_CASES = [
    (1, 1, 1, 6, 448, True),            # tiny
    (8, 8, 1, 6, 448, True),            # tiny, upscaled
    (2, 1, 1, 6, 16, True),
    (1, 2, 1, 6, 16, True),
    (448, 448, 1, 6, 448, True),        # square, exactly one tile
    (500, 500, 1, 12, 448, True),
    (1000, 200, 1, 6, 448, True),       # wide
    (200, 1000, 1, 6, 448, False),      # tall
    (672, 448, 1, 2, 448, True),        # 3:2 ties (1,1) and (2,1); large → the larger grid
    (150, 100, 1, 2, 448, True),        # same tie; small → stays (1,1)
    (90, 60, 1, 2, 64, True),           # tie, area just above half of the 2-tile grid
    (60, 40, 1, 2, 64, False),          # tie, area below half
    (1500, 1000, 1, 2, 448, True),
    (4000, 3000, 1, 12, 448, True),     # huge
    (1023, 767, 2, 8, 112, True),       # odd sizes, min_num 2
    (37, 999, 1, 6, 32, True),          # very tall
    (999, 37, 3, 9, 32, False),         # very wide, min_num 3
    (640, 480, 1, 1, 448, True),        # max 1: one tile, never a thumbnail
    (1280, 720, 1, 12, 224, True),
    (720, 1280, 4, 4, 64, True),        # exactly four tiles forced
    (333, 777, 1, 40, 56, True),        # many candidate grids
    (1920, 1080, 1, 6, 448, False),
    (500, 300, 1, 6, 100, True),
    (301, 199, 5, 12, 28, True),
    (97, 13, 1, 24, 14, True),
]


@pytest.mark.parametrize("width,height,min_num,max_num,image_size,use_thumbnail", TILING_CASES)
def test_dynamic_preprocess_matches_internvl(width, height, min_num, max_num, image_size, use_thumbnail):
    image = noise(width, height, seed=width * 7919 + height)
    expected, grid = dynamic_preprocess_ref(image, min_num, max_num, image_size, use_thumbnail)
    ours = dynamic_preprocess(image, min_num, max_num, image_size, use_thumbnail)

    assert tile_grid(width, height, image_size, min_num, max_num) == grid
    assert len(ours) == len(expected)
    assert count_tiles(width, height, image_size, min_num, max_num, use_thumbnail) == len(expected)
    for a, b in zip(ours, expected):
        assert a.size == b.size == (image_size, image_size)
        assert a.tobytes() == b.tobytes()


def test_tiling_tie_rule_picks_both_ways():
    assert tile_grid(672, 448, 448, 1, 2) == (2, 1)
    assert tile_grid(150, 100, 448, 1, 2) == (1, 1)


def test_count_tiles_needs_no_pixels_and_checks_limits():
    assert count_tiles(10_000, 10_000, 448, 1, 6, True) == 5  # 2x2 + thumbnail
    assert count_tiles(100, 100, 448, 1, 6, True) == 1
    with pytest.raises(InputError, match="min_num"):
        count_tiles(100, 100, 448, 3, 2)
    with pytest.raises(InputError, match="positive"):
        count_tiles(0, 100)


# --- mode conversion ---------------------------------------------------------------------------
def roundtrip_png(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, "PNG")
    return buf.getvalue()


def test_rgba_is_composited_on_white():
    image = Image.new("RGBA", (3, 1))
    image.putdata([(255, 0, 0, 0), (255, 0, 0, 255), (0, 0, 0, 128)])
    rgb = load_image(roundtrip_png(image))
    assert rgb.mode == "RGB"
    assert rgb.getpixel((0, 0)) == (255, 255, 255)  # transparent → white, not red or black
    assert rgb.getpixel((1, 0)) == (255, 0, 0)
    assert all(abs(c - 127) <= 1 for c in rgb.getpixel((2, 0)))


def test_la_is_composited_on_white():
    image = Image.new("LA", (2, 1))
    image.putdata([(0, 0), (0, 255)])
    rgb = load_image(roundtrip_png(image))
    assert rgb.getpixel((0, 0)) == (255, 255, 255)
    assert rgb.getpixel((1, 0)) == (0, 0, 0)


def test_palette_with_transparency():
    image = Image.new("P", (2, 1), 0)
    image.putpalette([0, 0, 0, 0, 255, 0] + [0] * 762)
    image.putpixel((1, 0), 1)
    image.info["transparency"] = 0
    data = roundtrip_png(image)
    assert Image.open(io.BytesIO(data)).mode == "P"
    rgb = load_image(data)
    assert rgb.getpixel((0, 0)) == (255, 255, 255)  # index 0 is transparent black → white
    assert rgb.getpixel((1, 0)) == (0, 255, 0)


def test_cmyk():
    image = Image.new("CMYK", (4, 4), (0, 255, 255, 0))
    assert load_image(image).getpixel((0, 0)) == (255, 0, 0)
    buf = io.BytesIO()
    image.save(buf, "JPEG", quality=95)
    assert Image.open(io.BytesIO(buf.getvalue())).mode == "CMYK"
    pixel = load_image(buf.getvalue()).getpixel((2, 2))
    assert pixel[0] > 240 and pixel[1] < 15 and pixel[2] < 15


def test_grayscale_modes():
    assert load_image(roundtrip_png(Image.new("L", (2, 2), 100))).getpixel((0, 0)) == (100, 100, 100)
    one = Image.new("1", (2, 1), 0)
    one.putpixel((1, 0), 1)
    rgb = load_image(roundtrip_png(one))
    assert rgb.getpixel((0, 0)) == (0, 0, 0) and rgb.getpixel((1, 0)) == (255, 255, 255)


def test_rare_modes():
    assert load_image(Image.new("La", (2, 2), (100, 0))).getpixel((0, 0)) == (255, 255, 255)
    assert load_image(Image.new("PA", (2, 2), (1, 0))).getpixel((0, 0)) == (255, 255, 255)
    assert load_image(Image.new("YCbCr", (2, 2), (128, 128, 128))).getpixel((0, 0)) == (128, 128, 128)
    grey = load_image(Image.new("LAB", (2, 2), (128, 128, 128))).getpixel((0, 0))  # L* = 50, neutral
    assert grey[0] == grey[1] == grey[2] and abs(grey[0] - 119) <= 2
    key = Image.new("RGB", (2, 1), (0, 0, 0))  # RGB PNG with a colour-key transparency
    key.putpixel((1, 0), (9, 9, 9))
    buf = io.BytesIO()
    key.save(buf, "PNG", transparency=(0, 0, 0))
    loaded = load_image(buf.getvalue())
    assert loaded.getpixel((0, 0)) == (255, 255, 255) and loaded.getpixel((1, 0)) == (9, 9, 9)


def test_sixteen_bit_is_scaled_not_clipped():
    values = np.array([[0, 1000, 32768, 65535]], dtype=np.uint16)
    data = roundtrip_png(Image.fromarray(values))
    assert Image.open(io.BytesIO(data)).mode.startswith("I")
    rgb = np.asarray(load_image(data))
    assert rgb[0, :, 0].tolist() == [0, 4, 128, 255]  # clipping would give 255 for 1000
    assert (rgb[..., 0] == rgb[..., 1]).all() and (rgb[..., 1] == rgb[..., 2]).all()


def test_int32_and_float_modes():
    ints = Image.fromarray(np.array([[0, 40000]], dtype=np.int32))
    assert ints.mode == "I"
    assert np.asarray(load_image(ints))[0, :, 0].tolist() == [0, 156]  # 16-bit data in an I image
    floats = Image.fromarray(np.array([[0.0, 0.5, 1.0]], dtype=np.float32))
    assert floats.mode == "F"
    assert np.asarray(load_image(floats))[0, :, 0].tolist() == [0, 128, 255]


# --- EXIF orientation ----------------------------------------------------------------------------
def test_exif_orientation_is_applied():
    stored = Image.new("RGB", (40, 20), (255, 0, 0))
    stored.paste((0, 0, 255), (20, 0, 40, 20))  # left red, right blue, as stored
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90° clockwise to display"
    buf = io.BytesIO()
    stored.save(buf, "JPEG", quality=95, exif=exif.tobytes())
    image = load_image(buf.getvalue())
    assert image.size == (20, 40)
    top, bottom = image.getpixel((10, 5)), image.getpixel((10, 35))
    assert top[0] > 200 and top[2] < 60  # the stored left (red) edge is now the top
    assert bottom[2] > 200 and bottom[0] < 60


# --- sources -----------------------------------------------------------------------------------
def test_every_source_kind_gives_the_same_pixels(tmp_path: Path):
    image = noise(17, 11)
    data = roundtrip_png(image)
    path = tmp_path / "picture.png"
    path.write_bytes(data)
    b64 = base64.b64encode(data).decode()
    sources = [
        str(path), path, path.as_uri(), data, bytearray(data), memoryview(data), b64,
        b64[:40] + "\n" + b64[40:],  # wrapped base64, as some clients send it
        base64.urlsafe_b64encode(data).decode().rstrip("="),
        f"data:image/png;base64,{b64}", image,
    ]
    for source in sources:
        loaded = load_image(source)
        assert loaded.mode == "RGB" and loaded.size == (17, 11)
        assert loaded.tobytes() == image.tobytes(), type(source)


def test_pil_input_is_not_modified():
    image = Image.new("RGBA", (4, 4), (0, 0, 0, 0))
    load_image(image)
    assert image.mode == "RGBA"


# --- errors ------------------------------------------------------------------------------------
def jpeg_bytes() -> bytes:
    buf = io.BytesIO()
    noise(64, 64).save(buf, "JPEG")
    return buf.getvalue()


def test_missing_file(tmp_path: Path):
    with pytest.raises(InputError, match="file not found: .*nope.png"):
        load_image(str(tmp_path / "nope.png"))
    with pytest.raises(ValueError, match="file not found"):  # callers catching ValueError keep working
        load_image(tmp_path / "nope.png")


def test_corrupt_bytes_name_the_source():
    with pytest.raises(InputError, match=r"<bytes, 200 bytes>: not an image"):
        load_image(b"definitely not an image" * 8 + b"x" * 16)


def test_truncated_jpeg():
    data = jpeg_bytes()
    with pytest.raises(InputError, match="truncated"):
        load_image(data[: len(data) // 2])


def test_truncated_file_names_the_path(tmp_path: Path):
    path = tmp_path / "cut.jpg"
    data = jpeg_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(InputError, match="cut.jpg.*truncated"):
        load_image(path)


def test_base64_payload_is_never_dumped_in_errors():
    b64 = base64.b64encode(b"\x00garbage" * 100).decode()
    with pytest.raises(InputError) as info:
        load_image(f"data:image/png;base64,{b64}")
    assert b64[:40] not in str(info.value) and "data URL image/png" in str(info.value)
    with pytest.raises(InputError) as info:
        load_image(b64)
    assert b64[:40] not in str(info.value) and "<base64," in str(info.value)


def test_malformed_inputs():
    with pytest.raises(InputError, match="invalid base64"):
        load_image("data:image/png;base64,@@@@")
    with pytest.raises(InputError, match="URL"):
        load_image("https://example.com/cat.png")
    with pytest.raises(InputError, match="empty"):
        load_image(b"")
    with pytest.raises(InputError, match="cannot read media from a int"):
        load_image(42)  # type: ignore[arg-type]


def test_max_pixels():
    data = roundtrip_png(Image.new("L", (100, 50)))
    message = r"too large \(100x50 = 5,000 pixels; the limit is max_pixels=1,000\)"
    with pytest.raises(InputError, match=message):
        load_image(data, max_pixels=1000)
    assert load_image(data, max_pixels=5000).size == (100, 50)
    with pytest.raises(InputError, match="too large"):
        load_image(Image.new("L", (100, 50)), max_pixels=1000)


def png_header_only(width: int, height: int) -> bytes:
    """A PNG whose header claims width×height pixels: the shape of a decompression bomb."""
    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    idat = zlib.compress(b"\x00")
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


def test_decompression_bomb():
    with pytest.raises(InputError, match="decompression bomb"):
        load_image(png_header_only(20_000, 20_000), max_pixels=None)  # Pillow's own guard
    with pytest.raises(InputError, match="too large"):
        load_image(png_header_only(8_000, 8_000))  # ours, before any pixel is decoded


def test_zero_size_image():
    with pytest.raises(InputError, match="empty"):
        load_image(Image.new("RGB", (0, 5)))


# --- tensors -----------------------------------------------------------------------------------
def test_image_to_tensor_matches_torchvision_pipeline():
    tiles = [Image.new("RGB", (8, 8), (255, 0, 128)), noise(13, 7)]
    tensor = image_to_tensor(tiles, 8, IMAGENET_MEAN, IMAGENET_STD)
    assert tensor.shape == (2, 3, 8, 8) and tensor.dtype == torch.float32
    # Resize(BICUBIC) → ToTensor → Normalize, spelled out.
    for k, tile in enumerate(tiles):
        resized = tile.resize((8, 8), Image.Resampling.BICUBIC) if tile.size != (8, 8) else tile
        x = torch.from_numpy(np.asarray(resized).copy()).permute(2, 0, 1).float().div(255)
        x = (x - torch.tensor(IMAGENET_MEAN).view(3, 1, 1)) / torch.tensor(IMAGENET_STD).view(3, 1, 1)
        assert torch.equal(tensor[k], x)
    white = image_to_tensor([Image.new("RGB", (4, 4), (255, 255, 255))], 4)
    assert torch.allclose(white, torch.ones(1, 3, 4, 4))
    with pytest.raises(InputError, match="3 values"):
        image_to_tensor(tiles, 8, (0.5,), (0.5,))


def test_preprocess_image_shapes():
    data = roundtrip_png(noise(900, 448))
    pixels = preprocess_image(data, image_size=56, max_tiles=6)
    assert pixels.shape == (count_tiles(900, 448, 56, 1, 6, True), 3, 56, 56) == (3, 3, 56, 56)
    assert preprocess_image(data, image_size=56, use_thumbnail=False).shape[0] == 2
    assert preprocess_image(data, image_size=56, max_tiles=1).shape[0] == 1
    tiles = dynamic_preprocess(load_image(data), 1, 6, 56, True)
    assert torch.equal(pixels, image_to_tensor(tiles, 56))
