"""Qwen2-Audio checkpoints (transformers' `Qwen2AudioForConditionalGeneration`) → tinyomni.

The model: a Whisper encoder over 128 log-mel bins of the clip padded to 30 s, attending only to the
clip's own positions; an average pool of stride 2 after the layers and before the final LayerNorm; one
Linear (`multi_modal_projector.linear`, with a bias) to the decoder width; a Qwen2 decoder. In our
terms: `AudioConfig(pad_to_chunk=True, pool_before_norm=True, pool_stride=2)`, the audio projector of
kind "linear" with a bias, no vision tower. This is also MiniCPM-o's audio path (Whisper → pooling →
projector → LLM).

What is read, from the checkpoint's own files only:
- config.json → OmniConfig (`audio_config` through hf_whisper, `text_config` through
  internvl.decoder_config; keys left out mean what transformers' configs assume); values we cannot run
  are named in a CheckpointError, never approximated;
- the feature extractor's settings (`preprocessor_config.json`, or transformers 5's
  `processor_config.json` with the feature extractor inside): WhisperFeatureExtractor with the tower's
  mel bins, 16 kHz, n_fft 400, hop 160, a 30 s chunk that fills the tower's positions; anything else
  is refused by name;
- the audio token names (`<|AUDIO|>`, `<|audio_bos|>`, `<|audio_eos|>`: the processor's, the tokenizer
  config's, or Qwen2AudioProcessor's defaults), checked against `audio_token_index`;
- `tokenizer.json` + `tokenizer_config.json`; the chat template (`chat_template.jinja`,
  `chat_template.json`, the processor's or the tokenizer config's; Qwen2AudioProcessor's default when
  there is none). The template writes `<|audio_bos|><|AUDIO|><|audio_eos|>` for each audio part, and
  its `<|AUDIO|>` becomes the clip's run (OmniConfig.audio_in_template), as the processor expands it;
- the weights, once, in either spelling transformers writes (`audio_tower.` / `multi_modal_projector.` /
  `language_model.model.` / `language_model.lm_head.`, or `model.audio_tower.` / ... / `lm_head.`).

Clips longer than 30 s are refused: Qwen2-Audio's processor would keep the first 30 s and drop the rest
without a word.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from tinyomni.checkpoints import hf_whisper
from tinyomni.checkpoints.families import Imported, read_hf_config
from tinyomni.checkpoints.internvl import (
    DECODER_LAYER_NAMES,
    DECODER_NAMES,
    DROPPED,
    HEAD_NAMES,
    Weights,
    _check_complete,  # the same completeness check as every family: every tensor, with its shape
    _json,
    _lookup,
    decoder_config,
    read_chat_template,
)
from tinyomni.checkpoints.llava import TEXT_DEFAULTS
from tinyomni.checkpoints.weights import rename_weights
from tinyomni.config import AudioConfig, DecoderConfig, OmniConfig, ProjectorConfig
from tinyomni.errors import CheckpointError, ConfigError
from tinyomni.processing.audio import HOP_LENGTH, N_FFT, SAMPLE_RATE
from tinyomni.processing.tokenizer import Tokenizer

# --- names -------------------------------------------------------------------------------------------
OUR_PREFIX = {"audio": "audio_tower.", "projector": "audio_projector.", "decoder": "language_model.model.",
              "head": "language_model.lm_head."}
# Part → checkpoint prefix, in the two spellings transformers writes.
LAYOUTS = {
    "saved": {"audio": "audio_tower.", "projector": "multi_modal_projector.",
              "decoder": "language_model.model.", "head": "language_model.lm_head."},
    "in-memory": {"audio": "model.audio_tower.", "projector": "model.multi_modal_projector.",
                  "decoder": "model.language_model.", "head": "lm_head."},
}
# Inside the projector: theirs → ours (model/projector.LinearProjector).
PROJECTOR_NAMES = {"linear.weight": "proj.weight", "linear.bias": "proj.bias"}
# The tower's names are Whisper's (hf_whisper.whisper_name_map); its avg_pooler has no parameters.

# --- what transformers assumes for keys a config.json leaves out ----------------------------------------
QWEN2_AUDIO_DEFAULTS: dict[str, Any] = dict(audio_token_index=151646)
# Qwen2AudioConfig's default audio_config (Qwen2-Audio-7B's tower: Whisper-large-v3's encoder).
AUDIO_DEFAULTS: dict[str, Any] = dict(
    model_type="qwen2_audio_encoder", d_model=1280, encoder_attention_heads=20, encoder_ffn_dim=5120,
    encoder_layers=32, num_mel_bins=128, max_source_positions=1500, activation_function="gelu")
# WhisperFeatureExtractor's class defaults, but with Qwen2-Audio's 128 mel bins.
FEATURE_EXTRACTOR_DEFAULTS: dict[str, Any] = dict(
    feature_size=80, sampling_rate=SAMPLE_RATE, hop_length=HOP_LENGTH, chunk_length=30, n_fft=N_FFT,
    padding_value=0.0, padding_side="right", dither=0.0, do_normalize=False)
# Qwen2AudioProcessor's token names when neither the processor nor the tokenizer config gives its own.
TOKEN_DEFAULTS = {"audio_token": "<|AUDIO|>", "audio_bos_token": "<|audio_bos|>", "audio_eos_token": "<|audio_eos|>"}
# Qwen2AudioProcessor's default template, for a checkpoint that ships none: ChatML with a default system
# turn; each audio part is "Audio k: <|audio_bos|><|AUDIO|><|audio_eos|>\n", text parts as they are.
DEFAULT_TEMPLATE = (
    "{% set audio_count = namespace(value=0) %}{% for message in messages %}"
    "{% if loop.first and message['role'] != 'system' %}<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
    "{% endif %}<|im_start|>{{ message['role'] }}\n{% if message['content'] is string %}"
    "{{ message['content'] }}<|im_end|>\n{% else %}{% for content in message['content'] %}"
    "{% if 'audio' in content or 'audio_url' in content or content['type'] == 'audio' %}"
    "{% set audio_count.value = audio_count.value + 1 %}Audio {{ audio_count.value }}: "
    "<|audio_bos|><|AUDIO|><|audio_eos|>\n{% elif 'text' in content %}{{ content['text'] }}{% endif %}"
    "{% endfor %}<|im_end|>\n{% endif %}{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


# --- config --------------------------------------------------------------------------------------------
def _audio_config(hf: dict[str, Any], where: str) -> AudioConfig:
    given = hf.get("audio_config")
    section = {**AUDIO_DEFAULTS, **{k: v for k, v in (given or {}).items() if v is not None}}
    if section["model_type"] != "qwen2_audio_encoder":
        raise CheckpointError(f"{where}: Qwen2-Audio with a {section['model_type']!r} audio tower is not supported "
                              "(only qwen2_audio_encoder)")
    try:
        audio = hf_whisper.audio_config_from_hf(section, pool_stride=2)  # the tower's AvgPool1d(2, stride=2)
    except ConfigError as e:
        raise CheckpointError(f"{where}: audio_config does not fit tinyomni: {e}") from None
    audio.pad_to_chunk = audio.pool_before_norm = True
    return audio


def _decoder_config(hf: dict[str, Any], where: str) -> DecoderConfig:
    text = dict(hf.get("text_config") or {})
    model_type = text.get("model_type", "qwen2")  # Qwen2AudioConfig's default text model
    if model_type != "qwen2":
        raise CheckpointError(f"{where}: Qwen2-Audio with a {model_type!r} language model is not supported "
                              "(only qwen2)")
    text = {**TEXT_DEFAULTS["qwen2"], **{k: v for k, v in text.items() if v is not None}, "model_type": "qwen2"}
    return decoder_config(text, where)


def _feature_extractor(path: Path) -> dict[str, Any]:
    """The feature extractor's settings: transformers 5 nests them in processor_config.json, older
    exports (and the hub's Qwen2-Audio repositories) keep them in preprocessor_config.json."""
    nested = _json(path / "processor_config.json").get("feature_extractor")
    return nested if isinstance(nested, dict) else _json(path / "preprocessor_config.json")


def check_feature_extractor(path: Path, audio: AudioConfig, where: str) -> None:
    """The checkpoint's WhisperFeatureExtractor must compute what processing/audio.chunk_log_mel does."""
    found = _feature_extractor(path)
    if not found:
        raise CheckpointError(f"{where}: no feature extractor settings (preprocessor_config.json, or "
                              "processor_config.json with a feature_extractor)")
    kind = found.get("feature_extractor_type", "WhisperFeatureExtractor")
    if kind != "WhisperFeatureExtractor":
        raise CheckpointError(f"{where}: feature extractor {kind!r} is not supported (only WhisperFeatureExtractor)")
    s = {**FEATURE_EXTRACTOR_DEFAULTS, **{k: v for k, v in found.items() if v is not None}}
    expected = {"feature_size": audio.num_mel_bins, "sampling_rate": SAMPLE_RATE, "n_fft": N_FFT,
                "hop_length": HOP_LENGTH, "padding_value": 0.0, "padding_side": "right", "dither": 0.0,
                "do_normalize": False}
    problems = [f"{key} {s[key]!r} (only {value!r})" for key, value in expected.items() if s[key] != value]
    # The chunk must be what the tower's positions hold: Qwen2-Audio refuses features of any other length.
    chunk_frames = int(s["chunk_length"]) * SAMPLE_RATE // HOP_LENGTH
    if chunk_frames != 2 * audio.max_source_positions:
        problems.append(f"chunk_length {s['chunk_length']} ({chunk_frames} frames; the tower's "
                        f"max_source_positions {audio.max_source_positions} need {2 * audio.max_source_positions})")
    for key, value in (("n_samples", chunk_frames * HOP_LENGTH), ("nb_max_frames", chunk_frames)):
        if key in found and found[key] != value:
            problems.append(f"{key} {found[key]} (the chunk has {value})")
    if problems:
        raise CheckpointError(f"{where}: unsupported feature extractor setting(s): {'; '.join(problems)}")


def _token_names(path: Path) -> dict[str, str]:
    """The audio token names, as Qwen2AudioProcessor picks them: the tokenizer's own, else the
    processor's, else its defaults."""
    meta = _json(path / "tokenizer_config.json")
    extra = meta.get("extra_special_tokens")
    extra = extra if isinstance(extra, dict) else {}
    processor = _json(path / "processor_config.json")

    def name(key: str) -> str:
        value = meta.get(key) or extra.get(key) or processor.get(key) or TOKEN_DEFAULTS[key]
        return str(value.get("content", TOKEN_DEFAULTS[key]) if isinstance(value, dict) else value)

    return {"audio_context_token": name("audio_token"), "audio_start_token": name("audio_bos_token"),
            "audio_end_token": name("audio_eos_token")}


# --- weights ---------------------------------------------------------------------------------------------
def _convert(weights: Weights, layout: dict[str, str], audio: AudioConfig, where: str) -> dict[str, torch.Tensor]:
    """Every checkpoint tensor under our name; unknown ones are a CheckpointError listing them."""
    tower_names = hf_whisper.whisper_name_map(audio.encoder_layers)
    tables = {"audio": tower_names.get, "projector": PROJECTOR_NAMES.get,
              "decoder": lambda name: _lookup(name, DECODER_NAMES, DECODER_LAYER_NAMES), "head": HEAD_NAMES.get}
    return rename_weights(weights, layout, tables, OUR_PREFIX, where, "Qwen2-Audio", DROPPED)


def _their_namer(layout: dict[str, str]):
    """Our name → the checkpoint's (for error messages)."""
    projector = {ours: theirs for theirs, ours in PROJECTOR_NAMES.items()}

    def name(ours: str) -> str:
        for part, prefix in OUR_PREFIX.items():
            if ours.startswith(prefix):
                rel = ours[len(prefix):]
                return layout[part] + (projector.get(rel, rel) if part == "projector" else rel)
        return ours

    return name


# --- tokenizer -------------------------------------------------------------------------------------------
def _tokenizer(path: Path, config: OmniConfig, audio_token_id: int, where: str) -> Tokenizer:
    tokenizer = Tokenizer.from_dir(path)
    if not tokenizer.add_bos_token and tokenizer.bos_token_id is not None:
        # A BOS may be prepended only by tokenizer.json's post-processor, which the processor applies.
        tokenizer.add_bos_token = tokenizer.backend.encode("", add_special_tokens=True).ids[:1] == [
            tokenizer.bos_token_id]
    names = (config.audio_start_token, config.audio_context_token, config.audio_end_token)
    absent = [n for n in names if tokenizer.token_to_id(n) is None]
    if absent:
        raise CheckpointError(f"{where}: the tokenizer lacks the audio token(s) {', '.join(absent)}")
    found = tokenizer.token_to_id(config.audio_context_token)
    if found != audio_token_id:
        raise CheckpointError(f"{where}: config.json says audio_token_index {audio_token_id} but the tokenizer "
                              f"has {config.audio_context_token} at {found}")
    if len(tokenizer) > config.decoder.vocab_size:
        raise CheckpointError(f"{where}: the tokenizer has {len(tokenizer)} tokens but the decoder only "
                              f"{config.decoder.vocab_size} embeddings")
    return tokenizer


# --- the family ----------------------------------------------------------------------------------------
def read_qwen2_audio(path: str | Path) -> Imported:
    """Read a transformers-native Qwen2-Audio directory (`Qwen2AudioForConditionalGeneration`)."""
    path = Path(path)
    where = str(path)
    raw = read_hf_config(path)
    if "audio_token_id" in raw and "audio_token_index" not in raw:  # Qwen2AudioConfig's attribute_map
        raw["audio_token_index"] = raw["audio_token_id"]
    hf = {**QWEN2_AUDIO_DEFAULTS, **{k: v for k, v in raw.items() if v is not None}}
    audio = _audio_config(hf, where)
    decoder = _decoder_config(hf, where)
    # transformers' Qwen2-Audio never ties its head to the embeddings (the class declares no tied
    # weights), whatever tie_word_embeddings says: lm_head is always read from the file.
    decoder.tie_word_embeddings = False
    config = OmniConfig(
        decoder=decoder, vision=None, audio=audio,
        audio_projector=ProjectorConfig(downsample_ratio=1.0, kind="linear", linear_bias=True),
        audio_in_template=True, **_token_names(path))
    try:
        config.validate()
    except ConfigError as e:
        raise CheckpointError(f"{where}: the config does not fit tinyomni: {e}") from None
    check_feature_extractor(path, audio, where)

    weights = Weights(path)
    in_memory = any(k.startswith(("model.language_model.", "model.audio_tower.")) for k in weights.keys())
    layout = LAYOUTS["in-memory" if in_memory else "saved"]
    state = _convert(weights, layout, audio, where)
    if OUR_PREFIX["head"] + "weight" not in state:
        raise CheckpointError(f"{where}: the checkpoint lacks weight(s) {layout['head']}weight (Qwen2-Audio never "
                              "ties it to the embeddings: transformers would start it from random values)")
    _check_complete(config, state, _their_namer(layout), where)

    tokenizer = _tokenizer(path, config, int(hf["audio_token_index"]), where)
    return Imported(config, state, tokenizer, read_chat_template(path) or DEFAULT_TEMPLATE)
