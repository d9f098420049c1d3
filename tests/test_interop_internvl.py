"""InternVL checkpoints load with exact parity: tiny random transformers-native InternVL models
(`InternVLForConditionalGeneration`) are saved with their own tokenizer and processor files, loaded with
`tinyomni.load(dir)`, and compared with transformers on the same image + prompt (processor output,
fp32 logits, a greedy continuation). Also: the original OpenGVLab layout, the architecture table and
the errors for what does not load.

Nothing comes from a hub: the tokenizer is trained here on a few sentences, the weights are random.
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
from tinyomni.checkpoints.families import ARCHITECTURES, family_for
from tinyomni.errors import CheckpointError

transformers = pytest.importorskip("transformers")
tokenizers = pytest.importorskip("tokenizers")

TILE = 56  # 4x4 patches of 14 px → 4 tokens per tile after pixel shuffle 0.5
TOKENS_PER_TILE = 4
MAX_TILES = 6
IMAGE_MEAN, IMAGE_STD = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]
CORPUS = ["What is in the picture? Describe the image in detail.", "How many red circles are there?",
          "The quick brown fox jumps over the lazy dog.", "Answer with a number: 1 2 3 4 5 6 7 8 9 0",
          "user assistant system"] * 4
# The template InternVL-hf checkpoints ship: ChatML, an image part becomes <IMG_CONTEXT> + newline,
# which InternVLProcessor expands to <img><IMG_CONTEXT>×N</img>.
TEMPLATE = (
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n'}}"
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}"
    "{% for content in message['content'] %}{% if content['type'] == 'image' %}{{ '<IMG_CONTEXT>\n' }}"
    "{% elif content['type'] == 'video' %}{{ '<video>\n' }}{% elif content['type'] == 'text' %}"
    "{{ content['text'] }}{% endif %}{% endfor %}{% endif %}{{'<|im_end|>\n'}}{% endfor %}"
    "{% if add_generation_prompt %}{{'<|im_start|>assistant\n' }}{% endif %}"
)
IMAGE_TOKENS = {"start_image_token": "<img>", "end_image_token": "</img>",
                "context_image_token": "<IMG_CONTEXT>", "video_token": "<video>"}


# --- building tiny checkpoints -------------------------------------------------------------------------
def make_tokenizer(kind: str):
    """A BPE tokenizer trained on CORPUS, wrapped and configured as InternVL's are. "qwen2": byte-level,
    no BOS (InternVL3's Qwen2.5 tokenizer). "llama": SentencePiece-style (Metaspace with
    prepend_scheme "never", byte fallback) with a <s> BOS that the tokenizer prepends, as transformers
    converted InternVL2.5's InternLM2 tokenizer for its Llama-decoder -hf checkpoints."""
    from tokenizers import decoders, models, pre_tokenizers, processors, trainers

    if kind == "qwen2":
        special = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<img>", "</img>", "<IMG_CONTEXT>", "<video>"]
        backend = tokenizers.Tokenizer(models.BPE())
        backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        backend.decoder = decoders.ByteLevel()
        backend.train_from_iterator(CORPUS, trainers.BpeTrainer(
            vocab_size=320, special_tokens=special, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
            show_progress=False))
        return transformers.PreTrainedTokenizerFast(
            tokenizer_object=backend, eos_token="<|im_end|>", pad_token="<|endoftext|>",
            extra_special_tokens=IMAGE_TOKENS)
    # Other ids than the Qwen2 one's, so nothing depends on where the media tokens sit.
    special = ["<unk>", "<s>", "</s>", "<|im_start|>", "<|im_end|>", "<video>", "<IMG_CONTEXT>", "<img>", "</img>"]
    backend = tokenizers.Tokenizer(models.BPE(byte_fallback=True, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="never", split=False)
    backend.decoder = decoders.Sequence([decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse()])
    backend.train_from_iterator(CORPUS, trainers.BpeTrainer(vocab_size=400, special_tokens=special,
                                                            show_progress=False))
    backend.post_processor = processors.TemplateProcessing(
        single="<s> $A", special_tokens=[("<s>", backend.token_to_id("<s>"))])
    return transformers.PreTrainedTokenizerFast(
        tokenizer_object=backend, bos_token="<s>", eos_token="<|im_end|>", pad_token="</s>", unk_token="<unk>",
        extra_special_tokens=IMAGE_TOKENS)


def randomize(model: torch.nn.Module, seed: int) -> None:
    """Random values everywhere (norms, biases, layer scales, positions), so every weight's role shows."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight") or "layernorm" in name or "layer_norm.weight" in name:
                p.copy_(1 + 0.1 * torch.randn(p.shape, generator=g))
            else:
                p.copy_(0.1 * torch.randn(p.shape, generator=g))


def image_processor(**overrides):
    settings = dict(size={"height": TILE, "width": TILE}, image_mean=IMAGE_MEAN, image_std=IMAGE_STD,
                    crop_to_patches=True, min_patches=1, max_patches=MAX_TILES)
    return transformers.GotOcr2ImageProcessorPil(**{**settings, **overrides})


def reference_processor(path: Path, processor=None):
    """transformers' InternVLProcessor over the directory's tokenizer and the given image processor.

    AutoProcessor itself cannot be built here: it also builds InternVL's video processor, which needs
    torchvision (not installed); InternVLProcessor's __init__ checks that argument's class, so the check
    is skipped for the absent video processor only.
    """
    from transformers.processing_utils import ProcessorMixin

    original = ProcessorMixin.check_argument_for_proper_class
    ProcessorMixin.check_argument_for_proper_class = (
        lambda self, name, arg: None if arg is None else original(self, name, arg))
    try:
        return transformers.InternVLProcessor(
            image_processor=processor or transformers.AutoImageProcessor.from_pretrained(path),
            tokenizer=transformers.AutoTokenizer.from_pretrained(path), video_processor=None,
            chat_template=TEMPLATE, image_seq_length=TOKENS_PER_TILE)
    finally:
        ProcessorMixin.check_argument_for_proper_class = original


def build(path: Path, text: str = "qwen2", heads: tuple[int, int] = (3, 1), tied: bool = True,
          feature_layer: int = -1, spelling: str = "saved", shards: bool = False, nested_processor: bool = False,
          seed: int = 0, qk_norm: bool = False, norm_type: str = "layer_norm", final_norm: bool = False,
          old_files: bool = False):
    """A tiny InternVL-hf checkpoint directory at `path`; returns the transformers model (fp32, eval)."""
    tokenizer = make_tokenizer(text)
    n_heads, n_kv = heads
    head_dim = 16
    common = dict(vocab_size=len(tokenizer) + 7,  # padded past the tokenizer, as Qwen2 tables are
                  hidden_size=n_heads * head_dim, intermediate_size=80, num_hidden_layers=2,
                  num_attention_heads=n_heads, num_key_value_heads=n_kv, max_position_embeddings=512,
                  rms_norm_eps=1e-6, tie_word_embeddings=tied)
    if text == "qwen2":
        text_config = transformers.Qwen2Config(**common, rope_theta=1000000.0)
    else:
        text_config = transformers.LlamaConfig(**common, rope_theta=10000.0, head_dim=head_dim,
                                               bos_token_id=tokenizer.bos_token_id)
    vision_config = transformers.InternVLVisionConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=2, image_size=TILE,
        patch_size=14, use_qk_norm=qk_norm, norm_type=norm_type, use_mean_pooling=not final_norm, attention_bias=True)
    config = transformers.InternVLConfig(
        vision_config=vision_config, text_config=text_config, downsample_ratio=0.5,
        image_token_id=tokenizer.convert_tokens_to_ids("<IMG_CONTEXT>"), image_seq_length=TOKENS_PER_TILE,
        vision_feature_layer=feature_layer, tie_word_embeddings=tied)
    torch.manual_seed(seed)
    model = transformers.InternVLForConditionalGeneration(config).eval()
    randomize(model, seed)
    if tied:
        model.tie_weights()
    model.save_pretrained(path, max_shard_size="300KB" if shards else "5GB")
    if spelling == "in-memory":
        # The names transformers 5 uses in memory (and newer conversions store), in bfloat16 as the hub
        # stores them; the reference is then what transformers loads from that file, in float32.
        state = {k: v.contiguous().to(torch.bfloat16) for k, v in model.state_dict().items()
                 if not (tied and k == "lm_head.weight")}
        for f in path.glob("model*.safetensors*"):
            f.unlink()
        save_file(state, str(path / "model.safetensors"), metadata={"format": "pt"})
        model = transformers.InternVLForConditionalGeneration.from_pretrained(path, dtype=torch.float32).eval()
    tokenizer.save_pretrained(path)
    if old_files:
        # As the hub's -hf repositories (converted with transformers 4.5x) keep them: the image token
        # names inside "extra_special_tokens", the template in chat_template.json.
        meta = json.loads((path / "tokenizer_config.json").read_text())
        meta["extra_special_tokens"] = {k: meta.pop(k) for k in IMAGE_TOKENS}
        (path / "tokenizer_config.json").write_text(json.dumps(meta, indent=2))
        (path / "chat_template.json").write_text(json.dumps({"chat_template": TEMPLATE}))
    else:
        (path / "chat_template.jinja").write_text(TEMPLATE)
    processor_config = {"image_seq_length": TOKENS_PER_TILE, "processor_class": "InternVLProcessor"}
    ip = image_processor()
    if nested_processor:  # transformers 5 writes one processor_config.json with the image processor inside
        processor_config["image_processor"] = ip.to_dict()
    else:  # the hub's InternVL-hf repositories: preprocessor_config.json beside processor_config.json
        ip.save_pretrained(path)
    (path / "processor_config.json").write_text(json.dumps(processor_config, indent=2))
    return model


def noise_image(width: int, height: int, seed: int = 0) -> Image.Image:
    g = torch.Generator().manual_seed(seed)
    return Image.fromarray(torch.randint(0, 256, (height, width, 3), generator=g, dtype=torch.uint8).numpy())


def conversation(image: Image.Image, question: str = "What is in the picture?") -> list[dict]:
    return [{"role": "user", "content": [{"type": "image", "image": image}, {"type": "text", "text": question}]}]



# --- parity --------------------------------------------------------------------------------------------
CASES = {
    # Qwen2, tied embeddings, 3 heads over 1 KV head, the last layer of a tower without a final norm.
    "qwen2-tied": dict(text="qwen2", heads=(3, 1), tied=True, feature_layer=-1),
    # Qwen2, untied, an earlier layer, QK-norm, the names transformers 5 uses in memory, bf16 weights.
    "qwen2-untied-layer-2": dict(text="qwen2", heads=(5, 5), tied=False, feature_layer=-2, spelling="in-memory",
                                 qk_norm=True),
    # Llama (BOS from the tokenizer), untied, 6 heads over 3, a positive layer index, shards, nested processor.
    "llama-untied-layer1": dict(text="llama", heads=(6, 3), tied=False, feature_layer=1, shards=True,
                                nested_processor=True),
    # Llama, tied, odd heads 3 over 3, tokenizer and template files as the hub's older exports have them.
    "llama-tied": dict(text="llama", heads=(3, 3), tied=True, feature_layer=-1, old_files=True),
    # An InternViT-6B-shaped tower: RMSNorm blocks, QK-norm and the final LayerNorm (no mean pooling).
    "qwen2-rms-final-norm": dict(text="qwen2", heads=(3, 1), tied=True, feature_layer=-1, qk_norm=True,
                                 norm_type="rms_norm", final_norm=True),
}


@pytest.mark.parametrize("case", list(CASES))
def test_logits_and_greedy_continuation_match_transformers(case: str, tmp_path: Path) -> None:
    options = CASES[case]
    reference = build(tmp_path, **options, seed=len(case))
    ours = tinyomni.load(tmp_path)
    config = ours.config
    assert config.vision.feature_layer == options["feature_layer"]
    assert config.decoder.tie_word_embeddings == options["tied"]
    assert config.audio is None and ours.model.audio_tower is None

    image = noise_image(150, 70, seed=3)  # 2x1 tiles + thumbnail
    processor = reference_processor(tmp_path, image_processor())
    inputs = processor.apply_chat_template(conversation(image), add_generation_prompt=True, tokenize=True,
                                           return_dict=True, return_tensors="pt")
    prompt = ours.prepare(conversation(image))
    assert prompt.input_ids == inputs["input_ids"][0].tolist()
    assert torch.equal(prompt.pixel_values, inputs["pixel_values"])
    assert prompt.pixel_values.shape[0] == 3

    ids = torch.tensor([prompt.input_ids])
    with torch.no_grad():
        logits, _ = ours.model(ids, pixel_values=prompt.pixel_values)
        theirs = reference(**inputs).logits
    assert_logits_match(logits, theirs)
    assert_same_greedy(ours, reference, conversation(image), inputs, ids.shape[1])


@pytest.fixture(scope="module")
def qwen2_dir(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("internvl-qwen2")
    build(path, text="qwen2", heads=(3, 1), tied=True)
    return path


@pytest.mark.parametrize("size", [(1, 1), (5, 3), (2000, 9), (37, 600), (56, 56), (300, 200), (640, 480)])
def test_processor_output_matches_transformers(qwen2_dir: Path, size: tuple[int, int]) -> None:
    """Pixel values and input ids equal transformers' for tiny, very wide, tall and ordinary images."""
    ours = tinyomni.load(qwen2_dir)
    processor = reference_processor(qwen2_dir)  # the image processor as saved (preprocessor_config.json)
    image = noise_image(*size, seed=size[0])
    messages = conversation(image, "How many red circles are there?")
    inputs = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=True,
                                           return_tensors="pt")
    prompt = ours.prepare(messages)
    assert prompt.input_ids == inputs["input_ids"][0].tolist()
    assert torch.equal(prompt.pixel_values, inputs["pixel_values"])
    info = ours.info(image_size=size)
    assert info["image"]["tiles"] == prompt.pixel_values.shape[0]


@pytest.mark.parametrize("mode", ["RGBA", "L", "P"])
def test_alpha_grey_and_palette_images_match_transformers(qwen2_dir: Path, mode: str) -> None:
    """Both composite transparency onto white and convert everything else to RGB."""
    ours = tinyomni.load(qwen2_dir)
    processor = reference_processor(qwen2_dir)
    g = torch.Generator().manual_seed(4)
    channels = {"RGBA": 4, "L": 1, "P": 3}[mode]
    pixels = torch.randint(0, 256, (50, 80, channels), generator=g, dtype=torch.uint8).squeeze(-1).numpy()
    image = Image.fromarray(pixels)  # [h, w, 4] → RGBA, [h, w] → L, [h, w, 3] → RGB (then a palette)
    if mode == "P":
        image = image.quantize(16)
    messages = conversation(image)
    inputs = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=True,
                                           return_tensors="pt")
    assert torch.equal(ours.prepare(messages).pixel_values, inputs["pixel_values"])


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("internvl-llama")
    build(path, text="llama", heads=(3, 3), tied=True)
    return path


@pytest.mark.parametrize("kind", ["qwen2", "llama"])
def test_a_longer_conversation_gives_transformers_ids(kind: str, request) -> None:
    """System turn, text before the image, an assistant turn and a text-only follow-up."""
    path = request.getfixturevalue(f"{kind}_dir")
    ours = tinyomni.load(path)
    processor = reference_processor(path)
    image = noise_image(200, 90, seed=9)
    messages = [
        {"role": "system", "content": [{"type": "text", "text": "Answer with a number."}]},
        {"role": "user", "content": [{"type": "text", "text": "How many red circles are there? "},
                                     {"type": "image", "image": image}]},
        {"role": "assistant", "content": [{"type": "text", "text": "3"}]},
        {"role": "user", "content": [{"type": "text", "text": "Describe the image in detail."}]},
    ]
    inputs = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=True,
                                           return_tensors="pt")
    prompt = ours.prepare(messages)
    assert prompt.input_ids == inputs["input_ids"][0].tolist()
    assert torch.equal(prompt.pixel_values, inputs["pixel_values"])


def test_several_images_are_numbered_as_the_processor_numbers_them(qwen2_dir: Path) -> None:
    """InternVLProcessor adds no "Image-k: " labels (tinyomni's own models do): the config says so."""
    ours = tinyomni.load(qwen2_dir)
    assert ours.config.number_images is False
    processor = reference_processor(qwen2_dir)
    messages = [{"role": "user", "content": [{"type": "image", "image": noise_image(100, 60, seed=1)},
                                             {"type": "image", "image": noise_image(60, 100, seed=2)},
                                             {"type": "text", "text": "What is in the picture?"}]},
                {"role": "assistant", "content": "2"},
                {"role": "user", "content": [{"type": "image", "image": noise_image(30, 30, seed=3)}]}]
    inputs = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=True,
                                           return_tensors="pt")
    prompt = ours.prepare(messages)
    assert prompt.input_ids == inputs["input_ids"][0].tolist()
    assert torch.equal(prompt.pixel_values, inputs["pixel_values"])
    assert prompt.tiles_per_image == [7, 7, 1]  # 3x2 and 2x3 grids + thumbnails; one tile


def test_config_comes_from_the_checkpoint_files(qwen2_dir: Path) -> None:
    init = torch.nn.init.trunc_normal_
    config = tinyomni.load(qwen2_dir).config
    assert torch.nn.init.trunc_normal_ is init  # building without initialisation is undone after the load
    assert (config.min_tiles, config.max_tiles, config.use_thumbnail) == (1, MAX_TILES, True)
    assert config.vision.image_size == TILE and config.image_tokens_per_tile == TOKENS_PER_TILE
    assert config.vision.image_mean == pytest.approx(IMAGE_MEAN) and config.vision.image_std == pytest.approx(IMAGE_STD)
    assert config.image_context_token == "<IMG_CONTEXT>" and config.vision_projector.hidden_act == "gelu"
    assert family_for(qwen2_dir)[0] == "InternVLForConditionalGeneration"


def test_saved_import_loads_back_as_a_native_checkpoint(qwen2_dir: Path, tmp_path: Path) -> None:
    ours = tinyomni.load(qwen2_dir)
    ours.save(tmp_path / "saved")
    again = tinyomni.load(tmp_path / "saved")
    assert again.config == ours.config and again.suppress_ids == ours.suppress_ids
    prompt = ours.prepare(conversation(noise_image(90, 90)))
    assert again.prepare(conversation(noise_image(90, 90))).input_ids == prompt.input_ids
    ids = torch.tensor([prompt.input_ids])
    with torch.no_grad():
        a, _ = ours.model(ids, pixel_values=prompt.pixel_values)
        b, _ = again.model(ids, pixel_values=prompt.pixel_values)
    assert torch.equal(a, b)


# --- the architecture table and errors ----------------------------------------------------------------
def test_an_unsupported_architecture_is_named_with_the_supported_ones(qwen2_dir: Path, tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text(json.dumps(
        {"architectures": ["Qwen2VLForConditionalGeneration"], "model_type": "qwen2_vl", "text_config": {}}))
    with pytest.raises(CheckpointError, match="Qwen2VLForConditionalGeneration is not supported") as err:
        tinyomni.load(tmp_path)
    for name in ARCHITECTURES:
        assert name in str(err.value)


def test_the_cli_chats_with_an_internvl_directory_and_refuses_an_unknown_one(qwen2_dir: Path, tmp_path: Path,
                                                                               capsys) -> None:
    from tinyomni.cli import main

    noise_image(120, 80).save(tmp_path / "x.png")
    assert main(["chat", "--model", str(qwen2_dir), "--image", str(tmp_path / "x.png"), "--max-new-tokens", "3",
                 "What is in the picture?"]) == 0
    assert main(["info", "--model", str(qwen2_dir), "--image-size", "120x80"]) == 0
    assert "image 120x80" in capsys.readouterr().out
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "config.json").write_text(json.dumps({"architectures": ["Qwen2VLForConditionalGeneration"]}))
    assert main(["chat", "--model", str(tmp_path / "bad"), "hi"]) == 2  # refused by name, not read in part
    assert "Qwen2VLForConditionalGeneration is not supported" in capsys.readouterr().err


def test_a_plain_decoder_directory_still_loads_as_a_base_decoder(tmp_path: Path) -> None:
    tokenizer = make_tokenizer("qwen2")
    config = transformers.Qwen2Config(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64,
                                      num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1)
    transformers.Qwen2ForCausalLM(config).save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    model = tinyomni.load(tmp_path)
    assert family_for(tmp_path)[1].read is None
    assert model.encoders_trained is False and model.config.vision is not None


def edit_weights(path: Path, change) -> None:
    file = path / "model.safetensors"
    state = load_file(str(file))
    change(state)
    save_file(state, str(file), metadata={"format": "pt"})


def copy_dir(source: Path, dest: Path) -> Path:
    dest.mkdir()
    for f in source.iterdir():
        (dest / f.name).write_bytes(f.read_bytes())
    return dest


def test_a_missing_tensor_is_named(qwen2_dir: Path, tmp_path: Path) -> None:
    path = copy_dir(qwen2_dir, tmp_path / "ckpt")
    edit_weights(path, lambda s: s.pop("vision_tower.encoder.layer.1.mlp.fc2.weight"))
    with pytest.raises(CheckpointError, match=r"lacks weight\(s\) vision_tower\.encoder\.layer\.1\.mlp\.fc2\.weight"):
        tinyomni.load(path)


def test_an_unknown_tensor_is_named(qwen2_dir: Path, tmp_path: Path) -> None:
    path = copy_dir(qwen2_dir, tmp_path / "ckpt")
    edit_weights(path, lambda s: s.update({"multi_modal_projector.linear_3.weight": torch.zeros(2, 2)}))
    with pytest.raises(CheckpointError, match=r"unknown InternVL weight\(s\) multi_modal_projector\.linear_3"):
        tinyomni.load(path)


def edit_config(path: Path, change) -> None:
    data = json.loads((path / "config.json").read_text())
    change(data)
    (path / "config.json").write_text(json.dumps(data))


@pytest.mark.parametrize("change, message", [
    (lambda c: c.update(vision_feature_select_strategy="full"), "vision_feature_select_strategy 'full'"),
    (lambda c: c.update(vision_feature_layer=[-1, -2]), r"vision_feature_layer \[-1, -2\]"),
    (lambda c: c.update(projector_hidden_act="swish"), "projector_hidden_act 'swish'"),
    (lambda c: c["text_config"].update(model_type="internlm2"), "'internlm2' language model is not supported"),
    (lambda c: c["text_config"].update(use_sliding_window=True), "use_sliding_window"),
    (lambda c: c.update(image_token_id=3), "image_token_id 3"),
    (lambda c: c.update(architectures=["InternVLModel"]), "InternVLModel is not supported"),
])
def test_unsupported_config_values_are_named(qwen2_dir: Path, tmp_path: Path, change, message: str) -> None:
    path = copy_dir(qwen2_dir, tmp_path / "ckpt")
    edit_config(path, change)
    with pytest.raises(CheckpointError, match=message):
        tinyomni.load(path)


def test_processor_settings_left_out_mean_what_transformers_assumes(qwen2_dir: Path, tmp_path: Path) -> None:
    """A preprocessor_config.json without mean/std or tile limits: GotOcr2's class defaults apply."""
    path = copy_dir(qwen2_dir, tmp_path / "ckpt")
    settings = json.loads((path / "preprocessor_config.json").read_text())
    for key in ("image_mean", "image_std", "max_patches", "resample"):
        settings.pop(key)
    (path / "preprocessor_config.json").write_text(json.dumps(settings))
    ours = tinyomni.load(path)
    assert ours.config.max_tiles == 12 and ours.config.vision.image_mean[0] == pytest.approx(0.48145466)
    messages = conversation(noise_image(700, 90, seed=2))
    inputs = reference_processor(path).apply_chat_template(messages, add_generation_prompt=True, tokenize=True,
                                                           return_dict=True, return_tensors="pt")
    prompt = ours.prepare(messages)
    assert prompt.input_ids == inputs["input_ids"][0].tolist()
    assert torch.equal(prompt.pixel_values, inputs["pixel_values"])


def test_unsupported_processor_settings_are_named(qwen2_dir: Path, tmp_path: Path) -> None:
    path = copy_dir(qwen2_dir, tmp_path / "ckpt")
    settings = json.loads((path / "preprocessor_config.json").read_text())
    settings.update(resample=2, size={"height": 64, "width": 64})
    (path / "preprocessor_config.json").write_text(json.dumps(settings))
    with pytest.raises(CheckpointError, match=r"resample 2 .*|size \{"):
        tinyomni.load(path)


# --- the original OpenGVLab layout ---------------------------------------------------------------------
# transformers' conversion (convert_internvl_weights_to_hf.py), inverted: -hf name pattern → original.
LAYER = r"^vision_tower\.encoder\.layer\.(\d+)\."
TO_ORIGINAL = [
    (r"^vision_tower\.embeddings\.cls_token$", "vision_model.embeddings.class_embedding"),
    (r"^vision_tower\.embeddings\.patch_embeddings\.projection\.", "vision_model.embeddings.patch_embedding."),
    (r"^vision_tower\.embeddings\.position_embeddings$", "vision_model.embeddings.position_embedding"),
    (LAYER + r"attention\.projection_layer\.", r"vision_model.encoder.layers.\1.attn.proj."),
    (LAYER + r"attention\.", r"vision_model.encoder.layers.\1.attn."),
    (LAYER + r"layernorm_before\.", r"vision_model.encoder.layers.\1.norm1."),
    (LAYER + r"layernorm_after\.", r"vision_model.encoder.layers.\1.norm2."),
    (LAYER + r"lambda_(\d)$", r"vision_model.encoder.layers.\1.ls\2"),
    (LAYER + r"mlp\.", r"vision_model.encoder.layers.\1.mlp."),
    (r"^multi_modal_projector\.layer_norm\.", "mlp1.0."),
    (r"^multi_modal_projector\.linear_1\.", "mlp1.1."),
    (r"^multi_modal_projector\.linear_2\.", "mlp1.3."),
    (r"^language_model\.", "language_model."),
]


def write_original_layout(source: Path, dest: Path, text: str) -> None:
    """Rewrite an -hf checkpoint directory as OpenGVLab's InternVLChatModel would store it."""
    import re

    dest.mkdir()
    state = load_file(str(source / "model.safetensors"))
    original = {}
    for key, tensor in state.items():
        new = next(re.sub(p, r, key) for p, r in TO_ORIGINAL if re.search(p, key))
        original[new] = tensor
    for key in [k for k in original if k.endswith(".attn.q_proj.weight") or k.endswith(".attn.q_proj.bias")]:
        kind = key.rsplit(".", 1)[1]
        stem = key[: -len(f"q_proj.{kind}")]
        original[f"{stem}qkv.{kind}"] = torch.cat([original.pop(f"{stem}{p}_proj.{kind}") for p in "qkv"])
    save_file(original, str(dest / "model.safetensors"), metadata={"format": "pt"})
    hf = json.loads((source / "config.json").read_text())
    vision = hf["vision_config"]
    llm = {**hf["text_config"], "architectures": ["Qwen2ForCausalLM" if text == "qwen2" else "LlamaForCausalLM"]}
    config = {
        "architectures": ["InternVLChatModel"], "model_type": "internvl_chat", "downsample_ratio": 0.5,
        "select_layer": hf["vision_feature_layer"], "ps_version": "v2", "template": "internvl2_5",
        "force_image_size": TILE, "dynamic_image_size": True, "use_thumbnail": True,
        "min_dynamic_patch": 1, "max_dynamic_patch": MAX_TILES,
        "vision_config": {
            "architectures": ["InternVisionModel"], "model_type": "intern_vit_6b", "image_size": TILE,
            "patch_size": 14, "hidden_size": vision["hidden_size"], "intermediate_size": vision["intermediate_size"],
            "num_hidden_layers": vision["num_hidden_layers"], "num_attention_heads": vision["num_attention_heads"],
            "qkv_bias": vision["attention_bias"], "qk_normalization": vision["use_qk_norm"],
            "norm_type": vision["norm_type"], "layer_norm_eps": vision["layer_norm_eps"], "hidden_act": "gelu",
            "initializer_factor": 0.1, "use_flash_attn": False, "drop_path_rate": 0.0},
        "llm_config": llm,
    }
    (dest / "config.json").write_text(json.dumps(config, indent=2))
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "chat_template.json"):
        if (source / name).is_file():
            (dest / name).write_bytes((source / name).read_bytes())


@pytest.mark.parametrize("case", ["qwen2-untied-layer-2", "llama-tied"])
def test_the_original_layout_loads_to_the_same_model(case: str, tmp_path: Path) -> None:
    options = {**CASES[case], "spelling": "saved", "shards": False, "nested_processor": False}
    build(tmp_path / "hf", **options, seed=7)
    write_original_layout(tmp_path / "hf", tmp_path / "original", options["text"])
    assert family_for(tmp_path / "original")[0] == "InternVLChatModel"
    hf, original = tinyomni.load(tmp_path / "hf"), tinyomni.load(tmp_path / "original")
    assert original.config.vision.feature_layer == options["feature_layer"]
    assert original.config.decoder.tie_word_embeddings == options["tied"]
    messages = conversation(noise_image(120, 50, seed=5))
    prompt = hf.prepare(messages)
    again = original.prepare(messages)
    assert again.input_ids == prompt.input_ids and torch.equal(again.pixel_values, prompt.pixel_values)
    ids = torch.tensor([prompt.input_ids])
    with torch.no_grad():
        a, _ = hf.model(ids, pixel_values=prompt.pixel_values)
        b, _ = original.model(ids, pixel_values=prompt.pixel_values)
    assert torch.equal(a, b)
