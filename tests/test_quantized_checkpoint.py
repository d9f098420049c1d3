"""Saved quantized checkpoints (engine/checkpoint.py, `tinyomni quantize`): written once, loaded as they
are with the same logits as the model quantized at load, refused by name when damaged or from
another format, and used by the load cache for `quantize=` loads."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch
from safetensors.torch import load_file, save_file

import tinyomni
from tinyomni import api
from tinyomni.checkpoints import cache
from tinyomni.engine import QuantEmbedding, QuantLinear
from tinyomni.engine import checkpoint as qckpt
from tinyomni.errors import CheckpointError, InputError
from tinyomni.model.omni import OmniModel


def _roughen(model: api.Model) -> api.Model:
    generator = torch.Generator().manual_seed(0)  # larger weights, so quantization errors would show
    with torch.no_grad():
        for p in model.model.language_model.parameters():
            if p.dim() == 2:
                p.copy_(torch.randn(p.shape, generator=generator) * 0.2)
    return model


@pytest.fixture(scope="module")
def float_dir(tmp_path_factory):
    return _roughen(tinyomni.tiny_random_model(seed=4)).save(tmp_path_factory.mktemp("qc") / "float")


@pytest.fixture(scope="module")
def int4_dir(float_dir):
    return tinyomni.load(float_dir, quantize="int4").save(float_dir.parent / "int4")


def logits(model: api.Model, text: str = "hello there, how are you") -> torch.Tensor:
    with torch.no_grad():
        return model.model(torch.tensor([model.prepare(text).input_ids]))[0]


@pytest.mark.parametrize("mode", ["int8", "int4"])
def test_saved_then_loaded_equals_quantized_at_load(float_dir, tmp_path, mode, monkeypatch):
    at_load = tinyomni.load(float_dir, quantize=mode)
    path = at_load.save(tmp_path / mode)
    spec = json.loads((path / qckpt.SPEC_FILE).read_text())
    assert spec["format"] == qckpt.FORMAT and spec["version"] == qckpt.VERSION and spec["mode"] == mode

    def no_quantizing(*args, **kwargs):
        raise AssertionError("a quantized checkpoint was quantized again")

    monkeypatch.setattr("tinyomni.engine.quantize_model", no_quantizing)
    loaded = tinyomni.load(path)
    assert loaded.quantization == mode
    assert torch.equal(logits(loaded), logits(at_load))
    assert loaded.chat("hi", max_new_tokens=6, max_repeat_tokens=0) == \
        at_load.chat("hi", max_new_tokens=6, max_repeat_tokens=0)
    decoder = loaded.model.language_model
    assert not any(type(m) is torch.nn.Linear for m in decoder.modules())
    assert isinstance(decoder.model.embed_tokens, QuantEmbedding)
    assert decoder.model.embed_tokens.table is decoder.lm_head
    # The packed blocks are the file's tensors, not a float weight quantized again.
    stored = load_file(str(path / "model.safetensors"))
    assert torch.equal(decoder.lm_head.qweight, stored["language_model.lm_head.qweight"])
    assert not any(k.endswith("q_proj.weight") and k.startswith("language_model") for k in stored)


def test_an_untied_head_and_bfloat16_round_trip(tmp_path):
    tiny = tinyomni.tiny_random_model(seed=5)
    config = dataclasses.replace(tiny.config, decoder=dataclasses.replace(tiny.config.decoder,
                                                                         tie_word_embeddings=False))
    torch.manual_seed(1)
    untied = _roughen(api.Model(OmniModel(config), tiny.tokenizer, tiny.chat_template))
    path = untied.save(tmp_path / "float")
    at_load = tinyomni.load(path, dtype="bfloat16", quantize="int8")
    saved = at_load.save(tmp_path / "int8")
    loaded = tinyomni.load(saved, dtype="bfloat16")
    assert isinstance(loaded.model.language_model.lm_head, QuantLinear)
    assert type(loaded.model.language_model.model.embed_tokens) is torch.nn.Embedding  # stays float
    assert next(loaded.model.vision_tower.parameters()).dtype == torch.bfloat16
    assert torch.equal(logits(loaded), logits(at_load))


def test_loading_as_another_mode_is_refused(int4_dir):
    assert tinyomni.load(int4_dir, quantize="int4").quantization == "int4"  # the same mode is fine
    with pytest.raises(InputError, match="int4 checkpoint"):
        tinyomni.load(int4_dir, quantize="int8")


def _damaged(int4_dir, tmp_path, change):
    path = tmp_path / "damaged"
    path.mkdir()
    for f in int4_dir.iterdir():
        (path / f.name).write_bytes(f.read_bytes())
    change(path)
    return path


def _edit_spec(edit):
    def change(path):
        spec = json.loads((path / qckpt.SPEC_FILE).read_text())
        edit(spec)
        (path / qckpt.SPEC_FILE).write_text(json.dumps(spec))
    return change


def _edit_weights(edit):
    def change(path):
        state = dict(load_file(str(path / "model.safetensors")))
        edit(state)
        save_file(state, str(path / "model.safetensors"))
    return change


HEAD = "language_model.lm_head"
DAMAGE = {
    "version": (_edit_spec(lambda s: s.update(version=99)), "format version 99"),
    "format": (_edit_spec(lambda s: s.update(format="something-else")), "not a tinyomni quantized"),
    "kind": (_edit_spec(lambda s: s["linears"][HEAD].update(kind="int3")), "kind 'int3'"),
    "layout": (_edit_spec(lambda s: s["layouts"].update(int4="0123456789abcdef")), "layout this engine no longer"),
    "json": (lambda p: (p / qckpt.SPEC_FILE).write_text("{not json"), "unreadable"),
    "features": (_edit_spec(lambda s: s["linears"][HEAD].update(out_features=7)), f"{HEAD}.qweight is"),
    "missing buffer": (_edit_weights(lambda st: st.pop(f"{HEAD}.scales")), f"{HEAD}.scales is missing"),
    "unknown module": (_edit_spec(lambda s: s["linears"].update({"language_model.nope": s["linears"][HEAD]})),
                       "language_model.nope"),
    "truncated": (lambda p: (p / "model.safetensors").write_bytes((p / "model.safetensors").read_bytes()[:5000]),
                  "corrupt or truncated"),
}


@pytest.mark.parametrize("damage", sorted(DAMAGE))
def test_a_damaged_or_foreign_checkpoint_is_refused_by_name(int4_dir, tmp_path, damage):
    change, message = DAMAGE[damage]
    with pytest.raises(CheckpointError, match=message):
        tinyomni.load(_damaged(int4_dir, tmp_path, change))


def test_the_quantized_load_cache_uses_the_same_format(float_dir, tmp_path, monkeypatch):
    monkeypatch.setenv(cache.CACHE_ENV, str(tmp_path / "cache"))
    first = tinyomni.load(float_dir, quantize="int4")
    entries = [e for e in (tmp_path / "cache").iterdir() if e.is_dir()]
    assert len(entries) == 1 and qckpt.is_quantized(entries[0])

    def no_quantizing(*args, **kwargs):
        raise AssertionError("quantized again instead of read from the cache")

    monkeypatch.setattr("tinyomni.engine.quantize_model", no_quantizing)
    second = tinyomni.load(float_dir, quantize="int4")
    assert second.quantization == "int4" and torch.equal(logits(second), logits(first))
    assert tinyomni.load(float_dir).quantization is None  # the float checkpoint is read as it is, uncached
    assert len([e for e in (tmp_path / "cache").iterdir() if e.is_dir()]) == 1


def test_cli_quantize_then_chat_and_info(float_dir, tmp_path, capsys):
    from tinyomni.cli import main

    out = tmp_path / "cli-int4"
    assert main(["quantize", str(float_dir), "--bits", "4", "--out", str(out)]) == 0
    assert "int4 layers" in capsys.readouterr().err
    assert tinyomni.load(out).quantization == "int4"
    assert main(["chat", "--model", str(out), "--max-new-tokens", "3", "--no-stream", "hi"]) == 0
    assert main(["info", "--model", str(out)]) == 0
    assert "int4" in capsys.readouterr().out
    assert main(["chat", "--model", str(out), "--quantize", "int8", "hi"]) == 2
    assert "int4 checkpoint" in capsys.readouterr().err
