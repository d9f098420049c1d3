"""Idefics2 checkpoints load with exact parity: tiny random transformers-native models
(`Idefics2ForConditionalGeneration`: a SigLIP tower over images of their own size with a patch mask, the
perceiver resampler connector with 1 or 2 blocks, a Mistral decoder) are saved with their own tokenizer and
processor files, loaded with `tinyomni.load(dir)`, and compared with transformers on the same images +
prompt (processor output with and without splitting, fp32 logits, a greedy continuation). Also: the
errors for what does not load, and the perceiver resampler as a connector of our own models.

Nothing comes from a hub: the tokenizer is trained here on a few sentences, the weights are random.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from parity import assert_logits_match, assert_same_greedy, relative_error
from safetensors.torch import load_file, save_file
from test_interop_llava import copy_dir, edit_json, noise_image, randomize

import tinyomni
from tinyomni.checkpoints.families import family_for
from tinyomni.errors import CheckpointError, ContextLengthError, InputError

transformers = pytest.importorskip("transformers")
tokenizers = pytest.importorskip("tokenizers")

CORPUS = ["User: What is in the picture? Describe the image in detail.\nAssistant: A red circle.",
          "How many red circles are there?\n\nAnswer with a number: 1 2 3 4 5 6 7 8 9 0",
          "The quick brown fox jumps over the lazy dog. Compare the two images."] * 4
SPECIAL = ["<fake_token_around_image>", "<image>", "<end_of_utterance>", "<pad>"]
# Idefics2's template (as the hub's idefics2-8b ships it): "User:" + its parts in order, an image as "<image>",
# then "<end_of_utterance>\n"; "Assistant:" to prompt.
TEMPLATE = (
    "{% for message in messages %}{{message['role'].capitalize()}}{% if message['content'][0]['type'] == 'image' %}"
    "{{':'}}{% else %}{{': '}}{% endif %}{% for line in message['content'] %}{% if line['type'] == 'text' %}"
    "{{line['text']}}{% elif line['type'] == 'image' %}{{ '<image>' }}{% endif %}{% endfor %}<end_of_utterance>\n"
    "{% endfor %}{% if add_generation_prompt %}{{ 'Assistant:' }}{% endif %}"
)


# --- building tiny checkpoints -------------------------------------------------------------------------
def make_tokenizer(path: Path):
    """A Mistral-style BPE (Metaspace "▁" at the start of the input, byte fallback, <s> prepended) with the
    tokens Idefics2's tokenizer adds, saved to `path`."""
    from tokenizers import AddedToken, decoders, models, pre_tokenizers, processors, trainers

    backend = tokenizers.Tokenizer(models.BPE(byte_fallback=True, unk_token="<unk>", fuse_unk=True))
    backend.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="first", split=False)
    backend.decoder = decoders.Sequence([decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse(),
                                         decoders.Strip(" ", 1, 0)])
    backend.train_from_iterator(CORPUS, trainers.BpeTrainer(vocab_size=300, special_tokens=["<unk>", "<s>", "</s>"],
                                                            show_progress=False))
    backend.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", backend.token_to_id("<s>"))])
    backend.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIAL])
    backend.save(str(path / "tokenizer.json"))
    (path / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast", "add_bos_token": True, "bos_token": "<s>",
        "eos_token": "<end_of_utterance>", "unk_token": "<unk>", "pad_token": "<pad>"}))
    return transformers.AutoTokenizer.from_pretrained(path)


def build(path: Path, depth: int = 2, latents: int = 5, perceiver_heads: tuple[int, int] = (3, 1),
          head_dim: int = 8, heads: tuple[int, int] = (3, 1), tied: bool = False, splitting: bool = True,
          edges: tuple[int, int] = (21, 56), window: int | None = 4096, seed: int = 0):
    """A tiny Idefics2 checkpoint directory at `path`; returns the transformers model (fp32, eval)."""
    tokenizer = make_tokenizer(path)
    n_heads, n_kv = heads
    text_config = transformers.MistralConfig(
        vocab_size=len(tokenizer) + 3, hidden_size=n_heads * 16, intermediate_size=80, num_hidden_layers=2,
        num_attention_heads=n_heads, num_key_value_heads=n_kv, head_dim=16, max_position_embeddings=2048,
        rms_norm_eps=1e-5, sliding_window=window, tie_word_embeddings=tied, bos_token_id=1,
        eos_token_id=tokenizer.convert_tokens_to_ids("<end_of_utterance>"))
    vision_config = transformers.Idefics2VisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                                      num_attention_heads=2, image_size=28, patch_size=7)
    perceiver_config = transformers.Idefics2PerceiverConfig(
        hidden_size=n_heads * 16, rms_norm_eps=1e-5, resampler_n_latents=latents, resampler_depth=depth,
        resampler_n_heads=perceiver_heads[0], num_key_value_heads=perceiver_heads[1], resampler_head_dim=head_dim)
    config = transformers.Idefics2Config(
        vision_config=vision_config.to_dict(), perceiver_config=perceiver_config.to_dict(),
        text_config=text_config.to_dict(), image_token_id=tokenizer.convert_tokens_to_ids("<image>"),
        tie_word_embeddings=tied)
    torch.manual_seed(seed)
    model = transformers.Idefics2ForConditionalGeneration(config).eval()
    randomize(model, seed)
    if tied:
        model.tie_weights()
    model.save_pretrained(path)
    (path / "chat_template.jinja").write_text(TEMPLATE)
    transformers.Idefics2ImageProcessorPil(size={"shortest_edge": edges[0], "longest_edge": edges[1]},
                                           do_image_splitting=splitting).save_pretrained(path)
    (path / "processor_config.json").write_text(json.dumps(
        {"processor_class": "Idefics2Processor", "image_seq_len": latents}))
    return model


def reference_processor(path: Path):
    """transformers' Idefics2Processor for the directory (PIL image processor: torchvision is not installed)."""
    settings = json.loads((path / "processor_config.json").read_text())
    image_processor = transformers.AutoImageProcessor.from_pretrained(path, backend="pil")
    assert image_processor.backend == "pil"
    return transformers.Idefics2Processor(image_processor=image_processor,
                                          tokenizer=transformers.AutoTokenizer.from_pretrained(path),
                                          image_seq_len=settings["image_seq_len"], chat_template=TEMPLATE)


def conversation(*images, question: str = "What is in the picture?") -> list[dict]:
    return [{"role": "user", "content": [*({"type": "image", "image": im} for im in images),
                                         {"type": "text", "text": question}]}]


def reference_inputs(processor, messages: list[dict]) -> dict:
    return processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=True,
                                         return_tensors="pt")


def assert_same_inputs(prompt, inputs: dict) -> None:
    """Our ids, and our pixels (NaN where padding) = transformers' pixel values (zero there) and pixel mask."""
    assert prompt.input_ids == inputs["input_ids"][0].tolist()
    pixels, mask = inputs["pixel_values"][0], inputs["pixel_attention_mask"][0].bool()
    assert prompt.pixel_values.shape == pixels.shape
    assert torch.equal(~torch.isnan(prompt.pixel_values).any(dim=1), mask)
    assert torch.equal(torch.nan_to_num(prompt.pixel_values, nan=0.0), pixels)


# --- parity --------------------------------------------------------------------------------------------
CASES = {
    # Two resampler blocks, 3 heads over 1, untied Mistral 3 over 1; split: 5 tiles per image.
    "depth2-gqa-split-untied": (dict(depth=2, latents=5, perceiver_heads=(3, 1), heads=(3, 1)), 5),
    # One block, 5 heads over 5 (head_dim 4), 3 latents, tied, no splitting: 1 tile per image.
    "depth1-mha-unsplit-tied": (dict(depth=1, latents=3, perceiver_heads=(5, 5), head_dim=4, heads=(5, 1),
                                     tied=True, splitting=False), 1),
    # Two blocks, 7 heads over 7, 7 latents, 3 over 3 text heads, larger edges (grids beyond the trained one).
    "depth2-odd-heads": (dict(depth=2, latents=7, perceiver_heads=(7, 7), head_dim=6, heads=(3, 3),
                              edges=(28, 84)), 5),
}


@pytest.mark.parametrize("case", list(CASES))
def test_logits_and_greedy_continuation_match_transformers(case: str, tmp_path: Path) -> None:
    """Two images of different sizes (so the padding and masks matter), text right after them."""
    options, tiles = CASES[case]
    reference = build(tmp_path, **options, seed=len(case))
    ours = tinyomni.load(tmp_path)
    assert family_for(tmp_path)[1].name == "idefics2"
    assert ours.config.decoder.tie_word_embeddings == options.get("tied", False)
    assert ours.config.vision_projector.resampler_depth == options["depth"]

    messages = conversation(noise_image(150, 70, seed=3), noise_image(30, 45, seed=4))
    inputs = reference_inputs(reference_processor(tmp_path), messages)
    prompt = ours.prepare(messages)
    assert_same_inputs(prompt, inputs)
    assert prompt.tiles_per_image == [tiles, tiles]
    assert torch.isnan(prompt.pixel_values).any()  # padding is in play

    ids = torch.tensor([prompt.input_ids])
    with torch.no_grad():
        logits, _ = ours.model(ids, pixel_values=prompt.pixel_values)
        theirs = reference(**inputs).logits
    assert_logits_match(logits, theirs)
    assert_same_greedy(ours, reference, messages, inputs, ids.shape[1])


@pytest.fixture(scope="module")
def split_dir(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("idefics2")
    build(path, splitting=True)
    return path


@pytest.fixture(scope="module")
def unsplit_dir(split_dir: Path, tmp_path_factory) -> Path:
    path = copy_dir(split_dir, tmp_path_factory.mktemp("unsplit") / "ckpt")
    edit_json(path / "preprocessor_config.json", lambda c: c.update(do_image_splitting=False))
    return path


@pytest.mark.parametrize("kind", ["split", "unsplit"])
@pytest.mark.parametrize("size", [(1, 1), (5, 3), (2000, 9), (37, 600), (56, 56), (640, 480), (100, 57)])
def test_processor_output_matches_transformers(kind: str, size: tuple[int, int], request) -> None:
    """Pixel values, pixel mask and input ids equal transformers' for tiny, very wide, tall, exact and
    ordinary images, with splitting on and off."""
    path = request.getfixturevalue(f"{kind}_dir")
    ours = tinyomni.load(path)
    messages = conversation(noise_image(*size, seed=size[0]), question="How many red circles are there?")
    if kind == "split" and min(size) < 2:  # no quarters: transformers divides by zero, we say why
        with pytest.raises(ZeroDivisionError):
            reference_inputs(reference_processor(path), messages)
        with pytest.raises(InputError, match="cannot be split into quarters"):
            ours.prepare(messages)
        return
    inputs = reference_inputs(reference_processor(path), messages)
    prompt = ours.prepare(messages)
    assert_same_inputs(prompt, inputs)
    assert prompt.tiles_per_image == [5 if kind == "split" else 1]


def test_a_longer_conversation_gives_transformers_ids(split_dir: Path) -> None:
    """System turn, text before images, two images side by side, an assistant turn, a follow-up with an
    image followed by text: the shared boundary token and the space after an image as Idefics2Processor."""
    ours = tinyomni.load(split_dir)
    messages = [
        {"role": "system", "content": [{"type": "text", "text": "Answer with a number."}]},
        {"role": "user", "content": [{"type": "text", "text": "Compare the two images."},
                                     {"type": "image", "image": noise_image(200, 90, seed=9)},
                                     {"type": "image", "image": noise_image(30, 70, seed=8)}]},
        {"role": "assistant", "content": [{"type": "text", "text": "3"}]},
        {"role": "user", "content": [{"type": "image", "image": noise_image(64, 64, seed=7)},
                                     {"type": "text", "text": "Describe the image in detail."}]},
    ]
    inputs = reference_inputs(reference_processor(split_dir), messages)
    prompt = ours.prepare(messages)
    assert_same_inputs(prompt, inputs)
    around = ours.tokenizer.token_to_id("<fake_token_around_image>")
    assert prompt.input_ids.count(around) == 3 * 5 + 3 - 1  # the two side by side share one


def test_config_comes_from_the_checkpoint_files(split_dir: Path, unsplit_dir: Path) -> None:
    config = tinyomni.load(split_dir).config
    p = config.vision_projector
    assert (p.kind, p.resampler_n_latents, p.resampler_depth, p.resampler_n_heads, p.resampler_n_kv_heads,
            p.resampler_head_dim, p.hidden_size) == ("resampler", 5, 2, 3, 1, 8, 80)
    assert config.vision.position_buckets and config.image_tokens_per_tile == 5
    assert (config.image_resize, config.image_shortest_edge, config.image_longest_edge,
            config.image_splitting) == ("native", 21, 56, True)
    assert config.image_prompt == "tile_runs" and config.image_start_token == "<fake_token_around_image>"
    assert config.decoder.max_position_embeddings == 2048  # the sliding window (4096) is beyond it
    assert not tinyomni.load(unsplit_dir).config.image_splitting


def test_a_sliding_window_shorter_than_the_context_caps_it(tmp_path: Path) -> None:
    """Where Mistral's window would change the result (beyond `sliding_window` tokens), we refuse by name."""
    build(tmp_path, window=64, splitting=False)
    ours = tinyomni.load(tmp_path)
    assert ours.config.decoder.max_position_embeddings == 64
    with pytest.raises(ContextLengthError, match="context is 64 tokens"):
        ours.complete(conversation(noise_image(40, 40), question=" ".join("0123456789" * 12)),
                      max_new_tokens=2)


def test_saved_import_loads_back_as_a_native_checkpoint(split_dir: Path, tmp_path: Path) -> None:
    ours = tinyomni.load(split_dir)
    ours.save(tmp_path / "saved")
    again = tinyomni.load(tmp_path / "saved")
    assert again.config == ours.config
    messages = conversation(noise_image(90, 40), noise_image(25, 30))
    prompt = ours.prepare(messages)
    assert again.prepare(messages).input_ids == prompt.input_ids
    ids = torch.tensor([prompt.input_ids])
    with torch.no_grad():
        a, _ = ours.model(ids, pixel_values=prompt.pixel_values)
        b, _ = again.model(ids, pixel_values=prompt.pixel_values)
    assert torch.equal(a, b)


# --- errors --------------------------------------------------------------------------------------------
def test_a_missing_tensor_is_named(split_dir: Path, tmp_path: Path) -> None:
    path = copy_dir(split_dir, tmp_path / "ckpt")
    file = path / "model.safetensors"
    state = load_file(str(file))
    state.pop("model.connector.perceiver_resampler.layers.1.self_attn.k_proj.weight")
    save_file(state, str(file), metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match=r"lacks weight\(s\) model[.]connector[.]perceiver_resampler[.]layers"
                                              r"[.]1[.]self_attn[.]k_proj[.]weight"):
        tinyomni.load(path)


def test_an_unknown_tensor_is_named(split_dir: Path, tmp_path: Path) -> None:
    path = copy_dir(split_dir, tmp_path / "ckpt")
    file = path / "model.safetensors"
    state = load_file(str(file))
    state["model.connector.perceiver_resampler.layers.0.self_attn.q_proj.bias"] = torch.zeros(24)
    save_file(state, str(file), metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match=r"unknown Idefics2 weight\(s\) "
                                              r"model\.connector\.perceiver_resampler\.layers\.0\.self_attn\.q_proj\.bias"):
        tinyomni.load(path)


@pytest.mark.parametrize("file, change, message", [
    ("config.json", lambda c: c["perceiver_config"].update(num_key_value_heads=2), "num_key_value_heads 2"),
    ("config.json", lambda c: c["perceiver_config"].update(hidden_act="tanh"), "resampler_hidden_act"),
    ("config.json", lambda c: c["text_config"].update(model_type="qwen2"), "'qwen2' language model"),
    ("config.json", lambda c: c["text_config"].update(hidden_act="gelu"), "hidden_act 'gelu'"),
    ("config.json", lambda c: c.update(image_token_id=3), "image_token_index 3"),
    ("preprocessor_config.json", lambda c: c.update(resample=3), "resample 3"),
    ("preprocessor_config.json", lambda c: c.update(do_pad=False), "do_pad False"),
    ("preprocessor_config.json", lambda c: c.update(size={"height": 56, "width": 56}), "size"),
    ("preprocessor_config.json", lambda c: c.update(size={"shortest_edge": 5, "longest_edge": 56}), "patch_size 7"),
    ("preprocessor_config.json", lambda c: c.update(image_processor_type="CLIPImageProcessor"), "CLIPImage"),
    ("processor_config.json", lambda c: c.update(image_seq_len=64), "image_seq_len 64"),
])
def test_unsupported_values_are_named(split_dir: Path, tmp_path: Path, file: str, change, message: str) -> None:
    path = copy_dir(split_dir, tmp_path / "ckpt")
    edit_json(path / file, change)
    with pytest.raises(CheckpointError, match=message):
        tinyomni.load(path)


# --- the resampler in our own models -----------------------------------------------------------------
def test_the_toy_resampler_recipe_trains_on_the_world(tiny, tmp_path: Path) -> None:
    """recipes/toy-resampler.toml on a tiny decoder (the tiny model's, exported as a Llama directory): the
    loss falls, and the saved model has the resampler, 8 tokens per tile, and answers about an image."""
    from tinyomni.checkpoints.export_hf import export_hf
    from tinyomni.model.resampler import ResamplerConnector
    from tinyomni.train import load_recipe, train

    export_hf(tiny, tmp_path / "decoder", text_only=True)
    recipe = load_recipe(Path(__file__).resolve().parents[1] / "recipes" / "toy-resampler.toml",
                         [f'model.base="{tmp_path / "decoder"}"', f'run.out="{tmp_path / "run"}"'])
    result = train(recipe, progress=False)
    losses = [json.loads(line)["loss"] for line in (tmp_path / "run" / "log.jsonl").read_text().splitlines()
              if json.loads(line)["type"] == "train"]
    assert len(losses) == 8 and sum(losses[-3:]) < sum(losses[:3]), losses
    model = tinyomni.load(result.model_dir)
    assert isinstance(model.model.multi_modal_projector, ResamplerConnector)
    assert len(model.model.multi_modal_projector.perceiver_resampler.layers) == 2
    prompt = model.prepare(conversation(noise_image(80, 50)))
    assert prompt.input_ids.count(model.processor.image_context_id) == 8 == model.config.image_tokens_per_tile
    assert isinstance(model.chat(conversation(noise_image(80, 50)), max_new_tokens=3), str)


def test_the_resampler_equals_transformers_connector_with_a_padding_mask() -> None:
    """Our ResamplerConnector with Idefics2Connector's weights gives its output, padded features masked."""
    from transformers.models.idefics2.modeling_idefics2 import Idefics2Connector

    from tinyomni.config import ProjectorConfig
    from tinyomni.model.resampler import ResamplerConnector

    config = transformers.Idefics2Config(
        vision_config={"hidden_size": 24}, text_config={"model_type": "mistral", "hidden_size": 40,
                                                         "intermediate_size": 56, "num_attention_heads": 5},
        perceiver_config={"hidden_size": 40, "resampler_n_latents": 6, "resampler_depth": 2,
                          "resampler_n_heads": 5, "num_key_value_heads": 1, "resampler_head_dim": 4})
    theirs = Idefics2Connector(config).eval()
    randomize(theirs, 1)
    ours = ResamplerConnector(24, 40, ProjectorConfig(
        kind="resampler", hidden_size=56, hidden_act="silu", resampler_n_latents=6, resampler_depth=2,
        resampler_n_heads=5, resampler_n_kv_heads=1, resampler_head_dim=4, resampler_rms_norm_eps=1e-6))
    ours.load_state_dict(theirs.state_dict())
    features = torch.randn(3, 10, 24)
    mask = torch.ones(3, 10, dtype=torch.bool)
    mask[1, 7:] = False
    mask[2, 2:] = False
    with torch.no_grad():
        expected = theirs(features, attention_mask=mask.long())
        got = ours(features, mask)
        assert relative_error(got, expected) <= 1e-5
        features[2, 2:] = 100.0  # what the mask hides changes nothing
        assert torch.allclose(ours(features, mask)[2], got[2], atol=1e-5)
