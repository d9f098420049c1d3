"""Video input: sample a few frames from a clip, a GIF or a list of images, one tile per frame.

Two prompt layouts, chosen by `OmniConfig.video_prompt`, so imported checkpoints see videos as their
own processors write them:

- "frames" (InternVL, and tinyomni's own models): frames from the middles of equal segments (InternVL's
  `get_index`), each one tile, numbered "Frame1: <img>…</img>\\nFrame2: …" as InternVL's chat code and
  transformers' `InternVLProcessor.replace_video_token` write them.
- "timestamps" (SmolVLM, as `SmolVLMProcessor.replace_video_token` in transformers 5.24 writes it): an
  intro sentence with the frame count spelled out and the clip's length, then "\\nFrame from MM:SS:" and
  the frame's single-image prompt for each frame, then a blank line. A decoded clip is sampled as
  `SmolVLMVideoProcessor.sample_frames` samples it (about one frame a second, at most `video_frames`,
  a second skipped at each end of a long clip); frames given as a list or array are taken whole, their
  timestamps at `fps` frames a second (24 when not given, as transformers assumes).

Containers and codecs are read with PyAV; animated images with Pillow, which applies their frame
disposal and transparency rules. A 4-D uint8 array [frames, height, width, 3] is a clip too.
"""

from __future__ import annotations

import io
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import timedelta

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

VideoSource = ImageSource | Sequence[ImageSource] | np.ndarray
# Which frames of a clip to keep: (frames in the clip, its frame rate or None) -> indices, in order.
FramePicker = Callable[[int, "float | None"], list[int]]


@dataclass
class Clip:
    """Frames taken from a video, with what a timestamped prompt needs to know about them."""

    frames: list[Image.Image]
    indices: list[int]  # where each frame sits in the source
    total: int  # frames in the source
    fps: float | None  # the source's frame rate; None for a list or array of frames


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

    `source`: a list of anything `load_image` takes; a uint8 array [frames, height, width, 3]; a PIL
    image (all its frames if animated); or a path, bytes, base64 string or data URL holding a
    GIF/APNG/WebP or any video PyAV can decode.
    """
    return load_video(source, num_frames, max_pixels).frames


def load_video(source: VideoSource, num_frames: int = 8, max_pixels: int | None = DEFAULT_MAX_PIXELS,
               pick: FramePicker | None = None) -> Clip:
    """`load_video_frames` with where the frames came from. `pick` chooses the frames of a decoded clip
    (default: InternVL's segment middles, a short clip whole); a list or array is always taken as
    `load_video_frames` takes it (whole, or the segment middles when longer than `num_frames`)."""
    if pick is None:
        def pick(total: int, fps: float | None) -> list[int]:
            return _pick(total, num_frames)
    if isinstance(source, np.ndarray):
        source = _array_frames(source)
    if isinstance(source, (list, tuple)):
        if not source:
            raise InputError("the list of video frames is empty")
        indices = _pick(len(source), num_frames)
        return Clip([load_image(source[i], max_pixels=max_pixels) for i in indices], indices, len(source), None)
    if isinstance(source, Image.Image):
        return _pillow_frames(source, describe_image(source), pick, max_pixels)

    resolved = resolve_source(source)
    # Pillow first: it knows GIF/APNG/WebP disposal and transparency; anything it cannot read as an
    # image is handed to FFmpeg.
    try:
        with resolved.open() as fp:
            image = Image.open(fp)
            image.load()
            return _pillow_frames(image, resolved.name, pick, max_pixels)
    except InputError:
        raise
    except Image.DecompressionBombError as e:
        raise InputError(f"{resolved.name}: refused as a possible decompression bomb ({e})") from None
    except Exception:
        pass
    return _pyav_frames(resolved, pick, max_pixels)


def _array_frames(video: np.ndarray) -> list[Image.Image]:
    """A [frames, height, width, 3] uint8 array (what video decoders hand out) → one PIL image a frame."""
    if video.ndim != 4 or video.shape[-1] != 3 or video.dtype != np.uint8:
        raise InputError(f"a video array must be uint8 [frames, height, width, 3], got {video.dtype} "
                         f"{list(video.shape)}")
    return [Image.fromarray(frame) for frame in video]


def _pillow_frames(image: Image.Image, name: str, pick: FramePicker, max_pixels: int | None) -> Clip:
    width, height = image.size
    if width <= 0 or height <= 0:
        raise InputError(f"{name}: the image is empty ({width}x{height} pixels)")
    if max_pixels is not None and width * height > max_pixels:
        raise InputError(f"{name}: frames are too large ({width}x{height}; "
                         f"the limit is max_pixels={max_pixels:,})")
    total = getattr(image, "n_frames", 1)
    if total > MAX_VIDEO_FRAMES:
        raise InputError(f"{name}: the animation has {total:,} frames; at most {MAX_VIDEO_FRAMES:,} are accepted")
    duration = image.info.get("duration")  # of the first frame, in ms (GIF, APNG, WebP)
    fps = 1000 / duration if isinstance(duration, (int, float)) and duration > 0 else None
    try:
        frames = []
        indices = pick(total, fps)
        for index in indices:
            image.seek(index)
            frames.append(to_rgb(image.copy()))
        image.seek(0)  # leave a caller's PIL image where it was
    except InputError:
        raise
    except Exception as e:
        raise InputError(f"{name}: the animation is corrupt or truncated ({type(e).__name__}: {e})") from None
    return Clip(frames, indices, total, fps)


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


def _stream_info(resolved: ResolvedSource) -> tuple[int, float | None]:
    """(the frame count the container declares, 0 if none; its average frame rate, None if unknown)."""
    with _open_container(resolved) as container:
        if not container.streams.video:
            raise InputError(f"{resolved.name}: has no video stream")
        stream = container.streams.video[0]
        hint = max(0, int(stream.frames or 0))
        rate = float(stream.average_rate) if stream.average_rate else None
    if hint > MAX_VIDEO_FRAMES:  # from the header: refused before any frame is decoded
        raise InputError(f"{resolved.name}: the video has {hint:,} frames; at most {MAX_VIDEO_FRAMES:,} "
                         "are accepted; cut it shorter")
    return hint, rate


def _pyav_frames(resolved: ResolvedSource, pick: FramePicker, max_pixels: int | None) -> Clip:
    # The container's frame count is usually right, so one decoding pass both counts and picks; when
    # it is missing (WebM) or wrong, a second pass picks again with the count just measured.
    hint, fps = _stream_info(resolved)
    if hint > 0:
        indices = pick(hint, fps)
        total, picked = _decode(resolved, set(indices), max_pixels)
        if total == hint:
            return Clip([picked[i] for i in indices], indices, total, fps)
    else:
        total, _ = _decode(resolved, set(), max_pixels)
    if total == 0:
        raise InputError(f"{resolved.name}: the video has no decodable frames")
    indices = pick(total, fps)
    _, picked = _decode(resolved, set(indices), max_pixels)
    return Clip([picked[i] for i in indices], indices, total, fps)


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
    return frame_tiles(load_video_frames(source, num_frames, max_pixels=max_pixels), image_size, mean, std)


def frame_tiles(frames: list[Image.Image], image_size: int, mean: Sequence[float] = DEFAULT_MEAN,
                std: Sequence[float] = DEFAULT_STD, longest_edge: int | None = None) -> torch.Tensor:
    """One tile per frame: float32 [frames, 3, image_size, image_size]. InternVL runs each frame through
    dynamic_preprocess with max_num=1 (a plain bicubic resize to S×S); with `longest_edge` (SmolVLM) a
    frame is resized as its image processor resizes an image without splitting (Lanczos, the longer side
    to `longest_edge`, then squashed to S×S)."""
    if longest_edge is not None:
        from tinyomni.processing.smolvlm import split_image

        tiles = [split_image(frame, image_size, longest_edge, splitting=False)[0][0] for frame in frames]
    else:
        tiles = [dynamic_preprocess(frame, 1, 1, image_size)[0] for frame in frames]
    return image_to_tensor(tiles, image_size, mean, std)


# --- the "timestamps" layout (SmolVLM) ----------------------------------------------------------------
# SmolVLMProcessor's defaults: the fps it assumes for frames that come without one, and how its video
# processor samples a decoded clip (video_sampling "fps" 1; a second skipped at each end).
DEFAULT_FRAME_RATE = 24.0
SAMPLING_FPS = 1.0
SKIP_SECONDS = 1.0


def smolvlm_frame_indices(total: int, fps: float | None, max_frames: int, target_fps: float = SAMPLING_FPS,
                          skip_secs: float = SKIP_SECONDS) -> list[int]:
    """The frames `SmolVLMVideoProcessor.sample_frames` keeps of a `total`-frame clip at `fps`: about
    `target_fps` a second (at least one, at most `max_frames`), evenly from first to last frame, or from
    `skip_secs` in to `skip_secs` before the end when the clip is long enough; duplicates dropped."""
    if total < 1:
        raise InputError("the video has no frames")
    if max_frames < 1:
        raise InputError(f"num_frames must be >= 1, got {max_frames}")
    fps = fps or DEFAULT_FRAME_RATE
    duration = total / fps
    desired = max(1, min(int(round(target_fps * duration)), max_frames))
    start, end = 0, total - 1
    if skip_secs > 0 and duration - 2 * skip_secs > max_frames * target_fps:
        start, end = int(skip_secs * fps), int(total - skip_secs * fps)
    start, end = max(0, start), min(end, total - 1)
    if start >= end:
        start, end = 0, total - 1
    return np.unique(np.linspace(start, end, desired, dtype=int)).tolist()


def timestamps_prompt(clip: Clip, fps: float | None = None) -> list[str]:
    """SmolVLM's text around a clip's frames: len(frames) + 1 pieces, the k-th written before frame k and
    the last after the last frame. Timestamps are each frame's index over the frame rate (the clip's,
    else `fps`, else 24); the length is the clip's (frames over rate) when it was decoded, else the
    last frame's timestamp, as transformers takes it."""
    rate = clip.fps or fps or DEFAULT_FRAME_RATE
    seconds = [index / rate for index in clip.indices]
    length = int(clip.total / clip.fps) if clip.fps else int(seconds[-1])
    intro = (f"You are provided the following series of {spell_number(len(clip.frames))} frames from a "
             f"{timedelta(seconds=length)} [H:MM:SS] video.\n")
    stamps = [f"\nFrame from {int(s // 60):02d}:{int(s % 60):02d}:" for s in seconds]
    return [intro + stamps[0], *stamps[1:], "\n\n"]


_ONES = ("zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen fifteen "
         "sixteen seventeen eighteen nineteen").split()
_TENS = "_ _ twenty thirty forty fifty sixty seventy eighty ninety".split()


def spell_number(n: int) -> str:
    """A frame count in English words as `num2words` (which SmolVLMProcessor calls) writes it:
    "three", "twenty-one", "one hundred and five". Up to 999 (more frames than any prompt can hold)."""
    if not 0 <= n <= 999:
        raise InputError(f"a video of {n} frames is too many to describe (at most 999)")
    if n < 20:
        return _ONES[n]
    if n < 100:
        return _TENS[n // 10] + ("" if n % 10 == 0 else "-" + _ONES[n % 10])
    rest = n % 100
    return f"{_ONES[n // 100]} hundred" + ("" if rest == 0 else " and " + spell_number(rest))
