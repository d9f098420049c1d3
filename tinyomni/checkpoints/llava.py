"""LLaVA checkpoints (transformers' `LlavaForConditionalGeneration`: LLaVA-1.5 "-hf", TinyLLaVA "-hf") → tinyomni.

The model: a CLIP or SigLIP tower, one of its hidden states (`vision_feature_layer`; a list of layers is
concatenated along the channels), with or without the CLS token (`vision_feature_select_strategy`), a
two-layer MLP projector without LayerNorm or pixel shuffle (`multi_modal_projector.linear_1/linear_2`,
`projector_hidden_act`), and a Llama or Qwen2 decoder. One image is one tile, made as the checkpoint's
image processor makes it (CLIPImageProcessor: shortest-edge resize + centre crop; LlavaImageProcessor's
`do_pad` first pads to a square with the mean colour; SiglipImageProcessor: a plain resize), and the
prompt is what its processor and chat template write: the template puts `<image>` where it wants the
picture, and each becomes that many `<image>` tokens, with no <img> … </img> around them.

What is read, from the checkpoint's own files only:
- config.json → OmniConfig (values we cannot run are named in a CheckpointError, never approximated);
  keys it leaves out mean what transformers' LlavaConfig / CLIP / SigLIP / Llama / Qwen2 configs assume;
- the image processor settings (`preprocessor_config.json`, or transformers 5's `processor_config.json`
  with the image processor inside) and the processor's own (`patch_size`, `num_additional_image_tokens`,
  `vision_feature_select_strategy`, `image_token`), checked against the tower's token count;
- `tokenizer.json` (as it is: see `_tokenizer`) + `tokenizer_config.json`, and the chat template
  (`chat_template.jinja`, `chat_template.json`, the processor's or the tokenizer config's; LLaVA-1.5's
  when there is none);
- the weights, once, through safetensors, in either spelling transformers writes (`vision_tower.` /
  `multi_modal_projector.` / `language_model.model.` / `language_model.lm_head.`, or `model.vision_tower.`
  / `model.multi_modal_projector.` / `model.language_model.` / `lm_head.`).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import torch

from tinyomni.checkpoints import hf_vision
from tinyomni.checkpoints.families import Imported, read_hf_config
from tinyomni.checkpoints.internvl import (
    DECODER_LAYER_NAMES,
    DECODER_NAMES,
    DROPPED,
    HEAD_NAMES,
    OUR_PREFIX,
    Weights,
    _check_complete,  # the same completeness check as InternVL's: every tensor, with its shape
    _json,
    check_pixel_settings,
    decoder_config,
    read_chat_template,
)
from tinyomni.config import ACTIVATIONS, DecoderConfig, OmniConfig, ProjectorConfig, VisionConfig
from tinyomni.errors import CheckpointError, ConfigError
from tinyomni.processing.tokenizer import Tokenizer

# --- names -------------------------------------------------------------------------------------------
# Part → checkpoint prefix, in the two spellings transformers writes.
LAYOUTS = {
    "saved": {"vision": "vision_tower.", "projector": "multi_modal_projector.",
              "decoder": "language_model.model.", "head": "language_model.lm_head."},
    "in-memory": {"vision": "model.vision_tower.", "projector": "model.multi_modal_projector.",
                  "decoder": "model.language_model.", "head": "lm_head."},
}
# Inside the projector: theirs → ours (our projector has no layer_norm here: ProjectorConfig.layer_norm).
PROJECTOR_NAMES = {name: name for name in ("linear_1.weight", "linear_1.bias", "linear_2.weight", "linear_2.bias")}
# The tower inside vision_tower: a CLIPVisionModel / SiglipVisionModel, whose names start "vision_model."
# in the hub's checkpoints; transformers 5 saves them without it.
TOWER_ROOT = "vision_model."
# Tower parts the projector never reads: it takes a hidden state, never the final norm or pooling head.
UNUSED_TOWER = ("post_layernorm.",)
_LAYER = re.compile(r"^layers\.(\d+)\.")

# --- what transformers assumes for keys a config.json leaves out ----------------------------------------
LLAVA_DEFAULTS: dict[str, Any] = dict(
    image_token_index=32000, projector_hidden_act="gelu", vision_feature_select_strategy="default",
    vision_feature_layer=-2, multimodal_projector_bias=True, tie_word_embeddings=False)
# LlavaConfig's default tower (CLIP ViT-L/14-336, as LLaVA-1.5).
VISION_DEFAULTS: dict[str, Any] = dict(model_type="clip_vision_model", intermediate_size=4096, hidden_size=1024,
                                       patch_size=14, image_size=336, num_hidden_layers=24, num_attention_heads=16)
TEXT_DEFAULTS: dict[str, dict[str, Any]] = {
    "llama": dict(vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                  num_attention_heads=32, hidden_act="silu", max_position_embeddings=2048, rms_norm_eps=1e-6,
                  tie_word_embeddings=False, rope_theta=10000.0, attention_bias=False, mlp_bias=False,
                  bos_token_id=1, eos_token_id=2),
    "qwen2": dict(vocab_size=151936, hidden_size=4096, intermediate_size=22016, num_hidden_layers=32,
                  num_attention_heads=32, num_key_value_heads=32, hidden_act="silu", max_position_embeddings=32768,
                  rms_norm_eps=1e-6, tie_word_embeddings=False, rope_theta=10000.0, use_sliding_window=False),
}
# The image processors LLaVA checkpoints name, with their class defaults (transformers 5.24, PIL backend).
CLIP_MEAN, CLIP_STD = [0.48145466, 0.4578275, 0.40821073], [0.26862954, 0.26130258, 0.27577711]
_CLIP_PROCESSOR: dict[str, Any] = dict(
    size={"shortest_edge": 224}, crop_size={"height": 224, "width": 224}, do_center_crop=True, resample=3,
    do_resize=True, do_rescale=True, rescale_factor=1 / 255, do_normalize=True, do_convert_rgb=True,
    image_mean=CLIP_MEAN, image_std=CLIP_STD, do_pad=False)
IMAGE_PROCESSORS: dict[str, dict[str, Any]] = {
    "CLIPImageProcessor": _CLIP_PROCESSOR,
    "LlavaImageProcessor": _CLIP_PROCESSOR,  # CLIP's steps, plus do_pad (pad to a square first)
    "SiglipImageProcessor": dict(
        size={"height": 224, "width": 224}, do_center_crop=False, resample=3, do_resize=True, do_rescale=True,
        rescale_factor=1 / 255, do_normalize=True, do_convert_rgb=True, image_mean=[0.5] * 3,
        image_std=[0.5] * 3, do_pad=False),
}
# The prompt LLaVA-1.5's processor files carry, for a checkpoint that ships no template: "USER: <image>\n"
# + text + " ASSISTANT:" (images first in each message, each text part followed by a space).
LLAVA_TEMPLATE = (
    "{% for message in messages %}{% if message['role'] != 'system' %}{{ message['role'].upper() + ': '}}"
    "{% endif %}{% for content in message['content'] | selectattr('type', 'equalto', 'image') %}"
    "{{ '<image>\n' }}{% endfor %}{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}"
    "{{ content['text'] + ' '}}{% endfor %}{% endfor %}{% if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}"
)


# --- config --------------------------------------------------------------------------------------------
def _decoder_config(text: dict[str, Any], where: str) -> DecoderConfig:
    """text_config → DecoderConfig, refusing what our decoder does not compute."""
    model_type = text.get("model_type", "llama")  # LlavaConfig's default text model
    if model_type not in TEXT_DEFAULTS:
        raise CheckpointError(f"{where}: LLaVA with a {model_type!r} language model is not supported "
                              f"(supported: {', '.join(TEXT_DEFAULTS)})")
    text = {**TEXT_DEFAULTS[model_type], **{k: v for k, v in text.items() if v is not None}, "model_type": model_type}
    return decoder_config(text, where)


def _vision_config(hf: dict[str, Any], where: str) -> tuple[VisionConfig, str]:
    """The tower's VisionConfig and its hf_vision family, reading the hidden state(s) LLaVA reads."""
    given = hf.get("vision_config")
    # A vision_config given is read with its own class's defaults; none at all is LlavaConfig's CLIP-L.
    section = {"model_type": "clip_vision_model", **given} if isinstance(given, dict) else dict(VISION_DEFAULTS)
    family = hf_vision.MODEL_TYPES.get(section["model_type"])
    if family not in ("clip", "siglip"):
        raise CheckpointError(f"{where}: LLaVA with a {section['model_type']!r} vision tower is not supported "
                              "(supported: clip_vision_model, siglip_vision_model)")
    try:
        vision = hf_vision.vision_config_from_hf({"vision_config": section})
    except CheckpointError as e:
        raise CheckpointError(f"{where}: {e}") from None
    vision.post_layernorm = False  # LLaVA reads hidden_states[k], never the final norm (SigLIP has one)
    layer = hf["vision_feature_layer"]
    layers = layer if isinstance(layer, list) else [layer]
    if not layers or not all(isinstance(k, int) and not isinstance(k, bool) for k in layers):
        raise CheckpointError(f"{where}: vision_feature_layer {layer!r} is not supported "
                              "(a layer index or a list of them)")
    if isinstance(layer, list):
        vision.feature_layers = tuple(layers)
    else:
        vision.feature_layer = layer
    strategy = hf["vision_feature_select_strategy"]
    if strategy == "default":  # drops the first token: the CLS token of CLIP, a real patch of SigLIP
        vision.feature_select = "patches" if vision.use_cls_token else "drop_first"
    elif strategy == "full":
        vision.feature_select = "full"
    else:
        raise CheckpointError(f"{where}: vision_feature_select_strategy {strategy!r} is not supported "
                              "('default' or 'full')")
    try:
        vision.validate()
    except ConfigError as e:
        raise CheckpointError(f"{where}: vision_feature_layer {layer!r} does not fit the tower: {e}") from None
    return vision, family


def _processor_files(path: Path) -> tuple[dict[str, Any], dict[str, Any]]:
    """(image processor settings, processor settings): transformers 5 nests the first in
    processor_config.json, older exports keep it in preprocessor_config.json."""
    processor = _json(path / "processor_config.json")
    nested = processor.get("image_processor")
    image = nested if isinstance(nested, dict) else _json(path / "preprocessor_config.json")
    return image, processor


def _processing_fields(found: dict[str, Any], vision: VisionConfig, where: str) -> dict[str, Any]:
    """OmniConfig's image fields (resize mode, shortest edge, padding) and the tower's mean/std."""
    if not found:
        raise CheckpointError(f"{where}: no image processor settings (preprocessor_config.json, or "
                              "processor_config.json with an image_processor)")
    kind = str(found.get("image_processor_type", "CLIPImageProcessor")).removesuffix("Fast").removesuffix("Pil")
    if kind not in IMAGE_PROCESSORS:
        raise CheckpointError(f"{where}: image processor {kind!r} is not supported "
                              f"(supported: {', '.join(IMAGE_PROCESSORS)})")
    s = {**IMAGE_PROCESSORS[kind], **{k: v for k, v in found.items() if v is not None}}
    problems = []
    tile = vision.image_size
    size, crop = s["size"], s.get("crop_size")
    if isinstance(size, int):
        size = {"shortest_edge": size}
    if isinstance(crop, int):
        crop = {"height": crop, "width": crop}
    fields: dict[str, Any] = {"image_pad_to_square": bool(s.get("do_pad"))}
    if s["do_resize"] is not True:
        problems.append(f"do_resize {s['do_resize']}")
    elif isinstance(size, dict) and set(size) == {"shortest_edge"}:
        if s["do_center_crop"] is not True:
            problems.append("do_center_crop false after a shortest-edge resize (the tile would not be square)")
        elif not (isinstance(crop, dict) and crop.get("height") == crop.get("width") == tile):
            problems.append(f"crop_size {crop} (must be square and {tile} px, the tower's image_size)")
        fields.update(image_resize="shortest_edge", image_shortest_edge=int(size["shortest_edge"]))
    elif isinstance(size, dict) and size.get("height") == size.get("width") == tile:
        if s["do_center_crop"] and not (isinstance(crop, dict) and crop.get("height") == crop.get("width") == tile):
            problems.append(f"crop_size {crop} after resizing to {tile} px")
        fields.update(image_resize="tiles")  # one tile: a plain bicubic resize to the tile size
    else:
        problems.append(f"size {size} (a shortest_edge, or height = width = {tile}, the tower's image_size)")
    if s["resample"] != 3:  # our resizes are Pillow's bicubic, as transformers' PIL backend with resample 3
        problems.append(f"resample {s['resample']} (only 3, bicubic)")
    check_pixel_settings(s, vision, problems, where, ("do_rescale", "do_normalize", "do_convert_rgb"))
    return fields


def _image_token(path: Path, processor: dict[str, Any]) -> str:
    """The image token's name, as LlavaProcessor picks it: the tokenizer's own (tokenizer_config.json),
    else the processor's, else "<image>"."""
    meta = _json(path / "tokenizer_config.json")
    extra = meta.get("extra_special_tokens")
    value = meta.get("image_token") or (extra.get("image_token") if isinstance(extra, dict) else None) or (
        processor.get("image_token")) or "<image>"
    return str(value.get("content", "<image>") if isinstance(value, dict) else value)


def _check_token_count(config: OmniConfig, processor: dict[str, Any], strategy: str, where: str) -> None:
    """The processor's count of image tokens (LlavaProcessor: (crop / patch)² + num_additional_image_tokens,
    one fewer with the 'default' strategy) must be what the model makes, or transformers itself fails."""
    patch = processor.get("patch_size")
    if patch is None:  # an older processor without the count: the model's is the only one
        return
    said = processor.get("vision_feature_select_strategy") or strategy
    if said != strategy:
        raise CheckpointError(f"{where}: the processor's vision_feature_select_strategy {said!r} differs "
                              f"from config.json's {strategy!r}")
    count = (config.vision.image_size // int(patch)) ** 2 + int(processor.get("num_additional_image_tokens") or 0)
    count -= 1 if said == "default" else 0
    if count != config.image_tokens_per_tile:
        raise CheckpointError(f"{where}: the processor writes {count} image tokens per image (patch_size {patch}, "
                              f"num_additional_image_tokens {processor.get('num_additional_image_tokens', 0)}) "
                              f"but the tower gives {config.image_tokens_per_tile}")


# --- tokenizer -------------------------------------------------------------------------------------------
def _tokenizer(path: Path, config: OmniConfig, image_token_id: int, where: str) -> Tokenizer:
    # tokenizer.json is read as it is, as transformers 5 reads it for a "llava" config.json whatever
    # tokenizer class tokenizer_config.json names (models/auto/tokenization_auto.py lists llava among
    # the models whose hub tokenizer class is wrong): Llama-2's legacy "Prepend ▁" normalizer stays.
    tokenizer = Tokenizer.from_dir(path)
    if not tokenizer.add_bos_token and tokenizer.bos_token_id is not None:
        # A BOS may be prepended only by tokenizer.json's post-processor, which LlavaProcessor applies.
        tokenizer.add_bos_token = tokenizer.backend.encode("", add_special_tokens=True).ids[:1] == [
            tokenizer.bos_token_id]
    found = tokenizer.token_to_id(config.image_context_token)
    if found is None:
        raise CheckpointError(f"{where}: the tokenizer lacks the image token {config.image_context_token}")
    if found != image_token_id:
        raise CheckpointError(f"{where}: config.json says image_token_index {image_token_id} but the tokenizer "
                              f"has {config.image_context_token} at {found}")
    if len(tokenizer) > config.decoder.vocab_size:
        raise CheckpointError(f"{where}: the tokenizer has {len(tokenizer)} tokens but the decoder only "
                              f"{config.decoder.vocab_size} embeddings")
    return tokenizer


# --- weights ---------------------------------------------------------------------------------------------
def _decoder_name(name: str) -> str | None:
    if name in DECODER_NAMES:
        return DECODER_NAMES[name]
    match = _LAYER.match(name)
    template = f"layers.{{i}}.{name[match.end():]}" if match else None
    if template in DECODER_LAYER_NAMES:
        return DECODER_LAYER_NAMES[template].format(i=match.group(1))
    return None


def _convert(weights: Weights, layout: dict[str, str], family: str, projector_bias: bool,
             where: str) -> dict[str, torch.Tensor]:
    """Every checkpoint tensor under our name; unknown ones are a CheckpointError listing them."""
    state: dict[str, torch.Tensor] = {}
    tower: dict[str, torch.Tensor] = {}
    unknown: list[str] = []
    parts = sorted(layout.items(), key=lambda item: -len(item[1]))  # "language_model.lm_head." first
    for key in weights.keys():
        part = next((p for p, prefix in parts if key.startswith(prefix)), None)
        name = key[len(layout[part]):] if part else ""
        if part == "vision":
            tower[name.removeprefix(TOWER_ROOT)] = weights.get(key)
            continue
        if part is not None and DROPPED.search(name):
            continue
        ours = {"projector": PROJECTOR_NAMES.get, "decoder": _decoder_name, "head": HEAD_NAMES.get}.get(
            part or "", lambda _: None)(name)
        if ours is None:
            unknown.append(key)
            continue
        state[OUR_PREFIX[part] + ours] = weights.get(key)
    if unknown:
        shown = ", ".join(sorted(unknown)[:8]) + (f" (+{len(unknown) - 8} more)" if len(unknown) > 8 else "")
        raise CheckpointError(f"{where}: unknown LLaVA weight(s) {shown}")
    try:
        converted = hf_vision.convert_hf_vision_state_dict(tower, family)
    except CheckpointError as e:
        raise CheckpointError(f"{where}: {e}") from None
    for ours, tensor in converted.items():
        if not ours.startswith(UNUSED_TOWER):
            state[OUR_PREFIX["vision"] + ours] = tensor
    if not projector_bias:  # multimodal_projector_bias false: our linears' biases are zeros, the same map
        for name in ("linear_1", "linear_2"):
            weight = state.get(f"{OUR_PREFIX['projector']}{name}.weight")
            if weight is not None:
                state[f"{OUR_PREFIX['projector']}{name}.bias"] = weight.new_zeros(weight.shape[0])
    return state


def _their_namer(layout: dict[str, str], root: str, family: str):
    """Our name → the checkpoint's (for error messages); `root` is the tower's own prefix, if any."""

    def name(ours: str) -> str:
        for part, prefix in OUR_PREFIX.items():
            if ours.startswith(prefix):
                rel = ours[len(prefix):]
                if part == "vision":
                    rel = root + (hf_vision.hf_name_for(rel, family) or rel)
                return layout[part] + rel
        return ours

    return name


# --- the family ----------------------------------------------------------------------------------------
def read_llava(path: str | Path) -> Imported:
    """Read a transformers-native LLaVA directory (`LlavaForConditionalGeneration`)."""
    path = Path(path)
    where = str(path)
    raw = read_hf_config(path)
    if "image_token_id" in raw and "image_token_index" not in raw:  # LlavaConfig's attribute_map
        raw["image_token_index"] = raw["image_token_id"]
    hf = {**LLAVA_DEFAULTS, **{k: v for k, v in raw.items() if v is not None}}
    vision, family = _vision_config(hf, where)
    text = dict(hf.get("text_config") or {})
    decoder = _decoder_config(text, where)
    act = hf["projector_hidden_act"]
    if act not in ACTIVATIONS:
        raise CheckpointError(f"{where}: projector_hidden_act {act!r} is not supported "
                              f"({', '.join(sorted(ACTIVATIONS))})")
    image_settings, processor = _processor_files(path)
    config = OmniConfig(
        decoder=decoder, vision=vision, audio=None,
        vision_projector=ProjectorConfig(downsample_ratio=1.0, hidden_act=act, layer_norm=False),
        image_start_token="", image_end_token="", image_context_token=_image_token(path, processor),
        min_tiles=1, max_tiles=1, use_thumbnail=False, number_images=False, image_wrap=False,
        images_in_template=True, **_processing_fields(image_settings, vision, where))
    try:
        config.validate()
    except ConfigError as e:
        raise CheckpointError(f"{where}: the config does not fit tinyomni: {e}") from None
    _check_token_count(config, processor, hf["vision_feature_select_strategy"], where)

    weights = Weights(path)
    in_memory = any(k.startswith(("model.language_model.", "model.vision_tower.")) for k in weights.keys())
    layout = LAYOUTS["in-memory" if in_memory else "saved"]
    state = _convert(weights, layout, family, bool(hf["multimodal_projector_bias"]), where)
    # Tied when the checkpoint has no head and its config allows it (transformers uses a head it finds).
    # LlavaConfig ties when either its own flag or text_config's says so.
    says_tied = bool(raw.get("tie_word_embeddings")) or bool(text.get("tie_word_embeddings"))
    config.decoder.tie_word_embeddings = says_tied and OUR_PREFIX["head"] + "weight" not in state
    root = TOWER_ROOT if any(k.startswith(layout["vision"] + TOWER_ROOT) for k in weights.keys()) else ""
    _check_complete(config, state, _their_namer(layout, root, family), where)

    tokenizer = _tokenizer(path, config, int(hf["image_token_index"]), where)
    return Imported(config, state, tokenizer, read_chat_template(path) or LLAVA_TEMPLATE)
