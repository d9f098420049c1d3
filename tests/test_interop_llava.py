"""LLaVA checkpoints load with exact parity: tiny random transformers-native LLaVA models
(`LlavaForConditionalGeneration`, CLIP or SigLIP tower, Llama or Qwen2 decoder) are saved with their own
tokenizer and processor files, loaded with `tinyomni.load(dir)`, and compared with transformers on the
same image + prompt (processor output, fp32 logits, a greedy continuation). Also: the errors for what
does not load.

Nothing comes from a hub: the tokenizers are trained here on a few sentences, the weights are random.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from parity import assert_logits_match, assert_same_greedy
from PIL import Image
from safetensors.torch import load_file, save_file

import tinyomni
from tinyomni.checkpoints.families import family_for
from tinyomni.errors import CheckpointError

transformers = pytest.importorskip("transformers")
tokenizers = pytest.importorskip("tokenizers")

TILE, PATCH = 56, 14  # a 4x4 patch grid: 16 patch tokens (+1 CLS for CLIP)
CORPUS = ["USER: What is in the picture? Describe the image in detail.\n ASSISTANT: A red circle.",
          "How many red circles are there?\nAnswer with a number: 1 2 3 4 5 6 7 8 9 0",
          "The quick brown fox jumps over the lazy dog. <|im_start|> user assistant system"] * 4
# LLaVA-1.5's template (llava-hf/llava-1.5-7b-hf): images first in each message, "<image>\n" each, then
# every text part followed by a space; transformers' {% generation %} marks the assistant's text.
TEMPLATE = (
    "{% for message in messages %}{% if message['role'] != 'system' %}{{ message['role'].upper() + ': '}}"
    "{% endif %}{# Render all images first #}{% for content in message['content'] | selectattr('type', "
    "'equalto', 'image') %}{{ '<image>\n' }}{% endfor %}{# Render all text next #}{% if message['role'] != "
    "'assistant' %}{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}"
    "{{ content['text'] + ' '}}{% endfor %}{% else %}{% for content in message['content'] | selectattr('type', "
    "'equalto', 'text') %}{% generation %}{{ content['text'] + ' '}}{% endgeneration %}{% endfor %}{% endif %}"
    "{% endfor %}{% if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}"
)


# --- building tiny checkpoints -------------------------------------------------------------------------
def make_tokenizer(kind: str, path: Path):
    """A BPE tokenizer trained on CORPUS, written to `path` as LLaVA checkpoints have theirs.

    "llama": Llama-2's, as LLaVA-1.5 ships it: a tokenizer.json with the legacy "Prepend ▁" normalizer
    (a "▁" before every piece of text, also after <image>) and byte fallback, <s> prepended, <image> and
    <pad> added, and a tokenizer_config.json naming LlamaTokenizer (transformers 5 still reads the
    tokenizer.json as it is for a llava config). "llama-first": the same with the Metaspace pre-tokenizer
    (prepend_scheme "first": a "▁" only at the start of the input) that newer conversions write.
    "qwen2": byte-level BPE without BOS (a Qwen2-decoder TinyLLaVA).
    """
    from tokenizers import AddedToken, decoders, models, normalizers, pre_tokenizers, processors, trainers

    if kind == "qwen2":
        special = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<image>"]
        backend = tokenizers.Tokenizer(models.BPE())
        backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        backend.decoder = decoders.ByteLevel()
        backend.train_from_iterator(CORPUS, trainers.BpeTrainer(
            vocab_size=320, special_tokens=special, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
            show_progress=False))
        wrapped = transformers.PreTrainedTokenizerFast(
            tokenizer_object=backend, eos_token="<|im_end|>", pad_token="<|endoftext|>",
            extra_special_tokens={"image_token": "<image>"})
        wrapped.save_pretrained(path)
        return transformers.AutoTokenizer.from_pretrained(path)
    backend = tokenizers.Tokenizer(models.BPE(byte_fallback=True, unk_token="<unk>", fuse_unk=True))
    if kind == "llama-first":
        backend.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="first", split=False)
    else:
        backend.normalizer = normalizers.Sequence([normalizers.Prepend("\u2581"), normalizers.Replace(" ", "\u2581")])
    backend.decoder = decoders.Sequence([decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse(),
                                         decoders.Strip(" ", 1, 0)])
    backend.train_from_iterator(CORPUS, trainers.BpeTrainer(vocab_size=300, special_tokens=["<unk>", "<s>", "</s>"],
                                                            show_progress=False))
    backend.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", backend.token_to_id("<s>"))])
    backend.add_special_tokens([AddedToken("<image>", special=True, normalized=False),
                                AddedToken("<pad>", special=True, normalized=False)])
    backend.save(str(path / "tokenizer.json"))
    (path / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "LlamaTokenizer", "legacy": False, "add_bos_token": True, "add_eos_token": False,
        "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>", "pad_token": "<pad>"}))
    return transformers.AutoTokenizer.from_pretrained(path)


def randomize(model: torch.nn.Module, seed: int) -> None:
    """Random values everywhere (norms, biases, positions), so every weight's role shows."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name and name.endswith("weight"):
                p.copy_(1 + 0.1 * torch.randn(p.shape, generator=g))
            else:
                p.copy_(0.1 * torch.randn(p.shape, generator=g))


def image_processor(kind: str):
    """The image processor a LLaVA checkpoint with this tower ships (PIL backend)."""
    stats = dict(image_mean=[0.48145466, 0.4578275, 0.40821073], image_std=[0.26862954, 0.26130258, 0.27577711])
    if kind == "siglip":
        return transformers.SiglipImageProcessorPil(size={"height": TILE, "width": TILE}, image_mean=[0.5] * 3,
                                                    image_std=[0.5] * 3)
    crop = dict(size={"shortest_edge": TILE}, crop_size={"height": TILE, "width": TILE}, **stats)
    if kind == "pad":  # LlavaImageProcessor: pad to a square in the mean colour first (original LLaVA-1.5)
        return transformers.LlavaImageProcessorPil(do_pad=True, **crop)
    return transformers.CLIPImageProcessorPil(**crop)


def build(path: Path, tower: str = "clip", text: str = "llama", heads: tuple[int, int] = (3, 3), tied: bool = False,
          feature_layer: int | list[int] = -2, strategy: str = "default", processor: str = "crop",
          spelling: str = "saved", nested_processor: bool = False, projector_bias: bool = True, seed: int = 0):
    """A tiny LLaVA checkpoint directory at `path`; returns the transformers model (fp32, eval)."""
    tokenizer = make_tokenizer(text, path)
    n_heads, n_kv = heads
    head_dim = 16
    common = dict(vocab_size=len(tokenizer) + 5, hidden_size=n_heads * head_dim, intermediate_size=80,
                  num_hidden_layers=2, num_attention_heads=n_heads, num_key_value_heads=n_kv,
                  max_position_embeddings=512, rms_norm_eps=1e-6, tie_word_embeddings=tied)
    if text.startswith("qwen2"):
        text_config = transformers.Qwen2Config(**common, rope_theta=1000000.0)
    else:
        text_config = transformers.LlamaConfig(**common, rope_theta=10000.0, head_dim=head_dim,
                                               bos_token_id=tokenizer.bos_token_id)
    tower_options = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=2,
                         image_size=TILE, patch_size=PATCH)
    if tower == "siglip":
        vision_config = transformers.SiglipVisionConfig(**tower_options)
    else:
        vision_config = transformers.CLIPVisionConfig(**tower_options, hidden_act="quick_gelu")
    image_token_id = tokenizer.convert_tokens_to_ids("<image>")
    config = transformers.LlavaConfig(
        vision_config=vision_config, text_config=text_config, image_token_index=image_token_id,
        vision_feature_layer=feature_layer, vision_feature_select_strategy=strategy, projector_hidden_act="gelu",
        multimodal_projector_bias=projector_bias, tie_word_embeddings=tied)
    torch.manual_seed(seed)
    model = transformers.LlavaForConditionalGeneration(config).eval()
    randomize(model, seed)
    if tied:
        model.tie_weights()
    model.save_pretrained(path)
    if spelling == "in-memory":
        # transformers 5's in-memory names, in bfloat16 as the hub stores weights; the reference is then
        # what transformers loads from that file, in float32.
        state = {k: v.contiguous().to(torch.bfloat16) for k, v in model.state_dict().items()
                 if not (tied and k == "lm_head.weight")}
        for f in path.glob("model*.safetensors*"):
            f.unlink()
        save_file(state, str(path / "model.safetensors"), metadata={"format": "pt"})
        model = transformers.LlavaForConditionalGeneration.from_pretrained(path, dtype=torch.float32).eval()
    (path / "chat_template.jinja").write_text(TEMPLATE)
    processor_config = {"processor_class": "LlavaProcessor", "patch_size": PATCH, "image_token": "<image>",
                        "vision_feature_select_strategy": strategy,
                        "num_additional_image_tokens": 1 if tower == "clip" else 0}
    ip = image_processor("siglip" if tower == "siglip" else processor)
    if nested_processor:  # transformers 5 writes one processor_config.json with the image processor inside
        processor_config["image_processor"] = ip.to_dict()
    else:  # the hub's LLaVA-hf repositories: preprocessor_config.json beside processor_config.json
        ip.save_pretrained(path)
    (path / "processor_config.json").write_text(json.dumps(processor_config, indent=2))
    return model


def reference_processor(path: Path):
    """transformers' own processor for the directory (AutoProcessor: a LlavaProcessor over its tokenizer,
    image processor, processor settings and template; LLaVA has no video processor, so no torchvision
    is needed, and the image processor is the PIL one)."""
    processor = transformers.AutoProcessor.from_pretrained(path)
    assert isinstance(processor, transformers.LlavaProcessor) and processor.image_processor.backend == "pil"
    return processor


def noise_image(width: int, height: int, seed: int = 0) -> Image.Image:
    g = torch.Generator().manual_seed(seed)
    return Image.fromarray(torch.randint(0, 256, (height, width, 3), generator=g, dtype=torch.uint8).numpy())


def conversation(image: Image.Image, question: str = "What is in the picture?") -> list[dict]:
    return [{"role": "user", "content": [{"type": "image", "image": image}, {"type": "text", "text": question}]}]


def reference_inputs(processor, messages: list[dict]) -> dict:
    return processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=True,
                                         return_tensors="pt")



# --- parity --------------------------------------------------------------------------------------------
CASES = {
    # LLaVA-1.5's shape: CLIP, the second-to-last layer without CLS, a Llama-2-style tokenizer, untied.
    "clip-llama-layer-2": dict(tower="clip", text="llama", heads=(3, 3), tied=False, feature_layer=-2),
    # CLIP with its CLS token kept ("full"), the last layer, pad-to-square, Qwen2 with 5 heads over 1, tied,
    # transformers 5's in-memory names in bf16.
    "clip-qwen2-full-pad": dict(tower="clip", text="qwen2", heads=(5, 1), tied=True, feature_layer=-1,
                                strategy="full", processor="pad", spelling="in-memory"),
    # SigLIP (no CLS): "default" drops its first patch; Qwen2 3 heads over 1, untied; nested processor file.
    "siglip-qwen2-default": dict(tower="siglip", text="qwen2", heads=(3, 1), tied=False, feature_layer=-2,
                                 nested_processor=True),
    # SigLIP, every token, two layers concatenated, projector without biases, Llama 6 heads over 3, tied.
    "siglip-llama-layers": dict(tower="siglip", text="llama-first", heads=(6, 3), tied=True, feature_layer=[-3, -1],
                                strategy="full", projector_bias=False),
}


@pytest.mark.parametrize("case", list(CASES))
def test_logits_and_greedy_continuation_match_transformers(case: str, tmp_path: Path) -> None:
    options = CASES[case]
    reference = build(tmp_path, **options, seed=len(case))
    ours = tinyomni.load(tmp_path)
    assert family_for(tmp_path)[0] == "LlavaForConditionalGeneration"
    assert ours.config.decoder.tie_word_embeddings == options["tied"]
    assert ours.config.audio is None and ours.model.audio_tower is None

    messages = conversation(noise_image(150, 70, seed=3))
    inputs = reference_inputs(reference_processor(tmp_path), messages)
    prompt = ours.prepare(messages)
    assert prompt.input_ids == inputs["input_ids"][0].tolist()
    assert torch.equal(prompt.pixel_values, inputs["pixel_values"])

    ids = torch.tensor([prompt.input_ids])
    with torch.no_grad():
        logits, _ = ours.model(ids, pixel_values=prompt.pixel_values)
        theirs = reference(**inputs).logits
    assert_logits_match(logits, theirs)
    assert_same_greedy(ours, reference, messages, inputs, ids.shape[1])


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("llava-llama")
    build(path, tower="clip", text="llama-first", heads=(3, 3))
    return path


@pytest.fixture(scope="module")
def legacy_dir(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("llava-legacy")
    build(path, tower="clip", text="llama", heads=(3, 1))
    return path


@pytest.fixture(scope="module")
def padded_dir(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("llava-pad")
    build(path, tower="clip", text="qwen2", heads=(3, 1), processor="pad")
    return path


@pytest.mark.parametrize("kind", ["llama", "padded"])
@pytest.mark.parametrize("size", [(1, 1), (5, 3), (2000, 9), (37, 600), (56, 56), (640, 480)])
def test_processor_output_matches_transformers(kind: str, size: tuple[int, int], request) -> None:
    """Pixel values and input ids equal transformers' for tiny, very wide, tall and ordinary images."""
    path = request.getfixturevalue(f"{kind}_dir")
    ours = tinyomni.load(path)
    messages = conversation(noise_image(*size, seed=size[0]), "How many red circles are there?")
    inputs = reference_inputs(reference_processor(path), messages)
    prompt = ours.prepare(messages)
    assert prompt.input_ids == inputs["input_ids"][0].tolist()
    assert torch.equal(prompt.pixel_values, inputs["pixel_values"])
    assert ours.info(image_size=size)["image"]["tiles"] == 1


@pytest.mark.parametrize("kind", ["llama", "legacy"])
def test_a_longer_conversation_gives_transformers_ids(kind: str, request) -> None:
    """System turn, text before the image in the content (the template puts the image first), two images,
    an assistant turn and a text-only follow-up; both SentencePiece styles."""
    llama_dir = request.getfixturevalue(f"{kind}_dir")
    ours = tinyomni.load(llama_dir)
    messages = [
        {"role": "system", "content": [{"type": "text", "text": "Answer with a number."}]},
        {"role": "user", "content": [{"type": "text", "text": "How many red circles are there?"},
                                     {"type": "image", "image": noise_image(200, 90, seed=9)},
                                     {"type": "image", "image": noise_image(30, 70, seed=8)}]},
        {"role": "assistant", "content": [{"type": "text", "text": "3"}]},
        {"role": "user", "content": [{"type": "text", "text": "Describe the image in detail."}]},
    ]
    inputs = reference_inputs(reference_processor(llama_dir), messages)
    prompt = ours.prepare(messages)
    assert prompt.input_ids == inputs["input_ids"][0].tolist()
    assert torch.equal(prompt.pixel_values, inputs["pixel_values"])
    assert prompt.tiles_per_image == [1, 1]


def test_typed_image_and_control_tokens_stay_text(llama_dir: Path) -> None:
    """A user typing "<image>" gets no image slot, and "<s>" no BOS: both stay plain text."""
    ours = tinyomni.load(llama_dir)
    image_id, bos = ours.processor.image_context_id, ours.tokenizer.bos_token_id
    prompt = ours.prepare([{"role": "user", "content": [
        {"type": "image", "image": noise_image(60, 60)},
        {"type": "text", "text": "<image> <s> What is in the picture?"}]}])
    assert prompt.input_ids.count(image_id) == ours.config.image_tokens_per_tile
    assert prompt.input_ids.count(bos) == 1
    assert "<image> <s>" in ours.tokenizer.decode(prompt.input_ids, skip_special_tokens=False)


def test_config_comes_from_the_checkpoint_files(llama_dir: Path, padded_dir: Path) -> None:
    config = tinyomni.load(llama_dir).config
    assert config.vision.feature_layer == -2 and config.vision.feature_select == "patches"
    assert config.image_tokens_per_tile == 16 and config.image_context_token == "<image>"
    assert config.image_resize == "shortest_edge" and config.image_shortest_edge == TILE
    assert not config.image_pad_to_square
    assert not config.vision_projector.layer_norm and not config.image_wrap and config.images_in_template
    assert tinyomni.load(padded_dir).config.image_pad_to_square


def test_saved_import_loads_back_as_a_native_checkpoint(llama_dir: Path, tmp_path: Path) -> None:
    ours = tinyomni.load(llama_dir)
    ours.save(tmp_path / "saved")
    again = tinyomni.load(tmp_path / "saved")
    assert again.config == ours.config and again.suppress_ids == ours.suppress_ids
    messages = conversation(noise_image(90, 40))
    prompt = ours.prepare(messages)
    assert again.prepare(messages).input_ids == prompt.input_ids
    ids = torch.tensor([prompt.input_ids])
    with torch.no_grad():
        a, _ = ours.model(ids, pixel_values=prompt.pixel_values)
        b, _ = again.model(ids, pixel_values=prompt.pixel_values)
    assert torch.equal(a, b)


# --- errors --------------------------------------------------------------------------------------------
def copy_dir(source: Path, dest: Path) -> Path:
    dest.mkdir()
    for f in source.iterdir():
        (dest / f.name).write_bytes(f.read_bytes())
    return dest


def edit_json(path: Path, change) -> None:
    data = json.loads(path.read_text())
    change(data)
    path.write_text(json.dumps(data))


def test_a_missing_tensor_is_named(llama_dir: Path, tmp_path: Path) -> None:
    path = copy_dir(llama_dir, tmp_path / "ckpt")
    file = path / "model.safetensors"
    state = load_file(str(file))
    key = next(k for k in state if k.endswith("encoder.layers.1.mlp.fc2.weight"))
    state.pop(key)
    save_file(state, str(file), metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match=rf"lacks weight\(s\) {key.replace('.', r'[.]')}"):
        tinyomni.load(path)


def test_an_unknown_tensor_is_named(llama_dir: Path, tmp_path: Path) -> None:
    path = copy_dir(llama_dir, tmp_path / "ckpt")
    file = path / "model.safetensors"
    state = load_file(str(file))
    prefix = next(k for k in state if "multi_modal_projector." in k).split("multi_modal_projector.")[0]
    state[prefix + "multi_modal_projector.layer_norm.weight"] = torch.ones(32)
    save_file(state, str(file), metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match=r"unknown LLaVA weight\(s\) \S*multi_modal_projector\.layer_norm"):
        tinyomni.load(path)


@pytest.mark.parametrize("change, message", [
    (lambda c: c.update(vision_feature_select_strategy="cls"), "vision_feature_select_strategy 'cls'"),
    (lambda c: c.update(vision_feature_layer=[]), r"vision_feature_layer \[\]"),
    (lambda c: c.update(vision_feature_layer=7), "vision_feature_layer 7"),
    (lambda c: c.update(projector_hidden_act="swish"), "projector_hidden_act 'swish'"),
    (lambda c: c["vision_config"].update(model_type="pixtral"), "'pixtral' vision tower is not supported"),
    (lambda c: c["text_config"].update(model_type="mistral"), "'mistral' language model is not supported"),
    (lambda c: c["text_config"].update(hidden_act="gelu"), "hidden_act 'gelu'"),
    (lambda c: c.update(image_token_index=3), "image_token_index 3"),
])
def test_unsupported_config_values_are_named(llama_dir: Path, tmp_path: Path, change, message: str) -> None:
    path = copy_dir(llama_dir, tmp_path / "ckpt")
    edit_json(path / "config.json", change)
    with pytest.raises(CheckpointError, match=message):
        tinyomni.load(path)


@pytest.mark.parametrize("file, change, message", [
    ("preprocessor_config.json", lambda c: c.update(resample=2), "resample 2"),
    ("preprocessor_config.json", lambda c: c.update(crop_size={"height": 64, "width": 64}), "crop_size"),
    ("preprocessor_config.json", lambda c: c.update(image_processor_type="Idefics3ImageProcessor"), "Idefics3"),
    ("processor_config.json", lambda c: c.update(num_additional_image_tokens=0), "15 image tokens"),
])
def test_unsupported_processor_settings_are_named(llama_dir: Path, tmp_path: Path, file: str, change,
                                                  message: str) -> None:
    path = copy_dir(llama_dir, tmp_path / "ckpt")
    edit_json(path / file, change)
    with pytest.raises(CheckpointError, match=message):
        tinyomni.load(path)


def test_training_examples_and_video_frames_use_the_template_s_image_slots(llama_dir: Path) -> None:
    """training_example reads the prompt's ids; a video's frames are images the template places."""
    ours = tinyomni.load(llama_dir)
    messages = conversation(noise_image(80, 50)) + [
        {"role": "assistant", "content": [{"type": "text", "text": "A red circle."}]}]
    prompt, labels = ours.processor.training_example(messages)
    start = ours.prepare(messages[:1]).input_ids
    assert prompt.input_ids[:len(start)] == start and set(labels[:len(start)]) == {-100}
    assert ours.tokenizer.decode([i for i, k in zip(prompt.input_ids, labels) if k != -100]).strip() == "A red circle."
    frames = [noise_image(70, 40, seed=k) for k in range(3)]
    video = ours.prepare([{"role": "user", "content": [{"type": "video", "video": frames},
                                                       {"type": "text", "text": "What moves?"}]}])
    assert video.input_ids.count(ours.processor.image_context_id) == 3 * ours.config.image_tokens_per_tile


def test_keys_a_config_leaves_out_mean_what_transformers_assumes() -> None:
    """LLaVA-1.5's config.json (llava-hf/llava-1.5-7b-hf) names only a few keys of each part."""
    from tinyomni.checkpoints import llava

    raw = {"architectures": ["LlavaForConditionalGeneration"], "model_type": "llava", "image_token_index": 32000,
           "vision_config": {"model_type": "clip_vision_model", "hidden_size": 1024, "image_size": 336,
                             "intermediate_size": 4096, "num_attention_heads": 16, "num_hidden_layers": 24,
                             "patch_size": 14, "projection_dim": 768},
           "text_config": {"model_type": "llama", "vocab_size": 32064, "max_position_embeddings": 4096,
                           "rms_norm_eps": 1e-05}}
    theirs = transformers.LlavaConfig(**{k: v for k, v in raw.items() if k != "architectures"})
    vision, family = llava._vision_config({**llava.LLAVA_DEFAULTS, **raw}, "llava-1.5")
    decoder = llava._decoder_config(raw["text_config"], "llava-1.5")
    tv, tt = theirs.vision_config, theirs.text_config
    assert family == "clip" and vision.feature_layer == theirs.vision_feature_layer == -2
    assert (vision.hidden_act, vision.layer_norm_eps) == (tv.hidden_act, tv.layer_norm_eps)
    assert (decoder.hidden_size, decoder.intermediate_size, decoder.num_hidden_layers, decoder.num_attention_heads,
            decoder.num_key_value_heads, decoder.rms_norm_eps, decoder.rope_theta) == (
        tt.hidden_size, tt.intermediate_size, tt.num_hidden_layers, tt.num_attention_heads, tt.num_key_value_heads,
        tt.rms_norm_eps, tt.rope_parameters["rope_theta"])
    assert theirs.tie_word_embeddings is False
    assert theirs.projector_hidden_act == llava.LLAVA_DEFAULTS["projector_hidden_act"]
