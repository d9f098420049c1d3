"""Audio in: any reasonable source → 16 kHz mono float32 → Whisper-compatible log-mel spectrogram.

`load_audio` accepts paths, bytes, base64 strings, data URLs, arrays and `(array, rate)` tuples, so
every front end (Python API, CLI, server, training data) goes through the same decode and resample.
`log_mel_spectrogram` reproduces transformers' `WhisperFeatureExtractor` exactly (tested to 1e-4) but
also works on variable-length clips, so short speech does not pay for 30 s of padding.
`chunk_log_mel` is Qwen2-Audio's variant (AudioConfig.pad_to_chunk): the features of the clip padded
to 30 s, of which only the clip's frames (and the two after them) are kept.
"""

from __future__ import annotations

import base64
import binascii
import functools
import io
from pathlib import Path
from typing import Any

import numpy as np
import torch

from tinyomni.errors import InputError

SAMPLE_RATE = 16000
N_FFT = 400
HOP_LENGTH = 160
CHUNK_SECONDS = 30
N_SAMPLES = CHUNK_SECONDS * SAMPLE_RATE  # 480000: Whisper's fixed 30 s window
# A Whisper encoder's two convs read each position's neighbours: the last positions of a clip padded to
# the chunk also see the 2 frames after the clip (see chunk_log_mel).
CHUNK_CONTEXT_FRAMES = 2

SUPPORTED_FORMATS = (
    "wav, flac and ogg (vorbis/opus) via soundfile; mp3, m4a/aac, webm, mp4 and other ffmpeg formats via PyAV"
)

AudioSource = Any  # str | Path | bytes | np.ndarray | torch.Tensor | tuple[array, rate]


class AudioTooLongError(InputError):
    """A clip longer than the limit asked for; found from the file's header, or by stopping the
    decode at the limit, so a long clip never costs its full decode."""

    def __init__(self, name: str, seconds: float | None, max_seconds: float) -> None:
        length = f"{seconds:.1f} s" if seconds is not None else f"longer than {max_seconds:g} s"
        super().__init__(f"audio {name} is {length}; at most {max_seconds:g} s is accepted")
        self.seconds, self.max_seconds = seconds, max_seconds


# --- loading ---------------------------------------------------------------------------------------


def load_audio(source: AudioSource, sampling_rate: int | None = None,
               max_seconds: float | None = None) -> np.ndarray:
    """Decode `source` to a float32 mono waveform at 16 kHz, in [-1, 1] for integer PCM.

    With `max_seconds`, a longer clip raises AudioTooLongError before it is decoded in full.

    `source` may be a path, raw file bytes, a base64 string, a `data:audio/...;base64,` URL, a numpy
    array or torch tensor (then `sampling_rate` is required), or an `(array, sampling_rate)` tuple.
    A 2-D array is taken as `[samples, channels]` (soundfile's layout) unless its first dimension is
    small (≤ 8) and its second larger, which is the `[channels, samples]` layout torch code uses.
    """
    if isinstance(source, tuple):
        if len(source) != 2:
            raise InputError("an audio tuple must be (array, sampling_rate)")
        array, rate = source
        return _check_array_length(_from_array(array, rate), max_seconds)
    if isinstance(source, (np.ndarray, torch.Tensor)):
        if sampling_rate is None:
            raise InputError("load_audio needs sampling_rate when given a raw array")
        return _check_array_length(_from_array(source, sampling_rate), max_seconds)
    if isinstance(source, (bytes, bytearray, memoryview)):
        return _from_file_bytes(bytes(source), "<audio bytes>", max_seconds)
    if isinstance(source, Path):
        return _from_path(source, max_seconds)
    if isinstance(source, str):
        return _from_string(source, max_seconds)
    raise InputError(f"cannot read audio from a {type(source).__name__}; pass a path, bytes, base64, "
                     "a data URL, an array with sampling_rate, or an (array, sampling_rate) tuple")


def check_duration(audio: np.ndarray, max_seconds: float, sampling_rate: int = SAMPLE_RATE) -> None:
    """Raise InputError when a clip is longer than a model accepts (e.g. 30 s for Whisper-style towers)."""
    seconds = len(audio) / sampling_rate
    if seconds > max_seconds:
        raise InputError(f"audio clip is {seconds:.1f} s; this model accepts at most {max_seconds:.1f} s")


def _check_array_length(audio: np.ndarray, max_seconds: float | None) -> np.ndarray:
    if max_seconds is not None and len(audio) > max_seconds * SAMPLE_RATE:
        raise AudioTooLongError("array", len(audio) / SAMPLE_RATE, max_seconds)
    return audio


def _from_string(text: str, max_seconds: float | None = None) -> np.ndarray:
    if text.startswith("data:"):
        header, sep, payload = text.partition(",")
        if not sep or ";base64" not in header:
            raise InputError("an audio data URL must look like data:audio/wav;base64,<data>")
        return _from_file_bytes(_b64decode(payload, "audio data URL"), "<audio data URL>", max_seconds)
    if text.startswith(("http://", "https://")):
        raise InputError(f"audio URLs are not fetched ({text[:80]}); download the file and pass its path")
    # A path is tried first: a short file name can also be valid base64 ("clip" decodes fine).
    try:
        is_file = Path(text).is_file()
    except OSError:  # a long base64 string can exceed the OS limit on path length
        is_file = False
    if is_file:
        return _from_path(Path(text), max_seconds)
    if len(text) >= 32:  # shorter strings are far more likely mistyped paths than audio files
        try:
            data = base64.b64decode(text, validate=True)
        except (binascii.Error, ValueError):
            data = None
        if data:
            return _from_file_bytes(data, "<base64 audio>", max_seconds)
    raise InputError(f"audio file not found: {text}")


def _b64decode(payload: str, what: str) -> bytes:
    try:
        return base64.b64decode(payload, validate=False)
    except (binascii.Error, ValueError) as e:
        raise InputError(f"{what} is not valid base64: {e}") from None


def _from_path(path: Path, max_seconds: float | None = None) -> np.ndarray:
    if not path.is_file():
        raise InputError(f"audio file not found: {path}")
    return _from_file_bytes(path.read_bytes(), str(path), max_seconds)


def _from_file_bytes(data: bytes, name: str, max_seconds: float | None = None) -> np.ndarray:
    if not data:
        raise InputError(f"audio {name} is empty")
    decoded = _decode_soundfile(data, name, max_seconds)
    if decoded is None:  # mp3/m4a/webm...: soundfile (libsndfile) cannot read these
        decoded = _decode_pyav(data, name, max_seconds)
    if decoded is None:
        raise InputError(f"could not decode audio {name}: the file is corrupt or not a supported format "
                         f"({SUPPORTED_FORMATS})")
    samples, rate = decoded  # samples: float32 [frames, channels]
    return _finish(samples, rate, name)


def _decode_soundfile(data: bytes, name: str, max_seconds: float | None) -> tuple[np.ndarray, int] | None:
    import soundfile as sf

    try:
        with sf.SoundFile(io.BytesIO(data)) as file:
            rate = int(file.samplerate)
            limit = None if max_seconds is None else int(max_seconds * rate)
            if limit is not None and file.frames > limit:  # the header says it is too long: nothing decoded
                raise AudioTooLongError(name, file.frames / rate, max_seconds)
            # dtype=float32 makes libsndfile scale integer PCM into [-1, 1] for us; reading at most
            # one frame past the limit bounds the memory even when the header lies.
            samples = file.read(frames=-1 if limit is None else limit + 1, dtype="float32", always_2d=True)
    except AudioTooLongError:
        raise
    except Exception:  # libsndfile reports every unreadable input as a generic error
        return None
    if max_seconds is not None and samples.shape[0] > max_seconds * rate:
        raise AudioTooLongError(name, None, max_seconds)
    return samples, rate


def _decode_pyav(data: bytes, name: str, max_seconds: float | None) -> tuple[np.ndarray, int] | None:
    import av

    try:
        with av.open(io.BytesIO(data), mode="r") as container:
            if not container.streams.audio:
                return None
            stream = container.streams.audio[0]
            if max_seconds is not None and container.duration and container.duration / 1e6 > max_seconds + 1:
                raise AudioTooLongError(name, container.duration / 1e6, max_seconds)  # from the header
            # Planar float keeps every channel and the native rate; mixing and resampling happen
            # below with the same code as every other source.
            resampler = av.AudioResampler(format="fltp")
            chunks: list[np.ndarray] = []
            rate = None
            decoded = 0
            for frame in container.decode(stream):
                for out in resampler.resample(frame):
                    rate = out.sample_rate
                    chunks.append(out.to_ndarray())
                    decoded += out.samples
                # A header can lie or say nothing: stop decoding once the limit is passed.
                if max_seconds is not None and rate and decoded > max_seconds * rate:
                    raise AudioTooLongError(name, None, max_seconds)
            for out in resampler.resample(None):
                rate = out.sample_rate
                chunks.append(out.to_ndarray())
    except AudioTooLongError:
        raise
    except Exception:  # av raises many FFmpegError subclasses (and OSError) for bad data
        return None
    if not chunks or rate is None:
        return None
    samples = np.concatenate(chunks, axis=1).T.astype(np.float32, copy=False)  # [frames, channels]
    return samples, int(rate)


def _from_array(array: Any, sampling_rate: Any) -> np.ndarray:
    if isinstance(array, torch.Tensor):
        array = array.detach().cpu().float().numpy()
    array = np.asarray(array)
    if not isinstance(sampling_rate, (int, np.integer)) or sampling_rate <= 0:
        raise InputError(f"sampling_rate must be a positive integer, got {sampling_rate!r}")
    if array.ndim == 1:
        array = array[:, None]
    elif array.ndim == 2:
        if array.shape[0] <= 8 and array.shape[1] > array.shape[0]:
            array = array.T  # [channels, samples] → [samples, channels]
    else:
        raise InputError(f"an audio array must be 1-D (mono) or 2-D (multi-channel), got shape {array.shape}")
    return _finish(_to_float(array), int(sampling_rate), "array")


def _to_float(array: np.ndarray) -> np.ndarray:
    """Integer PCM → float in [-1, 1] by the full scale of its type; floats pass through."""
    if array.dtype == np.uint8:  # 8-bit WAV is unsigned, centred on 128
        return (array.astype(np.float32) - 128.0) / 128.0
    if np.issubdtype(array.dtype, np.integer):
        return array.astype(np.float32) / float(-np.iinfo(array.dtype).min)
    if np.issubdtype(array.dtype, np.floating):
        return array.astype(np.float32, copy=False)
    raise InputError(f"audio array has unsupported dtype {array.dtype}")


def _finish(samples: np.ndarray, rate: int, name: str) -> np.ndarray:
    """[frames, channels] at any rate → contiguous float32 mono at 16 kHz."""
    if samples.shape[0] == 0:
        raise InputError(f"audio {name} is empty (no samples)")
    mono = samples.mean(axis=1) if samples.shape[1] > 1 else samples[:, 0]
    mono = np.ascontiguousarray(mono, dtype=np.float32)
    if not np.isfinite(mono).all():
        raise InputError(f"audio {name} contains NaN or infinite samples")
    if rate != SAMPLE_RATE:
        import soxr

        mono = soxr.resample(mono, rate, SAMPLE_RATE, quality="HQ").astype(np.float32, copy=False)
        if mono.size == 0:
            raise InputError(f"audio {name} is too short to resample to {SAMPLE_RATE} Hz")
    return mono


# --- features --------------------------------------------------------------------------------------


def log_mel_spectrogram(audio: np.ndarray | torch.Tensor, n_mels: int = 80, padding: int = 0,
                        pad_to_samples: int | None = None) -> torch.Tensor:
    """Whisper's log-mel features `[n_mels, frames]` of a 16 kHz mono waveform.

    `padding` appends that many zero samples (as openai-whisper's argument of the same name).
    `pad_to_samples` then pads with zeros, or truncates, to exactly that many samples, as
    `WhisperFeatureExtractor` does: `pad_to_samples=480000` gives its default 30 s, 3000-frame output.
    Without it the output has `len(audio) // 160` frames.
    """
    x = torch.as_tensor(audio).detach().to("cpu", torch.float32)
    if x.ndim != 1:
        raise InputError(f"log_mel_spectrogram expects a 1-D mono waveform, got shape {tuple(x.shape)}")
    if padding > 0:
        x = torch.nn.functional.pad(x, (0, padding))
    if pad_to_samples is not None:
        x = x[:pad_to_samples] if x.numel() >= pad_to_samples else torch.nn.functional.pad(
            x, (0, pad_to_samples - x.numel()))
    if x.numel() < HOP_LENGTH:
        raise InputError(f"audio is too short for features: {x.numel()} samples, need at least {HOP_LENGTH} "
                         f"({HOP_LENGTH / SAMPLE_RATE * 1000:.0f} ms)")
    # center=True reflect padding done with numpy: unlike torch's reflect pad it also handles clips
    # shorter than half a window, matching the numpy reference for every length.
    half = N_FFT // 2
    x = torch.from_numpy(np.pad(x.numpy(), (half, half), mode="reflect"))
    window = torch.hann_window(N_FFT)  # periodic, as Whisper and transformers use
    stft = torch.stft(x, N_FFT, HOP_LENGTH, window=window, center=False, return_complex=True)
    # Whisper drops the last frame, so 30 s gives 3000 frames, not 3001.
    power = (stft[:, :-1].abs() ** 2).contiguous()
    mel = _mel_filters_t(n_mels) @ power
    log_spec = torch.clamp(mel, min=1e-10).log10()
    log_spec = torch.maximum(log_spec, log_spec.max() - 8.0)  # an 80 dB dynamic range
    return (log_spec + 4.0) / 4.0


def chunk_log_mel(audio: np.ndarray | torch.Tensor, n_mels: int = 128,
                  chunk_samples: int = N_SAMPLES) -> tuple[torch.Tensor, int]:
    """A clip's features as Qwen2-Audio computes them: `(features, frames)`.

    WhisperFeatureExtractor(padding="max_length", return_attention_mask=True) pads the clip with zeros to
    the chunk (30 s), takes the log-mel of the whole chunk (its 80 dB floor set by the chunk's loudest
    frame, as here) and marks `frames` = ceil(samples / 160) of its frames as the clip's. The encoder then
    attends only to the clip's positions, which the convs compute from those frames and the
    CHUNK_CONTEXT_FRAMES after them; so `features` is the chunk's first `frames + CHUNK_CONTEXT_FRAMES`
    frames (zeros past the chunk's end, as the conv's own padding), and the rest of the chunk, which
    changes nothing the model returns, is not kept. A clip longer than the chunk is refused (Qwen2-Audio's
    processor would keep its first 30 s and drop the rest without a word).
    """
    x = torch.as_tensor(audio).detach().to("cpu", torch.float32)
    if x.ndim != 1:
        raise InputError(f"chunk_log_mel expects a 1-D mono waveform, got shape {tuple(x.shape)}")
    if x.numel() == 0:
        raise InputError("audio is empty (no samples)")
    if x.numel() > chunk_samples:
        raise InputError(f"audio clip is {x.numel() / SAMPLE_RATE:.1f} s; this model accepts at most "
                         f"{chunk_samples / SAMPLE_RATE:.1f} s (cut the clip into shorter parts)")
    chunk = log_mel_spectrogram(x, n_mels=n_mels, pad_to_samples=chunk_samples)
    frames = -(-x.numel() // HOP_LENGTH)  # the extractor's attention mask: every hop a sample starts
    keep = frames + CHUNK_CONTEXT_FRAMES
    features = chunk[:, :keep]
    if features.shape[-1] < keep:
        features = torch.nn.functional.pad(features, (0, keep - features.shape[-1]))
    return features, frames


@functools.lru_cache(maxsize=8)
def _mel_filters_t(n_mels: int) -> torch.Tensor:
    """The filter bank as a `[n_mels, n_fft // 2 + 1]` tensor, built once per size."""
    return torch.from_numpy(mel_filters(n_mels)).T.contiguous()


def mel_filters(n_mels: int, n_fft: int = N_FFT, sampling_rate: int = SAMPLE_RATE) -> np.ndarray:
    """Slaney-scale, Slaney-normalised triangular filters `[n_fft // 2 + 1, n_mels]`, 0–8000 Hz.

    The same bank as `transformers.audio_utils.mel_filter_bank(..., norm="slaney", mel_scale="slaney")`
    and librosa's default, which Whisper was trained with. Computed in float64, returned as float32.
    """
    num_bins = 1 + n_fft // 2
    filter_freqs = _mel_to_hertz(np.linspace(_hertz_to_mel(0.0), _hertz_to_mel(8000.0), n_mels + 2))
    fft_freqs = np.linspace(0, sampling_rate // 2, num_bins)
    filter_diff = np.diff(filter_freqs)
    slopes = filter_freqs[None, :] - fft_freqs[:, None]
    down = -slopes[:, :-2] / filter_diff[:-1]
    up = slopes[:, 2:] / filter_diff[1:]
    filters = np.maximum(0.0, np.minimum(down, up))
    filters *= 2.0 / (filter_freqs[2:n_mels + 2] - filter_freqs[:n_mels])  # equal area per band
    return filters.astype(np.float32)


# Slaney's mel scale: linear below 1 kHz (3 mels per 200 Hz), logarithmic above.
_MIN_LOG_HZ = 1000.0
_MIN_LOG_MEL = 15.0
_LOGSTEP = np.log(6.4) / 27.0


def _hertz_to_mel(freq: float) -> float:
    if freq >= _MIN_LOG_HZ:
        return _MIN_LOG_MEL + float(np.log(freq / _MIN_LOG_HZ)) / _LOGSTEP
    return 3.0 * freq / 200.0


def _mel_to_hertz(mels: np.ndarray) -> np.ndarray:
    freqs = 200.0 * mels / 3.0
    log_region = mels >= _MIN_LOG_MEL
    freqs[log_region] = _MIN_LOG_HZ * np.exp(_LOGSTEP * (mels[log_region] - _MIN_LOG_MEL))
    return freqs
