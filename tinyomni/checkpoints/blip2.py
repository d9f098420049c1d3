"""BLIP-2 checkpoints (transformers' `Blip2ForConditionalGeneration` with an OPT decoder, e.g.
Salesforce/blip2-opt-2.7b) → tinyomni.

The same BLIP ViT, image processing and prompt layout as InstructBLIP (tinyomni/checkpoints/instructblip.py:
one square tile per image, `num_query_tokens` image tokens before BOS), with BLIP-2's queries-only Q-Former
(`qformer.layernorm` over the queries, no text inputs: `QFormerConfig.instruction_aware = False`) and an
OPT decoder (`DecoderConfig.kind = "opt"`, tinyomni/model/opt.py).

What is read: config.json (`vision_config`, `qformer_config`, `text_config`, `num_query_tokens`,
`image_token_index`; what it leaves out is what transformers' Blip2*Config / OPTConfig assume), the image
processor settings, `tokenizer.json` + `tokenizer_config.json` and a chat template if any, and the weights:
`vision_model.*`, `query_tokens`, `qformer.*`, `language_projection.*`, `language_model.model.decoder.*`
(ours without `decoder.`), `language_model.lm_head.*` (absent when tied).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from tinyomni.checkpoints import instructblip
from tinyomni.checkpoints.families import Imported
from tinyomni.checkpoints.internvl import Weights, _check_complete, _lookup, read_chat_template
from tinyomni.checkpoints.llava import _tokenizer
from tinyomni.config import ACTIVATIONS, DecoderConfig
from tinyomni.errors import CheckpointError, ConfigError
from tinyomni.processing.instructblip import PLAIN_TEMPLATE

LAYOUT = {**instructblip.LAYOUT, "decoder": "language_model.model.decoder."}
# The queries-only Q-Former: InstructBLIP's names without the text's embeddings and feed-forward blocks.
PROJECTOR_NAMES = {name: name for name in (
    "query_tokens", "language_projection.weight", "language_projection.bias",
    "qformer.layernorm.weight", "qformer.layernorm.bias")}
PROJECTOR_LAYER_NAMES = {k: v for k, v in instructblip.PROJECTOR_LAYER_NAMES.items()
                         if not k.split("{i}.")[1].startswith(("intermediate.", "output."))}
# The OPT body: theirs (under model.decoder.) → ours (under model.).
DECODER_NAMES = {name: name for name in (
    "embed_tokens.weight", "embed_positions.weight", "final_layer_norm.weight", "final_layer_norm.bias")}
DECODER_LAYER_NAMES = {f"layers.{{i}}.{name}": f"layers.{{i}}.{name}" for name in (
    *(f"self_attn.{p}.{w}" for p in ("q_proj", "k_proj", "v_proj", "out_proj") for w in ("weight", "bias")),
    *(f"{p}.{w}" for p in ("self_attn_layer_norm", "fc1", "fc2", "final_layer_norm") for w in ("weight", "bias")))}
_QFORMER_LAYER = re.compile(r"^(qformer\.encoder\.layer)\.(\d+)\.")

BLIP2_DEFAULTS: dict[str, Any] = dict(num_query_tokens=32, image_token_index=None)
OPT_DEFAULTS: dict[str, Any] = dict(  # OPTConfig (5.24)
    vocab_size=50272, hidden_size=768, num_hidden_layers=12, ffn_dim=3072, max_position_embeddings=2048,
    do_layer_norm_before=True, _remove_final_layer_norm=False, word_embed_proj_dim=None, num_attention_heads=12,
    activation_function="relu", enable_bias=True, layer_norm_elementwise_affine=True, tie_word_embeddings=True,
    bos_token_id=2, eos_token_id=2, pad_token_id=1)


def _projector_name(name: str) -> str | None:
    if name in PROJECTOR_NAMES:
        return PROJECTOR_NAMES[name]
    match = _QFORMER_LAYER.match(name)
    template = f"{match.group(1)}.{{i}}.{name[match.end():]}" if match else None
    return PROJECTOR_LAYER_NAMES[template].format(i=match.group(2)) if template in PROJECTOR_LAYER_NAMES else None


def _decoder_name(name: str) -> str | None:
    return _lookup(name, DECODER_NAMES, DECODER_LAYER_NAMES)


def opt_decoder_config(text: dict[str, Any], where: str) -> DecoderConfig:
    """An OPT text_config → DecoderConfig (kind "opt"), refusing by name what OPTDecoder does not compute."""
    c = {**OPT_DEFAULTS, **{k: v for k, v in text.items() if v is not None}}
    problems = []
    if not c["do_layer_norm_before"]:
        problems.append("do_layer_norm_before false (OPT-350m's post-norm layers)")
    if c["_remove_final_layer_norm"]:
        problems.append("_remove_final_layer_norm true")
    if c["word_embed_proj_dim"] not in (None, c["hidden_size"]):
        problems.append(f"word_embed_proj_dim {c['word_embed_proj_dim']} (project_in / project_out; only "
                        f"hidden_size {c['hidden_size']})")
    if not c["enable_bias"]:
        problems.append("enable_bias false")
    if not c["layer_norm_elementwise_affine"]:
        problems.append("layer_norm_elementwise_affine false")
    if c["activation_function"] not in ACTIVATIONS:
        problems.append(f"activation_function {c['activation_function']!r}")
    if problems:
        raise CheckpointError(f"{where}: unsupported OPT text_config value(s): {'; '.join(problems)}")
    config = DecoderConfig(
        vocab_size=c["vocab_size"], hidden_size=c["hidden_size"], intermediate_size=c["ffn_dim"],
        num_hidden_layers=c["num_hidden_layers"], num_attention_heads=c["num_attention_heads"],
        num_key_value_heads=c["num_attention_heads"], max_position_embeddings=c["max_position_embeddings"],
        attention_bias=True, tie_word_embeddings=bool(c["tie_word_embeddings"]), hidden_act=c["activation_function"],
        bos_token_id=c["bos_token_id"], eos_token_id=c["eos_token_id"], pad_token_id=c["pad_token_id"], kind="opt")
    try:
        config.validate()
    except ConfigError as e:
        raise CheckpointError(f"{where}: text_config does not fit tinyomni: {e}") from None
    return config


def read_blip2(path: str | Path) -> Imported:
    """Read a transformers-native BLIP-2 directory (`Blip2ForConditionalGeneration`, OPT decoder)."""
    path = Path(path)
    where = str(path)
    raw, hf = instructblip.read_config(path, BLIP2_DEFAULTS)
    if (hf.get("qformer_config") or {}).get("use_qformer_text_input"):
        raise CheckpointError(f"{where}: qformer_config use_qformer_text_input true is not supported (BLIP-2's "
                              "generation reads the queries only)")
    vision = instructblip.vision_config(hf, where)
    qformer = instructblip.qformer_config(hf, vision, where, instruction_aware=False)
    text = dict(hf.get("text_config") or {})
    model_type = text.get("model_type", "opt")  # Blip2Config's default text model
    if model_type != "opt":
        raise CheckpointError(f"{where}: BLIP-2 with a {model_type!r} language model is not supported "
                              "(supported: opt)")
    config, _ = instructblip.omni_config(path, opt_decoder_config(text, where), vision, qformer, where)
    state = instructblip.convert(Weights(path), where, LAYOUT, _projector_name, _decoder_name, family="BLIP-2")
    instructblip.tie(config, state, raw, {**OPT_DEFAULTS, **text})
    _check_complete(config, state, lambda ours: instructblip.their_name(ours, LAYOUT), where)
    tokenizer = _tokenizer(path, config, int(hf["image_token_index"]), where)
    return Imported(config, state, tokenizer, read_chat_template(path) or PLAIN_TEMPLATE)
