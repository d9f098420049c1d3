"""Import Hugging Face vision towers (SigLIP, CLIP, InternVL) into `tinyomni.model.vision.VisionEncoder`.

Everything is an explicit table from the checkpoint's names to ours, plus the few tensors that change
shape; nothing is guessed from a model path. Three steps, each usable alone:

- `vision_config_from_hf(config.json as a dict) -> VisionConfig`
- `convert_hf_vision_state_dict(state_dict, model_type) -> our state dict` (drops pooling heads and
  every other tower: text model, projector, language model)
- `load_hf_vision_tower(directory) -> VisionEncoder` (config.json + *.safetensors, sharded or not)

Names are given relative to the tower's root. A checkpoint may nest the tower under a prefix
(`vision_model.` in SigLIP/CLIP, `vision_tower.` in InternVL/LLaVA, `model.vision_tower.` in
transformers 5); `VISION_PREFIXES` lists the ones we look for.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from tinyomni.checkpoints.native import check_state
from tinyomni.config import VisionConfig
from tinyomni.errors import CheckpointError, ConfigError
from tinyomni.model.vision import VisionEncoder

# Longest first: the first prefix that any key starts with is taken as the tower's root.
VISION_PREFIXES = (
    "model.vision_tower.vision_model.",
    "vision_tower.vision_model.",
    "model.vision_tower.",
    "vision_tower.",
    "vision_model.",
    "",
)

# --- SigLIP (SiglipVisionModel / the vision half of SiglipModel) ---------------------------------------
SIGLIP_NAMES = {
    "embeddings.patch_embedding.weight": "embeddings.patch_embedding.weight",
    "embeddings.patch_embedding.bias": "embeddings.patch_embedding.bias",
    "embeddings.position_embedding.weight": "embeddings.position_embedding.weight",
    "post_layernorm.weight": "post_layernorm.weight",
    "post_layernorm.bias": "post_layernorm.bias",
}
# Per block; "{i}" is the block index on both sides.
SIGLIP_LAYER_NAMES = {
    f"encoder.layers.{{i}}.{name}": f"encoder.layers.{{i}}.{name}"
    for name in (
        "layer_norm1.weight", "layer_norm1.bias",
        "self_attn.q_proj.weight", "self_attn.q_proj.bias",
        "self_attn.k_proj.weight", "self_attn.k_proj.bias",
        "self_attn.v_proj.weight", "self_attn.v_proj.bias",
        "self_attn.out_proj.weight", "self_attn.out_proj.bias",
        "layer_norm2.weight", "layer_norm2.bias",
        "mlp.fc1.weight", "mlp.fc1.bias",
        "mlp.fc2.weight", "mlp.fc2.bias",
    )
}

# --- CLIP (CLIPVisionModel / the vision half of CLIPModel) --------------------------------------------
# CLIP's `post_layernorm` only normalises the pooled CLS vector; last_hidden_state never passes through
# it, so it is dropped with the other pooling parts and our config says post_layernorm=False.
CLIP_NAMES = {
    "embeddings.class_embedding": "embeddings.class_embedding",
    "embeddings.patch_embedding.weight": "embeddings.patch_embedding.weight",
    "embeddings.position_embedding.weight": "embeddings.position_embedding.weight",
    "pre_layrnorm.weight": "pre_layernorm.weight",  # sic: transformers' spelling
    "pre_layrnorm.bias": "pre_layernorm.bias",
}
CLIP_LAYER_NAMES = SIGLIP_LAYER_NAMES

# --- InternVL's InternViT, as transformers names it (InternVLVisionModel) -----------------------------
INTERNVL_NAMES = {
    "embeddings.cls_token": "embeddings.class_embedding",  # [1, 1, D] → [D]
    "embeddings.patch_embeddings.projection.weight": "embeddings.patch_embedding.weight",
    "embeddings.patch_embeddings.projection.bias": "embeddings.patch_embedding.bias",
    "embeddings.position_embeddings": "embeddings.position_embedding.weight",  # [1, N+1, D] → [N+1, D]
    "layernorm.weight": "post_layernorm.weight",  # present only when use_mean_pooling is False
    "layernorm.bias": "post_layernorm.bias",
}
INTERNVL_LAYER_NAMES = {
    "encoder.layer.{i}.layernorm_before.weight": "encoder.layers.{i}.layer_norm1.weight",
    "encoder.layer.{i}.layernorm_before.bias": "encoder.layers.{i}.layer_norm1.bias",
    "encoder.layer.{i}.attention.q_proj.weight": "encoder.layers.{i}.self_attn.q_proj.weight",
    "encoder.layer.{i}.attention.q_proj.bias": "encoder.layers.{i}.self_attn.q_proj.bias",
    "encoder.layer.{i}.attention.k_proj.weight": "encoder.layers.{i}.self_attn.k_proj.weight",
    "encoder.layer.{i}.attention.k_proj.bias": "encoder.layers.{i}.self_attn.k_proj.bias",
    "encoder.layer.{i}.attention.v_proj.weight": "encoder.layers.{i}.self_attn.v_proj.weight",
    "encoder.layer.{i}.attention.v_proj.bias": "encoder.layers.{i}.self_attn.v_proj.bias",
    "encoder.layer.{i}.attention.projection_layer.weight": "encoder.layers.{i}.self_attn.out_proj.weight",
    "encoder.layer.{i}.attention.projection_layer.bias": "encoder.layers.{i}.self_attn.out_proj.bias",
    "encoder.layer.{i}.attention.q_norm.weight": "encoder.layers.{i}.self_attn.q_norm.weight",
    "encoder.layer.{i}.attention.k_norm.weight": "encoder.layers.{i}.self_attn.k_norm.weight",
    "encoder.layer.{i}.layernorm_after.weight": "encoder.layers.{i}.layer_norm2.weight",
    "encoder.layer.{i}.layernorm_after.bias": "encoder.layers.{i}.layer_norm2.bias",
    "encoder.layer.{i}.mlp.fc1.weight": "encoder.layers.{i}.mlp.fc1.weight",
    "encoder.layer.{i}.mlp.fc1.bias": "encoder.layers.{i}.mlp.fc1.bias",
    "encoder.layer.{i}.mlp.fc2.weight": "encoder.layers.{i}.mlp.fc2.weight",
    "encoder.layer.{i}.mlp.fc2.bias": "encoder.layers.{i}.mlp.fc2.bias",
    "encoder.layer.{i}.lambda_1": "encoder.layers.{i}.ls1",
    "encoder.layer.{i}.lambda_2": "encoder.layers.{i}.ls2",
}


def _flatten_leading(t: torch.Tensor) -> torch.Tensor:
    return t.reshape(-1, t.shape[-1]) if t.dim() > 2 else t


@dataclass(frozen=True)
class VisionMapping:
    """How one family's tower names map onto ours."""

    names: dict[str, str]  # theirs → ours, outside the blocks
    layer_names: dict[str, str]  # theirs → ours, inside block {i}
    dropped: tuple[str, ...] = ()  # their names (or name prefixes ending in ".") that we do not use
    reshape: dict[str, Callable[[torch.Tensor], torch.Tensor]] = field(default_factory=dict)  # by our name
    zero_bias: dict[str, str] = field(default_factory=dict)  # our bias → our weight, when they have none


MAPPINGS: dict[str, VisionMapping] = {
    "siglip": VisionMapping(
        SIGLIP_NAMES, SIGLIP_LAYER_NAMES,
        dropped=("head.", "embeddings.position_ids"),  # attention-pooling head; a legacy buffer
    ),
    "clip": VisionMapping(
        CLIP_NAMES, CLIP_LAYER_NAMES,
        dropped=("post_layernorm.", "embeddings.position_ids"),
        # CLIP's patch embedding has no bias; ours always has one, so it starts at zero.
        zero_bias={"embeddings.patch_embedding.bias": "embeddings.patch_embedding.weight"},
    ),
    "internvl": VisionMapping(
        INTERNVL_NAMES, INTERNVL_LAYER_NAMES,
        dropped=("embeddings.mask_token",),  # only used for masked-image pretraining
        reshape={
            "embeddings.class_embedding": lambda t: t.reshape(-1),
            "embeddings.position_embedding.weight": _flatten_leading,
        },
    ),
}

# model_type (top-level or vision_config's) → family in MAPPINGS
MODEL_TYPES = {
    "siglip_vision_model": "siglip",
    "siglip": "siglip",
    "clip_vision_model": "clip",
    "clip": "clip",
    "internvl_vision": "internvl",
    "internvl": "internvl",
}

# transformers' defaults for fields a config.json may leave out (save_pretrained omits some).
_HF_DEFAULTS: dict[str, dict[str, Any]] = {
    "siglip": dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                   num_channels=3, image_size=224, patch_size=16, hidden_act="gelu_pytorch_tanh",
                   layer_norm_eps=1e-6),
    "clip": dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                 num_channels=3, image_size=224, patch_size=32, hidden_act="quick_gelu", layer_norm_eps=1e-5),
    "internvl": dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
                     num_channels=3, image_size=448, patch_size=14, hidden_act="gelu", layer_norm_eps=1e-6,
                     attention_bias=False, use_qk_norm=False, norm_type="layer_norm",
                     layer_scale_init_value=0.1, use_mean_pooling=True,
                     use_absolute_position_embeddings=True),
}
# The normalisation each family was trained with; a preprocessor_config.json overrides these.
_IMAGE_STATS = {
    "siglip": ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5)),
    "clip": ((0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)),
    "internvl": ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
}


def family_of(model_type: str) -> str:
    """The MAPPINGS key for a transformers model_type, or a CheckpointError naming what we support."""
    try:
        return MODEL_TYPES[model_type]
    except KeyError:
        raise CheckpointError(
            f"unsupported vision model_type {model_type!r}; supported: {', '.join(sorted(MODEL_TYPES))}"
        ) from None


def vision_section(hf_config: dict[str, Any]) -> tuple[dict[str, Any], str]:
    """The vision part of a config.json (its `vision_config` when composite) and its family."""
    top_type = hf_config.get("model_type")
    section = hf_config.get("vision_config")
    if isinstance(section, dict):
        model_type = section.get("model_type") or top_type
    else:
        section, model_type = hf_config, top_type
    if model_type is None:
        raise CheckpointError("config has no model_type; cannot tell which vision family it is")
    return section, family_of(model_type)


def _square(value: Any, name: str) -> int:
    if isinstance(value, (list, tuple)):
        if len(value) != 2 or value[0] != value[1]:
            raise CheckpointError(f"only square vision {name} is supported, got {list(value)}")
        value = value[0]
    return int(value)


def vision_config_from_hf(hf_config: dict[str, Any]) -> VisionConfig:
    """A VisionConfig equivalent to a transformers SigLIP / CLIP / InternVL vision config (dict form).

    Composite configs (SiglipModel, CLIPModel, InternVLForConditionalGeneration, ...) are accepted;
    their `vision_config` section is used.
    """
    section, family = vision_section(hf_config)
    c = {**_HF_DEFAULTS[family], **section}
    mean, std = _IMAGE_STATS[family]
    common = dict(
        image_size=_square(c["image_size"], "image_size"),
        patch_size=_square(c["patch_size"], "patch_size"),
        num_channels=c["num_channels"],
        hidden_size=c["hidden_size"],
        intermediate_size=c["intermediate_size"],
        num_hidden_layers=c["num_hidden_layers"],
        num_attention_heads=c["num_attention_heads"],
        hidden_act=c["hidden_act"],
        layer_norm_eps=c["layer_norm_eps"],
        image_mean=mean,
        image_std=std,
    )
    if family == "siglip":
        config = VisionConfig(**common, qkv_bias=True, use_cls_token=False, pre_layernorm=False,
                              post_layernorm=True)
    elif family == "clip":
        config = VisionConfig(**common, qkv_bias=True, use_cls_token=True, pre_layernorm=True,
                              post_layernorm=False)
    else:
        if not c["use_absolute_position_embeddings"]:
            raise CheckpointError(
                "InternVL vision towers without absolute position embeddings are not supported"
            )
        config = VisionConfig(
            **common, norm_type=c["norm_type"], qkv_bias=c["attention_bias"], use_cls_token=True,
            pre_layernorm=False, post_layernorm=not c["use_mean_pooling"],
            layer_scale_init=float(c["layer_scale_init_value"]), qk_norm=c["use_qk_norm"],
        )
    try:
        config.validate()
    except ConfigError as e:
        raise CheckpointError(f"vision config does not fit tinyomni: {e}") from None
    return config


# --- name planning --------------------------------------------------------------------------------------
_LAYER_INDEX = re.compile(r"^(encoder\.layers?)\.(\d+)\.")


def _tower_prefix(keys: Iterable[str]) -> str:
    keys = list(keys)
    for prefix in VISION_PREFIXES:
        if prefix and any(k.startswith(prefix) for k in keys):
            return prefix
    return ""


def _our_name(name: str, mapping: VisionMapping) -> str | None:
    """Our name for one tower-relative name; None when it is a part we drop on purpose."""
    if name in mapping.names:
        return mapping.names[name]
    match = _LAYER_INDEX.match(name)
    if match:
        template = f"{match.group(1)}.{{i}}.{name[match.end():]}"
        if template in mapping.layer_names:
            return mapping.layer_names[template].format(i=match.group(2))
    if any(name == d or (d.endswith(".") and name.startswith(d)) for d in mapping.dropped):
        return None
    raise KeyError(name)


def tower_name(name: str, model_type: str) -> str | None:
    """One tower-relative checkpoint name → ours by `model_type`'s table; "" for a part the table
    drops (pooling heads), None for a name it does not know (the caller reports those together)."""
    try:
        plan = plan_hf_vision_names([name], model_type)
    except CheckpointError:
        return None
    return plan.get(name, "")


def plan_hf_vision_names(keys: Iterable[str], model_type: str) -> dict[str, str]:
    """{checkpoint key: our key} for every key that belongs to the vision tower and that we use.

    Keys outside the tower (text model, projector, language model, logit scale) are left out, as are the
    tower's pooling parts. A tower key that no table knows raises CheckpointError naming all of them.
    """
    mapping = MAPPINGS[family_of(model_type)]
    keys = list(keys)
    prefix = _tower_prefix(keys)
    plan: dict[str, str] = {}
    unknown: list[str] = []
    for key in keys:
        if not key.startswith(prefix):
            continue
        try:
            ours = _our_name(key[len(prefix):], mapping)
        except KeyError:
            unknown.append(key)
            continue
        if ours is not None:
            plan[key] = ours
    if unknown:
        raise CheckpointError(f"unknown {model_type} vision tower weight(s): {', '.join(sorted(unknown))}")
    return plan


def hf_name_for(ours: str, model_type: str) -> str | None:
    """The tower-relative checkpoint name that becomes our `ours` (for error messages), if any."""
    mapping = MAPPINGS[family_of(model_type)]
    for theirs, name in mapping.names.items():
        if name == ours:
            return theirs
    match = re.match(r"^encoder\.layers\.(\d+)\.", ours)
    if match:
        template = f"encoder.layers.{{i}}.{ours[match.end():]}"
        for theirs, name in mapping.layer_names.items():
            if name == template:
                return theirs.format(i=match.group(1))
    return None


def _apply_plan(
    plan: dict[str, str], get: Callable[[str], torch.Tensor], mapping: VisionMapping
) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for theirs, ours in plan.items():
        tensor = get(theirs)
        if ours in mapping.reshape:
            tensor = mapping.reshape[ours](tensor)
        out[ours] = tensor
    for bias, weight in mapping.zero_bias.items():
        if bias not in out and weight in out:
            out[bias] = torch.zeros(out[weight].shape[0], dtype=out[weight].dtype)
    return out


def convert_hf_vision_state_dict(
    state_dict: dict[str, torch.Tensor], model_type: str
) -> dict[str, torch.Tensor]:
    """A transformers vision-tower (or whole-model) state dict → a VisionEncoder state dict."""
    plan = plan_hf_vision_names(state_dict.keys(), model_type)
    return _apply_plan(plan, state_dict.__getitem__, MAPPINGS[family_of(model_type)])


def load_vision_state_dict(model: VisionEncoder, state_dict: dict[str, torch.Tensor]) -> None:
    """Strictly load converted weights; a CheckpointError names every missing, extra or misshapen one."""
    check_state(model, state_dict, "the vision checkpoint")
    model.load_state_dict(state_dict, strict=True)


# --- files -------------------------------------------------------------------------------------------------
def _safetensors_files(path: Path) -> list[Path]:
    index = path / "model.safetensors.index.json"
    if index.is_file():
        weight_map = json.loads(index.read_text()).get("weight_map", {})
        files = [path / name for name in sorted(set(weight_map.values()))]
    else:
        files = sorted(path.glob("*.safetensors"))
    if not files:
        raise CheckpointError(f"no .safetensors weights in {path}")
    absent = [str(f) for f in files if not f.is_file()]
    if absent:
        raise CheckpointError(f"weight shard(s) listed in {index} are missing: {', '.join(absent)}")
    return files


def _image_stats(path: Path, config: VisionConfig) -> None:
    preprocessor = path / "preprocessor_config.json"
    if not preprocessor.is_file():
        return
    data = json.loads(preprocessor.read_text())
    mean, std = data.get("image_mean"), data.get("image_std")
    if isinstance(mean, list) and isinstance(std, list) and len(mean) == len(std) == 3:
        config.image_mean = (float(mean[0]), float(mean[1]), float(mean[2]))
        config.image_std = (float(std[0]), float(std[1]), float(std[2]))


def load_hf_vision_tower(path: str | Path, dtype: torch.dtype | None = None) -> VisionEncoder:
    """Build a VisionEncoder from a local Hugging Face directory (config.json + *.safetensors).

    Only the vision tower's tensors are read, so a whole VLM checkpoint costs no more than its ViT.
    """
    from tinyomni.checkpoints import weights

    path = Path(path)
    config_file = path / "config.json"
    if not config_file.is_file():
        raise CheckpointError(f"no config.json in {path}")
    try:
        hf_config = json.loads(config_file.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{config_file} is not valid JSON: {e}") from None
    section, family = vision_section(hf_config)
    config = vision_config_from_hf(hf_config)
    _image_stats(path, config)

    where: dict[str, weights.Stored] = {}
    for file in _safetensors_files(path):
        where.update(weights.read_header(file))
    model_type = section.get("model_type") or hf_config["model_type"]
    plan = plan_hf_vision_names(where, model_type)
    state_dict = _apply_plan(plan, lambda key: weights.map_tensor(where[key]), MAPPINGS[family])

    model = VisionEncoder(config)
    prefix = _tower_prefix(where)
    missing = sorted(set(model.state_dict()) - set(state_dict))
    if missing:
        names = [f"{prefix}{hf_name_for(k, model_type) or k}" for k in missing]
        raise CheckpointError(f"{path}: the checkpoint lacks vision weight(s) {', '.join(names)}")
    try:
        load_vision_state_dict(model, state_dict)
    except CheckpointError as e:
        raise CheckpointError(f"{path}: {e}") from None
    if dtype is not None:
        model.to(dtype)
    return model
