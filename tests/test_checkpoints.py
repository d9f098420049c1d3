"""Checkpoints: native round trip (full and on a base decoder), imports, and clear errors."""

from __future__ import annotations

import json
import os

import pytest
import torch

import tinyomni
from tinyomni.checkpoints import native
from tinyomni.checkpoints.gguf import load_gguf
from tinyomni.config import OmniConfig
from tinyomni.errors import CheckpointError, ConfigError


def same_weights(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_full_round_trip_gives_the_same_model_and_answers(tiny, media, tmp_path):
    tiny.save(tmp_path / "ckpt")
    assert sorted(os.listdir(tmp_path / "ckpt")) == ["chat_template.jinja", "config.json", "model.safetensors",
                                                     "tokenizer.json", "tokenizer_config.json"]
    loaded = tinyomni.load(tmp_path / "ckpt")
    assert same_weights(loaded.model, tiny.model)
    assert loaded.config == tiny.config
    question = [{"role": "user", "content": [{"type": "image", "image": media["red.png"]}, "What is it?"]}]
    assert loaded.chat(question, max_new_tokens=6) == tiny.chat(question, max_new_tokens=6)


def test_checkpoint_on_a_base_decoder_stores_only_what_the_base_lacks(smollm2, tmp_path):
    path = smollm2.save(tmp_path / "small")
    size = (path / "model.safetensors").stat().st_size
    assert size < 120e6  # encoders + projectors + 6 embedding rows, not the 135M decoder
    loaded = tinyomni.load(path)
    assert same_weights(loaded.model, smollm2.model)
    assert "Paris" in loaded.chat("What is the capital of France?", max_new_tokens=16)


def test_half_precision_storage_halves_the_file_and_loads_back_in_float32(tiny, tmp_path):
    full = tiny.save(tmp_path / "full")
    half = tiny.save(tmp_path / "half", weights_dtype="float16")
    assert (half / "model.safetensors").stat().st_size < 0.6 * (full / "model.safetensors").stat().st_size
    loaded = tinyomni.load(half)
    for name, p in loaded.model.state_dict().items():
        assert p.dtype == torch.float32, name
        assert torch.allclose(p, tiny.model.state_dict()[name], rtol=1e-3, atol=1e-4), name
    copied = native.copy_checkpoint(full, tmp_path / "copy", weights_dtype=torch.float16)
    assert sorted(os.listdir(copied)) == sorted(os.listdir(full))
    # The same tensors as saving in float16 (not the same bytes: safetensors orders its metadata freely).
    a, b = native.read_weights(copied), native.read_weights(half)
    assert a.keys() == b.keys() and all(a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]) for k in a)


def test_saving_over_a_checkpoint_replaces_it_whole(tiny, tmp_path):
    tiny.save(tmp_path / "ckpt")
    tiny.save(tmp_path / "ckpt")
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt"]  # no temporary leftovers


def test_an_interrupted_save_leaves_the_previous_checkpoint(tiny, tmp_path):
    tiny.save(tmp_path / "ckpt")

    def crash(directory):
        (directory / "config.json").write_text("{half")
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        native.atomic_directory(tmp_path / "ckpt", crash)
    assert same_weights(tinyomni.load(tmp_path / "ckpt").model, tiny.model)
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt"]


def test_missing_checkpoint_and_missing_files_are_named(tiny, tmp_path):
    with pytest.raises(CheckpointError, match="no model at"):
        tinyomni.load(tmp_path / "nowhere")
    tiny.save(tmp_path / "ckpt")
    (tmp_path / "ckpt" / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match="model.safetensors"):
        tinyomni.load(tmp_path / "ckpt")


def test_truncated_weights_are_a_clear_error(tiny, tmp_path):
    tiny.save(tmp_path / "ckpt")
    weights = tmp_path / "ckpt" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    with pytest.raises(CheckpointError, match="corrupt or truncated"):
        tinyomni.load(tmp_path / "ckpt")


def test_weights_that_do_not_fit_the_config_are_named(tiny, tmp_path):
    tiny.save(tmp_path / "ckpt")
    config = json.loads((tmp_path / "ckpt" / "config.json").read_text())
    config["decoder"]["num_hidden_layers"] = 3
    (tmp_path / "ckpt" / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match="missing language_model.model.layers.2"):
        tinyomni.load(tmp_path / "ckpt")


def test_bad_config_is_a_clear_error(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"decoder": {"hidden_sise": 3}}))
    with pytest.raises(ConfigError, match="unknown decoder field.*hidden_sise"):
        OmniConfig.load(tmp_path / "config.json")
    (tmp_path / "config.json").write_text(json.dumps({"decoder": {"num_attention_heads": 5,
                                                                  "num_key_value_heads": 2}}))
    with pytest.raises(ConfigError, match="multiple of num_key_value_heads"):
        OmniConfig.load(tmp_path / "config.json")


def test_config_json_round_trip(tiny, tmp_path):
    tiny.config.save(tmp_path / "config.json")
    assert OmniConfig.load(tmp_path / "config.json") == tiny.config


def test_corrupt_or_truncated_gguf_is_a_clear_error(tmp_path):
    bad = tmp_path / "model.gguf"
    bad.write_bytes(b"GGUF" + b"\x00" * 20)
    with pytest.raises(CheckpointError, match="model.gguf"):
        load_gguf(bad)
    with pytest.raises(CheckpointError, match="not found"):
        load_gguf(tmp_path / "missing.gguf")


@pytest.mark.parametrize("padding", [0, 64])  # Qwen2 checkpoints pad the table past the tokenizer
def test_hf_directory_loads_as_a_base_decoder(tmp_path, padding):
    transformers = pytest.importorskip("transformers")
    from tinyomni.checkpoints.gguf import smollm2_gguf_path

    gguf = smollm2_gguf_path()
    tokenizer = transformers.AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    tokenizer.save_pretrained(tmp_path)
    config = transformers.LlamaConfig(vocab_size=len(tokenizer) + padding, hidden_size=64, intermediate_size=128,
                                      num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                      tie_word_embeddings=True, eos_token_id=2)
    transformers.LlamaForCausalLM(config).save_pretrained(tmp_path)
    model = tinyomni.load(tmp_path)
    assert model.config.decoder.vocab_size == len(tokenizer) + max(padding, 6)  # 6 media tokens added
    assert model.tokenizer.eos_token_ids == [2]
    assert model.processor.render([{"role": "user", "content": "hi"}]).startswith("<|im_start|>")
    assert isinstance(model.chat("hi", max_new_tokens=3), str)
