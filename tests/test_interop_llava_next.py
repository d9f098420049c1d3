"""LLaVA-NeXT checkpoints load with exact parity: tiny random transformers-native LLaVA-NeXT models
(`LlavaNextForConditionalGeneration`: a CLIP or SigLIP tower, a Llama, Mistral or Qwen2 decoder, anyres
grids) are saved with their own tokenizer and processor files, loaded with `tinyomni.load(dir)`, and
compared with transformers on the same image + prompt (processor output, fp32 logits, a greedy
continuation); then the CLI, the saved round trip, the export refusals and the errors.

Nothing comes from a hub: the tokenizers are trained here on a few sentences (test_interop_llava's), the
weights are random.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from parity import assert_logits_match, assert_same_greedy
from safetensors.torch import load_file, save_file
from test_interop_llava import copy_dir, edit_json, make_tokenizer, noise_image, randomize

import tinyomni
from tinyomni.checkpoints.families import family_for
from tinyomni.errors import CheckpointError, InputError
from tinyomni.processing import llava_next

transformers = pytest.importorskip("transformers")
# The Mistral template below is upstream's, its "<\s>" typo included, which jinja's lexer warns about.
pytestmark = pytest.mark.filterwarnings("ignore:invalid escape sequence:DeprecationWarning")

TILE, PATCH = 42, 14  # a 3x3 patch grid (odd, so unpadding rounds both ways): 9 tokens per tile
# LLaVA-NeXT's five grids (336-px tiles: 1x2, 2x1, 2x2, 1x3, 3x1), at this tile size.
PINPOINTS = [[TILE, 2 * TILE], [2 * TILE, TILE], [2 * TILE, 2 * TILE], [3 * TILE, TILE], [TILE, 3 * TILE]]
# The templates llava-hf's v1.6 conversions ship (transformers' convert_llava_next_weights_to_hf.py).
VICUNA = (
    "{% for message in messages %}{% if message['role'] == 'system' %}{{ message['content'][0]['text'] }}"
    "{% else %}{{ message['role'].upper() + ': '}}{% endif %}{# Render all images first #}{% for content in "
    "message['content'] | selectattr('type', 'equalto', 'image') %}{{ '<image>\n' }}{% endfor %}{# Render all "
    "text next #}{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}"
    "{{ content['text'] + ' '}}{% endfor %}{% endfor %}{% if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}"
)
MISTRAL = (
    "{% for message in messages %}{% if message['role'] == 'user' %}{{ '[INST] ' }}{# Render all images first #}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'image') %}{{ '<image>\n' }}{% endfor %}"
    "{# Render all text next #}{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}"
    "{{ content['text'] }}{% endfor %}{{' [/INST]' }}{% elif message['role'] == 'assistant' %}"
    "{{ ' ' + message['content'][0]['text'] + '<\\s> '}}{% else %}"
    "{{ raise_exception('Only user and assistant roles are supported!') }}{% endif %}{% endfor %}"
)
CLIP_STATS = dict(image_mean=[0.48145466, 0.4578275, 0.40821073], image_std=[0.26862954, 0.26130258, 0.27577711])


def build(path: Path, tower: str = "clip", text: str = "llama", heads: tuple[int, int] = (3, 3), tied: bool = False,
          feature_layer: int | list[int] = -2, strategy: str = "default", spelling: str = "saved",
          size: dict | None = None, sliding_window: int | None = None, nested_processor: bool = False, seed: int = 0):
    """A tiny LLaVA-NeXT checkpoint directory at `path`; returns the transformers model (fp32, eval)."""
    tokenizer = make_tokenizer("qwen2" if text == "qwen2" else "llama-first" if text == "mistral" else "llama", path)
    n_heads, n_kv = heads
    head_dim = 16
    common = dict(vocab_size=len(tokenizer) + 3, hidden_size=n_heads * head_dim, intermediate_size=72,
                  num_hidden_layers=2, num_attention_heads=n_heads, num_key_value_heads=n_kv,
                  max_position_embeddings=512, rms_norm_eps=1e-5, tie_word_embeddings=tied)
    if text == "qwen2":
        text_config = transformers.Qwen2Config(**common, rope_theta=1000000.0)
    elif text == "mistral":
        text_config = transformers.MistralConfig(**common, head_dim=head_dim, sliding_window=sliding_window,
                                                 rope_theta=1000000.0, bos_token_id=tokenizer.bos_token_id)
    else:
        text_config = transformers.LlamaConfig(**common, head_dim=head_dim, rope_theta=10000.0,
                                               bos_token_id=tokenizer.bos_token_id)
    tower_options = dict(hidden_size=30, intermediate_size=52, num_hidden_layers=3, num_attention_heads=3,
                         image_size=TILE, patch_size=PATCH)
    if tower == "siglip":
        vision_config = transformers.SiglipVisionConfig(**tower_options)
    else:
        vision_config = transformers.CLIPVisionConfig(**tower_options, hidden_act="quick_gelu")
    image_token_id = tokenizer.convert_tokens_to_ids("<image>")
    config = transformers.LlavaNextConfig(
        vision_config=vision_config, text_config=text_config, image_token_index=image_token_id,
        vision_feature_layer=feature_layer, vision_feature_select_strategy=strategy, projector_hidden_act="gelu",
        image_grid_pinpoints=PINPOINTS, tie_word_embeddings=tied)
    torch.manual_seed(seed)
    model = transformers.LlavaNextForConditionalGeneration(config).eval()
    randomize(model, seed)
    if tied:
        model.tie_weights()
    model.save_pretrained(path)
    if spelling == "in-memory":  # transformers 5's in-memory names, bf16 as the hub stores weights
        state = {k: v.contiguous().to(torch.bfloat16) for k, v in model.state_dict().items()
                 if not (tied and k == "lm_head.weight")}
        for f in path.glob("model*.safetensors*"):
            f.unlink()
        save_file(state, str(path / "model.safetensors"), metadata={"format": "pt"})
        model = transformers.LlavaNextForConditionalGeneration.from_pretrained(path, dtype=torch.float32).eval()
    (path / "chat_template.jinja").write_text(MISTRAL if text == "mistral" else VICUNA)
    stats = dict(image_mean=[0.5] * 3, image_std=[0.5] * 3) if tower == "siglip" else CLIP_STATS
    image_processor = transformers.LlavaNextImageProcessorPil(
        size=size or {"shortest_edge": TILE}, crop_size={"height": TILE, "width": TILE},
        image_grid_pinpoints=PINPOINTS, **stats)
    processor_config = {"processor_class": "LlavaNextProcessor", "patch_size": PATCH, "image_token": "<image>",
                        "vision_feature_select_strategy": strategy,
                        "num_additional_image_tokens": 1 if tower == "clip" else 0}
    if nested_processor:  # transformers 5 writes one processor_config.json with the image processor inside
        processor_config["image_processor"] = image_processor.to_dict()
    else:  # the hub's llava-hf repositories: preprocessor_config.json beside processor_config.json
        image_processor.save_pretrained(path)
    (path / "processor_config.json").write_text(json.dumps(processor_config))
    return model


def reference_processor(path: Path):
    processor = transformers.AutoProcessor.from_pretrained(path)
    assert isinstance(processor, transformers.LlavaNextProcessor) and processor.image_processor.backend == "pil"
    return processor


def conversation(*images, question: str = "What is in the picture?") -> list[dict]:
    return [{"role": "user", "content": [*({"type": "image", "image": i} for i in images),
                                         {"type": "text", "text": question}]}]


def reference_inputs(processor, messages: list[dict]) -> dict:
    return processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=True,
                                         return_tensors="pt")


def assert_same_pixels(prompt, inputs) -> None:
    """Our tiles [tiles, 3, S, S] are the processor's, image by image (it pads each image's tiles with zero
    tiles to the most any image has); each image's tile count is the one its size gives, and its layout
    (Prompt.image_layouts, one per image) says the same count and the grid transformers chose."""
    from transformers.image_processing_utils import select_best_resolution

    pixels, at = inputs["pixel_values"], 0
    assert prompt.pixel_values.shape[1] == 3
    assert len(prompt.image_layouts) == len(prompt.tiles_per_image)
    for k, (n, layout) in enumerate(zip(prompt.tiles_per_image, prompt.image_layouts)):
        assert torch.equal(prompt.pixel_values[at:at + n], pixels[k, :n])
        assert not pixels[k, n:].any()
        assert layout.tiles == n
        height, width = inputs["image_sizes"][k].tolist()
        best = select_best_resolution((height, width), PINPOINTS)
        assert (layout.rows, layout.cols) == (best[0] // TILE, best[1] // TILE)
        at += n
    assert at == prompt.pixel_values.shape[0]


# --- parity --------------------------------------------------------------------------------------------
CASES = {
    # llava-v1.6-vicuna's shape: CLIP, the second-to-last layer without CLS, Llama, untied.
    "clip-llama": dict(tower="clip", text="llama", heads=(3, 3), feature_layer=-2),
    # llava-v1.6-mistral's: CLIP, Mistral 5 heads over 1 with a window beyond the context, tied, several
    # feature layers, in-memory names in bf16.
    "clip-mistral-layers": dict(tower="clip", text="mistral", heads=(5, 1), tied=True, feature_layer=[-3, -1],
                                spelling="in-memory", sliding_window=4096),
    # SigLIP with every token ("full"), Qwen2 3 heads over 1, the processor's size as height x width.
    "siglip-qwen2-full": dict(tower="siglip", text="qwen2", heads=(3, 1), feature_layer=-1, strategy="full",
                              size={"height": TILE, "width": TILE}, nested_processor=True),
}


@pytest.mark.parametrize("case", list(CASES))
def test_logits_and_greedy_continuation_match_transformers(case: str, tmp_path: Path) -> None:
    options = CASES[case]
    reference = build(tmp_path, **options, seed=len(case))
    ours = tinyomni.load(tmp_path)
    assert family_for(tmp_path)[0] == "LlavaNextForConditionalGeneration"
    assert ours.config.decoder.tie_word_embeddings == options.get("tied", False)
    assert ours.config.image_resize == "anyres" and ours.config.image_grid_pinpoints == PINPOINTS

    # Two images of different grids in one prompt: a wide one (unpadded rows) and a tall one (columns).
    messages = conversation(noise_image(150, 70, seed=3), noise_image(40, 100, seed=4))
    inputs = reference_inputs(reference_processor(tmp_path), messages)
    prompt = ours.prepare(messages)
    assert prompt.input_ids == inputs["input_ids"][0].tolist()
    assert_same_pixels(prompt, inputs)

    ids = torch.tensor([prompt.input_ids])
    with torch.no_grad():
        logits, _ = ours.model(ids, pixel_values=prompt.pixel_values, image_layouts=prompt.image_layouts)
        theirs = reference(**inputs).logits
    assert_logits_match(logits, theirs)
    assert_same_greedy(ours, reference, messages, inputs, ids.shape[1])
    if options["tower"] == "siglip":  # no CLS token, so the mmproj's own checks pass: image_newline is refused
        from tinyomni.checkpoints.export_mmproj import export_mmproj, mmproj_problems

        assert any("anyres" in p for p in mmproj_problems(ours.config))  # the CLI refuses before any file
        with pytest.raises(InputError, match="image_newline"):
            export_mmproj(ours, tmp_path / "vision.gguf")
        assert not (tmp_path / "vision.gguf").exists()


@pytest.fixture(scope="module")
def vicuna_dir(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("llava-next-vicuna")
    build(path, tower="clip", text="llama", heads=(3, 1))
    return path


@pytest.fixture(scope="module")
def mistral_dir(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("llava-next-mistral")
    build(path, tower="clip", text="mistral", heads=(3, 3))
    return path


# (441, 98): a 1x3 grid, 3 feature rows of which the image fills 1.9999999..., which unpad_image's round(…, 7)
# makes 2, so all 3 rows stay (a truncation, 1, would keep only the middle one).
SIZES = [(1, 1), (5, 3), (2000, 9), (9, 1500), (37, 600), (42, 42), (90, 45), (640, 480), (129, 43), (441, 98)]


@pytest.mark.parametrize("size", SIZES)
def test_processor_output_matches_transformers(size: tuple[int, int], vicuna_dir: Path) -> None:
    """Pixel values, image sizes and input ids equal transformers' for tiny, very wide, very tall, exact-grid
    and ordinary images (each grid of PINPOINTS is chosen by one of them)."""
    ours = tinyomni.load(vicuna_dir)
    messages = conversation(noise_image(*size, seed=size[0]), question="How many red circles are there?")
    inputs = reference_inputs(reference_processor(vicuna_dir), messages)
    prompt = ours.prepare(messages)
    assert prompt.input_ids == inputs["input_ids"][0].tolist()
    assert_same_pixels(prompt, inputs)
    assert inputs["image_sizes"][0].tolist() == [size[1], size[0]]
    def tokens(size: tuple[int, int]) -> int:
        return llava_next.token_count(llava_next.image_layout(*size, TILE, TILE // PATCH, PINPOINTS), 9)

    assert prompt.input_ids.count(ours.processor.image_context_id) == tokens(size)
    # `info` counts what the image adds to a prompt: its tokens and the template's "<image>\n" around them.
    info, smallest = ours.info(image_size=size)["image"], ours.info(image_size=(1, 1))["image"]
    assert info["tiles"] == prompt.tiles_per_image[0]
    assert info["tokens"] - tokens(size) == smallest["tokens"] - tokens((1, 1))


@pytest.mark.parametrize("kind", ["vicuna", "mistral"])
def test_a_longer_conversation_gives_transformers_ids(kind: str, request) -> None:
    """Text before the images in the content (the templates put images first), two images of different
    grids, an assistant turn and a text-only follow-up; Vicuna's system prompt."""
    path = request.getfixturevalue(f"{kind}_dir")
    ours = tinyomni.load(path)
    system = [{"role": "system", "content": [{"type": "text", "text": "Answer with a number."}]}]
    messages = (system if kind == "vicuna" else []) + [
        {"role": "user", "content": [{"type": "text", "text": "How many red circles are there?"},
                                     {"type": "image", "image": noise_image(200, 90, seed=9)},
                                     {"type": "image", "image": noise_image(30, 70, seed=8)}]},
        {"role": "assistant", "content": [{"type": "text", "text": "3"}]},
        {"role": "user", "content": [{"type": "text", "text": "Describe the image in detail."}]},
    ]
    inputs = reference_inputs(reference_processor(path), messages)
    prompt = ours.prepare(messages)
    assert prompt.input_ids == inputs["input_ids"][0].tolist()
    assert_same_pixels(prompt, inputs)
    assert len(prompt.tiles_per_image) == 2


def test_the_grid_geometry_is_transformers(vicuna_dir: Path) -> None:
    """Grid choice, tile count and feature count against transformers' own functions, over many sizes."""
    from transformers.image_processing_utils import select_best_resolution
    from transformers.models.llava_next.modeling_llava_next import image_size_to_num_patches

    processor = reference_processor(vicuna_dir)
    side = TILE // PATCH
    # 98 × 441, 147 × 392, 294 × 784 (and their transposes): windows only round(…, 7) gets right.
    for width in (1, 2, 3, 7, 41, 42, 43, 64, 85, 98, 126, 147, 294, 300, 1001):
        for height in (1, 2, 5, 42, 50, 83, 84, 127, 392, 441, 500, 784):
            layout = llava_next.image_layout(width, height, TILE, side, PINPOINTS)
            best = select_best_resolution((height, width), PINPOINTS)
            assert (layout.rows, layout.cols) == (best[0] // TILE, best[1] // TILE)
            assert layout.tiles == image_size_to_num_patches((height, width), PINPOINTS, TILE)
            count = processor._get_number_of_features(height, width, TILE, TILE) - 1  # "default"
            assert llava_next.token_count(layout, side * side) == count


def test_a_batch_of_two_prompts_matches_the_prompts_alone(mistral_dir: Path) -> None:
    """generate's batching joins prompts' pixels and, beside them, their images' layouts, in the same order."""
    ours = tinyomni.load(mistral_dir)
    first = conversation(noise_image(200, 30, seed=1))
    second = conversation(noise_image(30, 30, seed=2), noise_image(90, 120, seed=5), question="Describe the image.")
    alone = [ours.complete(m, max_new_tokens=6).token_ids for m in (first, second)]
    together = [c.token_ids for c in ours.complete_batch([first, second], max_new_tokens=6)]
    assert together == alone


def test_a_training_example_trains_through_the_grid(vicuna_dir: Path) -> None:
    """A conversation with an answer: labels only on the answer, and its loss reaches image_newline."""
    ours = tinyomni.load(vicuna_dir)
    messages = conversation(noise_image(120, 50)) + [
        {"role": "assistant", "content": [{"type": "text", "text": "A red circle."}]}]
    prompt, labels = ours.processor.training_example(messages)
    assert prompt.input_ids[:len(ours.prepare(messages[:1]).input_ids)] == ours.prepare(messages[:1]).input_ids
    _, loss = ours.model(torch.tensor([prompt.input_ids]), pixel_values=prompt.pixel_values,
                         image_layouts=prompt.image_layouts, labels=torch.tensor([labels]))
    loss.backward()
    assert ours.model.multi_modal_projector.image_newline.grad.abs().sum() > 0


def test_saved_import_loads_back_as_a_native_checkpoint(vicuna_dir: Path, tmp_path: Path) -> None:
    ours = tinyomni.load(vicuna_dir)
    ours.save(tmp_path / "saved")
    again = tinyomni.load(tmp_path / "saved")
    assert again.config == ours.config
    messages = conversation(noise_image(90, 40))
    prompt = ours.prepare(messages)
    assert again.prepare(messages).input_ids == prompt.input_ids
    ids = torch.tensor([prompt.input_ids])
    with torch.no_grad():
        a, _ = ours.model(ids, pixel_values=prompt.pixel_values, image_layouts=prompt.image_layouts)
        b, _ = again.model(ids, pixel_values=prompt.pixel_values, image_layouts=prompt.image_layouts)
    assert torch.equal(a, b)


def test_cli_info_and_chat(vicuna_dir: Path, tmp_path: Path, capsys) -> None:
    from tinyomni.cli import main

    image = tmp_path / "wide.png"
    noise_image(120, 50, seed=7).save(image)
    assert main(["info", "--model", str(vicuna_dir), "--image-size", "120x50"]) == 0
    shown = capsys.readouterr().out
    expected = tinyomni.load(vicuna_dir).info(image_size=(120, 50))["image"]
    assert str(expected["tokens"]) in shown
    assert main(["chat", "--model", str(vicuna_dir), "--image", str(image), "--max-new-tokens", "4",
                 "What is in the picture?"]) == 0
    assert capsys.readouterr().out.strip()


def test_export_refuses_what_it_cannot_write(vicuna_dir: Path, tmp_path: Path) -> None:
    from tinyomni.checkpoints.export_hf import export_hf

    ours = tinyomni.load(vicuna_dir)
    with pytest.raises(InputError, match='image_resize "anyres"'):
        export_hf(ours, tmp_path / "hf")
    assert not (tmp_path / "hf").exists()


def test_video_and_pixels_without_their_layouts_are_refused(vicuna_dir: Path) -> None:
    ours = tinyomni.load(vicuna_dir)
    with pytest.raises(InputError, match="takes images, not video"):
        ours.prepare([{"role": "user", "content": [{"type": "video", "video": [noise_image(40, 40)] * 2}]}])
    prompt = ours.prepare(conversation(noise_image(100, 40)))
    ids, layouts = torch.tensor([prompt.input_ids]), prompt.image_layouts
    with pytest.raises(InputError, match="needs each image's layout.*image_layouts"):
        ours.model(ids, pixel_values=prompt.pixel_values)
    with pytest.raises(InputError, match="3 tiles of pixel values for LLaVA-NeXT image layouts of 4"):
        ours.model(ids, pixel_values=prompt.pixel_values[1:], image_layouts=layouts)  # a tile short
    with pytest.raises(InputError, match=r"\[tiles, 3, S, S\]"):  # the old layout-in-a-4th-channel tensors
        ours.model(ids, pixel_values=torch.cat([prompt.pixel_values, prompt.pixel_values[:, :1]], 1),
                   image_layouts=layouts)


# --- errors --------------------------------------------------------------------------------------------
def test_a_missing_image_newline_is_named(vicuna_dir: Path, tmp_path: Path) -> None:
    path = copy_dir(vicuna_dir, tmp_path / "ckpt")
    file = path / "model.safetensors"
    state = load_file(str(file))
    assert state.pop("image_newline").shape == (48,)
    save_file(state, str(file), metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match=r"lacks weight\(s\) image_newline"):
        tinyomni.load(path)


@pytest.mark.parametrize("change, message", [
    (lambda c: c.update(vision_feature_select_strategy="full"), "'full' on a tower with a CLS token"),
    (lambda c: c.update(image_grid_pinpoints=[[42, 80]]), "image_grid_pinpoints"),
    (lambda c: c.update(vision_feature_layer=9), "vision_feature_layer 9"),
    (lambda c: c["text_config"].update(model_type="gemma"), "'gemma' language model is not supported"),
    (lambda c: c.update(image_token_index=3), "image_token_index 3"),
])
def test_unsupported_config_values_are_named(vicuna_dir: Path, tmp_path: Path, change, message: str) -> None:
    path = copy_dir(vicuna_dir, tmp_path / "ckpt")
    edit_json(path / "config.json", change)
    with pytest.raises(CheckpointError, match=message):
        tinyomni.load(path)


@pytest.mark.parametrize("file, change, message", [
    ("preprocessor_config.json", lambda c: c.update(resample=2), "resample 2"),
    ("preprocessor_config.json", lambda c: c.update(crop_size={"height": 56, "width": 56}), "crop_size"),
    ("preprocessor_config.json", lambda c: c.update(image_grid_pinpoints=[[42, 84]]), "differ from config.json"),
    ("preprocessor_config.json", lambda c: c.update(image_processor_type="CLIPImageProcessor"), "CLIPImage"),
    ("processor_config.json", lambda c: c.update(num_additional_image_tokens=0), "8 image tokens per tile"),
])
def test_unsupported_processor_settings_are_named(vicuna_dir: Path, tmp_path: Path, file: str, change,
                                                  message: str) -> None:
    path = copy_dir(vicuna_dir, tmp_path / "ckpt")
    edit_json(path / file, change)
    with pytest.raises(CheckpointError, match=message):
        tinyomni.load(path)


def test_a_mistral_window_caps_the_context(mistral_dir: Path, tmp_path: Path) -> None:
    path = copy_dir(mistral_dir, tmp_path / "ckpt")
    edit_json(path / "config.json", lambda c: c["text_config"].update(sliding_window=128))
    assert tinyomni.load(path).config.decoder.max_position_embeddings == 128
    edit_json(path / "config.json", lambda c: c["text_config"].update(sliding_window=None))
    assert tinyomni.load(path).config.decoder.max_position_embeddings == 512
