"""BLIP-2 checkpoints load with exact parity: tiny random transformers-native models
(`Blip2ForConditionalGeneration`: BLIP ViT, queries-only Q-Former, an OPT decoder) are saved with their own
tokenizer and processor files, loaded with `tinyomni.load(dir)`, and compared with transformers on the
same image + prompt (processor output, fp32 logits, a 16-token greedy continuation through
`Model.complete`). Also: the errors for what does not load.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from parity import relative_error
from test_interop_llava import edit_json, make_tokenizer, noise_image, randomize

import tinyomni
from tinyomni.checkpoints.families import family_for
from tinyomni.errors import CheckpointError
from tinyomni.model.opt import OPTDecoder

transformers = pytest.importorskip("transformers")


def build(path: Path, tile: int = 28, patch: int = 7, qformer_heads: int = 3, frequency: int = 2,
          queries: int = 5, heads: int = 3, tied: bool = True, seed: int = 0):
    """A tiny BLIP-2 (OPT) checkpoint directory at `path`; returns the transformers model (fp32, eval)."""
    tokenizer = make_tokenizer("llama", path)  # a BPE with a BOS post-processor and <image> (OPT's prepends </s>)
    text_config = transformers.OPTConfig(
        vocab_size=len(tokenizer) + 3, hidden_size=heads * 8, num_hidden_layers=2, ffn_dim=56,
        num_attention_heads=heads, max_position_embeddings=256, word_embed_proj_dim=heads * 8,
        tie_word_embeddings=tied, bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id)
    vision_config = transformers.Blip2VisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                                   num_attention_heads=2, image_size=tile, patch_size=patch)
    qformer_config = transformers.Blip2QFormerConfig(hidden_size=qformer_heads * 8, num_hidden_layers=2,
                                                     num_attention_heads=qformer_heads, intermediate_size=40,
                                                     cross_attention_frequency=frequency)
    config = transformers.Blip2Config(vision_config=vision_config.to_dict(), qformer_config=qformer_config.to_dict(),
                                      text_config=text_config.to_dict(), num_query_tokens=queries,
                                      image_token_index=tokenizer.convert_tokens_to_ids("<image>"))
    torch.manual_seed(seed)
    model = transformers.Blip2ForConditionalGeneration(config).eval()
    randomize(model, seed)
    if tied:
        model.tie_weights()
    model.save_pretrained(path)
    image_processor = transformers.BlipImageProcessorPil(size={"height": tile, "width": tile})
    transformers.Blip2Processor(image_processor=image_processor, tokenizer=tokenizer,
                                num_query_tokens=queries).save_pretrained(path)
    return model


def conversation(image, question: str = "What is in the picture?") -> list[dict]:
    return [{"role": "user", "content": [{"type": "image", "image": image}, {"type": "text", "text": question}]}]


CASES = {
    "tied-freq2": dict(tied=True, frequency=2, qformer_heads=3, heads=3),
    "untied-freq1": dict(tied=False, frequency=1, qformer_heads=5, heads=5, tile=42, patch=14, queries=7),
}


@pytest.mark.parametrize("case", list(CASES))
def test_logits_and_greedy_continuation_match_transformers(case: str, tmp_path: Path) -> None:
    options = CASES[case]
    reference = build(tmp_path, **options, seed=len(case))
    ours = tinyomni.load(tmp_path)
    assert family_for(tmp_path)[1].name == "blip-2"
    assert isinstance(ours.model.language_model, OPTDecoder)
    assert ours.config.decoder.tie_word_embeddings == options["tied"]

    image, question = noise_image(70, 50, seed=3), "How many red circles are there?"
    inputs = transformers.Blip2Processor.from_pretrained(tmp_path)(images=image, text=question, return_tensors="pt")
    prompt = ours.prepare(conversation(image, question))
    assert prompt.input_ids == inputs["input_ids"][0].tolist()
    assert torch.equal(prompt.pixel_values, inputs["pixel_values"])
    assert prompt.qformer_input_ids == []  # queries only

    ids = torch.tensor([prompt.input_ids])
    with torch.no_grad():
        logits, _ = ours.model(ids, pixel_values=prompt.pixel_values)
        theirs = reference(**inputs).logits
    assert logits.shape == theirs.shape
    assert relative_error(logits, theirs) <= 1e-4

    completion = ours.complete(conversation(image, question), max_new_tokens=16, ignore_eos=True)
    with torch.no_grad():
        generated = reference.generate(**inputs, max_new_tokens=16, min_new_tokens=16, do_sample=False,
                                       suppress_tokens=ours.suppress_ids, pad_token_id=ours.tokenizer.pad_token_id)
    assert completion.token_ids == generated[0, ids.shape[1]:].tolist()
    assert len(completion.token_ids) == 16


@pytest.fixture(scope="module")
def blip2_dir(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("blip2")
    build(path)
    return path


@pytest.mark.parametrize("size", [(1, 1), (2000, 9), (37, 600), (28, 28), (640, 480)])
def test_processor_output_matches_transformers(size: tuple[int, int], blip2_dir: Path) -> None:
    ours = tinyomni.load(blip2_dir)
    image = noise_image(*size, seed=size[0])
    question = "Question: how many red circles are there? Answer:"
    inputs = transformers.Blip2Processor.from_pretrained(blip2_dir)(images=image, text=question, return_tensors="pt")
    prompt = ours.prepare(conversation(image, question))
    assert prompt.input_ids == inputs["input_ids"][0].tolist()
    assert torch.equal(prompt.pixel_values, inputs["pixel_values"])


@pytest.mark.parametrize("change, message", [
    (lambda c: c["text_config"].update(do_layer_norm_before=False), "do_layer_norm_before false"),
    (lambda c: c["text_config"].update(word_embed_proj_dim=16), "word_embed_proj_dim 16"),
    (lambda c: c["text_config"].update(model_type="t5"), "BLIP-2 with a 't5' language model is not supported"),
    (lambda c: c["qformer_config"].update(use_qformer_text_input=True), "use_qformer_text_input true"),
])
def test_unsupported_config_values_are_named(change, message: str, blip2_dir: Path, tmp_path: Path) -> None:
    path = Path(shutil.copytree(blip2_dir, tmp_path / "ckpt"))
    edit_json(path / "config.json", change)
    with pytest.raises(CheckpointError, match=message):
        tinyomni.load(path)


def test_a_saved_blip2_reloads_with_its_opt_decoder(blip2_dir: Path, tmp_path: Path) -> None:
    """tinyomni's own checkpoint of the import (decoder kind "opt", the Q-Former config) gives the same logits."""
    ours = tinyomni.load(blip2_dir)
    again = tinyomni.load(ours.save(tmp_path / "saved"))
    assert again.config.decoder.kind == "opt" and again.config.vision_projector.qformer.instruction_aware is False
    prompt = ours.prepare(conversation(noise_image(40, 30)))
    with torch.no_grad():
        a, _ = ours.model(torch.tensor([prompt.input_ids]), pixel_values=prompt.pixel_values)
        b, _ = again.model(torch.tensor([again.prepare(conversation(noise_image(40, 30))).input_ids]),
                           pixel_values=prompt.pixel_values)
    assert torch.equal(a, b)
