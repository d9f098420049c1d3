"""Shared fixtures: the real SmolLM2 model (loaded once per run), a tiny random omni model, media files."""

from __future__ import annotations

import os

import numpy as np
import pytest
import soundfile as sf
import torch
from PIL import Image

import tinyomni
from tinyomni import api

# Tests never write the user's load cache (~/.cache/tinyomni); the cache's own tests point it at a
# temporary directory.
os.environ["TINYOMNI_CACHE"] = "off"


@pytest.fixture(scope="session")
def smollm2() -> api.Model:
    return tinyomni.load("smollm2")


@pytest.fixture(scope="session")
def tiny() -> api.Model:
    return tinyomni.tiny_random_model(seed=0)


@pytest.fixture(scope="session")
def media(tmp_path_factory) -> dict[str, str]:
    """A small image, a wide image, a GIF clip and a 1 s wav, written once."""
    root = tmp_path_factory.mktemp("media")
    Image.new("RGB", (120, 90), (200, 30, 30)).save(root / "red.png")
    Image.new("RGB", (300, 100), (30, 30, 200)).save(root / "wide.jpg")
    frames = [Image.new("RGB", (64, 64), (40 * i, 0, 0)) for i in range(6)]
    frames[0].save(root / "clip.gif", save_all=True, append_images=frames[1:], duration=100)
    t = np.arange(16000) / 16000
    sf.write(root / "tone.wav", (0.3 * np.sin(2 * np.pi * 440 * t)).astype(np.float32), 16000)
    return {name: str(root / name) for name in ("red.png", "wide.jpg", "clip.gif", "tone.wav")}


@pytest.fixture(autouse=True)
def _deterministic():
    torch.manual_seed(0)
