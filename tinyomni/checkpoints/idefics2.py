"""Idefics2 checkpoints (transformers' `Idefics2ForConditionalGeneration`) → tinyomni.

The model: a SigLIP tower (transformers' Idefics2 vision transformer: SigLIP's names and blocks, its final
LayerNorm, NaViT-style bucketed position ids over images of any size with a patch mask:
`VisionConfig.position_buckets`, `VisionEncoder.forward(patch_mask=...)`), the perceiver resampler connector
(`ProjectorConfig.kind = "resampler"`, model/resampler.py: a gated MLP to the text width, then
`resampler_n_latents` latents through `resampler_depth` cross-attention blocks) and a Mistral decoder. Each
image keeps about its own size, maybe split in quarters, the images of a prompt padded together
(`OmniConfig.image_resize = "native"`), and its placeholder is Idefics2Processor's runs of `<image>` between
`<fake_token_around_image>` (`image_prompt = "tile_runs"`), put where the chat template writes `<image>`
(processing/idefics2.py).

What is read, from the checkpoint's own files only:
- config.json → OmniConfig (`vision_config`, `perceiver_config`, `text_config`, `image_token_id`,
  `tie_word_embeddings`); keys it leaves out mean what transformers' Idefics2Config assumes; values we
  cannot run are named in a CheckpointError, never approximated. Mistral's sliding window is not
  computed: our decoder attends to the whole context, which equals the window's result only up to
  `sliding_window` tokens, so the model's context is capped there (a longer prompt is refused by name);
- the image processor settings (`preprocessor_config.json`, or `processor_config.json`'s
  `image_processor`): `size.shortest_edge` / `size.longest_edge`, `do_image_splitting`, mean/std, bilinear,
  padding on; `processor_config.json`'s `image_seq_len` (checked against the resampler's latents);
- `tokenizer.json` + `tokenizer_config.json`, and the chat template (`chat_template.jinja`,
  `chat_template.json`, the processor's or the tokenizer config's);
- the weights, once, through safetensors: `model.vision_model.*`, `model.connector.*` (our names as they
  are), `model.text_model.*`, `lm_head.weight` (absent when tied).
"""

from __future__ import annotations

import re
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
    decoder_config,
    read_chat_template,
)
from tinyomni.checkpoints.llava import _decoder_name, _processor_files, _tokenizer
from tinyomni.checkpoints.weights import rename_weights
from tinyomni.config import OmniConfig, ProjectorConfig, VisionConfig
from tinyomni.errors import CheckpointError, ConfigError

# --- names -------------------------------------------------------------------------------------------
# Part → checkpoint prefix (save_pretrained's names, as the hub's Idefics2 repositories have them).
LAYOUT = {"vision": "model.vision_model.", "projector": "model.connector.", "decoder": "model.text_model.",
          "head": "lm_head."}
# Inside the connector the names are ours (tinyomni.model.resampler.ResamplerConnector): theirs → ours.
CONNECTOR_NAMES = {name: name for name in (
    "modality_projection.gate_proj.weight", "modality_projection.up_proj.weight",
    "modality_projection.down_proj.weight", "perceiver_resampler.latents", "perceiver_resampler.norm.weight")}
CONNECTOR_LAYER_NAMES = {name: name for name in (
    "input_latents_norm.weight", "input_context_norm.weight", "self_attn.q_proj.weight", "self_attn.k_proj.weight",
    "self_attn.v_proj.weight", "self_attn.o_proj.weight", "post_attention_layernorm.weight",
    "mlp.gate_proj.weight", "mlp.up_proj.weight", "mlp.down_proj.weight")}
_CONNECTOR_LAYER = re.compile(r"^perceiver_resampler\.layers\.(\d+)\.")
TEXT_MODEL_TYPES = ("mistral", "llama")

# --- what transformers assumes for keys a config.json leaves out (5.24) ---------------------------------
IDEFICS2_DEFAULTS: dict[str, Any] = dict(image_token_id=32001, tie_word_embeddings=False)
VISION_DEFAULTS: dict[str, Any] = dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                                       num_attention_heads=12, num_channels=3, image_size=224, patch_size=32,
                                       hidden_act="gelu_pytorch_tanh", layer_norm_eps=1e-6)
PERCEIVER_DEFAULTS: dict[str, Any] = dict(hidden_act="silu", hidden_size=4096, rms_norm_eps=1e-6,
                                          resampler_n_latents=64, resampler_depth=3, resampler_n_heads=16,
                                          resampler_head_dim=96, num_key_value_heads=4)
# Idefics2Config's text model: MistralConfig's defaults, with the three Idefics2Config overrides.
TEXT_DEFAULTS: dict[str, Any] = dict(
    model_type="mistral", vocab_size=32000, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
    num_attention_heads=32, num_key_value_heads=8, hidden_act="silu", max_position_embeddings=4096 * 8,
    rms_norm_eps=1e-5, pad_token_id=0, bos_token_id=1, eos_token_id=2, rope_theta=10000.0, sliding_window=4096,
    tie_word_embeddings=False)
# Idefics2ImageProcessor's class defaults.
IMAGE_PROCESSOR_DEFAULTS: dict[str, Any] = dict(
    size={"shortest_edge": 378, "longest_edge": 980}, resample=2, do_resize=True, do_rescale=True,
    rescale_factor=1 / 255, do_normalize=True, image_mean=[0.5] * 3, image_std=[0.5] * 3, do_pad=True,
    do_convert_rgb=True, do_image_splitting=False)
IMAGE_PROCESSOR = "Idefics2ImageProcessor"
DEFAULT_IMAGE_SEQ_LEN = 64  # Idefics2Processor's image_seq_len default
# Idefics2Processor writes these names when the tokenizer names none of its own.
IMAGE_TOKEN, FAKE_IMAGE_TOKEN = "<image>", "<fake_token_around_image>"


# --- config --------------------------------------------------------------------------------------------
def _sub(hf: dict[str, Any], key: str, defaults: dict[str, Any]) -> dict[str, Any]:
    section = hf.get(key) or {}
    return {**defaults, **{k: v for k, v in section.items() if v is not None}}


def _vision_config(hf: dict[str, Any], where: str) -> VisionConfig:
    """The SigLIP-shaped tower, read at its last hidden state after the final norm, bucketed positions."""
    section = _sub(hf, "vision_config", VISION_DEFAULTS)
    section.pop("model_type", None)  # Idefics2Config drops it too (hub configs carry remote-code names)
    try:  # the same blocks and names as SigLIP's
        vision = hf_vision.vision_config_from_hf({"vision_config": {**section, "model_type": "siglip_vision_model"}})
    except CheckpointError as e:
        raise CheckpointError(f"{where}: {e}") from None
    vision.position_buckets = True
    return vision


def _projector_config(hf: dict[str, Any], text: dict[str, Any], where: str) -> ProjectorConfig:
    p = _sub(hf, "perceiver_config", PERCEIVER_DEFAULTS)
    if p["hidden_size"] != text["hidden_size"]:  # Idefics2Config then takes the text model's width and eps
        p["rms_norm_eps"] = text["rms_norm_eps"]
    if p["num_key_value_heads"] > p["resampler_n_heads"] or p["resampler_n_heads"] % p["num_key_value_heads"]:
        raise CheckpointError(f"{where}: perceiver_config num_key_value_heads {p['num_key_value_heads']} does not "
                              f"divide resampler_n_heads {p['resampler_n_heads']}")
    config = ProjectorConfig(
        downsample_ratio=1.0, kind="resampler", layer_norm=False,
        hidden_size=text["intermediate_size"], hidden_act=text["hidden_act"],  # Idefics2Connector's projection
        resampler_n_latents=p["resampler_n_latents"], resampler_depth=p["resampler_depth"],
        resampler_n_heads=p["resampler_n_heads"], resampler_head_dim=p["resampler_head_dim"],
        resampler_n_kv_heads=p["num_key_value_heads"], resampler_hidden_act=p["hidden_act"],
        resampler_rms_norm_eps=float(p["rms_norm_eps"]))
    try:
        config.validate()
    except ConfigError as e:
        raise CheckpointError(f"{where}: perceiver_config does not fit tinyomni: {e}") from None
    return config


def _processing_fields(found: dict[str, Any], vision: VisionConfig, where: str) -> dict[str, Any]:
    """OmniConfig's image fields (the two edges, splitting) and the tower's mean/std."""
    if not found:
        raise CheckpointError(f"{where}: no image processor settings (preprocessor_config.json, or "
                              "processor_config.json with an image_processor)")
    kind = str(found.get("image_processor_type", IMAGE_PROCESSOR)).removesuffix("Fast").removesuffix("Pil")
    if kind != IMAGE_PROCESSOR:
        raise CheckpointError(f"{where}: image processor {kind!r} is not supported (supported: {IMAGE_PROCESSOR})")
    s = {**IMAGE_PROCESSOR_DEFAULTS, **{k: v for k, v in found.items() if v is not None}}
    problems = []
    size = s["size"]
    edges = (size.get("shortest_edge"), size.get("longest_edge")) if isinstance(size, dict) else (None, None)
    if not all(isinstance(e, int) for e in edges) or set(size) != {"shortest_edge", "longest_edge"}:
        problems.append(f"size {size} (only a shortest_edge and a longest_edge)")
    elif not vision.patch_size <= edges[0] <= edges[1]:
        problems.append(f"size {size} (needs patch_size {vision.patch_size} <= shortest_edge <= longest_edge)")
    if s["resample"] != 2:  # our resizes are Pillow's bilinear, as transformers' PIL backend with resample 2
        problems.append(f"resample {s['resample']} (only 2, bilinear)")
    check_pixel_settings(s, vision, problems, where, ("do_resize", "do_rescale", "do_normalize", "do_pad",
                                                      "do_convert_rgb"))
    return {"image_resize": "native", "image_shortest_edge": edges[0], "image_longest_edge": edges[1],
            "image_splitting": bool(s["do_image_splitting"])}


# --- weights ---------------------------------------------------------------------------------------------
def _connector_name(name: str) -> str | None:
    if name in CONNECTOR_NAMES:
        return CONNECTOR_NAMES[name]
    match = _CONNECTOR_LAYER.match(name)
    if match and name[match.end():] in CONNECTOR_LAYER_NAMES:
        return f"perceiver_resampler.layers.{match.group(1)}.{CONNECTOR_LAYER_NAMES[name[match.end():]]}"
    return None


def _convert(weights: Weights, where: str) -> dict[str, torch.Tensor]:
    """Every checkpoint tensor under our name; unknown ones are a CheckpointError listing them."""
    tables = {"vision": lambda n: hf_vision.tower_name(n, "siglip"), "projector": _connector_name,
              "decoder": _decoder_name, "head": HEAD_NAMES.get}
    return rename_weights(weights, LAYOUT, tables, OUR_PREFIX, where, "Idefics2", DROPPED)


def _their_name(ours: str) -> str:
    """Our name → the checkpoint's (for error messages)."""
    for part, prefix in OUR_PREFIX.items():
        if ours.startswith(prefix):
            rel = ours[len(prefix):]
            if part == "vision":
                rel = hf_vision.hf_name_for(rel, "siglip") or rel
            return LAYOUT[part] + rel
    return ours


# --- the family ----------------------------------------------------------------------------------------
def read_idefics2(path: str | Path) -> Imported:
    """Read a transformers-native Idefics2 directory (`Idefics2ForConditionalGeneration`)."""
    path = Path(path)
    where = str(path)
    hf = {**IDEFICS2_DEFAULTS, **{k: v for k, v in read_hf_config(path).items() if v is not None}}
    vision = _vision_config(hf, where)
    text = _sub(hf, "text_config", TEXT_DEFAULTS)
    if text["model_type"] not in TEXT_MODEL_TYPES:
        raise CheckpointError(f"{where}: a {text['model_type']!r} language model is not supported "
                              f"(supported: {', '.join(TEXT_MODEL_TYPES)})")
    decoder = decoder_config(text, where)
    window = text.get("sliding_window") if text["model_type"] == "mistral" else None
    if window is not None:
        if not isinstance(window, int) or window < 2:
            raise CheckpointError(f"{where}: text_config sliding_window {window!r} is not supported")
        # Full attention equals the window's only up to `window` tokens: beyond, refuse (the context limit).
        decoder.max_position_embeddings = min(decoder.max_position_embeddings, window)
    image_settings, processor = _processor_files(path)
    config = OmniConfig(
        decoder=decoder, vision=vision, audio=None, vision_projector=_projector_config(hf, text, where),
        image_start_token=FAKE_IMAGE_TOKEN, image_end_token=FAKE_IMAGE_TOKEN, image_context_token=IMAGE_TOKEN,
        min_tiles=1, max_tiles=1, use_thumbnail=False, number_images=False, image_wrap=True,
        images_in_template=True, image_prompt="tile_runs", **_processing_fields(image_settings, vision, where))
    try:
        config.validate()
    except ConfigError as e:
        raise CheckpointError(f"{where}: the config does not fit tinyomni: {e}") from None
    seq = processor.get("image_seq_len", DEFAULT_IMAGE_SEQ_LEN)
    if seq != config.image_tokens_per_tile:
        raise CheckpointError(f"{where}: the processor writes image_seq_len {seq} image tokens per image but the "
                              f"resampler gives resampler_n_latents {config.image_tokens_per_tile}")

    weights = Weights(path)
    state = _convert(weights, where)
    # Tied when the checkpoint has no head and its config allows it (transformers uses a head it finds).
    says_tied = bool(hf.get("tie_word_embeddings")) or bool(text.get("tie_word_embeddings"))
    config.decoder.tie_word_embeddings = says_tied and OUR_PREFIX["head"] + "weight" not in state
    _check_complete(config, state, _their_name, where)

    tokenizer = _tokenizer(path, config, int(hf["image_token_id"]), where)
    if tokenizer.token_to_id(FAKE_IMAGE_TOKEN) is None:
        raise CheckpointError(f"{where}: the tokenizer lacks the token {FAKE_IMAGE_TOKEN}, which the processor "
                              "writes around every image")
    template = read_chat_template(path)
    if template is None:
        raise CheckpointError(f"{where}: no chat template (chat_template.jinja, chat_template.json, or one in "
                              "processor_config.json / tokenizer_config.json)")
    return Imported(config, state, tokenizer, template)
