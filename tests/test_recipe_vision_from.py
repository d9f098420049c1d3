"""`[model] vision_from`: a new model (new connector, base decoder) starts from another tinyomni model's trained
vision tower, its weights and its VisionConfig copied; shapes that differ are a ConfigError. With a tiny
model as the source and a tiny Llama decoder as the base, so it runs in seconds."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch
import transformers

import tinyomni
from tinyomni.errors import ConfigError
from tinyomni.train import build_model, recipe_from_dict, train

QFORMER = {"kind": "qformer", "downsample_ratio": 1.0,
           "qformer": {"num_query_tokens": 4, "hidden_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2,
                       "intermediate_size": 64}}


@pytest.fixture(scope="module")
def source(tiny, tmp_path_factory) -> Path:
    """A tinyomni checkpoint whose vision tower is not the seeded initialisation (so a copy shows); a copy of
    the session's tiny model, which other tests share."""
    root = tmp_path_factory.mktemp("source")
    model = tinyomni.load(tiny.save(root / "plain"))
    with torch.no_grad():
        for p in model.model.vision_tower.parameters():
            p.add_(0.01)
    return model.save(root / "source")


@pytest.fixture(scope="module")
def tiny_llama(tiny, tmp_path_factory) -> Path:
    """A tiny Llama text decoder directory with SmolLM2's tokenizer and template (a base for new encoders)."""
    path = tmp_path_factory.mktemp("tiny-llama")
    tokenizer = tiny.tokenizer
    tokenizer.backend.save(str(path / "tokenizer.json"))
    (path / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<|im_end|>", "pad_token": "<|im_end|>"}))
    (path / "chat_template.jinja").write_text(tiny.chat_template)
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=1024, tie_word_embeddings=True,
        eos_token_id=tokenizer.token_to_id("<|im_end|>"), bos_token_id=None))
    model.save_pretrained(path)
    return path


def recipe(base: Path, source: Path, out: Path, **model: object) -> dict:
    return {"name": "vision-from",
            "model": {"base": str(base), "vision_from": str(source),
                      "config": {"max_tiles": 1, "use_thumbnail": False, "vision_projector": QFORMER}, **model},
            "run": {"out": str(out), "autocast": "none", "save_every": 100, "log_every": 1},
            "stages": [{"name": "align", "steps": 2, "batch_size": 2, "lr": 1e-3, "train": ["multi_modal_projector"],
                        "data": {"skills": ["color"], "difficulty": {"image_size": 56}}}]}


def same_tower(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_vision_from_copies_the_tower_under_a_new_connector(tiny_llama: Path, source: Path, tmp_path: Path) -> None:
    src = tinyomni.load(source)
    model = build_model(recipe_from_dict(recipe(tiny_llama, source, tmp_path / "run")))
    assert dataclasses.asdict(model.config.vision) == dataclasses.asdict(src.config.vision)
    assert same_tower(model.model.vision_tower, src.model.vision_tower)
    assert model.config.vision_projector.kind == "qformer" and model.config.image_tokens_per_tile == 4
    assert model.config.decoder.hidden_size == 64  # the base's decoder, not the source's


def test_vision_from_trains_the_connector_and_keeps_the_frozen_tower(tiny_llama: Path, source: Path,
                                                                      tmp_path: Path) -> None:
    result = train(recipe_from_dict(recipe(tiny_llama, source, tmp_path / "run")), progress=False)
    trained = tinyomni.load(result.model_dir)
    assert same_tower(trained.model.vision_tower, tinyomni.load(source).model.vision_tower)
    assert trained.config.vision_projector.kind == "qformer"


def test_vision_from_is_checked(tiny_llama: Path, source: Path, tmp_path: Path) -> None:
    width = tinyomni.load(source).config.vision.hidden_size
    changed = recipe_from_dict(recipe(tiny_llama, source, tmp_path, vision={"hidden_size": width * 2,
                                                                          "num_attention_heads": 2}))
    with pytest.raises(ConfigError, match="does not fit the recipe's"):
        build_model(changed)
    with pytest.raises(ConfigError, match="model.from has its own"):
        recipe_from_dict(recipe(tiny_llama, source, tmp_path, **{"from": str(source)}))
    with pytest.raises(ConfigError, match="not to a tinyomni checkpoint"):
        build_model(recipe_from_dict(recipe(source, source, tmp_path)))
