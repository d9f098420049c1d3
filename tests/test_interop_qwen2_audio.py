"""Qwen2-Audio checkpoints load with exact parity: tiny random transformers-native models
(`Qwen2AudioForConditionalGeneration`: a Whisper encoder padded to 30 s with its stride-2 average pool,
one Linear, a Qwen2 decoder) are saved with their own tokenizer, feature extractor and processor files,
loaded with `tinyomni.load(dir)`, and compared with transformers on the same clip + prompt (input
features, input ids, fp32 logits, a greedy continuation). Also: the errors for what does not load.

Nothing comes from a hub: the tokenizer is trained here on a few sentences, the weights are random.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from parity import assert_logits_match, assert_same_greedy, relative_error
from safetensors.torch import load_file, save_file
from test_interop_llava import copy_dir, edit_json, randomize

import tinyomni
from tinyomni.checkpoints.families import family_for
from tinyomni.errors import CheckpointError, InputError
from tinyomni.processing.audio import CHUNK_CONTEXT_FRAMES, chunk_log_mel, log_mel_spectrogram

transformers = pytest.importorskip("transformers")
tokenizers = pytest.importorskip("tokenizers")

N_MELS = 128  # Qwen2-Audio's
CORPUS = ["What does the person say? Transcribe the audio in English.\nThe speaker says: a red circle.",
          "How many words are spoken?\nAnswer with a number: 1 2 3 4 5 6 7 8 9 0",
          "The quick brown fox jumps over the lazy dog. Audio 1: user assistant system"] * 4
SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|AUDIO|>", "<|audio_bos|>", "<|audio_eos|>"]
# Qwen2-Audio-7B-Instruct's chat template (its chat_template.json): ChatML, a default system turn, and
# "Audio k: <|audio_bos|><|AUDIO|><|audio_eos|>\n" for each part with an 'audio' (or 'audio_url') key.
TEMPLATE = (
    "{% set audio_count = namespace(value=0) %}{% for message in messages %}{% if loop.first and "
    "message['role'] != 'system' %}<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "<|im_start|>{{ message['role'] }}\n{% if message['content'] is string %}{{ message['content'] }}<|im_end|>\n"
    "{% else %}{% for content in message['content'] %}{% if 'audio' in content or 'audio_url' in content %}"
    "{% set audio_count.value = audio_count.value + 1 %}Audio {{ audio_count.value }}: "
    "<|audio_bos|><|AUDIO|><|audio_eos|>\n{% elif 'text' in content %}{{ content['text'] }}{% endif %}"
    "{% endfor %}<|im_end|>\n{% endif %}{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


# --- building tiny checkpoints -------------------------------------------------------------------------
def make_tokenizer(path: Path):
    """A byte-level BPE without BOS, as Qwen2's, with Qwen2-Audio's audio tokens, saved to `path`."""
    from tokenizers import decoders, models, pre_tokenizers, trainers

    backend = tokenizers.Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    backend.train_from_iterator(CORPUS, trainers.BpeTrainer(
        vocab_size=320, special_tokens=SPECIAL, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False))
    wrapped = transformers.PreTrainedTokenizerFast(
        tokenizer_object=backend, eos_token="<|im_end|>", pad_token="<|endoftext|>",
        extra_special_tokens={"audio_token": "<|AUDIO|>", "audio_bos_token": "<|audio_bos|>",
                              "audio_eos_token": "<|audio_eos|>"})
    wrapped.save_pretrained(path)
    return transformers.AutoTokenizer.from_pretrained(path)


def build(path: Path, heads: tuple[int, int] = (3, 1), audio_heads: int = 2, layers: int = 2, tied: bool = False,
          spelling: str = "saved", template: str | None = TEMPLATE, seed: int = 0):
    """A tiny Qwen2-Audio checkpoint directory at `path`; returns the transformers model (fp32, eval)."""
    tokenizer = make_tokenizer(path)
    n_heads, n_kv = heads
    text_config = transformers.Qwen2Config(
        vocab_size=len(tokenizer) + 3, hidden_size=n_heads * 16, intermediate_size=80, num_hidden_layers=2,
        num_attention_heads=n_heads, num_key_value_heads=n_kv, max_position_embeddings=2048, rms_norm_eps=1e-6,
        rope_theta=1000000.0, tie_word_embeddings=tied)
    audio_config = transformers.Qwen2AudioEncoderConfig(
        num_mel_bins=N_MELS, d_model=audio_heads * 8, encoder_layers=layers, encoder_attention_heads=audio_heads,
        encoder_ffn_dim=48, max_source_positions=1500)
    config = transformers.Qwen2AudioConfig(audio_config=audio_config, text_config=text_config,
                                           audio_token_index=tokenizer.convert_tokens_to_ids("<|AUDIO|>"),
                                           tie_word_embeddings=tied)
    torch.manual_seed(seed)
    model = transformers.Qwen2AudioForConditionalGeneration(config).eval()
    randomize(model, seed)
    with torch.no_grad():  # Whisper's fixed sinusoids, as real checkpoints hold them
        from tinyomni.model.audio import sinusoids
        model.model.audio_tower.embed_positions.weight.copy_(sinusoids(1500, audio_config.d_model))
    model.save_pretrained(path)
    if spelling == "in-memory":
        # transformers 5's in-memory names, in bfloat16 as the hub stores weights; the reference is then
        # what transformers loads from that file, in float32.
        state = {k: v.contiguous().to(torch.bfloat16) for k, v in model.state_dict().items()}
        for f in path.glob("model*.safetensors*"):
            f.unlink()
        save_file(state, str(path / "model.safetensors"), metadata={"format": "pt"})
        model = transformers.Qwen2AudioForConditionalGeneration.from_pretrained(path, dtype=torch.float32).eval()
    extractor = transformers.WhisperFeatureExtractor(feature_size=N_MELS, return_attention_mask=True)
    processor = transformers.Qwen2AudioProcessor(feature_extractor=extractor, tokenizer=tokenizer,
                                                 chat_template=template)
    processor.save_pretrained(path)
    if template is None:  # what a checkpoint without a template of its own looks like
        for name in ("chat_template.jinja", "chat_template.json"):
            (path / name).unlink(missing_ok=True)
    return model


def reference_processor(path: Path):
    processor = transformers.AutoProcessor.from_pretrained(path)
    assert isinstance(processor, transformers.Qwen2AudioProcessor)
    return processor


def clip(seconds: float, seed: int = 0) -> np.ndarray:
    """A tone sweep in noise, so every mel band and frame differs."""
    n = int(round(seconds * 16000))
    t = np.arange(n) / 16000
    rng = np.random.default_rng(seed)
    tone = 0.3 * np.sin(2 * np.pi * (200 + 600 * t / max(seconds, 1e-3)) * t)
    return (tone + 0.05 * rng.standard_normal(n)).astype(np.float32)


def conversation(*clips: np.ndarray, question: str = "What does the person say?") -> list[dict]:
    parts = [{"type": "audio", "audio": (c, 16000)} for c in clips]
    return [{"role": "user", "content": [*parts, {"type": "text", "text": question}]}]


def reference_inputs(processor, messages: list[dict], clips: list[np.ndarray]) -> dict:
    text = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    return processor(text=text, audio=clips, sampling_rate=16000, return_tensors="pt")


def features_of(inputs: dict, k: int = 0) -> tuple[torch.Tensor, int]:
    """The extractor's 30 s features of clip k and how many frames its attention mask marks."""
    return inputs["input_features"][k], int(inputs["feature_attention_mask"][k].sum())


def check_features(prompt, inputs: dict) -> None:
    """Our features are the extractor's: the clip's frames and the CHUNK_CONTEXT_FRAMES after them."""
    assert len(prompt.audio_features) == inputs["input_features"].shape[0]
    for k, ours in enumerate(prompt.audio_features):
        theirs, frames = features_of(inputs, k)
        keep = min(frames + CHUNK_CONTEXT_FRAMES, theirs.shape[-1])
        assert ours.shape == (N_MELS, frames + CHUNK_CONTEXT_FRAMES)
        assert (ours[:, :keep] - theirs[:, :keep]).abs().max().item() <= 1e-4
        assert not ours[:, keep:].any()  # past the chunk: the conv's own zero padding


# --- parity --------------------------------------------------------------------------------------------
CASES = {
    # Qwen2-Audio's shape: untied, Qwen2 3 heads over 1, the hub's template, a 2.3 s clip.
    "saved-3over1": dict(build=dict(heads=(3, 1), audio_heads=2, layers=2), seconds=(2.3,)),
    # transformers 5's in-memory names in bf16; odd heads (5 over 5, audio 3); tie_word_embeddings true (a
    # head is still stored and used: the class never ties); a clip under a second.
    "in-memory-5over5-tied-flag": dict(build=dict(heads=(5, 5), audio_heads=3, layers=1, tied=True,
                                                  spelling="in-memory"), seconds=(0.45,)),
    # No template in the checkpoint (Qwen2AudioProcessor's default); two clips in one message, one odd length.
    "default-template-two-clips": dict(build=dict(heads=(3, 3), audio_heads=2, layers=3, template=None),
                                       seconds=(1.21, 0.633)),
}


@pytest.mark.parametrize("case", list(CASES))
def test_logits_and_greedy_continuation_match_transformers(case: str, tmp_path: Path) -> None:
    options = CASES[case]
    reference = build(tmp_path, **options["build"], seed=len(case))
    ours = tinyomni.load(tmp_path)
    assert family_for(tmp_path)[0] == "Qwen2AudioForConditionalGeneration"
    assert ours.config.vision is None and ours.model.vision_tower is None
    assert not ours.config.decoder.tie_word_embeddings

    clips = [clip(s, seed=k) for k, s in enumerate(options["seconds"])]
    messages = conversation(*clips)
    inputs = reference_inputs(reference_processor(tmp_path), messages, clips)
    prompt = ours.prepare(messages)
    assert prompt.input_ids == inputs["input_ids"][0].tolist()
    check_features(prompt, inputs)

    ids = torch.tensor([prompt.input_ids])
    projected = []  # what transformers' projector makes of the whole 30 s chunk (750 positions a clip)
    hook = reference.model.multi_modal_projector.register_forward_hook(lambda m, i, out: projected.append(out))
    with torch.no_grad():
        logits, _ = ours.model(ids, audio_features=prompt.audio_features)
        theirs = reference(**inputs).logits
        hook.remove()
        for k, features in enumerate(prompt.audio_features):  # ours: only the clip's own positions
            mine = ours.model.encode_audio(features)
            assert relative_error(mine, projected[0][k, :mine.shape[0]]) <= 1e-5
    assert_logits_match(logits, theirs)
    assert_same_greedy(ours, reference, messages, inputs, ids.shape[1])


@pytest.fixture(scope="module")
def audio_dir(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("qwen2-audio")
    build(path, heads=(3, 1), audio_heads=2, layers=1)
    return path


@pytest.mark.parametrize("seconds", [0.03, 0.37, 0.999, 4.0, 12.3456, 29.95, 30.0])
def test_features_and_ids_match_the_processor(audio_dir: Path, seconds: float) -> None:
    """WhisperFeatureExtractor's features (the whole 30 s chunk, and the frames we keep) and the
    processor's <|AUDIO|> count, from 30 ms to exactly 30 s."""
    ours = tinyomni.load(audio_dir)
    samples = clip(seconds, seed=int(seconds * 10))
    processor = reference_processor(audio_dir)
    messages = conversation(samples)
    inputs = reference_inputs(processor, messages, [samples])
    theirs, frames = features_of(inputs)
    chunk = log_mel_spectrogram(samples, n_mels=N_MELS, pad_to_samples=480000)
    assert (chunk - theirs).abs().max().item() <= 1e-4
    features, our_frames = chunk_log_mel(samples, n_mels=N_MELS)
    assert our_frames == frames
    prompt = ours.prepare(messages)
    assert prompt.input_ids == inputs["input_ids"][0].tolist()
    check_features(prompt, inputs)
    assert torch.equal(prompt.audio_features[0], features)


def test_a_longer_conversation_gives_the_processor_ids(audio_dir: Path) -> None:
    """System turn, text before the clip, two clips in two turns, an assistant turn; the template numbers
    the clips across the conversation ("Audio 1:", "Audio 2:")."""
    ours = tinyomni.load(audio_dir)
    first, second = clip(1.7, seed=1), clip(0.52, seed=2)
    messages = [
        {"role": "system", "content": [{"type": "text", "text": "Answer with a number."}]},
        {"role": "user", "content": [{"type": "text", "text": "How many words are spoken?"},
                                     {"type": "audio", "audio": (first, 16000)}]},
        {"role": "assistant", "content": [{"type": "text", "text": "3"}]},
        {"role": "user", "content": [{"type": "audio", "audio": (second, 16000)},
                                     {"type": "text", "text": "The quick brown fox?"}]},
    ]
    inputs = reference_inputs(reference_processor(audio_dir), messages, [first, second])
    prompt = ours.prepare(messages)
    assert prompt.input_ids == inputs["input_ids"][0].tolist()
    check_features(prompt, inputs)


def test_typed_audio_tokens_stay_text(audio_dir: Path) -> None:
    """A user typing "<|AUDIO|>" or "<|audio_bos|>" gets no audio slot: both stay plain text."""
    ours = tinyomni.load(audio_dir)
    p = ours.processor
    samples = clip(0.5)
    prompt = ours.prepare([{"role": "user", "content": [
        {"type": "audio", "audio": (samples, 16000)}, {"type": "text", "text": "<|AUDIO|> <|audio_bos|> Say it"}]}])
    assert prompt.input_ids.count(p.audio_start_id) == 1 == prompt.input_ids.count(p.audio_end_id)
    assert prompt.input_ids.count(p.audio_context_id) == 12  # 50 frames → 25 positions → 12 whole windows
    assert "<|AUDIO|> <|audio_bos|>" in ours.tokenizer.decode(prompt.input_ids, skip_special_tokens=False)


def test_over_30_seconds_is_refused_and_too_short_too(audio_dir: Path) -> None:
    """Qwen2-Audio's processor keeps the first 30 s of a longer clip and drops the rest silently (its
    attention mask stops at 3000 frames); we refuse the clip instead. A clip of 1-2 frames gives
    Qwen2-Audio no embeddings at all: refused too."""
    ours = tinyomni.load(audio_dir)
    long = clip(31.0)
    inputs = reference_inputs(reference_processor(audio_dir), conversation(long), [long])
    assert features_of(inputs)[1] == 3000  # truncated, not refused
    with pytest.raises(InputError, match=r"31\.0 s; at most 30 s"):
        ours.prepare(conversation(long))
    with pytest.raises(InputError, match="too short"):
        ours.prepare(conversation(clip(0.01)))


def test_config_comes_from_the_checkpoint_files(audio_dir: Path) -> None:
    config = tinyomni.load(audio_dir).config
    assert config.audio.num_mel_bins == N_MELS and config.audio.pool_stride == 2
    assert config.audio.pad_to_chunk and config.audio.pool_before_norm
    assert config.audio_projector.kind == "linear" and config.audio_projector.linear_bias
    assert (config.audio_start_token, config.audio_context_token, config.audio_end_token) == (
        "<|audio_bos|>", "<|AUDIO|>", "<|audio_eos|>")
    assert config.audio_in_template and config.vision is None


def test_saved_import_loads_back_as_a_native_checkpoint(audio_dir: Path, tmp_path: Path) -> None:
    ours = tinyomni.load(audio_dir)
    ours.save(tmp_path / "saved")
    again = tinyomni.load(tmp_path / "saved")
    assert again.config == ours.config
    messages = conversation(clip(0.8))
    prompt = ours.prepare(messages)
    assert again.prepare(messages).input_ids == prompt.input_ids
    ids = torch.tensor([prompt.input_ids])
    with torch.no_grad():
        a, _ = ours.model(ids, audio_features=prompt.audio_features)
        b, _ = again.model(ids, audio_features=prompt.audio_features)
    assert torch.equal(a, b)


# --- errors --------------------------------------------------------------------------------------------
def test_a_missing_tensor_is_named(audio_dir: Path, tmp_path: Path) -> None:
    path = copy_dir(audio_dir, tmp_path / "ckpt")
    file = path / "model.safetensors"
    state = load_file(str(file))
    state.pop("audio_tower.layers.0.fc2.weight")
    save_file(state, str(file), metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match=r"lacks weight\(s\) audio_tower[.]layers[.]0[.]fc2[.]weight"):
        tinyomni.load(path)


def test_a_missing_head_is_named(audio_dir: Path, tmp_path: Path) -> None:
    """transformers never ties Qwen2-Audio's head: without one in the file it would start random."""
    path = copy_dir(audio_dir, tmp_path / "ckpt")
    edit_json(path / "config.json", lambda c: c.update(tie_word_embeddings=True))
    file = path / "model.safetensors"
    state = load_file(str(file))
    state.pop("language_model.lm_head.weight")
    save_file(state, str(file), metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match=r"lacks weight\(s\) language_model[.]lm_head[.]weight.*never ties"):
        tinyomni.load(path)


def test_an_unknown_tensor_is_named(audio_dir: Path, tmp_path: Path) -> None:
    path = copy_dir(audio_dir, tmp_path / "ckpt")
    file = path / "model.safetensors"
    state = load_file(str(file))
    state["multi_modal_projector.linear_2.weight"] = torch.ones(4, 4)
    save_file(state, str(file), metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match=r"unknown Qwen2-Audio weight\(s\) multi_modal_projector\.linear_2"):
        tinyomni.load(path)


@pytest.mark.parametrize("change, message", [
    (lambda c: c["audio_config"].update(model_type="whisper"), "'whisper' audio tower is not supported"),
    (lambda c: c["audio_config"].update(activation_function="swish"), "activation_function"),
    (lambda c: c["audio_config"].update(max_source_positions=750), "chunk_length 30"),
    (lambda c: c["text_config"].update(model_type="llama"), "'llama' language model is not supported"),
    (lambda c: c["text_config"].update(hidden_act="gelu"), "hidden_act 'gelu'"),
    (lambda c: c["text_config"].update(use_sliding_window=True), "use_sliding_window"),
    (lambda c: c.update(audio_token_index=5), "audio_token_index 5"),  # <|audio_eos|>
])
def test_unsupported_config_values_are_named(audio_dir: Path, tmp_path: Path, change, message: str) -> None:
    path = copy_dir(audio_dir, tmp_path / "ckpt")
    edit_json(path / "config.json", change)
    with pytest.raises(CheckpointError, match=message):
        tinyomni.load(path)


@pytest.mark.parametrize("change, message", [
    (lambda c: c.update(feature_size=80), "feature_size 80"),
    (lambda c: c.update(dither=1e-5), "dither"),
    (lambda c: c.update(hop_length=320), "hop_length 320"),
    (lambda c: c.update(chunk_length=20), "chunk_length 20"),
    (lambda c: c.update(feature_extractor_type="ParakeetFeatureExtractor"), "'ParakeetFeatureExtractor'"),
])
def test_unsupported_feature_extractor_settings_are_named(audio_dir: Path, tmp_path: Path, change,
                                                          message: str) -> None:
    path = copy_dir(audio_dir, tmp_path / "ckpt")
    edit_json(path / "processor_config.json", lambda c: change(c["feature_extractor"]))
    with pytest.raises(CheckpointError, match=message):
        tinyomni.load(path)


def test_a_missing_audio_token_is_named(audio_dir: Path, tmp_path: Path) -> None:
    path = copy_dir(audio_dir, tmp_path / "ckpt")
    edit_json(path / "processor_config.json", lambda c: c.update(audio_bos_token="<|startofaudio|>"))
    edit_json(path / "tokenizer_config.json", lambda c: c.pop("audio_bos_token"))
    with pytest.raises(CheckpointError, match=r"lacks the audio token\(s\) <\|startofaudio\|>"):
        tinyomni.load(path)


def test_pool_before_norm_in_a_masked_batch_equals_each_clip_alone() -> None:
    """Our own towers may pool before the norm (the toy speech LLM recipe), and batch unequal clips with
    a mask (contrastive pretraining): each clip gets what it gets alone, whole windows only."""
    from tinyomni.config import AudioConfig
    from tinyomni.model.audio import AudioEncoder, audio_output_length

    config = AudioConfig(num_mel_bins=16, d_model=16, encoder_layers=1, encoder_attention_heads=2,
                         encoder_ffn_dim=32, pool_before_norm=True)
    torch.manual_seed(0)
    encoder = AudioEncoder(config).eval()
    lengths = [37, 20, 9]  # 19, 10, 5 positions → 9, 5, 2 embeddings
    clips = [torch.randn(16, n) for n in lengths]
    batch = torch.stack([torch.nn.functional.pad(c, (0, 37 - c.shape[-1])) for c in clips])
    mask = torch.stack([torch.arange(37) < n for n in lengths]).long()
    with torch.no_grad():
        together = encoder(batch, attention_mask=mask)
        for k, c in enumerate(clips):
            alone = encoder(c[None])[0]
            assert alone.shape[0] == audio_output_length(lengths[k], config) == [9, 5, 2][k]
            assert torch.allclose(together[k, :alone.shape[0]], alone, atol=1e-5)
            assert not together[k, alone.shape[0]:].any()
