"""recipes/toy-speech-llm.toml: a tinyomni speech LLM of Qwen2-Audio's design (Whisper-style encoder →
average pool before the final norm → one Linear → decoder) trains on the world's speech and chats.

The recipe's decoder (SmolLM2) is swapped for a tiny random Qwen2 decoder saved here as a Hugging Face
directory, so the run takes seconds.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

import tinyomni
from tinyomni.model.projector import LinearProjector
from tinyomni.train import load_recipe, train
from tinyomni.train.trainer import build_model

transformers = pytest.importorskip("transformers")
tokenizers = pytest.importorskip("tokenizers")
pytestmark = pytest.mark.skipif(shutil.which("espeak-ng") is None, reason="espeak-ng not installed")

RECIPE = Path(__file__).resolve().parents[1] / "recipes" / "toy-speech-llm.toml"
CHATML = ("{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + "
          "'<|im_end|>' + '\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")


def tiny_decoder(path: Path) -> Path:
    """A random 2-layer Qwen2 decoder with a byte-level BPE tokenizer, as a Hugging Face directory."""
    from tokenizers import decoders, models, pre_tokenizers, trainers

    backend = tokenizers.Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    corpus = ["Transcribe the audio. What is said in the audio? Write down what you hear.",
              "Answer the spoken question. one two three four five six seven eight nine ten 0 1 2 3 4 5 6 7 8 9"] * 4
    backend.train_from_iterator(corpus, trainers.BpeTrainer(
        vocab_size=300, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False))
    tokenizer = transformers.PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="<|im_end|>",
                                                     pad_token="<|endoftext|>")
    tokenizer.chat_template = CHATML
    tokenizer.save_pretrained(path)
    config = transformers.Qwen2Config(vocab_size=len(tokenizer), hidden_size=48, intermediate_size=96,
                                      num_hidden_layers=2, num_attention_heads=3, num_key_value_heads=1,
                                      max_position_embeddings=1024, tie_word_embeddings=True,
                                      eos_token_id=tokenizer.eos_token_id)
    torch.manual_seed(0)
    transformers.Qwen2ForCausalLM(config).save_pretrained(path)
    return path


def test_toy_speech_llm_recipe_trains_and_chats(tmp_path: Path) -> None:
    base = tiny_decoder(tmp_path / "decoder")
    recipe = load_recipe(RECIPE, [f'model.base="{base}"', f'run.out="{tmp_path / "run"}"'])
    result = train(recipe, progress=False)

    rows = [json.loads(line) for line in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in rows if r["type"] == "train"]
    assert len(losses) == 12 and all(np.isfinite(losses))

    # What the recipe trains moved from where build_model starts (the same seeded model every time);
    # the vision tower, never trained, did not. (Through a random decoder the loss hardly moves in 12
    # steps; the run on SmolLM2 is in docs/models.md.)
    model = tinyomni.load(result.model_dir)
    start = build_model(recipe).model.state_dict()
    trained = model.model.state_dict()
    for name in ("audio_tower.conv1.weight", "audio_tower.layers.1.fc2.weight", "audio_projector.proj.weight"):
        assert not torch.equal(trained[name], start[name]), name
    assert torch.equal(trained["vision_tower.embeddings.patch_embedding.weight"],
                       start["vision_tower.embeddings.patch_embedding.weight"])
    audio = model.config.audio
    assert (audio.num_mel_bins, audio.pool_stride, audio.pool_before_norm, audio.pad_to_chunk) == (128, 2, True, False)
    assert model.config.audio_projector.kind == "linear" and isinstance(model.model.audio_projector, LinearProjector)
    assert model.model.audio_projector.proj.bias is not None
    # One second of audio: 100 frames → 50 positions → 25 tokens between the audio start and end tokens.
    samples = np.sin(2 * np.pi * 440 * np.arange(16000) / 16000).astype(np.float32)
    messages = [{"role": "user", "content": [{"type": "audio", "audio": (samples, 16000)},
                                             {"type": "text", "text": "What is said in the audio?"}]}]
    assert model.prepare(messages).input_ids.count(model.processor.audio_context_id) == 25
    assert isinstance(model.chat(messages, max_new_tokens=3), str)
