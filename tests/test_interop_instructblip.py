"""InstructBLIP checkpoints load with exact parity: tiny random transformers-native models
(`InstructBlipForConditionalGeneration`: BLIP ViT, instruction-aware Q-Former with cross-attention every 1,
2 or 3 layers, a Llama decoder) are saved with their own tokenizers and processor files, loaded with
`tinyomni.load(dir)`, and compared with transformers on the same image + prompt (processor output: input
ids, pixel values, the Q-Former's ids; fp32 logits; a 16-token greedy continuation). Also: the errors for
what does not load.

Nothing comes from a hub: the tokenizers are trained here on a few sentences, the weights are random.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from parity import relative_error
from safetensors.torch import load_file, save_file
from test_interop_llava import edit_json, make_tokenizer, noise_image, randomize

import tinyomni
from tinyomni.checkpoints.families import family_for
from tinyomni.errors import CheckpointError, InputError

transformers = pytest.importorskip("transformers")
tokenizers = pytest.importorskip("tokenizers")

QFORMER_CORPUS = ["What is in the picture? Describe the image in detail.", "How many red circles are there?",
                  "Answer with a number: 1 2 3 4 5 6 7 8 9 0. The quick brown fox jumps over the lazy dog."] * 4


# --- building tiny checkpoints -------------------------------------------------------------------------
def make_qformer_tokenizer():
    """A BERT WordPiece tokenizer (lower-casing, [CLS] … [SEP]), as InstructBLIP's Q-Former tokenizer."""
    from tokenizers import decoders, models, normalizers, pre_tokenizers, processors, trainers

    backend = tokenizers.Tokenizer(models.WordPiece(unk_token="[UNK]"))
    backend.normalizer = normalizers.BertNormalizer(lowercase=True)
    backend.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    backend.decoder = decoders.WordPiece()
    backend.train_from_iterator(QFORMER_CORPUS, trainers.WordPieceTrainer(
        vocab_size=200, special_tokens=["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"], show_progress=False))
    cls, sep = backend.token_to_id("[CLS]"), backend.token_to_id("[SEP]")
    backend.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1", special_tokens=[("[CLS]", cls), ("[SEP]", sep)])
    return transformers.BertTokenizerFast(tokenizer_object=backend, unk_token="[UNK]", pad_token="[PAD]",
                                          cls_token="[CLS]", sep_token="[SEP]", mask_token="[MASK]")


def build(path: Path, tile: int = 28, patch: int = 7, vision_heads: int = 2, qkv_bias: bool = True,
          qformer_heads: int = 3, qformer_layers: int = 3, frequency: int = 2, queries: int = 5,
          heads: tuple[int, int] = (3, 1), tied: bool = False, seed: int = 0):
    """A tiny InstructBLIP checkpoint directory at `path`; returns the transformers model (fp32, eval)."""
    tokenizer = make_tokenizer("llama", path)  # Llama-2's, with <image> and <pad> added
    qformer_tokenizer = make_qformer_tokenizer()
    n_heads, n_kv = heads
    text_config = transformers.LlamaConfig(
        vocab_size=len(tokenizer) + 5, hidden_size=n_heads * 16, intermediate_size=80, num_hidden_layers=2,
        num_attention_heads=n_heads, num_key_value_heads=n_kv, head_dim=16, max_position_embeddings=512,
        rms_norm_eps=1e-6, rope_theta=10000.0, tie_word_embeddings=tied, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id)
    vision_config = transformers.InstructBlipVisionConfig(
        hidden_size=vision_heads * 12, intermediate_size=64, num_hidden_layers=2, num_attention_heads=vision_heads,
        image_size=tile, patch_size=patch, qkv_bias=qkv_bias)
    qformer_config = transformers.InstructBlipQFormerConfig(
        vocab_size=len(qformer_tokenizer), hidden_size=qformer_heads * 8, num_hidden_layers=qformer_layers,
        num_attention_heads=qformer_heads, intermediate_size=40, cross_attention_frequency=frequency)
    config = transformers.InstructBlipConfig(
        vision_config=vision_config.to_dict(), qformer_config=qformer_config.to_dict(),
        text_config=text_config.to_dict(), num_query_tokens=queries,
        image_token_index=tokenizer.convert_tokens_to_ids("<image>"))
    torch.manual_seed(seed)
    model = transformers.InstructBlipForConditionalGeneration(config).eval()
    randomize(model, seed)
    if tied:
        model.tie_weights()
    model.save_pretrained(path)
    image_processor = transformers.BlipImageProcessorPil(size={"height": tile, "width": tile})
    processor = transformers.InstructBlipProcessor(image_processor=image_processor, tokenizer=tokenizer,
                                                   qformer_tokenizer=qformer_tokenizer, num_query_tokens=queries)
    processor.save_pretrained(path)
    return model


def reference_processor(path: Path):
    processor = transformers.InstructBlipProcessor.from_pretrained(path)
    assert type(processor.image_processor).__name__ == "BlipImageProcessorPil"
    return processor


def conversation(image, question: str = "What is in the picture?") -> list[dict]:
    return [{"role": "user", "content": [{"type": "image", "image": image}, {"type": "text", "text": question}]}]


def qformer_ids(prompt) -> list[torch.Tensor]:
    return [torch.tensor(ids) for ids in prompt.qformer_input_ids]


def greedy(ours, prompt, steps: int) -> list[int]:
    """Our greedy continuation: the model's forward over the growing sequence, media tokens suppressed (what
    `Model.complete` does, which does not pass the Q-Former's ids yet: see test_complete_needs_the_qformer_ids)."""
    ids = list(prompt.input_ids)
    out = []
    with torch.no_grad():
        for _ in range(steps):
            logits, _ = ours.model(torch.tensor([ids]), pixel_values=prompt.pixel_values,
                                   qformer_input_ids=qformer_ids(prompt), logits_to_keep=1)
            logits = logits[0, -1]
            logits[ours.suppress_ids] = float("-inf")
            token = int(logits.argmax())
            if token in ours.tokenizer.eos_token_ids:
                break
            ids.append(token)
            out.append(token)
    return out


# --- parity --------------------------------------------------------------------------------------------
CASES = {
    # Cross-attention every 2 layers (the released models'), 3 Q-Former heads, Llama 3 heads over 1, untied.
    "freq2-untied": dict(frequency=2, qformer_heads=3, qformer_layers=3, heads=(3, 1), tied=False),
    # Every layer crosses; 5 Q-Former heads, 3 vision heads, a 42-px tile of 14-px patches, 7 queries; tied.
    "freq1-tied": dict(frequency=1, qformer_heads=5, qformer_layers=2, vision_heads=3, tile=42, patch=14,
                       queries=7, heads=(5, 5), tied=True),
    # Only layer 0 crosses (frequency 3 over 3 layers), one Q-Former head, a tower without q/v biases.
    "freq3-no-qkv-bias": dict(frequency=3, qformer_heads=1, qformer_layers=3, qkv_bias=False, heads=(3, 3),
                              tied=False),
}


@pytest.mark.parametrize("case", list(CASES))
def test_logits_and_greedy_continuation_match_transformers(case: str, tmp_path: Path) -> None:
    options = CASES[case]
    reference = build(tmp_path, **options, seed=len(case))
    ours = tinyomni.load(tmp_path)
    assert family_for(tmp_path)[1].name == "instructblip"
    assert ours.config.decoder.tie_word_embeddings == options["tied"]
    assert ours.config.vision_projector.qformer.cross_attention_frequency == options["frequency"]

    image, question = noise_image(70, 50, seed=3), "How many red circles are there?"
    inputs = reference_processor(tmp_path)(images=image, text=question, return_tensors="pt")
    prompt = ours.prepare(conversation(image, question))
    assert prompt.input_ids == inputs["input_ids"][0].tolist()
    assert torch.equal(prompt.pixel_values, inputs["pixel_values"])
    assert prompt.qformer_input_ids == inputs["qformer_input_ids"].tolist()

    ids = torch.tensor([prompt.input_ids])
    with torch.no_grad():
        logits, _ = ours.model(ids, pixel_values=prompt.pixel_values, qformer_input_ids=qformer_ids(prompt))
        theirs = reference(**inputs).logits
    assert logits.shape == theirs.shape
    assert relative_error(logits, theirs) <= 1e-4

    with torch.no_grad():
        generated = reference.generate(**inputs, max_new_tokens=16, do_sample=False, min_new_tokens=16,
                                       suppress_tokens=ours.suppress_ids, pad_token_id=ours.tokenizer.pad_token_id)
    expected = generated[0, ids.shape[1]:].tolist()
    assert len(expected) == 16
    assert greedy(ours, prompt, 16) == expected
    assert ours.complete(conversation(image, question), max_new_tokens=16).token_ids == expected


@pytest.fixture(scope="module")
def blip_dir(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("instructblip")
    build(path)
    return path


@pytest.mark.parametrize("size", [(1, 1), (5, 3), (2000, 9), (37, 600), (28, 28), (640, 480)])
def test_processor_output_matches_transformers(size: tuple[int, int], blip_dir: Path) -> None:
    """Input ids, pixel values and the Q-Former's ids equal transformers' for tiny, very wide, tall,
    exact-size and ordinary images, and a question with capitals, digits and punctuation."""
    ours = tinyomni.load(blip_dir)
    image = noise_image(*size, seed=size[0])
    question = "How many RED circles are there? Answer with a number: 1, 2 or 3."
    inputs = reference_processor(blip_dir)(images=image, text=question, return_tensors="pt")
    prompt = ours.prepare(conversation(image, question))
    assert prompt.input_ids == inputs["input_ids"][0].tolist()
    assert torch.equal(prompt.pixel_values, inputs["pixel_values"])
    assert prompt.qformer_input_ids == inputs["qformer_input_ids"].tolist()
    assert prompt.tiles_per_image == [1]


def test_text_around_the_image_and_a_second_turn(blip_dir: Path) -> None:
    """The image's place in the message does not matter (its tokens go first); the prompt of a follow-up is
    the conversation's text, a space between messages, as the processor gets it."""
    ours = tinyomni.load(blip_dir)
    image = noise_image(40, 60, seed=1)
    messages = [{"role": "user", "content": [{"type": "text", "text": "Describe"},
                                             {"type": "image", "image": image},
                                             {"type": "text", "text": " the image in detail."}]},
                {"role": "assistant", "content": "A red circle."},
                {"role": "user", "content": "How many?"}]
    inputs = reference_processor(blip_dir)(images=image, text="Describe the image in detail. A red circle. How many?",
                                           return_tensors="pt")
    prompt = ours.prepare(messages)
    assert prompt.input_ids == inputs["input_ids"][0].tolist()
    assert prompt.qformer_input_ids == inputs["qformer_input_ids"].tolist()
    # A training example starts with the same query tokens; its Q-Former instruction is the text before
    # the first answer (what the prompt of that answer gave the Q-Former).
    example, labels = ours.processor.training_example(messages)
    queries = ours.config.image_tokens_per_tile
    assert example.input_ids[:queries + 1] == prompt.input_ids[:queries + 1]  # ... and BOS
    assert labels[:queries + 1] == [-100] * (queries + 1)
    first = reference_processor(blip_dir)(images=image, text="Describe the image in detail.")
    assert example.qformer_input_ids == first["qformer_input_ids"]


def test_the_qformer_reads_the_instruction(blip_dir: Path) -> None:
    """Another question changes the image's embeddings (the Q-Former attends to the text); the model refuses
    an image without its instruction ids rather than answer from queries alone."""
    ours = tinyomni.load(blip_dir)
    image = noise_image(30, 30, seed=2)
    a, b = (ours.prepare(conversation(image, q)) for q in ("What is in the picture?", "How many red circles?"))
    with torch.no_grad():
        ea = ours.model.encode_images(a.pixel_values, qformer_ids(a))
        eb = ours.model.encode_images(b.pixel_values, qformer_ids(b))
    assert ea.shape == (1, ours.config.image_tokens_per_tile, ours.config.decoder.hidden_size)
    assert not torch.allclose(ea, eb)
    with pytest.raises(InputError, match="reads the instruction"):
        ours.model.encode_images(a.pixel_values)


def test_chat_passes_the_qformer_ids(blip_dir: Path) -> None:
    """Model.chat gives the Q-Former its instruction (generate.py passes Prompt.qformer_input_ids)."""
    ours = tinyomni.load(blip_dir)
    assert isinstance(ours.chat(conversation(noise_image(28, 28)), max_new_tokens=2), str)


def test_a_saved_checkpoint_keeps_the_qformer_tokenizer(blip_dir: Path, tmp_path: Path) -> None:
    """An imported InstructBLIP saved as a tinyomni checkpoint loads back with its Q-Former vocabulary:
    the same Q-Former ids and the same greedy answer as the imported model."""
    ours = tinyomni.load(blip_dir)
    saved = tinyomni.load(ours.save(tmp_path / "saved"))
    image = noise_image(30, 30, seed=3)
    messages = conversation(image, "How many red circles are there?")
    assert saved.prepare(messages).qformer_input_ids == ours.prepare(messages).qformer_input_ids
    assert saved.complete(messages, max_new_tokens=6).token_ids == ours.complete(messages, max_new_tokens=6).token_ids


# --- what does not load -------------------------------------------------------------------------------
def _copy(source: Path, dest: Path) -> Path:
    return Path(shutil.copytree(source, dest))


def _nested(key: str, section: str, value):
    return lambda c: c[section].update({key: value})


@pytest.mark.parametrize("change, message", [
    (_nested("model_type", "text_config", "t5"), "InstructBLIP with a 't5' language model is not supported"),
    (_nested("hidden_act", "qformer_config", "tanh"), "qformer_config value.*hidden_act 'tanh'"),
    (_nested("position_embedding_type", "qformer_config", "relative_key"), "position_embedding_type 'relative_key'"),
    (_nested("image_size", "vision_config", [28, 35]), "only a square vision image_size"),
    (lambda c: c.pop("image_token_index"), "no image_token_index"),
    (lambda c: c.update(num_query_tokens=6), "num_query_tokens 5 image tokens per image but config.json's Q-Former "
                                             "has 6"),
])
def test_unsupported_config_values_are_named(change, message: str, blip_dir: Path, tmp_path: Path) -> None:
    path = _copy(blip_dir, tmp_path / "ckpt")
    edit_json(path / "config.json", change)
    with pytest.raises(CheckpointError, match=message):
        tinyomni.load(path)


@pytest.mark.parametrize("change, message", [
    (lambda p: p.update(size={"height": 32, "width": 32}), r"size \{'height': 32, 'width': 32\}"),
    (lambda p: p.update(resample=2), "resample 2"),
    (lambda p: p.update(do_normalize=False), "do_normalize False"),
    (lambda p: p.update(image_processor_type="CLIPImageProcessor"), "image processor 'CLIPImageProcessor'"),
])
def test_unsupported_image_processor_settings_are_named(change, message: str, blip_dir: Path,
                                                        tmp_path: Path) -> None:
    path = _copy(blip_dir, tmp_path / "ckpt")
    edit_json(path / "processor_config.json", lambda c: change(c["image_processor"]))
    with pytest.raises(CheckpointError, match=message):
        tinyomni.load(path)


def test_missing_and_unknown_tensors_are_named(blip_dir: Path, tmp_path: Path) -> None:
    path = _copy(blip_dir, tmp_path / "missing")
    state = load_file(path / "model.safetensors")
    del state["qformer.encoder.layer.2.crossattention.attention.key.weight"]  # frequency 2: layers 0, 2 cross
    save_file(state, path / "model.safetensors")
    with pytest.raises(CheckpointError, match="lacks weight.*qformer.encoder.layer.2.crossattention.attention.key"):
        tinyomni.load(path)

    path = _copy(blip_dir, tmp_path / "unknown")
    state = load_file(path / "model.safetensors")
    state["qformer.pooler.dense.weight"] = torch.zeros(24, 24)
    save_file(state, path / "model.safetensors")
    with pytest.raises(CheckpointError, match="unknown InstructBLIP weight.*qformer.pooler.dense.weight"):
        tinyomni.load(path)

    path = _copy(blip_dir, tmp_path / "extra")
    state = load_file(path / "model.safetensors")
    state["qformer.encoder.layer.1.crossattention.attention.key.weight"] = torch.zeros(24, 32)  # layer 1 does not cross
    save_file(state, path / "model.safetensors")
    with pytest.raises(CheckpointError, match="qformer.encoder.layer.1.crossattention.attention.key.weight do not fit"):
        tinyomni.load(path)


def test_a_missing_qformer_tokenizer_is_named(blip_dir: Path, tmp_path: Path) -> None:
    path = _copy(blip_dir, tmp_path / "ckpt")
    shutil.rmtree(path / "qformer_tokenizer")
    with pytest.raises(CheckpointError, match="no Q-Former tokenizer"):
        tinyomni.load(path)


def test_the_config_comes_from_the_checkpoint(blip_dir: Path) -> None:
    ours = tinyomni.load(blip_dir)
    config = json.loads((blip_dir / "config.json").read_text())
    qformer = ours.config.vision_projector.qformer
    assert qformer.num_query_tokens == ours.config.image_tokens_per_tile == config["num_query_tokens"]
    assert qformer.instruction_aware and qformer.vocab_size == config["qformer_config"]["vocab_size"]
    assert ours.config.image_prompt == "prefix" and ours.config.vision.feature_select == "full"
    assert ours.config.vision.image_mean == pytest.approx((0.48145466, 0.4578275, 0.40821073))
