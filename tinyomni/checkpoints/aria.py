"""Aria (Rhymes AI) checkpoints → tinyomni: its text decoder (transformers' `AriaTextForCausalLM`, `model_type:
"aria_text"`) as tinyomni's MoE decoder (`DecoderConfig.kind = "moe"`, tinyomni.model.moe), and back; and the
whole vision-language model (`AriaForConditionalGeneration`).

Aria's language model is a Llama layer whose MLP is a mixture of experts: a router (`mlp.router.weight`),
routed experts stored stacked as 3-D tensors in (in, out) layout, and shared experts under transformers' MLP
names. What differs from our names is only the experts:

    mlp.experts.fc1.weight [E, hidden, 2 * inter]  → mlp.experts.{e}.gate_proj.weight = fc1[e, :, :inter].T
                                                      mlp.experts.{e}.up_proj.weight   = fc1[e, :, inter:].T
    mlp.experts.fc2.weight [E, inter, hidden]      → mlp.experts.{e}.down_proj.weight  = fc2[e].T

(transformers 5 renames fc1/fc2 to `experts.gate_up_proj` / `experts.down_proj` in memory, same layout; both
names are read.) Every other tensor keeps its name. The decoder is imported like any text decoder
(checkpoints/hf_llama.py calls `aria_decoder_config` and `aria_decoder_state`), so `tinyomni.load(dir)` gives
it fresh encoders and a recipe can put new encoders around it.

The whole Aria (`AriaForConditionalGeneration`, `read_aria`): Idefics3's SigLIP tower (bucketed positions, read
at `vision_feature_layer` before its final norm), the cross-attention projector (model/aria_projector.py, the
same names), this decoder under `language_model.`; one 980-px tile per image (processing/aria.py), whose
placeholder is `size_conversion[980]` image tokens where the chat template writes the image token. What is read,
from the checkpoint's own files only: config.json (`text_config`, `vision_config`, `vision_feature_layer`,
`projector_patch_to_query_dict`, `image_token_index`), the image processor's settings (min_image_size,
mean/std, resample), processor_config.json's `size_conversion`, the tokenizer and the chat template.
"""

from __future__ import annotations

import dataclasses
import json
import re
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from torch import Tensor

from tinyomni.checkpoints import hf_vision
from tinyomni.checkpoints.families import Imported, read_hf_config
from tinyomni.checkpoints.weights import Weights, rename_weights
from tinyomni.config import ACTIVATIONS, DecoderConfig, OmniConfig, ProjectorConfig
from tinyomni.errors import CheckpointError, ConfigError
from tinyomni.processing.tokenizer import Tokenizer

# What transformers' AriaTextConfig assumes for keys a config.json leaves out (5.24).
ARIA_TEXT_DEFAULTS: dict[str, Any] = dict(
    moe_num_experts=8, moe_topk=2, moe_num_shared_experts=2, hidden_act="silu", rms_norm_eps=1e-6,
    max_position_embeddings=2048, tie_word_embeddings=False, attention_bias=False, mlp_bias=False,
    bos_token_id=1, eos_token_id=2, pad_token_id=2)

_EXPERTS = re.compile(r"^(.*\.mlp\.experts)\.(fc1\.weight|fc2\.weight|gate_up_proj|down_proj)$")


def aria_decoder_config(hf: dict[str, Any]) -> DecoderConfig:
    """An `aria_text` config.json → DecoderConfig(kind="moe"), or a CheckpointError naming what we do not run."""
    hf = {**ARIA_TEXT_DEFAULTS, **hf}
    for key in ("attention_bias", "mlp_bias"):
        if hf[key]:
            raise CheckpointError(f"Aria text config with {key}=true is not supported (its checkpoints have none)")
    if hf["hidden_act"] not in ACTIVATIONS:
        raise CheckpointError(f"Aria with hidden_act {hf['hidden_act']!r} is not supported "
                              f"({', '.join(sorted(ACTIVATIONS))})")
    rope = hf.get("rope_parameters") or hf.get("rope_scaling") or {}
    kind = rope.get("rope_type", rope.get("type", "default"))
    if kind not in ("default", "linear", "llama3"):
        raise CheckpointError(f"Aria with rope type {kind!r} is not supported (default, linear, llama3)")
    experts, top_k = hf["moe_num_experts"], hf["moe_topk"]
    if not 1 <= top_k <= experts:
        raise CheckpointError(f"Aria with moe_topk {top_k} of {experts} experts is not a valid MoE")
    from tinyomni.checkpoints.hf_llama import llama_decoder_config  # here: hf_llama dispatches to this module

    return dataclasses.replace(
        llama_decoder_config(hf), kind="moe", hidden_act=hf["hidden_act"], num_experts=experts,
        num_experts_per_tok=top_k, num_shared_experts=hf["moe_num_shared_experts"],
        # Not an AriaTextConfig key (Mixtral's name for it): a base decoder's config.json may set it for training.
        router_aux_loss_coef=float(hf.get("router_aux_loss_coef", 0.0)))


def aria_decoder_state(state: dict[str, Tensor], config: DecoderConfig) -> dict[str, Tensor]:
    """An Aria text state dict (`model.*`, `lm_head.weight`) under our names: stacked experts split per expert.
    A stacked tensor of the wrong shape is a CheckpointError naming it."""
    out: dict[str, Tensor] = {}
    E, d, inter = config.num_experts, config.hidden_size, config.intermediate_size
    for name, tensor in state.items():
        match = _EXPERTS.match(name)
        if match is None:
            if ".mlp.shared_experts." in name and config.num_shared_experts == 0:
                continue  # zero-width shared experts (moe_num_shared_experts 0) are empty tensors
            out[name] = tensor
            continue
        prefix, part = match.groups()
        up = part in ("fc1.weight", "gate_up_proj")
        want = (E, d, 2 * inter) if up else (E, inter, d)
        if tuple(tensor.shape) != want:
            raise CheckpointError(f"{name} has shape {tuple(tensor.shape)}, expected {want} "
                                  f"({E} experts, hidden {d}, intermediate {inter})")
        for e in range(E):
            if up:
                out[f"{prefix}.{e}.gate_proj.weight"] = tensor[e, :, :inter].t().contiguous()
                out[f"{prefix}.{e}.up_proj.weight"] = tensor[e, :, inter:].t().contiguous()
            else:
                out[f"{prefix}.{e}.down_proj.weight"] = tensor[e].t().contiguous()
    return out


def to_aria_state(state: dict[str, Tensor], config: DecoderConfig) -> dict[str, Tensor]:
    """The inverse of `aria_decoder_state`: our MoE decoder's tensors (`model.*`, `lm_head.weight`) in Aria's
    on-disk layout (experts stacked as `fc1` / `fc2`)."""
    out: dict[str, Tensor] = {}
    experts: dict[str, dict[int, dict[str, Tensor]]] = {}
    per_expert = re.compile(r"^(.*\.mlp\.experts)\.(\d+)\.(gate_proj|up_proj|down_proj)\.weight$")
    for name, tensor in state.items():
        match = per_expert.match(name)
        if match is None:
            out[name] = tensor
        else:
            prefix, e, proj = match.groups()
            experts.setdefault(prefix, {}).setdefault(int(e), {})[proj] = tensor
    for prefix, by_expert in experts.items():
        order = [by_expert[e] for e in range(config.num_experts)]
        out[f"{prefix}.fc1.weight"] = torch.stack([torch.cat([p["gate_proj"], p["up_proj"]]).t() for p in order])
        out[f"{prefix}.fc2.weight"] = torch.stack([p["down_proj"].t() for p in order])
    return out


def aria_text_config_json(config: DecoderConfig) -> dict[str, Any]:
    """Our MoE DecoderConfig as an `AriaTextForCausalLM` config.json."""
    if config.kind != "moe":
        raise CheckpointError(f"only an MoE decoder (kind 'moe') is an Aria text model, not kind {config.kind!r}")
    if config.attention_bias:
        raise CheckpointError("Aria's attention has no q/k/v bias")
    rope = {"rope_type": "default", **(config.rope_scaling or {}), "rope_theta": config.rope_theta}
    return {
        "architectures": ["AriaTextForCausalLM"], "model_type": "aria_text",
        "vocab_size": config.vocab_size, "hidden_size": config.hidden_size,
        "intermediate_size": config.intermediate_size, "num_hidden_layers": config.num_hidden_layers,
        "num_attention_heads": config.num_attention_heads, "num_key_value_heads": config.num_key_value_heads,
        "head_dim": config.attn_head_dim, "max_position_embeddings": config.max_position_embeddings,
        "rms_norm_eps": config.rms_norm_eps, "rope_parameters": rope, "hidden_act": config.hidden_act,
        "tie_word_embeddings": config.tie_word_embeddings, "attention_bias": False, "mlp_bias": False,
        "bos_token_id": config.bos_token_id, "eos_token_id": config.eos_token_id,
        "pad_token_id": config.pad_token_id, "moe_num_experts": config.num_experts,
        "moe_topk": config.num_experts_per_tok, "moe_num_shared_experts": config.num_shared_experts,
        # not an AriaTextConfig key (transformers ignores it); aria_decoder_config reads it back
        **({"router_aux_loss_coef": config.router_aux_loss_coef} if config.router_aux_loss_coef else {}),
    }


def save_aria_text(decoder: torch.nn.Module, path: str | Path) -> Path:
    """Write an MoE decoder (tinyomni.model.moe.MoEDecoder) as an `AriaTextForCausalLM` directory
    (config.json + model.safetensors; no tokenizer): transformers loads it, and so does tinyomni, as a base
    decoder for new encoders (`base = "<dir>"` in a recipe, once a tokenizer sits beside it)."""
    config: DecoderConfig = decoder.config
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().float().contiguous() for k, v in decoder.state_dict().items()}
    if config.tie_word_embeddings:
        state.pop("lm_head.weight", None)
    save_file(to_aria_state(state, config), str(path / "model.safetensors"), metadata={"format": "pt"})
    (path / "config.json").write_text(json.dumps(aria_text_config_json(config), indent=2) + "\n")
    return path


def write_tiny_moe_base(path: str | Path, tokenizer: Tokenizer, chat_template: str | None, seed: int = 0,
                        **fields: Any) -> Path:
    """A small random MoE decoder written as an Aria text directory with `tokenizer` and `chat_template` beside
    it: a base decoder for new encoders (recipes/toy-moe.toml). `fields` override TINY_MOE's DecoderConfig
    fields (`router_aux_loss_coef` is written into config.json, where aria_decoder_config reads it)."""
    from tinyomni.model.moe import MoEDecoder

    eos = tokenizer.eos_token_ids
    config = DecoderConfig(**{**TINY_MOE, "vocab_size": len(tokenizer), "bos_token_id": tokenizer.bos_token_id,
                              "eos_token_id": eos[0] if len(eos) == 1 else eos,
                              "pad_token_id": tokenizer.pad_token_id, **fields})
    config.validate()
    with torch.random.fork_rng():  # seeded, without moving the caller's generator
        torch.manual_seed(seed)
        decoder = MoEDecoder(config)
    path = save_aria_text(decoder, path)
    tokenizer.save(path)
    if chat_template is not None:
        (path / "chat_template.jinja").write_text(chat_template)
    return path


# The toy MoE decoder: 2 layers of 4 experts (top-2) and one shared expert, about 0.1 M parameters besides
# the token table.
TINY_MOE: dict[str, Any] = dict(
    kind="moe", hidden_size=64, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
    num_key_value_heads=2, max_position_embeddings=2048, rope_theta=10000.0, tie_word_embeddings=True,
    num_experts=4, num_experts_per_tok=2, num_shared_experts=1)


def main(argv: list[str] | None = None) -> None:
    """`python -m tinyomni.checkpoints.aria tiny OUT [--aux 0.01]`: write a tiny MoE base with SmolLM2's
    tokenizer and chat template (for recipes/toy-moe.toml)."""
    import argparse

    from tinyomni.api import load_base_decoder

    parser = argparse.ArgumentParser(prog="python -m tinyomni.checkpoints.aria")
    parser.add_argument("what", choices=["tiny"])
    parser.add_argument("out")
    parser.add_argument("--aux", type=float, default=0.0, help="router_aux_loss_coef (0: no balancing loss)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    base = load_base_decoder("smollm2")
    out = write_tiny_moe_base(args.out, base.tokenizer_factory(), base.chat_template, seed=args.seed,
                              router_aux_loss_coef=args.aux)
    print(f"wrote a tiny MoE base decoder (Aria text layout) to {out}")


# --- the whole Aria (AriaForConditionalGeneration) -------------------------------------------------------
# Part → checkpoint prefix, in save_pretrained's spelling and in transformers 5's in-memory one.
LAYOUTS = {
    "saved": {"vision": "vision_tower.", "projector": "multi_modal_projector.", "decoder": "language_model.model.",
              "head": "language_model.lm_head."},
    "in-memory": {"vision": "model.vision_tower.", "projector": "model.multi_modal_projector.",
                  "decoder": "model.language_model.", "head": "lm_head."},
}
# The projector's tensors: the same names as tinyomni.model.aria_projector.AriaProjector's.
PROJECTOR_NAMES = frozenset({
    "query", "cross_attn.q_proj.weight", "cross_attn.k_proj.weight", "cross_attn.v_proj.weight",
    "cross_attn.multihead_attn.in_proj_weight", "cross_attn.multihead_attn.in_proj_bias",
    "cross_attn.multihead_attn.out_proj.weight", "cross_attn.multihead_attn.out_proj.bias",
    "cross_attn.linear.weight", "cross_attn.linear.bias", "cross_attn.layer_norm.weight",
    "cross_attn.layer_norm.bias", "cross_attn.layer_norm_kv.weight", "cross_attn.layer_norm_kv.bias",
    "layer_norm.weight", "layer_norm.bias", "feed_forward.linear_in.weight", "feed_forward.linear_out.weight"})
# What transformers assumes for keys a config.json leaves out (5.24): AriaConfig, AriaImageProcessor(Pil),
# AriaProcessor.
ARIA_DEFAULTS: dict[str, Any] = dict(vision_feature_layer=-1, image_token_index=9, tie_word_embeddings=False,
                                     projector_patch_to_query_dict={1225: 128, 4900: 256})
IMAGE_PROCESSOR_DEFAULTS: dict[str, Any] = dict(
    min_image_size=336, resample=3, do_rescale=True, rescale_factor=1 / 255,
    do_normalize=True, image_mean=[0.5] * 3, image_std=[0.5] * 3, do_convert_rgb=True)
SIZE_CONVERSION_DEFAULT = {490: 128, 980: 256}
PROCESSOR_TILE = 980  # AriaProcessor's images_kwargs max_image_size


def _aria_config(path: Path, hf: dict[str, Any], image: dict[str, Any], processor: dict[str, Any]) -> OmniConfig:
    """config.json and the processor files → OmniConfig, or a CheckpointError naming what we do not run."""
    from tinyomni.checkpoints.internvl import check_pixel_settings
    from tinyomni.checkpoints.smolvlm import _vision_config

    where = str(path)
    vision = _vision_config(hf, where)  # Idefics3's SigLIP tower, bucketed positions
    layer = hf["vision_feature_layer"]
    if not isinstance(layer, int) or not -vision.num_hidden_layers - 1 <= layer <= vision.num_hidden_layers:
        raise CheckpointError(f"{where}: vision_feature_layer {layer!r} is not supported (one hidden state index)")
    # Aria reads hidden_states[k]: block k's output before the tower's final norm, also for k = -1.
    vision.feature_layer = layer % (vision.num_hidden_layers + 1)
    try:
        decoder = aria_decoder_config({**(hf.get("text_config") or {})})
    except CheckpointError as e:
        raise CheckpointError(f"{where}: {e}") from None
    decoder.tie_word_embeddings = bool(hf["tie_word_embeddings"])
    queries = {int(k): int(v) for k, v in hf["projector_patch_to_query_dict"].items()}
    if vision.num_patches not in queries:
        raise CheckpointError(f"{where}: projector_patch_to_query_dict {queries} has no entry for the tower's "
                              f"{vision.num_patches} patches ({vision.image_size} px / {vision.patch_size})")
    if not image:
        raise CheckpointError(f"{where}: no image processor settings (preprocessor_config.json, or "
                              "processor_config.json with an image_processor)")
    kind = str(image.get("image_processor_type", "AriaImageProcessor")).removesuffix("Fast").removesuffix("Pil")
    if kind != "AriaImageProcessor":
        raise CheckpointError(f"{where}: image processor {kind!r} is not supported (AriaImageProcessor)")
    settings = {**IMAGE_PROCESSOR_DEFAULTS, **{k: v for k, v in image.items() if v is not None}}
    problems = []
    # AriaProcessor passes its own images_kwargs (max_image_size 980, split_image false) over the image
    # processor's file: every image becomes one 980-px tile, which must be the tower's own size.
    if vision.image_size != PROCESSOR_TILE:
        problems.append(f"a vision tower of image_size {vision.image_size} (AriaProcessor makes {PROCESSOR_TILE}-px "
                        "tiles)")
    if settings["resample"] != 3:
        problems.append(f"resample {settings['resample']} (only 3, bicubic)")
    check_pixel_settings(settings, vision, problems, where, ("do_rescale", "do_normalize", "do_convert_rgb"))
    sizes = {int(k): int(v) for k, v in (processor.get("size_conversion") or SIZE_CONVERSION_DEFAULT).items()}
    if sizes.get(vision.image_size) != queries[vision.num_patches]:
        raise CheckpointError(f"{where}: the processor writes {sizes.get(vision.image_size)} image tokens per "
                              f"{vision.image_size}-px image (size_conversion) but the projector gives "
                              f"{queries[vision.num_patches]} (projector_patch_to_query_dict)")
    projector = ProjectorConfig(kind="aria", downsample_ratio=1.0, aria_num_queries=queries[vision.num_patches],
                                aria_query_rows=max(queries.values()))
    config = OmniConfig(decoder=decoder, vision=vision, audio=None, vision_projector=projector,
                        min_tiles=1, max_tiles=1, use_thumbnail=False, number_images=False, image_wrap=False,
                        images_in_template=True, image_resize="aria",
                        image_shortest_edge=int(settings["min_image_size"]))
    try:
        config.validate()
    except ConfigError as e:
        raise CheckpointError(f"{where}: the config does not fit tinyomni: {e}") from None
    return config


def read_aria(path: str | Path) -> Imported:
    """Read a transformers-native Aria directory (`AriaForConditionalGeneration`, image splitting off)."""
    from tinyomni.checkpoints.internvl import DROPPED, OUR_PREFIX, _check_complete, read_chat_template
    from tinyomni.checkpoints.llava import _processor_files, _tokenizer

    path = Path(path)
    where = str(path)
    raw = read_hf_config(path)
    hf = {**ARIA_DEFAULTS, **{k: v for k, v in raw.items() if v is not None}}
    image, processor = _processor_files(path)
    config = _aria_config(path, hf, image, processor)

    weights = Weights(path)
    keys = weights.keys()
    layout = LAYOUTS["in-memory" if any(k.startswith("model.language_model.") for k in keys) else "saved"]
    tables = {"vision": lambda n: hf_vision.tower_name(n, "siglip"),
              "projector": lambda n: n if n in PROJECTOR_NAMES else None,
              "decoder": lambda n: "" if _EXPERTS.match(n) else n,  # the stacked experts: split below
              "head": lambda n: n if n == "weight" else None}
    state = rename_weights(weights, layout, tables, OUR_PREFIX, where, "Aria", DROPPED)
    stacked = {k[len(layout["decoder"]):]: weights.get(k) for k in keys
               if k.startswith(layout["decoder"]) and _EXPERTS.match(k[len(layout["decoder"]):])}
    try:
        split = aria_decoder_state(stacked, config.decoder)
    except CheckpointError as e:
        raise CheckpointError(f"{where}: {e}") from None
    state.update({OUR_PREFIX["decoder"] + k: v for k, v in split.items()})
    if config.decoder.num_shared_experts == 0:
        state = {k: v for k, v in state.items() if ".mlp.shared_experts." not in k}
    tied = config.decoder.tie_word_embeddings and OUR_PREFIX["head"] + "weight" not in state
    config.decoder.tie_word_embeddings = tied
    _check_complete(config, state, lambda ours: _their_name(ours, layout), where)

    image_token = hf["image_token_index"]
    tokenizer = Tokenizer.from_dir(path)
    name = tokenizer.id_to_token(image_token) if 0 <= image_token < len(tokenizer) else None
    if name is None:
        raise CheckpointError(f"{where}: config.json's image_token_index {image_token} is not a token of the "
                              "tokenizer")
    config.image_context_token = name
    tokenizer = _tokenizer(path, config, image_token, where)
    template = read_chat_template(path)
    if template is None:
        raise CheckpointError(f"{where}: no chat template (chat_template.jinja, chat_template.json, or one in "
                              "processor_config.json / tokenizer_config.json)")
    return Imported(config, state, tokenizer, template)


def _their_name(ours: str, layout: dict[str, str]) -> str:
    """Our name → the checkpoint's (for error messages)."""
    from tinyomni.checkpoints.internvl import OUR_PREFIX

    for part, prefix in OUR_PREFIX.items():
        if ours.startswith(prefix):
            rel = ours[len(prefix):]
            if part == "vision":
                rel = hf_vision.hf_name_for(rel, "siglip") or rel
            match = re.match(r"^(.*\.mlp\.experts)\.\d+\.(gate|up|down)_proj\.weight$", rel)
            if part == "decoder" and match:
                rel = f"{match.group(1)}.{'fc2' if match.group(2) == 'down' else 'fc1'}.weight"
            return layout[part] + rel
    return ours


if __name__ == "__main__":
    main()
