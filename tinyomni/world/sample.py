"""The two plain dataclasses of the world: a Sample (one question with its media and answer) and the
Difficulty knobs the skills read.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields, replace
from typing import Any

import numpy as np
from PIL import Image

from tinyomni.errors import InputError


@dataclass
class Difficulty:
    """Knobs for how hard samples are. Each skill reads the ones that apply to it (see `world skills`)."""

    image_size: int = 224  # side of every still image, in pixels
    min_objects: int = 2  # objects per scene (scene, multi-image and video skills)
    max_objects: int = 5
    text_length: int = 2  # words per OCR / spoken phrase; number length grows with it too
    rotation: float = 10.0  # OCR text is rotated by up to this many degrees either way
    noise: float = 0.0  # 0 clean .. 1 heavy: pixel noise, background clutter, audio hiss
    max_bars: int = 5  # bars per chart; items per receipt grow with text_length
    frames: int = 6  # frames per video clip
    frame_size: int = 160  # side of each video frame, in pixels

    def validate(self) -> None:
        _check(32 <= self.image_size <= 1024, "image_size must be in 32..1024")
        _check(32 <= self.frame_size <= 1024, "frame_size must be in 32..1024")
        _check(1 <= self.min_objects <= self.max_objects <= 8, "need 1 <= min_objects <= max_objects <= 8")
        _check(1 <= self.text_length <= 8, "text_length must be in 1..8")
        _check(0.0 <= self.rotation <= 45.0, "rotation must be in 0..45 degrees")
        _check(0.0 <= self.noise <= 1.0, "noise must be in 0..1")
        _check(3 <= self.max_bars <= 8, "max_bars must be in 3..8")
        _check(3 <= self.frames <= 16, "frames must be in 3..16")

    def with_overrides(self, overrides: dict[str, Any]) -> Difficulty:
        """A copy with some knobs changed; unknown names are an error, not silently ignored."""
        names = {f.name for f in fields(self)}
        unknown = sorted(set(overrides) - names)
        if unknown:
            raise InputError(f"unknown difficulty knob(s): {', '.join(unknown)}; "
                             f"known: {', '.join(sorted(names))}")
        typed = {k: type(getattr(self, k))(v) for k, v in overrides.items()}
        new = replace(self, **typed)
        new.validate()
        return new


def _check(condition: bool, message: str) -> None:
    if not condition:
        raise InputError(f"difficulty: {message}")


@dataclass
class Sample:
    """One question, its media (in memory) and its exact answer.

    `answer` is what a model should say. For metric "multiple_choice" it is the option letter and
    `choices` holds the option texts. `candidates` is the closed answer space when there is one (used
    to compute chance and by the random-guess baseline); it is never shown to the model.
    """

    question: str
    answer: str
    metric: str
    images: list[Image.Image] = field(default_factory=list)
    video: list[Image.Image] | None = None  # frames, in order
    audio: np.ndarray | None = None  # int16 mono at 16 kHz
    answers: list[str] = field(default_factory=list)  # other accepted answers besides `answer`
    candidates: list[str] | None = None
    choices: list[str] | None = None
    category: str | None = None  # a sub-group for scoring (e.g. POPE random / adversarial)
    meta: dict[str, Any] = field(default_factory=dict)  # the ground truth the generator used
    # Filled in by the generator:
    id: str = ""
    skill: str = ""
    split: str = ""
