"""Bad input gets a clear error that names the problem, through the public API."""

from __future__ import annotations

import pytest

from tinyomni.errors import ContextLengthError, InputError


def ask_with(model, part):
    return model.chat([{"role": "user", "content": [part, {"type": "text", "text": "What is it?"}]}],
                      max_new_tokens=2)


def test_corrupt_image(tiny, tmp_path):
    bad = tmp_path / "photo.jpg"
    bad.write_bytes(b"\xff\xd8\xff\xe0 definitely not a jpeg")
    with pytest.raises(InputError, match="photo.jpg"):
        ask_with(tiny, {"type": "image", "image": str(bad)})


def test_missing_image(tiny, tmp_path):
    with pytest.raises(InputError, match="missing.png"):
        ask_with(tiny, {"type": "image", "image": str(tmp_path / "missing.png")})


def test_unsupported_audio(tiny, tmp_path):
    bad = tmp_path / "speech.xyz"
    bad.write_bytes(b"this is text, not sound" * 10)
    with pytest.raises(InputError, match="speech.xyz"):
        ask_with(tiny, {"type": "audio", "audio": str(bad)})


def test_unknown_content_part(tiny):
    with pytest.raises(InputError, match="unknown type 'hologram'"):
        ask_with(tiny, {"type": "hologram", "hologram": "x"})


def test_unknown_role(tiny):
    with pytest.raises(InputError, match="unknown role 'robot'"):
        tiny.chat([{"role": "robot", "content": "hi"}])


def test_prompt_longer_than_the_context(tiny):
    context = tiny.config.decoder.max_position_embeddings
    with pytest.raises(ContextLengthError, match=f"context is {context} tokens"):
        tiny.chat("word " * (context + 10), max_new_tokens=2)


def test_http_image_urls_are_not_fetched_silently(tiny):
    with pytest.raises(InputError, match="not fetched"):
        ask_with(tiny, {"type": "image_url", "image_url": {"url": "https://example.com/cat.png"}})


def test_media_for_a_model_without_that_encoder(tiny, media):
    import dataclasses

    from tinyomni.api import Model

    text_only = dataclasses.replace(tiny.config, audio=None)
    model = Model.__new__(Model)
    model.processor = type(tiny.processor)(tiny.tokenizer, text_only, tiny.chat_template)
    with pytest.raises(InputError, match="no audio encoder"):
        model.processor([{"role": "user", "content": [{"type": "audio", "audio": media["tone.wav"]}]}])
