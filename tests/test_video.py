"""Video input: InternVL's frame sampling, GIF / MP4 / WebM / frame-list decoding in order, the
"FrameN:" prompt prefixes, and errors for unreadable clips."""

from __future__ import annotations

import base64
import io
from itertools import product
from pathlib import Path

import av
import numpy as np
import pytest
import torch
from PIL import Image

from tinyomni.errors import InputError
from tinyomni.processing.image import image_to_tensor
from tinyomni.processing.video import (
    load_video_frames,
    preprocess_video,
    sample_frame_indices,
    video_prompt,
    video_prompt_prefixes,
)


# --- InternVL's published code, verbatim (model cards, "video multi-round conversation") --------
def get_index(bound, fps, max_frame, first_idx=0, num_segments=32):
    if bound:
        start, end = bound[0], bound[1]
    else:
        start, end = -100000, 100000
    start_idx = max(first_idx, round(start * fps))
    end_idx = min(round(end * fps), max_frame)
    seg_size = float(end_idx - start_idx) / num_segments
    frame_indices = np.array([
        int(start_idx + (seg_size / 2) + np.round(seg_size * idx))
        for idx in range(num_segments)
    ])
    return frame_indices


# 27 colours far apart (every channel 0, 128 or 255), so a lossy codec cannot blur one into another.
COLOURS = [tuple(c) for c in product((0, 128, 255), repeat=3)]


def nearest_colour(image: Image.Image) -> int:
    mean = np.asarray(image, dtype=np.float64).reshape(-1, 3).mean(axis=0)
    return int(np.argmin([np.sum((mean - np.array(c)) ** 2) for c in COLOURS]))


def expected_indices(total: int, num_frames: int) -> list[int]:
    if total <= num_frames:  # a short clip is taken whole
        return list(range(total))
    return get_index(None, 30.0, total - 1, 0, num_frames).tolist()


def write_video(path_or_buf, n: int, codec: str = "mpeg4", fmt: str | None = None, size: int = 32) -> None:
    with av.open(path_or_buf, "w", format=fmt) as container:
        stream = container.add_stream(codec, rate=10)
        stream.width = stream.height = size
        stream.pix_fmt = "yuv420p"
        if codec == "mpeg4":
            stream.options = {"qscale": "2"}
        for k in range(n):
            pixels = np.full((size, size, 3), COLOURS[k], dtype=np.uint8)
            frame = av.VideoFrame.from_ndarray(pixels, format="rgb24")
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)


# --- sampling ----------------------------------------------------------------------------------
def test_sampling_matches_internvl_get_index():
    for num_total in (1, 2, 7, 8, 9, 10, 31, 100, 301, 1000, 4097):
        for num_frames in (1, 2, 4, 8, 16, 32):
            assert sample_frame_indices(num_total, num_frames) == \
                get_index(None, 25.0, num_total - 1, 0, num_frames).tolist()
            assert sample_frame_indices(num_total, num_frames, fps=25.0) == \
                get_index(None, 25.0, num_total - 1, 0, num_frames).tolist()


def test_sampling_with_time_bound_matches_internvl():
    for num_total, fps, bound, num_frames in [
        (300, 30.0, (1.0, 5.0), 8), (300, 29.97, (0.5, 9.9), 16), (1000, 24.0, (10.0, 100.0), 8),
        (250, 25.0, (0.0, 3.3), 4), (90, 30.0, (2.0, 2.5), 8),
    ]:
        assert sample_frame_indices(num_total, num_frames, fps, bound) == \
            get_index(bound, fps, num_total - 1, 0, num_frames).tolist()


def test_sampling_indices_are_in_range_and_ordered():
    for num_total in range(1, 60):
        indices = sample_frame_indices(num_total, 8)
        assert indices == sorted(indices) and 0 <= indices[0] and indices[-1] < num_total
        if num_total > 8:
            assert len(set(indices)) == 8  # a longer clip never repeats a frame


def test_sampling_errors():
    with pytest.raises(InputError, match="no frames"):
        sample_frame_indices(0, 8)
    with pytest.raises(InputError, match="fps"):
        sample_frame_indices(100, 8, bound=(0.0, 1.0))
    with pytest.raises(InputError, match="after the video ends"):
        sample_frame_indices(100, 8, fps=10.0, bound=(50.0, 60.0))


# --- prompts -----------------------------------------------------------------------------------
def test_prompt_prefixes_match_internvl():
    for n in (1, 3, 8):
        reference = ''.join([f'Frame{i+1}: <image>\n' for i in range(n)])
        assert video_prompt(n) == reference
        assert "".join(p + "<image>\n" for p in video_prompt_prefixes(n)) == reference
    assert video_prompt_prefixes(2) == ["Frame1: ", "Frame2: "]


# --- decoding ----------------------------------------------------------------------------------
def gif_bytes(n: int) -> bytes:
    frames = [Image.new("RGB", (16, 16), COLOURS[k]) for k in range(n)]
    buf = io.BytesIO()
    frames[0].save(buf, "GIF", save_all=True, append_images=frames[1:], duration=100)
    return buf.getvalue()


@pytest.mark.parametrize("n,num_frames", [(20, 4), (5, 8), (9, 8)])
def test_gif_frames_in_order(n, num_frames):
    frames = load_video_frames(gif_bytes(n), num_frames)
    assert all(f.mode == "RGB" for f in frames)
    assert [nearest_colour(f) for f in frames] == expected_indices(n, num_frames)


def test_gif_transparency_is_composited_on_white():
    palette = [0, 0, 0, 255, 0, 0, 0, 0, 255] + [0] * 759
    first = Image.new("P", (8, 8), 0)  # index 0 is transparent
    first.putpalette(palette)
    first.paste(1, (0, 0, 4, 8))
    second = Image.new("P", (8, 8), 2)
    second.putpalette(palette)
    buf = io.BytesIO()
    first.save(buf, "GIF", save_all=True, append_images=[second], transparency=0, disposal=2)
    frames = load_video_frames(buf.getvalue())
    assert [f.getpixel((1, 1)) for f in frames] == [(255, 0, 0), (0, 0, 255)]
    assert frames[0].getpixel((6, 6)) == (255, 255, 255)


def test_animated_pil_image():
    image = Image.open(io.BytesIO(gif_bytes(12)))
    frames = load_video_frames(image, 4)
    assert [nearest_colour(f) for f in frames] == expected_indices(12, 4)
    assert image.tell() == 0


def test_mp4_frames_in_order(tmp_path: Path):
    path = tmp_path / "clip.mp4"
    write_video(str(path), 24)
    with av.open(str(path)) as container:
        assert container.streams.video[0].codec_context.name == "mpeg4"
    frames = load_video_frames(path, 8)
    assert len(frames) == 8 and all(f.size == (32, 32) and f.mode == "RGB" for f in frames)
    assert [nearest_colour(f) for f in frames] == expected_indices(24, 8)
    # The same clip as bytes, base64 and a data URL.
    data = path.read_bytes()
    b64 = base64.b64encode(data).decode()
    for source in (data, b64, f"data:video/mp4;base64,{b64}", str(path)):
        assert [nearest_colour(f) for f in load_video_frames(source, 8)] == expected_indices(24, 8)
    # A clip shorter than num_frames is taken whole.
    assert [nearest_colour(f) for f in load_video_frames(data, 64)] == list(range(24))


@pytest.mark.skipif("libvpx-vp9" not in av.codecs_available, reason="no VP9 encoder in this PyAV build")
def test_webm_without_frame_count(tmp_path: Path):
    path = tmp_path / "clip.webm"
    write_video(str(path), 12, codec="libvpx-vp9")
    frames = load_video_frames(path, 4)
    assert [nearest_colour(f) for f in frames] == expected_indices(12, 4)


def test_list_of_frames(tmp_path: Path):
    images = [Image.new("RGB", (8, 8), COLOURS[k]) for k in range(10)]
    frames = load_video_frames(images, 4)
    assert [nearest_colour(f) for f in frames] == expected_indices(10, 4)
    assert [nearest_colour(f) for f in load_video_frames(images[:3], 4)] == [0, 1, 2]
    # Mixed kinds: a path, bytes and a PIL image.
    path = tmp_path / "f0.png"
    images[0].save(path)
    buf = io.BytesIO()
    images[1].save(buf, "PNG")
    frames = load_video_frames([path, buf.getvalue(), images[2]], 8)
    assert [nearest_colour(f) for f in frames] == [0, 1, 2]


def test_preprocess_video():
    images = [Image.new("RGB", (20, 10), COLOURS[k]) for k in range(12)]
    pixels = preprocess_video(images, num_frames=4, image_size=14)
    assert pixels.shape == (4, 3, 14, 14) and pixels.dtype == torch.float32
    expected = image_to_tensor([images[i].resize((14, 14)) for i in expected_indices(12, 4)], 14)
    assert torch.equal(pixels, expected)


def test_video_errors(tmp_path: Path):
    with pytest.raises(InputError, match=r"<bytes, 4000 bytes>: not a video"):
        load_video_frames(bytes(np.random.default_rng(0).integers(0, 256, 4000, dtype=np.uint8)))
    with pytest.raises(InputError, match="empty"):
        load_video_frames([])
    with pytest.raises(InputError, match="file not found"):
        load_video_frames(str(tmp_path / "missing.mp4"))
    # A real MP4 cut off after its first bytes fails with a message naming the input.
    path = tmp_path / "clip.mp4"
    write_video(str(path), 24)
    cut = path.read_bytes()[:200]
    with pytest.raises(InputError, match=r"<bytes, 200 bytes>"):
        load_video_frames(cut)
    with pytest.raises(InputError, match="num_frames"):
        load_video_frames(path, 0)


def test_video_without_frames(tmp_path: Path):
    path = tmp_path / "empty.mp4"
    with av.open(str(path), "w") as container:
        stream = container.add_stream("mpeg4", rate=10)
        stream.width = stream.height = 32
        stream.pix_fmt = "yuv420p"
        container.start_encoding()
    with pytest.raises(InputError, match="empty.mp4: .*(no video stream|no decodable frames)"):
        load_video_frames(path)
