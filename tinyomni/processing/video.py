"""Video input: sample a few frames from a clip, a GIF or a list of images, one tile per frame.

Frame choice follows InternVL's `get_index` (the middle of equal segments), and the prompt numbers
frames the way InternVL's chat code does ("Frame1: <image>\\n..."), so imported InternVL checkpoints
see videos as they did in training. Containers and codecs are read with PyAV; animated images with
Pillow, which applies their frame disposal and transparency rules.
"""

from __future__ import annotations

import io
from collections.abc import Sequence

import av
import numpy as np
import torch
from PIL import Image

from tinyomni.errors import InputError
from tinyomni.processing.image import (
    DEFAULT_MAX_PIXELS,
    DEFAULT_MEAN,
    DEFAULT_STD,
    ImageSource,
    ResolvedSource,
    describe_image,
    dynamic_preprocess,
    image_to_tensor,
    load_image,
    resolve_source,
    to_rgb,
)

VideoSource = ImageSource | Sequence[ImageSource]


def sample_frame_indices(num_total: int, num_frames: int, fps: float | None = None,
                         bound: tuple[float, float] | None = None) -> list[int]:
    """Indices of `num_frames` frames at the middles of equal segments of a `num_total`-frame clip.

    InternVL's `get_index`: `bound` is an optional (start, end) in seconds and needs `fps`. Without
    a bound the whole clip is used. When num_frames > num_total some indices repeat, as in InternVL.
    """
    if num_total < 1:
        raise InputError("the video has no frames")
    if num_frames < 1:
        raise InputError(f"num_frames must be >= 1, got {num_frames}")
    max_frame = num_total - 1
    if bound is None:
        # The reference uses a ±100000 s bound here; that only differs for clips over a day long.
        start_idx, end_idx = 0, max_frame
    else:
        if fps is None or fps <= 0:
            raise InputError("a time bound needs the video's frame rate (fps > 0)")
        start, end = bound
        if end < start:
            raise InputError(f"time bound ends before it starts: {bound}")
        start_idx = max(0, round(start * fps))
        end_idx = min(round(end * fps), max_frame)
        if start_idx > max_frame:
            raise InputError(f"time bound starts at {start} s, after the video ends "
                             f"({num_total} frames at {fps:g} fps)")
        end_idx = max(end_idx, start_idx)
    seg_size = float(end_idx - start_idx) / num_frames
    return [int(start_idx + (seg_size / 2) + np.round(seg_size * idx)) for idx in range(num_frames)]


def _pick(num_total: int, num_frames: int) -> list[int]:
    # A short clip is taken whole: repeating frames would spend tokens and misstate its pace.
    if num_frames < 1:
        raise InputError(f"num_frames must be >= 1, got {num_frames}")
    if num_total <= num_frames:
        return list(range(num_total))
    return sample_frame_indices(num_total, num_frames)


# The most frames a video may have (10 minutes at 30 fps): every frame is decoded to count and pick
# them, so the cost of a longer clip is refused from its header, or once decoding passes it.
MAX_VIDEO_FRAMES = 18_000


def load_video_frames(source: VideoSource, num_frames: int = 8,
                      max_pixels: int | None = DEFAULT_MAX_PIXELS) -> list[Image.Image]:
    """Up to `num_frames` RGB frames from a video, an animated image or a list of images, in order.

    `source`: a list of anything `load_image` takes; a PIL image (all its frames if animated); or a
    path, bytes, base64 string or data URL holding a GIF/APNG/WebP or any video PyAV can decode.
    """
    if isinstance(source, (list, tuple)):
        if not source:
            raise InputError("the list of video frames is empty")
        return [load_image(source[i], max_pixels=max_pixels) for i in _pick(len(source), num_frames)]
    if isinstance(source, Image.Image):
        return _pillow_frames(source, describe_image(source), num_frames, max_pixels)

    resolved = resolve_source(source)
    # Pillow first: it knows GIF/APNG/WebP disposal and transparency; anything it cannot read as an
    # image is handed to FFmpeg.
    try:
        with resolved.open() as fp:
            image = Image.open(fp)
            image.load()
            return _pillow_frames(image, resolved.name, num_frames, max_pixels)
    except InputError:
        raise
    except Image.DecompressionBombError as e:
        raise InputError(f"{resolved.name}: refused as a possible decompression bomb ({e})") from None
    except Exception:
        pass
    return _pyav_frames(resolved, num_frames, max_pixels)


def _pillow_frames(image: Image.Image, name: str, num_frames: int,
                   max_pixels: int | None) -> list[Image.Image]:
    width, height = image.size
    if width <= 0 or height <= 0:
        raise InputError(f"{name}: the image is empty ({width}x{height} pixels)")
    if max_pixels is not None and width * height > max_pixels:
        raise InputError(f"{name}: frames are too large ({width}x{height}; "
                         f"the limit is max_pixels={max_pixels:,})")
    total = getattr(image, "n_frames", 1)
    if total > MAX_VIDEO_FRAMES:
        raise InputError(f"{name}: the animation has {total:,} frames; at most {MAX_VIDEO_FRAMES:,} are accepted")
    try:
        frames = []
        for index in _pick(total, num_frames):
            image.seek(index)
            frames.append(to_rgb(image.copy()))
        image.seek(0)  # leave a caller's PIL image where it was
    except InputError:
        raise
    except Exception as e:
        raise InputError(f"{name}: the animation is corrupt or truncated ({type(e).__name__}: {e})") from None
    return frames


def _open_container(resolved: ResolvedSource) -> av.container.InputContainer:
    target = str(resolved.path) if resolved.path is not None else io.BytesIO(resolved.data or b"")
    try:
        return av.open(target, mode="r")
    except av.EOFError:
        raise InputError(f"{resolved.name}: the file ends before any video data (truncated?)") from None
    except (av.FFmpegError, OSError, ValueError) as e:
        raise InputError(f"{resolved.name}: not a video or image that can be decoded ({e})") from None


def _decode(resolved: ResolvedSource, wanted: set[int],
            max_pixels: int | None) -> tuple[int, dict[int, Image.Image]]:
    """Decode every frame once, keeping the wanted ones; returns (frames decoded, kept frames)."""
    picked: dict[int, Image.Image] = {}
    count = 0
    with _open_container(resolved) as container:
        if not container.streams.video:
            raise InputError(f"{resolved.name}: has no video stream")
        stream = container.streams.video[0]
        try:
            for frame in container.decode(stream):
                if count >= MAX_VIDEO_FRAMES:
                    raise InputError(f"{resolved.name}: the video has more than {MAX_VIDEO_FRAMES:,} frames; "
                                     "cut it shorter")
                if max_pixels is not None and frame.width * frame.height > max_pixels:
                    raise InputError(f"{resolved.name}: frames are too large ({frame.width}x{frame.height}; "
                                     f"the limit is max_pixels={max_pixels:,})")
                if count in wanted:
                    picked[count] = frame.to_image().convert("RGB")
                count += 1
        except (av.FFmpegError, OSError, ValueError) as e:
            raise InputError(f"{resolved.name}: the video data is corrupt ({e})") from None
    return count, picked


def _frame_count_hint(resolved: ResolvedSource) -> int:
    with _open_container(resolved) as container:
        if not container.streams.video:
            raise InputError(f"{resolved.name}: has no video stream")
        hint = max(0, int(container.streams.video[0].frames or 0))
    if hint > MAX_VIDEO_FRAMES:  # from the header: refused before any frame is decoded
        raise InputError(f"{resolved.name}: the video has {hint:,} frames; at most {MAX_VIDEO_FRAMES:,} "
                         "are accepted; cut it shorter")
    return hint


def _pyav_frames(resolved: ResolvedSource, num_frames: int, max_pixels: int | None) -> list[Image.Image]:
    # The container's frame count is usually right, so one decoding pass both counts and picks; when
    # it is missing (WebM) or wrong, a second pass picks again with the count just measured.
    hint = _frame_count_hint(resolved)
    if hint > 0:
        total, picked = _decode(resolved, set(_pick(hint, num_frames)), max_pixels)
        if total == hint:
            return [picked[i] for i in _pick(total, num_frames)]
    else:
        total, _ = _decode(resolved, set(), max_pixels)
    if total == 0:
        raise InputError(f"{resolved.name}: the video has no decodable frames")
    indices = _pick(total, num_frames)
    _, picked = _decode(resolved, set(indices), max_pixels)
    return [picked[i] for i in indices]


def video_prompt_prefixes(n: int) -> list[str]:
    """InternVL's per-frame labels: "Frame1: ", "Frame2: ", ... (each is followed by the frame's image
    placeholder and a newline)."""
    return [f"Frame{i + 1}: " for i in range(n)]


def video_prompt(n: int, image_placeholder: str = "<image>") -> str:
    """The text InternVL puts before a video question: "Frame1: <image>\\nFrame2: <image>\\n..."."""
    return "".join(f"{prefix}{image_placeholder}\n" for prefix in video_prompt_prefixes(n))


def preprocess_video(source: VideoSource, num_frames: int = 8, image_size: int = 448,
                     mean: Sequence[float] = DEFAULT_MEAN, std: Sequence[float] = DEFAULT_STD,
                     max_pixels: int | None = DEFAULT_MAX_PIXELS) -> torch.Tensor:
    """Sample frames and make one tile each: float32 [frames, 3, image_size, image_size]."""
    frames = load_video_frames(source, num_frames, max_pixels=max_pixels)
    # InternVL runs each frame through dynamic_preprocess with max_num=1: a plain resize to S×S.
    tiles = [dynamic_preprocess(frame, 1, 1, image_size)[0] for frame in frames]
    return image_to_tensor(tiles, image_size, mean, std)
