"""Video prompts of imported InternVL and SmolVLM checkpoints are built as transformers' processors build
them: the same input ids and pixel values for the same frames (a list of images or a uint8 array, several
frame counts), and then the same logits from the transformers model on a tiny random config.

transformers' video processors (InternVLVideoProcessor, SmolVLMVideoProcessor) need torchvision, which is
not installed here, so the reference processor gets a stand-in for that one part: it hands over the frames
as transformers' own *image* processor of the family makes them (one tile a frame: GotOcr2's resize, or
SmolVLM's without splitting) and the metadata transformers' `make_batched_metadata` gives frames that come
without any. Everything else (the prompt text with its frame labels or timestamps, where each frame's
tokens go, how image and video pixels are merged) is the real processor's code. SmolVLM's frame sampling of
a decoded clip is compared with `SmolVLMVideoProcessor.sample_frames` itself (it needs no torchvision).
"""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import test_interop_internvl as internvl
import test_interop_smolvlm as smolvlm
import torch
from parity import assert_logits_match
from PIL import Image

import tinyomni
from tinyomni.processing.video import smolvlm_frame_indices, spell_number

transformers = pytest.importorskip("transformers")
from transformers.image_processing_utils import BatchFeature  # noqa: E402  (after the skip)
from transformers.models.smolvlm import processing_smolvlm  # noqa: E402
from transformers.video_utils import make_batched_metadata, make_batched_videos  # noqa: E402

# What num2words (not installed; SmolVLMProcessor spells the frame count with it) writes for these counts.
NUM2WORDS = {1: "one", 2: "two", 3: "three", 5: "five", 12: "twelve", 21: "twenty-one", 40: "forty",
             105: "one hundred and five", 999: "nine hundred and ninety-nine"}


def frames(n: int, width: int = 90, height: int = 60, seed: int = 0) -> list[Image.Image]:
    return [internvl.noise_image(width, height, seed=seed + k) for k in range(n)]


def as_array(images: list[Image.Image]) -> np.ndarray:
    return np.stack([np.asarray(image) for image in images])


class StandIn:
    """The video processor's place in the reference processor: each frame through `per_frame` (the family's
    transformers image processor), stacked as the video processor's output is; with `metadata`, the
    video_metadata transformers gives frames that come without any (or the dicts in `given`)."""

    def __init__(self, per_frame, key: str, metadata: bool = False) -> None:
        self.per_frame, self.key, self.metadata = per_frame, key, metadata
        self.given: list[dict] | None = None
        self.num_frames, self.fps = 64, 1  # what SmolVLMProcessor.apply_chat_template reads

    def __call__(self, videos, **kwargs) -> BatchFeature:
        clips = [[f if isinstance(f, Image.Image) else Image.fromarray(np.asarray(f)) for f in video]
                 for video in make_batched_videos(videos)]
        data = {self.key: torch.stack([torch.cat([self.per_frame(f) for f in clip]) for clip in clips])}
        if self.metadata:
            arrays = [np.stack([np.asarray(f) for f in clip]) for clip in clips]
            data["video_metadata"] = make_batched_metadata(arrays, self.given)
        return BatchFeature(data)


# --- InternVL --------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def internvl_model(tmp_path_factory):
    path = tmp_path_factory.mktemp("internvl-video")
    reference = internvl.build(path, text="qwen2", heads=(3, 1), tied=True, seed=4)
    processor = internvl.reference_processor(path)
    one_tile = internvl.image_processor(crop_to_patches=False)
    processor.video_processor = StandIn(lambda f: one_tile(images=f, return_tensors="pt")["pixel_values"],
                                        "pixel_values_videos")
    return tinyomni.load(path), reference, processor


@pytest.mark.parametrize("count, as_list", [(1, True), (3, True), (5, False), (8, True)])
def test_internvl_video_prompt_and_logits_match_transformers(internvl_model, count: int, as_list: bool) -> None:
    ours, reference, processor = internvl_model
    clip = frames(count, seed=count)
    video = clip if as_list else as_array(clip)
    messages = [{"role": "user", "content": [{"type": "video", "video": video},
                                             {"type": "text", "text": "What is in the picture?"}]}]
    inputs = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=True,
                                           return_tensors="pt")
    prompt = ours.prepare(messages)
    assert prompt.input_ids == inputs["input_ids"][0].tolist()
    assert torch.equal(prompt.pixel_values, inputs["pixel_values"])
    assert prompt.tiles_per_image == [1] * count
    assert prompt.input_ids.count(ours.processor.image_context_id) == count * internvl.TOKENS_PER_TILE
    with torch.no_grad():
        logits, _ = ours.model(torch.tensor([prompt.input_ids]), pixel_values=prompt.pixel_values)
        theirs = reference(**inputs).logits
    assert_logits_match(logits, theirs)


def test_internvl_image_and_video_together_keep_their_order(internvl_model) -> None:
    """An image before the video and one after: pixels merged in the order the prompt names them."""
    ours, _, processor = internvl_model
    messages = [{"role": "user", "content": [
        {"type": "image", "image": internvl.noise_image(150, 70, seed=1)},
        {"type": "video", "video": frames(3, seed=7)},
        {"type": "text", "text": "How many red circles are there?"},
        {"type": "image", "image": internvl.noise_image(40, 40, seed=2)}]}]
    inputs = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=True,
                                           return_tensors="pt")
    prompt = ours.prepare(messages)
    assert prompt.input_ids == inputs["input_ids"][0].tolist()
    assert torch.equal(prompt.pixel_values, inputs["pixel_values"])
    assert prompt.tiles_per_image == [3, 1, 1, 1, 1]


# --- SmolVLM ---------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def smolvlm_model(tmp_path_factory):
    path = tmp_path_factory.mktemp("smolvlm-video")
    reference = smolvlm.build(path, arch="smolvlm", scale=2, heads=(3, 1), seed=5)
    processor = smolvlm.reference_processor(path)
    unsplit = transformers.AutoImageProcessor.from_pretrained(path, backend="pil", do_image_splitting=False)
    processor.video_processor = StandIn(lambda f: unsplit(images=[[f]], return_tensors="pt")["pixel_values"][0],
                                        "pixel_values", metadata=True)
    return tinyomni.load(path), reference, processor


def smolvlm_reference(processor, messages: list[dict], monkeypatch) -> dict:
    monkeypatch.setattr(processing_smolvlm, "num2words", NUM2WORDS.__getitem__)
    # Frames handed over as a list cannot be sampled by transformers (it refuses), so none are dropped.
    return processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=True,
                                         return_tensors="pt", processor_kwargs={"do_sample_frames": False})


@pytest.mark.parametrize("count, as_list", [(1, True), (3, False), (5, True), (12, True)])
def test_smolvlm_video_prompt_and_logits_match_transformers(smolvlm_model, count: int, as_list: bool,
                                                            monkeypatch) -> None:
    ours, reference, processor = smolvlm_model
    assert ours.config.video_prompt == "timestamps" and ours.config.video_frames == 64
    clip = frames(count, width=70, height=50, seed=count)
    video = clip if as_list else as_array(clip)
    messages = [{"role": "user", "content": [{"type": "video", "video": video},
                                             {"type": "text", "text": "What is in the picture?"}]}]
    inputs = smolvlm_reference(processor, messages, monkeypatch)
    prompt = ours.prepare(messages)
    assert prompt.input_ids == inputs["input_ids"][0].tolist()
    assert torch.equal(prompt.pixel_values, inputs["pixel_values"][0])
    text = ours.tokenizer.decode(prompt.input_ids)
    assert f"series of {NUM2WORDS[count]} frames" in text and text.count("Frame from 00:00:") == count
    with torch.no_grad():
        logits, _ = ours.model(torch.tensor([prompt.input_ids]), pixel_values=prompt.pixel_values)
        theirs = reference(**inputs).logits
    assert_logits_match(logits, theirs)


def test_smolvlm_frames_at_a_given_rate(smolvlm_model, monkeypatch) -> None:
    """With fps given, timestamps and the clip's length follow it (as transformers with that metadata).
    (No image beside the video: SmolVLMProcessor's video pixel_values replace its image ones, so
    transformers itself cannot take both in one prompt.)"""
    ours, _, processor = smolvlm_model
    clip = frames(21, width=40, height=64, seed=3)
    messages = [{"role": "system", "content": [{"type": "text", "text": "Answer with a number."}]},
                {"role": "user", "content": [{"type": "video", "video": clip, "fps": 2.0, "num_frames": 21},
                                             {"type": "text", "text": "How many red circles are there?"}]}]
    processor.video_processor.given = [{"total_num_frames": 21, "fps": 2.0, "duration": None,
                                        "frames_indices": list(range(21))}]
    try:
        inputs = smolvlm_reference(processor, messages, monkeypatch)
    finally:
        processor.video_processor.given = None
    prompt = ours.prepare(messages)
    assert prompt.input_ids == inputs["input_ids"][0].tolist()
    assert torch.equal(prompt.pixel_values, inputs["pixel_values"][0])
    text = ours.tokenizer.decode(prompt.input_ids)
    assert "from a 0:00:10 [H:MM:SS] video" in text and "Frame from 00:10:" in text


@pytest.mark.parametrize("total, fps, max_frames", [(300, 30.0, 8), (24, 24.0, 64), (2000, 25.0, 64),
                                                    (90, 30.0, 2), (7, 5.0, 64), (1, 30.0, 8)])
def test_smolvlm_clip_sampling_is_transformers_sample_frames(total: int, fps: float, max_frames: int) -> None:
    from transformers.models.smolvlm.video_processing_smolvlm import SmolVLMVideoProcessor
    from transformers.video_utils import VideoMetadata

    metadata = VideoMetadata(total_num_frames=total, fps=fps, duration=total / fps)
    theirs = SmolVLMVideoProcessor.sample_frames(SimpleNamespace(num_frames=max_frames, fps=1), metadata,
                                                 num_frames=max_frames, fps=1)
    assert smolvlm_frame_indices(total, fps, max_frames) == theirs.tolist()


def test_frame_counts_are_spelled_as_num2words_spells_them() -> None:
    for n, words in NUM2WORDS.items():
        assert spell_number(n) == words


def test_a_decoded_clip_is_sampled_and_timestamped_from_its_frame_rate(smolvlm_model, tmp_path: Path) -> None:
    """A 4 s GIF at 10 fps: SmolVLM's sampling (about one frame a second) and the clip's own rate in the text."""
    ours, _, _ = smolvlm_model
    clip = frames(40, width=32, height=32, seed=11)
    clip[0].save(tmp_path / "clip.gif", save_all=True, append_images=clip[1:], duration=100, loop=0)
    prompt = ours.prepare([{"role": "user", "content": [{"type": "video", "video": str(tmp_path / "clip.gif")}]}])
    text = ours.tokenizer.decode(prompt.input_ids)
    indices = smolvlm_frame_indices(40, 10.0, 64)
    assert len(indices) == 4 and prompt.tiles_per_image == [1] * 4
    assert "series of four frames from a 0:00:04 [H:MM:SS] video" in text
    stamps = [f"Frame from 00:{int(i / 10):02d}:" for i in indices]
    assert all(s in text for s in stamps)


def test_a_template_that_writes_no_video_token_is_an_error(smolvlm_model) -> None:
    """SmolVLM's template places a video where it writes <video>; one that writes none is refused by name."""
    from tinyomni.errors import InputError
    from tinyomni.processing.chat import ChatProcessor

    ours = smolvlm_model[0]
    template = smolvlm.TEMPLATE.replace("{% elif line['type'] == 'video' %}{{ '<video>' }}", "")
    assert template != smolvlm.TEMPLATE
    processor = ChatProcessor(ours.tokenizer, ours.config, template)
    with pytest.raises(InputError, match=r"writes 0 video token\(s\) \(<video>\) for 1 video item"):
        processor([{"role": "user", "content": [{"type": "video", "video": frames(2)}]}])
