"""SmolVLM and Idefics3 checkpoints load with exact parity: tiny random transformers-native models
(`SmolVLMForConditionalGeneration`, `Idefics3ForConditionalGeneration`: SigLIP tower, pixel shuffle by
`scale_factor` 2, 3 or 4, a bias-free projection, a Llama decoder) are saved with their own tokenizer and
processor files, loaded with `tinyomni.load(dir)`, and compared with transformers on the same image +
prompt (processor output with and without image splitting, fp32 logits, a greedy continuation). Also: the
errors for what does not load.

Nothing comes from a hub: the tokenizer is trained here on a few sentences, the weights are random.
"""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from parity import assert_logits_match, assert_same_greedy
from safetensors.torch import load_file, save_file
from test_interop_llava import copy_dir, edit_json, noise_image, randomize

import tinyomni
from tinyomni.checkpoints.families import family_for
from tinyomni.errors import CheckpointError
from tinyomni.model.vision import bucketed_position_ids

transformers = pytest.importorskip("transformers")
tokenizers = pytest.importorskip("tokenizers")
from transformers.models.smolvlm import processing_smolvlm  # noqa: E402  (after the skip)

CORPUS = ["User: What is in the picture? Describe the image in detail.\nAssistant: A red circle.",
          "How many red circles are there?\n\nAnswer with a number: 1 2 3 4 5 6 7 8 9 0",
          "The quick brown fox jumps over the lazy dog. system user assistant"] * 4
ROW_COL = [f"<row_{r}_col_{c}>" for r in range(1, 7) for c in range(1, 7)]
SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<end_of_utterance>", "<fake_token_around_image>",
           "<image>", "<global-img>", *ROW_COL]
# SmolVLM's own template (the one SmolVLMProcessor falls back to, as the hub's SmolVLM repositories ship it).
TEMPLATE = processing_smolvlm.DEFAULT_CHAT_TEMPLATE


# --- building tiny checkpoints -------------------------------------------------------------------------
def make_tokenizer(path: Path):
    """A byte-level BPE without BOS, as SmolLM2's, with the tokens SmolVLM's processor writes (the
    row/column tags and <global-img> are added tokens, as in SmolVLM's tokenizer), saved to `path`."""
    from tokenizers import decoders, models, pre_tokenizers, trainers

    backend = tokenizers.Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    backend.train_from_iterator(CORPUS, trainers.BpeTrainer(
        vocab_size=330, special_tokens=SPECIAL, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False))
    wrapped = transformers.PreTrainedTokenizerFast(
        tokenizer_object=backend, eos_token="<end_of_utterance>", pad_token="<|endoftext|>",
        extra_special_tokens={"image_token": "<image>", "fake_image_token": "<fake_token_around_image>",
                              "global_image_token": "<global-img>", "end_of_utterance_token": "<end_of_utterance>"})
    wrapped.save_pretrained(path)
    return transformers.AutoTokenizer.from_pretrained(path)


def build(path: Path, arch: str = "smolvlm", scale: int = 2, tile: int = 28, patch: int = 7, longest: int = 84,
          heads: tuple[int, int] = (3, 1), tied: bool = True, splitting: bool = True, seed: int = 0):
    """A tiny SmolVLM / Idefics3 checkpoint directory at `path`; returns the transformers model (fp32, eval)."""
    tokenizer = make_tokenizer(path)
    n_heads, n_kv = heads
    text_config = transformers.LlamaConfig(
        vocab_size=len(tokenizer) + 3, hidden_size=n_heads * 16, intermediate_size=80, num_hidden_layers=2,
        num_attention_heads=n_heads, num_key_value_heads=n_kv, head_dim=16, max_position_embeddings=2048,
        rms_norm_eps=1e-5, rope_theta=100000.0, tie_word_embeddings=tied, bos_token_id=None,
        eos_token_id=tokenizer.convert_tokens_to_ids("<end_of_utterance>"))
    classes = {"smolvlm": (transformers.SmolVLMVisionConfig, transformers.SmolVLMConfig,
                           transformers.SmolVLMForConditionalGeneration, transformers.SmolVLMImageProcessorPil),
               "idefics3": (transformers.Idefics3VisionConfig, transformers.Idefics3Config,
                            transformers.Idefics3ForConditionalGeneration, transformers.Idefics3ImageProcessorPil)}
    vision_class, config_class, model_class, image_processor_class = classes[arch]
    vision_config = vision_class(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=2,
                                 image_size=tile, patch_size=patch)
    config = config_class(vision_config=vision_config, text_config=text_config, scale_factor=scale,
                          image_token_id=tokenizer.convert_tokens_to_ids("<image>"), tie_word_embeddings=tied)
    torch.manual_seed(seed)
    model = model_class(config).eval()
    randomize(model, seed)
    if tied:
        model.tie_weights()
    model.save_pretrained(path)
    (path / "chat_template.jinja").write_text(TEMPLATE)
    image_processor_class(size={"longest_edge": longest}, max_image_size={"longest_edge": tile},
                          do_image_splitting=splitting).save_pretrained(path)
    seq = (tile // patch) ** 2 // scale**2
    (path / "processor_config.json").write_text(json.dumps(
        {"processor_class": f"{'SmolVLM' if arch == 'smolvlm' else 'Idefics3'}Processor", "image_seq_len": seq}))
    return model


def reference_processor(path: Path):
    """transformers' processor for the directory, over its tokenizer and image processor (PIL backend).

    AutoProcessor cannot be built here: SmolVLM's video processor needs torchvision (not installed), so
    SmolVLMProcessor is built without one (its argument check is skipped for that absent argument only),
    its need for num2words (only used to spell video frame counts) is met by `str`, and its
    apply_chat_template gets the two video sampling defaults it reads."""
    from transformers.processing_utils import ProcessorMixin

    settings = json.loads((path / "processor_config.json").read_text())
    tokenizer = transformers.AutoTokenizer.from_pretrained(path)
    image_processor = transformers.AutoImageProcessor.from_pretrained(path, backend="pil")
    assert image_processor.backend == "pil"
    if settings["processor_class"] == "Idefics3Processor":
        return transformers.Idefics3Processor(image_processor=image_processor, tokenizer=tokenizer,
                                              image_seq_len=settings["image_seq_len"], chat_template=TEMPLATE)
    original = ProcessorMixin.check_argument_for_proper_class
    ProcessorMixin.check_argument_for_proper_class = (
        lambda self, name, arg: None if arg is None else original(self, name, arg))
    saved, processing_smolvlm.num2words = processing_smolvlm.num2words, str
    try:
        processor = transformers.SmolVLMProcessor(image_processor=image_processor, tokenizer=tokenizer,
                                                  video_processor=None, image_seq_len=settings["image_seq_len"],
                                                  chat_template=TEMPLATE)
    finally:
        ProcessorMixin.check_argument_for_proper_class = original
        processing_smolvlm.num2words = saved
    # apply_chat_template reads the video processor's sampling defaults even for images alone.
    processor.video_processor = SimpleNamespace(num_frames=64, fps=1)
    return processor


def conversation(image, question: str = "What is in the picture?") -> list[dict]:
    return [{"role": "user", "content": [{"type": "image", "image": image}, {"type": "text", "text": question}]}]


def reference_inputs(processor, messages: list[dict]) -> dict:
    return processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=True,
                                         return_tensors="pt")


# --- parity --------------------------------------------------------------------------------------------
CASES = {
    # SmolVLM's shape: scale 2, SmolLM2-style tied head, 3 heads over 1; a 150x70 picture → 2x3 tiles + global.
    "smolvlm-scale2-tied": (dict(arch="smolvlm", scale=2, heads=(3, 1), tied=True), 7),
    # Idefics3, scale 3 (a 6x6 patch grid), 5 heads over 5, untied; 1x2 tiles + global.
    "idefics3-scale3-untied": (dict(arch="idefics3", scale=3, tile=42, patch=7, longest=84, heads=(5, 5),
                                    tied=False), 3),
    # Scale 4 over a 40x40 patch grid, where bucketed position ids differ from plain indices; 6 over 3 heads;
    # 1x2 tiles + global.
    "smolvlm-scale4-buckets": (dict(arch="smolvlm", scale=4, tile=80, patch=2, longest=160, heads=(6, 3),
                                    tied=False), 3),
    # No splitting: one square tile per image.
    "smolvlm-no-split": (dict(arch="smolvlm", scale=2, heads=(3, 3), tied=False, splitting=False), 1),
}


@pytest.mark.parametrize("case", list(CASES))
def test_logits_and_greedy_continuation_match_transformers(case: str, tmp_path: Path) -> None:
    options, tiles = CASES[case]
    reference = build(tmp_path, **options, seed=len(case))
    ours = tinyomni.load(tmp_path)
    assert family_for(tmp_path)[1].name == options["arch"]
    assert ours.config.decoder.tie_word_embeddings == options["tied"]
    assert ours.config.audio is None and ours.model.audio_tower is None

    messages = conversation(noise_image(150, 70, seed=3))
    inputs = reference_inputs(reference_processor(tmp_path), messages)
    prompt = ours.prepare(messages)
    assert prompt.input_ids == inputs["input_ids"][0].tolist()
    assert torch.equal(prompt.pixel_values, inputs["pixel_values"][0])
    assert prompt.tiles_per_image == [tiles]

    ids = torch.tensor([prompt.input_ids])
    with torch.no_grad():
        logits, _ = ours.model(ids, pixel_values=prompt.pixel_values)
        theirs = reference(**inputs).logits
    assert_logits_match(logits, theirs)
    assert_same_greedy(ours, reference, messages, inputs, ids.shape[1])


@pytest.fixture(scope="module")
def smolvlm_dir(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("smolvlm")
    build(path, arch="smolvlm", scale=2, heads=(3, 1))
    return path


@pytest.fixture(scope="module")
def unsplit_dir(smolvlm_dir: Path, tmp_path_factory) -> Path:
    path = copy_dir(smolvlm_dir, tmp_path_factory.mktemp("unsplit") / "ckpt")
    edit_json(path / "preprocessor_config.json", lambda c: c.update(do_image_splitting=False))
    return path


@pytest.fixture(scope="module")
def idefics3_dir(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("idefics3")
    build(path, arch="idefics3", scale=2, heads=(3, 1), longest=112)
    return path


@pytest.mark.parametrize("kind", ["smolvlm", "unsplit", "idefics3"])
@pytest.mark.parametrize("size", [(1, 1), (5, 3), (2000, 9), (37, 600), (28, 28), (640, 480), (100, 57)])
def test_processor_output_matches_transformers(kind: str, size: tuple[int, int], request) -> None:
    """Pixel values and input ids equal transformers' for tiny, very wide, tall, one-tile and ordinary
    images, with splitting on and off."""
    path = request.getfixturevalue(f"{kind}_dir")
    ours = tinyomni.load(path)
    processor = reference_processor(path)
    messages = conversation(noise_image(*size, seed=size[0]), "How many red circles are there?")
    inputs = reference_inputs(processor, messages)
    prompt = ours.prepare(messages)
    assert prompt.input_ids == inputs["input_ids"][0].tolist()
    assert torch.equal(prompt.pixel_values, inputs["pixel_values"][0])
    patches = processor.image_processor.get_number_of_image_patches(size[1], size[0])[0]
    assert prompt.tiles_per_image == [max(patches, 1)]


def test_a_longer_conversation_gives_transformers_ids(smolvlm_dir: Path) -> None:
    """System turn, text before an image, two images of different grids, an assistant turn, a text follow-up."""
    ours = tinyomni.load(smolvlm_dir)
    messages = [
        {"role": "system", "content": [{"type": "text", "text": "Answer with a number."}]},
        {"role": "user", "content": [{"type": "text", "text": "How many red circles are there?"},
                                     {"type": "image", "image": noise_image(200, 90, seed=9)},
                                     {"type": "image", "image": noise_image(30, 70, seed=8)}]},
        {"role": "assistant", "content": [{"type": "text", "text": "3"}]},
        {"role": "user", "content": [{"type": "text", "text": "Describe the image in detail."}]},
    ]
    inputs = reference_inputs(reference_processor(smolvlm_dir), messages)
    prompt = ours.prepare(messages)
    assert prompt.input_ids == inputs["input_ids"][0].tolist()
    assert torch.equal(prompt.pixel_values, inputs["pixel_values"][0])
    assert prompt.tiles_per_image == [7, 7]  # 2x3 and 3x2 tiles, each + global


def test_typed_image_tokens_stay_text(smolvlm_dir: Path) -> None:
    """A user typing "<image>" or "<row_1_col_1>" gets no image slot: both stay plain text."""
    ours = tinyomni.load(smolvlm_dir)
    prompt = ours.prepare(conversation(noise_image(28, 28), "<image> <row_1_col_1> What is in the picture?"))
    assert prompt.tiles_per_image == [10]  # 28 px become 84: 3x3 tiles + global
    assert prompt.input_ids.count(ours.processor.image_context_id) == 10 * ours.config.image_tokens_per_tile
    assert prompt.input_ids.count(ours.tokenizer.token_to_id("<row_1_col_1>")) == 1  # the image's own tag


def test_config_comes_from_the_checkpoint_files(smolvlm_dir: Path, unsplit_dir: Path) -> None:
    config = tinyomni.load(smolvlm_dir).config
    assert config.vision.position_buckets and config.vision.post_layernorm
    assert config.vision_projector.kind == "linear" and config.vision_projector.downsample_ratio == 0.5
    assert config.image_tokens_per_tile == 4 and config.image_context_token == "<image>"
    assert (config.image_resize, config.image_longest_edge, config.image_splitting) == ("longest_edge", 84, True)
    assert config.image_prompt == "grid" and config.image_start_token == "<fake_token_around_image>"
    assert not tinyomni.load(unsplit_dir).config.image_splitting


def test_bucketed_positions_are_transformers_ones() -> None:
    """The position ids of Idefics3's vision embeddings, for grids where they are not plain indices."""
    from transformers.models.idefics3.modeling_idefics3 import Idefics3VisionEmbeddings

    for side in (19, 25, 26, 32, 40):
        embeddings = Idefics3VisionEmbeddings(transformers.Idefics3VisionConfig(
            hidden_size=side * side, image_size=side, patch_size=1, num_channels=1))
        with torch.no_grad():  # the embedding table as an identity read-out of the position id
            embeddings.patch_embedding.weight.zero_()
            embeddings.patch_embedding.bias.zero_()
            embeddings.position_embedding.weight.copy_(torch.arange(side * side, dtype=torch.float32)[:, None]
                                                       .expand(-1, side * side))
        theirs = embeddings(torch.zeros(1, 1, side, side), torch.ones(1, side, side, dtype=torch.bool))[0, :, 0]
        assert torch.equal(bucketed_position_ids(side, side, side), theirs.long())
    assert not torch.equal(bucketed_position_ids(19, 19, 19), torch.arange(19 * 19))


def test_saved_import_loads_back_as_a_native_checkpoint(smolvlm_dir: Path, tmp_path: Path) -> None:
    ours = tinyomni.load(smolvlm_dir)
    ours.save(tmp_path / "saved")
    again = tinyomni.load(tmp_path / "saved")
    assert again.config == ours.config
    messages = conversation(noise_image(90, 40))
    prompt = ours.prepare(messages)
    assert again.prepare(messages).input_ids == prompt.input_ids
    ids = torch.tensor([prompt.input_ids])
    with torch.no_grad():
        a, _ = ours.model(ids, pixel_values=prompt.pixel_values)
        b, _ = again.model(ids, pixel_values=prompt.pixel_values)
    assert torch.equal(a, b)


def test_the_cli_chats_with_a_smolvlm_directory(smolvlm_dir: Path, tmp_path: Path, capsys) -> None:
    from tinyomni.cli import main

    noise_image(120, 80).save(tmp_path / "x.png")
    assert main(["chat", "--model", str(smolvlm_dir), "--image", str(tmp_path / "x.png"), "--max-new-tokens", "3",
                 "What is in the picture?"]) == 0
    assert main(["info", "--model", str(smolvlm_dir)]) == 0


# --- errors --------------------------------------------------------------------------------------------
def test_a_missing_tensor_is_named(smolvlm_dir: Path, tmp_path: Path) -> None:
    path = copy_dir(smolvlm_dir, tmp_path / "ckpt")
    file = path / "model.safetensors"
    state = load_file(str(file))
    state.pop("model.connector.modality_projection.proj.weight")
    state.pop("model.vision_model.encoder.layers.1.mlp.fc2.weight")
    save_file(state, str(file), metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match=r"lacks weight\(s\) model[.]vision_model[.]encoder[.]layers[.]1[.]mlp"
                                              r"[.]fc2[.]weight, model[.]connector[.]modality_projection[.]proj"):
        tinyomni.load(path)


def test_an_unknown_tensor_is_named(smolvlm_dir: Path, tmp_path: Path) -> None:
    path = copy_dir(smolvlm_dir, tmp_path / "ckpt")
    file = path / "model.safetensors"
    state = load_file(str(file))
    state["model.connector.modality_projection.proj.bias"] = torch.zeros(48)
    state["model.vision_model.head.probe"] = torch.zeros(1, 1, 32)
    save_file(state, str(file), metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match=r"unknown Idefics3/SmolVLM weight\(s\) "
                                              r"model\.connector\.modality_projection\.proj\.bias"):
        tinyomni.load(path)


@pytest.mark.parametrize("file, change, message", [
    ("config.json", lambda c: c.update(scale_factor=3), "scale_factor 3 does not divide"),
    ("config.json", lambda c: c.update(scale_factor=0), "scale_factor 0"),
    ("config.json", lambda c: c["vision_config"].update(model_type="pixtral"), "'pixtral' vision tower"),
    ("config.json", lambda c: c["text_config"].update(model_type="qwen2"), "'qwen2' language model"),
    ("config.json", lambda c: c["text_config"].update(hidden_act="gelu"), "hidden_act 'gelu'"),
    ("config.json", lambda c: c.update(image_token_id=3), "image_token_index 3"),
    ("preprocessor_config.json", lambda c: c.update(resample=3), "resample 3"),
    ("preprocessor_config.json", lambda c: c.update(max_image_size={"longest_edge": 56}), "max_image_size"),
    ("preprocessor_config.json", lambda c: c.update(size={"height": 84, "width": 84}), "size"),
    ("preprocessor_config.json", lambda c: c.update(image_processor_type="CLIPImageProcessor"), "CLIPImage"),
    ("processor_config.json", lambda c: c.update(image_seq_len=169), "image_seq_len 169"),
])
def test_unsupported_values_are_named(smolvlm_dir: Path, tmp_path: Path, file: str, change, message: str) -> None:
    path = copy_dir(smolvlm_dir, tmp_path / "ckpt")
    edit_json(path / file, change)
    with pytest.raises(CheckpointError, match=message):
        tinyomni.load(path)
