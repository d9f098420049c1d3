"""LLaVA-NeXT checkpoints (transformers' `LlavaNextForConditionalGeneration`: llava-v1.6-mistral-7b-hf,
llava-v1.6-vicuna-7b/13b-hf, llama3-llava-next-8b-hf, ...) → tinyomni.

LLaVA-1.5 (checkpoints/llava.py) with "anyres" images: the CLIP (or SigLIP) tower, its hidden state(s)
(`vision_feature_layer`, an int or a list), `vision_feature_select_strategy`, the two-layer MLP projector
and a Llama, Mistral or Qwen2 decoder are LLaVA's, read with LLaVA's own readers; what is new is each
image as a grid of tiles at the best of `image_grid_pinpoints` plus the whole image, the grid's features
unpadded and each row ended by the learned `image_newline` (processing/llava_next.py, model/anyres.py), so
an image's `<image>` count depends on its size, as LlavaNextProcessor counts it.

What is read, from the checkpoint's own files only:
- config.json → OmniConfig (keys it leaves out mean what LlavaNextConfig and its sub-configs assume; values
  we cannot run are named in a CheckpointError);
- the image processor (LlavaNextImageProcessor: `preprocessor_config.json`, or nested in
  `processor_config.json`) and the processor's `patch_size`, `num_additional_image_tokens`,
  `vision_feature_select_strategy`, `image_token`, checked against the tower's token count;
- `tokenizer.json` as it is (transformers 5 reads llava_next's that way too), and the chat template, which
  these checkpoints ship (a directory without one is refused: a guessed template answers wrongly);
- the weights, once, in either spelling transformers writes (LLaVA's prefixes, plus `image_newline` /
  `model.image_newline`, which we hold as `multi_modal_projector.image_newline`).

Mistral's sliding window is not computed: our decoder attends to the whole context, which equals the
window's result up to `sliding_window` tokens, so the context is capped there (as for Idefics2).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from tinyomni.checkpoints import llava
from tinyomni.checkpoints.families import Imported, read_hf_config
from tinyomni.checkpoints.internvl import (
    OUR_PREFIX,
    Weights,
    _check_complete,
    check_pixel_settings,
    decoder_config,
    read_chat_template,
)
from tinyomni.config import ACTIVATIONS, DecoderConfig, OmniConfig, ProjectorConfig, VisionConfig
from tinyomni.errors import CheckpointError, ConfigError

# LlavaNextConfig's defaults for keys a config.json leaves out (LLaVA's, plus the grid resolutions).
DEFAULT_PINPOINTS = [[336, 672], [672, 336], [672, 672], [1008, 336], [336, 1008]]
NEXT_DEFAULTS: dict[str, Any] = dict(llava.LLAVA_DEFAULTS, image_grid_pinpoints=DEFAULT_PINPOINTS)
# The language models LLaVA-NeXT checkpoints use, with their config classes' defaults (transformers 5.24).
TEXT_DEFAULTS: dict[str, dict[str, Any]] = {
    **llava.TEXT_DEFAULTS,
    "mistral": dict(vocab_size=32000, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                    num_attention_heads=32, num_key_value_heads=8, hidden_act="silu",
                    max_position_embeddings=4096 * 32, rms_norm_eps=1e-6, tie_word_embeddings=False,
                    rope_theta=10000.0, sliding_window=4096, bos_token_id=1, eos_token_id=2),
}
# LlavaNextImageProcessor's class defaults (PIL backend).
IMAGE_PROCESSOR_DEFAULTS: dict[str, Any] = dict(
    size={"shortest_edge": 224}, crop_size={"height": 224, "width": 224}, do_center_crop=True, resample=3,
    do_resize=True, do_rescale=True, rescale_factor=1 / 255, do_normalize=True, do_convert_rgb=True,
    image_mean=llava.CLIP_MEAN, image_std=llava.CLIP_STD, do_pad=True, image_grid_pinpoints=DEFAULT_PINPOINTS)
NEWLINE = {"saved": "image_newline", "in-memory": "model.image_newline"}


# --- config --------------------------------------------------------------------------------------------
def _decoder_config(text: dict[str, Any], where: str) -> DecoderConfig:
    """text_config → DecoderConfig (Llama, Mistral, Qwen2), refusing what our decoder does not compute."""
    model_type = text.get("model_type", "llama")  # LlavaNextConfig's default text model
    if model_type not in TEXT_DEFAULTS:
        raise CheckpointError(f"{where}: LLaVA-NeXT with a {model_type!r} language model is not supported "
                              f"(supported: {', '.join(TEXT_DEFAULTS)})")
    # An explicit null sliding_window (Mistral-7B-v0.2 and later) means none, not the class default.
    window = text["sliding_window"] if "sliding_window" in text else TEXT_DEFAULTS[model_type].get("sliding_window")
    text = {**TEXT_DEFAULTS[model_type], **{k: v for k, v in text.items() if v is not None}, "model_type": model_type}
    decoder = decoder_config(text, where)
    if model_type == "mistral" and window is not None:
        if not isinstance(window, int) or isinstance(window, bool) or window < 2:
            raise CheckpointError(f"{where}: text_config sliding_window {window!r} is not supported")
        # Full attention equals the window's only up to `window` tokens: beyond, refuse (the context limit).
        decoder.max_position_embeddings = min(decoder.max_position_embeddings, window)
    return decoder


def _pinpoints(value: Any, what: str, where: str) -> list[list[int]]:
    if not (isinstance(value, list) and value and all(
            isinstance(p, list | tuple) and len(p) == 2 and all(isinstance(v, int) and v > 0 for v in p)
            for p in value)):
        raise CheckpointError(f"{where}: {what} image_grid_pinpoints {value!r} is not a list of (height, width) pairs")
    return [list(p) for p in value]


def _processing_fields(found: dict[str, Any], vision: VisionConfig, pinpoints: list[list[int]],
                       where: str) -> dict[str, Any]:
    """OmniConfig's anyres fields from LlavaNextImageProcessor's settings (and the tower's mean/std)."""
    if not found:
        raise CheckpointError(f"{where}: no image processor settings (preprocessor_config.json, or "
                              "processor_config.json with an image_processor)")
    kind = str(found.get("image_processor_type", "LlavaNextImageProcessor")).removesuffix("Fast").removesuffix("Pil")
    if kind != "LlavaNextImageProcessor":
        raise CheckpointError(f"{where}: image processor {kind!r} is not supported (LlavaNextImageProcessor)")
    s = {**IMAGE_PROCESSOR_DEFAULTS, **{k: v for k, v in found.items() if v is not None}}
    theirs = _pinpoints(s["image_grid_pinpoints"], "the image processor's", where)
    if theirs != pinpoints:  # the processor cuts the grid with its own, the model unpads with config.json's
        raise CheckpointError(f"{where}: the image processor's image_grid_pinpoints {theirs} differ from "
                              f"config.json's {pinpoints}")
    tile = vision.image_size
    size, crop = s["size"], s["crop_size"]
    if isinstance(size, int):
        size = {"shortest_edge": size}
    if isinstance(crop, int):
        crop = {"height": crop, "width": crop}
    problems = []
    # The grid is cut into crop_size tiles, whatever do_center_crop says, and the tower reads tile-sized ones.
    if not (isinstance(crop, dict) and crop.get("height") == crop.get("width") == tile):
        problems.append(f"crop_size {crop} (must be square and {tile} px, the tower's image_size)")
    shortest = None
    if isinstance(size, dict) and set(size) == {"shortest_edge"} and isinstance(size["shortest_edge"], int):
        shortest = size["shortest_edge"]
        if not s["do_center_crop"] and shortest != tile:
            problems.append(f"do_center_crop false with size {size} (the tiles would not be {tile} px)")
    elif not (isinstance(size, dict) and size.get("height") == size.get("width") == tile):
        problems.append(f"size {size} (a shortest_edge, or height = width = {tile}, the tower's image_size)")
    if s["resample"] != 3:  # our resizes are Pillow's bicubic, as transformers' PIL backend with resample 3
        problems.append(f"resample {s['resample']} (only 3, bicubic)")
    bad = [p for p in pinpoints if p[0] % tile or p[1] % tile]
    if bad:
        problems.append(f"image_grid_pinpoints {bad} (not multiples of the {tile}-px tile)")
    check_pixel_settings(s, vision, problems, where, ("do_resize", "do_rescale", "do_normalize", "do_convert_rgb"))
    return {"image_shortest_edge": shortest}


def _check_token_count(config: OmniConfig, processor: dict[str, Any], strategy: str, where: str) -> None:
    """LlavaNextProcessor's count for the whole-image tile ((tile / patch_size)² + num_additional_image_tokens,
    one fewer with 'default'; the grid's rows are counted with the same patch_size) must be the model's."""
    patch = processor.get("patch_size")
    if patch is None:  # an older processor without the count: the model's is the only one
        return
    said = processor.get("vision_feature_select_strategy") or strategy
    if said != strategy:
        raise CheckpointError(f"{where}: the processor's vision_feature_select_strategy {said!r} differs "
                              f"from config.json's {strategy!r}")
    extra = int(processor.get("num_additional_image_tokens") or 0)
    count = (config.vision.image_size // int(patch)) ** 2 + extra - (1 if said == "default" else 0)
    if int(patch) != config.vision.patch_size or count != config.image_tokens_per_tile:
        raise CheckpointError(f"{where}: the processor writes {count} image tokens per tile (patch_size {patch}, "
                              f"num_additional_image_tokens {extra}) but the tower gives "
                              f"{config.image_tokens_per_tile} ({config.vision.patch_size}-px patches)")


# --- the family ----------------------------------------------------------------------------------------
def read_llava_next(path: str | Path) -> Imported:
    """Read a transformers-native LLaVA-NeXT directory (`LlavaNextForConditionalGeneration`)."""
    path = Path(path)
    where = str(path)
    raw = read_hf_config(path)
    if "image_token_id" in raw and "image_token_index" not in raw:  # LlavaNextConfig's attribute_map
        raw["image_token_index"] = raw["image_token_id"]
    hf = {**NEXT_DEFAULTS, **{k: v for k, v in raw.items() if v is not None}}
    vision, family = llava._vision_config(hf, where)
    strategy = hf["vision_feature_select_strategy"]
    if vision.num_feature_tokens != vision.num_patches:
        raise CheckpointError(
            f"{where}: vision_feature_select_strategy {strategy!r} on a tower "
            f"{'with' if vision.use_cls_token else 'without'} a CLS token keeps {vision.num_feature_tokens} tokens "
            f"per tile, not its {vision.num_patches} patches, which LLaVA-NeXT lays out on the patch grid "
            "(transformers cannot run it either)")
    text = dict(hf.get("text_config") or {})
    decoder = _decoder_config(text, where)
    act = hf["projector_hidden_act"]
    if act not in ACTIVATIONS:
        raise CheckpointError(f"{where}: projector_hidden_act {act!r} is not supported "
                              f"({', '.join(sorted(ACTIVATIONS))})")
    pinpoints = _pinpoints(hf["image_grid_pinpoints"], "config.json's", where)
    image_settings, processor = llava._processor_files(path)
    config = OmniConfig(
        decoder=decoder, vision=vision, audio=None,
        vision_projector=ProjectorConfig(downsample_ratio=1.0, hidden_act=act, layer_norm=False),
        image_start_token="", image_end_token="", image_context_token=llava._image_token(path, processor),
        min_tiles=1, max_tiles=1, use_thumbnail=False, number_images=False, image_wrap=False,
        images_in_template=True, image_resize="anyres", image_grid_pinpoints=pinpoints,
        **_processing_fields(image_settings, vision, pinpoints, where))
    try:
        config.validate()
    except ConfigError as e:
        raise CheckpointError(f"{where}: the config does not fit tinyomni: {e}") from None
    _check_token_count(config, processor, strategy, where)

    weights = Weights(path)
    in_memory = any(k.startswith(("model.language_model.", "model.vision_tower.")) for k in weights.keys())
    spelling = "in-memory" if in_memory else "saved"
    layout = llava.LAYOUTS[spelling]
    # image_newline is the one tensor LLaVA's renaming does not know: taken out before it runs.
    newline = weights.get(NEWLINE[spelling]) if NEWLINE[spelling] in weights.where else None
    weights.where.pop(NEWLINE[spelling], None)
    state = llava._convert(weights, layout, family, bool(hf["multimodal_projector_bias"]), where)
    ours_newline = OUR_PREFIX["projector"] + "image_newline"
    if newline is not None:
        state[ours_newline] = newline
    # LlavaNextConfig ties when its own flag or text_config's says so, and the checkpoint has no head.
    says_tied = bool(raw.get("tie_word_embeddings")) or bool(text.get("tie_word_embeddings"))
    config.decoder.tie_word_embeddings = says_tied and OUR_PREFIX["head"] + "weight" not in state
    root = llava.TOWER_ROOT if any(k.startswith(layout["vision"] + llava.TOWER_ROOT) for k in weights.keys()) else ""
    their_name = llava._their_namer(layout, root, family)
    _check_complete(config, state, lambda k: NEWLINE[spelling] if k == ours_newline else their_name(k), where)

    tokenizer = llava._tokenizer(path, config, int(hf["image_token_index"]), where)
    template = read_chat_template(path)
    if template is None:
        raise CheckpointError(f"{where}: no chat template (chat_template.jinja, chat_template.json, or one in "
                              "processor_config.json / tokenizer_config.json); LLaVA-NeXT checkpoints ship theirs")
    return Imported(config, state, tokenizer, template)
