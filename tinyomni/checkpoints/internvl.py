"""InternVL (InternVL2.5, InternVL3) checkpoints → tinyomni, with the family's own processing settings.

Two layouts of the same model:

- the transformers-native "-hf" one (`InternVLForConditionalGeneration`, e.g. OpenGVLab/InternVL3-1B-hf):
  `vision_tower.*` (InternViT in transformers' names), `multi_modal_projector.*`, `language_model.*`
  (a Qwen2 or Llama decoder). transformers writes it in two spellings: `save_pretrained` still
  writes `vision_tower.` / `language_model.model.` / `language_model.lm_head.`, checkpoints converted
  in memory name them `model.vision_tower.` / `model.language_model.` / `lm_head.`; both are read.
- OpenGVLab's original one (`InternVLChatModel`, trust_remote_code): `vision_model.*` with a fused
  `attn.qkv`, `mlp1.{0,1,3}` for the projector, `language_model.*`: a Qwen2 or Llama decoder (our names),
  InternLM2 (InternVL2-2B, Mini-InternVL-Chat-2B-V1-5: checkpoints/hf_internlm2.py, fused `wqkv`, head
  `language_model.output`) or Phi-3 (InternVL2-4B, Mini-InternVL-Chat-4B-V1-5: checkpoints/hf_phi3.py,
  fused `qkv_proj` / `gate_up_proj`, LongRoPE), chosen by `llm_config.architectures` (CHAT_DECODERS).

What is read, from the checkpoint's own files only:
- config.json → OmniConfig: the tower (`vision_config`), `downsample_ratio`, `vision_feature_layer`
  (`select_layer`), `vision_feature_select_strategy`, `projector_hidden_act`, the decoder (`text_config`
  / `llm_config`). Values we cannot run are named in a CheckpointError, never approximated.
- the processor files (`preprocessor_config.json` and `processor_config.json`, or transformers 5's
  single `processor_config.json`) → tile size, min/max tiles, thumbnail, mean/std, tokens per tile;
- `tokenizer_config.json` → the image token names (`<img>`, `</img>`, `<IMG_CONTEXT>`), checked
  against `image_token_id`; `chat_template.jinja` (or `chat_template.json`, or the tokenizer
  config's template) → the chat template.
- the weights, once, through safetensors (one file or the shards of `model.safetensors.index.json`),
  renamed by the tables below; an unknown or missing tensor is named in the error.

InternVL's tiling is the same as ours (processing/image.py: aspect-ratio grid, row-major tiles,
thumbnail when there is more than one tile, bicubic resizes), so no processing of its own is needed.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from tinyomni.checkpoints import hf_internlm2, hf_phi3, hf_vision, native
from tinyomni.checkpoints.families import Imported, read_hf_config
from tinyomni.checkpoints.weights import Weights
from tinyomni.config import ACTIVATIONS, DecoderConfig, OmniConfig, ProjectorConfig, VisionConfig
from tinyomni.errors import CheckpointError, ConfigError
from tinyomni.processing.image import IMAGENET_MEAN, IMAGENET_STD
from tinyomni.processing.tokenizer import Tokenizer

TEXT_MODEL_TYPES = ("qwen2", "llama")

# --- names -------------------------------------------------------------------------------------------
# Our parts: where each lives in an OmniModel.
OUR_PREFIX = {
    "vision": "vision_tower.",
    "projector": "multi_modal_projector.",
    "decoder": "language_model.model.",
    "head": "language_model.lm_head.",
}
# The -hf layout in its two spellings: part → checkpoint prefix.
HF_LAYOUTS = {
    "saved": {"vision": "vision_tower.", "projector": "multi_modal_projector.",
              "decoder": "language_model.model.", "head": "language_model.lm_head."},
    "in-memory": {"vision": "model.vision_tower.", "projector": "model.multi_modal_projector.",
                  "decoder": "model.language_model.", "head": "lm_head."},
}
# The original layout: part → checkpoint prefix.
CHAT_LAYOUT = {"vision": "vision_model.", "projector": "mlp1.", "decoder": "language_model.model.",
               "head": "language_model.lm_head."}


@dataclass(frozen=True)
class ChatDecoder:
    """How the original layout's language model of one architecture is read: its config reader, its body's
    name table (plain, per layer), where its head is, the fused tensors to split, and our names → theirs."""

    config: Callable[[dict[str, Any], str], DecoderConfig]
    names: tuple[dict[str, str], dict[str, str]]
    head_prefix: str = "language_model.lm_head."
    split: Callable[[dict[str, torch.Tensor], DecoderConfig, str], None] | None = None
    their_name: Callable[[str], str | None] = lambda rel: rel


# Inside the projector: theirs → ours (the -hf names are ours; the original is an nn.Sequential).
HF_PROJECTOR_NAMES = {name: name for name in (
    "layer_norm.weight", "layer_norm.bias", "linear_1.weight", "linear_1.bias", "linear_2.weight", "linear_2.bias")}
CHAT_PROJECTOR_NAMES = {
    "0.weight": "layer_norm.weight", "0.bias": "layer_norm.bias",  # mlp1.0: LayerNorm
    "1.weight": "linear_1.weight", "1.bias": "linear_1.bias",  # mlp1.1: Linear (mlp1.2 is the GELU)
    "3.weight": "linear_2.weight", "3.bias": "linear_2.bias",  # mlp1.3: Linear
}
# Inside the decoder body (Qwen2 / Llama names, which are ours); "{i}" is the layer on both sides.
DECODER_NAMES = {name: name for name in ("embed_tokens.weight", "norm.weight")}
DECODER_LAYER_NAMES = {f"layers.{{i}}.{name}": f"layers.{{i}}.{name}" for name in (
    "input_layernorm.weight", "post_attention_layernorm.weight",
    "self_attn.q_proj.weight", "self_attn.q_proj.bias", "self_attn.k_proj.weight", "self_attn.k_proj.bias",
    "self_attn.v_proj.weight", "self_attn.v_proj.bias", "self_attn.o_proj.weight",
    "mlp.gate_proj.weight", "mlp.up_proj.weight", "mlp.down_proj.weight")}
HEAD_NAMES = {"weight": "weight"}
# The original layout's language models, by llm_config.architectures (Qwen2 / Llama names are ours;
# their config reader, _decoder_config, is defined further down, hence the lambdas).
CHAT_DECODERS = {
    "Qwen2ForCausalLM": ChatDecoder(lambda llm, where: _decoder_config(llm, where), (DECODER_NAMES,
                                                                                     DECODER_LAYER_NAMES)),
    "LlamaForCausalLM": ChatDecoder(lambda llm, where: _decoder_config(llm, where), (DECODER_NAMES,
                                                                                     DECODER_LAYER_NAMES)),
    "InternLM2ForCausalLM": ChatDecoder(hf_internlm2.internlm2_decoder_config,
                                        (hf_internlm2.NAMES, hf_internlm2.LAYER_NAMES), "language_model.output.",
                                        hf_internlm2.split_wqkv, hf_internlm2.their_name),
    "Phi3ForCausalLM": ChatDecoder(hf_phi3.phi3_decoder_config, (hf_phi3.NAMES, hf_phi3.LAYER_NAMES),
                                   split=hf_phi3.split_phi3, their_name=hf_phi3.fused_name),
}
# Buffers some exports carry that hold nothing to load (RoPE tables are recomputed).
DROPPED = re.compile(r"(^|\.)rotary_emb\.inv_freq$")

# The original InternViT: theirs → ours (tower-relative); the fused qkv is split in `_split_qkv`.
CHAT_VISION_NAMES = {
    "embeddings.class_embedding": "embeddings.class_embedding",  # [1, 1, D] → [D]
    "embeddings.patch_embedding.weight": "embeddings.patch_embedding.weight",
    "embeddings.patch_embedding.bias": "embeddings.patch_embedding.bias",
    "embeddings.position_embedding": "embeddings.position_embedding.weight",  # [1, N+1, D] → [N+1, D]
}
CHAT_VISION_LAYER_NAMES = {
    "encoder.layers.{i}.norm1.weight": "encoder.layers.{i}.layer_norm1.weight",
    "encoder.layers.{i}.norm1.bias": "encoder.layers.{i}.layer_norm1.bias",
    "encoder.layers.{i}.attn.qkv.weight": "encoder.layers.{i}.self_attn.qkv.weight",  # split below
    "encoder.layers.{i}.attn.qkv.bias": "encoder.layers.{i}.self_attn.qkv.bias",  # split below
    "encoder.layers.{i}.attn.proj.weight": "encoder.layers.{i}.self_attn.out_proj.weight",
    "encoder.layers.{i}.attn.proj.bias": "encoder.layers.{i}.self_attn.out_proj.bias",
    "encoder.layers.{i}.attn.q_norm.weight": "encoder.layers.{i}.self_attn.q_norm.weight",
    "encoder.layers.{i}.attn.k_norm.weight": "encoder.layers.{i}.self_attn.k_norm.weight",
    "encoder.layers.{i}.norm2.weight": "encoder.layers.{i}.layer_norm2.weight",
    "encoder.layers.{i}.norm2.bias": "encoder.layers.{i}.layer_norm2.bias",
    "encoder.layers.{i}.mlp.fc1.weight": "encoder.layers.{i}.mlp.fc1.weight",
    "encoder.layers.{i}.mlp.fc1.bias": "encoder.layers.{i}.mlp.fc1.bias",
    "encoder.layers.{i}.mlp.fc2.weight": "encoder.layers.{i}.mlp.fc2.weight",
    "encoder.layers.{i}.mlp.fc2.bias": "encoder.layers.{i}.mlp.fc2.bias",
    "encoder.layers.{i}.ls1": "encoder.layers.{i}.ls1",
    "encoder.layers.{i}.ls2": "encoder.layers.{i}.ls2",
}
_LAYER = re.compile(r"^((?:encoder\.)?layers)\.(\d+)\.")


def _lookup(name: str, names: dict[str, str], layer_names: dict[str, str]) -> str | None:
    """Our name for `name` by the two tables (plain and per layer), or None."""
    if name in names:
        return names[name]
    match = _LAYER.match(name)
    if match:
        template = f"{match.group(1)}.{{i}}.{name[match.end():]}"
        if template in layer_names:
            return layer_names[template].format(i=match.group(2))
    return None


def _inverse(ours: str, names: dict[str, str], layer_names: dict[str, str]) -> str | None:
    """Their name for our `ours` by the same tables (for error messages)."""
    for theirs, name in names.items():
        if name == ours:
            return theirs
    match = _LAYER.match(ours)
    if match:
        template = f"{match.group(1)}.{{i}}.{ours[match.end():]}"
        for theirs, name in layer_names.items():
            if name == template:
                return theirs.format(i=match.group(2))
    return None


# --- the other way: ours → the -hf layout (for checkpoints/export_hf.py) ------------------------------
# The inverse of hf_vision's InternVL reshapes, by our tower-relative name.
HF_VISION_EXPORT_SHAPES: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "embeddings.class_embedding": lambda t: t.reshape(1, 1, -1),  # [D] → [1, 1, D]
    "embeddings.position_embedding.weight": lambda t: t.unsqueeze(0),  # [N+1, D] → [1, N+1, D]
}


def hf_name(ours: str) -> str | None:
    """The -hf name (the "saved" spelling save_pretrained writes) of our tensor `ours`, by the same
    tables the importer reads; None when no table has it (the exporter refuses such a tensor)."""
    for part, prefix in OUR_PREFIX.items():
        if not ours.startswith(prefix):
            continue
        rel = ours[len(prefix):]
        if part == "vision":
            theirs = hf_vision.hf_name_for(rel, "internvl")
        elif part == "projector":
            theirs = _inverse(rel, HF_PROJECTOR_NAMES, {})
        elif part == "decoder":
            theirs = _inverse(rel, DECODER_NAMES, DECODER_LAYER_NAMES)
        else:
            theirs = _inverse(rel, HEAD_NAMES, {})
        return None if theirs is None else HF_LAYOUTS["saved"][part] + theirs
    return None


# --- weights: checkpoints/weights.py (each tensor its own memory map of the file) ----------------------


def _split_qkv(state: dict[str, torch.Tensor]) -> None:
    """InternViT's fused attn.qkv rows are [q; k; v] (each of width D): three projections of ours."""
    for key in [k for k in state if ".self_attn.qkv." in k]:
        fused = state.pop(key)
        for name, part in zip(("q_proj", "k_proj", "v_proj"), fused.chunk(3, dim=0)):
            state[key.replace(".qkv.", f".{name}.")] = part.contiguous()


def _convert(weights: Weights, layout: dict[str, str], vision_names: Callable[[str], str | None],
             projector_names: dict[str, str], where: str,
             decoder_names: tuple[dict[str, str], dict[str, str]] = (DECODER_NAMES, DECODER_LAYER_NAMES),
             ) -> dict[str, torch.Tensor]:
    """Every checkpoint tensor under our name; unknown ones are a CheckpointError listing them."""
    state: dict[str, torch.Tensor] = {}
    unknown: list[str] = []
    # Longest prefix first, so "language_model.lm_head." is not taken for "language_model.".
    parts = sorted(layout.items(), key=lambda item: -len(item[1]))
    for key in weights.keys():
        part = next((p for p, prefix in parts if key.startswith(prefix)), None)
        if part is None:
            unknown.append(key)
            continue
        name = key[len(layout[part]):]
        if DROPPED.search(name):
            continue
        if part == "vision":
            ours = vision_names(name)
            if ours == "":  # a tower part we do not use (hf_vision's dropped list)
                continue
        elif part == "projector":
            ours = projector_names.get(name)
        elif part == "decoder":
            ours = _lookup(name, *decoder_names)
        else:
            ours = HEAD_NAMES.get(name)
        if ours is None:
            unknown.append(key)
            continue
        state[OUR_PREFIX[part] + ours] = weights.get(key)
    if unknown:
        shown = ", ".join(sorted(unknown)[:8]) + (f" (+{len(unknown) - 8} more)" if len(unknown) > 8 else "")
        raise CheckpointError(f"{where}: unknown InternVL weight(s) {shown}")
    return state


def _hf_vision_name(name: str) -> str | None:
    return hf_vision.tower_name(name, "internvl")


def _chat_vision_name(name: str) -> str | None:
    return _lookup(name, CHAT_VISION_NAMES, CHAT_VISION_LAYER_NAMES)


def _check_complete(config: OmniConfig, state: dict[str, torch.Tensor], their_name: Callable[[str], str],
                    where: str) -> None:
    """Every tensor the model needs is there, with its shape; names the checkpoint's missing ones."""
    from tinyomni.model.omni import OmniModel

    # Shapes only: built without initialising (its tensors are reserved, never written, so never resident),
    # and not on the meta device, where torch.arange (the RoPE tables) and the init ops run torch's
    # Python reference ops, whose first use imports torch._dynamo: seconds of every load.
    with native.no_init():
        expected = {k: v.shape for k, v in OmniModel(config).state_dict().items()}
    tied = config.decoder.tie_word_embeddings
    missing = [k for k in expected if k not in state and not (tied and k == OUR_PREFIX["head"] + "weight")]
    if missing:
        more = f" (+{len(missing) - 8} more)" if len(missing) > 8 else ""
        shown = ", ".join(their_name(k) for k in missing[:8]) + more
        raise CheckpointError(f"{where}: the checkpoint lacks weight(s) {shown}")
    extra = [k for k in state if k not in expected]
    if extra:  # e.g. a q_proj bias for a config that says there is none
        raise CheckpointError(f"{where}: weight(s) {', '.join(their_name(k) for k in extra[:8])} do not fit "
                              "its config.json")
    wrong = [f"{their_name(k)} {tuple(state[k].shape)} (config says {tuple(expected[k])})"
             for k in expected if k in state and state[k].shape != expected[k]]
    if wrong:
        raise CheckpointError(f"{where}: weight(s) of the wrong shape: {', '.join(wrong[:8])}")


def _their_namer(layout: dict[str, str], vision_inverse: Callable[[str], str | None],
                 projector_names: dict[str, str],
                 decoder_inverse: Callable[[str], str | None] = lambda rel: rel) -> Callable[[str], str]:
    projector_inverse = {ours: theirs for theirs, ours in projector_names.items()}

    def name(ours: str) -> str:
        for part, prefix in OUR_PREFIX.items():
            if ours.startswith(prefix):
                rel = ours[len(prefix):]
                if part == "vision":
                    theirs = vision_inverse(rel)
                elif part == "projector":
                    theirs = projector_inverse.get(rel)
                elif part == "decoder":
                    theirs = decoder_inverse(rel)
                else:
                    theirs = rel
                return layout[part] + (theirs or rel)
        return ours

    return name


# --- config --------------------------------------------------------------------------------------------
def _json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{path} is unreadable: {e}") from None
    return data if isinstance(data, dict) else {}


def _decoder_config(text: dict[str, Any], where: str) -> DecoderConfig:
    """text_config / llm_config → DecoderConfig, refusing what our decoder does not compute."""
    model_type = text.get("model_type")
    if model_type not in TEXT_MODEL_TYPES:
        arch = (text.get("architectures") or [model_type])[0]
        raise CheckpointError(f"{where}: InternVL with a {arch!r} language model is not supported "
                              f"(supported: {', '.join(TEXT_MODEL_TYPES)})")
    return decoder_config(text, where)


def check_pixel_settings(settings: dict[str, Any], vision: VisionConfig, problems: list[str], where: str,
                         flags: tuple[str, ...]) -> None:
    """The checks every family's image processor shares (the `flags` on, rescale by 1/255, a 3-value
    mean/std); raise with `problems` and these found, else put mean/std into `vision`."""
    for flag in flags:
        if settings[flag] is not True:
            problems.append(f"{flag} {settings[flag]}")
    if abs(float(settings["rescale_factor"]) - 1 / 255) > 1e-12:
        problems.append(f"rescale_factor {settings['rescale_factor']} (only 1/255)")
    mean, std = settings["image_mean"], settings["image_std"]
    if not (isinstance(mean, list | tuple) and isinstance(std, list | tuple) and len(mean) == len(std) == 3):
        problems.append(f"image_mean {mean} / image_std {std} (3 values each)")
    if problems:
        raise CheckpointError(f"{where}: unsupported image processor setting(s): {'; '.join(problems)}")
    vision.image_mean = tuple(float(m) for m in mean)  # type: ignore[assignment]
    vision.image_std = tuple(float(v) for v in std)  # type: ignore[assignment]


def decoder_config(text: dict[str, Any], where: str) -> DecoderConfig:
    """A Llama / Qwen2 text config (model_type already checked) → DecoderConfig, refusing by name what
    our decoder does not compute. Every family with such a decoder (InternVL, LLaVA, SmolVLM) uses it."""
    model_type = text.get("model_type")
    problems = []
    if text.get("hidden_act", "silu") != "silu":
        problems.append(f"hidden_act {text['hidden_act']!r} (only silu)")
    if text.get("mlp_bias"):
        problems.append("mlp_bias true")
    if model_type == "llama" and text.get("attention_bias"):
        problems.append("attention_bias true for Llama (its o_proj bias)")
    if text.get("use_sliding_window"):
        problems.append("use_sliding_window true")
    if problems:
        raise CheckpointError(f"{where}: unsupported text_config value(s): {'; '.join(problems)}")
    # Imported here: hf_llama imports checkpoints/aria.py, which imports this module.
    from tinyomni.checkpoints.hf_llama import decoder_config_from_hf

    try:
        config = decoder_config_from_hf(text)
        config.validate()
    except ConfigError as e:
        raise CheckpointError(f"{where}: text_config does not fit tinyomni: {e}") from None
    return config


def _image_processor_settings(path: Path) -> dict[str, Any]:
    """The image processor's settings: transformers 5 nests them in processor_config.json, older
    exports keep them in preprocessor_config.json."""
    nested = _json(path / "processor_config.json").get("image_processor")
    if isinstance(nested, dict):
        return nested
    return _json(path / "preprocessor_config.json")


# What transformers' GotOcr2 image processor assumes for a key its saved config leaves out (its class
# defaults), and what InternVL itself uses when a checkpoint has no processor file at all.
GOT_OCR2_DEFAULTS: dict[str, Any] = dict(
    size={"height": 384, "width": 384}, resample=3, do_resize=True, do_rescale=True, rescale_factor=1 / 255,
    do_normalize=True, do_convert_rgb=True, image_mean=[0.48145466, 0.4578275, 0.40821073],
    image_std=[0.26862954, 0.26130258, 0.27577711], min_patches=1, max_patches=12)
INTERNVL_DEFAULTS: dict[str, Any] = dict(GOT_OCR2_DEFAULTS, image_mean=list(IMAGENET_MEAN),
                                         image_std=list(IMAGENET_STD))


def _processing_fields(path: Path, vision: VisionConfig, where: str) -> dict[str, Any]:
    """OmniConfig's tiling fields and the vision mean/std from the processor files."""
    found = _image_processor_settings(path)
    defaults = GOT_OCR2_DEFAULTS if found else {**INTERNVL_DEFAULTS,
                                                "size": {"height": vision.image_size, "width": vision.image_size}}
    settings = {**defaults, **{k: v for k, v in found.items() if v is not None}}
    problems = []
    size = settings["size"]
    if isinstance(size, int):
        size = {"height": size, "width": size}
    if not isinstance(size, dict) or not size.get("height") == size.get("width") == vision.image_size:
        problems.append(f"size {size} (tiles must be square and {vision.image_size} px, the tower's image_size)")
    # Our tiles are resized with Pillow's bicubic filter, as transformers' PIL backend does (resample 3).
    if settings["resample"] != 3:
        problems.append(f"resample {settings['resample']} (only 3, bicubic)")
    check_pixel_settings(settings, vision, problems, where,
                         ("do_resize", "do_rescale", "do_normalize", "do_convert_rgb"))
    # InternVLProcessor passes crop_to_patches=True to its image processor by default, whatever the
    # image processor's own config says (measured with transformers 5.24: a preprocessor_config.json
    # with "crop_to_patches": false still gives tiles + thumbnail), so tiles are always on.
    min_tiles, max_tiles = int(settings["min_patches"]), int(settings["max_patches"])
    if not 1 <= min_tiles <= max_tiles:
        raise CheckpointError(f"{where}: min_patches {min_tiles} / max_patches {max_tiles} are inconsistent")
    return {"min_tiles": min_tiles, "max_tiles": max_tiles, "use_thumbnail": True, "number_images": False}


def _token_names(path: Path) -> dict[str, str]:
    """The image token names InternVL's tokenizer config declares (transformers' defaults otherwise)."""
    meta = _json(path / "tokenizer_config.json")
    extra = meta.get("extra_special_tokens")
    extra = extra if isinstance(extra, dict) else {}

    def name(key: str, default: str) -> str:
        value = meta.get(key, extra.get(key, default))
        if isinstance(value, dict):  # an AddedToken written out
            value = value.get("content", default)
        return str(value)

    return {"image_start_token": name("start_image_token", "<img>"),
            "image_end_token": name("end_image_token", "</img>"),
            "image_context_token": name("context_image_token", "<IMG_CONTEXT>")}


def read_chat_template(path: Path) -> str | None:
    """The checkpoint's chat template: chat_template.jinja, chat_template.json, or tokenizer_config.json's."""
    jinja = path / "chat_template.jinja"
    if jinja.is_file():
        return jinja.read_text()
    for file in (path / "chat_template.json", path / "processor_config.json", path / "tokenizer_config.json"):
        template = _json(file).get("chat_template")
        if isinstance(template, str):
            return template
    return None


def _finish(path: Path, config: OmniConfig, image_token_id: int | None,
            tokens_per_tile: int | None, where: str) -> tuple[Tokenizer, str | None]:
    """Tokenizer and template, checked against the config: token ids, vocabulary, tokens per tile."""
    tokenizer = Tokenizer.from_dir(path)
    if not tokenizer.add_bos_token and tokenizer.bos_token_id is not None:
        # Llama-style tokenizers may say "prepend BOS" only in tokenizer.json's post-processor, which
        # InternVLProcessor applies; ask the backend itself whether it does.
        tokenizer.add_bos_token = tokenizer.backend.encode("", add_special_tokens=True).ids[:1] == [
            tokenizer.bos_token_id]
    context_id = tokenizer.token_to_id(config.image_context_token)
    absent = [t for t in (config.image_start_token, config.image_end_token, config.image_context_token)
              if tokenizer.token_to_id(t) is None]
    if absent:
        raise CheckpointError(f"{where}: the tokenizer lacks the image token(s) {', '.join(absent)}")
    if image_token_id is not None and context_id != image_token_id:
        raise CheckpointError(f"{where}: config.json says image_token_id {image_token_id} but the tokenizer "
                              f"has {config.image_context_token} at {context_id}")
    if len(tokenizer) > config.decoder.vocab_size:
        raise CheckpointError(f"{where}: the tokenizer has {len(tokenizer)} tokens but the decoder only "
                              f"{config.decoder.vocab_size} embeddings")
    if tokens_per_tile is not None and tokens_per_tile != config.image_tokens_per_tile:
        raise CheckpointError(f"{where}: image_seq_length {tokens_per_tile} does not match the tower "
                              f"({config.image_tokens_per_tile} tokens per tile after pixel shuffle)")
    return tokenizer, read_chat_template(path)


def _omni_config(path: Path, vision: VisionConfig, decoder: DecoderConfig, downsample_ratio: float,
                 feature_layer: Any, projector_act: str, where: str) -> OmniConfig:
    if not isinstance(feature_layer, int) or isinstance(feature_layer, bool):
        raise CheckpointError(f"{where}: vision_feature_layer {feature_layer!r} is not supported (one layer index)")
    if projector_act not in ACTIVATIONS:
        raise CheckpointError(f"{where}: projector_hidden_act {projector_act!r} is not supported "
                              f"({', '.join(sorted(ACTIVATIONS))})")
    vision.feature_layer = feature_layer
    config = OmniConfig(
        decoder=decoder, vision=vision, audio=None,
        vision_projector=ProjectorConfig(downsample_ratio=float(downsample_ratio), hidden_act=projector_act),
        **_token_names(path), **_processing_fields(path, vision, where),
    )
    try:
        config.validate()
    except ConfigError as e:
        raise CheckpointError(f"{where}: the config does not fit tinyomni: {e}") from None
    return config


def _tie(config: OmniConfig, state: dict[str, torch.Tensor], says_tied: bool) -> None:
    """Tied when the checkpoint has no head and its config allows it (as transformers loads it: a head
    present in the file is used even when the config says tied)."""
    has_head = OUR_PREFIX["head"] + "weight" in state
    config.decoder.tie_word_embeddings = says_tied and not has_head


# --- the two layouts ---------------------------------------------------------------------------------
def read_internvl_hf(path: str | Path) -> Imported:
    """Read a transformers-native InternVL directory (`InternVLForConditionalGeneration`)."""
    path = Path(path)
    where = str(path)
    hf = read_hf_config(path)
    strategy = hf.get("vision_feature_select_strategy", "default")
    if strategy != "default":
        raise CheckpointError(f"{where}: vision_feature_select_strategy {strategy!r} is not supported "
                              "(only 'default', which drops the CLS token)")
    try:
        vision = hf_vision.vision_config_from_hf({**hf, "vision_config": {"model_type": "internvl_vision",
                                                                           **(hf.get("vision_config") or {})}})
    except CheckpointError as e:
        raise CheckpointError(f"{where}: {e}") from None
    text = dict(hf.get("text_config") or {})
    text.setdefault("model_type", "qwen2")  # InternVLConfig's default text config
    decoder = _decoder_config(text, where)
    config = _omni_config(path, vision, decoder, hf.get("downsample_ratio", 0.5), hf.get("vision_feature_layer", -1),
                          hf.get("projector_hidden_act", "gelu"), where)

    weights = Weights(path)
    keys = weights.keys()
    in_memory = any(k.startswith(("model.language_model.", "model.vision_tower.")) for k in keys)
    layout = HF_LAYOUTS["in-memory" if in_memory else "saved"]
    state = _convert(weights, layout, _hf_vision_name, HF_PROJECTOR_NAMES, where)
    reshape = hf_vision.MAPPINGS["internvl"].reshape
    for ours, fn in reshape.items():
        if OUR_PREFIX["vision"] + ours in state:
            state[OUR_PREFIX["vision"] + ours] = fn(state[OUR_PREFIX["vision"] + ours])
    # InternVLForConditionalGeneration ties by its top-level flag (transformers 5); older exports by text_config's.
    _tie(config, state, bool(hf.get("tie_word_embeddings", text.get("tie_word_embeddings", True))))
    _check_complete(config, state, _their_namer(
        layout, lambda rel: hf_vision.hf_name_for(rel, "internvl"), HF_PROJECTOR_NAMES), where)

    seq = _json(path / "processor_config.json").get("image_seq_length", hf.get("image_seq_length"))
    tokenizer, template = _finish(path, config, hf.get("image_token_id"), seq, where)
    return Imported(config, state, tokenizer, template)


def read_internvl_chat(path: str | Path) -> Imported:
    """Read OpenGVLab's original InternVL directory (`InternVLChatModel`; a Qwen2, Llama, InternLM2 or
    Phi-3 decoder, CHAT_DECODERS)."""
    path = Path(path)
    where = str(path)
    hf = read_hf_config(path)
    ps_version = hf.get("ps_version", "v2")
    if ps_version != "v2":
        raise CheckpointError(f"{where}: ps_version {ps_version!r} is not supported (only 'v2' pixel shuffle)")
    raw_vision = dict(hf.get("vision_config") or {})
    # The original config's names → transformers' InternVLVisionConfig names (as transformers converts them).
    renames = {"qkv_bias": "attention_bias", "qk_normalization": "use_qk_norm"}
    vision_section = {renames.get(k, k): v for k, v in raw_vision.items()}
    vision_section.update(model_type="internvl_vision", use_absolute_position_embeddings=True,
                          use_mean_pooling=True)  # the original InternViT has no final norm
    if "force_image_size" in hf and hf["force_image_size"] not in (None, vision_section.get("image_size")):
        raise CheckpointError(f"{where}: force_image_size {hf['force_image_size']} differs from the tower's "
                              f"image_size {vision_section.get('image_size')}; not supported")
    try:
        vision = hf_vision.vision_config_from_hf({"model_type": "internvl", "vision_config": vision_section})
    except CheckpointError as e:
        raise CheckpointError(f"{where}: {e}") from None
    llm = dict(hf.get("llm_config") or {})
    arch = (llm.get("architectures") or [None])[0]
    if arch not in CHAT_DECODERS:
        raise CheckpointError(f"{where}: InternVL with a {arch!r} language model is not supported "
                              f"(supported: {', '.join(CHAT_DECODERS)})")
    reader = CHAT_DECODERS[arch]
    decoder = reader.config(llm, where)
    config = _omni_config(path, vision, decoder, hf.get("downsample_ratio", 0.5), hf.get("select_layer", -1),
                          "gelu", where)  # mlp1's activation is nn.GELU()
    if "max_dynamic_patch" in hf or "min_dynamic_patch" in hf:
        config.min_tiles = int(hf.get("min_dynamic_patch", config.min_tiles))
        config.max_tiles = int(hf.get("max_dynamic_patch", config.max_tiles))
    if "use_thumbnail" in hf:
        config.use_thumbnail = bool(hf["use_thumbnail"])
    if hf.get("dynamic_image_size") is False:
        config.min_tiles = config.max_tiles = 1
    config.number_images = True  # the original model card's multi-image prompts: "Image-1: <image>\n..."

    weights = Weights(path)
    layout = {**CHAT_LAYOUT, "head": reader.head_prefix}
    state = _convert(weights, layout, _chat_vision_name, CHAT_PROJECTOR_NAMES, where, reader.names)
    _split_qkv(state)
    if reader.split is not None:  # the decoder's fused projections → ours
        reader.split(state, decoder, where)
    for name in ("embeddings.class_embedding", "embeddings.position_embedding.weight"):
        key = OUR_PREFIX["vision"] + name
        if key in state:
            state[key] = state[key].reshape(-1) if "class" in name else state[key].reshape(-1, state[key].shape[-1])
    _tie(config, state, bool(llm.get("tie_word_embeddings", False)))

    def vision_inverse(rel: str) -> str | None:
        fused = re.sub(r"self_attn\.[qkv]_proj\.", "self_attn.qkv.", rel)
        return _inverse(fused, CHAT_VISION_NAMES, CHAT_VISION_LAYER_NAMES)

    _check_complete(config, state, _their_namer(layout, vision_inverse, CHAT_PROJECTOR_NAMES,
                                                reader.their_name), where)
    tokenizer, template = _finish(path, config, hf.get("img_context_token_id"), None, where)
    return Imported(config, state, tokenizer, template)
