"""Speech for the synthetic world: espeak-ng text-to-speech, resampled to 16 kHz mono int16 WAV.

espeak-ng is a formant synthesiser: for the same text, voice, speed and pitch it writes the same
samples every time (checked by tests/test_world.py), and soxr resampling is deterministic, so spoken
samples are as reproducible as the images. Voices and variants give speaker variety.
"""

from __future__ import annotations

import io
import shutil
import subprocess
import wave
from functools import lru_cache

import numpy as np
import soundfile
import soxr

from tinyomni.errors import MissingDependencyError

SAMPLE_RATE = 16000
# espeak-ng's own English voices (no MBROLA: those need extra packages) and its speaker variants.
VOICES: tuple[str, ...] = ("en-us", "en-gb", "en-gb-scotland", "en-gb-x-rp", "en-029", "en-us-nyc")
VARIANTS: tuple[str, ...] = ("", "m1", "m2", "m3", "m4", "f1", "f2", "f3", "f4")


@lru_cache(maxsize=1)
def espeak_binary() -> str:
    for name in ("espeak-ng", "espeak"):
        path = shutil.which(name)
        if path:
            return path
    raise MissingDependencyError(
        "speech samples need the espeak-ng text-to-speech program, which is not installed. "
        "Install it with `apt-get install espeak-ng` (Debian/Ubuntu), `brew install espeak-ng` (macOS) "
        "or `dnf install espeak-ng` (Fedora), or leave the speech skills out (--skills).")


def speak(text: str, voice: str = "en-us", variant: str = "", speed: int = 160,
          pitch: int = 50) -> np.ndarray:
    """Synthesise `text` and return 16 kHz mono int16 samples."""
    name = f"{voice}+{variant}" if variant else voice
    command = [espeak_binary(), "-v", name, "-s", str(speed), "-p", str(pitch), "--stdout", text]
    result = subprocess.run(command, capture_output=True, check=False)
    if result.returncode != 0 or not result.stdout:
        error = result.stderr.decode(errors="replace")
        raise MissingDependencyError(f"espeak-ng failed for voice {name!r}: {error}")
    # espeak writes a streaming WAV header (sizes 0x7fffffff); soundfile reads it anyway.
    samples, rate = soundfile.read(io.BytesIO(result.stdout), dtype="float32")
    samples = soxr.resample(samples, rate, SAMPLE_RATE, quality="HQ")
    return to_int16(samples)


def to_int16(samples: np.ndarray) -> np.ndarray:
    return np.clip(np.round(samples * 32767.0), -32768, 32767).astype(np.int16)


def add_noise(samples: np.ndarray, seed: int, noise: float) -> np.ndarray:
    """White noise at a level that grows with `noise` (0 clean; 1 about 10 dB SNR)."""
    if noise <= 0 or samples.size == 0:
        return samples
    signal = samples.astype(np.float32) / 32768.0
    rms = float(np.sqrt(np.mean(signal**2))) or 1e-3
    sigma = rms * noise * 10 ** (-10 / 20)
    noisy = signal + np.random.default_rng(seed).normal(0.0, sigma, signal.shape).astype(np.float32)
    return to_int16(noisy)


def wav_bytes(samples: np.ndarray, rate: int = SAMPLE_RATE) -> bytes:
    """A plain 44-byte-header PCM16 WAV (the wave module writes no dates or tags)."""
    buffer = io.BytesIO()
    with wave.open(buffer, "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(rate)
        w.writeframes(np.ascontiguousarray(samples, dtype="<i2").tobytes())
    return buffer.getvalue()


# --- numbers in words (what the speaker says for "what is 7 plus 5") ----------------------------

_ONES = ("zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen fifteen "
         "sixteen seventeen eighteen nineteen").split()
_TENS = "_ _ twenty thirty forty fifty sixty seventy eighty ninety".split()


def number_words(n: int) -> str:
    """English words for 0 <= n < 1_000_000 ("four thousand eight hundred twenty-one")."""
    if n < 0:
        return "minus " + number_words(-n)
    if n < 20:
        return _ONES[n]
    if n < 100:
        return _TENS[n // 10] + ("" if n % 10 == 0 else "-" + _ONES[n % 10])
    if n < 1000:
        rest = n % 100
        return _ONES[n // 100] + " hundred" + ("" if rest == 0 else " " + number_words(rest))
    if n < 1_000_000:
        rest = n % 1000
        return number_words(n // 1000) + " thousand" + ("" if rest == 0 else " " + number_words(rest))
    raise ValueError(f"number_words supports 0..999999, got {n}")
