"""Drawing for the synthetic world: shapes, colours, fonts, noise, and byte-stable PNG encoding.

Everything here is a pure function of its arguments (and of the installed fonts), so the same seed
gives the same pixels. Shapes are drawn at 2x and reduced, which gives anti-aliased edges cheaply.
"""

from __future__ import annotations

import io
import math
import random
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from tinyomni.errors import MissingDependencyError

# Named colours: distinct at a glance, none close to the light backgrounds.
COLORS: dict[str, tuple[int, int, int]] = {
    "red": (215, 38, 38),
    "orange": (245, 135, 20),
    "yellow": (232, 200, 20),
    "green": (40, 155, 60),
    "blue": (40, 85, 215),
    "purple": (135, 60, 185),
    "pink": (240, 115, 180),
    "black": (25, 25, 25),
}
SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "star", "hexagon", "diamond")
# Object radius as a fraction of the image side; names are what captions say.
SIZES: dict[str, float] = {"small": 0.065, "medium": 0.095, "large": 0.13}

SUPERSAMPLE = 2


@dataclass(frozen=True)
class Obj:
    """One object in a scene. x, y are the centre in [0, 1] image coordinates; r is the radius."""

    shape: str
    color: str
    size: str
    x: float
    y: float

    @property
    def r(self) -> float:
        return SIZES[self.size]

    @property
    def name(self) -> str:
        return f"{self.color} {self.shape}"


# --- shapes ----------------------------------------------------------------------------------------

def shape_polygon(shape: str, cx: float, cy: float, r: float) -> list[tuple[float, float]] | None:
    """Vertices of a shape centred at (cx, cy) with outer radius r (None for a circle)."""
    if shape == "circle":
        return None
    if shape == "square":
        s = r * 0.85  # a square's corners reach further than a circle; shrink so sizes look alike
        return [(cx - s, cy - s), (cx + s, cy - s), (cx + s, cy + s), (cx - s, cy + s)]
    if shape == "diamond":
        return [(cx, cy - r), (cx + r * 0.8, cy), (cx, cy + r), (cx - r * 0.8, cy)]
    if shape == "triangle":
        return [(cx + r * math.cos(a), cy + r * math.sin(a)) for a in _angles(3, -math.pi / 2)]
    if shape == "hexagon":
        return [(cx + r * math.cos(a), cy + r * math.sin(a)) for a in _angles(6, 0.0)]
    if shape == "star":
        points = []
        for i, a in enumerate(_angles(10, -math.pi / 2)):
            rr = r if i % 2 == 0 else r * 0.45
            points.append((cx + rr * math.cos(a), cy + rr * math.sin(a)))
        return points
    raise ValueError(f"unknown shape {shape!r}")


def _angles(n: int, start: float) -> list[float]:
    return [start + 2 * math.pi * i / n for i in range(n)]


def draw_object(draw: ImageDraw.ImageDraw, obj: Obj, side: int) -> None:
    """Draw one object on a canvas of `side` pixels (already supersampled)."""
    cx, cy, r = obj.x * side, obj.y * side, obj.r * side
    fill = COLORS[obj.color]
    polygon = shape_polygon(obj.shape, cx, cy, r)
    if polygon is None:
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fill)
    else:
        draw.polygon(polygon, fill=fill)


def background(rng: random.Random, size: tuple[int, int]) -> Image.Image:
    """A light, slightly tinted background, so models cannot rely on pure white."""
    tint = tuple(rng.randint(228, 252) for _ in range(3))
    return Image.new("RGB", size, tint)


def render_scene(objects: list[Obj], side: int, rng: random.Random, noise: float) -> Image.Image:
    """Render objects on a square canvas of `side` pixels, then add `noise` (0 = clean, 1 = heavy)."""
    big = side * SUPERSAMPLE
    image = background(rng, (big, big))
    draw = ImageDraw.Draw(image)
    if noise > 0:
        _clutter(draw, rng, big, noise)
    for obj in objects:
        draw_object(draw, obj, big)
    image = image.resize((side, side), Image.Resampling.LANCZOS)
    return add_noise(image, rng, noise)


def _clutter(draw: ImageDraw.ImageDraw, rng: random.Random, side: int, noise: float) -> None:
    """Faint background lines: distractors that are not objects."""
    for _ in range(int(noise * 8)):
        shade = tuple(rng.randint(170, 215) for _ in range(3))
        points = [(rng.uniform(0, side), rng.uniform(0, side)) for _ in range(2)]
        draw.line(points, fill=shade, width=max(1, side // 150))


def add_noise(image: Image.Image, rng: random.Random, noise: float) -> Image.Image:
    """Gaussian pixel noise with sigma = 40 * noise grey levels (seeded from rng)."""
    if noise <= 0:
        return image
    nprng = np.random.default_rng(rng.getrandbits(63))
    pixels = np.asarray(image, dtype=np.float32)
    pixels = pixels + nprng.normal(0.0, 40.0 * noise, pixels.shape).astype(np.float32)
    return Image.fromarray(np.clip(pixels, 0, 255).round().astype(np.uint8), "RGB")


def place_objects(rng: random.Random, specs: list[tuple[str, str, str]], existing: list[Obj] | None = None,
                  optional: bool = False, margin: float = 0.02, tries: int = 200) -> list[Obj]:
    """Place (shape, colour, size) specs at random non-overlapping positions inside [0, 1]^2.

    Returns `existing` followed by the new objects. A crowded scene steps sizes down before giving
    up; then an `optional` object (a distractor) is dropped, a required one is an error.
    """
    placed: list[Obj] = list(existing or [])
    for shape, color, size in specs:
        for attempt in range(tries * 3):
            if attempt and attempt % tries == 0:  # crowded: step down a size and retry
                size = {"large": "medium", "medium": "small"}.get(size, size)
            r = SIZES[size]
            x, y = rng.uniform(r + 0.02, 1 - r - 0.02), rng.uniform(r + 0.02, 1 - r - 0.02)
            if all(math.hypot(x - o.x, y - o.y) > r + o.r + margin for o in placed):
                placed.append(Obj(shape, color, size, round(x, 4), round(y, 4)))
                break
        else:
            if not optional:
                raise RuntimeError("could not place every object; lower max_objects")
    return placed


# --- fonts -----------------------------------------------------------------------------------------

# The fonts samples are drawn in (Debian packages fonts-dejavu-core, fonts-dejavu-extra, fonts-liberation).
# Skills pick from this fixed list, never from what happens to be installed, so the random stream (and so
# every question and answer) is the same on every machine; a missing font is replaced by the first one
# found, which changes only that text's pixels.
FONT_FILES: tuple[str, ...] = (
    "DejaVuSans.ttf", "DejaVuSans-Bold.ttf", "DejaVuSerif.ttf", "DejaVuSerif-Bold.ttf",
    "DejaVuSansMono.ttf", "DejaVuSansMono-Bold.ttf", "DejaVuSans-Oblique.ttf", "DejaVuSerif-Italic.ttf",
    "DejaVuSansCondensed.ttf", "DejaVuSerifCondensed-Bold.ttf",
    "LiberationSans-Regular.ttf", "LiberationSerif-Regular.ttf", "LiberationMono-Regular.ttf",
)
MONO_FONT_FILES: tuple[str, ...] = ("DejaVuSansMono.ttf", "DejaVuSansMono-Bold.ttf",
                                    "LiberationMono-Regular.ttf")
FONT_DIRS: tuple[str, ...] = ("/usr/share/fonts", "/usr/local/share/fonts", "/Library/Fonts",
                              "/System/Library/Fonts", "C:/Windows/Fonts", "~/.fonts", "~/.local/share/fonts")


@lru_cache(maxsize=1)
def available_fonts() -> tuple[Path, ...]:
    """The preferred fonts found on this machine, in FONT_FILES order."""
    found: dict[str, Path] = {}
    for d in FONT_DIRS:
        root = Path(d).expanduser()
        if root.is_dir():
            for path in sorted(root.rglob("*.ttf")):
                found.setdefault(path.name, path)
    fonts = tuple(found[name] for name in FONT_FILES if name in found)
    if not fonts:
        raise MissingDependencyError(
            "no TrueType fonts found for rendering text (looked for DejaVu, Liberation, FreeFont in "
            f"{', '.join(FONT_DIRS)}). Install one, e.g. `apt-get install fonts-dejavu-core` "
            "or `brew install --cask font-dejavu`.")
    return fonts


def pick_font(rng: random.Random, mono: bool = False) -> Path:
    """A font file chosen from the fixed list (see FONT_FILES), or its stand-in when not installed."""
    name = rng.choice(MONO_FONT_FILES if mono else FONT_FILES)
    fonts = available_fonts()
    return next((p for p in fonts if p.name == name), fonts[0])


@lru_cache(maxsize=256)
def font(path: Path, size: int) -> ImageFont.FreeTypeFont:
    return ImageFont.truetype(str(path), size)


def ui_font(size: int, bold: bool = False) -> ImageFont.FreeTypeFont:
    """The plain sans font used for charts, forms and the preview sheet."""
    fonts = available_fonts()
    wanted = "DejaVuSans-Bold.ttf" if bold else "DejaVuSans.ttf"
    for path in fonts:
        if path.name == wanted:
            return font(path, size)
    return font(fonts[0], size)


def text_size(f: ImageFont.FreeTypeFont, text: str) -> tuple[int, int]:
    left, top, right, bottom = f.getbbox(text)
    return right - left, bottom - top


# --- encoding --------------------------------------------------------------------------------------

def png_bytes(image: Image.Image) -> bytes:
    """PNG with no metadata chunks (no time, no text), so equal pixels give equal bytes."""
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", compress_level=6)
    return buffer.getvalue()
