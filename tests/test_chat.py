"""Chatting: the real SmolLM2 answers, and a tiny omni model takes every kind of media."""

from __future__ import annotations

import pytest
import torch
import transformers

from tinyomni.checkpoints.gguf import smollm2_gguf_path
from tinyomni.errors import InputError


def test_smollm2_knows_the_capital_of_france(smollm2):
    answer = smollm2.chat("What is the capital of France?", max_new_tokens=32)
    assert "Paris" in answer


def test_streaming_gives_the_same_text_as_a_full_answer(smollm2):
    question = [{"role": "user", "content": "Name three primary colours."}]
    deltas = list(smollm2.chat(question, stream=True, max_new_tokens=24))
    assert len(deltas) > 3
    assert "".join(deltas) == smollm2.chat(question, max_new_tokens=24)


def test_multi_turn_and_system_prompt_use_the_checkpoint_template(smollm2):
    messages = [{"role": "system", "content": "You answer briefly."},
                {"role": "user", "content": "What is the capital of Italy?"},
                {"role": "assistant", "content": "The capital of Italy is Rome."},
                {"role": "user", "content": "What is the capital city of France?"}]
    path = smollm2_gguf_path()
    hf_tok = transformers.AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    reference = hf_tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    assert smollm2.processor.render(messages) == reference
    assert "Paris" in smollm2.chat(messages, max_new_tokens=16)


def test_batch_of_prompts_answers_each(smollm2):
    answers = smollm2.chat_batch(["What is the capital of France?", "What is the capital of Germany?"],
                                 max_new_tokens=16)
    assert "Paris" in answers[0] and "Berlin" in answers[1]


def placeholder_count(model, prompt, token_id):
    return sum(1 for t in prompt.input_ids if t == token_id)


@pytest.mark.parametrize("parts", [
    ["image"], ["image", "image2"], ["video"], ["audio"], ["image", "video", "audio", "image2"],
])
def test_tiny_model_chats_with_every_kind_of_media(tiny, media, parts):
    sources = {"image": {"type": "image", "image": media["red.png"]},
               "image2": {"type": "image_url", "image_url": {"url": media["wide.jpg"]}},
               "video": {"type": "video", "video": media["clip.gif"]},
               "audio": {"type": "audio", "audio": media["tone.wav"]}}
    messages = [{"role": "user", "content": [sources[p] for p in parts] + [{"type": "text", "text": "Describe."}]}]
    prompt = tiny.prepare(messages)
    model = tiny.model
    n_image = placeholder_count(tiny, prompt, model.image_token_id)
    n_audio = placeholder_count(tiny, prompt, model.audio_token_id)
    with torch.no_grad():
        image_embeds = model.encode_images(prompt.pixel_values) if prompt.pixel_values is not None else None
        audio_embeds = [model.encode_audio(f) for f in prompt.audio_features]
    assert n_image == (0 if image_embeds is None else image_embeds.shape[0] * image_embeds.shape[1])
    assert n_audio == sum(a.shape[0] for a in audio_embeds)
    assert ("image" in parts or "video" in parts) == (n_image > 0)
    assert ("audio" in parts) == (n_audio > 0)
    if "video" in parts:
        text = tiny.tokenizer.decode(prompt.input_ids)
        assert "Frame1: " in text and "Frame4: " in text
    if "image2" in parts:
        assert "Image-2: " in tiny.tokenizer.decode(prompt.input_ids)
    completion = tiny.complete(messages, max_new_tokens=5)
    assert completion.completion_tokens >= 1
    assert completion.prompt_tokens == len(prompt.input_ids)


def test_wide_image_gets_dynamic_tiles_and_the_cap_is_respected(tiny, media):
    message = [{"role": "user", "content": [{"type": "image", "image": media["wide.jpg"]}, "Hi"]}]
    assert tiny.prepare(message).tiles_per_image == [3]  # 2 tiles (max_tiles=2) + thumbnail
    assert tiny.prepare(message, max_tiles=1).tiles_per_image == [1]


def test_placeholder_and_media_mismatch_is_a_clear_error(tiny, media):
    prompt = tiny.prepare([{"role": "user", "content": [{"type": "image", "image": media["red.png"]}, "Hi"]}])
    ids = torch.tensor([prompt.input_ids])
    with pytest.raises(InputError, match="image placeholder tokens"):
        tiny.model(ids, pixel_values=torch.cat([prompt.pixel_values, prompt.pixel_values]))
    with pytest.raises(InputError, match="image placeholder tokens"):
        tiny.model(ids)  # placeholders without pixels


def test_ask_helper_answers_about_an_image(tiny, media):
    assert isinstance(tiny.ask("What colour?", image=media["red.png"], max_new_tokens=3), str)
