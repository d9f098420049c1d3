"""Export a model as a transformers-native InternVL directory (`InternVLForConditionalGeneration`), which
`transformers` loads with `AutoModelForImageTextToText` and `InternVLProcessor` and runs unchanged.

The inverse of `checkpoints/internvl.py`'s -hf reader: the same name tables read the other way
(`internvl.hf_name`), the two embedding tensors reshaped back, and the files transformers reads:

    config.json               InternVLConfig: vision_config (InternViT), text_config (Qwen2 or Llama), ...
    model.safetensors         the weights under the -hf names (the spelling save_pretrained writes)
    tokenizer.json            our tokenizer, its post-processor adding BOS exactly when we do
    tokenizer_config.json     special tokens and the image token names InternVLProcessor reads
    chat_template.jinja       the model's template, wrapped so that transformers' image parts become
                              the text tinyomni builds (see `wrap_template`)
    preprocessor_config.json  GotOcr2 image processor: our tile size, tile limits, mean and std
    processor_config.json     InternVLProcessor, image_seq_length = our tokens per tile
    generation_config.json    eos / pad ids, the media tokens suppressed, the sampling defaults

Nothing is ever approximated. What InternVL cannot hold is refused with an error naming the field
(`internvl_problems`): a convolutional stem (the reference model's), a tower without a CLS token
(InternViT always has one, and every patch attends to it), a CLIP-style pre-norm, ... What InternVL has
no place for is left out with a printed note (`export_notes`): the audio tower; video (the exported
template refuses video and audio parts). `text_only=True` writes the text decoder alone, as a
`LlamaForCausalLM` / `Qwen2ForCausalLM` directory, for any model:

    tinyomni export MODEL --to hf --out DIR [--text-only] [--outtype f32|f16|bf16]

Written for transformers 5 (rope_parameters, dtype); transformers is never imported here.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from tinyomni.checkpoints import internvl, native
from tinyomni.config import DecoderConfig, OmniConfig
from tinyomni.errors import InputError
from tinyomni.model import lora
from tinyomni.processing.tokenizer import Tokenizer

if TYPE_CHECKING:
    from tinyomni.api import Model

WEIGHT_TYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
# transformers' InternViT normalises q and k with a fixed eps (InternVLVisionRMSNorm's default).
INTERNVIT_QK_NORM_EPS = 1e-6
Note = Callable[[str], None]
# Fields InternVL holds at one value only: (part of the config, field, the value InternVL needs, why).
FIXED_FIELDS: list[tuple[str, str, Any, str]] = [
    ("vision", "pre_layernorm", False, "InternViT has no norm before its blocks"),
    ("vision", "feature_layers", (), "InternVL's projector reads one hidden state"),
    ("vision", "feature_select", "patches", "InternVL drops the CLS token and keeps every patch"),
    ("vision_projector", "layer_norm", True, "InternVL's projector normalises its input first"),
    ("vision_projector", "kind", "mlp", "InternVL's projector is the two-layer MLP"),
    ("", "image_wrap", True, "InternVLProcessor writes <img> and </img> around each image"),
    ("", "images_in_template", False, "the exported template places each image where its part is"),
    ("", "image_resize", "tiles", "InternVL's image processor tiles"),
    ("", "image_pad_to_square", False, "InternVL's image processor does not pad"),
]


def export_hf(model: Model, out_dir: str | Path, text_only: bool = False, weights_dtype: str | None = None,
              note: Note | None = None) -> Path:
    """Write `model` to `out_dir` as an InternVL-hf directory (or, with `text_only`, its decoder alone as
    a Llama/Qwen2 one), atomically. Refuses, naming the fields, what the format cannot express; each
    part left out is reported through `note` (default: printed to stderr)."""
    note = note or _print_note
    config = model.config
    if weights_dtype is not None and weights_dtype not in WEIGHT_TYPES:
        raise InputError(f"unknown weights dtype {weights_dtype!r}; use one of {', '.join(WEIGHT_TYPES)}")
    problems = decoder_problems(config.decoder)
    if not text_only:
        problems += internvl_problems(config)
    if problems:
        what = "its text decoder" if text_only else "an InternVL model"
        hint = "" if text_only else "; text_only=True (`--text-only`) writes the text decoder alone"
        raise InputError(f"{model.name} cannot be written as {what}: {'; '.join(problems)}{hint}")
    for line in export_notes(config, text_only):
        note(line)
    state = lora.merged_state_dict(model.model)
    cast = None if weights_dtype is None else WEIGHT_TYPES[weights_dtype]
    stored = str(cast or next(iter(state.values())).dtype).replace("torch.", "")
    if text_only:
        files = _text_files(model, stored)
        weights = _text_weights(state, config)
    else:
        files = _internvl_files(model, stored)
        weights = internvl_weights(state, config)

    def write(tmp: Path) -> None:
        native.save_weights(tmp, weights, dtype=cast)
        for name, text in files.items():
            (tmp / name).write_text(text)

    return native.atomic_directory(out_dir, write)


def _print_note(line: str) -> None:
    print(f"note: {line}", file=sys.stderr)


# --- what can be written -------------------------------------------------------------------------------
def decoder_problems(decoder: DecoderConfig) -> list[str]:
    """What of our decoder neither Llama nor Qwen2 in transformers computes the same way."""
    problems = []
    if decoder.kind != "llama":
        problems.append(f"decoder.kind {decoder.kind!r} (Llama / Qwen2 layers only)")
    if decoder.visual_expert:
        problems.append("decoder.visual_expert (CogVLM-style expert weights have no place in a Llama / Qwen2 layer)")
    scaling = decoder.rope_scaling or {}
    kind = scaling.get("rope_type", scaling.get("type", "default"))
    if kind not in ("default", "linear", "llama3"):
        problems.append(f"decoder.rope_scaling type {kind!r} (default, linear and llama3 can be written)")
    return problems


def internvl_problems(config: OmniConfig) -> list[str]:
    """Every field whose value InternVL (transformers' InternViT tower, projector and processor) cannot
    hold, each with why; empty when the model can be written exactly."""
    vision = config.vision
    if vision is None:
        return ["the model has no vision tower (InternVL needs one)"]
    problems = []
    if vision.conv_stem:
        problems.append(f"vision.conv_stem {_shown(vision.conv_stem)} (a convolutional stem with BatchNorm; "
                        "InternViT embeds patches with one strided convolution)")
    if not vision.use_cls_token:
        problems.append("vision.use_cls_token false (InternViT always prepends a CLS token, and every patch "
                        "attends to it, so a tower trained without one would compute something else)")
    if vision.qk_norm and vision.layer_norm_eps != INTERNVIT_QK_NORM_EPS:
        problems.append(f"vision.qk_norm with layer_norm_eps {vision.layer_norm_eps} (transformers' InternViT "
                        f"normalises q and k with eps {INTERNVIT_QK_NORM_EPS})")
    if vision.num_channels != 3:
        problems.append(f"vision.num_channels {vision.num_channels} (the image processor gives RGB)")
    hidden = config.vision_projector.hidden_size
    if hidden not in (None, config.decoder.hidden_size):
        problems.append(f"vision_projector.hidden_size {hidden} (InternVL's projector is as wide as the "
                        f"decoder, {config.decoder.hidden_size})")
    parts = {"vision": vision, "vision_projector": config.vision_projector, "": config}
    for part, field, needed, why in FIXED_FIELDS:
        value = getattr(parts[part], field, needed)  # a field this version lacks has the value needed
        if value != needed:
            problems.append(f"{part + '.' if part else ''}{field} {_shown(value)} ({why})")
    if not config.use_thumbnail and config.max_tiles > 1:
        problems.append("use_thumbnail false with max_tiles > 1 (InternVL's image processor always adds a "
                        "thumbnail to a tiled image)")
    return problems


def export_notes(config: OmniConfig, text_only: bool) -> list[str]:
    """The parts of the model the export leaves out, and the prompt conventions it changes, in words."""
    notes = []
    if text_only and config.vision is not None:
        notes.append("text only: the vision tower and its projector are not written; the image tokens stay in "
                     "the tokenizer (and their embedding rows), and the exported template refuses image parts")
    if config.audio is not None:
        why = "text only" if text_only else "InternVL has no audio input"
        notes.append(f"the audio tower and its projector are not written ({why}); the audio tokens stay in the "
                     "tokenizer (and their embedding rows), and the exported template refuses audio parts")
    if not text_only:
        notes.append("video: the exported template refuses video parts (InternVL's video processor samples and "
                     "prompts frames its own way); pass frames as images")
        if config.number_images:
            notes.append('several images in one conversation: the exported template labels them "Image-1: ", '
                         '... as tinyomni does; tinyomni reading the directory back follows the InternVL-hf '
                         'convention and labels none')
    return notes


# --- weights -------------------------------------------------------------------------------------------
def internvl_weights(state: dict[str, torch.Tensor], config: OmniConfig) -> dict[str, torch.Tensor]:
    """Our tensors under the -hf names; the audio parts and a tied head left out, layer scales of ones
    written for a tower without them (InternViT always multiplies by its lambdas)."""
    vision = internvl.OUR_PREFIX["vision"]
    out: dict[str, torch.Tensor] = {}
    unknown = []
    for ours, tensor in state.items():
        if ours.startswith(("audio_tower.", "audio_projector.")):
            continue
        if config.decoder.tie_word_embeddings and ours == internvl.OUR_PREFIX["head"] + "weight":
            continue
        theirs = internvl.hf_name(ours)
        if theirs is None:
            unknown.append(ours)
            continue
        reshape = internvl.HF_VISION_EXPORT_SHAPES.get(ours[len(vision):]) if ours.startswith(vision) else None
        out[theirs] = reshape(tensor) if reshape else tensor
    if unknown:  # a tensor the tables do not know would be lost: never write a different model
        raise InputError(f"no InternVL name for tensor(s) {', '.join(unknown[:8])}")
    assert config.vision is not None
    if config.vision.layer_scale_init is None:
        width = config.vision.hidden_size
        for i in range(config.vision.num_hidden_layers):
            for k in ("ls1", "ls2"):
                name = internvl.hf_name(f"{vision}encoder.layers.{i}.{k}")
                assert name is not None
                out[name] = torch.ones(width, dtype=state[f"{vision}embeddings.patch_embedding.weight"].dtype)
    return out


def _text_weights(state: dict[str, torch.Tensor], config: OmniConfig) -> dict[str, torch.Tensor]:
    """The decoder's tensors under LlamaForCausalLM's names (ours, without the `language_model.` prefix)."""
    out = {k[len("language_model."):]: v for k, v in state.items() if k.startswith("language_model.")}
    if config.decoder.tie_word_embeddings:
        out.pop("lm_head.weight", None)
    return out


# --- config.json ---------------------------------------------------------------------------------------
def text_config(decoder: DecoderConfig, tokenizer: Tokenizer | None = None) -> dict[str, Any]:
    """transformers' Qwen2Config (q/k/v biases) or LlamaConfig (none) for our decoder, as a dict; the
    special token ids are the tokenizer's when one is given (the ones generation_config.json names)."""
    scaling = dict(decoder.rope_scaling or {})
    kind = scaling.pop("rope_type", scaling.pop("type", "default"))
    rope = {"rope_type": kind, "rope_theta": decoder.rope_theta, **scaling}
    common: dict[str, Any] = dict(
        vocab_size=decoder.vocab_size, hidden_size=decoder.hidden_size, intermediate_size=decoder.intermediate_size,
        num_hidden_layers=decoder.num_hidden_layers, num_attention_heads=decoder.num_attention_heads,
        num_key_value_heads=decoder.num_key_value_heads, head_dim=decoder.attn_head_dim,
        hidden_act="silu",  # what our MLP computes, whatever the field says
        max_position_embeddings=decoder.max_position_embeddings, rms_norm_eps=decoder.rms_norm_eps,
        rope_parameters=rope, tie_word_embeddings=decoder.tie_word_embeddings,
        bos_token_id=decoder.bos_token_id, eos_token_id=decoder.eos_token_id, pad_token_id=decoder.pad_token_id,
        attention_dropout=0.0, initializer_range=0.02, use_cache=True)
    if tokenizer is not None:
        eos = tokenizer.eos_token_ids
        common.update(bos_token_id=tokenizer.bos_token_id, eos_token_id=eos[0] if len(eos) == 1 else list(eos),
                      pad_token_id=tokenizer.pad_token_id)
    if decoder.attention_bias:  # Qwen2: biases on q, k and v only, as ours
        return {"model_type": "qwen2", **common, "use_sliding_window": False, "sliding_window": None,
                "max_window_layers": decoder.num_hidden_layers}
    return {"model_type": "llama", **common, "attention_bias": False, "mlp_bias": False, "pretraining_tp": 1}


def internvl_config(config: OmniConfig, tokenizer: Tokenizer, image_token_id: int, stored: str) -> dict[str, Any]:
    """config.json of an InternVLForConditionalGeneration holding our model."""
    vision = config.vision
    assert vision is not None
    return {
        "architectures": ["InternVLForConditionalGeneration"],
        "model_type": "internvl",
        "vision_config": {
            "model_type": "internvl_vision", "hidden_size": vision.hidden_size,
            "intermediate_size": vision.intermediate_size, "num_hidden_layers": vision.num_hidden_layers,
            "num_attention_heads": vision.num_attention_heads, "num_channels": vision.num_channels,
            "image_size": [vision.image_size, vision.image_size], "patch_size": [vision.patch_size, vision.patch_size],
            "hidden_act": vision.hidden_act, "layer_norm_eps": vision.layer_norm_eps, "norm_type": vision.norm_type,
            "attention_bias": vision.qkv_bias, "use_qk_norm": vision.qk_norm,
            "use_mean_pooling": not vision.post_layernorm,  # mean pooling ⇔ no final norm in transformers
            # Only initialises lambda_1/2, which are written (ones for a tower without layer scale).
            "layer_scale_init_value": 1.0 if vision.layer_scale_init is None else vision.layer_scale_init,
            "use_absolute_position_embeddings": True, "use_mask_token": False, "initializer_range": 0.02,
            "hidden_dropout_prob": 0.0, "attention_dropout": 0.0, "projection_dropout": 0.0,
        },
        "text_config": text_config(config.decoder, tokenizer),
        "downsample_ratio": config.vision_projector.downsample_ratio,
        "projector_hidden_act": config.vision_projector.hidden_act,
        "vision_feature_layer": vision.feature_layer,  # the same hidden_states index (see VisionConfig)
        "vision_feature_select_strategy": "default",  # drop the CLS token, as we do
        "image_token_id": image_token_id,
        "image_seq_length": config.image_tokens_per_tile,
        "tie_word_embeddings": config.decoder.tie_word_embeddings,
        "dtype": stored,
    }


# --- the other files -----------------------------------------------------------------------------------
def _internvl_files(model: Model, stored: str) -> dict[str, str]:
    config = model.config
    vision = config.vision
    assert vision is not None
    processor = model.processor
    image_processor = {
        "image_processor_type": "GotOcr2ImageProcessor",
        # InternVLProcessor tiles whatever this says; with max_patches 1 it only resizes, as we do.
        "crop_to_patches": True, "min_patches": config.min_tiles, "max_patches": config.max_tiles,
        "size": {"height": vision.image_size, "width": vision.image_size},
        "resample": 3,  # bicubic, our tile and thumbnail resize
        "do_resize": True, "do_rescale": True, "rescale_factor": 1 / 255, "do_normalize": True,
        "do_convert_rgb": True, "image_mean": list(vision.image_mean), "image_std": list(vision.image_std),
    }
    return {
        "config.json": _dumps(internvl_config(config, model.tokenizer, processor.image_context_id, stored)),
        **_tokenizer_files(model, image_tokens=True),
        "chat_template.jinja": wrap_template(model.chat_template, config.image_context_token, config.number_images,
                                             _adds_bos(model)),
        "preprocessor_config.json": _dumps(image_processor),
        "processor_config.json": _dumps({"processor_class": "InternVLProcessor",
                                         "image_seq_length": config.image_tokens_per_tile}),
        "generation_config.json": _dumps(generation_config(model)),
    }


def _text_files(model: Model, stored: str) -> dict[str, str]:
    text = text_config(model.config.decoder, model.tokenizer)
    arch = "Qwen2ForCausalLM" if text["model_type"] == "qwen2" else "LlamaForCausalLM"
    return {
        "config.json": _dumps({"architectures": [arch], **text, "dtype": stored}),
        **_tokenizer_files(model, image_tokens=False),
        "chat_template.jinja": wrap_template(model.chat_template, None, False, _adds_bos(model)),
        "generation_config.json": _dumps(generation_config(model)),
    }


def _tokenizer_files(model: Model, image_tokens: bool) -> dict[str, str]:
    """tokenizer.json and tokenizer_config.json that give transformers our ids for the same text."""
    from tokenizers import Tokenizer as Backend
    from tokenizers import processors

    tokenizer, config = model.tokenizer, model.config
    backend = Backend.from_str(tokenizer.backend.to_str())
    bos = tokenizer.bos_token_id if tokenizer.add_bos_token else None
    prefix = [] if bos is None else [bos]
    probe = "a b"
    if backend.encode(probe).ids != prefix + backend.encode(probe, add_special_tokens=False).ids:
        # transformers encodes with the post-processor; we add BOS by `add_bos_token` alone.
        if bos is None:
            backend.post_processor = processors.TemplateProcessing(single="$A", pair="$A $B", special_tokens=[])
        else:
            name = tokenizer.id_to_token(bos)
            backend.post_processor = processors.TemplateProcessing(
                single=f"{name} $A", pair=f"{name} $A $B", special_tokens=[(name, bos)])
    meta: dict[str, Any] = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "add_bos_token": tokenizer.add_bos_token, "add_eos_token": False,
        "clean_up_tokenization_spaces": False,  # decode as ours does
        "model_max_length": config.decoder.max_position_embeddings,
    }
    for key, token_id in (("bos_token", tokenizer.bos_token_id), ("pad_token", tokenizer.pad_token_id),
                          ("eos_token", tokenizer.eos_token_ids[0] if tokenizer.eos_token_ids else None)):
        if token_id is not None:
            meta[key] = tokenizer.id_to_token(token_id)
    unk = json.loads(backend.to_str())["model"].get("unk_token")
    if unk:
        meta["unk_token"] = unk
    if image_tokens:
        # InternVLProcessor also wants a video token; without a <video> in the vocabulary it names the
        # image context token, which its pattern matches as an image first (video is refused anyway).
        video = "<video>" if tokenizer.token_to_id("<video>") is not None else config.image_context_token
        meta["extra_special_tokens"] = {
            "start_image_token": config.image_start_token, "end_image_token": config.image_end_token,
            "context_image_token": config.image_context_token, "video_token": video}
    return {"tokenizer.json": backend.to_str(pretty=True), "tokenizer_config.json": _dumps(meta)}


def _adds_bos(model: Model) -> bool:
    return model.tokenizer.add_bos_token and model.tokenizer.bos_token_id is not None


def generation_config(model: Model) -> dict[str, Any]:
    """generation_config.json: transformers' generate then stops, suppresses and samples as we do."""
    tokenizer = model.tokenizer
    eos = tokenizer.eos_token_ids
    params = model.sampling_params()  # the model's defaults over tinyomni's
    out: dict[str, Any] = {
        "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": eos[0] if len(eos) == 1 else list(eos),
        "pad_token_id": tokenizer.pad_token_id,
        "suppress_tokens": sorted({i for i in model.suppress_ids if i >= 0}),  # media tokens are inputs only
        "max_new_tokens": params.max_new_tokens,
        "do_sample": params.temperature > 0,
        "repetition_penalty": params.repetition_penalty,
        "max_repeat_tokens": params.max_repeat_tokens,  # tinyomni's loop stop; transformers ignores it
    }
    if params.temperature > 0:
        out.update(temperature=params.temperature, top_p=params.top_p, top_k=params.top_k)  # 0: off in both
    return out


def wrap_template(template: str, image_token: str | None, number_images: bool, bos: bool = False) -> str:
    """The model's chat template, taking transformers' list contents too.

    tinyomni renders every message's content as a string (its media are placed after rendering), so the
    template may know only strings. transformers passes lists of parts; this prefix joins them into the
    string tinyomni would have built: text as it is, each image as `image_token` + newline (which
    InternVLProcessor expands to <img><IMG_CONTEXT>×N</img>), after an "Image-k: " label when the model
    numbers several images; any other part (video, audio; images when `image_token` is None) is refused
    by name. Messages with string contents pass unchanged, so tinyomni reads the same template.

    BOS: tinyomni renders bos_token and eos_token empty and prepends BOS itself when the tokenizer says
    so. With `bos` the prefix writes `bos_token` first (empty for tinyomni), which transformers needs:
    its tokenizer's apply_chat_template never adds special tokens, and its processor adds them only
    when the text does not already start with BOS. Then both names render empty, as in tinyomni.
    """
    image = "false" if image_token is None else "true"
    number = "true" if number_images else "false"
    refusal = json.dumps("this model was exported from tinyomni and takes text" +
                         ("" if image_token is None else " and images") + " only, not a part of type ")
    prefix = "".join([
        "{% set ns = namespace(images=0, k=0, messages=[], text='') %}",
        "{% for m in messages %}{% if m['content'] is not string and m['content'] is not none %}",
        "{% for p in m['content'] %}{% if p['type'] in ('image', 'image_url') %}",
        "{% set ns.images = ns.images + 1 %}{% endif %}{% endfor %}{% endif %}{% endfor %}",
        "{% for m in messages %}{% if m['content'] is string %}{% set ns.messages = ns.messages + [m] %}",
        "{% else %}{% set ns.text = '' %}{% for p in (m['content'] or []) %}",
        "{% if p['type'] == 'text' %}{% set ns.text = ns.text + p['text'] %}",
        f"{{% elif p['type'] in ('image', 'image_url') and {image} %}}{{% set ns.k = ns.k + 1 %}}",
        f"{{% if {number} and ns.images > 1 %}}{{% set ns.text = ns.text + 'Image-' + (ns.k | string) + ': ' %}}",
        "{% endif %}",
        f"{{% set ns.text = ns.text + {json.dumps(image_token or '')} + '\\n' %}}",
        f"{{% else %}}{{{{ raise_exception({refusal} + (p['type'] | string)) }}}}{{% endif %}}{{% endfor %}}",
        "{% set ns.messages = ns.messages + [{'role': m['role'], 'content': ns.text}] %}{% endif %}{% endfor %}",
        "{{ bos_token }}" if bos else "",
        "{% set messages = ns.messages %}{% set bos_token = '' %}{% set eos_token = '' %}",
    ])
    # The newline after the last tag is dropped by trim_blocks (tinyomni's and transformers' setting)
    # and puts the original template at the start of a line, so lstrip_blocks treats it as before.
    return prefix + "\n" + template


def _shown(value: Any) -> str:
    """A config value as config.json spells it (true, [1, 2], "x")."""
    return json.dumps(list(value) if isinstance(value, tuple) else value)


def _dumps(data: dict[str, Any]) -> str:
    return json.dumps(data, indent=2, ensure_ascii=False) + "\n"
