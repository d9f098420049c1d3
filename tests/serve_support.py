"""Helpers for the server tests: a tiny model whose answers depend on the prompt, a server on a free
loopback port in a background thread, and small media files made on the fly."""

from __future__ import annotations

import base64
import contextlib
import io
import math
import socket
import threading
import time
from collections.abc import Iterator

import numpy as np
import soundfile as sf
import torch
import uvicorn
from PIL import Image

from tinyomni.api import Model, tiny_random_model
from tinyomni.serve.server import ServerOptions, create_app


def varied_tiny_model(seed: int = 0) -> Model:
    """`tiny_random_model` with its decoder re-drawn at a larger scale.

    The stock tiny model's embeddings (std 1, tied to the LM head) make every prompt end in the same
    token run ("\\n\\n\\n..."), so mixed-up answers between requests would go unnoticed. Weights of
    std 0.2 give each prompt its own answer, which is what batching tests need to compare.
    """
    model = tiny_random_model(seed)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, p in sorted(model.model.language_model.named_parameters()):
            if p.dim() == 2:
                p.copy_(torch.randn(p.shape, generator=generator) * 0.2)
    return model


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def running_server(model: Model, options: ServerOptions | None = None) -> Iterator[str]:
    """Serve `model` with uvicorn on 127.0.0.1 in a thread; yields the base URL, stops on exit."""
    app = create_app(model, options or ServerOptions())
    port = free_port()
    config = uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning", lifespan="on")
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        if time.monotonic() > deadline or not thread.is_alive():
            raise RuntimeError("the test server did not start")
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=30)


def png_bytes(color: tuple[int, int, int] = (200, 30, 30), size: tuple[int, int] = (64, 48)) -> bytes:
    image = Image.new("RGB", size, color)
    for x in range(0, size[0], 8):  # a little structure, so two images differ beyond their colour
        image.putpixel((x, x % size[1]), (255, 255, 255))
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def data_url(data: bytes, mime: str = "image/png") -> str:
    return f"data:{mime};base64,{base64.b64encode(data).decode()}"


def wav_bytes(seconds: float = 0.5, freq: float = 440.0, rate: int = 16000) -> bytes:
    t = np.arange(int(seconds * rate)) / rate
    samples = (0.3 * np.sin(2 * math.pi * freq * t)).astype(np.float32)
    buffer = io.BytesIO()
    sf.write(buffer, samples, rate, format="WAV", subtype="PCM_16")
    return buffer.getvalue()


def encoded_audio(fmt: str, seconds: float = 0.6, rate: int = 16000) -> bytes:
    """A tone as an mp3 / webm (opus) / flac / wav file, encoded with PyAV or soundfile."""
    t = np.arange(int(seconds * rate)) / rate
    samples = (0.3 * np.sin(2 * math.pi * 330 * t)).astype(np.float32)
    if fmt in ("wav", "flac"):
        buffer = io.BytesIO()
        sf.write(buffer, samples, rate, format=fmt.upper())
        return buffer.getvalue()
    import av

    codec = {"mp3": "libmp3lame", "webm": "libopus"}[fmt]
    buffer = io.BytesIO()
    with av.open(buffer, mode="w", format=fmt) as container:
        stream = container.add_stream(codec, rate=rate)
        stream.layout = "mono"
        frame = av.AudioFrame.from_ndarray(samples[None], format="flt", layout="mono")
        frame.sample_rate = rate
        for packet in [*stream.encode(frame), *stream.encode(None)]:
            container.mux(packet)
    return buffer.getvalue()


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


@contextlib.contextmanager
def torch_threads(n: int) -> Iterator[None]:
    """The tiny model's matrices are too small to gain from threads, and on a shared 2-core machine
    a second thread only adds waiting: tests run it single-threaded, then restore the setting."""
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)
