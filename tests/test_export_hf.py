"""Exporting to a transformers-native InternVL directory: transformers loads what `export_hf` writes
(AutoModelForImageTextToText, InternVLProcessor) and computes what tinyomni computes — the same input
ids and pixel values, fp32 logits within 1e-4, the same greedy tokens with generate's defaults — and
tinyomni reads the directory back to identical logits. What InternVL cannot hold (the reference model's
conv stem, a tower without CLS token, ...) is refused by name; the audio tower is left out with a note;
`text_only` writes the decoder alone as a Llama/Qwen2 directory.

The models are tiny and random: tinyomni ones built here, and one imported from a tiny transformers
InternVL directory built as tests/test_interop_internvl.py builds them (its helpers are reused).
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch
from parity import relative_error
from safetensors import safe_open
from test_interop_internvl import build, conversation, make_tokenizer, noise_image, randomize

import tinyomni
from tinyomni.api import Model, add_media_tokens
from tinyomni.checkpoints.export_hf import export_hf, internvl_problems
from tinyomni.config import AudioConfig, DecoderConfig, OmniConfig, VisionConfig
from tinyomni.errors import InputError
from tinyomni.model import lora
from tinyomni.model.omni import OmniModel
from tinyomni.processing.tokenizer import Tokenizer

transformers = pytest.importorskip("transformers")
tokenizers = pytest.importorskip("tokenizers")

# A template that knows only string contents (as SmolLM2's), with a default system turn.
STRING_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n' }}{% endif %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def own_model(text: str = "qwen2", tied: bool = True, audio: bool = True, seed: int = 0, adapter: bool = False,
              vision: dict | None = None, padding: int = 3) -> Model:
    """A tiny random tinyomni model: a Qwen2-style (q/k/v biases) or Llama-style decoder, a ViT tower
    (InternViT-shaped unless `vision` says otherwise), optionally an audio tower and a LoRA adapter."""
    hf = make_tokenizer(text)
    tokenizer = Tokenizer(tokenizers.Tokenizer.from_str(hf.backend_tokenizer.to_str()),
                          [hf.convert_tokens_to_ids("<|im_end|>")], hf.bos_token_id, hf.pad_token_id,
                          add_bos_token=text == "llama")
    config = OmniConfig(
        decoder=DecoderConfig(vocab_size=0, hidden_size=48, intermediate_size=80, num_hidden_layers=2,
                              num_attention_heads=3, num_key_value_heads=1, head_dim=16, max_position_embeddings=512,
                              rope_theta=10000.0, attention_bias=text == "qwen2", tie_word_embeddings=tied),
        vision=VisionConfig(**{**dict(image_size=56, patch_size=14, hidden_size=32, intermediate_size=64,
                                      num_hidden_layers=2, num_attention_heads=2, use_cls_token=True),
                               **(vision or {})}),
        audio=AudioConfig(d_model=32, encoder_layers=1, encoder_attention_heads=2, encoder_ffn_dim=64)
        if audio else None,
        max_tiles=6)
    add_media_tokens(tokenizer, config)
    config.decoder.vocab_size = len(tokenizer) + padding  # padded past the tokenizer, as Qwen2 tables are
    torch.manual_seed(seed)
    model = OmniModel(config)
    randomize(model, seed)
    if adapter:  # an unmerged adapter: the export must write W + BA
        lora.apply_lora(model, lora.LoraConfig(r=2))
        with torch.no_grad():
            for name, p in model.named_parameters():
                if "lora_B" in name:
                    p.copy_(0.05 * torch.randn(p.shape))
    return Model(model.eval(), tokenizer, STRING_TEMPLATE, name=f"own-{text}")


def reference_processor(path: Path):
    """InternVLProcessor over the exported files, built as tests/test_interop_internvl.py builds it
    (AutoProcessor needs torchvision, absent here, for InternVL's video processor)."""
    from transformers.processing_utils import ProcessorMixin

    original = ProcessorMixin.check_argument_for_proper_class
    ProcessorMixin.check_argument_for_proper_class = (
        lambda self, name, arg: None if arg is None else original(self, name, arg))
    try:
        return transformers.InternVLProcessor(
            image_processor=transformers.AutoImageProcessor.from_pretrained(path),
            tokenizer=transformers.AutoTokenizer.from_pretrained(path), video_processor=None,
            chat_template=(path / "chat_template.jinja").read_text(),
            image_seq_length=json.loads((path / "processor_config.json").read_text())["image_seq_length"])
    finally:
        ProcessorMixin.check_argument_for_proper_class = original


def transformers_inputs(processor, messages: list[dict]) -> dict:
    return processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=True,
                                         return_tensors="pt")


CASES = {
    # Qwen2, tied, padded vocabulary; a SigLIP-like final norm, no layer scale, tanh GELU; an audio tower.
    "qwen2-tied-audio": lambda tmp: own_model("qwen2", tied=True, audio=True,
                                              vision=dict(hidden_act="gelu_pytorch_tanh")),
    # Llama with a BOS the tokenizer prepends, untied; InternViT-6B-like blocks (RMSNorm, QK-norm, layer
    # scale, no final norm) read at layer -2; a LoRA adapter not merged yet.
    "llama-untied-lora": lambda tmp: own_model("llama", tied=False, audio=False, seed=1, adapter=True, vision=dict(
        hidden_act="gelu", norm_type="rms_norm", qk_norm=True, layer_scale_init=0.1, post_layernorm=False,
        feature_layer=-2)),
    # A model imported from a transformers InternVL directory (test_interop_internvl's llama case).
    "imported-internvl": lambda tmp: tinyomni.load(_built(tmp)),
}


def _built(tmp: Path) -> Path:
    build(tmp / "source", text="llama", heads=(6, 3), tied=False, feature_layer=1, seed=4)
    return tmp / "source"


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """case → (the tinyomni model, its exported directory, the notes printed), each built once."""
    done: dict[str, tuple[Model, Path, list[str]]] = {}

    def get(case: str) -> tuple[Model, Path, list[str]]:
        if case not in done:
            tmp = tmp_path_factory.mktemp(case)
            model = CASES[case](tmp)
            notes: list[str] = []
            done[case] = model, export_hf(model, tmp / "hf", note=notes.append), notes
        return done[case]

    return get


@pytest.mark.parametrize("case", list(CASES))
def test_transformers_runs_the_export_as_tinyomni_runs_the_model(case: str, exported) -> None:
    ours, path, notes = exported(case)
    assert json.loads((path / "config.json").read_text())["architectures"] == ["InternVLForConditionalGeneration"]
    assert any("video" in n for n in notes)
    assert any("audio tower" in n for n in notes) == (ours.config.audio is not None)
    reference = transformers.AutoModelForImageTextToText.from_pretrained(path, dtype=torch.float32).eval()
    assert type(reference).__name__ == "InternVLForConditionalGeneration"

    image = noise_image(150, 70, seed=3)  # 2x1 tiles + thumbnail
    inputs = transformers_inputs(reference_processor(path), conversation(image))
    prompt = ours.prepare(conversation(image))
    assert prompt.input_ids == inputs["input_ids"][0].tolist()
    assert torch.equal(prompt.pixel_values, inputs["pixel_values"])

    ids = torch.tensor([prompt.input_ids])
    with torch.no_grad():
        logits, _ = ours.model(ids, pixel_values=prompt.pixel_values)
        theirs = reference(**inputs).logits
    assert logits.shape == theirs.shape
    assert relative_error(logits, theirs) <= 1e-4
    assert (logits - theirs).abs().max().item() / theirs.abs().max().item() <= 1e-4

    # generate with the exported generation_config.json alone: greedy, our stop and suppressed tokens
    completion = ours.complete(conversation(image), max_new_tokens=16)
    with torch.no_grad():
        generated = reference.generate(**inputs, max_new_tokens=16)
    assert completion.token_ids == generated[0, ids.shape[1]:].tolist()
    assert len(completion.token_ids) == 16

    # the directory loads back into tinyomni (as an InternVL-hf checkpoint) with the same logits
    again = tinyomni.load(path)
    assert again.prepare(conversation(image)).input_ids == prompt.input_ids
    with torch.no_grad():
        back, _ = again.model(ids, pixel_values=prompt.pixel_values)
    if lora.lora_modules(ours.model):  # merged on export: W + BA computed once, not beside W
        assert relative_error(back, logits) <= 1e-6
    else:
        assert torch.equal(back, logits)


def test_conversations_give_the_same_ids_and_pixels(exported) -> None:
    """Several images (numbered "Image-k: " as tinyomni numbers them), system and assistant turns,
    images after text, a text-only conversation, and list contents with text parts only."""
    ours, path, _ = exported("qwen2-tied-audio")
    processor = reference_processor(path)
    conversations = [
        [{"role": "user", "content": [{"type": "image", "image": noise_image(100, 60, seed=1)},
                                      {"type": "image", "image": noise_image(60, 100, seed=2)},
                                      {"type": "text", "text": "What is in the picture?"}]},
         {"role": "assistant", "content": "2"},
         {"role": "user", "content": [{"type": "image", "image": noise_image(30, 30, seed=3)}]}],
        [{"role": "system", "content": [{"type": "text", "text": "Answer with a number."}]},
         {"role": "user", "content": [{"type": "text", "text": "How many red circles are there? "},
                                      {"type": "image", "image": noise_image(200, 90, seed=9)}]},
         {"role": "assistant", "content": [{"type": "text", "text": "3"}]},
         {"role": "user", "content": [{"type": "text", "text": "Describe the image in detail."}]}],
        [{"role": "user", "content": "The quick brown fox jumps over the lazy dog."}],
    ]
    for messages in conversations:
        prompt = ours.prepare(messages)
        inputs = transformers_inputs(processor, messages)
        assert prompt.input_ids == inputs["input_ids"][0].tolist()
        if prompt.pixel_values is None:
            assert "pixel_values" not in inputs
        else:
            assert torch.equal(prompt.pixel_values, inputs["pixel_values"])
    first = ours.tokenizer.decode(ours.prepare(conversations[0]).input_ids, skip_special_tokens=False)
    assert "Image-1: <img>" in first and "Image-3: <img>" in first
    # tinyomni itself renders the wrapped template exactly as the model's own
    again = tinyomni.load(path)
    assert again.prepare(conversations[1]).input_ids == ours.prepare(conversations[1]).input_ids
    with pytest.raises(Exception, match="not a part of type audio"):
        processor.apply_chat_template([{"role": "user", "content": [{"type": "audio", "audio": "x.wav"}]}],
                                      tokenize=False)


def test_the_files_transformers_reads(exported) -> None:
    ours, path, _ = exported("qwen2-tied-audio")
    config = json.loads((path / "config.json").read_text())
    assert config["text_config"]["model_type"] == "qwen2" and config["tie_word_embeddings"] is True
    assert config["image_token_id"] == ours.processor.image_context_id and config["image_seq_length"] == 4
    with safe_open(str(path / "model.safetensors"), "pt") as f:
        keys = set(f.keys())
        assert f.get_tensor("vision_tower.embeddings.cls_token").shape == (1, 1, 32)
        assert torch.equal(f.get_tensor("vision_tower.encoder.layer.0.lambda_1"), torch.ones(32))
    assert not any(k.startswith("audio") for k in keys) and "language_model.lm_head.weight" not in keys
    generation = json.loads((path / "generation_config.json").read_text())
    assert generation["do_sample"] is False and generation["eos_token_id"] == ours.tokenizer.eos_token_ids[0]
    assert generation["suppress_tokens"] == sorted(ours.suppress_ids)  # the audio tokens too
    preprocessor = json.loads((path / "preprocessor_config.json").read_text())
    assert (preprocessor["min_patches"], preprocessor["max_patches"], preprocessor["size"]["height"]) == (1, 6, 56)


# --- what InternVL cannot hold --------------------------------------------------------------------------
def reference_style_model(seed: int = 0) -> Model:
    """Shaped as tinyomni-world (docs/model_card.md): a BatchNorm conv stem under a tower without CLS
    token, and an audio tower."""
    return own_model("llama", tied=True, audio=True, seed=seed, padding=0, vision=dict(
        image_size=32, patch_size=8, conv_stem=(8, 16, 16), use_cls_token=False))


def test_the_reference_models_tower_is_refused_by_name(tmp_path: Path) -> None:
    model = reference_style_model()
    with pytest.raises(InputError, match=r"vision\.conv_stem \[8, 16, 16\].*vision\.use_cls_token false.*--text-only"):
        export_hf(model, tmp_path / "hf", note=lambda line: None)
    assert not (tmp_path / "hf").exists()


@pytest.mark.parametrize("change, message", [
    (lambda c: dataclasses.replace(c, vision=dataclasses.replace(c.vision, use_cls_token=False)),
     "vision.use_cls_token false"),  # tiny_random_model's SigLIP-style tower
    (lambda c: dataclasses.replace(c, vision=dataclasses.replace(c.vision, pre_layernorm=True)),
     "vision.pre_layernorm true"),
    (lambda c: dataclasses.replace(c, vision=dataclasses.replace(c.vision, qk_norm=True, layer_norm_eps=1e-5)),
     "vision.qk_norm with layer_norm_eps 1e-05"),
    (lambda c: dataclasses.replace(c, use_thumbnail=False), "use_thumbnail false"),
    (lambda c: dataclasses.replace(c, vision_projector=dataclasses.replace(c.vision_projector, hidden_size=16)),
     "vision_projector.hidden_size 16"),
    (lambda c: dataclasses.replace(c, vision=None), "no vision tower"),
])
def test_other_values_internvl_cannot_hold_are_named(change, message: str) -> None:
    config = OmniConfig(decoder=DecoderConfig(), vision=VisionConfig(use_cls_token=True))
    assert internvl_problems(config) == []
    problems = internvl_problems(change(config))
    assert len(problems) == 1 and message in problems[0]


def test_text_only_writes_the_decoder_for_any_model(tmp_path: Path) -> None:
    model = reference_style_model(seed=2)
    notes: list[str] = []
    path = export_hf(model, tmp_path / "text", text_only=True, note=notes.append)
    assert len(notes) == 2 and "vision tower" in notes[0] and "audio tower" in notes[1]
    assert json.loads((path / "config.json").read_text())["architectures"] == ["LlamaForCausalLM"]
    reference = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    tokenizer = transformers.AutoTokenizer.from_pretrained(path)
    messages = [{"role": "user", "content": "How many red circles are there?"}]
    prompt = model.prepare(messages)
    for content in (messages[0]["content"], [{"type": "text", "text": messages[0]["content"]}]):
        ids = tokenizer.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True,
                                            tokenize=True, return_dict=True)["input_ids"]
        assert ids == prompt.input_ids
    ids = torch.tensor([prompt.input_ids])
    with torch.no_grad():
        logits, _ = model.model(ids)
        assert relative_error(logits, reference(ids).logits) <= 1e-4
        again = tinyomni.load(path)  # a Llama directory: the decoder, with fresh encoders around it
        assert torch.equal(again.model(torch.tensor([again.prepare(messages).input_ids]))[0], logits)
    with pytest.raises(Exception, match="not a part of type image"):
        tokenizer.apply_chat_template([{"role": "user", "content": [{"type": "image"}]}], tokenize=False)


def test_the_export_command(tmp_path: Path, exported, capsys) -> None:
    from tinyomni.cli import main

    reference_style_model().save(tmp_path / "ckpt")
    assert main(["export", str(tmp_path / "ckpt"), "--to", "hf", "--out", str(tmp_path / "hf")]) == 2
    err = capsys.readouterr().err
    assert "vision.conv_stem [8, 16, 16]" in err and "--text-only" in err and not (tmp_path / "hf").exists()
    assert main(["export", str(tmp_path / "ckpt"), "--to", "hf", "--text-only", "--outtype", "bf16",
                 "--out", str(tmp_path / "text")]) == 0
    err = capsys.readouterr().err
    assert "note: the audio tower" in err and "LlamaForCausalLM" not in err
    with safe_open(str(tmp_path / "text" / "model.safetensors"), "pt") as f:
        assert f.get_tensor("model.embed_tokens.weight").dtype == torch.bfloat16
    assert main(["export", str(tmp_path / "ckpt"), "--to", "gguf", "--text-only", "--out", "x.gguf"]) == 2
    _, source, _ = exported("imported-internvl")
    assert main(["export", str(source), "--to", "hf", "--out", str(tmp_path / "again")]) == 0
    assert json.loads((tmp_path / "again" / "config.json").read_text()) == json.loads(
        (source / "config.json").read_text())
