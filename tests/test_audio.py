"""Audio path: loading and resampling, Whisper-exact log-mel features, the encoder and the Whisper importer.

transformers is the reference for features and encoder; tiny random configs keep every test fast.
"""

from __future__ import annotations

import base64
import io
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch

from tinyomni.checkpoints.hf_whisper import (
    audio_config_from_hf,
    convert_hf_whisper_encoder,
    load_hf_whisper_encoder,
)
from tinyomni.config import AudioConfig
from tinyomni.errors import CheckpointError, InputError
from tinyomni.model.audio import AudioEncoder, audio_output_length
from tinyomni.processing.audio import SAMPLE_RATE, check_duration, load_audio, log_mel_spectrogram

transformers = pytest.importorskip("transformers")


def tone(freq: float, seconds: float, rate: int, amplitude: float = 0.5) -> np.ndarray:
    t = np.arange(int(seconds * rate)) / rate
    return (amplitude * np.sin(2 * np.pi * freq * t)).astype(np.float32)


def peak_frequency(audio: np.ndarray, rate: int = SAMPLE_RATE) -> float:
    spectrum = np.abs(np.fft.rfft(audio * np.hanning(len(audio))))
    return float(np.fft.rfftfreq(len(audio), 1 / rate)[spectrum.argmax()])


def speechlike(seconds: float, seed: int = 0) -> np.ndarray:
    """Noise plus tones with a silent gap: exercises the 80 dB floor and every mel band."""
    rng = np.random.default_rng(seed)
    n = int(seconds * SAMPLE_RATE)
    x = 0.05 * rng.standard_normal(n) + tone(300, seconds, SAMPLE_RATE, 0.3)
    x += tone(2500, seconds, SAMPLE_RATE, 0.1)
    x[n // 3: n // 2] = 0.0
    return x.astype(np.float32)


# --- log-mel ---------------------------------------------------------------------------------------


@pytest.fixture(scope="module", params=[80, 128])
def feature_extractor(request):
    return transformers.WhisperFeatureExtractor(feature_size=request.param)


def test_log_mel_matches_whisper_30s(feature_extractor):
    audio = speechlike(7.3)
    ref = feature_extractor(audio, sampling_rate=SAMPLE_RATE, return_tensors="np").input_features[0]
    ours = log_mel_spectrogram(audio, n_mels=feature_extractor.feature_size, pad_to_samples=480000)
    assert ours.shape == ref.shape == (feature_extractor.feature_size, 3000)
    assert np.abs(ours.numpy() - ref).max() <= 1e-4


@pytest.mark.parametrize("num_samples", [201, 999, 16000, 23457, 48000 + 77])
def test_log_mel_matches_whisper_unpadded(feature_extractor, num_samples):
    audio = speechlike(num_samples / SAMPLE_RATE + 0.01, seed=num_samples)[:num_samples]
    ref = feature_extractor(audio, sampling_rate=SAMPLE_RATE, padding=False, truncation=False,
                            return_tensors="np").input_features[0]
    ours = log_mel_spectrogram(audio, n_mels=feature_extractor.feature_size)
    assert ours.shape == ref.shape == (feature_extractor.feature_size, num_samples // 160)
    assert np.abs(ours.numpy() - ref).max() <= 1e-4


def test_log_mel_padding_and_truncation():
    audio = speechlike(1.0)
    padded = log_mel_spectrogram(audio, padding=16000)
    assert padded.shape == (80, 200)
    assert log_mel_spectrogram(speechlike(31.0), pad_to_samples=480000).shape == (80, 3000)
    assert log_mel_spectrogram(torch.from_numpy(audio)).shape == (80, 100)  # tensors work too


def test_log_mel_rejects_bad_shapes():
    with pytest.raises(InputError, match="too short"):
        log_mel_spectrogram(np.zeros(100, np.float32))
    with pytest.raises(InputError, match="1-D"):
        log_mel_spectrogram(np.zeros((2, 16000), np.float32))


# --- loading ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("fmt,subtype,tolerance", [
    ("WAV", "PCM_16", 1e-4), ("WAV", "FLOAT", 1e-7), ("FLAC", "PCM_16", 1e-4), ("OGG", "VORBIS", None)])
def test_load_audio_files(tmp_path, fmt, subtype, tolerance):
    audio = tone(440, 0.5, SAMPLE_RATE)
    path = tmp_path / f"clip.{fmt.lower()}"
    sf.write(path, audio, SAMPLE_RATE, format=fmt, subtype=subtype)
    for source in (path, str(path)):
        loaded = load_audio(source)
        assert loaded.dtype == np.float32 and loaded.ndim == 1
        assert len(loaded) == len(audio)
        if tolerance is None:  # lossy: the tone and its level survive
            assert abs(peak_frequency(loaded) - 440) < 5
            assert abs(np.abs(loaded).max() - 0.5) < 0.05
        else:
            assert np.abs(loaded - audio).max() <= tolerance


def test_load_audio_stereo_to_mono(tmp_path):
    left = tone(440, 0.25, SAMPLE_RATE)
    stereo = np.stack([left, np.zeros_like(left)], axis=1)
    path = tmp_path / "stereo.wav"
    sf.write(path, stereo, SAMPLE_RATE, subtype="FLOAT")
    np.testing.assert_allclose(load_audio(path), left / 2, atol=1e-7)
    # Arrays in either layout: [samples, channels] and torch-style [channels, samples].
    np.testing.assert_allclose(load_audio(stereo, sampling_rate=SAMPLE_RATE), left / 2, atol=1e-7)
    np.testing.assert_allclose(load_audio(stereo.T.copy(), sampling_rate=SAMPLE_RATE), left / 2, atol=1e-7)


@pytest.mark.parametrize("rate,freq", [(44100, 440.0), (8000, 1000.0), (48000, 3000.0)])
def test_load_audio_resamples_to_16k(tmp_path, rate, freq):
    audio = tone(freq, 1.0, rate)
    path = tmp_path / "clip.wav"
    sf.write(path, audio, rate, subtype="FLOAT")
    loaded = load_audio(path)
    assert abs(len(loaded) - SAMPLE_RATE) <= 1
    assert abs(peak_frequency(loaded) - freq) < 2
    assert abs(np.abs(loaded[1000:-1000]).max() - 0.5) < 0.01  # no gain change
    np.testing.assert_array_equal(load_audio((audio, rate)), loaded)


def test_load_audio_arrays_and_integer_pcm():
    pcm = (tone(440, 0.1, SAMPLE_RATE) * 32767).astype(np.int16)
    loaded = load_audio(pcm, sampling_rate=SAMPLE_RATE)
    np.testing.assert_allclose(loaded, pcm / 32768.0, atol=1e-7)
    assert np.abs(load_audio((pcm.astype(np.int32) << 16, SAMPLE_RATE)) - loaded).max() < 1e-6
    assert load_audio(torch.from_numpy(loaded), sampling_rate=SAMPLE_RATE).shape == loaded.shape
    with pytest.raises(InputError, match="sampling_rate"):
        load_audio(loaded)


def test_load_audio_bytes_base64_and_data_url(tmp_path):
    audio = tone(440, 0.2, SAMPLE_RATE)
    buffer = io.BytesIO()
    sf.write(buffer, audio, SAMPLE_RATE, format="WAV", subtype="PCM_16")
    data = buffer.getvalue()
    expected = load_audio(data)
    assert np.abs(expected - audio).max() < 1e-4
    b64 = base64.b64encode(data).decode()
    np.testing.assert_array_equal(load_audio(b64), expected)
    np.testing.assert_array_equal(load_audio(f"data:audio/wav;base64,{b64}"), expected)


def test_load_audio_pyav_fallback_m4a(tmp_path):
    av = pytest.importorskip("av")
    path = tmp_path / "clip.m4a"  # AAC in MP4: libsndfile cannot read it, PyAV can
    with av.open(str(path), mode="w") as container:
        stream = container.add_stream("aac", rate=22050, layout="mono")
        samples = tone(600, 1.0, 22050)[None]
        for start in range(0, samples.shape[1], 1024):
            frame = av.AudioFrame.from_ndarray(samples[:, start:start + 1024], format="fltp", layout="mono")
            frame.sample_rate = 22050
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode(None):
            container.mux(packet)
    loaded = load_audio(path)
    assert abs(len(loaded) - SAMPLE_RATE) < 0.1 * SAMPLE_RATE  # codec priming may add a few ms
    assert abs(peak_frequency(loaded) - 600) < 5


def test_load_audio_errors(tmp_path):
    corrupt = tmp_path / "broken.wav"
    corrupt.write_bytes(b"RIFF\x00\x00\x00\x00WAVEnot really a wav file at all" * 3)
    with pytest.raises(InputError, match=r"broken\.wav.*(wav|flac|mp3)"):
        load_audio(corrupt)
    text = tmp_path / "notes.mp3"
    text.write_text("this is text, not audio")
    with pytest.raises(InputError, match=r"notes\.mp3.*supported format"):
        load_audio(text)
    with pytest.raises(InputError, match="not found"):
        load_audio(tmp_path / "missing.wav")
    with pytest.raises(InputError, match="not found"):
        load_audio("missing.wav")
    empty = tmp_path / "empty.wav"
    sf.write(empty, np.zeros(0, np.float32), SAMPLE_RATE)
    with pytest.raises(InputError, match="empty"):
        load_audio(empty)
    with pytest.raises(InputError, match="empty"):
        load_audio(np.zeros(0, np.float32), sampling_rate=SAMPLE_RATE)


def test_check_duration():
    check_duration(np.zeros(30 * SAMPLE_RATE, np.float32), 30.0)
    with pytest.raises(InputError, match=r"audio clip is 42\.0 s; this model accepts at most 30\.0 s"):
        check_duration(np.zeros(42 * SAMPLE_RATE, np.float32), 30.0)


# --- encoder ---------------------------------------------------------------------------------------

TINY_HF = dict(d_model=32, encoder_layers=2, encoder_attention_heads=4, encoder_ffn_dim=64,
               decoder_layers=1, decoder_attention_heads=4, decoder_ffn_dim=64, max_source_positions=50,
               max_target_positions=16, vocab_size=100, num_mel_bins=80, pad_token_id=1, bos_token_id=2,
               eos_token_id=2, decoder_start_token_id=3)


@pytest.fixture(scope="module")
def hf_encoder():
    torch.manual_seed(0)
    config = transformers.WhisperConfig(**TINY_HF)
    encoder = transformers.models.whisper.modeling_whisper.WhisperEncoder(config).eval()
    with torch.no_grad():  # random layer norms and biases too, so a swapped name cannot hide
        for name, param in encoder.named_parameters():
            if name != "embed_positions.weight":
                param.add_(0.1 * torch.randn_like(param))
    return encoder


def ours_from(hf_encoder, pool_stride: int) -> AudioEncoder:
    config = audio_config_from_hf(hf_encoder.config.to_dict(), pool_stride=pool_stride)
    model = AudioEncoder(config).eval()
    model.load_state_dict(convert_hf_whisper_encoder(hf_encoder.state_dict(), config))
    return model


def test_encoder_matches_whisper(hf_encoder):
    features = torch.randn(2, 80, 100)
    with torch.no_grad():
        ref = hf_encoder(features).last_hidden_state
        ours = ours_from(hf_encoder, pool_stride=1)(features)
    assert ours.shape == ref.shape == (2, 50, 32)
    assert (ours - ref).abs().max() <= 1e-4


def test_encoder_pooling(hf_encoder):
    features = torch.randn(1, 80, 100)
    with torch.no_grad():
        ref = hf_encoder(features).last_hidden_state
        pooled = ours_from(hf_encoder, pool_stride=2)(features)
        pooled3 = ours_from(hf_encoder, pool_stride=3)(features)
    assert pooled.shape == (1, 25, 32)
    assert (pooled - ref.view(1, 25, 2, 32).mean(2)).abs().max() <= 1e-4
    assert pooled3.shape == (1, 17, 32)  # 50 positions: 16 full windows and a tail of 2
    assert (pooled3[:, -1] - ref[:, 48:].mean(1)).abs().max() <= 1e-4


def test_positions_are_whisper_sinusoids(hf_encoder):
    config = audio_config_from_hf(hf_encoder.config.to_dict())
    assert torch.allclose(AudioEncoder(config).embed_positions.weight, hf_encoder.embed_positions.weight)


def test_variable_length_and_output_length(hf_encoder):
    for pool_stride in (1, 2, 3):
        model = ours_from(hf_encoder, pool_stride)
        for frames in [*range(1, 14), 37, 58, 97, 98, 99, 100]:  # every residue of 2 * pool_stride
            with torch.no_grad():
                out = model(torch.randn(1, 80, frames))
            assert out.shape == (1, audio_output_length(frames, model.config), 32), (pool_stride, frames)
            assert torch.isfinite(out).all()


def test_masked_batch_equals_separate_clips(hf_encoder):
    model = ours_from(hf_encoder, pool_stride=2)
    lengths = [100, 37, 64]
    clips = [torch.randn(80, n) for n in lengths]
    batch = torch.zeros(3, 80, 100)
    mask = torch.zeros(3, 100, dtype=torch.long)
    for i, clip in enumerate(clips):
        batch[i, :, :clip.shape[1]] = clip
        mask[i, :clip.shape[1]] = 1
    with torch.no_grad():
        batched = model(batch, attention_mask=mask)
        for i, clip in enumerate(clips):
            alone = model(clip[None])
            n = audio_output_length(clip.shape[1], model.config)
            assert (batched[i, :n] - alone[0]).abs().max() <= 1e-5
            assert (batched[i, n:] == 0).all()


def test_encoder_rejects_too_long_and_wrong_bins(hf_encoder):
    model = ours_from(hf_encoder, pool_stride=2)
    with pytest.raises(InputError, match=r"at most 100 frames \(1\.0 s\)"):
        model(torch.randn(1, 80, 101))
    with pytest.raises(InputError, match="80 mel bins"):
        model(torch.randn(1, 128, 50))


def test_output_length_formula():
    config = AudioConfig(pool_stride=2)
    assert audio_output_length(3000, config) == 750  # 30 s -> 1500 positions -> 750 tokens
    assert audio_output_length(1, config) == 1
    assert audio_output_length(3001, AudioConfig(pool_stride=1)) == 1501


# --- importer --------------------------------------------------------------------------------------


@pytest.mark.parametrize("cls_name", ["WhisperForConditionalGeneration", "WhisperModel"])
def test_load_hf_whisper_directory(tmp_path, hf_encoder, cls_name):
    torch.manual_seed(1)
    hf = getattr(transformers, cls_name)(transformers.WhisperConfig(**TINY_HF)).eval()
    hf.get_encoder().load_state_dict(hf_encoder.state_dict())
    hf.save_pretrained(tmp_path)
    model = load_hf_whisper_encoder(tmp_path, pool_stride=1)
    features = torch.randn(1, 80, 100)
    with torch.no_grad():
        assert (model(features) - hf_encoder(features).last_hidden_state).abs().max() <= 1e-5
    assert model.config.d_model == 32 and model.config.encoder_layers == 2


def test_converter_names_missing_and_unknown_keys(hf_encoder):
    config = audio_config_from_hf(hf_encoder.config.to_dict())
    state = {f"model.encoder.{k}": v for k, v in hf_encoder.state_dict().items()}
    state["model.decoder.layers.0.fc1.weight"] = torch.zeros(1)  # outside the encoder: ignored
    assert len(convert_hf_whisper_encoder(state, config)) == len(hf_encoder.state_dict())
    del state["model.encoder.layers.1.fc2.bias"]
    with pytest.raises(CheckpointError, match=r"missing.*model\.encoder\.layers\.1\.fc2\.bias"):
        convert_hf_whisper_encoder(state, config)
    state["model.encoder.layers.1.fc2.bias"] = torch.zeros(32)
    state["model.encoder.layers.2.fc1.weight"] = torch.zeros(1)
    with pytest.raises(CheckpointError, match=r"unexpected.*model\.encoder\.layers\.2\.fc1\.weight"):
        convert_hf_whisper_encoder(state, config)
    with pytest.raises(CheckpointError, match="no Whisper encoder"):
        convert_hf_whisper_encoder({"foo.weight": torch.zeros(1)}, config)


def test_load_hf_whisper_errors(tmp_path: Path):
    with pytest.raises(CheckpointError, match="config.json"):
        load_hf_whisper_encoder(tmp_path)
    (tmp_path / "config.json").write_text('{"model_type": "whisper", "d_model": 32, "num_mel_bins": 80, '
                                          '"encoder_layers": 1, "encoder_attention_heads": 4, '
                                          '"encoder_ffn_dim": 64, "max_source_positions": 50}')
    with pytest.raises(CheckpointError, match="no .safetensors"):
        load_hf_whisper_encoder(tmp_path)
