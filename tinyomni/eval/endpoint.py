"""A model behind any OpenAI-compatible /v1/chat/completions endpoint, with the chat protocol the
runner uses, so other servers and hosted models are scored on the same tasks.

Images go as data URLs (`image_url`), audio as `input_audio` (base64 WAV), and a video as its frames,
each an image preceded by "Frame-k:" text (the API has no video part). Only the standard library
talks HTTP here; requests in a batch run in a few threads. `tinyomni distill` (train/distill.py)
asks its teacher through the same client.
"""

from __future__ import annotations

import base64
import http.client
import io
import json
import os
import random
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from tinyomni.errors import InputError, TinyOmniError


class EndpointError(TinyOmniError, RuntimeError):
    """The endpoint answered with an error (`status`: its HTTP code), or not at all (`status` None)."""

    def __init__(self, message: str, status: int | None = None) -> None:
        super().__init__(message)
        self.status = status


# Overloaded, rate-limited or restarting: worth another try after a pause.
RETRY_STATUSES = (408, 429, 500, 502, 503, 504)


def chat_completions_url(url: str) -> str:
    """Accept a base ("http://host:8000"), a /v1 base, or the full chat/completions URL."""
    url = url.rstrip("/")
    if url.endswith("/chat/completions"):
        return url
    if url.endswith("/v1"):
        return url + "/chat/completions"
    return url + "/v1/chat/completions"


class EndpointModel:
    """`chat` / `chat_batch` over HTTP. `api_key` defaults to $TINYOMNI_API_KEY or $OPENAI_API_KEY; it
    goes only into the Authorization header, never into an error message.

    Busy answers (429, 5xx) and timeouts or dropped connections are retried `retries` times, after
    `backoff`·2^attempt seconds (capped at `max_backoff`, jittered so parallel requests spread out;
    a server's Retry-After wins when it asks for longer)."""

    def __init__(self, url: str, model: str, api_key: str | None = None, timeout: float = 120.0,
                 concurrency: int = 4, retries: int = 2, video_frames: int = 8, backoff: float = 0.5,
                 max_backoff: float = 30.0):
        self.url = chat_completions_url(url)
        self.model = model
        self.api_key = api_key or os.environ.get("TINYOMNI_API_KEY") or os.environ.get("OPENAI_API_KEY")
        self.timeout, self.concurrency, self.retries = timeout, concurrency, retries
        self.video_frames = video_frames
        self.backoff, self.max_backoff = backoff, max_backoff

    def __repr__(self) -> str:  # never the key
        return f"EndpointModel({self.url!r}, model={self.model!r})"

    def chat(self, messages: list[dict[str, Any]], max_new_tokens: int = 64, temperature: float = 0.0) -> str:
        converted = [to_openai_message(m, self.video_frames) for m in messages]
        payload = {"model": self.model, "messages": converted,
                   "max_tokens": max_new_tokens, "temperature": temperature}
        response = self._post(payload)
        try:
            content = response["choices"][0]["message"]["content"]
        except (KeyError, IndexError, TypeError):
            raise EndpointError(f"unexpected response from {self.url}: {str(response)[:300]}") from None
        if isinstance(content, list):  # some servers answer with content parts
            content = "".join(p.get("text", "") for p in content if isinstance(p, dict))
        return content or ""

    def chat_batch(self, batch: list[list[dict[str, Any]]], max_new_tokens: int = 64,
                   temperature: float = 0.0) -> list[str]:
        if len(batch) <= 1 or self.concurrency <= 1:
            return [self.chat(m, max_new_tokens, temperature) for m in batch]
        with ThreadPoolExecutor(max_workers=min(self.concurrency, len(batch))) as pool:
            return list(pool.map(lambda m: self.chat(m, max_new_tokens, temperature), batch))

    def _post(self, payload: dict[str, Any]) -> dict[str, Any]:
        data = json.dumps(payload).encode()
        headers = {"Content-Type": "application/json"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        for attempt in range(self.retries + 1):
            last = attempt == self.retries
            request = urllib.request.Request(self.url, data=data, headers=headers, method="POST")
            try:
                with urllib.request.urlopen(request, timeout=self.timeout) as r:
                    return json.loads(r.read())
            except urllib.error.HTTPError as e:
                body = e.read().decode(errors="replace")[:500]
                if e.code in RETRY_STATUSES and not last:
                    self._pause(attempt, e.headers.get("Retry-After"))
                    continue
                raise EndpointError(f"{self.url} answered HTTP {e.code}: {body}", status=e.code) from None
            except (urllib.error.URLError, TimeoutError, ConnectionError, http.client.HTTPException) as e:
                if not last:
                    self._pause(attempt, None)
                    continue
                reason = getattr(e, "reason", e)
                raise EndpointError(f"cannot reach {self.url} (after {attempt + 1} tries): {reason}") from None
            except (json.JSONDecodeError, UnicodeDecodeError):
                raise EndpointError(f"{self.url} did not answer with JSON", status=200) from None
        raise EndpointError(f"no answer from {self.url}")  # not reached: the loop returns or raises

    def _pause(self, attempt: int, retry_after: str | None) -> None:
        delay = min(self.max_backoff, self.backoff * 2**attempt) * random.uniform(0.5, 1.0)
        try:
            delay = max(delay, min(self.max_backoff, float(retry_after))) if retry_after else delay
        except ValueError:  # an HTTP date: keep our own delay
            pass
        time.sleep(delay)


# --- message conversion ----------------------------------------------------------------------------

def to_openai_message(message: dict[str, Any], video_frames: int = 8) -> dict[str, Any]:
    """tinyomni content parts -> OpenAI ones (text, image_url, input_audio)."""
    content = message["content"]
    if isinstance(content, str):
        return {"role": message["role"], "content": content}
    parts: list[dict[str, Any]] = []
    for part in content:
        kind = part.get("type")
        if kind == "text":
            parts.append({"type": "text", "text": part["text"]})
        elif kind == "image":
            image = part["image"]
            remote = isinstance(image, str) and image.startswith(("data:", "http://", "https://"))
            parts.append({"type": "image_url", "image_url": {"url": image}} if remote else image_part(image))
        elif kind == "image_url":
            url = part["image_url"]["url"] if isinstance(part["image_url"], dict) else part["image_url"]
            parts.append(image_part(url) if not url.startswith(("data:", "http://", "https://")) else
                         {"type": "image_url", "image_url": {"url": url}})
        elif kind == "video":
            for k, frame in enumerate(_frames(part["video"], video_frames), 1):
                parts.append({"type": "text", "text": f"Frame-{k}:"})
                parts.append(image_part(frame))
        elif kind == "audio":
            audio = {"data": _wav_base64(part["audio"]), "format": "wav"}
            parts.append({"type": "input_audio", "input_audio": audio})
        elif kind == "input_audio":
            parts.append({"type": "input_audio", "input_audio": dict(part["input_audio"])})
        else:
            raise InputError(f"unknown content part type {kind!r}")
    return {"role": message["role"], "content": parts}


def image_part(source: Any) -> dict[str, Any]:
    """An image (path, PIL image or encoded bytes) as a data-URL image_url part; files keep their bytes."""
    if isinstance(source, Image.Image):
        buffer = io.BytesIO()
        source.convert("RGB").save(buffer, format="PNG")
        data, mime = buffer.getvalue(), "image/png"
    else:
        data = _read(source)
        mime = ("image/jpeg" if data[:2] == b"\xff\xd8" else "image/webp" if data[8:12] == b"WEBP" else
                "image/gif" if data[:3] == b"GIF" else "image/png")
    return {"type": "image_url",
            "image_url": {"url": f"data:{mime};base64,{base64.b64encode(data).decode()}"}}


def _read(source: Any) -> bytes:
    if isinstance(source, (bytes, bytearray, memoryview)):
        return bytes(source)
    path = Path(source)
    if not path.is_file():
        raise InputError(f"media file not found: {path}")
    return path.read_bytes()


def _wav_base64(source: Any) -> str:
    """Audio as base64 WAV: WAV files and bytes go as they are; other formats are decoded and re-encoded."""
    import soundfile

    from tinyomni.world.speech import to_int16, wav_bytes

    if isinstance(source, np.ndarray):
        raise InputError("pass audio to an endpoint as a file path or WAV bytes, not a bare array (no rate)")
    data = _read(source)
    if data[:4] != b"RIFF":
        samples, rate = soundfile.read(io.BytesIO(data), dtype="float32", always_2d=True)
        data = wav_bytes(to_int16(samples.mean(axis=1)), rate)
    return base64.b64encode(data).decode()


def _frames(video: Any, n: int) -> list[Any]:
    """A list of frames as given, or `n` frames sampled evenly from a video file."""
    if isinstance(video, (list, tuple)):
        return list(video)
    from tinyomni.processing.video import load_video_frames  # the same sampling the local model uses

    return load_video_frames(video, num_frames=n)
