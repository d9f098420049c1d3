"""Encoded media are kept by content (model/media_cache.py): an image or audio clip sent again, in the
next turn of a conversation or in another request, skips its tower and gives the same answer; a change
of the encoder's weights, autograd, or a full cache never serves a stale or wrong entry."""

from __future__ import annotations

import pytest
import torch

import tinyomni
from tinyomni.errors import InputError
from tinyomni.model.media_cache import MediaCache


def _counting(module: torch.nn.Module) -> list[int]:
    calls: list[int] = []
    module.register_forward_hook(lambda m, args, out: calls.append(args[0].shape[0]))
    return calls


def _turns(media: dict[str, str]) -> tuple[list, list]:
    first = [{"role": "user", "content": [{"type": "image", "image": media["red.png"]},
                                          {"type": "text", "text": "What colour is it?"}]}]
    second = first + [{"role": "assistant", "content": "Red."},
                      {"role": "user", "content": [{"type": "image", "image": media["wide.jpg"]},
                                                   {"type": "text", "text": "And this one?"}]}]
    return first, second


def test_the_next_turn_does_not_encode_its_earlier_images_again(media):
    model = tinyomni.tiny_random_model(seed=0)
    assert isinstance(model.model.media_cache, MediaCache)
    tiles = _counting(model.model.vision_tower)
    first, second = _turns(media)
    model.complete(first, max_new_tokens=2)
    seen = sum(tiles)
    assert seen >= 1
    tiles.clear()
    cached = model.complete(second, max_new_tokens=6)
    new_tiles = model.prepare(second).pixel_values.shape[0] - seen
    assert sum(tiles) == new_tiles  # only the new image's tiles ran
    model.model.media_cache = None
    tiles.clear()
    assert model.complete(second, max_new_tokens=6).token_ids == cached.token_ids
    assert sum(tiles) == new_tiles + seen


def test_embeddings_from_the_cache_equal_fresh_ones(media):
    model = tinyomni.tiny_random_model(seed=1)
    inner = model.model
    _, second = _turns(media)
    pixels = model.prepare(second).pixel_values
    with torch.inference_mode():
        inner.media_cache = None
        fresh = inner.encode_images(pixels)
        inner.media_cache = MediaCache()
        inner.encode_images(pixels[:1])  # some tiles seen before, some not
        mixed = inner.encode_images(pixels)
    assert inner.media_cache.hits == 1 and inner.media_cache.misses == pixels.shape[0]
    torch.testing.assert_close(mixed, fresh, rtol=1e-5, atol=1e-6)
    # Each entry holds its own tile, not the batch it was encoded in (the byte bound counts tiles).
    entries = list(inner.media_cache._entries.values())
    assert len(entries) == torch.unique(pixels.flatten(1), dim=0).shape[0]  # a plain image's tiles are alike
    assert all(e.untyped_storage().nbytes() == e.numel() * e.element_size() for e in entries)
    assert inner.media_cache.bytes == sum(e.numel() * e.element_size() for e in entries)


def test_changed_encoder_weights_are_never_served_from_the_cache(media):
    model = tinyomni.tiny_random_model(seed=2)
    inner = model.model
    pixels = model.prepare(_turns(media)[0]).pixel_values
    with torch.inference_mode():
        before = inner.encode_images(pixels)
    with torch.no_grad():  # a fine-tuning step changes the projector in place
        next(inner.multi_modal_projector.parameters()).mul_(1.5)
    with torch.inference_mode():
        after = inner.encode_images(pixels)
        inner.media_cache = None
        want = inner.encode_images(pixels)
    assert not torch.allclose(before, after)
    torch.testing.assert_close(after, want)


def test_training_always_runs_the_encoders(media):
    model = tinyomni.tiny_random_model(seed=0)
    inner = model.model
    pixels = model.prepare(_turns(media)[0]).pixel_values
    tiles = _counting(inner.vision_tower)
    for _ in range(2):
        out = inner.encode_images(pixels)  # autograd on
        assert out.requires_grad
    assert len(tiles) == 2 and len(inner.media_cache) == 0


def test_audio_clips_are_kept_too(media):
    model = tinyomni.tiny_random_model(seed=0)
    clips = _counting(model.model.audio_tower)
    ask = [{"role": "user", "content": [{"type": "audio", "audio": media["tone.wav"]},
                                        {"type": "text", "text": "What is it?"}]}]
    one = model.complete(ask, max_new_tokens=3)
    two = model.complete(ask, max_new_tokens=3)
    assert len(clips) == 1 and one.token_ids == two.token_ids


def test_the_least_recently_used_entries_leave_a_full_cache():
    cache = MediaCache(max_bytes=3 * 400)
    values = {k: torch.zeros(100) for k in (b"a", b"b", b"c", b"d")}  # 400 bytes each
    for k in (b"a", b"b", b"c"):
        cache.put(k, values[k])
    assert cache.get(b"a") is not None  # a is now the most recent
    cache.put(b"d", values[b"d"])
    assert cache.get(b"b") is None and cache.get(b"a") is not None and cache.get(b"d") is not None
    assert cache.bytes == 3 * 400
    cache.put(b"huge", torch.zeros(1000))  # larger than the whole cache: not kept
    assert cache.get(b"huge") is None and len(cache) == 3


def test_the_size_comes_from_the_environment(monkeypatch):
    monkeypatch.setenv("TINYOMNI_MEDIA_CACHE_MB", "0")
    assert MediaCache.from_env() is None
    monkeypatch.setenv("TINYOMNI_MEDIA_CACHE_MB", "2")
    assert MediaCache.from_env().max_bytes == 2 << 20
    monkeypatch.setenv("TINYOMNI_MEDIA_CACHE_MB", "lots")
    with pytest.raises(InputError, match="TINYOMNI_MEDIA_CACHE_MB"):
        MediaCache.from_env()
