"""A contact sheet of world samples for a person to look at: PNG (media + Q/A) or HTML (with audio).

Each cell shows a sample's media (an image; several side by side; video frames in a grid; a waveform
for audio) and below it the skill, the question, what was spoken, the options and the answer.
"""

from __future__ import annotations

import base64
import html
import io
import textwrap
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from tinyomni.errors import InputError
from tinyomni.eval.tasks import LETTERS
from tinyomni.world.render import png_bytes, text_size, ui_font
from tinyomni.world.sample import Sample
from tinyomni.world.speech import wav_bytes

CELL = 210  # media area side, pixels
TEXT_H = 128  # text area below the media
PAD = 8


def contact_sheet(samples: list[Sample], columns: int = 4, predictions: list[tuple[str, bool]] | None = None,
                  ) -> Image.Image:
    """One PNG-ready image with a cell per sample; with `predictions` ((answer, correct) per sample),
    each cell also shows what a model said, green when right and red when wrong."""
    rows = max(1, -(-len(samples) // columns))
    width, height = CELL + 2 * PAD, CELL + TEXT_H + 2 * PAD
    sheet = Image.new("RGB", (columns * width, rows * height), (255, 255, 255))
    draw = ImageDraw.Draw(sheet)
    for k, sample in enumerate(samples):
        x, y = (k % columns) * width + PAD, (k // columns) * height + PAD
        sheet.paste(media_thumbnail(sample), (x, y))
        draw.rectangle([x - 1, y - 1, x + CELL, y + CELL], outline=(200, 200, 200))
        _caption(draw, sample, x, y + CELL + 4, CELL, predictions[k] if predictions else None)
    return sheet


def media_thumbnail(sample: Sample, side: int = CELL) -> Image.Image:
    canvas = Image.new("RGB", (side, side), (245, 245, 245))
    draw = ImageDraw.Draw(canvas)
    small = ui_font(10, bold=True)
    wave_h = side // 4 if sample.audio is not None else 0
    area = side - wave_h
    if sample.video is not None:
        frames = sample.video
        cols = int(np.ceil(np.sqrt(len(frames))))
        rows = int(np.ceil(len(frames) / cols))
        tile = min(side // cols, area // rows)
        for i, frame in enumerate(frames):
            fx, fy = (i % cols) * tile, (i // cols) * tile
            canvas.paste(frame.resize((tile - 2, tile - 2), Image.Resampling.LANCZOS), (fx + 1, fy + 1))
            draw.text((fx + 3, fy + 2), str(i + 1), fill=(200, 0, 0), font=small)
    elif sample.images:
        k = len(sample.images)
        tile = min(side // k, area)
        top = (area - tile) // 2
        for i, image in enumerate(sample.images):
            thumb = image.copy()
            thumb.thumbnail((tile - 2, tile - 2), Image.Resampling.LANCZOS)
            canvas.paste(thumb, (i * tile + 1, top + 1))
            if k > 1:
                draw.text((i * tile + 4, top + 3), f"image {i + 1}", fill=(200, 0, 0), font=small)
    if sample.audio is not None:
        _waveform(draw, sample.audio, 0, area if sample.images or sample.video is not None else 0,
                  side, wave_h if sample.images or sample.video is not None else side)
    return canvas


def _waveform(draw: ImageDraw.ImageDraw, audio: np.ndarray, x: int, y: int, w: int, h: int) -> None:
    draw.rectangle([x, y, x + w - 1, y + h - 1], fill=(232, 240, 252))
    samples = audio.astype(np.float32) / 32768.0
    if samples.size == 0:
        return
    chunks = np.array_split(samples, w)
    peak = max(float(np.abs(samples).max()), 1e-3)
    mid = y + h / 2
    for i, chunk in enumerate(chunks):
        a = float(np.abs(chunk).max()) / peak if chunk.size else 0.0
        draw.line([(x + i, mid - a * h * 0.45), (x + i, mid + a * h * 0.45)], fill=(40, 90, 200))
    draw.text((x + 3, y + 2), f"audio {audio.size / 16000:.1f} s", fill=(20, 20, 20), font=ui_font(10))


def _caption(draw: ImageDraw.ImageDraw, sample: Sample, x: int, y: int, width: int,
             prediction: tuple[str, bool] | None = None) -> None:
    bold, body = ui_font(11, bold=True), ui_font(10)
    draw.text((x, y), f"{sample.skill}  [{sample.split}]", fill=(30, 30, 140), font=bold)
    y += 15
    lines = _wrap(f"Q: {sample.question}", body, width)
    if "transcript" in sample.meta:
        lines += _wrap(f"(spoken: \"{sample.meta['transcript']}\")", body, width)
    if sample.choices:
        lines += _wrap("  ".join(f"{LETTERS[i]}. {c}" for i, c in enumerate(sample.choices)), body, width)
    answer = _wrap(f"A: {sample.answer}", bold, width)
    said = _wrap(f"model: {prediction[0]}", bold, width)[:2] if prediction else []
    room = (TEXT_H - 20) // 12 - len(answer) - len(said)
    if len(lines) > room:
        lines = lines[: max(room, 1)]
        lines[-1] = lines[-1][:-1] + "…"
    for line in lines:
        draw.text((x, y), line, fill=(20, 20, 20), font=body)
        y += 12
    for line in answer:
        draw.text((x, y), line, fill=(0, 120, 40), font=bold)
        y += 12
    for line in said:
        draw.text((x, y), line, fill=(0, 120, 40) if prediction[1] else (200, 30, 30), font=bold)
        y += 12


def _wrap(text: str, font, width: int) -> list[str]:
    chars = max(10, int(width / max(1, text_size(font, "abcdefghij")[0] / 10)))
    out: list[str] = []
    for paragraph in text.split("\n"):
        out += textwrap.wrap(paragraph, chars) or [""]
    return out


def write_preview(samples: list[Sample], path: str | Path, columns: int = 4,
                  predictions: list[tuple[str, bool]] | None = None) -> Path:
    """Write a PNG contact sheet, or an HTML page (playable audio) when the path ends in .html."""
    path = Path(path)
    as_page = path.suffix.lower() in (".html", ".htm")
    if as_page and predictions is not None:
        raise InputError(f"{path}: the page with predictions is a PNG; give a .png path")
    path.parent.mkdir(parents=True, exist_ok=True)
    if as_page:
        path.write_text(preview_html(samples), encoding="utf-8")
    else:
        path.write_bytes(png_bytes(contact_sheet(samples, columns, predictions)))
    return path


def preview_html(samples: list[Sample]) -> str:
    cells = []
    for s in samples:
        media = f'<img src="data:image/png;base64,{_b64png(media_thumbnail(s, 256))}" width="256">'
        if s.audio is not None:
            audio = base64.b64encode(wav_bytes(s.audio)).decode()
            media += f'<br><audio controls src="data:audio/wav;base64,{audio}"></audio>'
        extra = ""
        if "transcript" in s.meta:
            extra += f"<div><i>spoken:</i> {html.escape(s.meta['transcript'])}</div>"
        if s.choices:
            options = " &nbsp; ".join(f"{LETTERS[i]}. {html.escape(c)}" for i, c in enumerate(s.choices))
            extra += f"<div>{options}</div>"
        cells.append(
            f'<div class="cell">{media}<div class="skill">{html.escape(s.skill)} [{s.split}] '
            f'<small>{html.escape(s.id)}</small></div><div>Q: {html.escape(s.question)}</div>{extra}'
            f'<div class="a">A: {html.escape(s.answer)}</div></div>')
    style = ("body{font-family:sans-serif;margin:16px} .grid{display:flex;flex-wrap:wrap;gap:12px}"
             ".cell{width:270px;border:1px solid #ddd;padding:6px;font-size:13px}"
             ".skill{color:#228;font-weight:bold}"
             ".a{color:#072;font-weight:bold} audio{width:256px}")
    return (f"<!doctype html><html><head><meta charset='utf-8'><title>tinyomni world preview</title>"
            f"<style>{style}</style></head><body><h2>tinyomni world: {len(samples)} samples</h2>"
            f"<div class='grid'>{''.join(cells)}</div></body></html>\n")


def _b64png(image: Image.Image) -> str:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode()
