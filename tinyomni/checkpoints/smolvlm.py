"""Idefics3 and SmolVLM checkpoints (transformers' `Idefics3ForConditionalGeneration`,
`SmolVLMForConditionalGeneration`) → tinyomni.

The model: a SigLIP tower (transformers' Idefics3 vision transformer: SigLIP's names and blocks, its final
LayerNorm, NaViT-style bucketed position ids: `VisionConfig.position_buckets`), the connector (a pixel
shuffle by `scale_factor`, which is our `pixel_shuffle` with ratio 1/scale_factor, then
`modality_projection.proj`, one bias-free Linear: `ProjectorConfig.kind = "linear"`) and a Llama decoder
(SmolLM2 in SmolVLM, Llama 3 in Idefics3). Each image is resized on its longest edge and split into tiles
plus a global image (`OmniConfig.image_resize = "longest_edge"`, processing/smolvlm.py), and its
placeholder is the processor's grid of `<fake_token_around_image>`, `<row_r_col_c>` and `<image>` runs
(`OmniConfig.image_prompt = "grid"`), put where the chat template writes `<image>`.

What is read, from the checkpoint's own files only:
- config.json → OmniConfig (`vision_config`, `text_config`, `scale_factor`, `image_token_id`,
  `tie_word_embeddings`); keys it leaves out mean what transformers' Idefics3Config / SmolVLMConfig
  assume; values we cannot run are named in a CheckpointError, never approximated;
- the image processor settings (`preprocessor_config.json`, or `processor_config.json`'s
  `image_processor`): `size.longest_edge`, `max_image_size.longest_edge` (the tile: must be the tower's
  image_size), `do_image_splitting`, mean/std, Lanczos; `processor_config.json`'s `image_seq_len`
  (checked against the tower's tokens per tile);
- `tokenizer.json` + `tokenizer_config.json` (SmolVLMProcessor reads the image token names there;
  Idefics3Processor uses fixed ones), and the chat template (`chat_template.jinja`, `chat_template.json`,
  the processor's or the tokenizer config's);
- the weights, once, through safetensors: `model.vision_model.*`, `model.connector.*`, `model.text_model.*`,
  `lm_head.weight` (absent when tied).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from tinyomni.checkpoints import hf_vision
from tinyomni.checkpoints.families import Imported, read_hf_config
from tinyomni.checkpoints.internvl import (
    DROPPED,
    HEAD_NAMES,
    OUR_PREFIX,
    Weights,
    _check_complete,
    check_pixel_settings,
    read_chat_template,
)
from tinyomni.checkpoints.llava import _decoder_config, _decoder_name, _json, _processor_files, _tokenizer
from tinyomni.checkpoints.weights import rename_weights
from tinyomni.config import OmniConfig, ProjectorConfig, VisionConfig
from tinyomni.errors import CheckpointError, ConfigError

# --- names -------------------------------------------------------------------------------------------
# Part → checkpoint prefix (save_pretrained's names, as the hub's SmolVLM and Idefics3 repositories have them).
LAYOUT = {"vision": "model.vision_model.", "projector": "model.connector.", "decoder": "model.text_model.",
          "head": "lm_head."}
# Inside the connector: theirs → ours (tinyomni.model.projector.LinearProjector).
PROJECTOR_NAMES = {"modality_projection.proj.weight": "proj.weight"}
VISION_MODEL_TYPES = ("idefics3_vision", "smolvlm_vision")

# --- what transformers assumes for keys a config.json leaves out (5.24) ---------------------------------
IDEFICS3_DEFAULTS: dict[str, Any] = dict(image_token_id=128257, tie_word_embeddings=False, scale_factor=2)
# Idefics3VisionConfig's = SmolVLMVisionConfig's defaults (a SigLIP shape).
VISION_DEFAULTS: dict[str, Any] = dict(hidden_size=1152, intermediate_size=3072, num_hidden_layers=12,
                                       num_attention_heads=16, num_channels=3, image_size=224, patch_size=32,
                                       hidden_act="gelu_pytorch_tanh", layer_norm_eps=1e-6)
# The text model: Llama, with rms_norm_eps 1e-5 when text_config does not say (Idefics3Config's sub-config).
TEXT_DEFAULTS: dict[str, Any] = dict(model_type="llama", rms_norm_eps=1e-5)
# Idefics3ImageProcessor's = SmolVLMImageProcessor's class defaults (the PIL backend's values).
IMAGE_PROCESSOR_DEFAULTS: dict[str, Any] = dict(
    size={"longest_edge": 4 * 364}, max_image_size={"longest_edge": 364}, resample=1, do_resize=True,
    do_rescale=True, rescale_factor=1 / 255, do_normalize=True, image_mean=[0.5] * 3, image_std=[0.5] * 3,
    do_convert_rgb=True, do_image_splitting=True)
IMAGE_PROCESSORS = ("Idefics3ImageProcessor", "SmolVLMImageProcessor")
# The processors' image_seq_len default, when processor_config.json does not say.
DEFAULT_IMAGE_SEQ_LEN = 169
# Idefics3Processor writes these names whatever the tokenizer says; SmolVLMProcessor reads the tokenizer's.
TOKEN_NAMES = {"image_token": "<image>", "fake_image_token": "<fake_token_around_image>",
               "global_image_token": "<global-img>"}


# --- config --------------------------------------------------------------------------------------------
def _vision_config(hf: dict[str, Any], where: str) -> VisionConfig:
    """The SigLIP-shaped tower, read at its last hidden state after the final norm, bucketed positions."""
    section = dict(hf.get("vision_config") or {})
    model_type = section.pop("model_type", None) or VISION_MODEL_TYPES[0]
    if model_type not in VISION_MODEL_TYPES:
        raise CheckpointError(f"{where}: a {model_type!r} vision tower is not supported "
                              f"(supported: {', '.join(VISION_MODEL_TYPES)})")
    section = {**VISION_DEFAULTS, **{k: v for k, v in section.items() if v is not None}}
    try:  # the same blocks and names as SigLIP's
        vision = hf_vision.vision_config_from_hf({"vision_config": {**section, "model_type": "siglip_vision_model"}})
    except CheckpointError as e:
        raise CheckpointError(f"{where}: {e}") from None
    vision.position_buckets = True
    return vision


def _scale_factor(hf: dict[str, Any], vision: VisionConfig, where: str) -> int:
    scale = hf["scale_factor"]
    if not isinstance(scale, int) or isinstance(scale, bool) or scale < 1:
        raise CheckpointError(f"{where}: scale_factor {scale!r} is not supported (a positive integer)")
    if vision.grid_size % scale:
        raise CheckpointError(f"{where}: scale_factor {scale} does not divide the tower's {vision.grid_size}x"
                              f"{vision.grid_size} patch grid (image_size {vision.image_size}, patch_size "
                              f"{vision.patch_size})")
    return scale


def _edge(value: Any) -> int | None:
    """A {"longest_edge": n} size's n (None for any other form)."""
    if isinstance(value, dict) and set(value) == {"longest_edge"} and isinstance(value["longest_edge"], int):
        return value["longest_edge"]
    return None


def _processing_fields(found: dict[str, Any], vision: VisionConfig, where: str) -> dict[str, Any]:
    """OmniConfig's image fields (longest edge, splitting) and the tower's mean/std."""
    if not found:
        raise CheckpointError(f"{where}: no image processor settings (preprocessor_config.json, or "
                              "processor_config.json with an image_processor)")
    kind = str(found.get("image_processor_type", IMAGE_PROCESSORS[0])).removesuffix("Fast").removesuffix("Pil")
    if kind not in IMAGE_PROCESSORS:
        raise CheckpointError(f"{where}: image processor {kind!r} is not supported "
                              f"(supported: {', '.join(IMAGE_PROCESSORS)})")
    s = {**IMAGE_PROCESSOR_DEFAULTS, **{k: v for k, v in found.items() if v is not None}}
    problems = []
    longest, tile = _edge(s["size"]), _edge(s["max_image_size"])
    if longest is None:
        problems.append(f"size {s['size']} (only a longest_edge)")
    if tile != vision.image_size:
        problems.append(f"max_image_size {s['max_image_size']} (the tile: longest_edge {vision.image_size}, "
                        "the tower's image_size)")
    if s["resample"] != 1:  # our resizes are Pillow's Lanczos, as transformers' PIL backend with resample 1
        problems.append(f"resample {s['resample']} (only 1, Lanczos)")
    check_pixel_settings(s, vision, problems, where, ("do_resize", "do_rescale", "do_normalize", "do_convert_rgb"))
    return {"image_resize": "longest_edge", "image_longest_edge": longest,
            "image_splitting": bool(s["do_image_splitting"])}


def _token_names(path: Path, reads_tokenizer: bool) -> dict[str, str]:
    """The image token names the processor writes: SmolVLMProcessor takes the tokenizer's own
    (tokenizer_config.json, top level or extra_special_tokens), Idefics3Processor fixed ones."""
    if not reads_tokenizer:
        return dict(TOKEN_NAMES)
    meta = _json(path / "tokenizer_config.json")
    extra = meta.get("extra_special_tokens")
    extra = extra if isinstance(extra, dict) else {}
    names = {}
    for key, default in TOKEN_NAMES.items():
        value = meta.get(key, extra.get(key, default))
        names[key] = str(value.get("content", default) if isinstance(value, dict) else value)
    return names


def _video_max_frames(path: Path) -> int:
    """The most frames SmolVLMProcessor samples from a clip: video_sampling's max_frames in the video
    processor's file (64, the hub's SmolVLM value, when there is none)."""
    sampling = _json(path / "video_preprocessor_config.json").get("video_sampling")
    frames = sampling.get("max_frames") if isinstance(sampling, dict) else None
    return int(frames) if isinstance(frames, int) and frames > 0 else 64


# --- weights ---------------------------------------------------------------------------------------------
def _tower_name(name: str) -> str | None:
    return hf_vision.tower_name(name, "siglip")


def _convert(weights: Weights, where: str) -> dict[str, torch.Tensor]:
    """Every checkpoint tensor under our name; unknown ones are a CheckpointError listing them."""
    tables = {"vision": _tower_name, "projector": PROJECTOR_NAMES.get, "decoder": _decoder_name,
              "head": HEAD_NAMES.get}
    return rename_weights(weights, LAYOUT, tables, OUR_PREFIX, where, "Idefics3/SmolVLM", DROPPED)


def _their_name(ours: str) -> str:
    """Our name → the checkpoint's (for error messages)."""
    for part, prefix in OUR_PREFIX.items():
        if ours.startswith(prefix):
            rel = ours[len(prefix):]
            if part == "vision":
                rel = hf_vision.hf_name_for(rel, "siglip") or rel
            elif part == "projector":
                rel = next((theirs for theirs, name in PROJECTOR_NAMES.items() if name == rel), rel)
            return LAYOUT[part] + rel
    return ours


# --- the family ----------------------------------------------------------------------------------------
def read_smolvlm(path: str | Path, reads_tokenizer_names: bool = True) -> Imported:
    """Read a transformers-native SmolVLM (or, with `reads_tokenizer_names` False, Idefics3) directory."""
    path = Path(path)
    where = str(path)
    raw = read_hf_config(path)
    hf = {**IDEFICS3_DEFAULTS, **{k: v for k, v in raw.items() if v is not None}}
    vision = _vision_config(hf, where)
    scale = _scale_factor(hf, vision, where)
    text = {**TEXT_DEFAULTS, **{k: v for k, v in (hf.get("text_config") or {}).items() if v is not None}}
    if text["model_type"] != "llama":
        raise CheckpointError(f"{where}: a {text['model_type']!r} language model is not supported (supported: llama)")
    decoder = _decoder_config(text, where)
    image_settings, processor = _processor_files(path)
    names = _token_names(path, reads_tokenizer_names)
    config = OmniConfig(
        decoder=decoder, vision=vision, audio=None,
        vision_projector=ProjectorConfig(downsample_ratio=1 / scale, kind="linear", layer_norm=False),
        image_start_token=names["fake_image_token"], image_end_token=names["fake_image_token"],
        image_context_token=names["image_token"], image_global_token=names["global_image_token"],
        min_tiles=1, max_tiles=1, use_thumbnail=False, number_images=False, image_wrap=False,
        images_in_template=True, image_prompt="grid", **_processing_fields(image_settings, vision, where))
    if reads_tokenizer_names:  # SmolVLMProcessor takes videos (Idefics3Processor does not)
        config.video_prompt, config.video_frames = "timestamps", _video_max_frames(path)
    try:
        config.validate()
    except ConfigError as e:
        raise CheckpointError(f"{where}: the config does not fit tinyomni: {e}") from None
    seq = processor.get("image_seq_len", DEFAULT_IMAGE_SEQ_LEN)
    if seq != config.image_tokens_per_tile:
        raise CheckpointError(f"{where}: the processor writes image_seq_len {seq} image tokens per tile but the "
                              f"tower gives {config.image_tokens_per_tile} ({vision.grid_size}² patches / "
                              f"scale_factor {scale}²)")

    weights = Weights(path)
    state = _convert(weights, where)
    # Tied when the checkpoint has no head and its config allows it (transformers uses a head it finds);
    # the top-level flag or text_config's.
    says_tied = bool(hf.get("tie_word_embeddings")) or bool(text.get("tie_word_embeddings"))
    config.decoder.tie_word_embeddings = says_tied and OUR_PREFIX["head"] + "weight" not in state
    _check_complete(config, state, _their_name, where)

    tokenizer = _tokenizer(path, config, int(hf["image_token_id"]), where)
    if tokenizer.token_to_id(config.image_start_token) is None:
        raise CheckpointError(f"{where}: the tokenizer lacks the token {config.image_start_token}, which the "
                              "processor writes around every image")
    template = read_chat_template(path)
    if template is None:
        raise CheckpointError(f"{where}: no chat template (chat_template.jinja, chat_template.json, or one in "
                              "processor_config.json / tokenizer_config.json)")
    return Imported(config, state, tokenizer, template)


def read_idefics3(path: str | Path) -> Imported:
    """Read a transformers-native Idefics3 directory (`Idefics3ForConditionalGeneration`)."""
    return read_smolvlm(path, reads_tokenizer_names=False)
