"""The Q-Former connector on its own: BLIP-2's queries-only variant equals transformers' Blip2QFormerModel
under the same names, the config round-trips, and recipes/toy-qformer.toml trains a tinyomni model with it
on the world (with a tiny Llama decoder built here, so it runs in seconds)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import tinyomni
from tinyomni.config import OmniConfig, ProjectorConfig, QFormerConfig, VisionConfig
from tinyomni.errors import ConfigError, InputError
from tinyomni.model.qformer import QFormerConnector

transformers = pytest.importorskip("transformers")
ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("frequency, heads", [(1, 3), (2, 1)])
def test_blip2_qformer_equals_transformers(frequency: int, heads: int) -> None:
    """Queries only (BLIP-2, TinyGPT-V): the same weights by name give the same query outputs."""
    reference = transformers.Blip2QFormerModel(transformers.Blip2QFormerConfig(
        hidden_size=heads * 8, num_hidden_layers=3, num_attention_heads=heads, intermediate_size=40,
        cross_attention_frequency=frequency, encoder_hidden_size=20)).eval()
    g = torch.Generator().manual_seed(frequency)
    with torch.no_grad():
        for name, p in reference.named_parameters():  # random everywhere; LayerNorm scales about 1
            p.copy_(0.2 * torch.randn(p.shape, generator=g) + (1 if name.lower().endswith("layernorm.weight") else 0))
    config = QFormerConfig(num_query_tokens=6, hidden_size=heads * 8, num_hidden_layers=3, num_attention_heads=heads,
                           intermediate_size=40, cross_attention_frequency=frequency)
    ours = QFormerConnector(config, encoder_hidden_size=20, out_features=12).eval()
    missing, unexpected = ours.qformer.load_state_dict(reference.state_dict(), strict=False)
    assert not missing and not unexpected  # a plain name table: transformers' names are ours
    queries, image = torch.randn(2, 6, heads * 8, generator=g), torch.randn(2, 9, 20, generator=g)
    with torch.no_grad():
        theirs = reference(query_embeds=queries, encoder_hidden_states=image).last_hidden_state
        got = ours.qformer(queries, image)
    assert ((got - theirs).norm() / theirs.norm()).item() <= 1e-5
    with pytest.raises(InputError, match="not instruction-aware"):
        ours(image, [torch.tensor([1, 2])] * 2)


def test_qformer_config_round_trips_and_is_checked() -> None:
    config = OmniConfig(vision=VisionConfig(image_size=28, patch_size=14, hidden_size=16, num_attention_heads=2),
                        vision_projector=ProjectorConfig(kind="qformer", downsample_ratio=1.0,
                                                         qformer={"num_query_tokens": 4, "hidden_size": 16,
                                                                  "num_attention_heads": 2}))
    config.validate()
    assert config.image_tokens_per_tile == 4
    again = OmniConfig.from_dict(json.loads(json.dumps(config.to_dict())))
    assert again.vision_projector.qformer == config.vision_projector.qformer
    with pytest.raises(ConfigError, match="downsample_ratio must be 1"):
        ProjectorConfig(kind="qformer").validate()
    with pytest.raises(ConfigError, match="unknown projector.qformer field"):
        ProjectorConfig(kind="qformer", qformer={"num_queries": 4})
    with pytest.raises(ConfigError, match="divisible by num_attention_heads"):
        ProjectorConfig(kind="qformer", downsample_ratio=1.0, qformer={"num_attention_heads": 5}).validate()


@pytest.fixture(scope="module")
def tiny_llama(tiny, tmp_path_factory) -> Path:
    """A tiny Llama text decoder directory with SmolLM2's tokenizer and template (a base for new encoders)."""
    path = tmp_path_factory.mktemp("tiny-llama")
    tokenizer = tiny.tokenizer
    tokenizer.backend.save(str(path / "tokenizer.json"))
    (path / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<|im_end|>", "pad_token": "<|im_end|>"}))
    (path / "chat_template.jinja").write_text(tiny.chat_template)
    eos = tokenizer.token_to_id("<|im_end|>")
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=1024, tie_word_embeddings=True, eos_token_id=eos,
        bos_token_id=None))
    model.save_pretrained(path)
    return path


def test_toy_qformer_recipe_trains_on_the_world(tiny_llama: Path, tmp_path: Path) -> None:
    from tinyomni.train import load_recipe, train

    recipe = load_recipe(ROOT / "recipes" / "toy-qformer.toml",
                         [f'model.base="{tiny_llama}"', f'run.out="{tmp_path / "run"}"'])
    result = train(recipe, progress=False)
    rows = [json.loads(line) for line in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in rows if r["type"] == "train"]
    assert len(losses) == 8 and all(loss == loss for loss in losses)  # every step logged, no NaN
    assert sum(losses[-3:]) < sum(losses[:3]), losses  # the connector learns the world's answers' shape
    model = tinyomni.load(result.model_dir)
    assert model.config.vision_projector.kind == "qformer" and model.config.image_tokens_per_tile == 8
    assert isinstance(model.model.multi_modal_projector, QFormerConnector)
    prompt = model.prepare([{"role": "user", "content": [{"type": "image", "image": _red()},
                                                         {"type": "text", "text": "What colour is it?"}]}])
    assert prompt.input_ids.count(model.processor.image_context_id) == 8
    assert isinstance(model.chat([{"role": "user", "content": [{"type": "image", "image": _red()},
                                                               {"type": "text", "text": "Colour?"}]}],
                                 max_new_tokens=3), str)


def _red():
    from PIL import Image

    return Image.new("RGB", (60, 40), (220, 20, 20))
