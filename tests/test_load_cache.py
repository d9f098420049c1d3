"""The load cache: a model that takes work to build (a GGUF base decoder, a LoRA adapter to merge)
is built once; later loads read the built weights, answer exactly the same, and never use an entry
whose sources changed."""

from __future__ import annotations

import json

import pytest
import torch

import tinyomni
from tinyomni import api
from tinyomni.checkpoints import cache
from tinyomni.model import lora


@pytest.fixture
def cache_dir(tmp_path, monkeypatch):
    monkeypatch.setenv(cache.CACHE_ENV, str(tmp_path / "cache"))
    return tmp_path / "cache"


@pytest.fixture
def adapted(tmp_path):
    """A tiny checkpoint with a LoRA adapter: loading it merges the adapter, which the cache keeps."""
    model = tinyomni.tiny_random_model(seed=3)
    lora.apply_lora(model.model, lora.LoraConfig(r=4, alpha=8, targets=["q_proj", "v_proj"]))
    with torch.no_grad():
        for name, p in model.model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.2)  # a real change, so a missed merge would show
    return model.save(tmp_path / "ckpt")


def logits(model: api.Model, text: str = "hello there") -> torch.Tensor:
    with torch.no_grad():
        return model.model(torch.tensor([model.prepare(text).input_ids]))[0]


def test_second_load_reads_the_cache_and_answers_the_same(adapted, cache_dir, monkeypatch):
    first = tinyomni.load(adapted)
    assert first.decoder_modified and len(list(cache_dir.iterdir())) == 2  # the entry and digests.json

    def no_build(*args, **kwargs):
        raise AssertionError("built again instead of read from the cache")

    monkeypatch.setattr(api, "load_base_decoder", no_build)
    monkeypatch.setattr(lora, "load_adapter", no_build)
    second = tinyomni.load(adapted)
    assert torch.equal(logits(second), logits(first))
    assert (second.name, second.decoder_modified, second.config.base_decoder) == \
           (first.name, first.decoder_modified, first.config.base_decoder)
    assert second.chat("hi", max_new_tokens=8) == first.chat("hi", max_new_tokens=8)


def test_a_changed_source_is_never_served_stale(adapted, cache_dir):
    tinyomni.load(adapted)
    config = adapted / lora.ADAPTER_CONFIG
    adapter = json.loads(config.read_text())
    adapter["lora_alpha"] = adapter["lora_alpha"] * 4  # the same files, a different model
    config.write_text(json.dumps(adapter))
    changed = tinyomni.load(adapted)
    assert len([e for e in cache_dir.iterdir() if e.is_dir()]) == 2
    fresh = api._load_native(adapted)  # built directly, no cache involved
    assert torch.equal(logits(changed), logits(fresh))


def test_dtype_is_part_of_the_key_and_a_damaged_entry_is_rebuilt(adapted, cache_dir):
    bf16 = tinyomni.load(adapted, dtype="bfloat16")
    assert next(bf16.model.parameters()).dtype == torch.bfloat16
    f32 = tinyomni.load(adapted)
    assert next(f32.model.parameters()).dtype == torch.float32
    entries = [e for e in cache_dir.iterdir() if e.is_dir()]
    assert len(entries) == 2
    for entry in entries:
        (entry / "model.safetensors").write_bytes(b"not safetensors")
    again = tinyomni.load(adapted)
    assert torch.equal(logits(again), logits(f32))


def test_off_writes_nothing_and_the_cache_is_bounded(adapted, tmp_path, monkeypatch):
    monkeypatch.setenv(cache.CACHE_ENV, "off")
    tinyomni.load(adapted)
    assert cache.cache_root() is None
    monkeypatch.setenv(cache.CACHE_ENV, str(tmp_path / "small"))
    monkeypatch.setenv(cache.MAX_GB_ENV, "0.000001")  # about 1 KB: only the newest entry stays
    tinyomni.load(adapted)
    tinyomni.load(adapted, dtype="bfloat16")
    assert len([e for e in (tmp_path / "small").iterdir() if e.is_dir()]) == 1


def test_a_complete_checkpoint_loads_without_initialising_weights(tmp_path, monkeypatch):
    model = tinyomni.tiny_random_model(seed=1)
    path = model.save(tmp_path / "plain", store_decoder=True)

    real_normal = torch.nn.init.normal_

    def no_init(tensor, *args, **kwargs):
        if not tensor.is_meta:  # a meta tensor has no data: "initialising" it costs nothing
            raise AssertionError("weights were initialised only to be overwritten")
        return real_normal(tensor, *args, **kwargs)

    monkeypatch.setattr(torch.nn.init, "normal_", no_init)
    loaded = tinyomni.load(path)
    assert torch.equal(logits(loaded), logits(model))
    tied = loaded.model.language_model
    assert tied.lm_head.weight is tied.model.embed_tokens.weight


def test_a_build_that_was_cached_lets_go_of_the_float_base(adapted, cache_dir):
    """Later loads read the entry, so the dequantized base decoder (SmolLM2: 540 MB in float32) is not
    kept in the process: a first `serve --quantize int4` held 1.6 GB before, 0.42 GB now (measured)."""
    api.load_base_decoder("smollm2")
    assert api.load_base_decoder.cache_info().currsize >= 1
    tinyomni.load(adapted, quantize="int8")
    assert api.load_base_decoder.cache_info().currsize == 0
