"""Splits of the world: held apart by seed and by composition.

- By seed: every sample is a pure function of (seed, split, skill, index), hashed with SHA-512, so the
  splits draw from independent random streams and never share a sample.
- By composition: some colour-shape pairs, some words and some voices appear only in `test`. Train
  and val never contain them; in test the object, word or voice a question is about is always one of
  them. So `val` measures in-distribution accuracy and `test` (the world-bench) measures
  generalisation to new combinations of known parts.
"""

from __future__ import annotations

import random

from tinyomni.errors import InputError
from tinyomni.world.render import COLORS, SHAPES
from tinyomni.world.speech import VARIANTS, VOICES

SPLITS: tuple[str, ...] = ("train", "val", "test")

# One pair per colour; no shape is held out more than twice, so every colour and every shape is seen in
# training with other partners.
HELD_OUT_PAIRS: frozenset[tuple[str, str]] = frozenset({
    ("red", "triangle"), ("orange", "circle"), ("yellow", "star"), ("green", "diamond"),
    ("blue", "hexagon"), ("purple", "square"), ("pink", "hexagon"), ("black", "star"),
})

# Short common words for OCR, chart labels, receipts and speech.
WORDS: tuple[str, ...] = tuple("""
apple river stone cloud house green light paper table water music dream happy quiet bread garden
window market silver orange planet forest summer winter spring autumn pencil rocket bridge castle
candle finger guitar hammer island jacket kitten ladder marble needle ocean pepper rabbit saddle
ticket tunnel velvet wallet yellow zebra anchor basket cactus dinner engine feather goblet harbor
igloo jungle kettle lemon magnet nickel onion parrot puzzle quartz ribbon salmon tomato violin walnut
beach chair clock dance eagle flame grape heart juice knife lunch mango night olive piano queen radio
sugar tiger uncle voice whale yacht bloom brick coral daisy ember frost glove honey ivory jelly koala
maple noble pearl robin storm tulip urban vivid wheat amber blaze crisp drift fable glint
""".split())

# Every tenth word is held out: a spread across the alphabet, fixed forever for comparability.
HELD_OUT_WORDS: frozenset[str] = frozenset(WORDS[i] for i in range(0, len(WORDS), 10))

# Voices held out for test: (voice, variant) combinations never heard in training.
HELD_OUT_VOICES: frozenset[tuple[str, str]] = frozenset({
    ("en-gb-scotland", "f2"), ("en-029", "m3"), ("en-us-nyc", "f4"), ("en-us", "m2"), ("en-gb", "f3"),
})


def check_split(split: str) -> None:
    if split not in SPLITS:
        raise InputError(f"unknown split {split!r}; choose one of {', '.join(SPLITS)}")


def sample_rng(seed: int, split: str, skill: str, index: int) -> random.Random:
    """The random stream of one sample. String seeds go through SHA-512 (not Python's salted hash)."""
    return random.Random(f"tinyomni-world/v1/{seed}/{split}/{skill}/{index}")


def pairs(split: str) -> list[tuple[str, str]]:
    """(colour, shape) pairs any object in this split may have."""
    every = [(c, s) for c in COLORS for s in SHAPES]
    if split == "test":
        return every
    return [p for p in every if p not in HELD_OUT_PAIRS]


def target_pairs(split: str) -> list[tuple[str, str]]:
    """Pairs the question is about: held-out pairs in test, seen pairs otherwise."""
    if split == "test":
        return sorted(HELD_OUT_PAIRS)
    return pairs(split)


def words(split: str) -> list[str]:
    """Words a sample in this split may show or say: held-out words only in test."""
    if split == "test":
        return sorted(HELD_OUT_WORDS)
    return [w for w in WORDS if w not in HELD_OUT_WORDS]


def any_words(split: str) -> list[str]:
    """Words allowed as context (distractor labels, other items): everything but held-out in train/val."""
    if split == "test":
        return list(WORDS)
    return words(split)


def voices(split: str) -> list[tuple[str, str]]:
    every = [(v, x) for v in VOICES for x in VARIANTS]
    if split == "test":
        return sorted(HELD_OUT_VOICES)
    return [p for p in every if p not in HELD_OUT_VOICES]
