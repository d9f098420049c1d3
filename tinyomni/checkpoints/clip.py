"""CLIP and SigLIP dual encoders (transformers' `CLIPModel`, `SiglipModel`) → tinyomni.

What is read, from the checkpoint's own files only:
- config.json: `vision_config` (hf_vision.vision_config_from_hf), `text_config` (→ TextEncoderConfig;
  keys it leaves out mean what transformers' CLIPTextConfig / SiglipTextConfig assume), CLIP's
  `projection_dim`;
- the image processor settings (preprocessor_config.json, or processor_config.json's image_processor):
  CLIP's shortest-edge resize + centre crop, SigLIP's plain resize — the same reader as LLaVA's
  (checkpoints/llava.py), so the pixels are transformers' PIL backend's;
- tokenizer.json (+ tokenizer_config.json): CLIP's BPE with its start/end-of-text tokens. SigLIP's
  hub checkpoints ship only a SentencePiece `spiece.model`, which tinyomni does not read: such a
  directory is refused by name (a tokenizer.json converted from it loads);
- the weights, by the explicit table below: the vision tower through hf_vision's table, the pooling
  parts it drops (CLIP's `post_layernorm` + `visual_projection`, SigLIP's attention-pooling `head`),
  the text model (`text_model.*`, names as ours), `text_projection`, `logit_scale`, `logit_bias`.

These are dual encoders, not chat models: `tinyomni.load` refuses them by name and
`tinyomni.retrieval.load` (or `tinyomni embed --model DIR`) reads them.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from tinyomni.checkpoints import hf_vision
from tinyomni.checkpoints.families import read_hf_config
from tinyomni.checkpoints.internvl import Weights
from tinyomni.checkpoints.llava import _processing_fields, _processor_files
from tinyomni.errors import CheckpointError
from tinyomni.model.dual_encoder import ImageTextConfig, ImageTextModel
from tinyomni.model.text_encoder import TextEncoderConfig
from tinyomni.processing.tokenizer import Tokenizer

# transformers' defaults for text_config keys a config.json may leave out (CLIPTextConfig / SiglipTextConfig).
TEXT_DEFAULTS: dict[str, dict[str, Any]] = {
    "clip": dict(vocab_size=49408, hidden_size=512, intermediate_size=2048, num_hidden_layers=12,
                 num_attention_heads=8, max_position_embeddings=77, hidden_act="quick_gelu", layer_norm_eps=1e-5,
                 eos_token_id=49407),
    "siglip": dict(vocab_size=32000, hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                   num_attention_heads=12, max_position_embeddings=64, hidden_act="gelu_pytorch_tanh",
                   layer_norm_eps=1e-6, projection_size=None),
}
FAMILIES = {"CLIPModel": "clip", "SiglipModel": "siglip"}
DEFAULT_PROCESSOR = {"clip": "CLIPImageProcessor", "siglip": "SiglipImageProcessor"}

# Theirs → ours outside the vision tower (which hf_vision's table maps) and the text blocks (same names).
NAMES: dict[str, dict[str, str]] = {
    "clip": {
        "vision_model.post_layernorm.weight": "vision_pool.post_layernorm.weight",
        "vision_model.post_layernorm.bias": "vision_pool.post_layernorm.bias",
        "visual_projection.weight": "vision_pool.visual_projection.weight",
        "text_projection.weight": "text_projection.weight",
        "logit_scale": "logit_scale",
    },
    "siglip": {
        **{f"vision_model.head.{n}": f"vision_pool.{n}" for n in (
            "probe", "attention.in_proj_weight", "attention.in_proj_bias", "attention.out_proj.weight",
            "attention.out_proj.bias", "layernorm.weight", "layernorm.bias", "mlp.fc1.weight", "mlp.fc1.bias",
            "mlp.fc2.weight", "mlp.fc2.bias")},
        "logit_scale": "logit_scale",
        "logit_bias": "logit_bias",
    },
}
TEXT_PREFIX = "text_model."
TEXT_NAMES = re.compile(r"^(embeddings\.(token|position)_embedding\.weight|final_layer_norm\.(weight|bias)|"
                        r"head\.(weight|bias)|encoder\.layers\.\d+\.(layer_norm[12]|self_attn\.[qkv]_proj|"
                        r"self_attn\.out_proj|mlp\.fc[12])\.(weight|bias))$")
DROPPED = ("text_model.embeddings.position_ids", "vision_model.embeddings.position_ids")


@dataclass
class ImportedDualEncoder:
    """A CLIP / SigLIP checkpoint in our terms: the model, its tokenizer and how it prepares inputs."""

    model: ImageTextModel
    tokenizer: Tokenizer
    image: dict[str, Any]  # preprocess_image's resize fields: image_resize, image_shortest_edge, image_pad_to_square
    pad_to_max_length: bool  # SigLIP was trained on texts padded to max_position_embeddings


def family_of(path: Path) -> str:
    hf = read_hf_config(path)
    for name in hf.get("architectures") or []:
        if name in FAMILIES:
            return FAMILIES[name]
    if hf.get("model_type") in ("clip", "siglip"):
        return str(hf["model_type"])
    raise CheckpointError(f"{path}: not a CLIPModel or SiglipModel directory")


def text_config(hf: dict[str, Any], family: str, where: str) -> TextEncoderConfig:
    section = hf.get("text_config")
    if not isinstance(section, dict):
        raise CheckpointError(f"{where}: config.json has no text_config (a vision tower alone cannot embed text)")
    c = {**TEXT_DEFAULTS[family], **{k: v for k, v in section.items() if v is not None}}
    problems = []
    if c["hidden_act"] not in ("quick_gelu", "gelu", "gelu_pytorch_tanh", "gelu_new"):
        problems.append(f"hidden_act {c['hidden_act']!r}")
    if c["hidden_size"] % c["num_attention_heads"]:
        problems.append(f"hidden_size {c['hidden_size']} not divisible by {c['num_attention_heads']} heads")
    if problems:
        raise CheckpointError(f"{where}: unsupported text_config value(s): {'; '.join(problems)}")
    common = dict(vocab_size=int(c["vocab_size"]), hidden_size=int(c["hidden_size"]),
                  intermediate_size=int(c["intermediate_size"]), num_hidden_layers=int(c["num_hidden_layers"]),
                  num_attention_heads=int(c["num_attention_heads"]),
                  max_position_embeddings=int(c["max_position_embeddings"]), hidden_act=str(c["hidden_act"]),
                  layer_norm_eps=float(c["layer_norm_eps"]))
    if family == "clip":
        eos = c.get("eos_token_id")
        return TextEncoderConfig(**common, causal=True, pooling="eos", eos_token_id=eos, legacy_eos=eos == 2)
    return TextEncoderConfig(**common, causal=False, pooling="last",
                             head_size=int(c["projection_size"] or c["hidden_size"]))


def read_config(path: Path) -> ImageTextConfig:
    hf = read_hf_config(path)
    family = family_of(path)
    where = str(path)
    if not isinstance(hf.get("vision_config"), dict):
        raise CheckpointError(f"{where}: config.json has no vision_config")
    vision = hf_vision.vision_config_from_hf(hf)
    if family == "siglip" and hf["vision_config"].get("vision_use_head") is False:
        raise CheckpointError(f"{where}: vision_use_head false (a SigLIP tower without its pooling head has no "
                              "image embedding)")
    projection = int(hf.get("projection_dim", 512)) if family == "clip" else None
    return ImageTextConfig(family, vision, text_config(hf, family, where), projection)


def convert_state(keys: list[str], get: Any, family: str, where: str) -> dict[str, torch.Tensor]:
    """Their tensors under our names (ImageTextModel's); an unknown one is a CheckpointError naming it."""
    vision_type = "clip" if family == "clip" else "siglip"
    vision_keys = [k for k in keys if k.startswith("vision_model.") and k not in NAMES[family] and k not in DROPPED]
    plan = hf_vision.plan_hf_vision_names(vision_keys, vision_type)
    state = hf_vision._apply_plan(plan, get, hf_vision.MAPPINGS[vision_type])
    state = {f"vision_model.{k}": v for k, v in state.items()}
    unknown = []
    for key in keys:
        if key in NAMES[family]:
            tensor = get(key)
            state[NAMES[family][key]] = tensor.reshape(()) if key.startswith("logit_") else tensor
        elif key.startswith(TEXT_PREFIX) and TEXT_NAMES.match(key[len(TEXT_PREFIX):]):
            state[key] = get(key)
        elif not key.startswith("vision_model.") and key not in DROPPED:
            unknown.append(key)
    if unknown:
        raise CheckpointError(f"{where}: unknown {family} weight(s) {', '.join(sorted(unknown)[:8])}")
    return state


def read_tokenizer(path: Path, family: str) -> Tokenizer:
    if not (path / "tokenizer.json").is_file():
        hint = (" (it has spiece.model, SentencePiece, which tinyomni does not read: convert it to a "
                "tokenizer.json with the `tokenizers` library first)") if (path / "spiece.model").is_file() else ""
        raise CheckpointError(f"{path}: no tokenizer.json{hint}")
    return Tokenizer.from_dir(path)


def read_dual_encoder(path: str | Path) -> ImportedDualEncoder:
    """A CLIPModel / SiglipModel directory → model (float32, eval), tokenizer and input settings."""
    path = Path(path)
    config = read_config(path)
    family, where = config.family, str(path)
    found, _ = _processor_files(path)
    if found and "image_processor_type" not in found:
        found = {**found, "image_processor_type": DEFAULT_PROCESSOR[family]}
    image = _processing_fields(found, config.vision, where)  # also sets the tower's mean / std
    tokenizer = read_tokenizer(path, family)
    weights = Weights(path)
    state = convert_state(weights.keys(), weights.get, family, where)
    with torch.device("meta"):
        model = ImageTextModel(config)
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state))
    if missing:
        raise CheckpointError(f"{where}: the checkpoint lacks weight(s) {', '.join(missing[:8])}")
    wrong = [f"{k} {tuple(state[k].shape)} (config says {tuple(v.shape)})" for k, v in expected.items()
             if state[k].shape != v.shape]
    extra = sorted(set(state) - set(expected))
    if wrong or extra:
        raise CheckpointError(f"{where}: weight(s) that do not fit its config.json: {', '.join((wrong + extra)[:8])}")
    model.load_state_dict({k: v.float() for k, v in state.items()}, strict=True, assign=True)
    if len(tokenizer) > config.text.vocab_size:
        raise CheckpointError(f"{where}: tokenizer has {len(tokenizer)} tokens but the text model only "
                              f"{config.text.vocab_size} embeddings")
    return ImportedDualEncoder(model.eval(), tokenizer, image, pad_to_max_length=family == "siglip")
