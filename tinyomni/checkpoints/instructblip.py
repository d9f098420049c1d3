"""InstructBLIP checkpoints (transformers' `InstructBlipForConditionalGeneration` with a Llama decoder, e.g.
Salesforce/instructblip-vicuna-7b) → tinyomni.

The model: BLIP's ViT (EVA-CLIP-g in the released ones: a patch embedding with bias, a class token, learned
positions, pre-norm blocks with one fused qkv whose bias holds q and v parts only, a final LayerNorm; every
token goes on, the class token too), the instruction-aware Q-Former (`ProjectorConfig.kind = "qformer"`,
tinyomni/model/qformer.py) and its `language_projection`, and a Llama decoder. Each image is one square
tile, a plain bicubic resize (BlipImageProcessor), and costs `num_query_tokens` image tokens, written at
the very start of the prompt, before BOS (`OmniConfig.image_prompt = "prefix"`); the Q-Former also reads
the prompt's text in its own BERT vocabulary (processing/instructblip.py).

What is read, from the checkpoint's own files only:
- config.json → OmniConfig (`vision_config`, `qformer_config`, `text_config`, `num_query_tokens`,
  `image_token_index`); keys it leaves out mean what transformers' InstructBlip*Config assume; values we
  cannot run are named in a CheckpointError, never approximated;
- the image processor settings (`processor_config.json`'s `image_processor`, or `preprocessor_config.json`)
  and the processor's `num_query_tokens` (checked against config.json's);
- `tokenizer.json` + `tokenizer_config.json` (the image token, BOS), `qformer_tokenizer/tokenizer.json`, and a
  chat template if the checkpoint has one (the hub's have none: the prompt is the text as it is);
- the weights, once, through safetensors: `vision_model.*`, `query_tokens`, `qformer.*`,
  `language_projection.*`, `language_model.model.*`, `language_model.lm_head.*` (absent when tied).
"""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from tinyomni.checkpoints.families import Imported, read_hf_config
from tinyomni.checkpoints.internvl import (
    DROPPED,
    HEAD_NAMES,
    OUR_PREFIX,
    Weights,
    _check_complete,
    _lookup,
    check_pixel_settings,
    decoder_config,
    read_chat_template,
)
from tinyomni.checkpoints.llava import TEXT_DEFAULTS, _decoder_name, _image_token, _processor_files, _tokenizer
from tinyomni.checkpoints.weights import rename_weights
from tinyomni.config import ACTIVATIONS, DecoderConfig, OmniConfig, ProjectorConfig, QFormerConfig, VisionConfig
from tinyomni.errors import CheckpointError, ConfigError
from tinyomni.processing.instructblip import PLAIN_TEMPLATE, TOKENIZER_DIR, attach_instruction_tokenizer
from tinyomni.processing.tokenizer import Tokenizer

# --- names -------------------------------------------------------------------------------------------
# Part → checkpoint prefix (save_pretrained's names; the hub's checkpoints have the same).
LAYOUT = {"vision": "vision_model.", "projector": "", "decoder": "language_model.model.",
          "head": "language_model.lm_head."}
# The BLIP tower: theirs → ours (tower-relative); the fused qkv is split in `_split_qkv`.
VISION_NAMES = {
    "embeddings.class_embedding": "embeddings.class_embedding",  # [1, 1, D] → [D]
    "embeddings.patch_embedding.weight": "embeddings.patch_embedding.weight",
    "embeddings.patch_embedding.bias": "embeddings.patch_embedding.bias",
    "embeddings.position_embedding": "embeddings.position_embedding.weight",  # [1, N+1, D] → [N+1, D]
    "post_layernorm.weight": "post_layernorm.weight",
    "post_layernorm.bias": "post_layernorm.bias",
}
VISION_LAYER_NAMES = {
    "encoder.layers.{i}.self_attn.qkv.weight": "encoder.layers.{i}.self_attn.qkv.weight",  # split below
    "encoder.layers.{i}.self_attn.qkv.bias": "encoder.layers.{i}.self_attn.qkv.bias",  # split below
    "encoder.layers.{i}.self_attn.projection.weight": "encoder.layers.{i}.self_attn.out_proj.weight",
    "encoder.layers.{i}.self_attn.projection.bias": "encoder.layers.{i}.self_attn.out_proj.bias",
    **{f"encoder.layers.{{i}}.{name}": f"encoder.layers.{{i}}.{name}" for name in (
        "layer_norm1.weight", "layer_norm1.bias", "layer_norm2.weight", "layer_norm2.bias",
        "mlp.fc1.weight", "mlp.fc1.bias", "mlp.fc2.weight", "mlp.fc2.bias")},
}
VISION_RESHAPE = {"embeddings.class_embedding": lambda t: t.reshape(-1),
                  "embeddings.position_embedding.weight": lambda t: t.reshape(-1, t.shape[-1])}
# The connector: transformers' names are ours (tinyomni.model.qformer.QFormerConnector), listed so that
# nothing else slips in.
_ATTENTION = [f"{part}.{name}" for part in ("attention.query", "attention.key", "attention.value", "output.dense",
                                            "output.LayerNorm") for name in ("weight", "bias")]
_FFN = [f"{part}.{name}" for part in ("intermediate.dense", "output.dense", "output.LayerNorm")
        for name in ("weight", "bias")]
PROJECTOR_NAMES = {name: name for name in (
    "query_tokens", "language_projection.weight", "language_projection.bias",
    "qformer.embeddings.word_embeddings.weight", "qformer.embeddings.position_embeddings.weight",
    "qformer.embeddings.layernorm.weight", "qformer.embeddings.layernorm.bias")}
PROJECTOR_LAYER_NAMES = {f"qformer.encoder.layer.{{i}}.{name}": f"qformer.encoder.layer.{{i}}.{name}" for name in (
    *(f"attention.{n}" for n in _ATTENTION), *(f"crossattention.{n}" for n in _ATTENTION),
    *_FFN, *(n.replace("intermediate", "intermediate_query").replace("output", "output_query") for n in _FFN))}
# Buffers that hold nothing to load (older exports saved the Q-Former's position ids).
UNUSED = ("qformer.embeddings.position_ids",)
_QFORMER_LAYER = re.compile(r"^(qformer\.encoder\.layer)\.(\d+)\.")

# --- what transformers assumes for keys a config.json leaves out (5.24) ---------------------------------
INSTRUCTBLIP_DEFAULTS: dict[str, Any] = dict(num_query_tokens=32, image_token_index=None)
VISION_DEFAULTS: dict[str, Any] = dict(  # InstructBlipVisionConfig
    hidden_size=1408, intermediate_size=6144, num_hidden_layers=39, num_attention_heads=16, image_size=224,
    patch_size=14, hidden_act="gelu", layer_norm_eps=1e-6, qkv_bias=True)
QFORMER_DEFAULTS: dict[str, Any] = dict(  # InstructBlipQFormerConfig
    vocab_size=30522, hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072,
    hidden_act="gelu", max_position_embeddings=512, layer_norm_eps=1e-12, cross_attention_frequency=2,
    position_embedding_type="absolute")
IMAGE_PROCESSOR_DEFAULTS: dict[str, Any] = dict(  # BlipImageProcessor (PIL backend)
    size={"height": 384, "width": 384}, resample=3, do_resize=True, do_rescale=True, rescale_factor=1 / 255,
    do_normalize=True, image_mean=[0.48145466, 0.4578275, 0.40821073],
    image_std=[0.26862954, 0.26130258, 0.27577711], do_convert_rgb=True)
IMAGE_PROCESSORS = ("BlipImageProcessor",)
QFORMER_TOKENIZER_DIR = TOKENIZER_DIR


# --- config --------------------------------------------------------------------------------------------
def _square(value: Any, name: str, where: str) -> int:
    if isinstance(value, (list, tuple)):
        if len(value) != 2 or value[0] != value[1]:
            raise CheckpointError(f"{where}: only a square vision {name} is supported, got {list(value)}")
        value = value[0]
    return int(value)


def vision_config(hf: dict[str, Any], where: str) -> VisionConfig:
    """vision_config → the BLIP tower's VisionConfig (InstructBLIP's and BLIP-2's are the same)."""
    c = {**VISION_DEFAULTS, **{k: v for k, v in (hf.get("vision_config") or {}).items() if v is not None}}
    if c["hidden_act"] not in ACTIVATIONS:
        raise CheckpointError(f"{where}: vision_config hidden_act {c['hidden_act']!r} is not supported "
                              f"({', '.join(sorted(ACTIVATIONS))})")
    vision = VisionConfig(
        image_size=_square(c["image_size"], "image_size", where), patch_size=_square(c["patch_size"], "patch_size",
                                                                                      where),
        hidden_size=c["hidden_size"], intermediate_size=c["intermediate_size"],
        num_hidden_layers=c["num_hidden_layers"], num_attention_heads=c["num_attention_heads"],
        hidden_act=c["hidden_act"], layer_norm_eps=c["layer_norm_eps"], qkv_bias=bool(c["qkv_bias"]),
        use_cls_token=True, pre_layernorm=False, post_layernorm=True,
        feature_select="full")  # the Q-Former reads every token of the last hidden state, CLS included
    try:
        vision.validate()
    except ConfigError as e:
        raise CheckpointError(f"{where}: vision_config does not fit tinyomni: {e}") from None
    return vision


def qformer_config(hf: dict[str, Any], vision: VisionConfig, where: str,
                   instruction_aware: bool = True) -> QFormerConfig:
    """qformer_config (+ num_query_tokens) → QFormerConfig; BLIP-2's (blip2.py) is the one without text."""
    c = {**QFORMER_DEFAULTS, **{k: v for k, v in (hf.get("qformer_config") or {}).items() if v is not None}}
    problems = []
    if c["hidden_act"] not in ACTIVATIONS:
        problems.append(f"hidden_act {c['hidden_act']!r} ({', '.join(sorted(ACTIVATIONS))})")
    if c["position_embedding_type"] != "absolute":
        problems.append(f"position_embedding_type {c['position_embedding_type']!r} (only absolute)")
    if c.get("encoder_hidden_size", vision.hidden_size) != vision.hidden_size:
        problems.append(f"encoder_hidden_size {c['encoder_hidden_size']} (the vision tower's hidden_size is "
                        f"{vision.hidden_size})")
    if problems:
        raise CheckpointError(f"{where}: unsupported qformer_config value(s): {'; '.join(problems)}")
    qformer = QFormerConfig(
        num_query_tokens=int(hf["num_query_tokens"]), hidden_size=c["hidden_size"],
        num_hidden_layers=c["num_hidden_layers"], num_attention_heads=c["num_attention_heads"],
        intermediate_size=c["intermediate_size"], hidden_act=c["hidden_act"], layer_norm_eps=c["layer_norm_eps"],
        cross_attention_frequency=c["cross_attention_frequency"], instruction_aware=instruction_aware,
        vocab_size=c["vocab_size"], max_position_embeddings=c["max_position_embeddings"])
    try:
        qformer.validate()
    except ConfigError as e:
        raise CheckpointError(f"{where}: qformer_config does not fit tinyomni: {e}") from None
    return qformer


def _text_config(hf: dict[str, Any], where: str) -> tuple[DecoderConfig, dict[str, Any]]:
    text = dict(hf.get("text_config") or {})
    model_type = text.get("model_type", "opt")  # InstructBlipConfig's default text model
    if model_type != "llama":
        raise CheckpointError(f"{where}: InstructBLIP with a {model_type!r} language model is not supported "
                              "(supported: llama)")
    text = {**TEXT_DEFAULTS["llama"], **{k: v for k, v in text.items() if v is not None}}
    return decoder_config(text, where), text


def check_image_processor(found: dict[str, Any], vision: VisionConfig, where: str) -> None:
    """BlipImageProcessor's settings: a bicubic resize to the tower's square, mean/std (put into `vision`)."""
    if not found:
        raise CheckpointError(f"{where}: no image processor settings (processor_config.json with an "
                              "image_processor, or preprocessor_config.json)")
    kind = str(found.get("image_processor_type", IMAGE_PROCESSORS[0])).removesuffix("Fast").removesuffix("Pil")
    if kind not in IMAGE_PROCESSORS:
        raise CheckpointError(f"{where}: image processor {kind!r} is not supported "
                              f"(supported: {', '.join(IMAGE_PROCESSORS)})")
    s = {**IMAGE_PROCESSOR_DEFAULTS, **{k: v for k, v in found.items() if v is not None}}
    problems = []
    size, tile = s["size"], vision.image_size
    if isinstance(size, int):
        size = {"height": size, "width": size}
    if not (isinstance(size, dict) and size.get("height") == size.get("width") == tile):
        problems.append(f"size {s['size']} (height = width = {tile}, the tower's image_size)")
    if s["resample"] != 3:  # our resize is Pillow's bicubic, as transformers' PIL backend with resample 3
        problems.append(f"resample {s['resample']} (only 3, bicubic)")
    if s.get("do_center_crop") or s.get("do_pad"):
        problems.append("a crop or pad after the resize")
    check_pixel_settings(s, vision, problems, where, ("do_resize", "do_rescale", "do_normalize", "do_convert_rgb"))


def _qformer_tokenizer(path: Path, qformer: QFormerConfig, where: str) -> Tokenizer:
    folder = path / QFORMER_TOKENIZER_DIR
    if not (folder / "tokenizer.json").is_file():
        raise CheckpointError(f"{where}: no Q-Former tokenizer ({QFORMER_TOKENIZER_DIR}/tokenizer.json), which "
                              "the instruction-aware Q-Former reads the prompt with")
    tokenizer = Tokenizer.from_dir(folder)
    if len(tokenizer) > qformer.vocab_size:
        raise CheckpointError(f"{where}: the Q-Former tokenizer has {len(tokenizer)} tokens but the Q-Former only "
                              f"{qformer.vocab_size} word embeddings")
    return tokenizer


# --- weights ---------------------------------------------------------------------------------------------
def _projector_name(name: str) -> str | None:
    if name in PROJECTOR_NAMES:
        return PROJECTOR_NAMES[name]
    match = _QFORMER_LAYER.match(name)
    template = f"{match.group(1)}.{{i}}.{name[match.end():]}" if match else None
    return PROJECTOR_LAYER_NAMES[template].format(i=match.group(2)) if template in PROJECTOR_LAYER_NAMES else None


def _split_qkv(state: dict[str, torch.Tensor], prefix: str) -> None:
    """The fused qkv rows are [q; k; v] (its bias too: transformers builds it as [q_bias; 0; v_bias] and
    applies all of it), three projections of ours."""
    for key in [k for k in state if k.startswith(prefix) and ".self_attn.qkv." in k]:
        fused = state.pop(key)
        for name, part in zip(("q_proj", "k_proj", "v_proj"), fused.chunk(3, dim=0)):
            state[key.replace(".qkv.", f".{name}.")] = part.contiguous()


def convert(weights: Weights, where: str, layout: dict[str, str] = LAYOUT,
            projector_name: Callable[[str], str | None] = _projector_name,
            decoder_name: Callable[[str], str | None] = _decoder_name, family: str = "InstructBLIP",
            ) -> dict[str, torch.Tensor]:
    """Every checkpoint tensor under our name (the BLIP tower, the connector by `projector_name`, the decoder
    by `decoder_name`); unknown ones are a CheckpointError listing them."""
    def unused_or(table: Callable[[str], str | None]) -> Callable[[str], str | None]:
        return lambda name: "" if name in UNUSED else table(name)

    tables = {"vision": unused_or(lambda name: _lookup(name, VISION_NAMES, VISION_LAYER_NAMES)),
              "projector": unused_or(projector_name), "decoder": unused_or(decoder_name),
              "head": unused_or(HEAD_NAMES.get)}
    state = rename_weights(weights, layout, tables, OUR_PREFIX, where, family, DROPPED)
    for ours, reshape in VISION_RESHAPE.items():
        if OUR_PREFIX["vision"] + ours in state:
            state[OUR_PREFIX["vision"] + ours] = reshape(state[OUR_PREFIX["vision"] + ours])
    _split_qkv(state, OUR_PREFIX["vision"])
    return state


def their_name(ours: str, layout: dict[str, str] = LAYOUT) -> str:
    """Our name → the checkpoint's (for error messages)."""
    for part, prefix in OUR_PREFIX.items():
        if ours.startswith(prefix):
            rel = ours[len(prefix):]
            if part == "vision":
                rel = re.sub(r"self_attn\.[qkv]_proj\.", "self_attn.qkv.", rel).replace("out_proj", "projection")
                rel = {v: k for k, v in VISION_NAMES.items()}.get(rel, rel)
            return layout[part] + rel
    return ours


# --- the family ----------------------------------------------------------------------------------------
def omni_config(path: Path, decoder: DecoderConfig, vision: VisionConfig, qformer: QFormerConfig,
                where: str) -> tuple[OmniConfig, dict[str, Any]]:
    """The whole OmniConfig (the processor's layout: query tokens first) and the processor's settings."""
    image_settings, processor = _processor_files(path)
    check_image_processor(image_settings, vision, where)
    said = processor.get("num_query_tokens")
    if said is not None and said != qformer.num_query_tokens:
        raise CheckpointError(f"{where}: the processor writes num_query_tokens {said} image tokens per image but "
                              f"config.json's Q-Former has {qformer.num_query_tokens} queries")
    config = OmniConfig(
        decoder=decoder, vision=vision, audio=None,
        vision_projector=ProjectorConfig(kind="qformer", downsample_ratio=1.0, qformer=qformer),
        image_start_token="", image_end_token="", image_context_token=_image_token(path, processor),
        min_tiles=1, max_tiles=1, use_thumbnail=False, number_images=False, image_wrap=False,
        images_in_template=False, image_prompt="prefix", image_resize="tiles")
    try:
        config.validate()
    except ConfigError as e:
        raise CheckpointError(f"{where}: the config does not fit tinyomni: {e}") from None
    return config, processor


def tie(config: OmniConfig, state: dict[str, torch.Tensor], raw: dict[str, Any], text: dict[str, Any]) -> None:
    """Tied when the checkpoint has no head and its config allows it (transformers uses a head it finds)."""
    says_tied = bool(raw.get("tie_word_embeddings")) or bool(text.get("tie_word_embeddings"))
    config.decoder.tie_word_embeddings = says_tied and OUR_PREFIX["head"] + "weight" not in state


def read_config(path: Path, defaults: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """config.json as written (`raw`) and with `defaults` for what it leaves out (`hf`), for InstructBLIP
    and BLIP-2 alike: both need the image_token_index that query-token placeholders are written with."""
    raw = read_hf_config(path)
    if "image_token_id" in raw and "image_token_index" not in raw:  # the configs' attribute_map
        raw["image_token_index"] = raw["image_token_id"]
    hf = {**defaults, **{k: v for k, v in raw.items() if v is not None}}
    if hf["image_token_index"] is None:
        raise CheckpointError(f"{path}: config.json has no image_token_index: a checkpoint from before "
                              "transformers wrote query-token placeholders into the prompt is not supported")
    return raw, hf


def read_instructblip(path: str | Path) -> Imported:
    """Read a transformers-native InstructBLIP directory (`InstructBlipForConditionalGeneration`)."""
    path = Path(path)
    where = str(path)
    raw, hf = read_config(path, INSTRUCTBLIP_DEFAULTS)
    vision = vision_config(hf, where)
    qformer = qformer_config(hf, vision, where)
    decoder, text = _text_config(hf, where)
    config, processor = omni_config(path, decoder, vision, qformer, where)
    state = convert(Weights(path), where)
    tie(config, state, raw, text)
    _check_complete(config, state, their_name, where)

    tokenizer = _tokenizer(path, config, int(hf["image_token_index"]), where)
    attach_instruction_tokenizer(tokenizer, _qformer_tokenizer(path, qformer, where))
    return Imported(config, state, tokenizer, read_chat_template(path) or PLAIN_TEMPLATE)
